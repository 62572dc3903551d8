"""medseg.memory.run: the whole run's GPU memory (step, batch rendered ahead, resident volumes,
validation, overhead) and the fit that keeps it within a budget; resenc through the estimator."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from medseg import checkpoint, config, memory
from medseg.cli import app
from medseg.memory.estimator import simulate_step
from medseg.memory.run import RunData, next_batch_bytes, validation_buffer_bytes
from tests.conftest import ROOT

MiB = 2**20
CLASSES = 3
# Only the fraction: these budgets are far below the default overhead's constant.
TWENTIETH = memory.Overhead(0.05, 0)


def tiny(*overrides: str):
    return config.load(None, ["train.patch_size=[32,32,32]", "train.batch_size=2", "model.base_width=8",
                              "model.max_width=32", "train.amp=fp16", *overrides])


@pytest.fixture(autouse=True)
def _shared_estimates(estimates_once):
    """The fits below search over many of the same candidates of one network (and of the network
    of tests/test_memory.py's fits): each estimated once (conftest's `estimates_once`)."""


def fit(budget: int, data: RunData | None, *overrides: str):
    # Caps keep the search (and the test) short.
    return memory.fit(tiny(*overrides), 1, CLASSES, (1.0, 1.0, 1.0), budget, TWENTIETH, data=data,
                      max_patch=(48, 48, 48), max_batch=4)


def test_the_run_adds_volumes_validation_and_the_ahead_batch_to_the_step():
    data = RunData(volume_bytes=10 * MiB, validation_shape=(96, 96, 96))
    chosen, report = fit(128 * MiB, data)
    assert report.resident_volumes == 10 * MiB  # within a fifth of the budget: resident, counted
    assert report.next_batch == next_batch_bytes(report.patch_size, report.batch_size, 1)
    assert report.inference > 0 and report.validation_buffers > 0
    assert report.validation == (report.step.parameters + report.step.optimizer_state + report.next_batch
                                 + report.inference + report.validation_buffers)
    assert report.total == (report.resident_volumes + max(report.step.total + report.next_batch, report.validation)
                            + int(0.05 * 128 * MiB))
    assert report.total <= 128 * MiB
    parts = report.to_dict()
    assert parts["total"] == report.total and parts["step"] == parts["step_total"] == report.step.total


def test_volumes_beyond_a_fifth_of_the_budget_reserve_that_fifth():
    _, report = fit(128 * MiB, RunData(volume_bytes=500 * MiB, validation_shape=None))
    assert report.resident_volumes == memory.resident_allowance(128 * MiB) == 128 * MiB // 5
    assert report.validation == 0


def test_a_budget_below_step_and_volumes_changes_the_choice():
    # What fits the step alone no longer fits once the volumes take their share: a smaller step.
    budget = 96 * MiB
    alone, alone_report = fit(budget, None)
    volumes = RunData(volume_bytes=memory.resident_allowance(budget), validation_shape=None)
    assert alone_report.step.total + volumes.volume_bytes + int(0.05 * budget) > budget
    shared, shared_report = fit(budget, volumes)
    work = [math.prod(c.train.patch_size) * c.train.batch_size / memory.STEP_TIME[c.model.checkpointing]
            for c in (alone, shared)]
    assert work[1] < work[0]
    assert shared_report.total <= budget and shared_report.resident_volumes == volumes.volume_bytes


def test_a_large_validation_volume_changes_the_choice():
    # Validation's buffers at the largest validation volume count against the budget too.
    _, small = fit(128 * MiB, RunData(0, (64, 64, 64)))
    chosen, large = fit(128 * MiB, RunData(0, (200, 200, 200)))
    assert large.validation_buffers > small.validation_buffers
    assert large.total <= 128 * MiB and large.validation <= large.total


def test_validation_buffers_follow_where_the_scores_are_blended():
    shape, patch = (200, 200, 100), (64, 64, 64)
    on_gpu = validation_buffer_bytes(shape, patch, 1, 5, 2, mirror=False, budget=80 * 2**30)
    mirrored = validation_buffer_bytes(shape, patch, 1, 5, 2, mirror=True, budget=80 * 2**30)
    # A small budget: medseg.device.aggregation_device blends on the host, the scores are not on the GPU.
    on_host = validation_buffer_bytes(shape, patch, 1, 5, 2, mirror=False, budget=64 * MiB)
    scores = 5 * math.prod(shape) * 4
    assert on_gpu - on_host >= scores and mirrored - on_gpu == 2 * scores


def test_run_data_bounds_the_volumes_the_sampler_holds():
    # The plan's bound of the training volumes is at least what the sampler keeps (float32 image,
    # uint8 label) after the real preprocessing of the sample data.
    from medseg.data.fingerprint import plan_preprocessing, training_cases
    from medseg.data.loader import training_volumes

    cfg = config.load(ROOT / "configs" / "sample.yaml", [f"data.dataset={ROOT / 'sample_data'}", "data.cache=none"])
    cases = training_cases(cfg, workers=1)
    prep = plan_preprocessing(cfg, cases)
    volumes = training_volumes(cases.train, prep, cfg, None)
    held = sum(v["image"].numel() * 4 + v["image"][0].numel() for v in volumes)
    data = memory.run_data(cases.train_summaries, [cases.summaries[c.name] for c in cases.validation],
                           prep.spacing, prep.channels)
    assert held <= data.volume_bytes <= 1.5 * held


def test_memory_fits_and_shows_the_run_for_resenc():
    cfg = tiny("model.arch=resenc")
    reports = {mode: memory.estimate(cfg.replace(model={"checkpointing": mode}), 1, CLASSES)
               for mode in ("off", "selective", "stage")}
    assert reports["off"].activations > reports["selective"].activations > reports["stage"].activations
    unet = memory.estimate(tiny(), 1, CLASSES)
    assert reports["off"].parameters > 2 * unet.parameters  # the residual stacks
    chosen, report = fit(256 * MiB, RunData(5 * MiB, (64, 64, 64)), "model.arch=resenc")
    assert chosen.model.arch == "resenc" and report.total <= 256 * MiB


def test_resenc_fake_count_is_the_real_count_on_the_cpu():
    # The estimator's fake run and a real float32 CPU step of resenc count the same storages.
    cfg = tiny("model.arch=resenc", "train.amp=off", "train.patch_size=[16,16,16]", "model.checkpointing=selective")
    exact = lambda nbytes: nbytes  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        real = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0), fake=False, rounding=exact)
    finally:
        torch.set_num_threads(threads)
    fake = simulate_step(cfg, 1, CLASSES, (1.0, 1.0, 1.0), fake=True, rounding=exact)
    assert fake.to_dict() == real.to_dict()


def test_medseg_train_trains_resenc_on_the_sample_data(tmp_path):
    overrides = ["model.arch=resenc", "model.base_width=4", "model.max_width=16", "train.epochs=1",
                 "train.iterations_per_epoch=2", "train.workers=0", "validate.every=1", "train.compile=off",
                 f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", "run_name=resenc"]
    arguments = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in overrides:
        arguments += ["--set", item]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    state = checkpoint.load(tmp_path / "resenc" / "last.pt")
    assert state["config"]["model"]["arch"] == "resenc"
    assert any(key.startswith("encoder.1.blocks.2.conv2") for key in state["model"])
