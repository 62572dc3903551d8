"""Training: `train(cfg)` builds everything from the config and runs the loop.

Read top to bottom: set-up (run directory, data, preprocessing, model, optimiser), then per epoch
`train_one_epoch()` and `validate()`, then checkpoints and metrics.csv.
"""

from __future__ import annotations

import ast
import csv
import itertools
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from medseg import checkpoint, config, distributed
from medseg.config import Config
from medseg.data.cases import Case
from medseg.data.fingerprint import plan_preprocessing, training_cases
from medseg.data.io import usable_cpus
from medseg.data.loader import training_batches, validation_dataset
from medseg.data.transforms import Preprocessing
from medseg.device import amp_dtype as resolve_amp
from medseg.device import amp_name, resolve_device
from medseg.errors import CheckpointError, ConfigError, DataError, MedsegError, TrainingInterrupted
from medseg.infer import aggregation_device, predict_scores
from medseg.memory import fit_to_data, parse_size
from medseg.losses import DiceCELoss, deep_supervision_weights
from medseg.metrics import dice_per_class
from medseg.models import CHECKPOINTING_MODES, build_model
from medseg.step import GraphedStep, _forward_backward, build_optimizer, compile_for_training, train_step


# Steps of at most this many voxels (batch x patch) run as CUDA graphs with train.compile=auto.
GRAPH_MAX_VOXELS = 2**20
# Runs limited to at most this many minutes record the eager step as a CUDA graph instead of
# compiling it (train.compile=auto): on an H200 at the hippocampus plan, the compiled step as a
# graph ran 7.1 ms a step after 38.9 s of start-up (fresh caches), the eager step as a graph 9.5 ms
# after 0.3 s of recording (and the process's 8.8 s start), so compiling pays only after about 2
# minutes of training.
SHORT_RUN_MINUTES = 3.0


def train(cfg: Config, resume: Path | None = None, console: Console | None = None) -> Path:
    """Train the model `cfg` describes; returns the run directory.

    With `resume`, continue the run in that directory from its last checkpoint (its own config).
    Started by torchrun (several processes), it trains with DistributedDataParallel: the global
    `train.batch_size` is split evenly over the processes, so a run on N GPUs takes the same
    optimiser steps over the same number of samples as on one, N times faster at best.
    """
    state = None
    if resume is not None:
        state = checkpoint.load(Path(resume) / "last.pt")
        cfg = config.from_dict(state["config"])
    context = distributed.start(cfg.train.device)
    try:
        return _train(cfg, state, Path(resume) if resume else None, console or Console(), context)
    finally:
        distributed.stop(context)


def _train(cfg: Config, state: dict[str, Any] | None, resume: Path | None, console: Console,
           context: distributed.Context) -> Path:
    started = time.perf_counter()
    if not context.is_main:
        console = Console(quiet=True)
    device = resolve_device(cfg.train.device, context)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    _hold_to_budget(cfg, device, console)
    if device.type == "cuda":
        # The patch shape is fixed, so cuDNN can time its convolution algorithms once and keep the
        # fastest (as nnU-Net does). Not under a memory budget: the trial runs and the chosen
        # algorithms' workspaces are outside what the estimator fitted the step to.
        torch.backends.cudnn.benchmark = not cfg.train.memory_budget
    if cfg.train.max_minutes is not None and cfg.train.max_minutes <= 0:
        raise ConfigError(f"'train.max_minutes' must be positive, got {cfg.train.max_minutes}")
    if cfg.train.batch_size % context.world_size:
        raise ConfigError(f"'train.batch_size' {cfg.train.batch_size} must be divisible by the "
                          f"{context.world_size} processes it is split over")

    # Checked before reading the data, so a bad output_dir fails at once; one name for all ranks.
    run_dir = resume if resume is not None else distributed.broadcast(context, _run_dir_name(cfg))
    cases = training_cases(cfg, workers=usable_cpus() if cfg.train.workers > 0 else 1)
    dataset, train_cases, val_cases = cases.dataset, cases.train, cases.validation
    if state is not None and state.get("split"):
        # A resumed run keeps the cases it started with, whatever the split rule says now.
        train_cases, val_cases = _saved_split(dataset.cases, state["split"], resume)
    if state is not None:
        prep = Preprocessing.from_dict(state["preprocessing"])
        channels = next(iter(cases.summaries.values())).channels
        if prep.channels != channels:
            raise CheckpointError(f"{resume}: the model takes {prep.channels} channel(s), "
                                  f"{cfg.data.dataset} has {channels}")
    else:
        prep = plan_preprocessing(cfg, dataset, cases.train_summaries, train_cases)
        if cfg.train.memory_budget:
            cfg, report = fit_to_data(cfg, prep, cases.train_summaries)
            console.print(f"memory budget {parse_size(cfg.train.memory_budget) / 2**30:.1f} GiB: chose {report.summary()}")
        if context.is_main:
            _create(run_dir)
            config.dump(cfg, run_dir / "config.yaml")
            (run_dir / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=2), encoding="utf-8")
    compile_mode = _compile_setting(cfg, device, context.enabled)
    layout = _memory_format(cfg, device, compile_mode)
    console.print(
        f"[bold]medseg train[/]: {len(train_cases)} training / {len(val_cases)} validation cases, "
        f"spacing {_fmt(prep.spacing)} mm, patch {cfg.train.patch_size}, batch {cfg.train.batch_size}, "
        f"device {device}{f' ×{context.world_size}' if context.enabled else ''}, amp {amp_name(amp_dtype)}, "
        f"checkpointing {cfg.model.checkpointing}, compile {compile_mode}"
        + (", channels-last" if layout == torch.channels_last_3d else "")
        + (f", {cfg.train.max_minutes:g} min" if cfg.train.max_minutes else "")
    )

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, prep.channels, prep.num_classes, prep.spacing).to(device, memory_format=layout)
    _freeze_unused_heads(model)
    optimizer = build_optimizer(cfg, model)
    schedule = Schedule(optimizer, cfg)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = DiceCELoss(batch_dice=cfg.train.batch_dice)
    history: list[dict[str, Any]] = []
    start_epoch, steps_done = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_states(state.get("rng", {}))
        history = list(state["history"])
        start_epoch, steps_done = int(state["epoch"]) + 1, int(state.get("steps_done", 0))
        where = f"epoch {start_epoch + 1}" + (f", step {steps_done + 1}" if steps_done else "")
        console.print(f"resuming {run_dir} at {where}")

    # Each process caches and samples its own share of the cases, with its own seed, so the
    # processes draw different patches; DDP then averages their gradients.
    rank, world = context.rank, context.world_size
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    shard_cfg = cfg.replace(train={"batch_size": cfg.train.batch_size // world, "seed": cfg.train.seed + 1000 * rank})
    shard_dir = cache_dir / (f"train-rank{rank}" if context.enabled else "train")
    batches = training_batches(train_cases[rank::world] or train_cases, prep, shard_cfg, shard_dir, device)
    saved_samplers = (state or {}).get("sampler") or []
    if hasattr(batches, "load_state_dict") and len(saved_samplers) == world and saved_samplers[rank] is not None:
        batches.load_state_dict(saved_samplers[rank])  # the same patches as without the interruption
    val_shard = val_cases[rank::world]
    val_data = validation_dataset(val_shard, prep, cfg, cache_dir / f"val-rank{rank}") if val_shard else None
    trained = model
    if context.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    trained, loss_fn = compile_for_training(trained, loss_fn, compile_mode)
    graph = GraphedStep(trained, loss_fn, optimizer, scaler, amp_dtype, cfg.train.grad_clip) \
        if compile_mode in ("graphs", "eager-graphs") else None
    best = max((row["val_dice"] for row in history if not math.isnan(row.get("val_dice", math.nan))), default=-1.0)

    def snapshot(completed_epoch: int, steps: int) -> dict[str, Any]:
        # Each process's device sampler state (None with DataLoader workers), gathered for rank 0 to save.
        sampler_states = distributed.gather(context, batches.state_dict() if hasattr(batches, "state_dict") else None)
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": completed_epoch,  # index of the last completed epoch (-1: none yet)
            "steps_done": steps,  # optimiser steps already taken in the epoch after it
            "rng": _rng_states(),
            "sampler": sampler_states,
            "config": cfg.to_dict(),
            "preprocessing": prep.to_dict(),
            "split": {"train": [c.name for c in train_cases], "validation": [c.name for c in val_cases]},
            "history": history,
        }

    # With one process, an out-of-memory error in any step is caught and the step retried more
    # cheaply. With several, a change in one process alone would desynchronise them: instead, all
    # try one step first without exchanging gradients and agree on the fallback (see _agree_on_memory).
    fallback = MemoryFallback(enabled=not context.enabled, compiled=compile_mode in ("on", "graphs"))
    if context.enabled:
        _agree_on_memory(trained, model, batches, loss_fn, scaler, amp_dtype, fallback, device, console, context)
    origin = started - schedule.seconds  # a resumed run goes on counting from where it stopped

    def clock() -> float:
        return time.perf_counter() - origin

    with _StopRequests() as stop:
        for epoch in range(start_epoch, cfg.train.epochs):
            epoch_started = time.perf_counter()
            steps = cfg.train.iterations_per_epoch - steps_done
            train_loss, taken = train_one_epoch(
                trained, batches, loss_fn, optimizer, schedule, scaler, amp_dtype, device, cfg.train.grad_clip,
                steps=steps, stop=stop, max_nonfinite=cfg.train.max_nonfinite_steps, fallback=fallback,
                description=f"epoch {epoch + 1}/{cfg.train.epochs}", console=console, context=context,
                clock=clock, memory_format=layout, graph=graph,
            )
            train_seconds = time.perf_counter() - epoch_started
            train_loss = distributed.mean(context, train_loss, device)
            if taken < steps and not schedule.time_is_up:  # interrupted: keep the progress, say how to continue
                state_dict = snapshot(epoch - 1, steps_done + taken)  # on every process: it gathers
                if context.is_main:
                    checkpoint.save(state_dict, run_dir / "last.pt")
                raise TrainingInterrupted(
                    f"stopped by {stop.reason} at epoch {epoch + 1}, step {steps_done + taken}; "
                    f"saved {run_dir / 'last.pt'}; continue with: medseg train --resume {run_dir}"
                )
            steps_done = 0
            row: dict[str, Any] = {"epoch": epoch + 1, "steps": taken, "train_loss": train_loss,
                                   "lr": optimizer.param_groups[0]["lr"]}
            last = epoch == cfg.train.epochs - 1 or schedule.time_is_up
            every = cfg.validate.every
            if val_cases and (last or (every > 0 and (epoch + 1) % every == 0)):
                per_class = validate(model, val_data or [], prep, cfg, amp_dtype, context)
                row["val_dice"] = float(np.nanmean(per_class)) if not np.all(np.isnan(per_class)) else math.nan
                for value, name in zip(per_class, _class_names(prep)):
                    row[f"dice_{name}"] = value
                _print_validation(console, epoch + 1, row, prep)
            row["seconds"] = time.perf_counter() - epoch_started
            row["train_seconds"] = train_seconds
            row["elapsed_minutes"] = (time.perf_counter() - started) / 60
            if device.type == "cuda":
                row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            history.append(row)
            state_dict = snapshot(epoch, 0)
            if context.is_main:
                _write_metrics(run_dir / "metrics.csv", history)
                checkpoint.save(state_dict, run_dir / "last.pt")
                if not math.isnan(row.get("val_dice", math.nan)) and row["val_dice"] > best:
                    best = row["val_dice"]
                    checkpoint.save(state_dict, run_dir / "best.pt")
            if last:
                if schedule.time_is_up:
                    console.print(f"train.max_minutes={cfg.train.max_minutes:g} reached after epoch {epoch + 1}")
                break
    console.print(f"done: {run_dir}  (last.pt, best.pt, metrics.csv, config.yaml)")
    return run_dir


def train_one_epoch(model: nn.Module, batches: Iterable[dict], loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    schedule: "Schedule", scaler: torch.amp.GradScaler,
                    amp_dtype: torch.dtype | None, device: torch.device, grad_clip: float, steps: int,
                    stop: Callable[[], bool] = lambda: False, max_nonfinite: int = 20,
                    fallback: "MemoryFallback | None" = None, description: str = "train",
                    console: Console | None = None,
                    context: distributed.Context = distributed.Context(),
                    clock: Callable[[], float] = time.perf_counter,
                    memory_format: torch.memory_format = torch.contiguous_format,
                    graph: GraphedStep | None = None) -> tuple[float, int]:
    """Up to `steps` optimiser steps, fewer if `stop()` turns true or the schedule's time is up;
    returns (mean loss, steps taken). `clock()` gives the seconds the run has been going. With
    `graph`, steps run as its CUDA graph while it is usable.

    Steps with a non-finite loss are skipped; `max_nonfinite` of them in a row end training with
    an error (noticed within 25 steps), before anything is saved, so the last good checkpoint
    stays as it is.
    """
    model.train()
    fallback = fallback or MemoryFallback()
    # The loss sum and the non-finite counts stay on the device and are read every 25 steps:
    # reading them every step would be a host sync, which keeps the CPU from preparing the next
    # batch and launching the next step while the GPU still runs this one.
    running = torch.zeros((), device=device)
    finite_steps = torch.zeros((), dtype=torch.int64, device=device)
    in_row = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite steps
    most_in_row = torch.zeros((), dtype=torch.int64, device=device)
    taken = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} it/s"), TimeElapsedColumn())
    started = time.perf_counter()
    with Progress(*columns, transient=False, console=console) as progress:
        task = progress.add_task(description, total=steps, loss=float("nan"), rate=0.0)
        for batch in itertools.islice(batches, steps):
            image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            label = batch["label"].to(device, non_blocking=True)
            while True:
                try:
                    if graph is not None and graph.usable(fallback.micro_batches):
                        loss, finite = graph(image, label)
                        if graph.failure:
                            progress.console.print(f"CUDA graph not recorded ({graph.failure}); steps run without it")
                            graph = None
                    else:
                        loss, finite = train_step(model, image, label, loss_fn, optimizer, scaler, amp_dtype,
                                                  grad_clip, fallback.micro_batches, context)
                    break
                except torch.OutOfMemoryError:
                    pass  # leave the except block first, so the failed step's tensors are freed
                if graph is not None:
                    graph.release()  # the fallback changes the network: the recorded step is void
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                change = fallback.cheaper(_network(model), image.shape)
                progress.console.print(f"out of memory at {description}, step {taken + 1}: {change}; retrying the step")
            taken += 1
            running += torch.where(finite, loss.detach(), 0.0)
            finite_steps += finite
            in_row = torch.where(finite, 0, in_row + 1)
            most_in_row = torch.maximum(most_in_row, in_row)
            if taken % 25 == 0 or taken == steps:
                _check_finite(most_in_row, max_nonfinite, description, taken)
                progress.update(task, loss=float(running) / max(int(finite_steps), 1),
                                rate=taken / (time.perf_counter() - started))
            progress.advance(task)
            # Every process stops at the same step and sets the same learning rate, whichever of
            # them got the signal or has the slowest clock.
            stop_now, seconds = distributed.maximum(context, (float(stop()), clock()), device)
            schedule.step(seconds)
            if stop_now or schedule.time_is_up:
                break
    _check_finite(most_in_row, max_nonfinite, description, taken)
    return float(running) / max(int(finite_steps), 1), taken


def _check_finite(most_in_row: torch.Tensor, max_nonfinite: int, description: str, taken: int) -> None:
    if int(most_in_row) >= max_nonfinite:
        raise MedsegError(
            f"training diverged: {max_nonfinite} consecutive steps with a non-finite loss "
            f"(by {description}, step {taken}); the last checkpoint is kept; try a lower train.lr"
        )


# Steps before the time clock of `Schedule` starts: compilation (step 1) and CUDA-graph recording
# (step 2) are over by then.
CLOCK_WARMUP_STEPS = 3


class Schedule:
    """The learning rate over the run (poly, cosine or constant), set after every step.

    Progress is the larger of steps taken / all steps (`epochs * iterations_per_epoch`) and, with
    `train.max_minutes`, the fraction of the training time that is left after the first
    `CLOCK_WARMUP_STEPS` steps: a run limited by time still completes its decay, and ends when
    either runs out. The time clock starts after those steps because they hold the one-off start-up
    (reading and caching, torch.compile's compilation and CUDA-graph capture, half a minute and more
    on a GPU): counted in, they would spend much of a short run's high learning rate on a handful
    of steps.
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
        return {"steps": self.steps, "seconds": self.seconds, "clock_start": self.clock_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.seconds = int(state["steps"]), float(state["seconds"])
        # Checkpoints written before the warm-up rule counted time from the run's start.
        self.clock_start = state.get("clock_start", 0.0 if self.steps >= CLOCK_WARMUP_STEPS else None)
        self._apply()

    def _apply(self) -> None:
        p = self.progress
        if self.kind == "poly":
            factor = (1 - p) ** self.exponent
        elif self.kind == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * p))
        else:
            factor = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * factor


@dataclass
class MemoryFallback:
    """What an out-of-memory error during training changes, cheapest first: switch activation
    checkpointing on, then split each batch into 2, 4, ... micro-batches (gradients accumulated, so
    the optimiser step stays the same)."""

    micro_batches: int = 1
    enabled: bool = True
    compiled: bool = False

    def cheaper(self, model: nn.Module, batch_shape: torch.Size) -> str:
        """Apply the next fallback and say what changed; MedsegError when none is left."""
        batch_size, patch = batch_shape[0], list(batch_shape[2:])
        if not self.enabled:
            raise MedsegError(f"out of memory (patch {patch}, batch {batch_size} per GPU); with several GPUs "
                              f"there is no automatic fallback: set model.checkpointing=stage or a smaller batch")
        return self.apply_next(model, batch_shape)

    def apply_next(self, model: nn.Module, batch_shape: torch.Size) -> str:
        """`cheaper` without the check: for a change all processes have agreed on."""
        batch_size, patch = batch_shape[0], list(batch_shape[2:])
        # The next checkpointing mode in order of memory saved (off -> selective -> stage); a
        # network compiled whole stops at selective (stage needs its stages compiled one by one,
        # UNet3D.compile_stages, when the step is built).
        modes = list(CHECKPOINTING_MODES)
        current = getattr(model, "checkpointing", modes[-1])
        if self.compiled and current != "stage":
            modes.remove("stage")
        if current != modes[-1]:
            model.set_checkpointing(modes[modes.index(current) + 1])
            return f"activation checkpointing switched to {model.checkpointing}"
        if self.micro_batches < batch_size:
            self.micro_batches = min(self.micro_batches * 2, batch_size)
            return f"batch split into {self.micro_batches} micro-batches of {-(-batch_size // self.micro_batches)}"
        raise MedsegError(
            f"out of memory even with checkpointing and one sample per micro-batch "
            f"(patch {patch}); use a smaller train.patch_size or a larger GPU"
        )


def validate(model: nn.Module, volumes: Iterable[dict], prep: Preprocessing, cfg: Config,
             amp_dtype: torch.dtype | None, context: distributed.Context = distributed.Context()) -> list[float]:
    """Mean Dice per foreground class over whole validation volumes (at the network's spacing).

    With several processes each predicts its share of the volumes and the scores are gathered.
    """
    from medseg.memory import parse_size

    budget = parse_size(cfg.train.memory_budget) if cfg.train.memory_budget else None
    scores = []
    for item in volumes:
        image = torch.as_tensor(item["image"])[None]
        # Blended on the GPU while that is small against its memory (or the budget), else on the host.
        aggregate = aggregation_device(next(model.parameters()).device, image, prep.num_classes, budget)
        class_scores = predict_scores(model, image, cfg.train.patch_size, cfg.validate.overlap,
                                      cfg.validate.sw_batch_size, amp_dtype, aggregate, cfg.validate.mirror)
        prediction = class_scores.argmax(1)[0]
        scores.append(dice_per_class(prediction, torch.as_tensor(item["label"])[0], prep.num_classes))
    model.train()
    scores = [row for part in distributed.gather(context, scores) for row in part]
    with np.errstate(all="ignore"):
        return [float(v) for v in np.nanmean(np.array(scores, dtype=float), axis=0)]


class _StopRequests:
    """While active, SIGINT and SIGTERM ask training to stop after the current step (a second
    SIGINT stops at once). Calling the object tells whether a stop was asked for."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.reason is not None

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, number: int, frame: Any) -> None:
        if self.reason is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(number).name


def _agree_on_memory(trained: nn.Module, network: nn.Module, batches: Iterable[dict], loss_fn: nn.Module,
                     scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, fallback: MemoryFallback,
                     device: torch.device, console: Console, context: distributed.Context) -> None:
    """With several processes: every process runs one forward and backward on a batch without
    exchanging gradients (DDP's no_sync); if any runs out of memory, all apply the same fallback
    and try again. The out-of-memory fallback is thus agreed across processes before training;
    an out-of-memory error later ends the run with a message (torchrun then stops every process)."""
    batch = next(iter(batches))
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    ddp = trained._orig_mod if hasattr(trained, "_orig_mod") else trained
    while True:
        failed = False
        try:
            with ddp.no_sync():
                _forward_backward(trained, image, label, loss_fn, scaler, amp_dtype, fallback.micro_batches)
        except torch.OutOfMemoryError:
            failed = True
        network.zero_grad(set_to_none=True)
        if not distributed.any_true(context, failed, device):
            return
        if device.type == "cuda":
            torch.cuda.empty_cache()
        change = fallback.apply_next(network, image.shape)
        console.print(f"out of memory on at least one GPU in the first step: {change} on every GPU")


def _compile_setting(cfg: Config, device: torch.device, distributed_run: bool = False) -> str:
    setting = cfg.train.compile
    if setting == "auto":
        setting = "off" if device.type != "cuda" else ("graphs" if _small_step(cfg) else "on")
        if setting == "graphs" and cfg.train.max_minutes is not None and cfg.train.max_minutes <= SHORT_RUN_MINUTES:
            setting = "eager-graphs"
    # CUDA graphs need CUDA, and replay no collective communication: with several processes
    # (DistributedDataParallel's gradient all-reduce) or on the CPU they fall back to plain compile,
    # and the eager step recorded as a graph to the eager step.
    # With "stage" checkpointing neither is recorded: its checkpoints run eagerly between the
    # compiled stages.
    if setting in ("graphs", "eager-graphs") and (device.type != "cuda" or distributed_run
                                                  or cfg.model.checkpointing == "stage"):
        setting = "on" if setting == "graphs" else "off"
    return setting


def _small_step(cfg: Config) -> bool:
    # CUDA graphs pay where kernel launches, not arithmetic, bound the step: on an H200 the
    # hippocampus plan (40x56x40, batch 7: 0.63M voxels) ran 7.1 ms as a graph against 16.8 ms
    # compiled alone; at 128³ batch 2 (4.2M voxels) the compiled step runs at 18 % of the matrix
    # rate and capturing torch.compile's graphs took over a minute. Not under a memory budget: the graphs' private
    # memory pool is outside what the estimator fitted.
    voxels = cfg.train.batch_size * math.prod(cfg.train.patch_size)
    return voxels <= GRAPH_MAX_VOXELS and not cfg.train.memory_budget


def _memory_format(cfg: Config, device: torch.device, compile_mode: str) -> torch.memory_format:
    # Channels-last (NDHWC) convolutions: on an H200, compiled at 128³ batch 2, 39.9-40.5 ms
    # against 42.8-43.0 ms contiguous and 4.49 against 4.71 GiB; no gain with CUDA graphs at the
    # hippocampus plan (9.3 against 9.1 ms), and slower for eager stage checkpointing (149 against
    # 118 ms). So auto uses it only where it was measured faster.
    setting = cfg.train.channels_last
    if setting == "auto":
        fits = device.type == "cuda" and compile_mode == "on" and cfg.model.checkpointing == "off"
        setting = "on" if fits else "off"
    return torch.channels_last_3d if setting == "on" else torch.contiguous_format


def _network(model: nn.Module) -> nn.Module:
    """The UNet3D inside torch.compile's and DistributedDataParallel's wrappers."""
    while hasattr(model, "_orig_mod") or isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def _hold_to_budget(cfg: Config, device: torch.device, console: Console) -> None:
    """On a GPU larger than `train.memory_budget`, let this process use no more than the budget
    (PyTorch's per-process memory fraction): the run behaves as on a card of that size, and leaves
    the rest to others sharing the GPU."""
    from medseg.memory import GiB, parse_size

    if not cfg.train.memory_budget or device.type != "cuda":
        return
    budget = parse_size(cfg.train.memory_budget)
    total = torch.cuda.get_device_properties(device).total_memory
    if budget < total:
        torch.cuda.set_per_process_memory_fraction(budget / total, device.index if device.index is not None else torch.cuda.current_device())
        console.print(f"GPU memory held to {budget / GiB:.1f} of {total / GiB:.1f} GiB (train.memory_budget)")


def _saved_split(cases: Sequence[Case], saved: dict[str, list[str]],
                 run_dir: Path | None) -> tuple[list[Case], list[Case]]:
    """The training and validation cases a checkpoint names, from the dataset's cases."""
    by_name = {case.name: case for case in cases}
    missing = [name for part in ("train", "validation") for name in saved.get(part, []) if name not in by_name]
    if missing:
        raise DataError(f"{run_dir}: the run was trained on case {missing[0]!r}, which the dataset no longer has"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [by_name[n] for n in saved.get("train", [])], [by_name[n] for n in saved.get("validation", [])]


def _freeze_unused_heads(model: nn.Module) -> None:
    # Heads whose output the loss never uses (the coarsest deep-supervision output has weight 0;
    # without deep supervision only the finest head is used) get no gradient. Marking them frozen
    # keeps them out of the optimiser's work and lets DistributedDataParallel run without searching
    # for unused parameters every step.
    used = list(reversed(model.heads)) if model.deep_supervision else [model.heads[-1]]
    weights = deep_supervision_weights(len(used)) if model.deep_supervision else [1.0]
    for head in model.heads:
        head.requires_grad_(False)
    for head, weight in zip(used, weights):
        head.requires_grad_(weight > 0)


def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
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


def _run_dir_name(cfg: Config) -> Path:
    name = cfg.run_name or f"{Path(cfg.data.dataset).name}-fold{cfg.data.fold}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists():
        raise ConfigError(f"{run_dir}: run directory exists; use --resume {run_dir} or another run_name")
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{run_dir.parent}: cannot create output folder ({exc.strerror or exc})") from None
    if not os.access(run_dir.parent, os.W_OK):
        raise ConfigError(f"{run_dir.parent}: output folder is not writable")
    return run_dir


def _create(run_dir: Path) -> None:
    try:
        run_dir.mkdir()
    except OSError as exc:
        raise ConfigError(f"{run_dir}: cannot create run directory ({exc.strerror or exc})") from None


def _class_names(prep: Preprocessing) -> list[str]:
    return [prep.labels.get(c, f"class_{c}") for c in range(1, prep.num_classes)]


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    temporary.replace(path)


def _print_validation(console: Console, epoch: int, row: dict[str, Any], prep: Preprocessing) -> None:
    table = Table(title=f"validation, epoch {epoch}", title_justify="left")
    for name in _class_names(prep):
        table.add_column(name, justify="right")
    table.add_column("mean Dice", justify="right", style="bold")
    table.add_row(*[f"{row[f'dice_{n}']:.4f}" for n in _class_names(prep)], f"{row['val_dice']:.4f}")
    console.print(table)


def _fmt(values: Iterable[float]) -> str:
    return "×".join(f"{v:.3g}" for v in values)
