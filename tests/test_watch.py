"""Watching a run: train.log, progress.png, previews, val_loss, TensorBoard and MLflow, on one
short run of the bundled sample data."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from matplotlib.image import imread
from rich.console import Console
from typer.testing import CliRunner

from medseg import checkpoint
from medseg.cli import app
from medseg.reporting import RunReport, TrainLog, choose_preview_cases, plot_progress, progress_series, write_preview
from tests.conftest import ROOT

runner = CliRunner()

SHORT = ["model.base_width=4", "model.max_width=16", "train.epochs=2", "train.iterations_per_epoch=2",
         "train.batch_size=1", "train.patch_size=[16,16,16]", "train.workers=0", "validate.every=1",
         "validate.sw_batch_size=4", "data.folds=6"]
CSV_SERIES = ("train_loss", "val_loss", "val_dice", "dice_core", "dice_shell", "seconds", "lr")


def _train(out, name, *extra):
    args = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in [*SHORT, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={out}", f"run_name={name}", *extra]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out / name, result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-epoch run validated after each epoch, tracked with TensorBoard."""
    return _train(tmp_path_factory.mktemp("watch"), "tb", "train.logger=tensorboard")


def _rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open(encoding="utf-8")))


def _check_png(path, min_size=300):
    pixels = imread(path)  # fails on anything but a valid image
    assert pixels.shape[0] > min_size and pixels.shape[1] > min_size, pixels.shape
    assert np.ptp(pixels[..., :3]) > 0.2  # not all one colour


def test_console_and_train_log_say_where_the_run_is_and_how_each_epoch_went(run):
    run_dir, output = run
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert output.index(f"run directory {run_dir}") < output.index("epoch 1/2")  # said at the start
    assert f"run directory {run_dir}" in log
    for epoch in (1, 2):
        line = next(line for line in log.splitlines() if line.startswith(f"epoch {epoch}/2, train loss"))
        assert "val loss" in line and "mean Dice" in line and "it/s" in line
    assert "validation, epoch 2" in log and "nan" not in log
    best = max(_rows(run_dir), key=lambda row: float(row["val_dice"]))
    assert f"best epoch {best['epoch']}: mean Dice {float(best['val_dice']):.4f} (core " in log
    assert "\x1b[" not in log  # plain text


def test_train_log_keeps_earlier_lines_and_appends(tmp_path):
    log = TrainLog(Console(file=open(tmp_path / "terminal.txt", "w", encoding="utf-8"), width=100))
    log.console.print("before the folder exists")
    log.attach(tmp_path)
    log.console.print("[bold]after[/]")
    again = TrainLog(Console(quiet=True))
    again.attach(tmp_path)
    again.console.print("resumed")
    text = (tmp_path / "train.log").read_text(encoding="utf-8")
    assert text.index("before the folder exists") < text.index("after") < text.index("resumed")
    assert text.count("--- medseg train") == 2
    assert "after" in (tmp_path / "terminal.txt").read_text(encoding="utf-8") and "[bold]" not in text


def test_metrics_have_a_finite_validation_loss(run):
    rows = _rows(run[0])
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(math.isfinite(float(row["val_loss"])) and float(row["val_loss"]) > 0 for row in rows)


def test_progress_png_plots_the_rows_of_metrics_csv(run):
    run_dir = run[0]
    _check_png(run_dir / "progress.png", min_size=600)
    rows = _rows(run_dir)
    history = checkpoint.load(run_dir / "last.pt")["history"]
    series = progress_series(history)
    for key in CSV_SERIES:
        epochs, values = series[key]
        assert epochs == [int(row["epoch"]) for row in rows]
        np.testing.assert_allclose(values, [float(row[key]) for row in rows], rtol=1e-12, err_msg=key)
    dice = [float(row["val_dice"]) for row in rows]
    np.testing.assert_allclose(series["val_dice_moving_average"][1], [dice[0], (dice[0] + dice[1]) / 2])
    # The figure draws exactly these series.
    lines = {line.get_label(): line for axis in plot_progress(history).axes for line in axis.get_lines()}
    for key in (*CSV_SERIES, "val_dice_moving_average"):
        np.testing.assert_allclose(lines[key].get_xdata(), series[key][0], err_msg=key)
        np.testing.assert_allclose(lines[key].get_ydata(), series[key][1], err_msg=key)


def test_previews_of_the_chosen_validation_cases(run):
    run_dir = run[0]
    state = checkpoint.load(run_dir / "last.pt")
    chosen = state["split"]["preview"]
    assert 1 <= len(chosen) <= 3 and set(chosen) <= set(state["split"]["validation"])
    assert sorted(p.name for p in (run_dir / "previews").iterdir()) == sorted(f"{n}.png" for n in chosen)
    for name in chosen:
        _check_png(run_dir / "previews" / f"{name}.png")


def test_preview_cases_are_kept_from_the_checkpoint():
    report = RunReport(Console(quiet=True), main=False)
    split = {"validation": ["a", "b", "c", "d", "e"]}
    assert report.choose_previews(split, None) == ["a", "c", "e"] == split["preview"]
    split = {"validation": ["a", "b", "c", "d", "e"]}
    assert report.choose_previews(split, {"preview": ["d"]}) == ["d"] == split["preview"]
    assert choose_preview_cases(["x"]) == ["x"]


def test_preview_overlays_reference_and_prediction_in_their_colours(tmp_path):
    image = np.random.default_rng(0).normal(size=(24, 20, 16)).astype(np.float32)
    reference = np.zeros(image.shape, dtype=np.uint8)
    reference[8:16, 6:14, 4:12] = 1
    prediction = np.zeros_like(reference)
    prediction[10:18, 6:14, 4:12] = 2
    write_preview(image, {"reference": reference, "prediction": prediction}, ["core", "shell"], tmp_path / "p.png")
    pixels = imread(tmp_path / "p.png")[..., :3]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    # Class 1's colour (blue, C0) outlines the reference; class 2's (orange, C1) fills the prediction.
    blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)
    orange = (pixels[..., 0] > 0.6) & (pixels[..., 2] < 0.35) & (pixels[..., 1] > 0.3)
    assert blue.sum() > 50 and orange.sum() > 200


def test_step_display_shows_loss_rate_and_eta_from_the_first_step():
    console = Console(record=True, width=200, force_terminal=False)
    report = RunReport(console)
    reads = []

    def loss():
        reads.append(1)
        return 0.75

    with report.training("epoch 1/3", 10, [], 0, 0.0) as display:
        display.step(1, loss)
        status = display.progress.tasks[0].fields["status"]
        for taken in range(2, 6):
            display.step(taken, loss)
    assert status.startswith("loss 0.7500") and "it/s" in status and "ETA 0:" in status
    assert len(reads) < 5  # read at the first step, then only now and then


def test_tensorboard_holds_every_metrics_column_the_config_and_the_previews(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run[0]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    rows = _rows(run_dir)
    for key in rows[0]:
        if key == "epoch":
            continue
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2], key
        np.testing.assert_allclose([e.value for e in logged], [float(r[key]) for r in rows], rtol=1e-6, err_msg=key)
    chosen = checkpoint.load(run_dir / "last.pt")["split"]["preview"]
    assert sorted(events.Tags()["images"]) == sorted(f"preview/{n}" for n in chosen)
    assert [e.step for e in events.Images(f"preview/{chosen[0]}")] == [1, 2]
    assert "config" in " ".join(events.Tags()["tensors"])


def test_mlflow_file_store_holds_metrics_params_config_and_previews(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, _ = _train(tmp_path, "ml", "train.logger=mlflow", "train.epochs=1")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the file store back, as medseg writes it
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run_id = (run_dir / "mlflow_run_id").read_text(encoding="utf-8").strip()
    rows = _rows(run_dir)
    for key in rows[0]:
        if key != "epoch":
            history = client.get_metric_history(run_id, key)
            assert [(m.step, pytest.approx(m.value)) for m in history] == [(1, float(rows[0][key]))], key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.logger"] == "mlflow" and run.data.params["train.epochs"] == "1"
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert "config.yaml" in artifacts
    chosen = checkpoint.load(run_dir / "last.pt")["split"]["preview"]
    previews = [a.path for a in client.list_artifacts(run_id, "previews/epoch001")]
    assert sorted(previews) == sorted(f"previews/epoch001/{n}.png" for n in chosen)


def test_missing_tracking_package_is_one_line_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    args = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in [*SHORT, f"data.dataset={ROOT / 'sample_data'}", f"output_dir={tmp_path}", "run_name=x",
                 "train.logger=tensorboard"]:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "pip install 'medseg[tensorboard]'" in result.output and "Traceback" not in result.output


def test_infer_preview_writes_a_png_per_input(run, tmp_path):
    images = sorted((ROOT / "sample_data" / "imagesTr").iterdir())[:2]
    result = runner.invoke(app, ["infer", str(run[0] / "best.pt"), *map(str, images), "-o", str(tmp_path / "out"),
                                 "--preview", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for image in images:
        name = image.name.removesuffix(".nii.gz")
        assert (tmp_path / "out" / f"{name}.nii.gz").is_file()
        _check_png(tmp_path / "out" / f"{name}_preview.png")
