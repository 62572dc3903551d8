"""One grid comparison: the dataset checks (image against label) and `medseg evaluate` (prediction
against reference) accept and refuse the same pairs, with the same message."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.cases import Case
from medseg.data.checks import check_case
from medseg.data.grid import MATRIX_TOLERANCE, ORIGIN_TOLERANCE_MM, grid_difference
from medseg.errors import DataError
from medseg.evaluate import evaluate


def _affine(spacing: float, origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def test_matrix_tolerance_is_relative_and_origin_tolerance_absolute():
    coarse, fine = _affine(5.0), _affine(0.5)
    # Off by 0.6 of the tolerance share at 5 mm voxels: the same grid; at 0.5 mm, ten times as much.
    nudge = np.diag([0.6 * MATRIX_TOLERANCE * 5.0, 0.0, 0.0, 0.0])
    assert grid_difference(coarse + nudge, coarse, "its image") is None
    assert "voxel spacing" in grid_difference(fine + nudge, fine, "its image")
    assert grid_difference(_affine(1.0, (0.0, 0.0, 0.5 * ORIGIN_TOLERANCE_MM)), _affine(1.0), "x") is None
    message = grid_difference(_affine(1.0, (0.0, 0.0, 2.5)), _affine(1.0), "the reference")
    assert message == "origin differs from the reference by 2.5 mm ((0, 0, 2.5) vs (0, 0, 0))"
    rotated = _affine(1.0)[[1, 0, 2, 3]]
    assert "orientation" in grid_difference(rotated, _affine(1.0), "its image") and "90°" in \
        grid_difference(rotated, _affine(1.0), "its image")
    assert "non-finite" in grid_difference(np.full((4, 4), np.nan), _affine(1.0), "x")


@pytest.mark.parametrize(("spacing", "shift", "refused"), [(5.0, 3e-4, False), (1.0, 3e-4, True)])
def test_checks_and_evaluate_agree(tmp_path: Path, spacing: float, shift: float, refused: bool):
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    other = _affine(spacing)
    other[0, 0] += shift  # 3e-4 mm: within 1e-4 of 5 mm, beyond 1e-4 of 1 mm
    paths = {}
    for name, affine in (("image", _affine(spacing)), ("label", other)):
        paths[name] = tmp_path / name / "case.nii.gz"
        paths[name].parent.mkdir()
        nib.save(nib.Nifti1Image(label.astype(np.float32 if name == "image" else np.uint8), affine), paths[name])
    if not refused:
        check_case(Case("case", (paths["image"],), paths["label"]), None)
        assert evaluate(tmp_path / "label", tmp_path / "image").rows[0]["dice"] == 1.0
        return
    with pytest.raises(DataError, match="voxel spacing") as checked:
        check_case(Case("case", (paths["image"],), paths["label"]), None)
    with pytest.raises(DataError, match="voxel spacing") as evaluated:
        evaluate(tmp_path / "label", tmp_path / "image")
    assert str(paths["label"]) in str(checked.value) and str(paths["label"]) in str(evaluated.value)
