"""Networks by name: `build_model(cfg, in_channels, num_classes, spacing)` builds `cfg.model.arch`.

`unet` (medseg's 3D U-Net, `UNet3D`) and `resenc` (nnU-Net's residual encoder U-Net, `ResEncUNet`)
are registered here; another architecture plugs in with
`@register(name)` on a builder whose network keeps the `SegmentationNetwork` contract.
"""

from __future__ import annotations

from typing import Sequence

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.models.network import CHECKPOINTING_MODES, SegmentationNetwork
from medseg.models.registry import ARCHITECTURES, Builder, build_model, register
from medseg.models.resenc import ResEncUNet
from medseg.models.unet import CheckpointedLevels, NetworkPlan, UNet3D, init_weights, plan_network

__all__ = ["ARCHITECTURES", "CHECKPOINTING_MODES", "Builder", "CheckpointedLevels", "NetworkPlan", "ResEncUNet",
           "SegmentationNetwork", "UNet3D", "build_model", "build_resenc", "build_unet", "init_weights",
           "network_plan", "register"]


def network_plan(cfg: Config, spacing: Sequence[float]) -> NetworkPlan:
    """The U-Net geometry `cfg` asks for (stages, strides, kernels, widths, from `train.patch_size`
    and the `model` keys); the patch size must be divisible by its strides."""
    patch = cfg.train.patch_size
    if len(patch) != 3 or min(patch) < 1:
        raise ConfigError(f"'train.patch_size' must be three positive integers, got {patch}")
    try:
        plan = plan_network(patch, spacing, depth=cfg.model.depth,
                            base_width=cfg.model.base_width, max_width=cfg.model.max_width)
    except ValueError as exc:
        key = "model.depth" if "model.depth" in str(exc) else "train.patch_size"
        raise ConfigError(f"'{key}': {exc}") from None
    return plan


@register("unet")
def build_unet(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
               checkpointed_levels: CheckpointedLevels = CheckpointedLevels(), per_sample: bool = True) -> UNet3D:
    """medseg's 3D U-Net that `cfg` describes; `checkpointed_levels` and `per_sample` as in UNet3D."""
    return _build(UNet3D, cfg, in_channels, num_classes, spacing, checkpointed_levels, per_sample)


@register("resenc")
def build_resenc(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
                 checkpointed_levels: CheckpointedLevels = CheckpointedLevels(), per_sample: bool = True) -> ResEncUNet:
    """nnU-Net's residual encoder U-Net that `cfg` describes, on the plain U-Net's plan (widths,
    strides, kernels); `checkpointed_levels` and `per_sample` as in UNet3D."""
    return _build(ResEncUNet, cfg, in_channels, num_classes, spacing, checkpointed_levels, per_sample)


def _build(network: type, cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
           checkpointed_levels: CheckpointedLevels, per_sample: bool):  # type: ignore[no-untyped-def]
    try:
        return network(
            in_channels,
            num_classes,
            network_plan(cfg, spacing),
            norm=cfg.model.norm,
            deep_supervision=cfg.model.deep_supervision,
            checkpointing=cfg.model.checkpointing,
            checkpointed_levels=checkpointed_levels,
            per_sample=per_sample,
        )
    except ValueError as exc:
        raise ConfigError(f"'model.checkpointing': {exc}") from None
