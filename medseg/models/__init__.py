"""Model factory: `build_model(cfg, in_channels, num_classes, spacing)`."""

from __future__ import annotations

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.models.unet import CHECKPOINTING_MODES, NetworkPlan, UNet3D, plan_network

__all__ = ["CHECKPOINTING_MODES", "NetworkPlan", "UNet3D", "build_model", "network_plan"]


def network_plan(cfg: Config, spacing: tuple[float, ...] | list[float]) -> NetworkPlan:
    """The network geometry `cfg` asks for; the patch size must be divisible by its strides."""
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


def build_model(cfg: Config, in_channels: int, num_classes: int,
                spacing: tuple[float, ...] | list[float]) -> UNet3D:
    """The 3D U-Net that `cfg` describes, for data at `spacing` (mm, RAS axis order)."""
    try:
        return UNet3D(
            in_channels,
            num_classes,
            network_plan(cfg, spacing),
            norm=cfg.model.norm,
            deep_supervision=cfg.model.deep_supervision,
            checkpointing=cfg.model.checkpointing,
        )
    except ValueError as exc:
        raise ConfigError(f"'model.checkpointing': {exc}") from None
