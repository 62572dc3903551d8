"""Architectures by name (`model.arch`): `register` adds one, `build_model` builds the configured one."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from medseg.config import Config
from medseg.errors import ConfigError
from medseg.models.network import SegmentationNetwork

# builder(cfg, in_channels, num_classes, spacing, **options) -> network. `options` are keyword
# arguments of the architecture that are not config keys (benchmarks and tests vary them).
Builder = Callable[..., SegmentationNetwork]

# Name -> builder of every registered architecture, in registration order ("unet" first).
ARCHITECTURES: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder` as architecture `name`, so that `model.arch=name` builds it.

    The builder is called as `builder(cfg, in_channels, num_classes, spacing, **options)` and
    returns an `nn.Module` that keeps the `SegmentationNetwork` contract; it raises ConfigError for
    a configuration the architecture cannot build. A name can be registered once.
    """
    def add(builder: Builder) -> Builder:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        return builder

    return add


def build_model(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
                **options: Any) -> SegmentationNetwork:
    """The network `cfg.model.arch` names, configured by `cfg`, for data at `spacing` (mm, RAS axis
    order). `options` go to the architecture's builder as they are.

    Raises ConfigError for an unknown architecture or a configuration it cannot build.
    """
    builder = ARCHITECTURES.get(cfg.model.arch)
    if builder is None:
        raise ConfigError(f"'model.arch': {cfg.model.arch!r} is not one of: {', '.join(ARCHITECTURES)}")
    return builder(cfg, in_channels, num_classes, tuple(spacing), **options)
