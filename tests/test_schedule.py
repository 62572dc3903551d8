"""The learning-rate schedule: by steps, and by time with train.max_minutes."""

import math

import pytest
import torch

from medseg import config
from medseg.schedule import CLOCK_WARMUP_STEPS, Schedule


def _schedule(*overrides: str) -> tuple[Schedule, torch.optim.Optimizer]:
    cfg = config.load(None, ["train.lr=0.01", "train.lr_schedule=poly", "train.poly_exponent=0.9", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    return Schedule(optimizer, cfg), optimizer


def test_poly_decay_by_steps():
    schedule, optimizer = _schedule("train.epochs=2", "train.iterations_per_epoch=5")
    for _ in range(5):
        schedule.step(1000.0)  # without max_minutes, time does not count
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    assert not schedule.time_is_up


def test_time_clock_starts_after_the_warm_up_steps():
    schedule, optimizer = _schedule("train.epochs=1000", "train.max_minutes=1")
    # A first step that took 30 s (compilation) leaves the learning rate where it was.
    schedule.step(30.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-3)
    for k in range(2, CLOCK_WARMUP_STEPS + 1):
        schedule.step(30.0 + k)
    start = 30.0 + CLOCK_WARMUP_STEPS
    # Halfway through the time left after the warm-up, the decay is halfway.
    schedule.step(start + (60.0 - start) / 2)
    assert schedule.progress == pytest.approx(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    assert not schedule.time_is_up
    schedule.step(60.0)
    assert schedule.time_is_up and optimizer.param_groups[0]["lr"] == 0.0


def test_resumed_schedule_keeps_its_clock():
    schedule, _ = _schedule("train.epochs=1000", "train.max_minutes=1")
    for seconds in (20.0, 21.0, 22.0, 30.0):
        schedule.step(seconds)
    resumed, optimizer = _schedule("train.epochs=1000", "train.max_minutes=1")
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.progress == pytest.approx(schedule.progress) == pytest.approx((30 - 22) / (60 - 22))
    # A checkpoint from before the warm-up rule: time counted from the run's start.
    resumed.load_state_dict({"steps": 4, "seconds": 30.0})
    assert resumed.progress == pytest.approx(0.5)


@pytest.mark.parametrize("steps, factor", [(0, 1.0), (2, 0.5 * (1 + math.cos(math.pi * 0.25))), (4, 0.5),
                                           (6, 0.5 * (1 + math.cos(math.pi * 0.75))), (8, 0.0)])
def test_cosine_decay_by_steps(steps, factor):
    schedule, optimizer = _schedule("train.lr_schedule=cosine", "train.epochs=2", "train.iterations_per_epoch=4")
    for _ in range(steps):
        schedule.step(0.0)
    assert schedule.progress == pytest.approx(steps / 8)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * factor, abs=1e-12)


def test_cosine_follows_the_time_limit():
    schedule, optimizer = _schedule("train.lr_schedule=cosine", "train.epochs=1000", "train.max_minutes=1")
    for k in range(CLOCK_WARMUP_STEPS):
        schedule.step(float(k))
    start = float(CLOCK_WARMUP_STEPS - 1)
    schedule.step(start + (60.0 - start) / 2)  # half the time after the warm-up: the cosine's midpoint
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_constant_schedule_keeps_the_rate_until_the_end():
    schedule, optimizer = _schedule("train.lr_schedule=constant", "train.epochs=1", "train.iterations_per_epoch=4",
                                    "train.max_minutes=1")
    rates = []
    for seconds in (1.0, 2.0, 3.0, 50.0):
        schedule.step(seconds)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [0.01] * 4
    assert schedule.progress == 1.0  # all steps taken: the rate stays, the run ends
    schedule.step(60.0)
    assert schedule.time_is_up and optimizer.param_groups[0]["lr"] == 0.01
