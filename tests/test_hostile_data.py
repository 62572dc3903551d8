"""Hostile configs and data, through the real CLI: exit 2 (1 for a failed inference input), one
line on stderr naming the key or file, no traceback, nothing written, inputs untouched.

Classes: config values outside their range (and mistyped keys); headers describing volumes medseg
cannot use (huge shapes, complex/RGB voxels, singular or non-finite affines, 2D); data that looks
valid but is unusable (all-zero images, label values above 255, spacings whose resampled volume is
enormous); malformed dataset.json values; DICOM series with missing or corrupt slices; NaN blocks at
inference. Every bad case of a dataset is listed, not only the first.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medseg.cli import app
from tests.conftest import ROOT
from tests.dicom import write_series

runner = CliRunner()
SHAPE = (16, 16, 16)
TINY = [
    "model.base_width=4", "model.max_width=8", "train.epochs=1", "train.iterations_per_epoch=1",
    "train.batch_size=1", "train.patch_size=[16,16,16]", "train.workers=0", "validate.every=1",
    "validate.sw_batch_size=1", "data.folds=2", "data.cache=none", "train.compile=off",
]


# ---------------------------------------------------------------------------------------------
# files


def _image(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 10.0, shape).astype(np.float32)


def _label(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[4:10, 4:10, 4:10] = 1
    return label


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _dataset(root: Path, cases: int = 4) -> Path:
    """MSD layout with dataset.json; case_00N."""
    training = []
    for i in range(cases):
        _nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", _image(seed=i))
        _nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", _label())
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    description = {"name": "hostile", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "thing"},
                   "numTraining": cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def _huge_header_gz(path: Path, shape=(2048, 2048, 2048), zeros: int = 1 << 24) -> Path:
    """A small .nii.gz whose header claims `shape` float32 (32 GiB for 2048³), followed by
    `zeros` bytes of zeros: gzip makes it a few KB on disk."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=9) as stream:
        stream.write(header.binaryblock + b"\0" * 4)
        chunk = b"\0" * (1 << 20)
        for _ in range(zeros // len(chunk)):
            stream.write(chunk)
    return path


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_one_line(result, *words: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one error line on stderr, holding every word."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert str(word) in error_lines[0], result.stderr
    return error_lines[0]


def _plan(dataset: Path):
    return runner.invoke(app, ["plan", str(dataset)])


@pytest.fixture
def no_training(monkeypatch):
    """Reaching the loaders means the bad input was not caught before the expensive work."""

    def reached(*args, **kwargs):
        raise AssertionError("caching/training started before the bad input was reported")

    monkeypatch.setattr("medseg.train.training_batches", reached)
    monkeypatch.setattr("medseg.train.validation_dataset", reached)


def _train(tmp_path: Path, dataset: Path, *extra: str):
    args = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in [*TINY, f"data.dataset={dataset}", f"output_dir={tmp_path / 'runs'}", "run_name=run", *extra]:
        args += ["--set", item]
    return runner.invoke(app, args)


# ---------------------------------------------------------------------------------------------
# config values out of range: refused at load, before any file is read or written


@pytest.mark.parametrize(("item", "key", "words"), [
    ("train.batch_size=0", "train.batch_size", (">= 1", "got 0")),
    ("train.batch_size=-2", "train.batch_size", (">= 1",)),
    ("train.patch_size=[0,16,16]", "train.patch_size[0]", ("[8, 4096]",)),
    ("train.patch_size=[16,16]", "train.patch_size", ("3 items",)),
    ("train.epochs=0", "train.epochs", (">= 1",)),
    ("train.iterations_per_epoch=0", "train.iterations_per_epoch", (">= 1",)),
    ("train.workers=-1", "train.workers", ("got -1",)),
    ("model.base_width=0", "model.base_width", ("got 0",)),
    ("train.lr=.inf", "train.lr", ("finite", "> 0", "inf")),
    ("train.lr=.nan", "train.lr", ("finite", "nan")),
    ("train.lr=0", "train.lr", ("> 0",)),
    ("augment.flip_prob=1.5", "augment.flip_prob", ("[0, 1]", "1.5")),
    ("data.foreground_oversample=-0.1", "data.foreground_oversample", ("[0, 1]",)),
    ("data.ct_percentiles=[0.5,101]", "data.ct_percentiles[1]", ("[0, 100]",)),
    ("data.ct_percentiles=[99,1]", "data.ct_percentiles", ("low > high",)),
    ("validate.overlap=1.0", "validate.overlap", ("[0, 1)", "1.0")),
    ("data.spacing=[1,.nan,1]", "data.spacing[1]", ("finite", "nan")),
    ("data.spacing=[1,0,1]", "data.spacing[1]", ("(0, 1000]",)),
    ("data.fold=7", "data.fold", ("0..1",)),
    ("train.device=foo", "train.device", ("cuda:N", "foo")),
    ("run_name=../escaped", "run_name", ("one folder name",)),
    ("train.lrr=0.1", "train.lrr", ("did you mean 'train.lr'?",)),
    ("augment.flip_prop=0.1", "augment.flip_prop", ("did you mean 'augment.flip_prob'?",)),
])
def test_config_value_out_of_range(tmp_path, no_training, item, key, words):
    dataset = _dataset(tmp_path / "ds", cases=2)
    before = _snapshot(dataset)
    result = _train(tmp_path, dataset, item)
    _assert_one_line(result, f"'{key}'", *words)
    assert not (tmp_path / "runs").exists()
    assert _snapshot(dataset) == before


def test_config_file_value_out_of_range_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  batch_sise: 4\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(path)])
    _assert_one_line(result, str(path), "'train.batch_sise'", "did you mean 'train.batch_size'?")
    path.write_text("validate:\n  overlap: 1.0\n", encoding="utf-8")
    _assert_one_line(runner.invoke(app, ["train", str(path)]), str(path), "'validate.overlap'")


def test_device_that_does_not_exist(tmp_path, no_training):
    import torch

    count = torch.cuda.device_count()
    result = _train(tmp_path, _dataset(tmp_path / "ds", cases=2), f"train.device=cuda:{count + 7}")
    _assert_one_line(result, "'train.device'", f"cuda:{count + 7}")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# unusable data, found by `medseg plan` (and train) from the headers, before anything is allocated


def _complex(root):
    return _nifti(root / "imagesTr" / "case_001.nii.gz", _image().astype(np.complex64) * (1 + 1j))


def _rgb(root):
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 200
    return _nifti(root / "imagesTr" / "case_001.nii.gz", rgb)


def _singular(root):
    affine = np.eye(4)
    affine[:3, 1] = affine[:3, 0]  # the second voxel axis is the first
    return _nifti(root / "imagesTr" / "case_001.nii.gz", _image(), affine)


def _nan_affine(root):
    # No sform or qform: the affine comes from pixdim, whose first voxel size is NaN.
    path = root / "imagesTr" / "case_001.nii.gz"
    image = nib.Nifti1Image(_image(), None)
    image.header["pixdim"][1] = np.nan
    nib.save(image, str(path))
    return path


def _all_zero(root):
    return _nifti(root / "imagesTr" / "case_001.nii.gz", np.zeros(SHAPE, np.float32))


def _label_299(root):
    label = _label().astype(np.int16)
    label[0, 0, 0] = 299
    (root / "dataset.json").write_text((root / "dataset.json").read_text(encoding="utf-8").replace(
        '"labels": {"0": "background", "1": "thing"}', '"labels": {}'))
    return _nifti(root / "labelsTr" / "case_001.nii.gz", label)


def _huge(root):
    return _huge_header_gz(root / "imagesTr" / "case_001.nii.gz", zeros=0)


def _metre_voxels(root):
    # A 600 mm voxel: 16³ voxels become 9600³ at the others' 1 mm.
    affine = np.diag([600.0, 600.0, 600.0, 1.0])
    _nifti(root / "labelsTr" / "case_001.nii.gz", _label(), affine)
    _nifti(root / "imagesTr" / "case_001.nii.gz", _image(), affine)
    return "case 'case_001'"


def _two_d(root):
    return _nifti(root / "imagesTr" / "case_001.nii.gz", _image((16, 16)))


HOSTILE = {
    "huge_header": (_huge, ("claims 2048×2048×2048", "voxels")),
    "complex": (_complex, ("complex voxels",)),
    "rgb": (_rgb, ("structured (R, G, B) voxels",)),
    "singular_affine": (_singular, ("singular affine",)),
    "non_finite_affine": (_nan_affine, ("invalid voxel spacing",)),
    "all_zero_image": (_all_zero, ("every voxel is 0",)),
    "label_above_255": (_label_299, ("299", "at most 256 classes")),
    "600mm_voxel": (_metre_voxels, ("9600×9600×9600", "more than medseg preprocesses")),
    "2d_image": (_two_d, ("2D image",)),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_plan_refuses_unusable_data(tmp_path, name):
    mutate, words = HOSTILE[name]
    dataset = _dataset(tmp_path / "ds")
    culprit = mutate(dataset)
    before = _snapshot(dataset)
    result = _plan(dataset)
    _assert_one_line(result, culprit, *words)
    assert _snapshot(dataset) == before


@pytest.mark.parametrize("name", ["complex", "label_above_255", "600mm_voxel"])
def test_train_refuses_unusable_data_before_training(tmp_path, no_training, name):
    mutate, words = HOSTILE[name]
    dataset = _dataset(tmp_path / "ds")
    culprit = mutate(dataset)
    _assert_one_line(_train(tmp_path, dataset), culprit, *words)
    assert not (tmp_path / "runs" / "run" / "last.pt").exists()


def test_every_bad_case_is_listed(tmp_path):
    dataset = _dataset(tmp_path / "ds", cases=5)
    culprits = [_complex(dataset), _singular_at(dataset, 2), _all_zero_at(dataset, 4)]
    result = _plan(dataset)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 4, result.stderr  # one per bad case, then the summary
    for line, culprit in zip(lines, culprits):
        assert line.startswith(str(culprit)), result.stderr
    assert lines[-1] == "3 of 5 cases have problems"


def _singular_at(root, index):
    affine = np.eye(4)
    affine[:3, 2] = affine[:3, 1]
    return _nifti(root / "imagesTr" / f"case_{index:03d}.nii.gz", _image(), affine)


def _all_zero_at(root, index):
    return _nifti(root / "imagesTr" / f"case_{index:03d}.nii.gz", np.zeros(SHAPE, np.float32))


def test_target_spacing_far_finer_than_the_data_is_refused_naming_the_case(tmp_path, no_training):
    dataset = _dataset(tmp_path / "ds", cases=2)
    result = _train(tmp_path, dataset, "data.spacing=[0.001,0.001,0.001]")
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "case 'case_000'" in lines[0] and "16000×16000×16000" in lines[0], result.stderr
    assert lines[-1] == "2 of 2 cases have problems"
    assert not (tmp_path / "runs" / "run" / "last.pt").exists()


def test_small_file_claiming_gigabytes_fails_fast_in_bounded_memory(tmp_path):
    """A few KB of gzip whose header claims 2048³ float32 (32 GiB), followed by 64 MiB of zeros:
    refused from the header; the process never grows near what the header claims."""
    dataset = _dataset(tmp_path / "ds", cases=2)
    bomb = _huge_header_gz(dataset / "imagesTr" / "case_001.nii.gz", zeros=64 << 20)
    assert bomb.stat().st_size < 1 << 20
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run([sys.executable, '-m', 'medseg', 'plan', sys.argv[1]], capture_output=True, encoding='utf-8', errors='replace'); "
             "sys.stdout.write(str(r.returncode) + '\\n' + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) + '\\n'); "
             "sys.stderr.write(r.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, str(dataset)], capture_output=True, encoding="utf-8", errors="replace",
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    code, max_rss_kib = (int(v) for v in done.stdout.split())
    assert code == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert str(bomb) in done.stderr and "2048×2048×2048" in done.stderr
    assert max_rss_kib * 1024 < 1.5e9, max_rss_kib


# ---------------------------------------------------------------------------------------------
# malformed dataset.json values


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d["training"][1].update(image=5), ("'training' entry 1", "'image'", "a number")),
    (lambda d: d["training"][0].update(label={"path": "x"}), ("'training' entry 0", "'label'", "an object")),
    (lambda d: d["training"][0].update(image=["./imagesTr/case_000.nii.gz"]), ("'image'", "a list")),
    (lambda d: d.update(file_ending=3), ("'file_ending'", "a number")),
    (lambda d: d.update(modality={"zero": "CT"}), ("'modality'",)),
])
def test_malformed_dataset_json_values(tmp_path, no_training, edit, words):
    dataset = _dataset(tmp_path / "ds", cases=2)
    description = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    edit(description)
    (dataset / "dataset.json").write_text(json.dumps(description))
    _assert_one_line(_plan(dataset), dataset / "dataset.json", *words)
    _assert_one_line(_train(tmp_path, dataset), dataset / "dataset.json", *words)


def test_deeply_nested_dataset_json(tmp_path):
    dataset = _dataset(tmp_path / "ds", cases=2)
    depth = 100_000
    (dataset / "dataset.json").write_text('{"training": ' + "[" * depth + "]" * depth + "}")
    _assert_one_line(_plan(dataset), dataset / "dataset.json", "not valid JSON")


# ---------------------------------------------------------------------------------------------
# inference: DICOM series with missing or corrupt slices, NaN blocks, 2D inputs, all-zero images


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    dataset = _dataset(root / "ds", cases=4)
    result = _train(root, dataset)
    assert result.exit_code == 0, (result.output, result.exception)
    return root / "runs" / "run" / "last.pt"


def _series(directory: Path) -> Path:
    image = sitk.GetImageFromArray((_image() * 10).astype(np.int16))
    image.SetSpacing((1.0, 1.0, 1.5))
    return write_series(image, directory, modality="MR")


def _infer(trained: Path, inputs: list[Path], out: Path):
    return runner.invoke(app, ["infer", str(trained), *map(str, inputs), "-o", str(out), "--device", "cpu"])


def _missing_slice(tmp_path):
    series = _series(tmp_path / "missing")
    (series / "s1_007.dcm").unlink()
    return series, ("s1_006.dcm and s1_008.dcm", "3 mm apart", "steps 1.5 mm")


def _corrupt_slice(tmp_path):
    series = _series(tmp_path / "corrupt")
    path = series / "s1_005.dcm"
    path.write_bytes(path.read_bytes()[:-200])  # pixel data cut short
    return series, (path, "corrupt DICOM file")


def _nan_block(tmp_path):
    image = _image()
    image[2:6, 2:6, 2:6] = np.nan
    return _nifti(tmp_path / "nan.nii.gz", image), ("NaN or infinite intensities",)


def _two_d_input(tmp_path):
    return _nifti(tmp_path / "flat.nii.gz", _image((16, 16))), ("2D image",)


def _single_slice_input(tmp_path):
    return _nifti(tmp_path / "slice.nii.gz", _image((16, 16, 1))), ("single slice",)


def _huge_input(tmp_path):
    return _huge_header_gz(tmp_path / "huge.nii.gz", zeros=0), ("claims 2048×2048×2048",)


BAD_INPUTS = {"dicom_missing_slice": _missing_slice, "dicom_corrupt_slice": _corrupt_slice,
              "nan_block": _nan_block, "2d": _two_d_input, "single_slice": _single_slice_input,
              "huge_header": _huge_input}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_infer_refuses_unusable_input_and_writes_the_good_one(tmp_path, trained, name):
    bad, words = BAD_INPUTS[name](tmp_path / "in")
    good = _nifti(tmp_path / "in" / "good.nii.gz", _image(seed=3))
    before = _snapshot(tmp_path / "in")
    out = tmp_path / "out"
    result = _infer(trained, [bad, good], out)
    _assert_one_line(result, bad, *words, code=2)  # infer: exit 2 when any input failed
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]
    assert _snapshot(tmp_path / "in") == before


def test_infer_all_zero_image_is_segmented_on_its_grid(tmp_path, trained):
    # Nothing to crop to: the whole extent is kept (an empty crop cannot be resampled).
    zero = _nifti(tmp_path / "in" / "zero.nii.gz", np.zeros((12, 14, 10), np.float32), np.diag([1.5, 1.0, 2.0, 1.0]))
    result = _infer(trained, [zero], tmp_path / "out")
    assert result.exit_code == 0, (result.output, result.exception)
    written = nib.load(str(tmp_path / "out" / "zero.nii.gz"))
    assert written.shape == (12, 14, 10)
    np.testing.assert_allclose(written.affine, np.diag([1.5, 1.0, 2.0, 1.0]))

