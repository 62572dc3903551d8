"""The caching allocator's growing segments: `medseg infer` and the Python API ask for them, as
`medseg train` does (tests/test_cli_train.py), and keep a setting of the user's own."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from medseg.cli import app
from medseg.device import GROWING_SEGMENTS
from tests.trained_run import SAMPLE, trained_run

VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"


def _infer(run, out) -> None:
    image = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    result = CliRunner().invoke(app, ["infer", str(run / "best.pt"), str(image), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_infer_asks_for_growing_segments_and_keeps_the_users_setting(tmp_path, tmp_path_factory, monkeypatch):
    run = trained_run(tmp_path_factory)
    monkeypatch.delenv(VARIABLE, raising=False)
    _infer(run, tmp_path / "a")
    assert os.environ[VARIABLE] == GROWING_SEGMENTS
    monkeypatch.setenv(VARIABLE, "max_split_size_mb:128")
    _infer(run, tmp_path / "b")
    assert os.environ[VARIABLE] == "max_split_size_mb:128"


def test_segmenter_asks_for_growing_segments(tmp_path_factory, monkeypatch):
    from medseg import Segmenter

    run = trained_run(tmp_path_factory)
    monkeypatch.delenv(VARIABLE, raising=False)
    Segmenter.from_checkpoint(run, device="cpu")
    assert os.environ[VARIABLE] == GROWING_SEGMENTS
