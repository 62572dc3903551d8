"""`medseg train --resume PARENT` continues a cross-validation: folds with a checkpoint are resumed
(a finished one says so), folds not yet started are trained, then all are scored."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from medseg.cli import app
from tests.trained_run import ROOT, SAMPLE

TINY = ["train.epochs=1", "train.iterations_per_epoch=2", "train.batch_size=1", "train.patch_size=[16,16,16]",
        "model.base_width=4", "model.max_width=16", "train.workers=0", "train.device=cpu", "train.amp=off"]
runner = CliRunner()


def _train(*args: str):
    return runner.invoke(app, ["train", *args])


def _epochs(run: Path) -> list[int]:
    with open(run / "metrics.csv", encoding="utf-8") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_a_stopped_cross_validation_resumes_its_folds_then_scores_them(tmp_path, monkeypatch):
    dataset = tmp_path / "data"
    shutil.copytree(SAMPLE, dataset)
    settings = [a for s in [*TINY, f"data.dataset={dataset}", f"output_dir={tmp_path / 'runs'}"] for a in ("--set", s)]
    result = _train(str(ROOT / "configs" / "sample.yaml"), "--folds", "0,1", *settings)
    assert result.exit_code == 0, result.output
    [parent] = (tmp_path / "runs").iterdir()
    assert json.loads((parent / "folds.json").read_text(encoding="utf-8"))["folds"] == [0, 1]
    # As if stopped before fold 1 began: its folder and the scores are not there yet.
    shutil.rmtree(parent / "fold1")
    for name in ("crossval.json", "crossval.csv", "postprocessing.json"):
        (parent / name).unlink()
    fold0 = (parent / "fold0" / "best.pt").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the dataset was recorded by its absolute path
    result = _train("--resume", str(parent))
    assert result.exit_code == 0, result.output
    assert "already finished 1 epochs" in " ".join(result.output.split())
    assert (parent / "fold0" / "best.pt").read_bytes() == fold0  # finished: left as it was
    assert _epochs(parent / "fold1") == [1]
    scores = json.loads((parent / "crossval.json").read_text(encoding="utf-8"))
    assert sorted(scores["folds"]) == ["0", "1"] and (parent / "postprocessing.json").is_file()
    # Extended: every fold trains one more epoch, and the scores are those of the longer folds.
    result = _train("--resume", str(parent), "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert _epochs(parent / "fold0") == [1, 2] and _epochs(parent / "fold1") == [1, 2]


def test_resuming_a_cross_validation_refuses_a_fixed_setting(tmp_path):
    parent = tmp_path / "cv"
    parent.mkdir()
    config = {"data": {"dataset": str(SAMPLE)}}
    (parent / "folds.json").write_text(json.dumps({"folds": [0], "config": config}), encoding="utf-8")
    result = _train("--resume", str(parent), "--set", "train.lr=0.5")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.lr" in lines[0] and "Traceback" not in result.output, result.output
    assert sorted(p.name for p in parent.iterdir()) == ["folds.json"]  # nothing trained
