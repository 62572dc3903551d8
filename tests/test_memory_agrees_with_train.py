"""`medseg memory C --gpu-memory N` names the patch, batch and checkpointing that `medseg train C
--gpu-memory N` then runs: for the sample config, a config `medseg plan` writes for a folder of
image/label pairs without dataset.json, and (where the data is there) a plan of the hippocampus.

The budget leaves, after the overhead margin, each config's own step estimate at its configured
patch and batch without checkpointing: that configuration does not fit once the rest of the run
(the batch rendered ahead, volumes, validation) is counted, so the fit has to search.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medseg import config, memory
from medseg.cli import app
from tests.conftest import ROOT

HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus"
# A small network, so that each estimate and the one training step are quick.
SMALL = ["--set", "model.base_width=8", "--set", "model.max_width=32"]


@pytest.fixture(autouse=True)
def _estimates_once(estimates_once):
    """`medseg memory` and `medseg train` fit the same configuration, so they estimate the same
    candidates: each estimate is computed once, by whichever command asks first (conftest's
    `estimates_once`: a pure function of the config and the data's channels, classes and spacing,
    all in the key). A difference in what the two commands hand the estimator is a different key,
    estimated afresh."""


def _budget(config_path: Path, overrides: list[str]) -> str:
    """The budget whose overhead margin leaves exactly the step estimate of the configuration as
    given (checkpointing off), in bytes, as a size."""
    from medseg.data.fingerprint import plan_preprocessing, training_cases

    cfg = config.load(config_path, [item for item in overrides if item != "--set"])
    cfg = cfg.replace(model={"checkpointing": "off"})
    cases = training_cases(cfg, workers=1)
    prep = plan_preprocessing(cfg, cases)
    step = memory.estimate(cfg, prep.channels, prep.num_classes, prep.spacing).total
    # The step and the overhead alone fill it: with the rest of the run the configuration is too large.
    return f"{int((step + memory.OVERHEAD.constant) / (1 - memory.OVERHEAD.fraction))}B"


def _agree(config_path: Path, overrides: list[str], tmp_path: Path) -> None:
    runner = CliRunner()
    budget = _budget(config_path, overrides)
    # One short run on the CPU; both commands are given the same config and overrides, as a user
    # would. Validation's windows do not overlap: a fraction of the sliding-window work, and the
    # same memory (validation's buffers and activations do not depend on the overlap).
    overrides = [
        *overrides, "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=1", "--set", "train.workers=0",
        "--set", "train.device=cpu", "--set", "train.compile=off", "--set", "validate.sw_batch_size=1",
        "--set", "validate.overlap=0", "--set", f"output_dir={tmp_path / 'runs'}", "--set", "run_name=run",
    ]
    said = runner.invoke(app, ["memory", str(config_path), *overrides, "--gpu-memory", budget, "--json"])
    assert said.exit_code == 0, said.output
    chosen = json.loads(said.output)["fit"]
    assert "error" not in chosen, chosen
    ran = runner.invoke(app, ["train", str(config_path), *overrides, "--gpu-memory", budget])
    assert ran.exit_code == 0, ran.output
    recorded = yaml.safe_load((tmp_path / "runs" / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert (recorded["train"]["patch_size"], recorded["train"]["batch_size"], recorded["model"]["checkpointing"]) == (
        chosen["patch_size"], chosen["batch_size"], chosen["checkpointing"])
    assert f"patch {chosen['patch_size']}, batch {chosen['batch_size']}" in " ".join(ran.output.split())


def test_sample_config(tmp_path):
    _agree(ROOT / "configs" / "sample.yaml", ["--set", f"data.dataset={ROOT / 'sample_data'}"], tmp_path)


def _pairs(folder: Path, cases: int = 6) -> Path:
    # Image/label pairs side by side, no dataset.json: the classes come from the label files.
    rng = np.random.default_rng(0)
    folder.mkdir()
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    for case in range(cases):
        label = np.zeros((24, 20, 16), np.uint8)
        label[6:16, 5:14, 3:10] = 1
        label[8:12, 7:11, 5:8] = 2
        image = rng.normal(100.0, 20.0, label.shape).astype(np.float32) + 40.0 * label
        nib.save(nib.Nifti1Image(image, affine), folder / f"case{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"case{case}_label.nii.gz")
    return folder


def _planned(dataset: Path, out: Path) -> Path:
    result = CliRunner().invoke(app, ["plan", str(dataset), "-o", str(out), "--gpu-memory", "8GiB"])
    assert result.exit_code == 0, result.output
    return out


def test_plan_of_a_folder_without_dataset_json(tmp_path):
    planned = _planned(_pairs(tmp_path / "pairs"), tmp_path / "planned.yaml")
    _agree(planned, SMALL, tmp_path)


def _subset(dataset: Path, folder: Path, cases: int) -> Path:
    """The first `cases` cases of an MSD dataset: links to its files, its dataset.json shortened."""
    description = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    description["training"] = description["training"][:cases]
    description["numTraining"] = cases
    for entry in description["training"]:
        for key in ("image", "label"):
            (folder / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            (folder / entry[key]).symlink_to(dataset / entry[key])
    (folder / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return folder


@pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(), reason="the hippocampus data is not here")
def test_plan_of_the_hippocampus(tmp_path):
    planned = _planned(HIPPOCAMPUS, tmp_path / "hippocampus.yaml")
    # The plan of all 195 cases; memory and train then read a fifth of them (both the same ones):
    # all train (no validation fold), one step, no sliding-window validation.
    subset = _subset(HIPPOCAMPUS, tmp_path / "hippocampus-39", 39)
    _agree(planned, [*SMALL, "--set", f"data.dataset={subset}", "--set", "data.fold=-1", "--set", "data.cache=none"],
           tmp_path)
