"""The dataset fingerprint: plan and train compute the same spacing; CT normalisation and the
foreground crop as the preprocessing then applies them, against direct numpy computations."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import config
from medseg.data.fingerprint import (plan_preprocessing, sample_foreground, spacing_rule, target_spacing,
                                     training_cases)
from medseg.plan import plan

SHAPE = (16, 16, 12)


def _write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    affine = np.diag([*spacing, 1.0])
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")


def _dataset(root: Path, spacings: list[tuple[float, float, float]], modality: str = "MRI",
             seed: int = 0) -> Path:
    """One case per spacing: a bright box (label 1) in noise; dataset.json names the modality."""
    rng = np.random.default_rng(seed)
    for index, spacing in enumerate(spacings):
        label = np.zeros(SHAPE, np.uint8)
        label[4:12, 5:11, 3:9] = 1
        image = rng.normal(0.0, 100.0, SHAPE) + 400.0 * label
        _write_case(root, f"case_{index:03d}", image, label, spacing)
    description = {"labels": {"0": "background", "1": "organ"}, "modality": {"0": modality},
                   "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    return root


def _config(root: Path, *overrides: str) -> config.Config:
    return config.load(None, [f"data.dataset={root}", *overrides])


def _train_spacing(root: Path, *overrides: str) -> tuple[float, float, float]:
    """The spacing `medseg train` runs at with data.spacing unset (its own preprocessing plan)."""
    cfg = _config(root, "data.spacing=null", *overrides)
    return plan_preprocessing(cfg, training_cases(cfg, workers=1)).spacing


def test_spacing_rule_median_and_anisotropy():
    # Not anisotropic (2 mm < 3 x 1 mm): the median per axis.
    assert spacing_rule([(1.0, 1.0, 2.0), (0.8, 1.0, 2.5), (1.0, 0.9, 1.5)]) == (1.0, 1.0, 2.0)
    # Median slice thickness 5 mm > 3 x 1 mm: the coarse axis takes its 10th percentile.
    thick = [(1.0, 1.0, 3.0), (1.0, 1.0, 4.0), (1.0, 1.0, 5.0), (1.0, 1.0, 5.0), (1.0, 1.0, 6.0)]
    assert spacing_rule(thick) == pytest.approx((1.0, 1.0, float(np.percentile([3, 4, 5, 5, 6], 10))))
    assert spacing_rule(thick)[2] == pytest.approx(3.4)


@pytest.mark.parametrize(
    ("spacings", "expected"),
    [
        # Anisotropic: median slice 5 mm > 3 x 0.8 mm, so the coarse axis takes the 10th percentile.
        ([(0.8, 0.8, 3.0), (0.8, 0.8, 4.0), (0.8, 0.8, 5.0), (0.8, 0.8, 5.0), (0.8, 0.8, 6.0)], (0.8, 0.8, 3.4)),
        # Mildly anisotropic: the median.
        ([(1.0, 1.0, 1.5), (1.2, 1.0, 2.0), (1.0, 1.0, 2.5), (1.0, 0.9, 2.0), (1.1, 1.0, 1.0)], (1.0, 1.0, 2.0)),
    ],
)
def test_plan_writes_the_spacing_train_computes(tmp_path, spacings, expected):
    root = _dataset(tmp_path / "data", spacings)
    planned = plan(root, 8 * 2**30, workers=1)
    assert planned.spacing == pytest.approx(expected)
    # The config file plan writes holds that spacing exactly, and train without data.spacing
    # computes it too: over every case, whichever fold it trains (a training-cases median would
    # change with the fold, and the 10th percentile with the 3 mm case in or out).
    out = tmp_path / "planned.yaml"
    out.write_text(planned.to_yaml(), encoding="utf-8")
    assert tuple(config.load(out).data.spacing) == planned.spacing
    for fold in (0, 1, 4):
        assert _train_spacing(root, f"data.fold={fold}") == planned.spacing
    # data.spacing set wins over the rule, for plan's function as for train's.
    cfg = _config(root, "data.spacing=[2.0,2.0,2.0]")
    assert target_spacing(cfg, training_cases(cfg, 1).dataset_summaries) == (2.0, 2.0, 2.0)


def test_ct_normalisation_clips_to_foreground_percentiles_and_standardises(tmp_path):
    from medseg.data.transforms import preprocessing

    root = _dataset(tmp_path / "ct", [(1.0, 1.0, 1.0)] * 3, modality="CT")
    cfg = _config(root, "data.folds=3", "data.crop_foreground=false")
    cases = training_cases(cfg, workers=1)
    prep = plan_preprocessing(cfg, cases)
    assert prep.normalization == "ct"  # auto, from dataset.json's modality

    # Directly: every foreground voxel of every case (each holds fewer than the per-case sample).
    raw = [nib.load(case.images[0]).get_fdata(dtype=np.float32) for case in cases.dataset.cases]
    masks = [nib.load(case.label).get_fdata() > 0 for case in cases.dataset.cases]
    foreground = np.concatenate([image[mask] for image, mask in zip(raw, masks)]).astype(np.float64)
    low, high = np.percentile(foreground, cfg.data.ct_percentiles)
    clipped = np.clip(foreground, low, high)
    assert prep.clip_low == pytest.approx((low,)) and prep.clip_high == pytest.approx((high,))
    assert prep.mean == pytest.approx((clipped.mean(),)) and prep.std == pytest.approx((clipped.std(),))
    assert low > -300 and high < 700  # the window clips: the noise reaches beyond it in the box

    # The preprocessed volume (1 mm already: resampling changes nothing) is the clipped, z-scored image.
    item = preprocessing(prep)(cases.dataset.cases[0].as_dict())
    expected = (np.clip(raw[0], low, high) - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(item["image"][0].numpy(), expected, atol=1e-4)
    # The statistics are the dataset's, not a fold's: another fold normalises identically.
    other = _config(root, "data.folds=3", "data.fold=2", "data.crop_foreground=false")
    assert plan_preprocessing(other, training_cases(other, workers=1)) == prep


def test_foreground_sample_is_capped_per_case_and_independent_of_workers(tmp_path):
    root = _dataset(tmp_path / "data", [(1.0, 1.0, 1.0)] * 3)
    cases = training_cases(_config(root, "data.folds=3"), workers=1).dataset.cases
    one = sample_foreground(cases, channels=1, classes=2, samples_per_case=100, workers=1)
    two = sample_foreground(cases, channels=1, classes=2, samples_per_case=100, workers=2)
    assert one.intensities[0].size == 3 * 100  # each box has 8*6*6 = 288 voxels: 100 drawn from each
    np.testing.assert_array_equal(one.intensities[0], two.intensities[0])
    assert one.class_voxels.tolist() == [3 * (16 * 16 * 12 - 288), 3 * 288]  # counted, not sampled


def test_crop_foreground_false_keeps_the_full_extent(tmp_path):
    from medseg.data.transforms import preprocessing

    root = tmp_path / "zeros"
    label = np.zeros((20, 20, 20), np.uint8)
    label[8:12, 8:12, 8:12] = 1
    image = np.zeros((20, 20, 20), np.float32)
    image[4:16, 5:15, 6:14] = 50.0 + label[4:16, 5:15, 6:14] * 100.0  # a non-zero "head" in zero air
    for name in ("a", "b"):
        _write_case(root, name, image, label)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "core"}}), encoding="utf-8")
    shapes = {}
    for crop in (True, False):
        cfg = _config(root, "data.folds=2", f"data.crop_foreground={str(crop).lower()}")
        cases = training_cases(cfg, workers=1)
        prep = plan_preprocessing(cfg, cases)
        assert prep.crop_foreground is crop
        item = preprocessing(prep)(cases.dataset.cases[0].as_dict())
        shapes[crop] = tuple(item["image"].shape[1:])
        assert tuple(item["label"].shape[1:]) == shapes[crop]
    assert shapes[True] == (12, 10, 8)  # the non-zero box
    assert shapes[False] == (20, 20, 20)  # everything
