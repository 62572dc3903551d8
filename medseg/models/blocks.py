"""Building pieces that medseg's networks share: normalisation, conv blocks, the U-Net decoder, the
segmentation heads, and `StagedNetwork`, the encoder-decoder skeleton that runs stages with
activation checkpointing (`stage` mode), compiles them one by one, and returns deep supervision.

`medseg.models.unet.UNet3D` (plain stages) and `medseg.models.resenc.ResEncUNet` (residual encoder
stages) are both a `StagedNetwork`; only their encoder stages and `selective` checkpointing differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from medseg.models.network import CHECKPOINTING_MODES

if TYPE_CHECKING:
    from medseg.models.unet import NetworkPlan

__all__ = ["CheckpointedLevels", "ConvBlock", "DecoderStage", "KEEP_CONVOLUTIONS", "StagedNetwork",
           "checkpoint_keeping_convolutions", "decoder_stages", "init_weights",
           "norm_layer", "segmentation_heads"]

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class CheckpointedLevels:
    """How many of the finest levels `stage` checkpointing covers, in the encoder and the decoder.

    The full- and half-resolution stages hold most of the activations (and of the backward pass's
    temporaries); coarser stages keep theirs, so their recomputation is not paid.
    """

    encoder: int = 2
    decoder: int = 2


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalisation `model.norm` names, for `channels` feature maps."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}")


class ConvBlock(nn.Sequential):
    """Conv3d -> normalisation -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple, stride: Triple, norm: str) -> None:
        padding = tuple(k // 2 for k in kernel)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=True),
            norm_layer(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class DecoderStage(nn.Module):
    """Upsample the coarser features (transposed conv), concatenate the skip tensor, `convs` conv blocks."""

    def __init__(self, below_channels: int, skip_channels: int, kernel: Triple, stride: Triple, norm: str,
                 convs: int = 2) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(below_channels, skip_channels, stride, stride=stride, bias=False)
        self.convs = nn.Sequential(*(ConvBlock(2 * skip_channels if i == 0 else skip_channels, skip_channels,
                                               kernel, (1, 1, 1), norm) for i in range(convs)))

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.up(below), skip], dim=1)
        for block in self.convs:
            features = block(features)
        return features


def decoder_stages(widths: tuple[int, ...], kernels: tuple[Triple, ...], strides: tuple[Triple, ...], norm: str,
                   convs: int) -> nn.ModuleList:
    """The decoder of a U-Net whose encoder stages have `widths`: decoder[i] brings stage i+1's
    resolution up to stage i's, listed deepest first."""
    return nn.ModuleList(DecoderStage(widths[i + 1], widths[i], kernels[i], strides[i + 1], norm, convs)
                         for i in reversed(range(len(widths) - 1)))


def segmentation_heads(widths: tuple[int, ...], num_classes: int) -> nn.ModuleList:
    """The 1x1x1 heads of each decoder stage, coarsest first (heads[-1] gives full resolution)."""
    return nn.ModuleList(nn.Conv3d(widths[i], num_classes, 1) for i in reversed(range(len(widths) - 1)))


class StagedNetwork(nn.Module):
    """An encoder-decoder network of stages, built from a `medseg.models.unet.NetworkPlan`:
    `encoder` (finest first; each stage from the subclass's `encoder_stage`), `decoder` and `heads`
    (deepest first, from `decoder_stages` with `decoder_convs` convolutions a stage, and
    `segmentation_heads`). `_forward_selective` is the subclass's `selective` checkpointing.

    `checkpointed_levels`: the finest levels that `stage` checkpointing covers. `per_sample`: a
    checkpointed stage is recomputed one sample at a time (instance and group norm keep samples
    independent), which halves the backward's temporaries of the stage.
    """

    checkpointing_modes = CHECKPOINTING_MODES
    encoder: nn.ModuleList
    decoder: nn.ModuleList
    heads: nn.ModuleList

    decoder_convs = 2

    def __init__(self, in_channels: int, num_classes: int, plan: "NetworkPlan", norm: str = "instance",
                 deep_supervision: bool = True, checkpointing: str = "off",
                 checkpointed_levels: CheckpointedLevels = CheckpointedLevels(), per_sample: bool = True) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.checkpointed_levels = checkpointed_levels
        self.per_sample = per_sample
        self.checkpointing = "off"
        self._recompile_limit: int | None = None  # set by compile_stages
        self.plan = plan
        self.encoder = nn.ModuleList()
        channels = in_channels
        for level, (width, kernel, stride) in enumerate(zip(plan.widths, plan.kernels, plan.strides)):
            self.encoder.append(self.encoder_stage(level, channels, width, kernel, stride, norm))
            channels = width
        self.decoder = decoder_stages(plan.widths, plan.kernels, plan.strides, norm, convs=self.decoder_convs)
        self.heads = segmentation_heads(plan.widths, num_classes)
        self.set_checkpointing(checkpointing)
        self.apply(init_weights)

    def encoder_stage(self, level: int, in_channels: int, out_channels: int, kernel: Triple, stride: Triple,
                      norm: str) -> nn.Module:
        """Encoder stage `level` (0 = finest)."""
        raise NotImplementedError

    def set_checkpointing(self, mode: str) -> None:
        """Switch activation checkpointing to `mode` (see the subclass for what each mode keeps)."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        if mode != "off" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules()):
            # Recomputing a stage in backward would update BatchNorm's running statistics twice.
            raise ValueError("checkpointing cannot be combined with batch norm; use instance or group norm")
        self.checkpointing = mode
        # In place, LeakyReLU saves one tensor where out of place it saves two (its input and, for
        # the next convolution, its output). Inside a checkpointed region nothing is saved until
        # the recomputation, which the memory estimator finds cheaper out of place; and PyTorch
        # warns against in-place operations in selectively checkpointed regions under torch.compile.
        for module in self.modules():
            if isinstance(module, nn.LeakyReLU):
                module.inplace = mode == "off"

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.checkpointing == "selective" and torch.is_grad_enabled():
            return self._forward_selective(image)
        skips = []
        features = image
        for level, stage in enumerate(self.encoder):
            features = self._run(stage, features, checkpointed=level < self.checkpointed_levels.encoder)
            skips.append(features)
        outputs = []
        features = skips.pop()
        for level, stage, head in zip(reversed(range(len(self.decoder))), self.decoder, self.heads):
            features = self._run(stage, features, skips.pop(), checkpointed=level < self.checkpointed_levels.decoder)
            if self.training and self.deep_supervision:
                outputs.append(head(features))
        if not (self.training and self.deep_supervision):
            return self.heads[-1](features)
        return outputs[::-1]

    def _forward_selective(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        raise NotImplementedError

    def _run(self, stage: nn.Module, *inputs: torch.Tensor, checkpointed: bool) -> torch.Tensor:
        if self.checkpointing == "stage" and checkpointed and torch.is_grad_enabled():
            # Non-reentrant checkpointing: works with autocast and inputs that need no grad, and
            # recomputes the stage under the same autocast state as in forward.
            if not self.per_sample or inputs[0].shape[0] == 1:
                return checkpoint(self._call_stage, stage, *inputs, use_reentrant=False)
            return torch.cat([checkpoint(self._call_stage, stage, *(x[i:i + 1] for x in inputs), use_reentrant=False)
                              for i in range(inputs[0].shape[0])])
        return self._call_stage(stage, *inputs)

    def _call_stage(self, stage: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        # Also the function a checkpoint reruns in backward, so a recomputed compiled stage runs
        # under the same torch.compile settings as in forward.
        if self._recompile_limit is None:
            return stage(*inputs)
        import torch._dynamo

        with torch._dynamo.config.patch(recompile_limit=self._recompile_limit):
            return stage(*inputs)

    def compile_stages(self) -> None:
        """torch.compile each encoder and decoder stage on its own, leaving the checkpointing around them eager.

        For `stage` checkpointing: compiled whole, the network's checkpoints become part of one
        graph whose backward holds nearly as much memory as no checkpointing; compiled per stage,
        each checkpoint drops its stage's saved tensors and reruns the compiled stage in backward.
        """
        import torch._dynamo

        # Stages of one class share their forward's code, and torch.compile keeps a limited number
        # of compiled versions per code object (one per stage and batch size here). The larger
        # limit holds only while a stage runs (`_call_stage`), not for the rest of the process.
        self._recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(self.encoder))
        for stage in (*self.encoder, *self.decoder):
            stage.compile(dynamic=False)


def checkpoint_keeping_convolutions(function, *arguments) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`function(*arguments)` checkpointed so that only its 3x3x3 convolutions' outputs are kept
    for backward (`selective` checkpointing); the rest is recomputed."""
    return checkpoint(function, *arguments, use_reentrant=False, context_fn=KEEP_CONVOLUTIONS)


def _keep_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # type: ignore[no-untyped-def]
    # Keep what is expensive to recompute: outputs of the (non-transposed) convolutions. Their
    # `transposed` flag is argument 6 of aten.convolution; the 2x2x2 transposed convolutions cost
    # a small fraction of a 3x3x3 one and are recomputed. Convolutions with at most 4 input
    # channels (the first one, on the image) are cheap to rerun as well.
    if op is torch.ops.aten.convolution.default and not args[6] and args[0].shape[1] > 4:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


KEEP_CONVOLUTIONS = partial(create_selective_checkpoint_contexts, _keep_convolutions)


def init_weights(module: nn.Module) -> None:
    """He initialisation for LeakyReLU(0.01), as nnU-Net does (`network.apply(init_weights)`)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
