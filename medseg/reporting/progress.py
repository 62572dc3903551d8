"""progress.png: a run's curves at a glance (as nnU-Net's), drawn from metrics.csv's rows."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from medseg.files import atomic_write

MOVING_AVERAGE = 5  # validations averaged in the smoothed mean Dice
# Classes' Dice in colours apart from the losses' (blue, red) and the mean Dice's (green).
CLASS_COLOURS = ("tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
Series = tuple[list[int], list[float]]  # (epochs, values) where the column has a finite value


def progress_series(history: Sequence[dict[str, Any]]) -> dict[str, Series]:
    """What progress.png plots, per metrics.csv column: the epochs where the column has a finite
    value and those values (`train_loss`, `val_loss`, `val_dice`, each `dice_<class>`, `seconds`,
    `lr`), plus `val_dice_moving_average`: the mean of `val_dice` over the last
    `MOVING_AVERAGE` validations at each validated epoch."""
    columns = [key for key in _columns(history) if key in ("train_loss", "val_loss", "val_dice", "seconds", "lr")
               or key.startswith("dice_")]
    series: dict[str, Series] = {}
    for key in columns:
        points = [(int(row["epoch"]), float(row[key])) for row in history if _finite(row.get(key))]
        series[key] = ([e for e, _ in points], [v for _, v in points])
    epochs, dice = series.get("val_dice", ([], []))
    smoothed = [sum(dice[max(0, i + 1 - MOVING_AVERAGE):i + 1]) / len(dice[max(0, i + 1 - MOVING_AVERAGE):i + 1])
                for i in range(len(dice))]
    series["val_dice_moving_average"] = (list(epochs), smoothed)
    return series


def plot_progress(history: Sequence[dict[str, Any]]) -> Any:
    """A matplotlib Figure of `progress_series(history)`: losses and Dice (second axis), seconds
    per epoch, learning rate. Each line's label is its series' name."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = progress_series(history)
    # Fixed margins (room for the second axis's labels; above, for the legend's rows): a layout
    # engine would measure every label at every draw, most of the drawing's time.
    figure = Figure(figsize=(10, 10), dpi=100)
    loss_axis, time_axis, lr_axis = figure.subplots(3, 1, sharex=True, height_ratios=(2.2, 1, 1))
    dice_axis = loss_axis.twinx()
    for key, style in (("train_loss", dict(color="tab:blue")), ("val_loss", dict(color="tab:red", marker="o"))):
        _line(loss_axis, series, key, **style, linewidth=2)
    classes = sorted(key for key in series if key.startswith("dice_"))
    for index, key in enumerate(classes):
        _line(dice_axis, series, key, color=CLASS_COLOURS[index % len(CLASS_COLOURS)], linestyle=":", marker=".",
              linewidth=1.4)
    _line(dice_axis, series, "val_dice", color="tab:green", marker="o", linewidth=2)
    _line(dice_axis, series, "val_dice_moving_average", color="tab:green", linestyle="--", linewidth=2)
    loss_axis.set_ylabel("loss (Dice + CE)")
    dice_axis.set_ylabel("validation Dice")
    dice_axis.set_ylim(0, 1)
    handles = loss_axis.get_lines() + dice_axis.get_lines()
    figure.subplots_adjust(left=0.09, right=0.91, bottom=0.06, top=0.97 - 0.022 * math.ceil(len(handles) / 3),
                           hspace=0.12)
    # Above the panel, where no curve runs.
    loss_axis.legend(handles, [_legend(line.get_label()) for line in handles], loc="lower center",
                     bbox_to_anchor=(0.5, 1.01), ncol=3, fontsize=9, frameon=False)
    _line(time_axis, series, "seconds", color="tab:gray", marker=".")
    time_axis.set_ylabel("seconds per epoch")
    time_axis.set_ylim(bottom=0)
    _line(lr_axis, series, "lr", color="tab:orange", marker=".")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("epoch")
    lr_axis.set_ylim(bottom=0)
    lr_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in (loss_axis, time_axis, lr_axis):
        axis.grid(alpha=0.3)
    return figure


def write_progress(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Draw `plot_progress(history)` into the PNG `path`, replacing it atomically."""
    buffer = io.BytesIO()
    plot_progress(history).savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())


def _line(axis: Any, series: dict[str, Series], key: str, **style: Any) -> None:
    if key in series and series[key][0]:
        axis.plot(*series[key], label=key, **style)


def _legend(key: str) -> str:
    names = {"train_loss": "training loss", "val_loss": "validation loss", "val_dice": "mean Dice",
             "val_dice_moving_average": f"mean Dice, moving average ({MOVING_AVERAGE})"}
    return names.get(key, f"Dice {key.removeprefix('dice_')}")


def _columns(history: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    return columns


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
