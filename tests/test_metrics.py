"""Dice: the one formula validation (`dice_per_class`) and `medseg evaluate` both report."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.evaluate import evaluate
from medseg.metrics import dice, dice_per_class


def test_dice_from_counts():
    assert dice(60, 120, 120) == 0.5
    assert dice(0, 10, 0) == 0.0  # one side empty: a miss, not undefined
    assert math.isnan(dice(0, 0, 0))  # both empty: undefined, left out of means


def _maps() -> tuple[np.ndarray, np.ndarray]:
    reference = np.zeros((10, 10, 10), np.uint8)
    prediction = np.zeros_like(reference)
    reference[0:4, 0:5, 0:5] = 1  # 100 voxels
    prediction[1:5, 0:5, 0:5] = 1  # 100 voxels, 75 of them shared
    reference[6:8, 6:8, 6:8] = 2  # 8 voxels, none predicted
    return prediction, reference


def test_dice_per_class_of_a_known_overlap():
    prediction, reference = _maps()
    scores = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(reference), num_classes=4)
    assert scores[:2] == [2 * 75 / 200, 0.0]
    assert math.isnan(scores[2])  # class 3 in neither map


def test_validation_and_evaluate_report_the_same_dice(tmp_path: Path):
    prediction, reference = _maps()
    for folder, array in (("pred", prediction), ("ref", reference)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / folder / "a.nii.gz")
    rows = evaluate(tmp_path / "pred", tmp_path / "ref", {1: "one", 2: "two", 3: "three"}).rows
    validation = dice_per_class(torch.from_numpy(prediction), torch.from_numpy(reference), num_classes=4)
    assert [row["dice"] for row in rows[:2]] == validation[:2] == [0.75, 0.0]
    assert math.isnan(rows[2]["dice"]) and math.isnan(validation[2])
    assert rows[0]["volume_ref_ml"] == pytest.approx(100 / 1000)
