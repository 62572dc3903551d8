"""What a training run shows and writes as it goes: the console and train.log, progress bars with
the loss, speed and time left, progress.png, previews and the experiment tracker."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medseg.errors import MedsegError
from medseg.reporting.log import TrainLog
from medseg.reporting.preview import choose_preview_cases, write_preview
from medseg.reporting.progress import write_progress
from medseg.reporting.tracking import Tracker, open_tracker

REFRESH_SECONDS = 1.0  # the shown loss is read from the device at most this often (each read is a sync)
PACE_EPOCHS = 5  # the ETA's pace: the mean duration of this many last epochs
PROGRESS_NAME = "progress.png"
PREVIEW_DIR = "previews"


class StepDisplay:
    """The training bar of one epoch: steps done, the epoch's mean loss, steps per second, and the
    time left in the run (this epoch's steps at the measured rate, then the remaining epochs at the
    pace of the last ones, but no later than `train.max_minutes`)."""

    def __init__(self, progress: Progress, task: Any, steps: int, later: Callable[[float], float],
                 time_left: float | None) -> None:
        self.progress, self.task, self.steps, self.later, self.time_left = progress, task, steps, later, time_left
        self.started = time.perf_counter()
        self.shown = -math.inf

    def step(self, taken: int, loss: Callable[[], float]) -> None:
        """After step `taken`: advance the bar; on the first step and then every REFRESH_SECONDS,
        also read `loss()` (the mean so far) and show it with the rate and the ETA."""
        now = time.perf_counter()
        fields = {}
        if taken == 1 or taken == self.steps or now - self.shown >= REFRESH_SECONDS:
            self.shown = now
            rate = taken / max(now - self.started, 1e-9)
            eta = (self.steps - taken) / rate + self.later(rate)
            if self.time_left is not None:
                eta = min(eta, max(self.time_left - (now - self.started), 0.0))
            fields["status"] = f"loss {loss():.4f}  {rate:.2f} it/s  ETA {format_seconds(eta)}"
        self.progress.update(self.task, completed=taken, **fields)


class RunReport:
    """One training run's reporting. `console` prints to the terminal and `train.log`; with
    `main=False` (other processes of a distributed run) only previews of this process's
    validation cases are written."""

    def __init__(self, terminal: Console, main: bool = True) -> None:
        self.main = main
        self.log = TrainLog(terminal, enabled=main)
        self.console = self.log.console
        self.tracker: Tracker = Tracker()
        self.run_dir: Path | None = None
        self.epochs, self.max_minutes, self.class_names, self.spacing = 0, None, [], (1.0, 1.0, 1.0)
        self.previews: list[str] = []

    def __enter__(self) -> "RunReport":
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        if isinstance(error, MedsegError):  # the console shows it on stderr; the log keeps it too
            self.log.write(f"error: {error}\n")
        if self.main:
            self.tracker.close()
        return False

    def attach(self, run_dir: Path, cfg: Any, class_names: Sequence[str], spacing: Sequence[float]) -> None:
        """The run directory exists: write train.log there (with what was printed before), say
        where the run is, open the tracker `train.logger` names and log the config."""
        self.run_dir, self.epochs, self.max_minutes = Path(run_dir), cfg.train.epochs, cfg.train.max_minutes
        self.class_names, self.spacing = list(class_names), tuple(float(s) for s in spacing)
        if not self.main:
            return
        self.log.attach(self.run_dir)
        self.console.print(f"run directory {self.run_dir}  (train.log, {PROGRESS_NAME}, {PREVIEW_DIR}/)")
        self.tracker = open_tracker(cfg.train.logger, self.run_dir)
        self.tracker.log_config(_yaml(cfg), _flatten(cfg.to_dict()))

    def choose_previews(self, split: dict[str, list[str]], saved_split: Mapping[str, Any] | None) -> list[str]:
        """The validation cases previewed after each validation: the checkpoint's
        (`saved_split["preview"]`) or chosen now; put into `split`, which the checkpoint saves, so
        they stay the same for the whole run, resumed or not."""
        chosen = (saved_split or {}).get("preview")
        self.previews = list(chosen) if chosen is not None else choose_preview_cases(split.get("validation", []))
        split["preview"] = self.previews
        return self.previews

    @contextmanager
    def training(self, description: str, steps: int, history: Sequence[Mapping[str, Any]], epoch: int,
                 run_seconds: float) -> Iterator[StepDisplay]:
        """The progress bar of epoch `epoch` (0-based) of `steps` steps, `run_seconds` into the run."""
        epochs_after = self.epochs - epoch - 1
        pace = _pace(history)

        def later(rate: float) -> float:
            return epochs_after * (pace if pace is not None else steps / rate)

        time_left = self.max_minutes * 60 - run_seconds if self.max_minutes else None
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        # Bars on a terminal only: a log or a pipe gets the line per epoch instead.
        with Progress(*columns, console=self.console, transient=True, disable=not self.console.is_terminal) as progress:
            task = progress.add_task(description, total=steps, status="first step...")
            yield StepDisplay(progress, task, steps, later, time_left)

    @contextmanager
    def validation(self, epoch: int, total: int) -> Iterator[Callable[[str, Any, Any, Any], None]]:
        """A progress bar over this process's `total` validation cases; yields the callback
        validate() calls after each case (name, image (C, x, y, z), reference, prediction), which
        also writes the case's preview if it is one of the chosen."""
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True, disable=not self.console.is_terminal) as progress:
            task = progress.add_task(f"validation, epoch {epoch + 1}", total=total)

            def on_case(name: str, image: Any, reference: Any, prediction: Any) -> None:
                if name in self.previews and self.run_dir is not None:
                    self.write_case_preview(name, image, reference, prediction, epoch)
                progress.advance(task)

            yield on_case

    def write_case_preview(self, name: str, image: Any, reference: Any, prediction: Any, epoch: int) -> Path:
        """`previews/<name>.png`: the case's first channel with reference and prediction (replaced
        at each validation, so the folder holds one file per chosen case)."""
        assert self.run_dir is not None
        folder = self.run_dir / PREVIEW_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.png"
        write_preview(_numpy(image)[0], {"reference": _numpy(reference), "prediction": _numpy(prediction)},
                      self.class_names, path, self.spacing, title=f"{name}, epoch {epoch + 1}")
        return path

    def epoch_done(self, history: Sequence[Mapping[str, Any]]) -> None:
        """After an epoch's row is in `history` (and metrics.csv): print it, redraw progress.png and
        hand the row (and the previews, after a validation) to the tracker."""
        if not self.main or self.run_dir is None:
            return
        row = history[-1]
        validated = _number(row.get("val_dice")) is not None
        if validated:
            self.console.print(validation_table(row, self.class_names))
        self.console.print(self.epoch_line(history))
        write_progress(history, self.run_dir / PROGRESS_NAME)
        epoch = int(row["epoch"])
        self.tracker.log_metrics(row, epoch)
        for name in self.previews if validated else []:
            path = self.run_dir / PREVIEW_DIR / f"{name}.png"
            if path.is_file():
                self.tracker.log_image(name, path, epoch)

    def epoch_line(self, history: Sequence[Mapping[str, Any]]) -> str:
        """One line per epoch: losses, mean Dice, speed, duration and the time left."""
        row = history[-1]
        parts = [f"epoch {row['epoch']}/{self.epochs}", f"train loss {row['train_loss']:.4f}"]
        if _number(row.get("val_loss")) is not None:
            parts.append(f"val loss {row['val_loss']:.4f}")
        if _number(row.get("val_dice")) is not None:
            parts.append(f"mean Dice {row['val_dice']:.4f}")
        if row.get("train_seconds"):
            parts.append(f"{row['steps'] / row['train_seconds']:.2f} it/s")
        parts.append(f"{row['seconds']:.1f} s")
        left = (self.epochs - int(row["epoch"])) * (_pace(history) or 0.0)
        if self.max_minutes:
            left = min(left, max(self.max_minutes - row["elapsed_minutes"], 0.0) * 60)
        if int(row["epoch"]) < self.epochs and left > 0:
            parts.append(f"ETA {format_seconds(left)}")
        return ", ".join(parts)

    def finished(self, history: Sequence[Mapping[str, Any]]) -> None:
        """The end: the best epoch and its Dice per class, and what the run directory holds."""
        scored = [row for row in history if _number(row.get("val_dice")) is not None]
        if scored:
            best = max(scored, key=lambda row: row["val_dice"])
            per_class = ", ".join(f"{name} {best[f'dice_{name}']:.4f}" for name in self.class_names
                                  if _number(best.get(f"dice_{name}")) is not None)
            self.console.print(f"best epoch {best['epoch']}: mean Dice {best['val_dice']:.4f} ({per_class}); best.pt")
        self.console.print(f"done: {self.run_dir}  (last.pt, best.pt, metrics.csv, config.yaml, train.log, "
                           f"{PROGRESS_NAME}, {PREVIEW_DIR}/)")


def validation_table(row: Mapping[str, Any], class_names: Sequence[str]) -> Table:
    """An epoch's validation Dice per class and mean (and the validation loss)."""
    table = Table(title=f"validation, epoch {row['epoch']}", title_justify="left")
    for name in class_names:
        table.add_column(name, justify="right")
    table.add_column("mean Dice", justify="right", style="bold")
    table.add_column("val loss", justify="right")
    loss = _number(row.get("val_loss"))
    table.add_row(*[f"{row[f'dice_{n}']:.4f}" for n in class_names], f"{row['val_dice']:.4f}",
                  "" if loss is None else f"{loss:.4f}")
    return table


def format_seconds(seconds: float) -> str:
    """h:mm:ss."""
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _pace(history: Sequence[Mapping[str, Any]]) -> float | None:
    recent = [float(row["seconds"]) for row in history[-PACE_EPOCHS:] if _number(row.get("seconds")) is not None]
    return sum(recent) / len(recent) if recent else None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _numpy(value: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _yaml(cfg: Any) -> str:
    import yaml

    # As config.yaml holds it (medseg.config.dump).
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
