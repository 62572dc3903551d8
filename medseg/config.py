"""Configuration: frozen dataclasses loaded from configs/default.yaml plus overrides.

`load(path, overrides)` merges, in order, the defaults, an experiment file (overrides only) and
`section.key=value` strings from the command line. Unknown keys, wrong types and values outside a
key's choices raise `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from medseg.errors import ConfigError

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "sample_data"
    folds: int = 5
    fold: int = 0
    split_seed: int = 12345
    spacing: Optional[list[float]] = None
    normalization: str = "auto"
    ct_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    crop_foreground: bool = True
    cache: str = "memory"
    cache_dir: Optional[str] = None
    foreground_oversample: float = 0.33
    sampler: str = "auto"


@dataclass(frozen=True)
class ModelConfig:
    depth: Optional[int] = None
    base_width: int = 32
    max_width: int = 320
    norm: str = "instance"
    deep_supervision: bool = True
    checkpointing: str = "off"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    iterations_per_epoch: int = 250
    batch_size: int = 2
    patch_size: list[int] = field(default_factory=lambda: [128, 128, 128])
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    lr_schedule: str = "poly"
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int = 4
    augment: bool = True
    batch_dice: bool = True
    max_nonfinite_steps: int = 20
    memory_budget: Optional[str] = None
    max_minutes: Optional[float] = None
    compile: str = "auto"
    channels_last: str = "auto"


@dataclass(frozen=True)
class ValidateConfig:
    every: int = 1
    overlap: float = 0.5
    sw_batch_size: int = 2
    mirror: bool = False


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    output_dir: str = "runs"
    run_name: Optional[str] = None

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
    merged = _read_yaml(DEFAULT_PATH)
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
    """Build a Config from a nested dict, checking every key and type."""
    return _build(Config, values, prefix="")


def dump(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


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
            continue
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
