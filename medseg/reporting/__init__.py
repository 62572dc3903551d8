"""Watching a training run: train.log, progress bars, progress.png, previews, TensorBoard and MLflow."""

from medseg.reporting.log import LOG_NAME, TrainLog
from medseg.reporting.preview import choose_preview_cases, write_preview
from medseg.reporting.progress import plot_progress, progress_series, write_progress
from medseg.reporting.run import RunReport, StepDisplay
from medseg.reporting.tracking import Tracker, open_tracker

__all__ = ["LOG_NAME", "RunReport", "StepDisplay", "Tracker", "TrainLog", "choose_preview_cases", "open_tracker",
           "plot_progress", "progress_series", "write_preview", "write_progress"]
