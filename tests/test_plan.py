"""`medseg plan` on a small real dataset: the fingerprint and a config `medseg train` accepts."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from medseg import config
from medseg.cli import app
from medseg.data.fingerprint import divisible_patch, growth_limits
from medseg.plan import plan, uses_batch_dice
from tests.conftest import HIPPOCAMPUS, ROOT

runner = CliRunner()


def test_patch_is_the_median_shape_rounded_to_the_network():
    # nnU-Net plans 40×56×40 for hippocampus, whose median shape is about 35×50×36.
    assert divisible_patch([35, 50, 36]) == [40, 56, 40]
    assert divisible_patch([128, 128, 128]) == [128, 128, 128]
    assert all(p % 2 == 0 for p in divisible_patch([9, 17, 300]))


def _cases(*shapes: tuple[int, int, int]) -> list[SimpleNamespace]:
    return [SimpleNamespace(shape=shape, spacing_ras=(1.0, 1.0, 1.0), affine=np.eye(4)) for shape in shapes]


def test_batch_cap_is_nnunets_median_case_times_cases():
    # nnU-Net: round(0.05 * median case voxels * cases / patch voxels), at least 2. The sum of all
    # voxels would let a few large cases raise the cap (here to 17), and int() rounded it down.
    cases = _cases(*[(35, 50, 36)] * 150, *[(70, 100, 72)] * 45)
    patch, batch = growth_limits(cases, (1.0, 1.0, 1.0))
    assert patch == [40, 56, 40]
    assert batch == round(0.05 * 35 * 50 * 36 * 195 / (40 * 56 * 40)) == 7  # 6.86: rounded, not truncated
    assert growth_limits(_cases(*[(35, 50, 36)] * 10), (1.0, 1.0, 1.0))[1] == 2  # never below 2
    # The median of the shapes at the spacing, each rounded first (nnU-Net's compute_new_shape).
    halves = [SimpleNamespace(shape=(70, 100, 72), spacing_ras=(0.5, 0.5, 0.5), affine=np.eye(4))] * 400
    assert growth_limits(halves, (1.0, 1.0, 1.0))[1] == round(0.05 * 35 * 50 * 36 * 400 / 89600)


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="needs the MSD hippocampus data")
def test_batch_cap_of_hippocampus():
    from medseg.data.cases import find_dataset
    from medseg.data.checks import check_dataset

    dataset = find_dataset(HIPPOCAMPUS)
    summaries = check_dataset(dataset.cases, dataset.labels, len(dataset.modalities) or None, workers=4)
    patch, batch = growth_limits(summaries, (1.0, 1.0, 1.0))
    assert patch == [40, 56, 40]
    assert batch == 7  # nnU-Net's rule on these 195 cases (median 35×50×36); the old sum-and-truncate gave 6


def test_plan_of_sample_data():
    result = plan(ROOT / "sample_data", 8 * 2**30, workers=1)
    assert result.cases == 12 and result.channels == 1
    assert result.labels == {0: "background", 1: "core", 2: "shell"}
    # The sample volumes have 1.5 mm slices and about 1.1 mm in-plane: not anisotropic enough for
    # the coarse-axis rule, so the target is the median spacing.
    assert result.spacing == result.median_spacing
    assert abs(result.spacing[2] - 1.5) < 1e-3
    assert abs(sum(result.class_fraction.values()) - 1) < 1e-9
    assert 0 < result.class_fraction["core"] < 0.1
    # The core is the brightest structure of the synthetic head.
    assert result.intensity[0]["median"] > 60
    patch = result.overrides["train"]["patch_size"]
    assert all(p >= s for p, s in zip(patch, result.shape_at_spacing))
    assert result.overrides["train"]["batch_size"] >= 2
    # The patch holds the whole median case: per-sample Dice, as nnU-Net for such data.
    assert result.overrides["train"]["batch_dice"] is False


def test_batch_dice_where_a_patch_holds_under_a_quarter_of_the_case():
    assert uses_batch_dice([40, 56, 40], [35, 50, 36]) is False
    assert uses_batch_dice([128, 128, 128], [512, 512, 300]) is True
    assert uses_batch_dice([128, 128, 128], [200, 200, 200]) is False  # 26 % of the case


def test_plan_command_writes_a_config_train_accepts(tmp_path):
    out = tmp_path / "planned.yaml"
    result = runner.invoke(app, ["plan", str(ROOT / "sample_data"), "-o", str(out), "--gpu-memory", "8GiB"])
    assert result.exit_code == 0, result.output
    assert "median shape" in result.output and "core" in result.output
    overrides = yaml.safe_load(out.read_text(encoding="utf-8"))
    cfg = config.load(out)
    assert cfg.train.patch_size == overrides["train"]["patch_size"]
    assert cfg.data.normalization == "zscore"
    missing = runner.invoke(app, ["plan", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output and "Traceback" not in missing.output


def test_plan_command_does_not_import_monai(tmp_path):
    # Importing MONAI takes ~20 s on the GPU machine (its __init__ imports every submodule); plan
    # reads through medseg.data.io, which needs none of it.
    rng = np.random.default_rng(0)
    dataset = tmp_path / "pairs"
    dataset.mkdir()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for case in range(3):
        label = np.zeros((16, 16, 8), np.uint8)
        label[4:12, 5:11, 2:6] = 1
        image = rng.normal(100.0, 20.0, label.shape).astype(np.float32) + 50.0 * label
        nib.save(nib.Nifti1Image(image, affine), dataset / f"case{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), dataset / f"case{case}_label.nii.gz")
    out = tmp_path / "planned.yaml"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "medseg", "plan", str(dataset), "-o", str(out)],
        capture_output=True, encoding="utf-8", errors="replace", cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file()
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "medseg.plan" in imported and "medseg.data.io" in imported  # -X importtime did report
    assert not [name for name in imported if name.split(".")[0] == "monai"]


def _pairs(folder, cases: int = 3, values=(1,)):
    """A folder of image/label pairs (no dataset.json) with a bright labelled block."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    for case in range(cases):
        label = np.zeros((16, 16, 8), np.uint8)
        for offset, value in enumerate(values):
            label[2 + 4 * offset:5 + 4 * offset, 5:11, 2:6] = value
        image = rng.normal(-500.0, 50.0, label.shape).astype(np.float32) + 900.0 * (label > 0)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"case{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / f"case{case}_label.nii.gz")
    return folder


def _warnings(output: str) -> str:
    return " ".join(line for line in output.splitlines() if line.startswith("warning:"))


def test_plan_warns_about_folds_modality_and_ignored_folders(tmp_path):
    dataset = _pairs(tmp_path / "pairs")
    (dataset / "masks").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.uint8), np.eye(4)), dataset / "masks" / "case0.nii.gz")
    out = tmp_path / "planned.yaml"
    result = runner.invoke(app, ["plan", str(dataset), "-o", str(out)])
    assert result.exit_code == 0, result.output
    warned = _warnings(result.output)
    assert "3 cases are fewer than data.folds=5" in warned and "data.fold=-1" in warned
    assert "modality is unknown" in warned and "--modality CT" in warned
    assert "ignored (no case uses them): masks/" in warned
    assert config.load(out).data.normalization == "zscore"
    assert "# warning: 3 cases are fewer" in out.read_text(encoding="utf-8")


def test_plan_modality_ct_chooses_ct_normalisation(tmp_path):
    dataset = _pairs(tmp_path / "pairs", cases=5)
    out = tmp_path / "planned.yaml"
    result = runner.invoke(app, ["plan", str(dataset), "-o", str(out), "--modality", "CT"])
    assert result.exit_code == 0, result.output
    assert _warnings(result.output) == ""  # enough cases for 5 folds, a known modality, nothing ignored
    assert config.load(out).data.normalization == "ct"
    assert "CT" in result.output


def test_plan_warns_about_declared_classes_no_label_holds(tmp_path):
    import json

    dataset = tmp_path / "msd"
    pairs = _pairs(tmp_path / "pairs", cases=5)
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for case in range(5):
        (dataset / "imagesTr" / f"case{case}.nii.gz").write_bytes((pairs / f"case{case}.nii.gz").read_bytes())
        (dataset / "labelsTr" / f"case{case}.nii.gz").write_bytes((pairs / f"case{case}_label.nii.gz").read_bytes())
    (dataset / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MR"}, "labels": {"0": "background", "1": "liver", "2": "tumour", "3": "vessel"},
        "training": [{"image": f"./imagesTr/case{c}.nii.gz", "label": f"./labelsTr/case{c}.nii.gz"} for c in range(5)],
    }), encoding="utf-8")
    result = runner.invoke(app, ["plan", str(dataset)])
    assert result.exit_code == 0, result.output
    warned = _warnings(result.output)
    assert "2 of the 3 classes dataset.json declares occur in no label file (tumour, vessel)" in warned
    assert "modality" not in warned


def test_plan_of_a_relative_dataset_path_ignores_no_folder_it_reads(tmp_path, monkeypatch):
    # The case paths are absolute; a dataset named relative to the working folder must still count
    # imagesTr/ and labelsTr/ as used.
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["plan", "sample_data", "-o", str(tmp_path / "planned.yaml")])
    assert result.exit_code == 0, result.output
    assert "ignored" not in _warnings(result.output), result.output
