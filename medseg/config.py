"""Configuration: frozen dataclasses loaded from the packaged defaults plus overrides.

`load(path, overrides)` merges, in order, the defaults (`medseg/default.yaml`, shipped inside the
package, the one place every default value and its meaning is written), an experiment file
(overrides only) and `section.key=value` strings from the command line. Unknown keys, wrong types
values outside a key's choices and outside a key's range raise `ConfigError` naming the key and
the value. Each key's range is written beside its type (`Annotated[int, Range(1)]`, with `Items`
for a list's length and `Pattern` for a free-text key's form) and checked whenever a Config is
built, so a bad value fails before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Optional

import yaml

from medseg.errors import ConfigError
from medseg.files import atomic_write_text

DEFAULTS = "default.yaml"  # inside the medseg package


@dataclass(frozen=True)
class Range:
    """The values a number key (or each number of a list key) may take, written beside its type:
    ``Annotated[int, Range(1)]``. Numbers must also be finite. `low_open`/`high_open` exclude the
    bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        """True when `value` is finite and within the bounds."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = (v if v is None or isinstance(v, int) else f"{v:g}" for v in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "a finite number"


@dataclass(frozen=True)
class Items:
    """A list key's length, and whether it is a range ``[low, high]`` (first item <= second)."""

    count: int
    ordered: bool = False


@dataclass(frozen=True)
class Pattern:
    """A free-text key's form: a regular expression the whole value must match, and what it means."""

    regex: str
    meaning: str


UNIT = Range(0.0, 1.0)  # probabilities and fractions
POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)
AT_LEAST_ONE = Range(1)
# Voxel sizes in mm: a metre-sized voxel is a broken header or a typo, not a scan.
SPACING_MM = Range(0.0, 1000.0, low_open=True)
# One path component: a run directory lives inside output_dir (no separators, not "." or "..").
RUN_NAME = Pattern(r"(?!\.{1,2}$)[^/\\\x00]+", "one folder name (no '/', '\\', '.' or '..')")
DEVICE = Pattern(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    folds: Annotated[int, Range(2)]
    fold: Annotated[int, Range(-1)]
    split_seed: int
    spacing: Annotated[Optional[list[float]], Items(3), SPACING_MM]
    normalization: str
    ct_percentiles: Annotated[list[float], Items(2, ordered=True), Range(0.0, 100.0)]
    crop_foreground: bool
    cache: str
    cache_dir: Optional[str]
    foreground_oversample: Annotated[float, UNIT]
    sampler: str


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    depth: Annotated[Optional[int], Range(1, 10)]
    base_width: Annotated[int, Range(1, 4096)]
    max_width: Annotated[int, Range(1, 4096)]
    norm: str
    deep_supervision: bool
    checkpointing: str


@dataclass(frozen=True)
class TrainConfig:
    epochs: Annotated[int, AT_LEAST_ONE]
    iterations_per_epoch: Annotated[int, AT_LEAST_ONE]
    batch_size: Annotated[int, AT_LEAST_ONE]
    patch_size: Annotated[list[int], Items(3), Range(8, 4096)]
    optimizer: str
    lr: Annotated[float, POSITIVE]
    momentum: Annotated[float, Range(0.0, 1.0, high_open=True)]
    weight_decay: Annotated[float, NON_NEGATIVE]
    lr_schedule: str
    poly_exponent: Annotated[float, POSITIVE]
    grad_clip: Annotated[float, NON_NEGATIVE]
    amp: str
    device: Annotated[str, DEVICE]
    seed: Annotated[int, Range(0, 2**32 - 1)]
    workers: Annotated[int, Range(0, 1024)]
    batch_dice: bool
    max_nonfinite_steps: Annotated[int, AT_LEAST_ONE]
    memory_budget: Optional[str]
    max_minutes: Annotated[Optional[float], POSITIVE]
    compile: str
    channels_last: str
    logger: str


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool
    rotation_prob: Annotated[float, UNIT]
    max_rotation_deg: Annotated[float, Range(0.0, 180.0)]
    scale_prob: Annotated[float, UNIT]
    scale_range: Annotated[list[float], Items(2, ordered=True), Range(0.0, 10.0, low_open=True)]
    noise_prob: Annotated[float, UNIT]
    max_noise_std: Annotated[float, NON_NEGATIVE]
    blur_prob: Annotated[float, UNIT]
    blur_channel_prob: Annotated[float, UNIT]
    blur_sigma: Annotated[list[float], Items(2, ordered=True), NON_NEGATIVE]
    brightness_prob: Annotated[float, UNIT]
    max_brightness: Annotated[float, UNIT]
    contrast_prob: Annotated[float, UNIT]
    max_contrast: Annotated[float, UNIT]
    low_resolution_prob: Annotated[float, UNIT]
    low_resolution_channel_prob: Annotated[float, UNIT]
    low_resolution_zoom: Annotated[list[float], Items(2, ordered=True), Range(0.0, 1.0, low_open=True)]
    inverted_gamma_prob: Annotated[float, UNIT]
    gamma_prob: Annotated[float, UNIT]
    gamma_range: Annotated[list[float], Items(2, ordered=True), POSITIVE]
    flip_prob: Annotated[float, UNIT]


@dataclass(frozen=True)
class ValidateConfig:
    every: Annotated[int, NON_NEGATIVE]
    # 1.0 would make the sliding window's step zero.
    overlap: Annotated[float, Range(0.0, 1.0, high_open=True)]
    sw_batch_size: Annotated[int, AT_LEAST_ONE]
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
    run_name: Annotated[Optional[str], RUN_NAME]

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
    "train.logger": ("none", "tensorboard", "mlflow"),
}


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         base: dict[str, Any] | None = None) -> Config:
    """Defaults (updated with `base`, a saved run's config), then the experiment file at `path`,
    then `section.key=value` overrides."""
    merged = default_values()
    if base is not None:
        _merge(merged, base, source="config")
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
    """The packaged defaults as a nested dict (a fresh copy: the caller may change it)."""
    return copy.deepcopy(_parsed_defaults())


@functools.cache
def _parsed_defaults() -> dict[str, Any]:
    # Parsed once per process: every load, and every check after each override, starts from them.
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last
    silently, so a second `train:` section would hide the first)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges, and explicit keys may override what it brings
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, str):
                    continue  # config keys are names; anything else is refused later as unknown
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        # A constructor's problem (a key given twice, a tag YAML's safe loader refuses) says more
        # than "syntax error".
        what = exc.problem if isinstance(exc, yaml.constructor.ConstructorError) and exc.problem else "YAML syntax error"
        raise ConfigError(f"{path}: {what}{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return values


def _merge(base: dict[str, Any], update: dict[str, Any], source: str, prefix: str = "") -> None:
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: {_unknown(name, [f'{prefix}{k}' for k in base])}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{name}' is a section; expected a mapping")
            _merge(base[key], value, source, prefix=f"{name}.")
        else:
            base[key] = value


def _unknown(name: str, known: list[str]) -> str:
    """"unknown config key 'train.lrr' — did you mean 'train.lr'?": the closest of the keys known
    beside it (compared by their last part, so that a shared section name does not count)."""
    prefix, _, last = name.rpartition(".")
    siblings = {key.rpartition(".")[2]: key for key in known}
    close = difflib.get_close_matches(last, list(siblings), n=1, cutoff=0.6)
    hint = f" — did you mean '{siblings[close[0]]}'?" if close else ""
    return f"unknown config key '{name}'{hint}"


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ConfigError(_unknown(f"{prefix}{key}", [f"{prefix}{k}" for k in known]))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            raise ConfigError(f"config key '{prefix}{f.name}' is missing")
        name = f"{prefix}{f.name}"
        hint, rules = _split_rules(hints[f.name])
        if dataclasses.is_dataclass(hint):
            section = values[f.name]
            if not isinstance(section, dict):
                raise ConfigError(f"'{name}' is a section; expected a mapping")
            kwargs[f.name] = _build(hint, section, prefix=f"{name}.")
        else:
            kwargs[f.name] = _check_rules(name, _coerce(name, values[f.name], hint), rules)
    built = cls(**kwargs)
    if cls is Config:
        _check_relations(built)
    return built


def _split_rules(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """`Annotated[T, rule, ...]` -> (T, rules); a plain hint has none."""
    if typing.get_origin(hint) is Annotated:
        return hint.__origin__, tuple(hint.__metadata__)
    return hint, ()


def _check_rules(name: str, value: Any, rules: tuple[Any, ...]) -> Any:
    """`value` (already of the key's type) against the key's Range, Items and Pattern rules."""
    if value is None:
        return value
    for rule in rules:
        if isinstance(rule, Items):
            if len(value) != rule.count:
                raise ConfigError(f"'{name}' must have {rule.count} items, got {value!r}")
            if rule.ordered and value[0] > value[1]:
                raise ConfigError(f"'{name}' is a range [low, high]; got low > high in {value!r}")
        elif isinstance(rule, Range):
            items = value if isinstance(value, list) else [value]
            for index, item in enumerate(items):
                if not rule.allows(item):
                    where = f"{name}[{index}]" if isinstance(value, list) else name
                    finite = "" if math.isfinite(item) else "a finite number "
                    raise ConfigError(f"'{where}' must be {finite}{rule}, got {item!r}")
        elif isinstance(rule, Pattern):
            if re.fullmatch(rule.regex, value) is None:
                raise ConfigError(f"'{name}' must be {rule.meaning}, got {value!r}")
    return value


def _check_relations(cfg: Config) -> None:
    # Rules between keys; each key's own range is beside its type above.
    if cfg.data.fold >= cfg.data.folds:
        raise ConfigError(f"'data.fold' must be -1 or in 0..{cfg.data.folds - 1} (data.folds={cfg.data.folds}), "
                          f"got {cfg.data.fold}")
    if cfg.model.max_width < cfg.model.base_width:
        raise ConfigError(f"'model.max_width' ({cfg.model.max_width}) must be >= 'model.base_width' "
                          f"({cfg.model.base_width})")


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
