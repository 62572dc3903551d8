"""A training run's state: everything a checkpoint holds and a resumed run continues from."""

from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medseg import config, distributed
from medseg.config import Config
from medseg.errors import ConfigError
from medseg.data.transforms import Preprocessing
from medseg.schedule import Schedule


@dataclass
class RunState:
    """The run as a checkpoint saves it: network, optimiser, schedule, loss scaler, where training
    is (`epoch`: the last completed epoch, -1 before the first; `steps_done`: optimiser steps taken
    in the epoch after it), the random number generators, each process's batch sampler, the
    history of epochs (metrics.csv's rows) and, for reading the checkpoint on its own, the config,
    preprocessing and the cases trained and validated on.

    `pending` is the metrics row of an epoch whose training was done but whose validation was
    interrupted (with its "train_seconds"): the checkpoint then has `steps_done` equal to the
    epoch's steps, and a resumed run validates that epoch (the weights it validates are the same)
    before going on. None otherwise.

    `sampler` is the training batch source; one with `state_dict()` (the device sampler) is
    saved and restored, so a resumed run draws the patches the uninterrupted run would have.
    """

    cfg: Config
    prep: Preprocessing
    split: dict[str, list[str]]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    sampler: Any = None
    context: distributed.Context = field(default_factory=distributed.Context)
    epoch: int = -1
    steps_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None

    @property
    def best(self) -> float:
        """The best mean validation Dice so far (-1 before any validation)."""
        scores = [row["val_dice"] for row in self.history if not math.isnan(row.get("val_dice", math.nan))]
        return max(scores, default=-1.0)

    def record(self, row: dict[str, Any]) -> bool:
        """Add a finished epoch's row to the history; whether its validation Dice is the best yet."""
        best = self.best
        self.history.append(row)
        return not math.isnan(row.get("val_dice", math.nan)) and row["val_dice"] > best

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's content. With several processes every one must call it (it gathers the
        samplers' states for rank 0 to save)."""
        sampler_state = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "rng": rng_states(),
            "sampler": distributed.gather(self.context, sampler_state),
            "config": self.cfg.to_dict(),
            "preprocessing": self.prep.to_dict(),
            "split": self.split,
            "history": self.history,
            "pending": self.pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint. The sampler's state is restored where the checkpoint has one
        per process of this run (a run resumed on another number of processes draws anew)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.steps_done = int(state["epoch"]), int(state.get("steps_done", 0))
        self.history = list(state["history"])
        self.pending = dict(state["pending"]) if state.get("pending") else None
        samplers = state.get("sampler") or []
        rank, world = self.context.rank, self.context.world_size
        if hasattr(self.sampler, "load_state_dict") and len(samplers) == world and samplers[rank] is not None:
            self.sampler.load_state_dict(samplers[rank])
        set_rng_states(state.get("rng", {}))


def rng_states() -> dict[str, Any]:
    """The global random number generators' states (torch, CUDA, NumPy, Python), as plain data."""
    states = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states()` returned (the generators it holds)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "python" in states:
        random.setstate(ast.literal_eval(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _numpy_state() -> list[Any]:
    # Plain types only: checkpoints are loaded with weights_only=True.
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


# What `medseg train --resume RUN --set KEY=VALUE` may change ("section.*": every key of the
# section); every other setting is the run's own, fixed when it started.
ADJUSTABLE_ON_RESUME = ("train.epochs", "train.max_minutes", "data.dataset", "validate.*")


def adjustable_on_resume(key: str) -> bool:
    """Whether `--set key=...` may change a resumed run (ADJUSTABLE_ON_RESUME)."""
    return any(key == rule or (rule.endswith(".*") and key.startswith(rule[:-1])) for rule in ADJUSTABLE_ON_RESUME)


def resumed_config(saved: dict[str, Any], overrides: Sequence[str], run_dir: Path) -> Config:
    """The config a resumed run continues with: the checkpoint's, with `overrides` (checked like
    any --set first, then refused unless ADJUSTABLE_ON_RESUME allows the key)."""
    cfg = config.load(overrides=list(overrides), base=saved["config"])
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not adjustable_on_resume(key):
            raise ConfigError(f"--set {key}: cannot be changed when resuming {run_dir} (the run keeps its own "
                              f"config); a resumed run may change only {', '.join(ADJUSTABLE_ON_RESUME)}")
    return cfg


def finished(saved: dict[str, Any], cfg: Config, run_dir: Path) -> str | None:
    """What to say when the checkpoint `saved` ends the run `cfg` describes (all its epochs done,
    or `train.max_minutes` spent); None when there is training left."""
    if saved.get("pending") or int(saved.get("steps_done", 0)):
        return None
    done = int(saved["epoch"]) + 1
    if done >= cfg.train.epochs:
        return f"{run_dir} already finished {done} epochs; extend with --set train.epochs={2 * done}"
    seconds = float(saved.get("schedule", {}).get("seconds", 0.0))
    if cfg.train.max_minutes is not None and seconds >= cfg.train.max_minutes * 60:
        return (f"{run_dir} already used its train.max_minutes={cfg.train.max_minutes:g} ({done} epochs); "
                f"extend with --set train.max_minutes={2 * cfg.train.max_minutes:g}")
    return None
