"""Stopping a run at any moment and resuming it: real `medseg train` processes signalled as a
scheduler does (SIGTERM to the whole process group), and in-process runs signalled at exact points
(inside validation, inside a checkpoint write) to check what is saved and that resuming is exact."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import medseg.train as training
from medseg import checkpoint, config
from medseg.cli import app
from medseg.errors import TrainingInterrupted
from tests.conftest import ROOT

runner = CliRunner()

SMALL = [
    "model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]", "train.batch_size=2",
    "train.iterations_per_epoch=3", "validate.every=1", "validate.sw_batch_size=4", f"data.dataset={ROOT / 'sample_data'}",
]
STEPS = 3


def _set(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ---------------------------------------------------------------------------------------------
# real processes, SIGTERM to the process group


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    # Its own session, as a scheduler's job: os.killpg reaches it and its DataLoader worker.
    return subprocess.Popen([sys.executable, "-m", "medseg", "train", *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})


def _signal_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGTERM to the process group as soon as `ready()` (polled) is true."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[0]  # it ended before the moment came
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGTERM)


def _stopped(process: subprocess.Popen, run_dir: Path) -> str:
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    assert "Traceback" not in output and "killed by signal" not in output, output
    # Acknowledged (or, before training installs its handler, ended at once).
    assert "SIGTERM: stopping" in output or "stopped by SIGTERM while starting" in output, output
    if (run_dir / "last.pt").exists():
        state = checkpoint.load(run_dir / "last.pt")  # complete, whatever the moment
        assert -1 <= state["epoch"] and 0 <= state["steps_done"] <= STEPS
        assert state["schedule"]["steps"] == (state["epoch"] + 1) * STEPS + state["steps_done"]
    if "stopped by SIGTERM" in output and "started" not in output and "starting" not in output:
        assert f"continue with: medseg train --resume {run_dir}" in output
    return output


def test_sigterm_to_the_process_group_at_ten_moments_then_resume_from_elsewhere(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    chooser = random.Random(19)
    preview = run_dir / "previews" / "sample_000.png"  # the first validation case's, written during validation
    # Moment 1: inside the first validation (6 validation cases, previews written as it goes).
    first = _start([str(ROOT / "configs" / "sample.yaml"), *_set([
        *SMALL, "train.workers=1", "train.epochs=100", "data.folds=2", f"output_dir={tmp_path}", "run_name=run"])],
        cwd=tmp_path)
    _signal_when(first, preview.exists)
    output = _stopped(first, run_dir)
    assert "in the validation of epoch 1" in " ".join(output.split()), output
    state = checkpoint.load(run_dir / "last.pt")
    assert (state["epoch"], state["steps_done"]) == (-1, STEPS) and state["pending"]["epoch"] == 1
    # Moment 2: during a checkpoint write (as soon as the temporary file of last.pt appears);
    # moments 3-10: at seeded random delays after the start, from setting up to saving (from half a
    # second on: the interpreter's own start-up, before medseg runs, keeps SIGTERM's default).
    moments = [lambda: any(p.name.startswith(".last.pt.") for p in run_dir.iterdir())]
    moments += [(lambda delay: lambda: time.monotonic() - started > delay)(chooser.uniform(0.5, 4.0)) for _ in range(8)]
    for ready in moments:
        started = time.monotonic()
        process = _start(["--resume", str(run_dir)], cwd=tmp_path)
        _signal_when(process, ready)
        _stopped(process, run_dir)
    # Finished from another folder (in this process, through the CLI), extended to end soon: the
    # checkpoint carries on.
    state = checkpoint.load(run_dir / "last.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    finish = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", f"train.epochs={state['epoch'] + 2}"])
    assert finish.exit_code == 0, finish.output
    final = checkpoint.load(run_dir / "last.pt")
    assert final["epoch"] == state["epoch"] + 1 and final["pending"] is None
    assert [row["epoch"] for row in final["history"]] == list(range(1, final["epoch"] + 2))
    assert all("val_dice" in row for row in final["history"])  # the interrupted validations were redone


# ---------------------------------------------------------------------------------------------
# in-process runs, signalled at exact points


def _config(tmp_path: Path, *extra: str):
    return config.load(ROOT / "configs" / "sample.yaml", [*SMALL, "train.workers=0", "train.epochs=2",
                                                          f"output_dir={tmp_path}", "train.device=cpu", *extra])


def test_stop_inside_validation_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    training.train(cfg.replace(run_name="whole"))
    real = training.predict_scores
    calls = {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second validation case of epoch 1
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "predict_scores", signalled)
    with pytest.raises(TrainingInterrupted, match="in the validation of epoch 1"):
        training.train(cfg.replace(run_name="cut"))
    assert calls["n"] == 2  # abandoned before the third case
    monkeypatch.setattr(training, "predict_scores", real)
    cut = checkpoint.load(tmp_path / "cut" / "last.pt")
    assert (cut["epoch"], cut["steps_done"], cut["history"]) == (-1, STEPS, [])
    training.train(cfg, resume=tmp_path / "cut")
    whole = checkpoint.load(tmp_path / "whole" / "last.pt")
    resumed = checkpoint.load(tmp_path / "cut" / "last.pt")
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    for ours, theirs in zip(resumed["history"], whole["history"]):
        assert ours["steps"] == theirs["steps"] and ours["train_loss"] == theirs["train_loss"]
        assert ours["val_dice"] == theirs["val_dice"]


def _write_with_signals(monkeypatch, count: int, on_save: int):
    """torch.save that raises SIGTERM `count` times halfway through checkpoint save number `on_save`."""
    real = torch.save
    saves = {"n": 0}

    def save(state, stream):
        saves["n"] += 1
        if saves["n"] == on_save:
            stream.write(b"PK\x03\x04 a partial checkpoint")
            for _ in range(count):
                signal.raise_signal(signal.SIGTERM)
            stream.seek(0)
            stream.truncate()
        real(state, stream)

    monkeypatch.setattr(torch, "save", save)


def test_a_signal_during_a_checkpoint_write_lets_it_finish(tmp_path, monkeypatch):
    _write_with_signals(monkeypatch, count=1, on_save=1)  # last.pt after epoch 1
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "sample.yaml"), *_set(
        [*SMALL, "train.workers=0", "train.epochs=2", f"output_dir={tmp_path}", "run_name=run"])])
    assert result.exit_code == 130, result.output
    assert "stopping once this checkpoint is written" in result.output
    assert "after epoch 1" in result.output and "Traceback" not in result.output
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["steps_done"]) == (0, 0)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_second_signal_stops_at_once_and_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    _write_with_signals(monkeypatch, count=2, on_save=3)  # last.pt and best.pt of epoch 1, then epoch 2's
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "sample.yaml"), *_set(
        [*SMALL, "train.workers=0", "train.epochs=3", f"output_dir={tmp_path}", "run_name=run"])])
    assert result.exit_code == 130, result.output
    assert "stopped at once by a second SIGTERM" in result.output and "--resume" in result.output
    assert "Traceback" not in result.output
    state = checkpoint.load(tmp_path / "run" / "last.pt")  # epoch 1's, complete
    assert (state["epoch"], state["steps_done"]) == (0, 0)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# resuming: what --set may change, finished runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "sample.yaml"), *_set(
        [*SMALL, "train.workers=0", "train.epochs=1", "validate.every=0", f"output_dir={folder}", "run_name=run"])])
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_resuming_a_finished_run_says_so(finished_run):
    before = (finished_run / "last.pt").read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(finished_run)])
    assert result.exit_code == 0, result.output
    assert f"{finished_run} already finished 1 epochs; extend with --set train.epochs=2" in " ".join(result.output.split())
    assert (finished_run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("override", ["train.lr=0.1", "model.base_width=8", "augment.enabled=false"])
def test_resume_refuses_keys_it_cannot_change(finished_run, override):
    result = runner.invoke(app, ["train", "--resume", str(finished_run), "--set", override])
    assert result.exit_code == 2
    key = override.partition("=")[0]
    assert f"--set {key}: cannot be changed when resuming" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_mistyped_key_on_resume_gets_a_suggestion(finished_run):
    result = runner.invoke(app, ["train", "--resume", str(finished_run), "--set", "train.epoch=3"])
    assert result.exit_code == 2 and "did you mean 'train.epochs'" in result.output


def test_resume_extends_and_points_at_moved_data_from_any_folder(finished_run, tmp_path, monkeypatch):
    saved = checkpoint.load(finished_run / "last.pt")
    assert Path(saved["config"]["data"]["dataset"]).is_absolute()  # recorded by absolute path
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "config.yaml", "preprocessing.json"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    state = checkpoint.load(run / "last.pt")
    state["config"]["data"]["dataset"] = str(tmp_path / "moved")  # the data is no longer there
    checkpoint.save(state, run / "last.pt")
    monkeypatch.chdir(tmp_path)
    moved = runner.invoke(app, ["train", "--resume", "run", "--set", "train.epochs=2"])
    assert moved.exit_code == 2 and "--set data.dataset=" in " ".join(moved.output.split())
    result = runner.invoke(app, ["train", "--resume", "run", *_set(
        ["train.epochs=2", f"data.dataset={ROOT / 'sample_data'}", "validate.every=1"])])
    assert result.exit_code == 0, result.output
    final = checkpoint.load(run / "last.pt")
    assert final["epoch"] == 1 and "val_dice" in final["history"][-1]  # validate.every changed too
    assert final["config"]["train"]["epochs"] == 2


# ---------------------------------------------------------------------------------------------
# messages


def test_workers_are_held_to_the_usable_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "sample.yaml"), *_set(
        [*SMALL, f"train.workers={cores + 3}", "train.epochs=1", "validate.every=0", "train.iterations_per_epoch=1",
         "data.fold=-1", f"output_dir={tmp_path}", "run_name=run"])])
    assert result.exit_code == 0, result.output
    assert f"train.workers={cores + 3} held to {cores}" in " ".join(result.output.split())
    assert checkpoint.load(tmp_path / "run" / "last.pt")["config"]["train"]["workers"] == cores


def test_known_harmless_pytorch_notes_are_hidden_and_nothing_else(caplog):
    import logging

    from medseg.quiet import hide_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hide_known_warnings()
        warnings.warn("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction. "
                      "Cut an issue to PyTorch if this is an\nimportant use case.", UserWarning)
        warnings.warn("Online softmax is something else", UserWarning)
    assert [str(w.message) for w in seen] == ["Online softmax is something else"]
    logger = logging.getLogger("torch._higher_order_ops.wrap")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("\nDetected that context_fn is passed to torch.utils.checkpoint under torch.compile.\n"
                       "Please make sure the checkpointed region does not contain in-place ops (e.g. torch.relu_).\n")
        logger.warning("another note")
    assert [r.getMessage() for r in caplog.records] == ["another note"]


@pytest.mark.parametrize("command", ["train", "plan", "memory", "infer", "evaluate"])
def test_boolean_options_show_as_flags_in_help(command):
    import click
    import typer.main

    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output
    options = typer.main.get_command(app).commands[command].params
    for option in options:
        if isinstance(option, click.Option) and option.is_flag:
            assert option.opts[0] in result.output  # listed, as the bare flag


def test_sigterm_to_the_process_group_of_infer_keeps_only_whole_outputs(tmp_path_factory, tmp_path):
    # Every command, not only train: SIGTERM ends it as Ctrl-C does (exit 130, one line), and what
    # it wrote before is complete while nothing half-written is left.
    import nibabel as nib

    from tests.trained_run import SAMPLE, trained_run

    run = trained_run(tmp_path_factory)
    out = tmp_path / "predictions"
    process = subprocess.Popen([sys.executable, "-m", "medseg", "infer", str(run / "best.pt"), str(SAMPLE / "imagesTr"),
                                "-o", str(out), "--mirror", "--device", "cpu"], cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
    _signal_when(process, lambda: out.is_dir() and any(p.name.endswith(".nii.gz") for p in out.iterdir()))
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output, output
    written = sorted(out.iterdir())
    assert written and all(p.name.endswith(".nii.gz") and not p.name.startswith(".") for p in written), written
    for path in written:  # each one whole, on its input's grid
        source = nib.load(SAMPLE / "imagesTr" / path.name)
        assert nib.load(path).get_fdata().shape == source.shape[:3]
