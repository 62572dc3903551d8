"""The workflow after training, through the CLI: a 5-fold cross-validation of the sample data,
the fold ensemble with the postprocessing chosen on it, every output format, evaluate, and the
promises of inference about its inputs (never overwritten, none dropped, every problem named).

The five folds are trained once (module fixture) at tiny settings: 1 epoch of 2 steps each, the
sample volumes resampled to 4 mm so that one 16³ window covers them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medseg import checkpoint
from medseg.cli import app
from tests.conftest import ROOT
from tests.dicom import write_series

runner = CliRunner()

TINY = ["train.epochs=1", "train.iterations_per_epoch=2", "train.batch_size=1", "train.patch_size=[16,16,16]",
        "model.base_width=4", "model.max_width=8", "train.workers=0", "train.device=cpu", "train.amp=off",
        "data.folds=5", "validate.every=0", "validate.overlap=0", "data.spacing=[4,4,4]"]
SAMPLE_CASES = 12


def _cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result, *needles: str) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def cv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cross-validation folder of a 5-fold run on the sample data, trained through the CLI."""
    root = tmp_path_factory.mktemp("folds")
    dataset = root / "sample_data"
    shutil.copytree(ROOT / "sample_data", dataset)
    settings = [item for pair in (("--set", s) for s in [*TINY, f"data.dataset={dataset}", f"output_dir={root / 'runs'}"])
                for item in pair]
    result = _cli("train", ROOT / "configs" / "sample.yaml", "--folds", "all", *settings)
    assert result.exit_code == 0, result.output
    [parent] = (root / "runs").iterdir()
    assert parent.name.startswith("sample_data-cv-")
    return parent


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One sample image on an oblique grid, as NRRD and as a DICOM series."""
    root = tmp_path_factory.mktemp("scan")
    image = sitk.ReadImage(str(ROOT / "sample_data" / "imagesTr" / "sample_000.nii.gz"))
    image = sitk.Cast(image * 100, sitk.sitkInt16)  # int16 DICOM keeps the intensities' detail
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((12.5, -30.25, 7.0))
    sitk.WriteImage(image, str(root / "oblique.nrrd"))
    uid_root = "1.2.826.0.1.3680043.8.498.91"
    write_series(image, root / "dicom", modality="MR", uid_root=uid_root, description="T1 axial/post")
    return {"nrrd": root / "oblique.nrrd", "dicom": root / "dicom", "image": image,
            "series_uid": f"{uid_root}.1.2", "name": f"T1_axial_post_{uid_root}.1.2"}


# --- cross-validation ----------------------------------------------------------------------------


def test_every_fold_is_trained_into_one_folder_and_scored_on_its_own_validation_cases(cv: Path) -> None:
    folds = [cv / f"fold{k}" for k in range(5)]
    assert all((fold / "best.pt").is_file() for fold in folds)
    validation = [checkpoint.load(fold / "best.pt")["split"]["validation"] for fold in folds]
    assert sorted(sum(validation, [])) == sorted(f"sample_{k:03d}" for k in range(SAMPLE_CASES))
    summary = json.loads((cv / "crossval.json").read_text(encoding="utf-8"))
    assert set(summary["folds"]) == {"0", "1", "2", "3", "4"}
    for k, names in enumerate(validation):
        assert summary["folds"][str(k)]["cases"] == sorted(names)
        # The validation predictions lie on each case's original grid (what a user would see).
        for name in names:
            prediction = nib.load(folds[k] / "validation" / f"{name}.nii.gz")
            reference = nib.load(cv.parent.parent / "sample_data" / "labelsTr" / f"{name}.nii.gz")
            assert prediction.shape == reference.shape
            np.testing.assert_allclose(prediction.affine, reference.affine, atol=1e-4)
    with open(cv / "crossval.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == SAMPLE_CASES * 2 and {r["class"] for r in rows} == {"core", "shell"}
    core = [float(r["dice"]) for r in rows if r["class"] == "core" and r["dice"]]
    assert summary["overall"]["dice"]["core"] == pytest.approx(np.mean(core), abs=1e-6)


def test_the_cross_validation_dice_is_what_evaluate_finds_on_the_fold_predictions(cv: Path, tmp_path: Path) -> None:
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    for fold in range(5):
        for path in (cv / f"fold{fold}" / "validation").glob("*.nii.gz"):
            shutil.copy(path, pooled / path.name)
    result = _cli("evaluate", pooled, cv.parent.parent / "sample_data" / "labelsTr", "--checkpoint", cv / "fold0",
                  "--require-all")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((pooled / "evaluation.json").read_text(encoding="utf-8"))
    summary = json.loads((cv / "crossval.json").read_text(encoding="utf-8"))
    for name in ("core", "shell"):
        assert evaluation["summary"][name]["dice"]["mean"] == pytest.approx(summary["overall"]["dice"][name], abs=1e-6)


def test_postprocessing_is_chosen_by_nnunets_rule_and_recorded(cv: Path) -> None:
    decision = json.loads((cv / "postprocessing.json").read_text(encoding="utf-8"))
    assert decision["cases"] == SAMPLE_CASES
    for value, entry in decision["classes"].items():
        applies = entry["dice"] is not None and entry["dice_largest_component"] >= entry["dice"]
        assert entry["apply"] == applies and (int(value) in decision["largest_component"]) == applies
    summary = json.loads((cv / "crossval.json").read_text(encoding="utf-8"))
    assert summary["postprocessing"] == decision


def test_rule_applies_where_dice_does_not_drop() -> None:
    from medseg.postprocessing import choose, score_case

    reference = np.zeros((12, 12, 12), np.uint8)
    reference[2:6, 2:6, 2:6] = 1
    reference[8:10, 8:10, 8:10] = 2
    reference[1:3, 9:11, 1:3] = 2  # class 2 truly has two parts: keeping one loses Dice
    prediction = reference.copy()
    prediction[10, 1, 10] = 1  # a stray class-1 voxel: keeping the largest part gains Dice
    decision = choose([score_case(prediction, reference, [1, 2, 3])], {1: "a", 2: "b", 3: "absent"})
    assert decision["largest_component"] == [1]
    assert decision["classes"]["3"] == {"name": "absent", "dice": None, "dice_largest_component": None,
                                        "apply": False}


def test_folds_option_errors_are_one_line(tmp_path: Path) -> None:
    result = _cli("train", ROOT / "configs" / "sample.yaml", "--folds", "0,7", "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 2
    _one_error_line(result, "--folds", "0..3")
    assert not any(tmp_path.iterdir())


# --- the fold ensemble ---------------------------------------------------------------------------


def test_ensemble_of_the_folds_segments_and_evaluates_through_the_cli(cv: Path, tmp_path: Path) -> None:
    images = cv.parent.parent / "sample_data" / "imagesTr"
    result = _cli("infer", cv, images, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "ensemble of 5 models" in result.stdout and "postprocessing" in result.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"sample_{k:03d}.nii.gz" for k in range(SAMPLE_CASES)]
    result = _cli("evaluate", tmp_path / "out", cv.parent.parent / "sample_data" / "labelsTr", "--checkpoint", cv)
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text(encoding="utf-8"))
    assert len({row["case"] for row in evaluation["rows"]}) == SAMPLE_CASES and evaluation["missing"] == []


def test_ensemble_probabilities_are_the_mean_of_the_members(cv: Path, scan: dict) -> None:
    import torch

    from medseg.data.cases import InferenceInput
    from medseg.infer import Ensemble, resolve_model

    ensemble = Ensemble.from_model(resolve_model([cv]), "cpu")
    image, _ = ensemble.prepare(InferenceInput("oblique", (scan["nrrd"],)))
    members = torch.stack([member.probabilities(image) for member in ensemble.members])
    torch.testing.assert_close(ensemble.probabilities(image), members.mean(0))
    assert not torch.allclose(members[0], members[1])  # the folds differ: the mean is not one of them


def test_recorded_postprocessing_is_applied_unless_overridden(cv: Path, scan: dict, tmp_path: Path) -> None:
    from medseg.postprocessing import keep_largest_component

    model = tmp_path / "model"  # the same folds with a decision of our own
    model.mkdir()
    for k in range(5):
        os.symlink(cv / f"fold{k}", model / f"fold{k}")
    (model / "postprocessing.json").write_text(json.dumps({"largest_component": [1, 2]}))
    assert _cli("infer", model, scan["nrrd"], "-o", tmp_path / "default").exit_code == 0
    result = _cli("infer", model, scan["nrrd"], "-o", tmp_path / "raw", "--no-largest-component")
    assert result.exit_code == 0, result.output
    raw = np.asarray(nib.load(tmp_path / "raw" / "oblique.nii.gz").dataobj)
    default = np.asarray(nib.load(tmp_path / "default" / "oblique.nii.gz").dataobj)
    np.testing.assert_array_equal(default, keep_largest_component(raw, [1, 2]))


def test_members_with_different_preprocessing_are_refused(cv: Path, scan: dict, tmp_path: Path) -> None:
    state = checkpoint.load(cv / "fold1" / "best.pt")
    state["preprocessing"]["spacing"] = [2.0, 2.0, 2.0]
    checkpoint.save(state, tmp_path / "other.pt")
    result = _cli("infer", cv / "fold0", scan["nrrd"], "--ensemble", tmp_path / "other.pt", "-o", tmp_path / "out")
    assert result.exit_code == 2
    _one_error_line(result, "other.pt", "spacing")
    assert not (tmp_path / "out").exists()


def test_a_run_folder_means_its_best_checkpoint_and_says_so(cv: Path, scan: dict, tmp_path: Path) -> None:
    result = _cli("infer", cv / "fold0", scan["nrrd"], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert str(cv / "fold0" / "best.pt") in result.stdout.replace("\n", "")


# --- output formats ------------------------------------------------------------------------------


def _assert_same_grid(output: sitk.Image, reference: sitk.Image) -> None:
    assert output.GetSize() == reference.GetSize()
    np.testing.assert_allclose(output.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(output.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(output.GetDirection(), reference.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def nifti_prediction(cv: Path, scan: dict, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    out = tmp_path_factory.mktemp("nifti_prediction")
    assert _cli("infer", cv / "fold0", scan["nrrd"], "-o", out).exit_code == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "oblique.nii.gz")))


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "mha"])
def test_each_format_opens_in_simpleitk_on_the_input_grid(cv: Path, scan: dict, nifti_prediction: np.ndarray,
                                                         tmp_path: Path, fmt: str) -> None:
    result = _cli("infer", cv / "fold0", scan["nrrd"], "-o", tmp_path, "--format", fmt)
    assert result.exit_code == 0, result.output
    output = sitk.ReadImage(str(tmp_path / f"oblique.{fmt}"))
    _assert_same_grid(output, scan["image"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(output), nifti_prediction)
    assert [p.name for p in tmp_path.iterdir()] == [f"oblique.{fmt}"]  # no temporary left behind


def test_dicom_seg_references_the_source_series_slice_by_slice(cv: Path, scan: dict, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom

    result = _cli("infer", cv / "fold0", scan["dicom"], "-o", tmp_path / "nifti")
    assert result.exit_code == 0, result.output
    # Named after SeriesDescription and SeriesInstanceUID, sanitised.
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nifti" / f"{scan['name']}.nii.gz")))
    result = _cli("infer", cv / "fold0", scan["dicom"], "-o", tmp_path / "seg", "--format", "dicom-seg")
    assert result.exit_code == 0, result.output
    path = tmp_path / "seg" / f"{scan['name']}.dcm"
    dataset = pydicom.dcmread(path)
    assert dataset.Modality == "SEG"
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == scan["series_uid"]
    seg = hd.seg.segread(path)
    assert [seg.get_segment_description(n).SegmentLabel for n in (1, 2)] == ["core", "shell"]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(scan["dicom"]), scan["series_uid"])
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True)
    np.testing.assert_array_equal(pixels, labels)  # slice k of the series is frame k of the label map
    positions = {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID):
                 [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                 for f in dataset.PerFrameFunctionalGroupsSequence}
    for source in sources:
        np.testing.assert_allclose(positions[source.SOPInstanceUID], [float(v) for v in source.ImagePositionPatient])


def test_dicom_seg_for_a_file_input_is_refused_before_anything_is_written(cv: Path, scan: dict, tmp_path: Path) -> None:
    result = _cli("infer", cv / "fold0", scan["nrrd"], scan["dicom"], "-o", tmp_path / "out", "--format", "dicom-seg")
    assert result.exit_code == 2
    _one_error_line(result, "oblique.nrrd", "dicom-seg", "DICOM")
    assert not (tmp_path / "out").exists()


# --- inference never destroys inputs or drops good cases (issue 22) ------------------------------


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        path = folder / f"scan{k}.nii.gz"
        shutil.copy(ROOT / "sample_data" / "imagesTr" / f"sample_{k:03d}.nii.gz", path)
        paths.append(path)
    return paths


def test_output_folder_equal_to_the_input_folder_is_refused_and_inputs_untouched(cv: Path, tmp_path: Path) -> None:
    inputs = _images(tmp_path / "scans", 2)
    before = {p: p.read_bytes() for p in inputs}
    result = _cli("infer", cv / "fold0", tmp_path / "scans", "-o", tmp_path / "scans")
    assert result.exit_code == 2
    _one_error_line(result, "output folder", str(tmp_path / "scans"))
    assert {p: p.read_bytes() for p in inputs} == before and sorted((tmp_path / "scans").iterdir()) == inputs


def test_an_output_that_is_an_input_is_refused(cv: Path, tmp_path: Path) -> None:
    [scan] = _images(tmp_path / "scans", 1)
    (tmp_path / "out").mkdir()
    os.symlink(scan, tmp_path / "out" / "scan0.nii.gz")  # the output's name leads to the input
    before = scan.read_bytes()
    result = _cli("infer", cv / "fold0", scan, "-o", tmp_path / "out")
    assert result.exit_code == 2
    _one_error_line(result, "would overwrite", str(scan))
    assert scan.read_bytes() == before


def test_good_inputs_are_written_and_each_bad_one_reported(cv: Path, tmp_path: Path) -> None:
    good = _images(tmp_path / "scans", 3)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    missing = tmp_path / "missing.nii.gz"
    result = _cli("infer", cv / "fold0", good[0], missing, good[1], broken, good[2], "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan0.nii.gz", "scan1.nii.gz", "scan2.nii.gz"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and any(str(missing) in e for e in errors) and any(str(broken) in e for e in errors)
    assert "2 of 5 inputs failed" in result.stderr and "Traceback" not in result.output


def test_empty_and_junk_dicom_folders_are_reported(cv: Path, tmp_path: Path) -> None:
    _images(tmp_path / "study" / "good", 1)
    (tmp_path / "study" / "empty").mkdir()
    (tmp_path / "study" / "junk").mkdir()
    (tmp_path / "study" / "junk" / "IM0001").write_bytes(b"not a DICOM file" * 20)
    result = _cli("infer", cv / "fold0", tmp_path / "study", "-o", tmp_path / "out")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr
    assert any("empty" in e and e.count(str(tmp_path / "study" / "empty")) for e in errors)
    assert any(str(tmp_path / "study" / "junk") in e and "DICOM" in e for e in errors)
    assert (tmp_path / "out" / "scan0.nii.gz").is_file()


def test_a_symlink_loop_is_entered_once(cv: Path, tmp_path: Path) -> None:
    _images(tmp_path / "scans", 1)
    os.symlink(tmp_path / "scans", tmp_path / "scans" / "loop")
    result = _cli("infer", cv / "fold0", tmp_path / "scans", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scan0.nii.gz"]
    assert "leads back" in result.stdout


def test_label_like_files_are_left_out_of_folders_and_patterns_choose_files(cv: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    scans = _images(folder, 2)
    shutil.copy(scans[0], folder / "scan0_seg.nii.gz")
    (folder / "labelsTr").mkdir()
    shutil.copy(scans[0], folder / "labelsTr" / "scan5.nii.gz")
    result = _cli("infer", cv / "fold0", folder, "-o", tmp_path / "out", "--exclude", "*1.nii.gz")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scan0.nii.gz"]
    assert "left out 2 label-like" in result.stdout.replace("\n", "")
    result = _cli("infer", cv / "fold0", folder, "-o", tmp_path / "only", "--include", "scan1*")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["scan1.nii.gz"]


@pytest.mark.parametrize("option, value, needle", [
    ("--overlap", "1.0", "--overlap"), ("--sw-batch-size", "0", "--sw-batch-size"),
    ("--device", "cuda:99", "cuda:99"), ("--format", "png", "--format"),
])
def test_option_errors_are_reported_once_before_any_input(cv: Path, tmp_path: Path, option: str, value: str,
                                                          needle: str) -> None:
    result = _cli("infer", cv / "fold0", tmp_path / "no_such_input.nii.gz", "-o", tmp_path / "out", option, value)
    assert result.exit_code == 2
    line = _one_error_line(result, needle)
    assert "no_such_input" not in line and not (tmp_path / "out").exists()
