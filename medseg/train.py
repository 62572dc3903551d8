"""Training: `train(cfg)` builds everything from the config and runs the loop.

Read top to bottom: `train` starts the processes; `_run` sets up (device, run directory, data and
preprocessing, the run's state, the step), then per epoch `train_one_epoch()`, `validate()` and
the checkpoints and metrics.csv. The learning-rate schedule is in medseg.schedule, the
out-of-memory fallback in medseg.oom, stop requests in medseg.stopping, the step and its run
settings in medseg.step, what a checkpoint holds in medseg.run_state.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from rich.console import Console
from torch import nn

from medseg import checkpoint, config, distributed
from medseg.config import Config
from medseg.data.cases import Case
from medseg.data.fingerprint import plan_preprocessing, training_cases
from medseg.data.io import usable_cpus
from medseg.data.loader import training_batches, usable_workers, validation_dataset
from medseg.data.transforms import Preprocessing
from medseg.device import aggregation_device, amp_dtype as resolve_amp
from medseg.device import amp_name, resolve_device
from medseg.errors import CheckpointError, ConfigError, DataError, MedsegError, TrainingInterrupted
from medseg.files import RunLock, atomic_write_text, cache_key, check_path_component
from medseg.infer import predict_scores
from medseg.losses import DiceCELoss, deep_supervision_weights
from medseg.memory import GiB, fit_to_data, parse_size
from medseg.metrics import dice_per_class
from medseg.models import build_model
from medseg.oom import MemoryFallback, agree_on_memory
from medseg.reporting import RunReport
from medseg.quiet import hide_known_warnings
from medseg.run_state import RunState, finished, resumed_config
from medseg.schedule import Schedule
from medseg.step import GraphedStep, TrainingStep, build_optimizer, compile_for_training, compile_setting, memory_format
from medseg.stopping import StopRequests, resume_command


@dataclass(frozen=True)
class Execution:
    """Where and how this process trains: device, autocast dtype, `compile_setting`'s mode, the
    weights' memory layout, and the process group."""

    device: torch.device
    amp_dtype: torch.dtype | None
    compile_mode: str
    layout: torch.memory_format
    context: distributed.Context


def train(cfg: Config, resume: Path | None = None, console: Console | None = None,
          overrides: Sequence[str] = ()) -> Path:
    """Train the model `cfg` describes; returns the run directory.

    With `resume`, continue the run in that directory from its last checkpoint (its own config,
    with `overrides` of the keys `run_state.ADJUSTABLE_ON_RESUME` names); a run that has finished
    is said to be so and left as it is. The dataset is recorded by its absolute path, so that a run
    resumes from any folder. SIGINT or SIGTERM stops the run as medseg.stopping describes.
    Started by torchrun (several processes), it trains with DistributedDataParallel: the global
    `train.batch_size` is split evenly over the processes, so a run on N GPUs takes the same
    optimiser steps over the same number of samples as on one, N times faster at best.
    """
    hide_known_warnings()
    saved = None
    console = console or Console()
    if resume is not None:
        saved = checkpoint.load_for_resume(Path(resume))
        cfg = resumed_config(saved, overrides, Path(resume))
        if (message := finished(saved, cfg, Path(resume))) is not None:
            console.print(message, highlight=False)
            return Path(resume)
        if not Path(cfg.data.dataset).is_dir():
            raise DataError(f"{cfg.data.dataset}: the run's dataset folder does not exist; if it moved, "
                            f"give its new place: medseg train --resume {resume} --set data.dataset=FOLDER")
    else:
        cfg = cfg.replace(data={"dataset": os.path.abspath(cfg.data.dataset)})
    context = distributed.start(cfg.train.device)
    try:
        # The lock is held for the run; an unexpected error's traceback goes to train.log.
        with RunLock() as lock, RunReport(console, main=context.is_main) as report, \
                StopRequests(report.console.print) as stop:
            return _run(cfg, saved, Path(resume) if resume else None, report, context, lock, stop)
    finally:
        distributed.stop(context)


def _run(cfg: Config, saved: dict[str, Any] | None, resume: Path | None, report: RunReport,
         context: distributed.Context, lock: RunLock, stop: StopRequests) -> Path:
    started = time.perf_counter()
    console = report.console  # the terminal and train.log (nothing on processes other than the main one)
    _check_settings(cfg, context)
    cfg = _held_workers(cfg, console)
    device = resolve_device(cfg.train.device, context)
    _prepare_device(cfg, device, console)
    # Checked before reading the data, so a bad output_dir fails at once; one name for all ranks.
    run_dir = resume if resume is not None else distributed.broadcast(context, _run_dir_name(cfg))
    stop.run_dir = run_dir
    if context.is_main and resume is not None:
        lock.hold(run_dir)  # a second --resume of this run refuses here, before any work
    cfg, prep, train_cases, val_cases = _prepare_data(cfg, saved, run_dir, context, console)
    if context.is_main:
        lock.hold(run_dir)
    report.attach(run_dir, cfg, _class_names(prep), prep.spacing)
    mode = compile_setting(cfg, device, context.enabled)
    where = Execution(device, resolve_amp(cfg.train.amp, device), mode, memory_format(cfg, device, mode), context)
    console.print(_banner(cfg, prep, len(train_cases), len(val_cases), where))

    run = _build_run(cfg, prep, train_cases, val_cases, run_dir, where)
    if saved is not None:
        run.load_state_dict(saved)
    report.choose_previews(run.split, saved.get("split") if saved is not None else None)
    val_data = _validation_data(cfg, prep, val_cases, run_dir, context)
    step = _build_step(run, where, console)
    origin = started - run.schedule.seconds  # a resumed run goes on counting from where it stopped

    with stop.during("training"):
        # Said once stop requests are honoured: from here on SIGINT or SIGTERM saves a checkpoint.
        at = f"epoch {run.epoch + 2}" + (f", step {run.steps_done + 1}" if run.steps_done else "")
        console.print(f"{'resuming' if saved is not None else 'training'} {run_dir} at {at}")
        for epoch in range(run.epoch + 1, cfg.train.epochs):
            epoch_started = time.perf_counter()
            if run.pending is None:
                row, train_seconds = _train_epoch(step, run, epoch, stop, origin, report, run_dir)
            else:  # the epoch's training was done; its validation was interrupted: validate it now
                row, run.pending = dict(run.pending), None
                train_seconds = row.pop("train_seconds")
                epoch_started -= train_seconds
            last = epoch == cfg.train.epochs - 1 or run.schedule.time_is_up
            if val_cases and (last or (cfg.validate.every > 0 and (epoch + 1) % cfg.validate.every == 0)):
                try:
                    with stop.during("validation"):
                        row.update(_validate_epoch(run, val_data, where, report, epoch, stop))
                except _ValidationStopped:
                    run.pending = {**row, "train_seconds": train_seconds}
                    with stop.during("saving"):
                        _save(run, run_dir, best=False)
                    raise _interrupted(stop, f"in the validation of epoch {epoch + 1} (its training is saved; "
                                             "resuming validates it)", run_dir) from None
            row.update(_timings(epoch_started, train_seconds, started, device))
            run.epoch, run.steps_done = epoch, 0
            with stop.during("saving"):
                _save(run, run_dir, best=run.record(row))
            report.epoch_done(run.history)
            if last:
                if run.schedule.time_is_up:
                    console.print(f"train.max_minutes={cfg.train.max_minutes:g} reached after epoch {epoch + 1}")
                break
            if stop():  # asked while the epoch ended: its checkpoint is written
                raise _interrupted(stop, f"after epoch {epoch + 1}", run_dir)
    report.finished(run.history)
    return run_dir


def _train_epoch(step: TrainingStep, run: RunState, epoch: int, stop: StopRequests, origin: float,
                 report: RunReport, run_dir: Path) -> tuple[dict[str, Any], float]:
    """Epoch `epoch`'s training steps (those left of it in a resumed run): its metrics row so far
    and the seconds it took. Stopped by a request, it saves last.pt and raises TrainingInterrupted."""
    started = time.perf_counter()
    steps = run.cfg.train.iterations_per_epoch - run.steps_done
    description = f"epoch {epoch + 1}/{run.cfg.train.epochs}"
    train_loss, taken = train_one_epoch(step, run, steps, stop, lambda: time.perf_counter() - origin,
                                        description, report, epoch)
    run.steps_done += taken
    if taken < steps and not run.schedule.time_is_up:  # interrupted: keep the progress, say how to continue
        with stop.during("saving"):
            _save(run, run_dir, best=False)
        raise _interrupted(stop, f"at epoch {epoch + 1}, step {run.steps_done}", run_dir)
    device = next(run.model.parameters()).device
    row = {"epoch": epoch + 1, "steps": taken, "train_loss": distributed.mean(run.context, train_loss, device),
           "lr": run.optimizer.param_groups[0]["lr"]}
    return row, time.perf_counter() - started


class _ValidationStopped(Exception):
    """A stop request came during validation (raised between two validation cases)."""


def _until_stopped(volumes: Iterable[dict], stop: Callable[[], bool]) -> Iterator[dict]:
    for item in volumes:
        if stop():
            raise _ValidationStopped
        yield item


def _interrupted(stop: StopRequests, moment: str, run_dir: Path) -> TrainingInterrupted:
    return TrainingInterrupted(f"stopped by {stop.reason} {moment}; saved {run_dir / 'last.pt'}; "
                               f"continue with: {resume_command(run_dir)}")


def _held_workers(cfg: Config, console: Console) -> Config:
    """`train.workers` held to the usable CPU cores (medseg.data.loader.usable_workers), with a note."""
    workers = usable_workers(cfg.train.workers)
    if workers == cfg.train.workers:
        return cfg
    console.print(f"train.workers={cfg.train.workers} held to {workers}: the CPU cores this process may use")
    return cfg.replace(train={"workers": workers})


def _check_settings(cfg: Config, context: distributed.Context) -> None:
    if cfg.train.max_minutes is not None and cfg.train.max_minutes <= 0:
        raise ConfigError(f"'train.max_minutes' must be positive, got {cfg.train.max_minutes}")
    distributed.check_batch(cfg.train.batch_size, context.world_size)


def _prepare_device(cfg: Config, device: torch.device, console: Console) -> None:
    _hold_to_budget(cfg, device, console)
    if device.type == "cuda":
        # The patch shape is fixed, so cuDNN can time its convolution algorithms once and keep the
        # fastest (as nnU-Net does). Not under a memory budget: the trial runs and the chosen
        # algorithms' workspaces are outside what the estimator fitted the step to.
        torch.backends.cudnn.benchmark = not cfg.train.memory_budget


def _prepare_data(cfg: Config, saved: dict[str, Any] | None, run_dir: Path, context: distributed.Context,
                  console: Console) -> tuple[Config, Preprocessing, list[Case], list[Case]]:
    """The checked cases, their split and preprocessing: planned for a new run (which is written
    to config.yaml and preprocessing.json, with the config fitted to `train.memory_budget`), the
    checkpoint's own for a resumed one. Returns the config the run uses."""
    cases = training_cases(cfg, workers=usable_cpus() if cfg.train.workers > 0 else 1)
    train_cases, val_cases = cases.train, cases.validation
    if saved is not None:
        if saved.get("split"):  # a resumed run keeps the cases it started with, whatever the split rule says now
            train_cases, val_cases = _saved_split(cases.dataset.cases, saved["split"], run_dir)
        prep = Preprocessing.from_dict(saved["preprocessing"])
        channels = next(iter(cases.summaries.values())).channels
        if prep.channels != channels:
            raise CheckpointError(f"{run_dir}: the model takes {prep.channels} channel(s), "
                                  f"{cfg.data.dataset} has {channels}")
        return cfg, prep, train_cases, val_cases
    prep = plan_preprocessing(cfg, cases)
    if cfg.train.memory_budget:
        cfg, report = fit_to_data(cfg, prep, cases.train_summaries, [cases.summaries[c.name] for c in val_cases])
        console.print(f"memory budget {parse_size(cfg.train.memory_budget) / GiB:.1f} GiB: chose {report.summary()}")
    if context.is_main:
        _create(run_dir)
        config.dump(cfg, run_dir / "config.yaml")
        atomic_write_text(run_dir / "preprocessing.json", json.dumps(prep.to_dict(), indent=2))
    return cfg, prep, train_cases, val_cases


def _build_run(cfg: Config, prep: Preprocessing, train_cases: Sequence[Case], val_cases: Sequence[Case],
               run_dir: Path, where: Execution) -> RunState:
    """A fresh run's state: network, optimiser, schedule, loss scaler and this process's batches.

    Each process caches and samples its own share of the cases, with its own seed, so the
    processes draw different patches; DDP then averages their gradients.
    """
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, prep.channels, prep.num_classes, prep.spacing).to(where.device, memory_format=where.layout)
    _freeze_unused_heads(model)
    optimizer = build_optimizer(cfg, model)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 has fp32's range.
    scaler = torch.amp.GradScaler(where.device.type, enabled=where.amp_dtype == torch.float16)
    rank, world = where.context.rank, where.context.world_size
    shard_cfg = cfg.replace(train={"batch_size": cfg.train.batch_size // world, "seed": cfg.train.seed + 1000 * rank})
    shard_dir = _cache_dir(cfg, run_dir, prep) / (f"train-rank{rank}" if where.context.enabled else "train")
    batches = training_batches(list(train_cases[rank::world]) or list(train_cases), prep, shard_cfg, shard_dir,
                               where.device)
    split = {"train": [c.name for c in train_cases], "validation": [c.name for c in val_cases]}
    return RunState(cfg, prep, split, model, optimizer, Schedule(optimizer, cfg), scaler, batches, where.context)


def _validation_data(cfg: Config, prep: Preprocessing, val_cases: Sequence[Case], run_dir: Path,
                     context: distributed.Context) -> Iterable[dict]:
    """This process's share of the validation volumes (each process predicts its own)."""
    shard = list(val_cases[context.rank::context.world_size])
    return validation_dataset(shard, prep, cfg, _cache_dir(cfg, run_dir, prep) / f"val-rank{context.rank}") if shard else []


def _build_step(run: RunState, where: Execution, console: Console) -> TrainingStep:
    """The step as this run takes it: DDP around the network with several processes, compiled or
    recorded as `where.compile_mode` says.

    With one process, an out-of-memory error in any step is caught and the step retried more
    cheaply. With several, a change in one process alone would desynchronise them: instead, all
    try one step first without exchanging gradients and agree on the fallback (oom.agree_on_memory).
    """
    trained: nn.Module = run.model
    if where.context.enabled:
        trained = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[where.device.index] if where.device.type == "cuda" else None)
    trained, loss_fn = compile_for_training(trained, DiceCELoss(batch_dice=run.cfg.train.batch_dice), where.compile_mode)
    graph = GraphedStep(trained, loss_fn, run.optimizer, run.scaler, where.amp_dtype, run.cfg.train.grad_clip) \
        if where.compile_mode in ("graphs", "eager-graphs") else None
    fallback = MemoryFallback(enabled=not where.context.enabled, compiled=where.compile_mode in ("on", "graphs"))
    step = TrainingStep(run.model, trained, loss_fn, run.optimizer, run.scaler, where.amp_dtype,
                        run.cfg.train.grad_clip, fallback, graph, where.context, where.layout, console.print)
    if where.context.enabled:
        for change in agree_on_memory(step, next(iter(run.sampler)), where.context):
            console.print(f"out of memory on at least one GPU in the first step: {change} on every GPU")
    return step


def train_one_epoch(step: TrainingStep, run: RunState, steps: int, stop: Callable[[], bool],
                    clock: Callable[[], float], description: str = "epoch",
                    report: RunReport | None = None, epoch: int = 0) -> tuple[float, int]:
    """Up to `steps` optimiser steps on `run.sampler`'s batches, fewer if `stop()` turns true or the
    schedule's time is up; returns (mean loss, steps taken). `clock()` gives the seconds the run
    has been going; the schedule is stepped after every step. `report` shows the progress bar of
    epoch `epoch` (0-based).

    Steps with a non-finite loss are skipped; `train.max_nonfinite_steps` of them in a row end
    training with an error (noticed within 25 steps), before anything is saved, so the last good
    checkpoint stays as it is.
    """
    run.model.train()
    device = next(run.model.parameters()).device
    tally = _LossTally(device, run.cfg.train.max_nonfinite_steps, description)
    taken = 0
    report = report or RunReport(Console(quiet=True), main=False)
    with report.training(description, steps, run.history, epoch, clock()) as display:
        for batch in itertools.islice(run.sampler, steps):
            image, label = step.inputs(batch)
            loss, finite = step(image, label, where=f"{description}, step {taken + 1}")
            taken += 1
            tally.add(loss, finite)
            if taken % 25 == 0:
                tally.check(taken)
            display.step(taken, lambda: tally.check(taken))  # reads the loss only now and then
            # Every process stops at the same step and sets the same learning rate, whichever of
            # them got the signal or has the slowest clock.
            stop_now, seconds = distributed.maximum(run.context, (float(stop()), clock()), device)
            run.schedule.step(seconds)
            if stop_now or run.schedule.time_is_up:
                break
    return tally.check(taken), taken


class _LossTally:
    """The epoch's mean loss over its finite steps and the longest run of non-finite ones.

    The sums stay on the device and are read every 25 steps: reading them every step would be a
    host sync, which keeps the CPU from preparing the next batch and launching the next step while
    the GPU still runs this one.
    """

    def __init__(self, device: torch.device, max_nonfinite: int, description: str) -> None:
        self.max_nonfinite, self.description = max_nonfinite, description
        self.total = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.in_row = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite steps
        self.most_in_row = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.total += torch.where(finite, loss.detach(), 0.0)
        self.finite_steps += finite
        self.in_row = torch.where(finite, 0, self.in_row + 1)
        self.most_in_row = torch.maximum(self.most_in_row, self.in_row)

    def check(self, taken: int) -> float:
        """The mean loss so far; MedsegError if too many steps in a row were not finite."""
        if int(self.most_in_row) >= self.max_nonfinite:
            raise MedsegError(
                f"training diverged: {self.max_nonfinite} consecutive steps with a non-finite loss "
                f"(by {self.description}, step {taken}); the last checkpoint is kept; try a lower train.lr")
        return float(self.total) / max(int(self.finite_steps), 1)


@dataclass(frozen=True)
class Validation:
    """Scores over the validation volumes: mean Dice per foreground class, mean loss per case."""

    dice: list[float]
    loss: float


def validate(model: nn.Module, volumes: Iterable[dict], prep: Preprocessing, cfg: Config,
             amp_dtype: torch.dtype | None, context: distributed.Context = distributed.Context(),
             on_case: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> Validation:
    """Mean Dice per foreground class over whole validation volumes (at the network's spacing), and
    the training loss (Dice + CE) of each volume's sliding-window scores, averaged over the volumes.
    `on_case(name, image, reference, prediction)` is called after each volume.

    With several processes each predicts its share of the volumes and the scores are gathered.
    """
    budget = parse_size(cfg.train.memory_budget) if cfg.train.memory_budget else None
    loss_fn = DiceCELoss(batch_dice=cfg.train.batch_dice)
    scores = []
    for item in volumes:
        image, reference = torch.as_tensor(item["image"])[None], torch.as_tensor(item["label"])
        # Blended on the GPU while that is small against its memory (or the budget), else on the host.
        aggregate = aggregation_device(next(model.parameters()).device, image, prep.num_classes, budget)
        class_scores = predict_scores(model, image, cfg.train.patch_size, cfg.validate.overlap,
                                      cfg.validate.sw_batch_size, amp_dtype, aggregate, cfg.validate.mirror)
        prediction = class_scores.argmax(1)[0]
        # Mirrored scores are probabilities: their logarithm is logits with that softmax.
        logits = class_scores.clamp_min(1e-8).log() if cfg.validate.mirror else class_scores
        loss = float(loss_fn(logits, reference[None].to(logits.device)))
        del class_scores, logits
        scores.append((dice_per_class(prediction, reference[0], prep.num_classes), loss))
        if on_case is not None:
            on_case(str(item.get("name", "")), image[0], reference[0], prediction)
    model.train()
    scores = [row for part in distributed.gather(context, scores) for row in part]
    with np.errstate(all="ignore"):
        dice = [float(v) for v in np.nanmean(np.array([d for d, _ in scores], dtype=float), axis=0)]
    return Validation(dice, float(np.mean([loss for _, loss in scores])) if scores else math.nan)


def _validate_epoch(run: RunState, volumes: Iterable[dict], where: Execution, report: RunReport,
                    epoch: int, stop: Callable[[], bool] = lambda: False) -> dict[str, float]:
    """Validate after epoch `epoch` (0-based) with a progress bar and previews: metrics.csv's
    validation columns. A stop request abandons it before the next case (_ValidationStopped);
    with several processes validation ends first (they gather the scores together)."""
    total = len(volumes)  # type: ignore[arg-type]
    checked = volumes if where.context.enabled else _until_stopped(volumes, stop)
    with report.validation(epoch, total) as on_case:
        try:
            scores = validate(run.model, checked, run.prep, run.cfg, where.amp_dtype, where.context, on_case)
        finally:
            run.model.train()
    return _validation_row(scores, run.prep)


def _validation_row(scores: Validation, prep: Preprocessing) -> dict[str, float]:
    """metrics.csv's validation columns: the validation loss, the mean Dice over the classes that
    occur, and each class's Dice."""
    per_class = scores.dice
    row = {"val_loss": scores.loss,
           "val_dice": float(np.nanmean(per_class)) if not np.all(np.isnan(per_class)) else math.nan}
    row.update({f"dice_{name}": value for value, name in zip(per_class, _class_names(prep))})
    return row


def _timings(epoch_started: float, train_seconds: float, started: float, device: torch.device) -> dict[str, float]:
    row = {"seconds": time.perf_counter() - epoch_started, "train_seconds": train_seconds,
           "elapsed_minutes": (time.perf_counter() - started) / 60}
    if device.type == "cuda":
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    return row


def _save(run: RunState, run_dir: Path, best: bool) -> None:
    """last.pt and metrics.csv (and best.pt when `best`), written by the main process; every
    process takes part (the state gathers the samplers' states)."""
    state = run.state_dict()
    if run.context.is_main:
        _write_metrics(run_dir / "metrics.csv", run.history)
        checkpoint.save(state, run_dir / "last.pt")
        if best:
            checkpoint.save(state, run_dir / "best.pt")


def _banner(cfg: Config, prep: Preprocessing, train_count: int, val_count: int, where: Execution) -> str:
    processes = f" ×{where.context.world_size}" if where.context.enabled else ""
    return (
        f"[bold]medseg train[/]: {train_count} training / {val_count} validation cases, "
        f"spacing {_fmt(prep.spacing)} mm, patch {cfg.train.patch_size}, batch {cfg.train.batch_size}, "
        f"device {where.device}{processes}, amp {amp_name(where.amp_dtype)}, "
        f"checkpointing {cfg.model.checkpointing}, compile {where.compile_mode}"
        + (", channels-last" if where.layout == torch.channels_last_3d else "")
        + (f", {cfg.train.max_minutes:g} min" if cfg.train.max_minutes else "")
    )


def _hold_to_budget(cfg: Config, device: torch.device, console: Console) -> None:
    """On a GPU larger than `train.memory_budget`, let this process use no more than the budget
    (PyTorch's per-process memory fraction): the run behaves as on a card of that size, and leaves
    the rest to others sharing the GPU."""
    if not cfg.train.memory_budget or device.type != "cuda":
        return
    budget = parse_size(cfg.train.memory_budget)
    total = torch.cuda.get_device_properties(device).total_memory
    if budget < total:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(budget / total, index)
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


def _cache_dir(cfg: Config, run_dir: Path, prep: Preprocessing) -> Path:
    # The cached arrays depend on the preprocessing (spacing, normalisation and its statistics,
    # crop, labels): runs sharing data.cache_dir with different preprocessing get different folders.
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "cache"
    return root / f"prep-{cache_key(prep.to_dict())}"


def _run_dir_name(cfg: Config) -> Path:
    if cfg.run_name is not None:
        check_path_component("run_name", cfg.run_name)  # a run never lands outside output_dir
    name = cfg.run_name or f"{Path(cfg.data.dataset).name}-fold{cfg.data.fold}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists():
        raise ConfigError(checkpoint.existing_run(run_dir))
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
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, text.getvalue())


def _fmt(values: Iterable[float]) -> str:
    return "×".join(f"{v:.3g}" for v in values)
