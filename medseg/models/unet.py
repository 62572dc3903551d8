"""A 3D U-Net in the shape of nnU-Net's default network, with activation checkpointing modes.

Encoder: per stage two conv-norm-LeakyReLU blocks, the first strided (downsampling by a strided
convolution rather than pooling). Decoder: transposed-conv upsampling, concatenation with the
encoder's skip tensor, two conv blocks, and a 1x1x1 segmentation head per decoder stage for deep
supervision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from medseg.models.network import CHECKPOINTING_MODES

__all__ = ["CHECKPOINTING_MODES", "CheckpointedLevels", "NetworkPlan", "UNet3D", "init_weights", "plan_network"]


@dataclass(frozen=True)
class CheckpointedLevels:
    """How many of the finest levels `stage` checkpointing covers, in the encoder and the decoder.

    The full- and half-resolution stages hold most of the activations (and of the backward pass's
    temporaries); coarser stages keep theirs, so their recomputation is not paid.
    """

    encoder: int = 2
    decoder: int = 2


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


class ConvBlock(nn.Sequential):
    """Conv3d -> normalisation -> LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int],
                 stride: tuple[int, int, int], norm: str) -> None:
        padding = tuple(k // 2 for k in kernel)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=True),
            _norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


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


class DecoderStage(nn.Module):
    """Upsample the coarser features, concatenate the skip tensor, two conv blocks."""

    def __init__(self, below_channels: int, skip_channels: int, kernel: tuple[int, int, int],
                 stride: tuple[int, int, int], norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(below_channels, skip_channels, stride, stride=stride, bias=False)
        self.convs = nn.Sequential(
            ConvBlock(2 * skip_channels, skip_channels, kernel, (1, 1, 1), norm),
            ConvBlock(skip_channels, skip_channels, kernel, (1, 1, 1), norm),
        )

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(below), skip], dim=1))


class UNet3D(nn.Module):
    """3D U-Net. In training mode with deep supervision it returns a list of logits, finest first;
    otherwise the full-resolution logits alone. Keeps the `medseg.models.SegmentationNetwork`
    contract.

    `checkpointed_levels`: the finest levels that `stage` checkpointing covers. `per_sample`: a
    checkpointed stage is recomputed one sample at a time (instance and group norm keep samples
    independent), which halves the backward's temporaries of the stage.
    """

    checkpointing_modes = CHECKPOINTING_MODES

    def __init__(self, in_channels: int, num_classes: int, plan: NetworkPlan, norm: str = "instance",
                 deep_supervision: bool = True, checkpointing: str = "off",
                 checkpointed_levels: CheckpointedLevels = CheckpointedLevels(), per_sample: bool = True) -> None:
        super().__init__()
        self.plan = plan
        self.deep_supervision = deep_supervision
        self.checkpointed_levels = checkpointed_levels
        self.per_sample = per_sample
        self._recompile_limit: int | None = None  # set by compile_stages
        widths = plan.widths
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width, kernel, stride in zip(widths, plan.kernels, plan.strides):
            self.encoder.append(EncoderStage(channels, width, kernel, stride, norm))
            channels = width
        # decoder[i] brings stage i+1's resolution up to stage i's; listed deepest first.
        self.decoder = nn.ModuleList(
            DecoderStage(widths[i + 1], widths[i], plan.kernels[i], plan.strides[i + 1], norm)
            for i in reversed(range(len(widths) - 1))
        )
        self.heads = nn.ModuleList(
            nn.Conv3d(widths[i], num_classes, 1) for i in reversed(range(len(widths) - 1))
        )
        self.checkpointing = "off"
        self.set_checkpointing(checkpointing)
        self.apply(init_weights)

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

    def _forward_selective(self, image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        # The same network, computed so that only convolution outputs cross stage boundaries: each
        # stage takes its inputs *before* their last normalisation and activation and applies them
        # itself. Without that, every stage output (an activation, also kept as a skip tensor)
        # would be saved next to the convolution output it was computed from: twice the memory.
        skips = []
        features, last_block = image, None
        for stage in self.encoder:
            features = self._checkpoint(_encoder_stage, stage, last_block, features)
            skips.append((features, stage[1]))
            last_block = stage[1]
        features, last_block = skips.pop()
        outputs = []
        for stage, head in zip(self.decoder, self.heads):
            skip, skip_block = skips.pop()
            features = self._checkpoint(_decoder_stage, stage, last_block, features, skip_block, skip)
            last_block = stage.convs[1]
            if self.deep_supervision:
                outputs.append(self._checkpoint(_head, head, last_block, features))
        if not self.deep_supervision:
            return self._checkpoint(_head, self.heads[-1], last_block, features)
        return outputs[::-1]

    @staticmethod
    def _checkpoint(function, *arguments) -> torch.Tensor:
        return checkpoint(function, *arguments, use_reentrant=False, context_fn=_KEEP_CONVOLUTIONS)

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


def _keep_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Keep what is expensive to recompute: outputs of the (non-transposed) convolutions. Their
    # `transposed` flag is argument 6 of aten.convolution; the 2x2x2 transposed convolutions cost
    # a small fraction of a 3x3x3 one and are recomputed.
    if op is torch.ops.aten.convolution.default and not args[6] and args[0].shape[1] > 4:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_KEEP_CONVOLUTIONS = partial(create_selective_checkpoint_contexts, _keep_convolutions)


def _kernel(spacing: list[float]) -> tuple[int, int, int]:
    finest = min(spacing)
    return tuple(3 if s <= 2 * finest else 1 for s in spacing)  # type: ignore[return-value]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}")


def init_weights(module: nn.Module) -> None:
    """He initialisation for LeakyReLU(0.01), as nnU-Net does (`network.apply(init_weights)`)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
