"""A 3D U-Net in the shape of nnU-Net's default network, with activation checkpointing modes.

Encoder: per stage two conv-norm-LeakyReLU blocks, the first strided (downsampling by a strided
convolution rather than pooling). Decoder: transposed-conv upsampling, concatenation with the
encoder's skip tensor, two conv blocks, and a 1x1x1 segmentation head per decoder stage for deep
supervision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# Cheapest first in time. (In memory "selective" now predicts below "stage" for the default network
# at 128³ and 256³ batch 2 fp16, 0.44 and 0.48 of "off"'s peak; "stage" remains the mode that keeps
# the least between stages.)
CHECKPOINTING_MODES = ("off", "selective", "stage")
# With "stage" checkpointing, the stages of this many of the finest levels run one sample at a time
# (the full- and half-resolution stages hold most of the memory of the backward pass).
PER_SAMPLE_LEVELS = 2
# With "selective" checkpointing, the decoder stages of this many of the finest levels run one sample
# at a time (their backward is where the peak is).
SELECTIVE_PER_SAMPLE_LEVELS = 1


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
    otherwise the full-resolution logits alone."""

    def __init__(self, in_channels: int, num_classes: int, plan: NetworkPlan, norm: str = "instance",
                 deep_supervision: bool = True, checkpointing: str = "off") -> None:
        super().__init__()
        self.plan = plan
        self.deep_supervision = deep_supervision
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
        self.apply(_init_weights)

    def set_checkpointing(self, mode: str) -> None:
        """Choose what is recomputed in backward instead of being kept from forward.

        off:       keep every activation (fastest, most memory).
        selective: keep only the outputs of the 3x3x3 convolutions; normalisation, activation,
                   concatenation and the cheap 2x2x2 transposed convolutions are recomputed in
                   backward, for one convolution's input at a time (the expensive convolutions are
                   never rerun), and the finest decoder stage one sample at a time. Predicted at
                   128³ batch 2 fp16: 0.44 of "off"'s peak (was 0.69 recomputing whole stages).
        stage:     keep only each stage's input (and the skip tensors, which are stage outputs anyway);
                   each encoder and decoder stage's inner activations (conv outputs, norm
                   statistics, activations) are recomputed in backward, one stage at a time, and at
                   the two finest levels one sample at a time.
        """
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        if mode != "off" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules()):
            # Recomputing a stage in backward would update BatchNorm's running statistics twice.
            raise ValueError("checkpointing cannot be combined with batch norm; use instance or group norm")
        self.checkpointing = mode
        # In place, LeakyReLU saves one tensor where out of place it saves two (its input and, for
        # the next convolution, its output). Inside a checkpointed region nothing is saved until
        # the recomputation, which the estimator finds cheaper out of place (128³ b2 fp16: selective
        # 3.42 -> 3.23 GiB, stage 3.19 -> 2.94 GiB); and PyTorch warns against in-place operations
        # in selectively checkpointed regions under torch.compile. ("selective" does not use these
        # modules' activations: `_activate` applies its own, in place where that is safe.)
        for module in self.modules():
            if isinstance(module, nn.LeakyReLU):
                module.inplace = mode == "off"

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.checkpointing == "selective" and torch.is_grad_enabled():
            # The same network and parameters, computed so that less is kept for backward.
            return self._forward_selective(image)
        skips = []
        features = image
        for level, stage in enumerate(self.encoder):
            features = self._run(stage, features, per_sample=level < PER_SAMPLE_LEVELS)
            skips.append(features)
        outputs = []
        features = skips.pop()
        for level, stage, head in zip(reversed(range(len(self.decoder))), self.decoder, self.heads):
            features = self._run(stage, features, skips.pop(), per_sample=level < PER_SAMPLE_LEVELS)
            if self.training and self.deep_supervision:
                outputs.append(head(features))
        if not (self.training and self.deep_supervision):
            return self.heads[-1](features)
        return outputs[::-1]

    def _forward_selective(self, image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        # The same network, cut into one checkpointed region per 3x3x3 convolution: a region takes
        # the previous convolution's output, applies that block's normalisation and activation and
        # then its own convolution. Only convolution outputs cross regions (the policy keeps them:
        # they are what is expensive to recompute); were stage outputs (activations) passed on, they
        # would be kept beside the convolution outputs they come from, twice the memory. Backward
        # recomputes the normalisation and activation of one convolution's input at a time and
        # frees it after that convolution's backward, so the recomputed tensors alive at once are
        # one convolution's, not a whole stage's (128³ b2 fp16: 3.23 -> 2.67 GiB predicted).
        deep_supervision = self.training and self.deep_supervision
        skips = []
        # Stage 0's first convolution reads the image (a few channels): cheap, so it is recomputed
        # inside the region of the second rather than kept.
        features = self._checkpoint(_first_stage, self.encoder[0], image)
        block = self.encoder[0][1]
        skips.append((features, block))
        for stage in self.encoder[1:]:
            for conv_block in stage:
                features = self._checkpoint(_block, conv_block[0], block, features)
                block = conv_block
            skips.append((features, block))
        features, block = skips.pop()
        outputs = []
        for level, stage, head in zip(reversed(range(len(self.decoder))), self.decoder, self.heads):
            skip, skip_block = skips.pop()
            last = level == 0
            if level < SELECTIVE_PER_SAMPLE_LEVELS and image.shape[0] > 1:
                # Instance norm keeps samples independent, so the finest decoder stage, whose
                # backward comes first and so holds the peak (every kept convolution output is
                # still alive), runs one sample at a time: backward recomputes and holds one
                # sample's temporaries at a time (128³ b2 fp16: 2.67 -> 2.05 GiB predicted; the
                # next level too changes nothing). Its outputs stay split into samples up to the
                # logits (3 channels), so no full-resolution concatenation copies them.
                if isinstance(features, torch.Tensor):
                    features = [features[i:i + 1] for i in range(image.shape[0])]
                with _without_autocast_cache(image.device.type):
                    results = [self._decoder_stage(stage, head, block, below, skip_block, skip[i:i + 1],
                                                   deep_supervision or last) for i, below in enumerate(features)]
                features = [result[0] for result in results]
                logits = torch.cat([result[1] for result in results]) if results[0][1] is not None else None
            else:
                features, logits = self._decoder_stage(stage, head, block, features, skip_block, skip,
                                                       deep_supervision or last)
            block = stage.convs[1]
            if logits is not None:
                outputs.append(logits)
        if not deep_supervision:
            return outputs[-1]
        return outputs[::-1]

    def _decoder_stage(self, stage: DecoderStage, head: nn.Module, below_block: nn.Module, below: torch.Tensor,
                       skip_block: nn.Module, skip: torch.Tensor,
                       with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder stage and its head, for `_forward_selective`: the output of its second
        convolution and, if `with_logits`, the head's logits."""
        features = self._checkpoint(_decoder_first, stage, below_block, below, skip_block, skip)
        features = self._checkpoint(_block, stage.convs[1][0], stage.convs[0], features)
        logits = self._checkpoint(_block, head, stage.convs[1], features) if with_logits else None
        return features, logits

    @staticmethod
    def _checkpoint(function, *arguments) -> torch.Tensor:
        return checkpoint(function, *arguments, use_reentrant=False, context_fn=_KEEP_CONVOLUTIONS)

    def _run(self, stage: nn.Module, *inputs: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        if self.checkpointing == "stage" and torch.is_grad_enabled():
            # Non-reentrant checkpointing: works with autocast and inputs that need no grad, and
            # recomputes the stage under the same autocast state as in forward.
            if per_sample and inputs[0].shape[0] > 1:
                # Instance and group norm keep samples independent: one checkpoint per sample
                # recomputes (and holds the backward's temporaries of) one sample at a time.
                return torch.cat([checkpoint(stage, *(x[i:i + 1] for x in inputs), use_reentrant=False)
                                  for i in range(inputs[0].shape[0])])
            return checkpoint(stage, *inputs, use_reentrant=False)
        return stage(*inputs)


def _activate(block: nn.Module, convolved: torch.Tensor) -> torch.Tensor:
    """The normalisation and activation of a ConvBlock, on its convolution's output."""
    norm, activation = block[1], block[2]
    if isinstance(norm, nn.InstanceNorm3d) and norm.affine and not norm.track_running_stats:
        # Instance norm as F.instance_norm computes it (batch norm over the batch folded into the
        # channels), with the LeakyReLU applied in place to the batch norm's own output: autograd
        # then saves one tensor, the activation (LeakyReLU's gradient needs only the sign, which
        # its output has). Out of place it would also keep the normalised tensor; in place on
        # F.instance_norm's result, which is a view, it would make backward allocate two more
        # full-size buffers (CopySlices).
        batch, channels = convolved.shape[:2]
        folded = convolved.reshape(1, batch * channels, *convolved.shape[2:])
        normalised = F.batch_norm(folded, None, None, norm.weight.repeat(batch), norm.bias.repeat(batch),
                                  training=True, momentum=0.0, eps=norm.eps)
        return F.leaky_relu(normalised, activation.negative_slope, inplace=True).view_as(convolved)
    return activation(norm(convolved))


def _first_stage(stage: EncoderStage, image: torch.Tensor) -> torch.Tensor:
    """Stage 0's two convolutions; the first, on the image's few channels, is cheap to recompute."""
    first, second = stage
    return second[0](_activate(first, first[0](image)))


def _block(convolution: nn.Module, previous: nn.Module, convolved: torch.Tensor) -> torch.Tensor:
    """`convolution` on the normalised and activated output of the previous block's convolution."""
    return convolution(_activate(previous, convolved))


def _decoder_first(stage: DecoderStage, below_block: nn.Module, below: torch.Tensor,
                   skip_block: nn.Module, skip: torch.Tensor) -> torch.Tensor:
    """A decoder stage's first convolution: upsampling, concatenation with the skip tensor, conv.

    The concatenation stays (a concatenation-free split of the convolution into its up and skip
    halves would end the region on two convolution outputs and an addition; the policy would have
    to keep both convolution outputs, or recompute them in backward)."""
    features = torch.cat([stage.up(_activate(below_block, below)), _activate(skip_block, skip)], dim=1)
    return stage.convs[0][0](features)


def _without_autocast_cache(device_type: str):
    # Selective checkpointing replays a region's operators in backward and insists on the same
    # sequence. Autocast casts each weight once and caches the copy: the first sample's region
    # would cast the weights, the second would not, and both do when recomputed in backward.
    # Without the cache every region casts its own (small) weight copies, forward and backward.
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


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


def _init_weights(module: nn.Module) -> None:
    # He initialisation for LeakyReLU(0.01), as nnU-Net does.
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
