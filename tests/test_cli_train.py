"""End to end: `medseg train` through the real CLI on the bundled sample data."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal

import pytest
import torch
import yaml
from typer.testing import CliRunner

import medseg.step as step_module
import medseg.train as training
from medseg import checkpoint, config
from medseg.cli import app
from medseg.errors import TrainingInterrupted
from tests.conftest import HIPPOCAMPUS, ROOT

runner = CliRunner()

TINY = [
    "model.base_width=4", "model.max_width=16", "train.epochs=2", "train.iterations_per_epoch=3",
    "train.batch_size=1", "train.patch_size=[16,16,16]", "train.workers=0", "validate.every=1",
    "validate.sw_batch_size=4",
]


def _train(tmp_path, *extra, dataset=str(ROOT / "sample_data"), name="run"):
    args = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in [*TINY, f"data.dataset={dataset}", f"output_dir={tmp_path}", f"run_name={name}", *extra]:
        args += ["--set", item]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """The run directory of `_train` with the TINY settings alone, trained once for the tests that
    read it (or copy it before they change it)."""
    folder = tmp_path_factory.mktemp("cli-train")
    result = _train(folder)
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_train_on_sample_data_writes_run_directory(sample_run):
    run_dir = sample_run
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.csv", "preprocessing.json"):
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert resolved["train"]["patch_size"] == [16, 16, 16]
    assert resolved["data"]["dataset"].endswith("sample_data")
    rows = list(csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert 0.0 <= float(rows[-1]["val_dice"]) <= 1.0
    assert {"dice_core", "dice_shell"} <= set(rows[-1])
    state = checkpoint.load(run_dir / "last.pt")
    assert state["epoch"] == 1
    assert state["preprocessing"]["num_classes"] == 3
    assert json.loads((run_dir / "preprocessing.json").read_text(encoding="utf-8"))["normalization"] == "zscore"


def test_time_limited_run_on_the_device_sampler(tmp_path):
    # Batches drawn by the device sampler (here the CPU is the device); a time limit far shorter
    # than the 200 epochs asked for ends training early, with a final validation, and the learning
    # rate has decayed to zero by then because its schedule follows the time.
    result = _train(tmp_path, "data.sampler=device", "train.epochs=200", "train.max_minutes=0.1",
                    "validate.every=0")
    assert result.exit_code == 0, result.output
    assert "train.max_minutes=0.1 reached" in result.output
    run_dir = tmp_path / "run"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8")))
    assert 1 <= len(rows) < 200
    assert 0.0 <= float(rows[-1]["val_dice"]) <= 1.0
    assert all(r["val_dice"] == "" for r in rows[:-1])  # validated once, at the end
    assert float(rows[-1]["lr"]) == 0.0 and float(rows[0]["lr"]) > 0.0
    assert float(rows[-1]["elapsed_minutes"]) >= 0.1
    state = checkpoint.load(run_dir / "last.pt")
    assert state["schedule"]["seconds"] >= 6.0
    assert state["sampler"][0] is not None  # the sampler's position, for an exact resume


def test_resume_continues_to_more_epochs(sample_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sample_run, run_dir)
    # Extend the finished run by editing its resolved config, as a user would to train longer.
    state = checkpoint.load(run_dir / "last.pt")
    state["config"]["train"]["epochs"] = 3
    checkpoint.save(state, run_dir / "last.pt")
    result = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert checkpoint.load(run_dir / "last.pt")["epoch"] == 2


def test_resume_keeps_the_runs_own_split(tmp_path):
    # The checkpoint names the cases the run trains and validates on; a resume uses those, and a
    # dataset that lost one of them is a one-line error naming it.
    dataset = tmp_path / "data"
    shutil.copytree(ROOT / "sample_data", dataset)
    assert _train(tmp_path, dataset=str(dataset)).exit_code == 0
    run_dir = tmp_path / "run"
    state = checkpoint.load(run_dir / "last.pt")
    assert len(state["split"]["train"]) == 9 and len(state["split"]["validation"]) == 3
    assert not set(state["split"]["train"]) & set(state["split"]["validation"])
    state["config"]["train"]["epochs"] = 3
    checkpoint.save(state, run_dir / "last.pt")
    gone = state["split"]["validation"][0]
    for path in dataset.rglob(f"{gone}*"):
        path.unlink()
    description = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    description["training"] = [t for t in description["training"] if gone not in t["image"]]
    description["numTraining"] = len(description["training"])
    (dataset / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    result = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 2
    assert gone in result.output and "no longer has" in result.output and "Traceback" not in result.output


def test_training_is_reproducible_on_cpu(sample_run, tmp_path):
    # The same settings trained again, in another folder, later in the session.
    assert _train(tmp_path, name="b").exit_code == 0
    first = checkpoint.load(sample_run / "last.pt")["model"]
    second = checkpoint.load(tmp_path / "b" / "last.pt")["model"]
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_bf16_and_checkpointing_train(tmp_path, monkeypatch):
    # The network's first stage records, in training, the autocast dtype it runs under and how often
    # it runs: with stage checkpointing once in the forward and once more, recomputed, in backward.
    seen = []
    real_build = training.build_model

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def watch(module, inputs):
            if module.training:
                enabled = torch.is_autocast_enabled("cpu")
                seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
        model.encoder[0].register_forward_pre_hook(watch)
        return model

    monkeypatch.setattr(training, "build_model", build_and_watch)
    # Training is what is watched: all cases train (data.fold=-1), no validation after it.
    result = _train(tmp_path, "train.amp=bf16", "model.checkpointing=stage", "train.epochs=1", "data.fold=-1")
    assert result.exit_code == 0, result.output
    assert "amp bf16" in result.output and "checkpointing stage" in result.output
    assert seen == [torch.bfloat16] * (2 * 3)  # 3 steps (batch 1), each stage run twice
    saved = checkpoint.load(tmp_path / "run" / "last.pt")["config"]
    assert saved["train"]["amp"] == "bf16" and saved["model"]["checkpointing"] == "stage"
    # Without checkpointing the stage runs once per step: the count above is the recomputation.
    seen.clear()
    assert _train(tmp_path, "train.amp=bf16", "train.epochs=1", "data.fold=-1", name="plain").exit_code == 0
    assert seen == [torch.bfloat16] * 3


def test_dataloader_workers_give_the_batches_of_the_main_process(tmp_path):
    # The CPU sampler in a DataLoader worker process renders the batches the training process
    # renders itself: the same trained weights.
    assert _train(tmp_path, "train.workers=1", "train.epochs=1", name="worker").exit_code == 0
    assert _train(tmp_path, "train.workers=0", "train.epochs=1", name="main").exit_code == 0
    with_worker = checkpoint.load(tmp_path / "worker" / "last.pt")
    in_process = checkpoint.load(tmp_path / "main" / "last.pt")
    assert with_worker["config"]["train"]["workers"] == 1
    for key, value in in_process["model"].items():
        torch.testing.assert_close(with_worker["model"][key], value, rtol=0, atol=0, msg=key)


def test_best_checkpoint_is_the_epoch_with_the_best_validation_dice(tmp_path, monkeypatch):
    scores = iter([0.2, 0.9, 0.5])  # mean validation Dice of epochs 1, 2, 3

    def scripted_validation(*args, **kwargs):
        value = next(scores)
        return training.Validation(dice=[value, value], loss=1.0 - value)  # core and shell

    monkeypatch.setattr(training, "validate", scripted_validation)
    assert _train(tmp_path, "train.epochs=3").exit_code == 0
    best = checkpoint.load(tmp_path / "run" / "best.pt")
    last = checkpoint.load(tmp_path / "run" / "last.pt")
    assert best["epoch"] == 1 and last["epoch"] == 2
    assert [row["val_dice"] for row in best["history"]] == [0.2, 0.9]
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


@pytest.mark.parametrize("sampler, workers", [("device", 0), ("workers", 0), ("workers", 1)])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, sampler, workers):
    # SIGTERM during step 4 (epoch 2, step 1 of 3): the run saves and stops after that step; the
    # resumed run takes the 2 steps left. Its weights are those of a run never interrupted, exactly
    # (the sampler's position and the random generators are saved), with or without worker processes.
    # Training alone is compared: all cases train (data.fold=-1), no validation at the end.
    cfg = config.load(ROOT / "configs" / "sample.yaml", [
        *TINY, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", f"data.sampler={sampler}",
        f"train.workers={workers}", "validate.every=0", "train.device=cpu", "data.fold=-1"])
    training.train(cfg.replace(run_name="whole"))
    real_step = step_module.train_step
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs):
        calls["n"] += 1
        result = real_step(*args, **kwargs)
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(step_module, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at epoch 2, step 1"):
        training.train(cfg.replace(run_name="cut"))
    monkeypatch.setattr(step_module, "train_step", real_step)
    cut = checkpoint.load(tmp_path / "cut" / "last.pt")
    assert (cut["epoch"], cut["steps_done"]) == (0, 1)
    training.train(cfg, resume=tmp_path / "cut")
    whole = checkpoint.load(tmp_path / "whole" / "last.pt")
    resumed = checkpoint.load(tmp_path / "cut" / "last.pt")
    assert resumed["schedule"]["steps"] == whole["schedule"]["steps"] == 6
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "override, expected",
    [("train.batchsize=2", "train.batchsize"), ("train.epochs=many", "train.epochs"),
     ("model.checkpointing=sometimes", "model.checkpointing")],
)
def test_bad_config_is_one_line_error(tmp_path, override, expected):
    result = _train(tmp_path, override)
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output


def test_missing_dataset_is_one_line_error(tmp_path):
    result = _train(tmp_path, dataset=str(tmp_path / "nowhere"))
    assert result.exit_code == 2
    assert "nowhere" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_validation_with_test_time_mirroring(tmp_path):
    # Windows without overlap: the 8 flips of each window are what is checked, not how many windows.
    result = _train(tmp_path, "validate.mirror=true", "validate.overlap=0", "train.epochs=1")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv", encoding="utf-8")))
    assert 0.0 <= float(rows[-1]["val_dice"]) <= 1.0


def test_train_asks_for_expandable_allocator_segments_and_keeps_the_users_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    _train(tmp_path, dataset=str(tmp_path / "nowhere"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    _train(tmp_path, dataset=str(tmp_path / "nowhere"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="shared hippocampus data not present")
def test_trains_on_four_hippocampus_cases(tmp_path):
    subset = tmp_path / "hippo4"
    (subset / "imagesTr").mkdir(parents=True)
    (subset / "labelsTr").mkdir()
    description = json.loads((HIPPOCAMPUS / "dataset.json").read_text(encoding="utf-8"))
    description["training"] = description["training"][:4]
    for entry in description["training"]:
        for key in ("image", "label"):
            (subset / entry[key]).symlink_to(HIPPOCAMPUS / entry[key])
    (subset / "dataset.json").write_text(json.dumps(description))
    result = _train(tmp_path, "data.folds=2", "train.patch_size=[24,32,24]", dataset=str(subset))
    assert result.exit_code == 0, result.output
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["preprocessing"]["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert state["preprocessing"]["spacing"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)
