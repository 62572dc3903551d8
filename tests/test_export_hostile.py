"""`medseg export` never overwrites a file (least of all the checkpoint it reads), and a model
archive whose JSON members hold bad values is refused when it loads, in one line naming the
archive, the member and the key."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.cli import app
from tests.trained_run import SAMPLE, trained_run

runner = CliRunner()
IMAGE = str(SAMPLE / "imagesTr" / "sample_001.nii.gz")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def archive(run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("archive") / "model.zip"
    result = runner.invoke(app, ["export", str(run), "--format", "zip", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _one_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("fmt", ["zip", "torchscript", "onnx"])
def test_export_onto_the_runs_own_checkpoint_is_refused(run, tmp_path, fmt):
    copy = shutil.copytree(run, tmp_path / "run")  # the shared run stays intact even if this failed
    best = copy / "best.pt"
    before = best.read_bytes()
    result = runner.invoke(app, ["export", str(copy), "--format", fmt, "-o", str(best)])
    _one_line(result, str(best), "checkpoint being exported")
    assert best.read_bytes() == before
    assert not (copy / "best.preprocessing.json").exists()


@pytest.mark.parametrize("fmt", ["zip", "torchscript", "onnx"])
def test_export_onto_an_existing_file_is_refused(run, tmp_path, fmt):
    existing = tmp_path / "dataset.json"
    existing.write_text('{"keep": true}\n', encoding="utf-8")
    result = runner.invoke(app, ["export", str(run), "--format", fmt, "-o", str(existing)])
    _one_line(result, str(existing), "exists")
    assert existing.read_text(encoding="utf-8") == '{"keep": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"]


@pytest.mark.parametrize("fmt, network", [("torchscript", "net.torchscript.pt"), ("onnx", "net.onnx")])
def test_existing_sidecar_refuses_the_export_before_the_network_is_written(run, tmp_path, fmt, network):
    sidecar = tmp_path / ("net.torchscript.preprocessing.json" if fmt == "torchscript" else "net.preprocessing.json")
    sidecar.write_text("{}\n", encoding="utf-8")
    result = runner.invoke(app, ["export", str(run), "--format", fmt, "-o", str(tmp_path / network)])
    _one_line(result, str(sidecar), "exists")
    assert sidecar.read_text(encoding="utf-8") == "{}\n"
    assert not (tmp_path / network).exists()


def test_second_export_to_the_default_path_keeps_the_first(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    assert runner.invoke(app, ["export", str(copy)]).exit_code == 0
    first = (copy / "model.zip").read_bytes()
    _one_line(runner.invoke(app, ["export", str(copy)]), str(copy / "model.zip"), "exists")
    assert (copy / "model.zip").read_bytes() == first


def _variant(archive: Path, target: Path, member: str, change) -> Path:
    with zipfile.ZipFile(archive) as source:
        files = {name: source.read(name) for name in source.namelist()}
    files[member] = json.dumps(change(json.loads(files[member]))).encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        for name, data in files.items():
            copy.writestr(name, data)
    return target


def _without_statistics(prep: dict) -> dict:
    return {k: v for k, v in prep.items() if k not in ("clip_low", "clip_high", "mean", "std")} | {"normalization": "ct"}


HOSTILE = {
    "spacing-zero": ("preprocessing.json", "'spacing'", lambda p: p | {"spacing": [0, 0, 0]}),
    "spacing-two": ("preprocessing.json", "'spacing'", lambda p: p | {"spacing": [1, 1]}),
    "spacing-nan": ("preprocessing.json", "'spacing'", lambda p: p | {"spacing": [1, float("nan"), 1]}),
    "labels-list": ("preprocessing.json", "'labels'", lambda p: p | {"labels": ["core", "shell"]}),
    "labels-key": ("preprocessing.json", "'labels'", lambda p: p | {"labels": {"one": "core"}}),
    "normalization-bogus": ("preprocessing.json", "'normalization'", lambda p: p | {"normalization": "bogus"}),
    "ct-without-statistics": ("preprocessing.json", "'clip_low'", _without_statistics),
    "channels-text": ("preprocessing.json", "'channels'", lambda p: p | {"channels": "1"}),
    "classes-huge": ("preprocessing.json", "'num_classes'", lambda p: p | {"num_classes": 10 ** 9}),
    "unknown-key": ("preprocessing.json", "unknown key 'extra'", lambda p: p | {"extra": 1}),
    "config-list": ("config.json", "mapping of config sections", lambda c: []),
    "config-key": ("config.json", "unknown config key", lambda c: c | {"bogus": {}}),
    "classes-short": ("classes.json", "class names", lambda names: names[:1]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_values_are_refused_in_one_line(archive, tmp_path, case):
    member, reason, change = HOSTILE[case]
    target = _variant(archive, tmp_path / f"{case}.zip", member, change)
    result = runner.invoke(app, ["infer", str(target), IMAGE, "-o", str(tmp_path / "out"), "--device", "cpu"])
    _one_line(result, str(target), member, reason)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["spacing-zero", "normalization-bogus", "labels-list"])
def test_a_checkpoint_file_with_bad_preprocessing_values_is_refused_by_infer(run, tmp_path, case):
    from medseg import checkpoint

    _, reason, change = HOSTILE[case]
    state = checkpoint.load(run / "best.pt")
    state["preprocessing"] = change(dict(state["preprocessing"]))
    target = tmp_path / "hostile.pt"
    checkpoint.save(state, target)
    result = runner.invoke(app, ["infer", str(target), IMAGE, "-o", str(tmp_path / "out"), "--device", "cpu"])
    _one_line(result, str(target), reason)
    assert not (tmp_path / "out").exists()
