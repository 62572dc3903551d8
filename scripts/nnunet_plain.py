"""nnU-Net's own network as a medseg architecture: importing this module registers `nnunet-plain`.

`model.arch=nnunet-plain` builds nnU-Net's PlainConvUNet (dynamic-network-architectures, the `bench`
extra) with nnU-Net's 3d_fullres arguments and the stages, strides, kernels and widths of medseg's
plan for the same config (`medseg.models.network_plan`), so the two networks do the same
convolution work. The benchmarks (bench_train.py, ablate_recipe.py) train and time it in medseg's
own step and loop. Only `model.checkpointing=off` and `model.norm` instance or batch are supported.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.models import init_weights, network_plan, register

ARCH = "nnunet-plain"
_NORMS = {"instance": (nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}), "batch": (nn.BatchNorm3d, {})}


class PlainConvUNetNetwork(nn.Module):
    """A PlainConvUNet that keeps medseg's network contract (`medseg.models.SegmentationNetwork`):
    in training mode with deep supervision the list of logits, finest first, otherwise the
    full-resolution logits alone; no activation checkpointing."""

    checkpointing_modes = ("off",)

    def __init__(self, network: nn.Module, deep_supervision: bool) -> None:
        super().__init__()
        self.network = network
        self.deep_supervision = deep_supervision
        self.checkpointing = "off"
        self.train()

    @property
    def heads(self) -> nn.ModuleList:
        # nnU-Net's decoder lists its segmentation layers deepest first, as the contract does.
        return self.network.decoder.seg_layers

    def train(self, mode: bool = True) -> "PlainConvUNetNetwork":
        super().train(mode)
        # nnU-Net's decoder returns the deep-supervision list while this flag is set (and then
        # computes every head), the full-resolution logits alone otherwise.
        self.network.decoder.deep_supervision = mode and self.deep_supervision
        return self

    def set_checkpointing(self, mode: str) -> None:
        if mode not in self.checkpointing_modes:
            raise ValueError(f"{ARCH} has no activation checkpointing; checkpointing must be 'off', got {mode!r}")
        self.checkpointing = mode

    def compile_stages(self) -> None:
        # Nothing is checkpointed, so nothing needs to stay eager: the whole network is one part.
        self.network.compile(dynamic=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.network(image)


@register(ARCH)
def build_plain_conv_unet(cfg: Config, in_channels: int, num_classes: int,
                          spacing: Sequence[float]) -> PlainConvUNetNetwork:
    """nnU-Net's 3d_fullres PlainConvUNet with medseg's geometry for `cfg`, He-initialised as
    nnU-Net does (InitWeights_He(1e-2))."""
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:
        raise ConfigError(f"'model.arch': {ARCH} needs dynamic-network-architectures "
                          f"(pip install 'medseg[bench]')") from None
    if cfg.model.checkpointing != "off":
        raise ConfigError(f"'model.checkpointing': {ARCH} supports only off, got {cfg.model.checkpointing!r}")
    if cfg.model.norm not in _NORMS:
        raise ConfigError(f"'model.norm': {ARCH} supports {', '.join(_NORMS)}, got {cfg.model.norm!r}")
    norm, norm_arguments = _NORMS[cfg.model.norm]
    plan = network_plan(cfg, spacing)
    stages = len(plan.widths)
    network = PlainConvUNet(
        input_channels=in_channels, n_stages=stages, features_per_stage=list(plan.widths), conv_op=nn.Conv3d,
        kernel_sizes=[list(k) for k in plan.kernels], strides=[list(s) for s in plan.strides],
        n_conv_per_stage=[2] * stages, num_classes=num_classes, n_conv_per_stage_decoder=[2] * (stages - 1),
        conv_bias=True, norm_op=norm, norm_op_kwargs=norm_arguments, dropout_op=None, dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True,
    )
    network.apply(init_weights)
    return PlainConvUNetNetwork(network, deep_supervision=cfg.model.deep_supervision)
