"""Configuration: frozen dataclasses loaded from the packaged defaults plus overrides.

`load(path, overrides)` merges, in order, the defaults (`medseg/default.yaml`, shipped inside the
package, the one place every default value and its meaning is written), an experiment file
(overrides only) and `section.key=value` strings from the command line. Unknown keys, wrong types
and values outside a key's choices raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from medseg.errors import ConfigError
from medseg.files import atomic_write_text

DEFAULTS = "default.yaml"  # inside the medseg package


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    folds: int
    fold: int
    split_seed: int
    spacing: Optional[list[float]]
    normalization: str
    ct_percentiles: list[float]
    crop_foreground: bool
    cache: str
    cache_dir: Optional[str]
    foreground_oversample: float
    sampler: str


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    depth: Optional[int]
    base_width: int
    max_width: int
    norm: str
    deep_supervision: bool
    checkpointing: str


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    iterations_per_epoch: int
    batch_size: int
    patch_size: list[int]
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    poly_exponent: float
    grad_clip: float
    amp: str
    device: str
    seed: int
    workers: int
    batch_dice: bool
    max_nonfinite_steps: int
    memory_budget: Optional[str]
    max_minutes: Optional[float]
    compile: str
    channels_last: str


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool
    rotation_prob: float
    max_rotation_deg: float
    scale_prob: float
    scale_range: list[float]
    noise_prob: float
    max_noise_std: float
    blur_prob: float
    blur_channel_prob: float
    blur_sigma: list[float]
    brightness_prob: float
    max_brightness: float
    contrast_prob: float
    max_contrast: float
    low_resolution_prob: float
    low_resolution_channel_prob: float
    low_resolution_zoom: list[float]
    inverted_gamma_prob: float
    gamma_prob: float
    gamma_range: list[float]
    flip_prob: float


@dataclass(frozen=True)
class ValidateConfig:
    every: int
    overlap: float
    sw_batch_size: int
    mirror: bool


@dataclass(frozen=True)
class Config:
    """The resolved configuration. Its default values live in one place, the packaged
    `medseg/default.yaml` (`defaults()`); the dataclasses give the keys and their types."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    augment: AugmentConfig
    validate: ValidateConfig
    output_dir: str
    run_name: Optional[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint safe)."""
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> "Config":
        """Copy with some fields of some sections changed: replace(train={"batch_size": 1})."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **changes)


# Values a string key may take; checked at load time so a typo fails before any work starts.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.normalization": ("auto", "ct", "zscore", "none"),
    "data.cache": ("memory", "disk", "none"),
    "data.sampler": ("auto", "workers", "device"),
    "model.norm": ("instance", "batch", "group"),
    "model.checkpointing": ("off", "selective", "stage"),
    "train.optimizer": ("sgd", "adamw"),
    "train.lr_schedule": ("poly", "cosine", "constant"),
    "train.amp": ("auto", "fp16", "bf16", "off"),
    "train.compile": ("auto", "on", "off", "graphs", "eager-graphs"),
    "train.channels_last": ("auto", "on", "off"),
}


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the experiment file at `path`, then `section.key=value` overrides."""
    merged = default_values()
    if path is not None:
        _merge(merged, _read_yaml(Path(path)), source=str(path))
        _check(merged, source=str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(merged, nested, source="--set")
        _check(merged, source=f"--set {item}")
    return from_dict(merged)


def from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from a nested dict, checking every key and type; keys it lacks take their
    default (a run saved before a key existed loads with that key's default)."""
    merged = default_values()
    _merge(merged, values, source="config")
    return _build(Config, merged, prefix="")


def defaults() -> Config:
    """The default configuration."""
    return _build(Config, default_values(), prefix="")


def default_values() -> dict[str, Any]:
    """The packaged defaults as a nested dict."""
    return yaml.safe_load(defaults_text())


def defaults_text() -> str:
    """The packaged defaults file, comments included (every key documented)."""
    return resources.files("medseg").joinpath(DEFAULTS).read_text(encoding="utf-8")


def dump(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check(values: dict[str, Any], source: str) -> None:
    # Validate after each source so that an error names the file or --set that caused it.
    try:
        from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: YAML syntax error{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return values


def _merge(base: dict[str, Any], update: dict[str, Any], source: str, prefix: str = "") -> None:
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown config key '{name}'")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{name}' is a section; expected a mapping")
            _merge(base[key], value, source, prefix=f"{name}.")
        else:
            base[key] = value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            raise ConfigError(f"config key '{prefix}{f.name}' is missing")
        name = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            section = values[f.name]
            if not isinstance(section, dict):
                raise ConfigError(f"'{name}' is a section; expected a mapping")
            kwargs[f.name] = _build(hint, section, prefix=f"{name}.")
        else:
            kwargs[f.name] = _coerce(name, values[f.name], hint)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    optional = _is_optional(hint)
    inner = _strip_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"'{name}' must not be null")
    if typing.get_origin(inner) is list:
        (item_type,) = typing.get_args(inner)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list of {item_type.__name__}, got {value!r}")
        return [_scalar(f"{name}[{i}]", item, item_type) for i, item in enumerate(value)]
    result = _scalar(name, value, inner)
    if name in CHOICES and result not in CHOICES[name]:
        raise ConfigError(f"'{name}' must be one of {', '.join(CHOICES[name])}; got {result!r}")
    return result


def _scalar(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; it is a float to anyone writing it.
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        # YAML 1.1 reads a bare `off` as false; for keys with a fixed set of words it meant "off"
        # (an error follows if "off" is not one of them). Free-text keys must quote such words.
        if value is False and name in CHOICES:
            return "off"
        if value is True and "on" in CHOICES.get(name, ()):
            return "on"
        if isinstance(value, bool):
            raise ConfigError(f"'{name}' must be str, got {value!r} (quote words like yes/no/on/off)")
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"'{name}' must be {kind.__name__}, got {value!r}")


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    if _is_optional(hint):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint
