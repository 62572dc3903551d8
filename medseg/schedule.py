"""The learning rate over a run: poly, cosine or constant, by steps and, with `train.max_minutes`,
by time."""

from __future__ import annotations

import math
from typing import Any

import torch

from medseg.config import Config

# Steps before the time clock of `Schedule` starts: compilation (step 1) and CUDA-graph recording
# (step 2) are over by then.
CLOCK_WARMUP_STEPS = 3


class Schedule:
    """The learning rate over the run (poly, cosine or constant), set after every step.

    Progress is the larger of steps taken / all steps (`epochs * iterations_per_epoch`) and, with
    `train.max_minutes`, the fraction of the training time that is left after the first
    `CLOCK_WARMUP_STEPS` steps: a run limited by time still completes its decay, and ends when
    either runs out. The time clock starts after those steps because they hold the one-off start-up
    (reading and caching, torch.compile's compilation and CUDA-graph capture): counted in, they
    would spend much of a short run's high learning rate on a handful of steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config) -> None:
        t = cfg.train
        self.optimizer, self.base_lr, self.kind, self.exponent = optimizer, t.lr, t.lr_schedule, t.poly_exponent
        self.total_steps = max(t.epochs * t.iterations_per_epoch, 1)
        self.allowed = t.max_minutes * 60 if t.max_minutes is not None else None
        self.steps, self.seconds = 0, 0.0
        self.clock_start: float | None = None  # seconds (since the run started) of the steady phase
        self._apply()

    @property
    def progress(self) -> float:
        """From 0 at the start to 1 at the end of training."""
        done = self.steps / self.total_steps
        if self.allowed is not None and self.clock_start is not None:
            left = self.allowed - self.clock_start
            done = max(done, (self.seconds - self.clock_start) / left if left > 0 else 1.0)
        return min(done, 1.0)

    @property
    def time_is_up(self) -> bool:
        """Whether `train.max_minutes` has passed."""
        return self.allowed is not None and self.seconds >= self.allowed

    def step(self, seconds: float) -> None:
        """One more optimiser step was taken, `seconds` after the run started."""
        self.steps += 1
        self.seconds = seconds
        if self.clock_start is None and self.steps >= CLOCK_WARMUP_STEPS:
            self.clock_start = seconds
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Steps taken and the clock: what a resumed run continues from."""
        return {"steps": self.steps, "seconds": self.seconds, "clock_start": self.clock_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s result (and set the learning rate it implies)."""
        self.steps, self.seconds = int(state["steps"]), float(state["seconds"])
        # Checkpoints written before the warm-up rule counted time from the run's start.
        self.clock_start = state.get("clock_start", 0.0 if self.steps >= CLOCK_WARMUP_STEPS else None)
        self._apply()

    def factor(self) -> float:
        """The learning rate at the current progress, as a fraction of `train.lr`."""
        p = self.progress
        if self.kind == "poly":
            return (1 - p) ** self.exponent
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        return 1.0

    def _apply(self) -> None:
        rate = self.base_lr * self.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = rate
