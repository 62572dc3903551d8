"""Every bad input a user can feed to `medseg train`: one line naming the file and the problem.

Library level: `check_case` / `check_dataset` (medseg.data.checks) and `find_dataset` raise a
DataError whose message names the file and says what is wrong. CLI level: `medseg train` exits
with code 2 and prints that line, without a traceback, before any caching or training (the
loader is replaced by a function that fails the test if it is reached).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medseg.cli import app
from medseg.data.cases import Case, find_dataset
from medseg.data.checks import CaseSummary, DatasetCheckError, check_case, check_dataset
from medseg.errors import DataError
from tests.conftest import HIPPOCAMPUS, ROOT

SHAPE = (8, 9, 7)
LABELS = {0: "background", 1: "structure"}


# ---------------------------------------------------------------------------------------------
# tiny files


def _affine(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _image_array(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(0).normal(100.0, 10.0, shape).astype(np.float32)


def _label_array(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(2, 5) for _ in shape)] = 1
    return label


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, _affine() if affine is None else affine), str(path))
    return path


def _case(tmp_path: Path, image=None, label=None, image_affine=None, label_affine=None, name="case") -> Case:
    image_path = _nifti(tmp_path / f"{name}.nii.gz", _image_array() if image is None else image, image_affine)
    label_path = _nifti(tmp_path / f"{name}_label.nii.gz", _label_array() if label is None else label, label_affine)
    return Case(name, (image_path,), label_path)


def _make_dataset(root: Path, cases: int = 2, modalities=("MRI",)) -> Path:
    """MSD layout: dataset.json, imagesTr/case_00N.nii.gz, labelsTr/case_00N.nii.gz."""
    training = []
    for i in range(cases):
        _nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", _image_array())
        _nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", _label_array())
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    description = {
        "name": "tiny",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def _assert_names(message: str, path: Path | str, *words: str) -> None:
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message, message
    assert str(path) in message, message
    for word in words:
        assert word in message, message


def _raises(case: Case, labels=LABELS, channels: int | None = 1) -> str:
    with pytest.raises(DataError) as info:
        check_case(case, labels, channels)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# check_case, one bad input each


def test_good_case_summary(tmp_path):
    affine = _affine(origin=(5.0, -3.0, 2.0), spacing=(0.5, 0.8, 2.0))
    summary = check_case(_case(tmp_path, image_affine=affine, label_affine=affine), LABELS, channels=1)
    assert isinstance(summary, CaseSummary)
    assert summary.shape == SHAPE
    assert summary.spacing == pytest.approx((0.5, 0.8, 2.0))
    assert summary.spacing_ras == pytest.approx((0.5, 0.8, 2.0))
    assert summary.channels == 1
    assert summary.label_values == (0, 1)
    np.testing.assert_allclose(summary.affine, affine)


def test_missing_image_file(tmp_path):
    case = _case(tmp_path)
    case.images[0].unlink()
    _assert_names(_raises(case), case.images[0], "no such file")


def test_truncated_nifti(tmp_path):
    case = _case(tmp_path, image=_image_array((30, 30, 30)))
    data = case.images[0].read_bytes()
    case.images[0].write_bytes(data[: len(data) // 2])
    _assert_names(_raises(case), case.images[0], "truncated")


def test_text_file_named_nifti(tmp_path):
    case = _case(tmp_path)
    case.images[0].write_text("this is not an image\n", encoding="utf-8")
    _assert_names(_raises(case), case.images[0], "cannot read")


def test_uncompressed_text_named_nii_gz_label(tmp_path):
    case = _case(tmp_path)
    case.label.write_bytes(gzip.compress(b"gzip, but not NIfTI" * 3))
    _assert_names(_raises(case), case.label, "cannot read")


def test_2d_image(tmp_path):
    case = _case(tmp_path, image=_image_array((8, 9)))
    _assert_names(_raises(case), case.images[0], "2D", "8×9")


def test_single_slice_image_is_2d(tmp_path):
    case = _case(tmp_path, image=_image_array((8, 9, 1)), label=_label_array((8, 9, 1)))
    _assert_names(_raises(case), case.images[0], "2D", "single slice")


def test_2d_label(tmp_path):
    case = _case(tmp_path, label=_label_array((8, 9)))
    _assert_names(_raises(case), case.label, "2D")


def test_2d_nrrd_image(tmp_path):
    image = sitk.GetImageFromArray(_image_array((9, 8)))
    path = tmp_path / "flat.nrrd"
    sitk.WriteImage(image, str(path))
    case = Case("flat", (path,), _nifti(tmp_path / "flat_label.nii.gz", _label_array()))
    _assert_names(_raises(case), path, "2D")


def test_zero_length_axis(tmp_path):
    case = _case(tmp_path, image=np.zeros((0, 9, 7), np.float32))
    _assert_names(_raises(case), case.images[0], "length 0", "axis 0")


def test_4d_image_where_3d_expected(tmp_path):
    case = _case(tmp_path, image=_image_array((*SHAPE, 2)))
    _assert_names(_raises(case, channels=1), case.images[0], "4D", "2 channels", "3D")


def test_4d_image_is_fine_as_channels(tmp_path):
    summary = check_case(_case(tmp_path, image=_image_array((*SHAPE, 2))), LABELS, channels=2)
    assert summary.channels == 2 and summary.shape == SHAPE


def test_4d_per_channel_file(tmp_path):
    first = _nifti(tmp_path / "case_0000.nii.gz", _image_array())
    second = _nifti(tmp_path / "case_0001.nii.gz", _image_array((*SHAPE, 2)))
    case = Case("case", (first, second), _nifti(tmp_path / "case_label.nii.gz", _label_array()))
    _assert_names(_raises(case, channels=None), second, "4D", "must be 3D")


def test_wrong_number_of_channels(tmp_path):
    case = _case(tmp_path, image=_image_array((*SHAPE, 3)))
    _assert_names(_raises(case, channels=2), case.images[0], "3 channels", "declares 2")


def test_wrong_number_of_channel_files(tmp_path):
    files = tuple(_nifti(tmp_path / f"case_{c:04d}.nii.gz", _image_array()) for c in range(3))
    case = Case("case", files, _nifti(tmp_path / "case_label.nii.gz", _label_array()))
    _assert_names(_raises(case, channels=2), files[0], "3 channel files", "declares 2")


def test_channel_files_differ_in_shape(tmp_path):
    first = _nifti(tmp_path / "case_0000.nii.gz", _image_array())
    second = _nifti(tmp_path / "case_0001.nii.gz", _image_array((8, 9, 6)))
    case = Case("case", (first, second), _nifti(tmp_path / "case_label.nii.gz", _label_array()))
    _assert_names(_raises(case, channels=2), second, "shape 8×9×6", "channel 0")


def test_4d_label(tmp_path):
    case = _case(tmp_path, label=np.stack([_label_array()] * 2, axis=-1))
    _assert_names(_raises(case), case.label, "4D label")


def test_image_and_label_shapes_differ(tmp_path):
    case = _case(tmp_path, label=_label_array((8, 9, 6)))
    _assert_names(_raises(case), case.label, "8×9×6", "differs from its image", "8×9×7")


def test_label_origin_differs(tmp_path):
    case = _case(tmp_path, label_affine=_affine(origin=(0.0, 2.5, 0.0)))
    _assert_names(_raises(case), case.label, "origin differs from its image by 2.5 mm")


def test_label_spacing_differs(tmp_path):
    case = _case(tmp_path, label_affine=_affine(spacing=(1.0, 1.0, 2.0)))
    _assert_names(_raises(case), case.label, "voxel spacing", "1×1×2")


def test_label_orientation_differs(tmp_path):
    flipped = _affine()
    flipped[0, 0] = -1.0
    case = _case(tmp_path, label_affine=flipped)
    _assert_names(_raises(case), case.label, "orientation", "180°")


def test_affine_within_tolerance_passes(tmp_path):
    near = _affine(origin=(0.0004, 0.0, -0.0004), spacing=(1.00005, 1.0, 1.0))
    summary = check_case(_case(tmp_path, label_affine=near), LABELS, channels=1)
    assert summary.label_values == (0, 1)


def test_nrrd_label_origin_differs(tmp_path):
    # Through SimpleITK (LPS on disk): the message is about the RAS geometry both share.
    image = sitk.GetImageFromArray(_image_array().transpose(2, 1, 0))
    label = sitk.GetImageFromArray(_label_array().transpose(2, 1, 0))
    label.SetOrigin((0.0, 0.0, 4.0))
    sitk.WriteImage(image, str(tmp_path / "case.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "case_label.nrrd"))
    case = Case("case", (tmp_path / "case.nrrd",), tmp_path / "case_label.nrrd")
    _assert_names(_raises(case), tmp_path / "case_label.nrrd", "origin differs from its image by 4 mm")


def test_undeclared_label_values(tmp_path):
    label = _label_array()
    label[0, 0, 0] = 3
    label[1, 0, 0] = 7
    case = _case(tmp_path, label=label)
    _assert_names(_raises(case), case.label, "3, 7", "not declared", "dataset.json")


def test_non_integer_label_values(tmp_path):
    label = _label_array().astype(np.float32)
    label[0, 0, 0] = 0.5
    case = _case(tmp_path, label=label)
    _assert_names(_raises(case), case.label, "non-integer label values", "0.5")


def test_float_label_with_whole_values_passes(tmp_path):
    summary = check_case(_case(tmp_path, label=_label_array().astype(np.float32)), LABELS, channels=1)
    assert summary.label_values == (0, 1)


def test_negative_label_values_without_declared_labels(tmp_path):
    label = _label_array().astype(np.int16)
    label[0, 0, 0] = -1
    case = _case(tmp_path, label=label)
    _assert_names(_raises(case, labels=None), case.label, "negative label values -1")


def test_nan_intensities(tmp_path):
    image = _image_array()
    image[1, 2, 3] = np.nan
    case = _case(tmp_path, image=image)
    _assert_names(_raises(case), case.images[0], "1 NaN")


def test_inf_intensities(tmp_path):
    image = _image_array()
    image[1, 2, 3] = np.inf
    image[2, 2, 3] = -np.inf
    case = _case(tmp_path, image=image)
    _assert_names(_raises(case), case.images[0], "2 Inf")


def test_nan_in_mha_vector_image(tmp_path):
    array = _image_array((7, 9, 8, 2))  # (z, y, x, component)
    array[3, 3, 3, 1] = np.nan
    path = tmp_path / "case.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=True), str(path))
    case = Case("case", (path,), _nifti(tmp_path / "case_label.nii.gz", _label_array()))
    _assert_names(_raises(case, channels=2), path, "NaN")


# ---------------------------------------------------------------------------------------------
# check_dataset: all problems, one line


def test_check_dataset_good_returns_summaries_in_order(tmp_path):
    info = find_dataset(_make_dataset(tmp_path / "ds", cases=3))
    summaries = check_dataset(info.cases, info.labels, len(info.modalities), workers=3)
    assert [s.name for s in summaries] == ["case_000", "case_001", "case_002"]
    assert all(s.label_values == (0, 1) and s.shape == SHAPE for s in summaries)


@pytest.mark.parametrize("workers", [1, 4])
def test_check_dataset_collects_all_problems(tmp_path, workers):
    root = _make_dataset(tmp_path / "ds", cases=4)
    bad_image = root / "imagesTr" / "case_001.nii.gz"
    bad_image.write_text("not an image", encoding="utf-8")
    _nifti(root / "labelsTr" / "case_002.nii.gz", _label_array((8, 9, 6)))
    nan = _image_array()
    nan[0, 0, 0] = np.nan
    _nifti(root / "imagesTr" / "case_003.nii.gz", nan)
    info = find_dataset(root)
    with pytest.raises(DatasetCheckError) as error:
        check_dataset(info.cases, info.labels, 1, workers=workers)
    assert isinstance(error.value, DataError)
    message = str(error.value)
    problems = error.value.problems
    # Every bad case listed, one line each in case order, then the summary.
    assert message.splitlines() == [*problems, "3 of 4 cases have problems"]
    assert "cannot read" in problems[0]
    assert len(problems) == 3
    assert str(bad_image) in problems[0]
    assert str(root / "labelsTr" / "case_002.nii.gz") in problems[1] and "differs from its image" in problems[1]
    assert str(root / "imagesTr" / "case_003.nii.gz") in problems[2] and "NaN" in problems[2]
    assert all("\n" not in p for p in problems)


def test_check_dataset_one_problem_has_no_suffix(tmp_path):
    root = _make_dataset(tmp_path / "ds", cases=2)
    _nifti(root / "imagesTr" / "case_001.nii.gz", _image_array((8, 9)))
    info = find_dataset(root)
    with pytest.raises(DatasetCheckError) as error:
        check_dataset(info.cases, info.labels, 1)
    assert "cases have problems" not in str(error.value)
    assert error.value.problems == [str(error.value)]


def test_check_dataset_inconsistent_channels_without_declaration(tmp_path):
    root = _make_dataset(tmp_path / "ds", cases=3)
    odd = _nifti(root / "imagesTr" / "case_002.nii.gz", _image_array((*SHAPE, 2)))
    info = find_dataset(root)
    with pytest.raises(DataError) as error:
        check_dataset(info.cases, None, channels=None)
    _assert_names(str(error.value), odd, "2 channels", "most cases have 1")


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="shared hippocampus data not present")
def test_hippocampus_passes(tmp_path):
    info = find_dataset(HIPPOCAMPUS)
    summaries = check_dataset(info.cases, info.labels, len(info.modalities) or None, workers=4)
    assert len(summaries) == len(info.cases)
    assert {v for s in summaries for v in s.label_values} == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# dataset folders (find_dataset)


def _find_error(root: Path) -> str:
    with pytest.raises(DataError) as error:
        find_dataset(root)
    return str(error.value)


def test_nonexistent_dataset(tmp_path):
    _assert_names(_find_error(tmp_path / "nowhere"), tmp_path / "nowhere", "does not exist")


def test_empty_dataset_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_names(_find_error(tmp_path / "empty"), tmp_path / "empty", "no cases found")


def test_dataset_json_not_json(tmp_path):
    root = _make_dataset(tmp_path / "ds")
    (root / "dataset.json").write_text("{labels: oops", encoding="utf-8")
    _assert_names(_find_error(root), root / "dataset.json", "not valid JSON")


def test_dataset_json_lists_missing_files(tmp_path):
    root = _make_dataset(tmp_path / "ds")
    (root / "imagesTr" / "case_001.nii.gz").unlink()
    _assert_names(_find_error(root), root / "imagesTr" / "case_001.nii.gz", "missing")


# ---------------------------------------------------------------------------------------------
# through `medseg train`

runner = CliRunner()

TINY = [
    "model.base_width=4", "model.max_width=8", "train.epochs=1", "train.iterations_per_epoch=1",
    "train.batch_size=1", "train.patch_size=[8,8,8]", "train.workers=0", "validate.every=1",
    "validate.sw_batch_size=1", "data.folds=2", "data.cache=none",
]


@pytest.fixture
def no_training(monkeypatch):
    """Reaching the loaders means the bad input was not caught before the expensive work."""

    def reached(*args, **kwargs):
        raise AssertionError("caching/training started before the bad input was reported")

    monkeypatch.setattr("medseg.train.training_batches", reached)
    monkeypatch.setattr("medseg.train.validation_dataset", reached)


def _train(tmp_path: Path, dataset: Path | str, *extra: str, config: Path | None = None):
    args = ["train", str(config or ROOT / "configs" / "sample.yaml")]
    for item in [*TINY, f"data.dataset={dataset}", f"output_dir={tmp_path / 'runs'}", "run_name=run", *extra]:
        args += ["--set", item]
    return runner.invoke(app, args)


def _assert_cli_error(result, path: Path | str, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    _assert_names(error_lines[0], path, *words)


def _bad_image(array_fn: Callable[[], np.ndarray]):
    def mutate(root: Path) -> Path:
        return _nifti(root / "imagesTr" / "case_001.nii.gz", array_fn())
    return mutate


def _bad_label(array_fn: Callable[[], np.ndarray], affine: np.ndarray | None = None):
    def mutate(root: Path) -> Path:
        return _nifti(root / "labelsTr" / "case_001.nii.gz", array_fn(), affine)
    return mutate


def _truncate(root: Path) -> Path:
    path = _nifti(root / "imagesTr" / "case_001.nii.gz", _image_array((30, 30, 30)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text(root: Path) -> Path:
    path = root / "imagesTr" / "case_001.nii.gz"
    path.write_text("this is not an image\n", encoding="utf-8")
    return path


def _with_value(array: np.ndarray, value) -> np.ndarray:
    array = array.copy()
    array[0, 0, 0] = value
    return array


def _two_modalities_three_channels(root: Path) -> Path:
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    description["modality"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(description))
    for i in range(2):
        _nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", _image_array((*SHAPE, 2)))
    return _nifti(root / "imagesTr" / "case_001.nii.gz", _image_array((*SHAPE, 3)))


# name -> (write the bad file into a good 2-case dataset and return its path, words the error must hold)
BAD_FILES = {
    "truncated_nifti": (_truncate, ("truncated",)),
    "text_named_nifti": (_text, ("cannot read",)),
    "2d_image": (_bad_image(lambda: _image_array((8, 9))), ("2D",)),
    "zero_length_axis": (_bad_image(lambda: np.zeros((8, 0, 7), np.float32)), ("length 0",)),
    "4d_where_3d_expected": (_bad_image(lambda: _image_array((*SHAPE, 2))), ("4D", "3D")),
    "wrong_number_of_channels": (_two_modalities_three_channels, ("3 channels", "declares 2")),
    "shapes_differ": (_bad_label(lambda: _label_array((8, 9, 6))), ("differs from its image",)),
    "affines_differ": (_bad_label(_label_array, _affine(origin=(2.5, 0.0, 0.0))),
                       ("origin differs from its image by 2.5 mm",)),
    "undeclared_label_values": (_bad_label(lambda: _with_value(_label_array(), 4)), ("4", "not declared")),
    "non_integer_label_values": (_bad_label(lambda: _with_value(_label_array().astype(np.float32), 0.5)),
                                 ("non-integer", "0.5")),
    "nan_intensities": (_bad_image(lambda: _with_value(_image_array(), np.nan)), ("NaN",)),
    "inf_intensities": (_bad_image(lambda: _with_value(_image_array(), np.inf)), ("Inf",)),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_check_dataset_reports_bad_file(tmp_path, name):
    mutate, words = BAD_FILES[name]
    root = _make_dataset(tmp_path / "ds")
    bad = mutate(root)
    info = find_dataset(root)
    with pytest.raises(DataError) as error:
        check_dataset(info.cases, info.labels, len(info.modalities) or None)
    _assert_names(str(error.value), bad, *words)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_cli_train_reports_bad_file(tmp_path, no_training, name):
    mutate, words = BAD_FILES[name]
    root = _make_dataset(tmp_path / "ds")
    bad = mutate(root)
    _assert_cli_error(_train(tmp_path, root), bad, *words)


def test_cli_nonexistent_dataset(tmp_path, no_training):
    _assert_cli_error(_train(tmp_path, tmp_path / "nowhere"), tmp_path / "nowhere", "does not exist")


def test_cli_empty_dataset_folder(tmp_path, no_training):
    (tmp_path / "empty").mkdir()
    _assert_cli_error(_train(tmp_path, tmp_path / "empty"), tmp_path / "empty", "no cases found")


def test_cli_dataset_json_not_json(tmp_path, no_training):
    root = _make_dataset(tmp_path / "ds")
    (root / "dataset.json").write_text("{not json", encoding="utf-8")
    _assert_cli_error(_train(tmp_path, root), root / "dataset.json", "not valid JSON")


def test_cli_dataset_json_lists_missing_files(tmp_path, no_training):
    root = _make_dataset(tmp_path / "ds")
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    _assert_cli_error(_train(tmp_path, root), root / "labelsTr" / "case_001.nii.gz", "missing")


def test_cli_config_yaml_syntax_error(tmp_path, no_training):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n", encoding="utf-8")
    _assert_cli_error(_train(tmp_path, _make_dataset(tmp_path / "ds"), config=config), config, "YAML syntax error")


def test_cli_config_unknown_key(tmp_path, no_training):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  batchsize: 2\n", encoding="utf-8")
    _assert_cli_error(_train(tmp_path, _make_dataset(tmp_path / "ds"), config=config), config,
                      "unknown config key 'train.batchsize'")


def test_cli_config_wrong_type(tmp_path, no_training):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  lr: fast\n", encoding="utf-8")  # a key TINY does not override
    result = _train(tmp_path, _make_dataset(tmp_path / "ds"), config=config)
    _assert_cli_error(result, config, "train.lr", "must be float")


def test_cli_unwritable_output_dir(tmp_path, no_training):
    (tmp_path / "afile").write_text("a regular file, so no folder can be created under it", encoding="utf-8")
    runs = tmp_path / "afile" / "runs"
    result = _train(tmp_path, _make_dataset(tmp_path / "ds"), f"output_dir={runs}")
    _assert_cli_error(result, runs, "cannot create")


def test_cli_non_positive_time_limit_creates_no_run(tmp_path, no_training):
    result = _train(tmp_path, _make_dataset(tmp_path / "ds"), "train.max_minutes=0")
    _assert_cli_error(result, "train.max_minutes", "must be > 0")
    assert not (tmp_path / "runs" / "run").exists()
