"""`medseg export`: the model archive runs elsewhere and loads without executing anything; the
TorchScript and ONNX networks compute PyTorch's labels through medseg's own sliding window."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg import checkpoint, postprocessing
from medseg.cli import app
from medseg.inputs import find_inputs
from medseg.export import OnnxNetwork, load_model_archive
from medseg.infer import Predictor
from tests.trained_run import SAMPLE, trained_run

runner = CliRunner()
CASES = ["sample_001", "sample_006"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> dict[str, Path]:
    """The run exported in each format through the CLI; its console output kept per format."""
    folder = tmp_path_factory.mktemp("exported")
    paths = {"zip": folder / "model.zip", "torchscript": folder / "model.torchscript.pt", "onnx": folder / "model.onnx"}
    for fmt, path in paths.items():
        result = runner.invoke(app, ["export", str(run), "--format", fmt, "-o", str(path)])
        assert result.exit_code == 0, result.output
        assert f"exporting {run / 'best.pt'}" in result.output  # a run folder means its best.pt, said
        if fmt != "zip":
            difference = float(result.output.split("PyTorch's on the CPU: ")[1].split(")")[0])
            assert difference < 1e-3
    return paths


def test_model_archive_holds_what_another_machine_needs(run, exported):
    with zipfile.ZipFile(exported["zip"]) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
        config = json.loads(archive.read("config.json"))
        classes = json.loads(archive.read("classes.json"))
        preprocessing = json.loads(archive.read("preprocessing.json"))
    assert names == {"manifest.json", "config.json", "preprocessing.json", "classes.json",
                     "folds/fold0.json", "folds/fold0.bin"}
    assert manifest["format"] == "medseg-model" and manifest["format_version"] == 1
    assert manifest["medseg_version"] == __import__("medseg").__version__
    assert manifest["model"]["arch"] == "unet" and manifest["model"]["base_width"] == 4
    assert manifest["model"]["patch_size"] == [16, 16, 16]
    state = checkpoint.load(run / "best.pt")
    assert [f["fold"] for f in manifest["folds"]] == [0]
    assert manifest["folds"][0]["validation_cases"] == state["split"]["validation"]
    assert classes == ["background", "core", "shell"]
    assert preprocessing == _plain(state["preprocessing"])
    assert config["data"]["dataset"] == "sample_data"  # no path of the exporting machine
    weights = load_model_archive(exported["zip"]).checkpoints[0]["model"]
    assert weights.keys() == state["model"].keys()
    for name, tensor in state["model"].items():
        assert torch.equal(weights[name], tensor.float() if tensor.is_floating_point() else tensor), name


def test_network_files_have_their_preprocessing_beside_them(exported, run):
    for fmt in ("torchscript", "onnx"):
        path = exported[fmt]
        sidecar = json.loads(path.with_name(path.name.rsplit(".", 1)[0] + ".preprocessing.json").read_text(encoding="utf-8"))
        assert sidecar["format"] == fmt and sidecar["network"] == path.name
        assert sidecar["preprocessing"] == _plain(checkpoint.load(run / "best.pt")["preprocessing"])
        assert sidecar["patch_size"] == [16, 16, 16]


def test_exported_networks_give_pytorch_labels(run, exported):
    """Each exported network replaces the PyTorch one in the same sliding-window code (fp32 both).
    Labels may differ only where two classes' logits tie within float rounding; on these cases
    none do, and at most 0.1 % of voxels may."""
    reference = dataclasses.replace(Predictor.from_checkpoint(run / "best.pt", "cpu"), amp_dtype=None)
    networks = {"torchscript": torch.jit.load(str(exported["torchscript"])), "onnx": OnnxNetwork(exported["onnx"])}
    for case in find_inputs([SAMPLE / "imagesTr" / f"{CASES[0]}.nii.gz"], 1).inputs:
        image, _ = reference.prepare(case)
        expected = reference.scores(image).argmax(0)
        for fmt, network in networks.items():
            got = dataclasses.replace(reference, model=network).scores(image).argmax(0)
            assert got.shape == expected.shape
            assert (got == expected).float().mean() >= 0.999, (fmt, case.name)


def test_infer_runs_the_archive_elsewhere(run, exported, tmp_path, monkeypatch):
    """The archive alone, copied into another folder, segments as the checkpoint does."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(exported["zip"], elsewhere / "model.zip")
    images = [str(SAMPLE / "imagesTr" / f"{name}.nii.gz") for name in CASES]
    by_checkpoint = runner.invoke(app, ["infer", str(run / "best.pt"), *images, "-o", str(tmp_path / "a"), "--device", "cpu"])
    assert by_checkpoint.exit_code == 0, by_checkpoint.output
    monkeypatch.chdir(elsewhere)
    by_archive = runner.invoke(app, ["infer", "model.zip", *images, "-o", "out", "--device", "cpu"])
    assert by_archive.exit_code == 0, by_archive.output
    for name in CASES:
        a = nib.load(tmp_path / "a" / f"{name}.nii.gz")
        b = nib.load(elsewhere / "out" / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
        np.testing.assert_array_equal(b.affine, a.affine)


def test_cross_validation_folder_exports_every_fold(run, tmp_path):
    parent = tmp_path / "sample-cv"
    for fold in (0, 1):
        state = checkpoint.load(run / "best.pt")
        state["config"]["data"]["fold"] = fold
        (parent / f"fold{fold}").mkdir(parents=True)
        checkpoint.save(state, parent / f"fold{fold}" / "best.pt")
    decision = {"rule": postprocessing.RULE, "cases": 12, "largest_component": [1]}
    postprocessing.write(parent, decision)
    result = runner.invoke(app, ["export", str(parent)])
    assert result.exit_code == 0, result.output
    archive = load_model_archive(parent / "model.zip")
    assert [c["fold"] for c in archive.checkpoints] == [0, 1]
    assert archive.postprocessing == decision
    result = runner.invoke(app, ["export", str(parent), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert (parent / "model_fold0.torchscript.pt").is_file() and (parent / "model_fold1.torchscript.pt").is_file()


def _plain(value):
    """As JSON holds it (tuples as lists)."""
    return json.loads(json.dumps(value))


def _rewrite(source: Path, target: Path, drop: str | None = None, add: dict[str, bytes] | None = None,
             replace: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for name in original.namelist():
            if name != drop:
                copy.writestr(name, (replace or {}).get(name, original.read(name)), compress_type=zipfile.ZIP_DEFLATED)
        for name, data in (add or {}).items():
            copy.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    return target


@pytest.mark.parametrize("hostile, reason", [
    ("traversal", "unexpected member '../../evil.json'"),
    ("oversized", "member config.json claims"),
    ("no-manifest", "no manifest.json inside"),
    ("short-weights", "folds/fold0.bin holds"),
    ("not-a-zip", "not a readable model archive"),
])
def test_hostile_archive_is_refused_in_one_line(exported, tmp_path, hostile, reason):
    target = tmp_path / "hostile.zip"
    source = exported["zip"]
    if hostile == "traversal":
        _rewrite(source, target, add={"../../evil.json": b"{}"})
    elif hostile == "oversized":  # 20 MiB of JSON whitespace that deflates to a few kB
        _rewrite(source, target, replace={"config.json": b"{}" + b" " * (20 << 20)})
    elif hostile == "no-manifest":
        _rewrite(source, target, drop="manifest.json")
    elif hostile == "short-weights":
        with zipfile.ZipFile(source) as archive:
            weights = archive.read("folds/fold0.bin")
        _rewrite(source, target, replace={"folds/fold0.bin": weights[:-4]})
    else:
        target.write_bytes(b"PK\x03\x04 not really a zip")
    image = str(SAMPLE / "imagesTr" / "sample_001.nii.gz")
    result = runner.invoke(app, ["infer", str(target), image, "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and reason in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.json").exists()
