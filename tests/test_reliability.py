"""Crash safety, numerical faults and checkpoint safety of training, through real processes."""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg import checkpoint
from medseg.cli import app
from medseg.errors import CheckpointError, DataError
from tests.conftest import ROOT

runner = CliRunner()

SLOW = [
    "model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]", "train.batch_size=1",
    "train.workers=0", "validate.every=0",
]


RUN_FILES = {"last.pt", "best.pt", "metrics.csv", "config.yaml", "preprocessing.json", "train.log", "progress.png", ".lock"}


def _command(tmp_path: Path, *extra: str, name: str = "run") -> list[str]:
    args = [sys.executable, "-m", "medseg", "train", str(ROOT / "configs" / "sample.yaml")]
    for item in [*SLOW, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", f"run_name={name}", *extra]:
        args += ["--set", item]
    return args


def _epochs(run_dir: Path) -> list[int]:
    return [int(row["epoch"]) for row in csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8"))]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_at_random_moments_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    chooser = random.Random(7)
    command = _command(tmp_path, "train.epochs=4", "train.iterations_per_epoch=8")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    for kill in range(3):
        _wait_for(run_dir / "last.pt", process)
        time.sleep(chooser.uniform(0.0, 1.5))
        if process.poll() is None:
            process.kill()  # SIGKILL: no handler runs, nothing is flushed
        process.wait(timeout=60)
        # Whatever the moment, the checkpoint on disk is complete and loadable.
        checkpoint.load(run_dir / "last.pt")
        # A write cut short leaves at most a hidden temporary file (never read), not a partial file
        # under a name medseg reads.
        leftovers = [p.name for p in run_dir.iterdir() if p.is_file() and p.name not in RUN_FILES]
        assert all(re.fullmatch(r"\.(last\.pt|best\.pt|metrics\.csv|progress\.png)\..+\.tmp(\.png)?", name) for name in leftovers), leftovers
        if kill < 2:  # resumed in a new process, to be killed in turn
            process = subprocess.Popen([sys.executable, "-m", "medseg", "train", "--resume", str(run_dir)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    # After the last kill, resumed to the end (in this process, through the CLI).
    result = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert _epochs(run_dir)[-1] == 4 and sorted(set(_epochs(run_dir))) == [1, 2, 3, 4]
    final = checkpoint.load(run_dir / "last.pt")
    assert final["epoch"] == 3


def test_failed_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}, "config": {}}, path)
    good = path.read_bytes()

    def broken_save(state, stream):
        stream.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DataError, match="last.pt: cannot write .disk full"):  # names the file, no traceback
        checkpoint.save({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_corrupted_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    checkpoint.save({"model": {"w": torch.ones(1000)}, "config": {}}, path)
    path.write_bytes(path.read_bytes()[:300])
    result = runner.invoke(app, ["train", "--resume", str(path.parent)])
    assert result.exit_code == 2
    assert "last.pt" in result.output and "corrupted" in result.output
    assert "Traceback" not in result.output


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "extra": _Payload(marker)}, evil)
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    result = runner.invoke(app, ["infer", str(evil), str(image), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "evil.pt" in result.output and "refused" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        checkpoint.load(evil)
    assert not marker.exists()
    # The same file runs its payload under a plain unpickler: the test's payload is real.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_non_finite_losses_stop_training_and_keep_last_checkpoint(tmp_path, monkeypatch):
    import medseg.step as step_module
    import medseg.train as training

    real_step = step_module.train_step
    calls = {"n": 0}

    def poisoned_step(model, image, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # epoch 1 (4 steps) is healthy, then every loss is NaN
            image = image * float("nan")
        return real_step(model, image, *args, **kwargs)

    monkeypatch.setattr(step_module, "train_step", poisoned_step)
    args = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in [*SLOW, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", "run_name=run",
                 "train.epochs=3", "train.iterations_per_epoch=4", "train.max_nonfinite_steps=3"]:
        args += ["--set", item]
    first = {}

    def remember(state, path, _save=checkpoint.save):
        first.setdefault(path.name, state["model"]["encoder.0.0.0.weight"].clone())
        _save(state, path)

    monkeypatch.setattr(training.checkpoint, "save", remember)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "diverged" in result.output and "3 consecutive" in result.output
    assert "Traceback" not in result.output
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 0
    weights = state["model"]["encoder.0.0.0.weight"]
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, first["last.pt"])


def test_out_of_memory_falls_back_and_training_goes_on(tmp_path, monkeypatch):
    from medseg.models.unet import UNet3D

    real_forward = UNet3D.forward
    seen = []

    def forward_that_runs_out(self, image):
        if self.training:
            seen.append((self.checkpointing, image.shape[0]))
        # Pretend the GPU is too small for two samples at once without checkpointing.
        if self.training and (self.checkpointing == "off" or image.shape[0] > 1):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(self, image)

    monkeypatch.setattr(UNet3D, "forward", forward_that_runs_out)
    args = ["train", str(ROOT / "configs" / "sample.yaml")]
    # Training is what runs out of memory: all cases train (data.fold=-1), no validation after it.
    for item in [*SLOW, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", "run_name=run",
                 "train.epochs=2", "train.iterations_per_epoch=3", "train.batch_size=2", "data.fold=-1"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # Rich wraps long lines
    assert "checkpointing switched to selective" in output
    assert "checkpointing switched to stage" in output
    assert "2 micro-batches of 1" in output
    assert _epochs(tmp_path / "run") == [1, 2]
    # After the two fallbacks every training forward ran with checkpointing on, one sample at a time.
    assert seen[-1] == ("stage", 1)


def test_out_of_memory_with_nothing_left_is_a_one_line_error(tmp_path, monkeypatch):
    from medseg.models.unet import UNet3D

    def always_out_of_memory(self, image):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(UNet3D, "forward", always_out_of_memory)
    args = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in [*SLOW, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", "run_name=run",
                 "train.epochs=1", "train.iterations_per_epoch=2"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "out of memory even with checkpointing" in result.output and "[16, 16, 16]" in result.output
    assert "Traceback" not in result.output


def _signal_a_forked_child(number: int, lives: float) -> int:
    """Fork a child that says it runs (a signal before that would be dropped by fork), then lives
    `lives` seconds; send it signal `number`; its wait status."""
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(ready_write, b"1")
        time.sleep(lives)
        os._exit(0)
    assert os.read(ready_read, 1) == b"1"
    os.kill(child, number)
    return os.waitpid(child, 0)[1]


def test_a_process_forked_during_training_ignores_sigint_and_ends_on_sigterm():
    # Processes forked while the stop handler is installed (the pool that reads and caches cases)
    # inherit it: there Ctrl-C, which a terminal sends to the whole process group, is ignored (the
    # training process shuts its children down), and SIGTERM still ends the process (a pool's
    # terminate() at exit waits for that).
    from medseg.stopping import StopRequests

    with StopRequests() as stop, stop.during("training"):
        status = _signal_a_forked_child(signal.SIGINT, lives=0.5)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # outlived the Ctrl-C
        status = _signal_a_forked_child(signal.SIGTERM, lives=60)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert not stop()  # the parent was not asked to stop
        signal.raise_signal(signal.SIGTERM)  # the parent itself: a stop request, not the end
        assert stop() and stop.reason == "SIGTERM"


def test_a_stop_while_starting_is_not_swallowed_by_a_library_and_spares_forked_children():
    # Raised from the handler wherever the program is: a library's `except Exception` (MONAI's
    # optional imports have one) must not swallow it, and a child forked meanwhile (a reading
    # pool) dies quietly of SIGTERM instead of raising it inside its own start-up.
    from medseg.errors import StopSignal
    from medseg.stopping import stopping_at_once

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopSignal, match="SIGTERM while starting"), stopping_at_once("while starting"):
        status = _signal_a_forked_child(signal.SIGTERM, lives=60)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        try:
            signal.raise_signal(signal.SIGTERM)
        except Exception:  # what a library does around an optional import
            pass
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handling is back


def test_a_stop_swallowed_by_a_library_is_raised_again():
    # A library's `except BaseException` (or Python itself, in a fork hook or a finaliser) can
    # swallow the stop: it is raised again until it has ended the block.
    from medseg.errors import StopSignal
    from medseg.stopping import stopping_at_once

    with pytest.raises(StopSignal, match="SIGTERM while starting"), stopping_at_once("while starting"):
        try:
            signal.raise_signal(signal.SIGTERM)
        except BaseException:
            pass
        time.sleep(10)  # the stop, raised again, ends this wait


# A module whose import is signalled halfway and that, as some libraries do around an optional
# part, catches everything there: a stop raised inside it would be swallowed (the signal lost, the
# command going on) or leave the module half-imported.
SIGNALLED_MODULE = """
import os, signal
try:
    os.kill(os.getpid(), signal.SIGTERM)
    halfway = True
except BaseException:
    halfway = False
complete = True
"""


@pytest.mark.parametrize("handling", ["at once", "training's setup"])
def test_a_stop_during_an_import_waits_for_the_import_and_is_not_lost(tmp_path, monkeypatch, handling):
    from medseg.errors import StopSignal
    from medseg.stopping import StopRequests, stopping_at_once

    name = "signalled_" + handling.replace(" ", "_").replace("'", "")
    (tmp_path / f"{name}.py").write_text(SIGNALLED_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    handler = stopping_at_once("while starting") if handling == "at once" else StopRequests(notify=lambda text: None)
    with pytest.raises(StopSignal, match="stopped by SIGTERM"), handler:
        module = __import__(name)
        time.sleep(10)  # the stop ends this wait, right after the import
    assert module.halfway and module.complete and sys.modules[name] is module


# A module whose import is signalled halfway; what it defines after that is what the
# acknowledgement of the stop request needs (as rich's console imports its emoji codes when it first
# prints).
ACKNOWLEDGEMENT_NEEDS = """
import os, signal
os.kill(os.getpid(), signal.SIGTERM)
WORDS = {"stopping": True}
"""


def test_a_stop_request_during_an_import_is_taken_after_it(tmp_path, monkeypatch):
    # Taken inside the import, the request's acknowledgement would find the module half-imported
    # (and its error would end the import, and the run, as an internal error).
    import importlib

    from medseg.stopping import StopRequests

    name = "acknowledgement_needs"
    (tmp_path / f"{name}.py").write_text(ACKNOWLEDGEMENT_NEEDS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    said = []
    with StopRequests(notify=lambda text: said.append((text, importlib.import_module(name).WORDS))) as stop:
        with stop.during("training"):
            module = __import__(name)
            deadline = time.monotonic() + 10
            while not stop() and time.monotonic() < deadline:
                time.sleep(0.01)
    assert said == [("SIGTERM: stopping after this step... (again to stop at once)", {"stopping": True})]
    assert stop.reason == "SIGTERM" and sys.modules[name] is module


# A generator that Python finalises while the stop unwinds its caller, and that takes longer to
# close than the stop takes to be delivered again: raised again there, the stop is an exception
# Python ignores, and prints ("Exception ignored in ...", with a traceback).
FINALISED_WHILE_STOPPING = """
import signal, time
from medseg.errors import StopSignal
from medseg.stopping import stopping_at_once

def slow_to_close():
    try:
        yield 1
    finally:
        time.sleep(0.3)

def consume():
    items = slow_to_close()
    next(items)
    try:
        signal.raise_signal(signal.SIGTERM)
    finally:
        del items

try:
    with stopping_at_once("while starting"):
        consume()
except StopSignal as stop:
    print("stopped:", stop)
"""


def test_a_stop_raised_again_where_python_ignores_exceptions_prints_nothing():
    # In a process of its own: pytest catches what Python ignores before it would print.
    done = subprocess.run([sys.executable, "-c", FINALISED_WHILE_STOPPING], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stopped: stopped by SIGTERM while starting" and done.stderr == "", done.stderr


def _read_slowly(item: int) -> int:
    time.sleep(0.2)
    return item


def test_a_reading_process_killed_by_sigterm_is_an_error_not_a_hang():
    # SIGTERM to the whole process group reaches the processes that read the cases; one that dies
    # must end the reading with an error (the pool never waits for it).
    from medseg.data.io import map_cases

    def kill_one_child(item: int) -> int:
        if item == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # in the child: the default action ends it
        return _read_slowly(item)

    with pytest.raises(MemoryError, match="a process reading the cases died"):
        map_cases(kill_one_child, list(range(12)), workers=2)
    assert map_cases(_read_slowly, list(range(6)), workers=2) == list(range(6))
