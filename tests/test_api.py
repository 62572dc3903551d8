"""The Python API: `from medseg import Segmenter, train, evaluate`; a file, a SimpleITK image and an
array with its affine segment alike, each result on its input's own grid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import medseg
from medseg import Segmenter, evaluate, train
from medseg.data.io import read_header
from medseg.export import export
from tests.trained_run import ROOT, SAMPLE, trained_run

# An NRRD whose geometry is exact in float32 and float64 alike (permuted, flipped axes;
# anisotropic spacing), so the three ways in describe one grid to the last bit.
SPACING = (1.25, 0.75, 1.5)
ORIGIN = (12.5, -30.0, 7.25)
DIRECTION = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def segmenter(run) -> Segmenter:
    return Segmenter.from_checkpoint(run, device="cpu")


@pytest.fixture()
def scan(tmp_path) -> Path:
    voxels = np.asarray(nib.load(SAMPLE / "imagesTr" / "sample_002.nii.gz").dataobj)
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.T))  # sitk index (x, y, z) = voxel (i, j, k)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def test_import_is_cheap_and_names_the_api():
    code = "import sys, medseg; print('torch' in sys.modules, sorted(set(medseg.__all__)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", check=True).stdout
    assert out.split(" ", 1)[0] == "False"
    assert "Segmenter" in out and "train" in out and "evaluate" in out
    assert callable(train) and callable(evaluate) and medseg.Segmenter is Segmenter
    import medseg.train as training  # the submodule of the same name still works as one

    assert callable(training.train_one_epoch)


def test_path_sitk_image_and_array_give_the_same_labels_on_their_grid(segmenter, scan):
    header = read_header(scan)
    by_path = segmenter.predict(scan, probabilities=True)
    assert by_path.labels.shape == header.shape
    np.testing.assert_array_equal(by_path.affine, header.affine)
    assert by_path.class_names == ["background", "core", "shell"]
    assert by_path.probabilities.shape == (3, *header.shape)
    assert (by_path.probabilities.argmax(0) == by_path.labels).mean() > 0.999  # ties aside
    assert set(np.unique(by_path.labels)) <= {0, 1, 2} and by_path.labels.any()

    image = sitk.ReadImage(str(scan))
    by_image = segmenter.predict(image)
    np.testing.assert_array_equal(by_image.labels, by_path.labels)
    out = by_image.to_sitk()
    assert out.GetSize() == image.GetSize()
    np.testing.assert_allclose(out.GetOrigin(), ORIGIN)
    np.testing.assert_allclose(out.GetSpacing(), SPACING)
    np.testing.assert_allclose(out.GetDirection(), DIRECTION)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out).T, by_path.labels)

    array = sitk.GetArrayFromImage(image).T  # nibabel's convention: array[i, j, k], RAS affine
    by_array = segmenter.predict(array, affine=header.affine)
    np.testing.assert_array_equal(by_array.labels, by_path.labels)
    np.testing.assert_array_equal(by_array.affine, header.affine)


def test_saved_segmentation_keeps_the_input_geometry(segmenter, scan, tmp_path):
    result = segmenter.predict(scan)
    for name in ("seg.nrrd", "seg.nii.gz"):
        saved = sitk.ReadImage(str(result.save(tmp_path / name)))
        np.testing.assert_allclose(saved.GetOrigin(), ORIGIN, atol=1e-5)
        np.testing.assert_allclose(saved.GetSpacing(), SPACING, atol=1e-5)
        np.testing.assert_allclose(saved.GetDirection(), DIRECTION, atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(saved).T, result.labels)


def test_archive_segments_as_the_run_and_evaluate_names_its_classes(run, segmenter, tmp_path):
    archive = export(run, "zip", tmp_path / "model.zip")[0].path
    from_archive = Segmenter.from_checkpoint(archive, device="cpu")
    case = SAMPLE / "imagesTr" / "sample_004.nii.gz"
    result = from_archive.predict(case)
    np.testing.assert_array_equal(result.labels, segmenter.predict(case).labels)
    prediction = result.save(tmp_path / "sample_004.nii.gz")
    scores = evaluate(prediction, SAMPLE / "labelsTr" / "sample_004.nii.gz", checkpoint=archive, out=tmp_path / "eval")
    assert {row["class"] for row in scores.rows} == {"core", "shell"}
    assert (tmp_path / "eval" / "evaluation.csv").is_file()


def test_train_takes_overrides_by_section(tmp_path):
    with pytest.raises(medseg.errors.ConfigError, match="train.epochs"):
        train(ROOT / "configs" / "sample.yaml", train={"epochs": 0}, output_dir=str(tmp_path))
