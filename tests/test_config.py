"""medseg.config: defaults, documentation of default.yaml, experiment files, --set overrides, errors."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from medseg import config
from medseg.config import Config, ConfigError
from medseg.errors import ConfigError as BaseConfigError

# A leaf line of default.yaml: `  key: value   # (type) meaning`.
_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")
_DOC_COMMENT = re.compile(r"#\s*\((?P<type>[^)]+)\)\s+\S")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dataclass_hints(cls: type, prefix: str = "") -> dict[str, object]:
    """Leaf key -> type hint for every field of the Config dataclass tree."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(_dataclass_hints(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hint
    return out


def _type_text(hint: object) -> str:
    """How default.yaml spells a type: int, list[float], str | null, ..."""
    args = typing.get_args(hint)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_type_text(inner)} | null"
    if typing.get_origin(hint) is list:
        return f"list[{_type_text(args[0])}]"
    return hint.__name__  # type: ignore[union-attr]


def _documented_leaves() -> dict[str, str]:
    """Parse default.yaml as text: dotted leaf key -> the text of its comment."""
    leaves: dict[str, str] = {}
    section = None
    for number, line in enumerate(config.defaults_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _KEY_LINE.match(line)
        assert match, f"default.yaml line {number} is not a 'key: value' line: {line!r}"
        value, _, comment = match["rest"].partition("#")
        if not match["indent"] and not value.strip():
            section = match["key"]  # a section header such as `data:`
            continue
        key = f"{section}.{match['key']}" if match["indent"] else match["key"]
        if not match["indent"]:
            section = None
        leaves[key] = "#" + comment if _ else ""
    return leaves


# --- defaults ---------------------------------------------------------------------------------


def test_a_partial_dict_takes_the_packaged_defaults_for_what_it_lacks():
    # A run saved before a key existed still loads: the missing key takes its default.
    cfg = config.from_dict({"train": {"epochs": 3}})
    assert cfg.train.epochs == 3
    assert cfg.replace(train={"epochs": config.defaults().train.epochs}) == config.load()


def test_the_defaults_come_from_the_package_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.load().train.lr == yaml.safe_load(config.defaults_text())["train"]["lr"]


def test_default_yaml_has_exactly_the_dataclass_keys():
    # The dataclasses hold no defaults: every key must be in the YAML, and no other.
    from_yaml = set(_flatten(yaml.safe_load(config.defaults_text())))
    assert from_yaml == set(_dataclass_hints(Config))


def test_every_default_key_is_documented_with_its_type():
    leaves = _documented_leaves()
    # The text parser must have seen every key YAML sees, or the check below proves nothing.
    assert set(leaves) == set(_flatten(yaml.safe_load(config.defaults_text())))
    hints = _dataclass_hints(Config)
    undocumented = [key for key, comment in leaves.items() if not _DOC_COMMENT.search(comment)]
    assert not undocumented, f"keys without a '# (type) meaning' comment: {undocumented}"
    wrong_type = {
        key: (_DOC_COMMENT.search(comment)["type"], _type_text(hints[key]))
        for key, comment in leaves.items()
        if _DOC_COMMENT.search(comment)["type"].strip() != _type_text(hints[key])
    }
    assert not wrong_type, f"documented type differs from the dataclass (doc, code): {wrong_type}"


# --- experiment files and --set -----------------------------------------------------------------


def _ranged_keys(cls: type = Config, prefix: str = "") -> dict[str, tuple]:
    """Leaf key -> its Annotated rules (Range, Items, Pattern), for the keys that have any."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, tuple] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(_ranged_keys(hint, f"{prefix}{f.name}."))
        elif typing.get_origin(hint) is typing.Annotated:
            out[f"{prefix}{f.name}"] = hint.__metadata__
    return out


def test_every_range_is_documented_beside_its_key_in_default_yaml():
    leaves = _documented_leaves()
    ranged = _ranged_keys()
    assert {"train.lr", "train.epochs", "validate.overlap", "data.spacing"} <= set(ranged)
    for key, rules in ranged.items():
        for rule in rules:
            if isinstance(rule, config.Range):
                assert f"[{rule}]" in leaves[key], (key, str(rule), leaves[key])


@pytest.mark.parametrize(("item", "hint"), [
    ("train.lrr=0.1", "train.lr"), ("train.batchsize=2", "train.batch_size"),
    ("augment.flip_prop=0.1", "augment.flip_prob"), ("tarin.lr=0.1", "train"),
])
def test_mistyped_key_suggests_the_closest_known_key(item, hint):
    assert f"did you mean '{hint}'?" in _error(overrides=[item])


def test_unrelated_unknown_key_gets_no_suggestion():
    message = _error(overrides=["train.zzzzzz=1"])
    assert "unknown config key 'train.zzzzzz'" in message and "did you mean" not in message


@pytest.mark.parametrize(("overrides", "key"), [
    (["train.lr=.inf"], "train.lr"), (["train.momentum=1.0"], "train.momentum"),
    (["validate.overlap=-0.1"], "validate.overlap"), (["augment.gamma_range=[0, 1.5]"], "augment.gamma_range[0]"),
    (["data.folds=1"], "data.folds"), (["model.base_width=64", "model.max_width=32"], "model.max_width"),
    (["train.max_minutes=-1"], "train.max_minutes"), (["train.seed=-1"], "train.seed"),
])
def test_values_outside_their_range_name_the_key_and_value(overrides, key):
    assert f"'{key}'" in _error(overrides=overrides)


def test_a_saved_config_is_range_checked_too():
    with pytest.raises(ConfigError, match="'train.epochs' must be >= 1, got 0"):
        config.from_dict({"train": {"epochs": 0}})


def test_experiment_file_overrides_only_its_keys(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  batch_size: 7\n  amp: off\nmodel:\n  base_width: 8\n", encoding="utf-8")
    cfg = config.load(path)
    assert cfg.train.batch_size == 7
    assert cfg.train.amp == "off"  # YAML 1.1 reads bare `off` as false; it means the string
    assert cfg.model.base_width == 8
    assert cfg.train.epochs == config.defaults().train.epochs
    assert cfg.replace(train={"batch_size": 2, "amp": "auto"}, model={"base_width": 32}) == config.defaults()


def test_set_overrides_after_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  batch_size: 7\n", encoding="utf-8")
    cfg = config.load(path, ["train.batch_size=4"])
    assert cfg.train.batch_size == 4


@pytest.mark.parametrize(
    ("item", "section", "key", "expected"),
    [
        ("train.batch_size=4", "train", "batch_size", 4),
        ("train.patch_size=[64,64,32]", "train", "patch_size", [64, 64, 32]),
        ("data.spacing=[1, 1, 2.5]", "data", "spacing", [1.0, 1.0, 2.5]),
        ("model.depth=null", "model", "depth", None),
        ("data.spacing=null", "data", "spacing", None),
        ("model.checkpointing=off", "model", "checkpointing", "off"),
        ("model.checkpointing=stage", "model", "checkpointing", "stage"),
        ("train.lr=0.5", "train", "lr", 0.5),
        ("augment.enabled=false", "augment", "enabled", False),
    ],
)
def test_set_override_values(item, section, key, expected):
    cfg = config.load(overrides=[item])
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, list):
        assert all(type(v) is type(e) for v, e in zip(value, expected))


def test_set_top_level_key_and_optional_null():
    cfg = config.load(overrides=["run_name=first", "output_dir=/tmp/x"])
    assert (cfg.run_name, cfg.output_dir) == ("first", "/tmp/x")
    assert config.load(overrides=["run_name=first", "run_name=null"]).run_name is None


def test_set_int_for_float_key_becomes_float():
    cfg = config.load(overrides=["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_set_float_in_exponent_notation():
    assert config.load(overrides=["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_set_yaml_boolean_word_for_free_string_key_is_not_turned_into_off():
    try:
        value = config.load(overrides=["run_name=no"]).run_name
    except ConfigError as exc:  # refusing it is acceptable too
        assert "'run_name'" in str(exc)
    else:
        assert value == "no"


# --- errors -------------------------------------------------------------------------------------


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, list(overrides))
    return str(info.value)


def test_config_error_is_the_medseg_error_class():
    assert ConfigError is BaseConfigError


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  batch_sise: 4\n", encoding="utf-8")
    message = _error(path)
    assert "train.batch_sise" in message
    assert str(path) in message


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("trian:\n  batch_size: 4\n", encoding="utf-8")
    assert "trian" in _error(path)


@pytest.mark.parametrize(
    ("item", "key"),
    [("train.batch_sise=4", "train.batch_sise"), ("nosuch.key=1", "nosuch"), ("bogus=1", "bogus")],
)
def test_unknown_key_in_set(item, key):
    message = _error(overrides=[item])
    assert f"'{key}'" in message
    assert "unknown" in message


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("train.batch_size=abc", "train.batch_size"),  # string for int
        ("train.batch_size=true", "train.batch_size"),  # bool for int
        ("train.batch_size=2.5", "train.batch_size"),  # float for int
        ("augment.enabled=1", "augment.enabled"),  # int for bool
        ("train.lr=fast", "train.lr"),  # string for float
        ("train.patch_size=64", "train.patch_size"),  # scalar for list
        ("train.patch_size=[64, x, 32]", "train.patch_size[1]"),  # wrong list item
        ("train.batch_size=null", "train.batch_size"),  # null for a non-optional key
        ("train=4", "train"),  # scalar for a section
    ],
)
def test_wrong_type_names_the_key(item, key):
    message = _error(overrides=[item])
    assert f"'{key}'" in message


def test_wrong_type_in_file_names_the_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  patch_size: 96\n", encoding="utf-8")
    assert "'train.patch_size'" in _error(path)


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("model.checkpointing=full", "model.checkpointing"),
        ("model.norm=layer", "model.norm"),
        ("train.amp=fp8", "train.amp"),
        ("data.cache=off", "data.cache"),  # `off` is not one of memory|disk|none
    ],
)
def test_value_outside_choices(item, key):
    message = _error(overrides=[item])
    assert f"'{key}'" in message
    assert item.partition("=")[2] in message


def test_set_without_equals_sign():
    assert "train.batch_size" in _error(overrides=["train.batch_size"])


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  batch_size: [1, 2\n  lr: 0.1\n", encoding="utf-8")
    message = _error(path)
    assert str(path) in message
    assert "syntax" in message.lower()


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = _error(path)
    assert str(path) in message


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    assert str(path) in _error(path)


def test_empty_experiment_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing overridden\n", encoding="utf-8")
    assert config.load(path) == config.defaults()


# --- dump / load --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [
            "model.checkpointing=stage",
            "train.amp=off",
            "data.spacing=[0.8, 0.8, 3.0]",
            "model.depth=4",
            "data.cache_dir=/tmp/cache dir",
            "train.patch_size=[64,64,32]",
        ],
    ],
)
def test_dump_then_load_round_trip(tmp_path, overrides):
    cfg = config.load(overrides=overrides)
    if overrides:
        # Strings YAML 1.1 would read as bool/null/number unless dump() quotes them.
        cfg = cfg.replace(run_name="no", data={"dataset": "null"}, output_dir="1e3")
    path = tmp_path / "resolved.yaml"
    config.dump(cfg, path)
    again = config.load(path)
    assert again == cfg
    if overrides:
        assert again != config.defaults()
        assert again.model.checkpointing == "stage"
        assert (again.run_name, again.data.dataset, again.output_dir) == ("no", "null", "1e3")
