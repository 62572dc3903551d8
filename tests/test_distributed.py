"""Two processes (gloo on CPU) train together through torchrun, as on a multi-GPU node."""

from __future__ import annotations

import csv
import re
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from medseg import checkpoint
from medseg.cli import app
from tests.conftest import ROOT

# The processes print "×": their output is UTF-8 whatever the locale of the machine running the tests.
UTF8 = {**os.environ, "PYTHONIOENCODING": "utf-8"}

TINY = [
    "model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]", "train.batch_size=2",
    "train.workers=0", "train.epochs=2", "train.iterations_per_epoch=3", "validate.every=1",
    "train.device=cpu",
]

# Runs medseg's training in each process and then saves that process's copy of the network, so
# the test can compare them: DistributedDataParallel must keep them identical.
HARNESS = textwrap.dedent('''
    import sys
    from medseg.monai_import import skip_monai_extras
    skip_monai_extras()  # as the `medseg` command does
    import torch
    import torch.distributed as dist
    import medseg.train as training
    from medseg import config

    kept = {}
    class Recording(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            kept["module"] = module

    torch.nn.parallel.DistributedDataParallel = Recording
    out, overrides = sys.argv[1], sys.argv[2:]
    training.train(config.load(None, overrides))
    rank = int(__import__("os").environ["RANK"])
    torch.save(kept["module"].state_dict(), f"{out}/rank{rank}.pt")
''')


def _overrides(tmp_path, name="run"):
    return [*TINY, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", f"run_name={name}"]


def test_two_processes_train_identically_and_write_once(tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(harness), str(tmp_path), *_overrides(tmp_path)]
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=ROOT, env=UTF8)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir() if p.is_file()) == [
        ".lock", "best.pt", "config.yaml", "last.pt", "metrics.csv", "preprocessing.json", "progress.png", "train.log"]
    # One process writes the log: each epoch's summary appears once.
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert len(re.findall(r"^.*epoch 2\b.*loss", log, re.M)) == 1, log
    assert [r["epoch"] for r in csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8"))] == ["1", "2"]
    # The saved network is the one both processes trained.
    saved = checkpoint.load(run_dir / "last.pt")["model"]
    for key in first:
        torch.testing.assert_close(saved[key], first[key], rtol=0, atol=0, msg=key)

    # A run started on two processes resumes on one (and would on any number): here, in this
    # process, through the CLI.
    state = checkpoint.load(run_dir / "last.pt")
    state["config"]["train"]["epochs"] = 3
    checkpoint.save(state, run_dir / "last.pt")
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert [r["epoch"] for r in csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8"))] == ["1", "2", "3"]


def test_gpus_option_starts_torchrun(tmp_path):
    # One epoch (and its validation): the two processes training together are the test above's.
    command = [sys.executable, "-m", "medseg", "train", str(ROOT / "configs" / "sample.yaml"), "--gpus", "2"]
    for item in [*_overrides(tmp_path), "train.epochs=1"]:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=ROOT, env=UTF8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "×2" in result.stdout
    assert checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 0


def test_batch_not_divisible_by_processes_is_one_line_error(tmp_path):
    command = [sys.executable, "-m", "medseg", "train", str(ROOT / "configs" / "sample.yaml"), "--gpus", "2"]
    for item in [*_overrides(tmp_path), "train.batch_size=3"]:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=ROOT, env=UTF8)
    assert result.returncode == 2, result.stderr
    assert "'train.batch_size' 3 must be divisible by the 2 processes" in result.stderr
    # Said before torchrun starts any process: nothing else printed, no run folder.
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists(), result.stderr


# One process (rank 1) runs out of memory without checkpointing; the other would not.
OOM_HARNESS = textwrap.dedent('''
    import os
    import sys
    from medseg.monai_import import skip_monai_extras
    skip_monai_extras()  # as the `medseg` command does
    import torch
    import medseg.train as training
    from medseg import config
    from medseg.models.unet import UNet3D

    real_forward = UNet3D.forward

    def forward(self, image):
        if os.environ["RANK"] == "1" and self.training and self.checkpointing == "off":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(self, image)

    UNet3D.forward = forward
    training.train(config.load(None, sys.argv[2:]))
''')


def test_out_of_memory_on_one_process_changes_every_process(tmp_path):
    harness = tmp_path / "harness.py"
    harness.write_text(OOM_HARNESS, encoding="utf-8")
    # The first step is what runs out of memory: all cases train (data.fold=-1), no validation after it.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(harness), str(tmp_path), *_overrides(tmp_path), "train.epochs=1", "data.fold=-1"]
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=600,
                            cwd=ROOT, env=UTF8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("out of memory on at least one GPU in the first step: activation checkpointing switched to "
            "selective on every GPU") in " ".join(result.stdout.split())  # (Rich wraps long lines)
    assert checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 0


def test_the_batch_must_split_evenly_over_the_processes():
    # The rule the command checks before torchrun starts and each process checks again (a resumed
    # run's batch, read from its checkpoint there).
    from medseg.distributed import check_batch
    from medseg.errors import ConfigError

    check_batch(4, 2)
    check_batch(3, 1)
    with pytest.raises(ConfigError, match="'train.batch_size' 6 must be divisible by the 4 processes"):
        check_batch(6, 4)
