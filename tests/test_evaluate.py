"""Evaluation against analytically known answers, on tiny label maps written as real files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import DataError
from medseg.evaluate import COLUMNS, Evaluation, evaluate

SHAPE = (12, 12, 16)


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _save(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), _affine(spacing, origin)), path)
    return path


def _save_nrrd(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """The same physical volume as :func:`_save`: ITK is LPS, so x and y flip sign."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(np.uint8).transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin((-origin[0], -origin[1], origin[2]))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def _box(lo: tuple[int, int, int], hi: tuple[int, int, int], value: int = 1, shape=SHAPE) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return array


def _row(result: Evaluation, case: str, name: str) -> dict:
    (row,) = [r for r in result.rows if r["case"] == case and r["class"] == name]
    return row


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background 6-neighbour, outside the volume being background.

    This is what MONAI's ``get_mask_edges`` computes (``mask ^ binary_erosion(mask)`` with
    scipy's default cross structure and ``border_value=0``).
    """
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(3):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _brute_force(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[float, float]:
    """HD95 (max of the two directed 95th percentiles, linear interpolation) and pooled MSD."""
    a = np.argwhere(_surface(pred)) * np.asarray(spacing)
    b = np.argwhere(_surface(ref)) * np.asarray(spacing)
    distances = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    a_to_b, b_to_a = distances.min(axis=1), distances.min(axis=0)
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    return float(hd95), float(np.concatenate([a_to_b, b_to_a]).mean())


def test_known_overlap_gives_exact_dice_and_volumes(tmp_path: Path) -> None:
    spacing = (2.0, 2.0, 2.5)  # 10 mm^3 per voxel
    ref = _box((2, 2, 2), (6, 7, 8))  # 4*5*6 = 120 voxels
    pred = _box((4, 2, 2), (8, 7, 8))  # 120 voxels, 2*5*6 = 60 shared
    _save(tmp_path / "ref" / "a.nii.gz", ref, spacing)
    _save(tmp_path / "pred" / "a.nii.gz", pred, spacing)
    result = evaluate(tmp_path / "pred", tmp_path / "ref")
    row = _row(result, "a", "class_1")
    assert row["dice"] == pytest.approx(2 * 60 / (120 + 120))
    assert row["volume_ref_ml"] == pytest.approx(1.2)
    assert row["volume_pred_ml"] == pytest.approx(1.2)
    assert set(row) == set(COLUMNS)
    assert result.unmatched == [] and result.notes == []


def test_identical_maps_are_perfect(tmp_path: Path) -> None:
    labels = _box((2, 2, 2), (6, 6, 6)) + _box((7, 7, 8), (10, 11, 14), value=2)
    _save(tmp_path / "ref" / "a.nii.gz", labels, (0.5, 1.0, 2.0))
    _save(tmp_path / "pred" / "a.nii.gz", labels, (0.5, 1.0, 2.0))
    result = evaluate(tmp_path / "pred", tmp_path / "ref", labels={0: "background", 1: "liver", 2: "tumour"})
    assert [r["class"] for r in result.rows] == ["liver", "tumour"]
    for row in result.rows:
        assert row["dice"] == 1.0 and row["hd95_mm"] == 0.0 and row["msd_mm"] == 0.0
    assert result.summary["liver"]["dice"] == (1.0, 0.0, 1)


def _ellipsoid(centre, radii) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    return sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1


def test_shift_with_anisotropic_spacing_matches_brute_force(tmp_path: Path) -> None:
    spacing = (0.5, 1.0, 2.0)
    ref = _box((3, 3, 3), (8, 9, 9)).astype(bool)
    pred = _box((3, 3, 5), (8, 9, 11)).astype(bool)  # two voxels along z: 4 mm
    _save(tmp_path / "ref" / "a.nii.gz", ref, spacing)
    _save(tmp_path / "pred" / "a.nii.gz", pred, spacing)
    row = _row(evaluate(tmp_path / "pred", tmp_path / "ref"), "a", "class_1")
    hd95, msd = _brute_force(pred, ref, spacing)
    assert hd95 == pytest.approx(4.0) and 0.0 < msd < hd95
    assert row["hd95_mm"] == pytest.approx(hd95, abs=1e-4)
    assert row["msd_mm"] == pytest.approx(msd, abs=1e-4)
    assert row["dice"] == pytest.approx(2 * (5 * 6 * 4) / (2 * 5 * 6 * 6))


def test_irregular_shapes_with_an_outlier_match_brute_force(tmp_path: Path) -> None:
    spacing = (0.5, 1.0, 2.0)
    ref = _ellipsoid((5.5, 6.0, 7.0), (4.0, 3.5, 5.0))
    pred = _ellipsoid((6.0, 5.2, 8.3), (3.2, 4.0, 4.5))
    pred[10, 1, 1] = True  # a stray voxel: moves the maximum, not the 95th percentile
    _save(tmp_path / "ref" / "a.nii.gz", ref, spacing)
    _save(tmp_path / "pred" / "a.nii.gz", pred, spacing)
    row = _row(evaluate(tmp_path / "pred", tmp_path / "ref"), "a", "class_1")
    hd95, msd = _brute_force(pred, ref, spacing)
    assert hd95 < 5.0  # the stray voxel is 5.39 mm away
    assert row["hd95_mm"] == pytest.approx(hd95, abs=1e-4)
    assert row["msd_mm"] == pytest.approx(msd, abs=1e-4)
    overlap = np.count_nonzero(pred & ref)
    assert row["dice"] == pytest.approx(2 * overlap / (pred.sum() + ref.sum()))


def test_absent_and_empty_classes(tmp_path: Path) -> None:
    both = _box((2, 2, 2), (5, 5, 5))
    _save(tmp_path / "ref" / "a.nii.gz", both + _box((7, 7, 7), (9, 9, 9), value=2))
    _save(tmp_path / "pred" / "a.nii.gz", both + _box((7, 7, 7), (9, 9, 9), value=2))
    _save(tmp_path / "ref" / "b.nii.gz", both)  # class 2 absent from both: NaN, left out
    _save(tmp_path / "pred" / "b.nii.gz", both)
    _save(tmp_path / "ref" / "c.nii.gz", both + _box((7, 7, 7), (9, 9, 9), value=2))
    _save(tmp_path / "pred" / "c.nii.gz", both)  # class 2 missed: Dice 0, distances NaN
    result = evaluate(tmp_path / "pred", tmp_path / "ref", labels={1: "one", 2: "two", 3: "three"})
    absent = _row(result, "b", "two")
    assert math.isnan(absent["dice"]) and math.isnan(absent["hd95_mm"]) and absent["volume_ref_ml"] == 0.0
    missed = _row(result, "c", "two")
    assert missed["dice"] == 0.0 and math.isnan(missed["hd95_mm"]) and math.isnan(missed["msd_mm"])
    assert missed["volume_ref_ml"] == pytest.approx(0.008) and missed["volume_pred_ml"] == 0.0
    assert result.notes == ["c two: prediction empty; Dice 0, HD95 and MSD undefined (NaN)"]
    mean, std, n = result.summary["two"]["dice"]
    assert (mean, std, n) == (0.5, 0.5, 2)
    assert result.summary["two"]["hd95_mm"] == (0.0, 0.0, 1)
    assert result.summary["one"]["dice"] == (1.0, 0.0, 3)
    mean, std, n = result.summary["three"]["dice"]
    assert math.isnan(mean) and math.isnan(std) and n == 0


def test_classes_found_in_any_map_and_nrrd_matches_nifti(tmp_path: Path) -> None:
    spacing, origin = (0.8, 1.0, 1.5), (-10.0, 20.0, 5.5)
    ref = _box((2, 2, 2), (6, 6, 6)) + _box((7, 7, 7), (9, 9, 9), value=3)
    pred = _box((2, 2, 2), (6, 6, 6)) + _box((7, 7, 10), (9, 9, 12), value=4)
    _save_nrrd(tmp_path / "ref" / "case_1.nrrd", ref, spacing, origin)
    _save(tmp_path / "pred" / "case_1.nii.gz", pred, spacing, origin)
    _save(tmp_path / "pred" / "extra.nii.gz", pred, spacing, origin)
    result = evaluate(tmp_path / "pred", tmp_path / "ref")
    assert [r["class"] for r in result.rows] == ["class_1", "class_3", "class_4"]
    assert _row(result, "case_1", "class_1")["dice"] == 1.0
    assert _row(result, "case_1", "class_3")["dice"] == 0.0
    assert result.unmatched == ["extra"]


def test_single_files(tmp_path: Path) -> None:
    ref = _save(tmp_path / "reference.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    pred = _save(tmp_path / "output.nii", _box((2, 2, 2), (6, 6, 6)))
    result = evaluate(pred, ref)
    assert [(r["case"], r["dice"]) for r in result.rows] == [("reference", 1.0)]


def test_shape_mismatch_names_the_prediction(tmp_path: Path) -> None:
    _save(tmp_path / "ref" / "a.nii.gz", np.ones((10, 12, 9)))
    bad = _save(tmp_path / "pred" / "a.nii.gz", np.ones((10, 12, 8)))
    with pytest.raises(DataError, match=r"shape \(10,12,8\) vs reference \(10,12,9\)") as info:
        evaluate(tmp_path / "pred", tmp_path / "ref")
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    ("spacing", "origin", "message"),
    [((1.0, 1.0, 1.0), (0.0, 0.0, 0.01), "origin"), ((1.0, 1.0, 1.2), (0.0, 0.0, 0.0), "spacing")],
)
def test_affine_mismatch(tmp_path: Path, spacing, origin, message: str) -> None:
    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    bad = _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)), spacing, origin)
    with pytest.raises(DataError, match=message) as info:
        evaluate(tmp_path / "pred", tmp_path / "ref")
    assert str(bad) in str(info.value)


def test_tiny_affine_difference_is_tolerated(tmp_path: Path) -> None:
    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)), (1.0, 1.0, 1.00001), (0.0, 0.0002, 0.0))
    assert evaluate(tmp_path / "pred", tmp_path / "ref").rows[0]["dice"] == 1.0


def test_references_without_prediction_are_listed_and_the_rest_scored(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _save(tmp_path / "ref" / f"{name}.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    _save(tmp_path / "pred" / "b.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    result = evaluate(tmp_path / "pred", tmp_path / "ref")
    assert result.missing == ["a", "c"]
    assert [(r["case"], r["dice"]) for r in result.rows] == [("b", 1.0)]
    with pytest.raises(DataError, match=r"no prediction for 2 of 3 reference cases \(a, c\)"):
        evaluate(tmp_path / "pred", tmp_path / "ref", require_all=True)


def test_no_prediction_at_all_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    _save(tmp_path / "pred" / "z.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    with pytest.raises(DataError, match=r"no prediction for 1 of 1 reference cases \(a\)"):
        evaluate(tmp_path / "pred", tmp_path / "ref")


def _evaluate_cli(*args: object):
    from typer.testing import CliRunner

    from medseg.cli import app

    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def test_evaluate_command_warns_naming_the_missing_cases_and_require_all_fails(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        _save(tmp_path / "ref" / f"{name}.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    _save(tmp_path / "pred" / "b.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    result = _evaluate_cli(tmp_path / "pred", tmp_path / "ref")
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr and "a, c" in result.stderr and "--require-all" in result.stderr
    document = json.loads((tmp_path / "pred" / "evaluation.json").read_text(encoding="utf-8"))
    assert document["missing"] == ["a", "c"] and {r["case"] for r in document["rows"]} == {"b"}
    (tmp_path / "pred" / "evaluation.json").unlink()
    result = _evaluate_cli(tmp_path / "pred", tmp_path / "ref", "--require-all")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no prediction for 2 of 3" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "pred" / "evaluation.json").exists()


def _image_like(rng: np.random.Generator) -> np.ndarray:
    """Integer-valued MR-like intensities: what a folder of images given as references holds."""
    return rng.integers(0, 3000, size=SHAPE).astype(np.int16)


def test_images_given_as_references_are_refused_in_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    image = _save(tmp_path / "ref" / "a.nii.gz", _image_like(rng), dtype=np.int16)
    result = _evaluate_cli(tmp_path / "pred", tmp_path / "ref")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(image) in lines[0] and "not a label map" in lines[0], result.stderr
    assert not (tmp_path / "pred" / "evaluation.csv").exists()


def test_references_with_far_more_values_than_the_classes_are_refused(tmp_path: Path) -> None:
    reference = np.zeros(SHAPE, np.uint8)
    for value in range(1, 8):  # 8 values for a model of 3 classes
        reference[value, :, :] = value
    _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    _save(tmp_path / "ref" / "a.nii.gz", reference)
    with pytest.raises(DataError, match="8 distinct values"):
        evaluate(tmp_path / "pred", tmp_path / "ref", {1: "liver", 2: "tumour"})
    # Without the classes, 8 values are a plausible label map.
    assert len(evaluate(tmp_path / "pred", tmp_path / "ref").rows) == 7


def test_negative_reference_values_are_refused(tmp_path: Path) -> None:
    _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)).astype(np.int16) - 1000, dtype=np.int16)
    with pytest.raises(DataError, match="negative values"):
        evaluate(tmp_path / "pred", tmp_path / "ref")


def test_non_integer_labels_are_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    bad = _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)) * 0.5, dtype=np.float32)
    with pytest.raises(DataError, match="non-integer") as info:
        evaluate(tmp_path / "pred", tmp_path / "ref")
    assert str(bad) in str(info.value)


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    with pytest.raises(DataError, match="does not exist"):
        evaluate(tmp_path / "nowhere", tmp_path / "ref")


def test_csv_and_json_round_trip(tmp_path: Path) -> None:
    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)) + _box((7, 7, 7), (9, 9, 9), value=2))
    _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 7)))
    result = evaluate(tmp_path / "pred", tmp_path / "ref")
    result.write_csv(tmp_path / "metrics.csv")
    result.write_json(tmp_path / "metrics.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.json", "pred", "ref"]

    with open(tmp_path / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS
    assert [r["class"] for r in rows] == ["class_1", "class_2"]
    assert float(rows[0]["dice"]) == pytest.approx(2 * 64 / (64 + 80))
    assert rows[1]["dice"] == "0" and rows[1]["hd95_mm"] == "" and rows[1]["msd_mm"] == ""

    document = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert set(document) == {"rows", "summary", "unmatched", "missing", "notes"}
    assert tuple(document["rows"][1]) == COLUMNS
    assert document["rows"][1]["hd95_mm"] is None and document["rows"][1]["dice"] == 0.0
    assert document["summary"]["class_2"]["hd95_mm"] == {"mean": None, "std": None, "n": 0}
    assert document["summary"]["class_1"]["dice"]["n"] == 1

    with pytest.raises(DataError, match="does not exist"):
        result.write_json(tmp_path / "missing" / "metrics.json")


def test_evaluate_command_takes_class_names_from_the_checkpoint(tmp_path: Path, tmp_path_factory) -> None:
    from typer.testing import CliRunner

    from medseg import checkpoint
    from medseg.cli import app
    from tests.trained_run import trained_run

    _save(tmp_path / "ref" / "a.nii.gz", _box((2, 2, 2), (6, 6, 6)))
    _save(tmp_path / "pred" / "a.nii.gz", _box((2, 2, 2), (6, 6, 7)))
    # A trained run's checkpoint, its classes renamed: evaluate names the classes as it records them.
    state = checkpoint.load(trained_run(tmp_path_factory) / "best.pt")
    labels = {"0": "background", "1": "liver", "2": "tumour"}
    state["preprocessing"] = {**state["preprocessing"], "labels": labels, "num_classes": 3}
    checkpoint.save(state, tmp_path / "best.pt")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"),
                                      "--checkpoint", str(tmp_path / "best.pt"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "evaluation.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # Every class the checkpoint names, by its name, also the one absent from both maps.
    assert [(r["class"], r["dice"]) for r in rows] == [("liver", format(2 * 64 / (64 + 80), ".10g")),
                                                        ("tumour", "")]
    document = json.loads((tmp_path / "out" / "evaluation.json").read_text(encoding="utf-8"))
    assert set(document["summary"]) == {"liver", "tumour"}
    assert document["summary"]["liver"]["dice"]["mean"] == pytest.approx(2 * 64 / (64 + 80))
    assert "liver" in result.output and "class_1" not in result.output
