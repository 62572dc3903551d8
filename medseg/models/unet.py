"""A 3D U-Net in the shape of nnU-Net's default network, with activation checkpointing modes.

Encoder: per stage two conv-norm-LeakyReLU blocks, the first strided (downsampling by a strided
convolution rather than pooling). Decoder: transposed-conv upsampling, concatenation with the
encoder's skip tensor, two conv blocks, and a 1x1x1 segmentation head per decoder stage for deep
supervision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medseg.models.blocks import (CheckpointedLevels, ConvBlock, DecoderStage, StagedNetwork, checkpoint_keeping_convolutions,
                                  init_weights)
from medseg.models.network import CHECKPOINTING_MODES

__all__ = ["CHECKPOINTING_MODES", "CheckpointedLevels", "NetworkPlan", "UNet3D", "init_weights", "plan_network"]


@dataclass(frozen=True)
class NetworkPlan:
    """Per-stage geometry of the network: stage 0 has stride 1, deeper stages downsample."""

    widths: tuple[int, ...]
    strides: tuple[tuple[int, int, int], ...]
    kernels: tuple[tuple[int, int, int], ...]

    @property
    def divisor(self) -> tuple[int, int, int]:
        """What each patch axis must be divisible by: the product of the strides."""
        total = [1, 1, 1]
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return tuple(total)  # type: ignore[return-value]


def plan_network(
    patch_size: tuple[int, ...] | list[int],
    spacing: tuple[float, ...] | list[float] = (1.0, 1.0, 1.0),
    depth: int | None = None,
    base_width: int = 32,
    max_width: int = 320,
    min_feature_size: int = 4,
    max_depth: int = 7,
) -> NetworkPlan:
    """Derive strides, kernel sizes and widths from the patch size and voxel spacing.

    nnU-Net's rules: an axis is halved while it stays at least `min_feature_size` voxels and even;
    an axis whose spacing is more than twice the finest spacing is neither downsampled nor
    convolved (kernel 1) until the other axes' effective spacing has caught up with it.
    """
    size = [int(s) for s in patch_size]
    current_spacing = [float(s) for s in spacing]
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    kernels: list[tuple[int, int, int]] = [_kernel(current_spacing)]
    limit = max_depth if depth is None else depth
    while len(strides) < limit:
        finest = min(current_spacing)
        stride = []
        for axis in range(3):
            can_halve = size[axis] % 2 == 0 and size[axis] // 2 >= min_feature_size
            isotropic_enough = current_spacing[axis] <= 2 * finest
            stride.append(2 if can_halve and isotropic_enough else 1)
        if stride == [1, 1, 1]:
            break
        size = [s // st for s, st in zip(size, stride)]
        current_spacing = [sp * st for sp, st in zip(current_spacing, stride)]
        strides.append(tuple(stride))  # type: ignore[arg-type]
        kernels.append(_kernel(current_spacing))
    if len(strides) < 2:
        raise ValueError(f"patch {list(patch_size)} is too small for a U-Net: no axis can be halved "
                         f"(an axis needs at least {2 * min_feature_size} voxels and an even size)")
    if depth is not None and len(strides) < depth:
        raise ValueError(
            f"patch {list(patch_size)} allows only {len(strides)} stages, not model.depth={depth}"
        )
    widths = tuple(min(base_width * 2**i, max_width) for i in range(len(strides)))
    return NetworkPlan(widths=widths, strides=tuple(strides), kernels=tuple(kernels))


class EncoderStage(nn.Sequential):
    """Two conv blocks; the first one downsamples by its stride."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int],
                 stride: tuple[int, int, int], norm: str) -> None:
        super().__init__(
            ConvBlock(in_channels, out_channels, kernel, stride, norm),
            ConvBlock(out_channels, out_channels, kernel, (1, 1, 1), norm),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # nn.Sequential's own forward would do; this one lives in this file, where torch.compile
        # traces it when a stage is compiled on its own (it does not trace torch.nn's code as the
        # outermost frame).
        for block in self:
            features = block(features)
        return features


class UNet3D(StagedNetwork):
    """3D U-Net. In training mode with deep supervision it returns a list of logits, finest first;
    otherwise the full-resolution logits alone. Keeps the `medseg.models.SegmentationNetwork`
    contract.

    `checkpointed_levels`: the finest levels that `stage` checkpointing covers. `per_sample`: a
    checkpointed stage is recomputed one sample at a time (instance and group norm keep samples
    independent), which halves the backward's temporaries of the stage.
    """

    def encoder_stage(self, level: int, in_channels: int, out_channels: int, kernel: tuple[int, int, int],
                      stride: tuple[int, int, int], norm: str) -> nn.Module:
        return EncoderStage(in_channels, out_channels, kernel, stride, norm)

    def set_checkpointing(self, mode: str) -> None:
        """Choose what is recomputed in backward instead of being kept from forward.

        off:       keep every activation (fastest, most memory).
        selective: keep only the outputs of the 3x3x3 convolutions; normalisation, activation,
                   concatenation and the cheap 2x2x2 transposed convolutions are recomputed in
                   backward, one stage at a time (the expensive convolutions are never rerun).
        stage:     at the finest levels (`checkpointed_levels`), keep only each stage's inputs (the
                   skip tensors, which are stage outputs anyway); the stage's inner activations
                   (conv outputs, norm statistics, activations) are recomputed in backward, one
                   stage and, with `per_sample`, one sample at a time. Compiled, each stage is its own graph
                   (compile_stages).
        """
        super().set_checkpointing(mode)

    def _forward_selective(self, image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        # The same network, computed so that only convolution outputs cross stage boundaries: each
        # stage takes its inputs *before* their last normalisation and activation and applies them
        # itself. Without that, every stage output (an activation, also kept as a skip tensor)
        # would be saved next to the convolution output it was computed from: twice the memory.
        skips = []
        features, last_block = image, None
        for stage in self.encoder:
            features = checkpoint_keeping_convolutions(_encoder_stage, stage, last_block, features)
            skips.append((features, stage[1]))
            last_block = stage[1]
        features, last_block = skips.pop()
        outputs = []
        for stage, head in zip(self.decoder, self.heads):
            skip, skip_block = skips.pop()
            features = checkpoint_keeping_convolutions(_decoder_stage, stage, last_block, features, skip_block, skip)
            last_block = stage.convs[1]
            if self.deep_supervision:
                outputs.append(checkpoint_keeping_convolutions(_head, head, last_block, features))
        if not self.deep_supervision:
            return checkpoint_keeping_convolutions(_head, self.heads[-1], last_block, features)
        return outputs[::-1]


def _activate(block: nn.Module | None, convolved: torch.Tensor) -> torch.Tensor:
    """The normalisation and activation of a ConvBlock, on its convolution's output."""
    if block is None:  # the network's input image
        return convolved
    return block[2](block[1](convolved))


def _encoder_stage(stage: EncoderStage, previous: nn.Module | None, convolved: torch.Tensor) -> torch.Tensor:
    first, second = stage
    return second[0](_activate(first, first[0](_activate(previous, convolved))))


def _decoder_stage(stage: DecoderStage, below_block: nn.Module, below: torch.Tensor,
                   skip_block: nn.Module, skip: torch.Tensor) -> torch.Tensor:
    features = torch.cat([stage.up(_activate(below_block, below)), _activate(skip_block, skip)], dim=1)
    first, second = stage.convs
    return second[0](_activate(first, first[0](features)))


def _head(head: nn.Module, block: nn.Module, convolved: torch.Tensor) -> torch.Tensor:
    return head(_activate(block, convolved))


def _kernel(spacing: list[float]) -> tuple[int, int, int]:
    finest = min(spacing)
    return tuple(3 if s <= 2 * finest else 1 for s in spacing)  # type: ignore[return-value]
