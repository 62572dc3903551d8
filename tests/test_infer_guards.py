"""`medseg infer` refuses, per input and in one line, two inputs that would write one output name
(whatever their formats) and an input too large once resampled to the model's spacing; the good
inputs given with them are still written.

The size cases run in a subprocess under an address-space limit: without the guard, the
resampling's tens of gigabytes are refused by the limit at once instead of being allocated."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medseg import checkpoint
from medseg.cli import app
from medseg.data.io import MAX_VOXELS
from tests.trained_run import SAMPLE, trained_run

runner = CliRunner()
ADDRESS_SPACE = 8 << 30  # bytes: far below what the oversized inputs would ask for


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def _sample(index: int) -> Path:
    return SAMPLE / "imagesTr" / f"sample_{index:03d}.nii.gz"


def _infer(run: Path, *args: str):
    return runner.invoke(app, ["infer", str(run), *args, "--device", "cpu"])


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _run_limited(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # UTF-8 output whatever the locale: the test's own script prints medseg's message (with its "×").
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, encoding="utf-8", errors="replace",
                          preexec_fn=_limited, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


@pytest.mark.parametrize("given", ["files", "folder"])
def test_same_stem_in_two_formats_refuses_the_second(run, tmp_path, given):
    folder = tmp_path / "stem"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(_sample(0))), str(folder / "case.mha"))
    sitk.WriteImage(sitk.ReadImage(str(_sample(1))), str(folder / "case.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(_sample(2))), str(folder / "other.nrrd"))
    inputs = ([str(folder / "case.mha"), str(folder / "case.nrrd"), str(folder / "other.nrrd")]
              if given == "files" else [str(folder)])
    out = tmp_path / "out"
    result = _infer(run, *inputs, "-o", str(out))
    assert result.exit_code == 2, result.output
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert str(folder / "case.nrrd") in errors[0] and "already the prediction of" in errors[0]
    assert str(folder / "case.mha") in errors[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["case.nii.gz", "other.nii.gz"]
    # The written case.nii.gz is case.mha's prediction (sample 0's grid), not case.nrrd's.
    assert nib.load(out / "case.nii.gz").shape == nib.load(_sample(0)).shape


def test_plain_and_channel_file_of_one_name_are_both_seen(run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "case.nii.gz").write_bytes(_sample(0).read_bytes())
    (folder / "case_0000.nii.gz").write_bytes(_sample(1).read_bytes())
    out = tmp_path / "out"
    result = _infer(run, str(folder), "-o", str(out))
    assert result.exit_code == 2, result.output
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and "already the prediction of" in errors[0], result.stderr
    assert [p.name for p in out.iterdir()] == ["case.nii.gz"]


def _oversized(path: Path) -> Path:
    """The sample with voxels 35 times larger along each axis: a small file, billions of voxels at
    the model's spacing."""
    source = nib.load(_sample(0))
    affine = source.affine.copy()
    affine[:3, :3] *= 35
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj).astype(np.float32), affine), path)
    return path


def test_input_too_large_at_the_model_spacing_is_refused(run, tmp_path):
    big = _oversized(tmp_path / "vox35.nii.gz")
    out = tmp_path / "out"
    result = _run_limited(["-m", "medseg", "infer", str(run), str(big), str(_sample(1)), "-o", str(out),
                           "--device", "cpu"], tmp_path)
    assert result.returncode == 2, result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert str(big) in errors[0] and "more than medseg preprocesses per case" in errors[0]
    assert f"{MAX_VOXELS:,}" in errors[0]
    assert "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["sample_001.nii.gz"]


def test_model_spacing_far_finer_than_the_input_is_refused(run, tmp_path):
    state = checkpoint.load(run / "best.pt")
    state["preprocessing"]["spacing"] = [1e-6, 1e-6, 1e-6]
    fine = tmp_path / "fine.pt"
    checkpoint.save(state, fine)
    out = tmp_path / "out"
    result = _run_limited(["-m", "medseg", "infer", str(fine), str(_sample(0)), "-o", str(out), "--device", "cpu"],
                          tmp_path)
    assert result.returncode == 2, result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert str(_sample(0)) in errors[0] and "more than medseg preprocesses per case" in errors[0]
    assert "Storage size" not in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_python_api_refuses_an_array_too_large_at_the_model_spacing(run, tmp_path):
    code = (
        "import sys, numpy as np, nibabel as nib\n"
        "from medseg import Segmenter\n"
        "from medseg.errors import DataError\n"
        "source = nib.load(sys.argv[2]); affine = source.affine.copy(); affine[:3, :3] *= 35\n"
        "try:\n"
        "    Segmenter.from_checkpoint(sys.argv[1], device='cpu').predict(np.asarray(source.dataobj), affine)\n"
        "except DataError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = _run_limited(["-c", code, str(run), str(_sample(0))], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "more than medseg preprocesses per case" in result.stdout, result.stdout
