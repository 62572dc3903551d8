"""nnU-Net's residual encoder U-Net (Isensee et al. 2024, "nnU-Net Revisited"; nnU-Net ResEnc M/L).

Encoder: a stem (one conv-norm-LeakyReLU block at full resolution), then per stage a stack of
ResNet-D basic blocks, 1-3-4-6-6-6 from the finest stage down. A basic block is two 3x3x3 convs
(conv-norm-LeakyReLU, conv-norm), the stage's downsampling by the stride of its first block's
first conv, and a residual path that is the identity where shape and width stay, else ResNet-D's
projection: average pooling by the stride, then a 1x1x1 conv and a norm. The sum goes through a
LeakyReLU. Decoder: as the plain U-Net's (transposed-conv upsampling, skip concatenation) with one
conv block per stage, and the same deep-supervision heads. Widths, strides and kernels come from
the same network plan as the plain U-Net (`medseg.models.unet.plan_network`).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.blocks import CheckpointedLevels, ConvBlock, StagedNetwork, checkpoint_keeping_convolutions, norm_layer
from medseg.models.unet import NetworkPlan

__all__ = ["BLOCKS_PER_STAGE", "ResEncUNet", "ResidualBlock", "ResidualStage", "blocks_per_stage"]

# Residual blocks per encoder stage, finest first (nnU-Net's ResEnc presets).
BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6)

Triple = tuple[int, int, int]


def blocks_per_stage(stages: int) -> tuple[int, ...]:
    """`BLOCKS_PER_STAGE` for a plan of `stages` stages: its first entries, and for a deeper plan
    than nnU-Net's six stages the last entry repeated."""
    return tuple(BLOCKS_PER_STAGE[min(i, len(BLOCKS_PER_STAGE) - 1)] for i in range(stages))


class ResidualBlock(nn.Module):
    """ResNet-D basic block: LeakyReLU(conv2(conv1(x)) + residual(x)), conv1 strided."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple, stride: Triple, norm: str) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_channels, out_channels, kernel, stride, norm)
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel), bias=True),
            norm_layer(norm, out_channels),
        )
        projection: list[nn.Module] = []
        if stride != (1, 1, 1):
            # ResNet-D: pool first, so the 1x1x1 projection sees every voxel (a strided 1x1x1
            # conv would read one voxel in eight).
            projection.append(nn.AvgPool3d(stride, stride))
        if in_channels != out_channels:
            projection += [nn.Conv3d(in_channels, out_channels, 1, bias=False), norm_layer(norm, out_channels)]
        self.skip = nn.Sequential(*projection) if projection else None
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        residual = features if self.skip is None else self.skip(features)
        return self.nonlin(self.conv2(self.conv1(features)) + residual)


class ResidualStage(nn.Module):
    """One encoder stage: the stem (stage 0 only), then its residual blocks; the first block downsamples."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple, stride: Triple, norm: str,
                 blocks: int, stem: bool) -> None:
        super().__init__()
        self.stem = ConvBlock(in_channels, out_channels, kernel, (1, 1, 1), norm) if stem else None
        channels = out_channels if stem else in_channels
        self.blocks = nn.ModuleList(
            ResidualBlock(channels if i == 0 else out_channels, out_channels, kernel, stride if i == 0 else (1, 1, 1),
                          norm)
            for i in range(blocks))

    def parts(self) -> list[nn.Module]:
        """The stem (if any) and the blocks, in order: what `selective` checkpoints one at a time."""
        return ([self.stem] if self.stem is not None else []) + list(self.blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Defined in this file so that torch.compile traces it when the stage is compiled alone.
        for part in self.parts():
            features = part(features)
        return features


class ResEncUNet(StagedNetwork):
    """Residual encoder U-Net (nnU-Net ResEnc). In training mode with deep supervision it returns
    a list of logits, finest first; otherwise the full-resolution logits alone. Keeps the
    `medseg.models.SegmentationNetwork` contract.

    `checkpointed_levels` and `per_sample` as in `medseg.models.UNet3D`.
    """

    decoder_convs = 1

    def __init__(self, in_channels: int, num_classes: int, plan: NetworkPlan, norm: str = "instance",
                 deep_supervision: bool = True, checkpointing: str = "off",
                 checkpointed_levels: CheckpointedLevels = CheckpointedLevels(), per_sample: bool = True) -> None:
        super().__init__(in_channels, num_classes, plan, norm, deep_supervision, checkpointing, checkpointed_levels,
                         per_sample)
        for module in self.modules():
            if isinstance(module, ResidualBlock) and getattr(module.conv2[1], "weight", None) is not None:
                # Each block starts as the identity on its residual path (nnU-Net and Goyal et
                # al. 2017): deep stacks of blocks then train from the start like shallow ones.
                nn.init.zeros_(module.conv2[1].weight)
                nn.init.zeros_(module.conv2[1].bias)

    def encoder_stage(self, level: int, in_channels: int, out_channels: int, kernel: Triple, stride: Triple,
                      norm: str) -> nn.Module:
        blocks = blocks_per_stage(len(self.plan.widths))[level]
        return ResidualStage(in_channels, out_channels, kernel, stride, norm, blocks, stem=level == 0)

    def set_checkpointing(self, mode: str) -> None:
        """Choose what is recomputed in backward instead of being kept from forward.

        off:       keep every activation (fastest, most memory).
        selective: checkpoint each residual block (and the stem, and each decoder stage) on its
                   own, keeping its input and the outputs of its convolutions; normalisation,
                   activation, the residual sum, pooling, concatenation and the 2x2x2 transposed
                   convolutions are recomputed in backward (the 3x3x3 convolutions are never rerun).
        stage:     at the finest levels (`checkpointed_levels`), keep only each stage's inputs and
                   recompute whole stages in backward, one sample at a time with `per_sample`.
                   Compiled, each stage is its own graph (compile_stages).
        """
        super().set_checkpointing(mode)

    def _forward_selective(self, image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        skips = []
        features = image
        for stage in self.encoder:
            for part in stage.parts():
                features = checkpoint_keeping_convolutions(part, features)
            skips.append(features)
        features = skips.pop()
        outputs = []
        for stage, head in zip(self.decoder, self.heads):
            features = checkpoint_keeping_convolutions(stage, features, skips.pop())
            if self.deep_supervision:
                outputs.append(head(features))
        if not self.deep_supervision:
            return self.heads[-1](features)
        return outputs[::-1]
