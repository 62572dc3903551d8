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
