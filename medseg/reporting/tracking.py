"""Experiment tracking: a run's config, metrics per epoch and previews handed to TensorBoard or MLflow."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from medseg.errors import MedsegError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_EXPERIMENT = "medseg"
MLFLOW_RUN_FILE = "mlflow_run_id"  # in the run directory: a resumed run goes on logging into the same MLflow run


class Tracker:
    """No tracking (`train.logger: none`); the interface the others implement."""

    def log_config(self, config_text: str, flat: Mapping[str, Any]) -> None:
        """The resolved config, as YAML text and as flat `section.key` parameters."""

    def log_metrics(self, row: Mapping[str, Any], epoch: int) -> None:
        """One metrics.csv row (its finite numbers) at `epoch`."""

    def log_image(self, name: str, path: Path, epoch: int) -> None:
        """A PNG file (a preview) at `epoch`."""

    def close(self) -> None:
        """Flush and end."""


def open_tracker(kind: str, run_dir: Path) -> Tracker:
    """The tracker `train.logger` names; MedsegError in one line if its package is not installed."""
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR)
    if kind == "mlflow":
        return MLflowTracker(Path(run_dir))
    return Tracker()


def numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of a metrics row, but the epoch (the step they are logged at)."""
    values = {}
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(float(value)):
            values[key] = float(value)
    return values


class TensorBoardTracker(Tracker):
    """Event files in `<run>/tensorboard` (torch.utils.tensorboard's SummaryWriter)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MedsegError("train.logger=tensorboard needs the tensorboard package: "
                              "pip install 'medseg[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def log_config(self, config_text: str, flat: Mapping[str, Any]) -> None:
        # Indented: TensorBoard renders text as Markdown, and an indented block keeps the YAML as it is.
        self.writer.add_text("config", "\n".join("    " + line for line in config_text.splitlines()))

    def log_metrics(self, row: Mapping[str, Any], epoch: int) -> None:
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def log_image(self, name: str, path: Path, epoch: int) -> None:
        from matplotlib.image import imread

        pixels = imread(path)[..., :3]
        self.writer.add_image(f"preview/{name}", pixels, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run in experiment `medseg`, at MLFLOW_TRACKING_URI or else in the local file store
    `<run>/mlruns`; its id is kept in `<run>/mlflow_run_id` so that a resumed run continues it."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise MedsegError("train.logger=mlflow needs the mlflow-skinny package: pip install 'medseg[mlflow]'") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / MLFLOW_DIR).resolve().as_uri()
        with _local_store_allowed(uri):
            self.client = MlflowClient(tracking_uri=uri)
        id_file = Path(run_dir) / MLFLOW_RUN_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text(encoding="utf-8").strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(MLFLOW_EXPERIMENT)
            self.run_id = self.client.create_run(experiment_id, run_name=Path(run_dir).name,
                                                 tags={"medseg.run_dir": str(Path(run_dir).resolve())}).info.run_id
            from medseg.files import atomic_write_text

            atomic_write_text(id_file, self.run_id + "\n")

    def log_config(self, config_text: str, flat: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = [Param(key, json.dumps(value) if not isinstance(value, str) else value)
                  for key, value in flat.items() if key not in existing]  # parameters cannot change once logged
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, config_text, "config.yaml")

    def log_metrics(self, row: Mapping[str, Any], epoch: int) -> None:
        from mlflow.entities import Metric

        stamp = _milliseconds()
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, epoch)
                                                    for key, value in numbers(row).items()])

    def log_image(self, name: str, path: Path, epoch: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=f"previews/epoch{epoch:03d}")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@contextmanager
def _local_store_allowed(uri: str) -> Iterator[None]:
    # MLflow 3 keeps its local file store only behind MLFLOW_ALLOW_FILE_STORE (its SQL store needs
    # SQLAlchemy, which mlflow-skinny lacks). For a file store the opt-in is given while the client
    # is made (the store is checked then) and taken back: the environment stays the user's.
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


def _milliseconds() -> int:
    import time

    return int(time.time() * 1000)
