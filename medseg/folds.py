"""Cross-validation: every fold trained into one folder, scored on its validation cases, and the
postprocessing chosen on those predictions.

`medseg train CONFIG --folds all` (or `--folds 0,2`) trains fold k as `medseg train` would with
`data.fold=k`, one after another, into `<output_dir>/<name>-cv-<timestamp>/fold<k>/`. Then each
fold's best.pt segments its own validation cases through `medseg infer`'s path (so the scores are
on each case's original grid, as a user would see them) into `fold<k>/validation/`, and the parent
folder gets:

| file | what it is |
|---|---|
| `crossval.json` | Dice per fold and class, overall (every validation case once), and after the postprocessing |
| `crossval.csv` | one row per case and class: fold, case, class, dice, dice_postprocessed |
| `postprocessing.json` | the postprocessing decision (`medseg.postprocessing`), which `medseg infer` applies |

`medseg infer <parent> ...` then runs the fold ensemble with that postprocessing.

The parent folder also holds `folds.json` (the folds asked for and the config), written first:
`medseg train --resume <parent>` continues a cross-validation that was stopped, resuming the fold
that was training, training the folds not yet started, then scoring.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console

from medseg.config import Config
from medseg.errors import ConfigError, DataError
from medseg.metrics import json_safe, nanmean

CROSSVAL_JSON = "crossval.json"
CROSSVAL_CSV = "crossval.csv"
PLAN_JSON = "folds.json"


def parse_folds(text: str, folds: int) -> list[int]:
    """`all` (0..folds-1) or a comma-separated list of fold numbers; ConfigError naming the problem."""
    if text.strip().lower() == "all":
        return list(range(folds))
    try:
        chosen = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--folds {text!r}: expected 'all' or fold numbers such as 0,1,2") from None
    bad = [k for k in chosen if not 0 <= k < folds]
    if not chosen or bad or len(set(chosen)) != len(chosen):
        raise ConfigError(f"--folds {text!r}: each fold once, in 0..{folds - 1} (data.folds={folds})")
    return chosen


def cross_validate(cfg: Config, folds: Sequence[int], console: Console | None = None) -> Path:
    """Train `folds` of `cfg` one after another into one parent folder, then score and choose the
    postprocessing (see the module docstring); returns the parent folder."""
    from medseg.files import atomic_write_text
    from medseg.train import train

    console = console or Console()
    cfg = cfg.replace(data={"dataset": os.path.abspath(cfg.data.dataset)})  # resumable from any folder
    parent = _parent_folder(cfg)
    atomic_write_text(parent / PLAN_JSON, json.dumps({"folds": list(folds), "config": cfg.to_dict()}, indent=2) + "\n")
    for k in folds:
        console.print(f"cross-validation: fold {k} ({list(folds).index(k) + 1} of {len(folds)}) into {parent / f'fold{k}'}")
        train(cfg.replace(output_dir=str(parent), run_name=f"fold{k}", data={"fold": k}), console=console)
    return _finish(parent, folds, cfg, console)


def is_cross_validation(folder: Path) -> bool:
    """Whether `folder` is the parent folder of a cross-validation (`cross_validate` made it)."""
    return (Path(folder) / PLAN_JSON).is_file()


def resume_cross_validation(parent: Path, overrides: Sequence[str] = (), console: Console | None = None) -> Path:
    """Continue the cross-validation in `parent`: each fold with a checkpoint is resumed (a
    finished one says so), each fold not started is trained, then all are scored. `overrides`:
    what `--resume` may change (`run_state.ADJUSTABLE_ON_RESUME`), for every fold."""
    from medseg.run_state import resumed_config
    from medseg.train import train

    console = console or Console()
    parent = Path(parent)
    try:
        plan = json.loads((parent / PLAN_JSON).read_text(encoding="utf-8"))
        folds = [int(k) for k in plan["folds"]]
        cfg = resumed_config({"config": plan["config"]}, overrides, parent)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{parent / PLAN_JSON}: not a cross-validation record ({exc.__class__.__name__})") from None
    for k in folds:
        run = parent / f"fold{k}"
        console.print(f"cross-validation: fold {k} ({folds.index(k) + 1} of {len(folds)}) in {run}")
        if run.exists():
            train(None, resume=run, console=console, overrides=overrides)  # says so when it is finished
        else:
            train(cfg.replace(output_dir=str(parent), run_name=f"fold{k}", data={"fold": k}), console=console)
    return _finish(parent, folds, cfg, console)


def _finish(parent: Path, folds: Sequence[int], cfg: Config, console: Console) -> Path:
    summary = score_folds(parent, folds, cfg, console)
    console.print(f"cross-validation Dice: {summary['overall']['mean_dice']:.4f} (per fold: "
                  + ", ".join(f"{k} {v['mean_dice']:.4f}" for k, v in summary["folds"].items()) + ")")
    console.print(f"postprocessing: largest component for classes {summary['postprocessing']['largest_component'] or 'none'}; "
                  f"wrote {parent / CROSSVAL_JSON}, {parent / CROSSVAL_CSV}, {parent / 'postprocessing.json'}")
    return parent


def score_folds(parent: Path, folds: Sequence[int], cfg: Config, console: Console | None = None) -> dict[str, Any]:
    """Predict each fold's validation cases with its best.pt, score them, choose the postprocessing
    and write crossval.json, crossval.csv and postprocessing.json into `parent`; returns crossval.json's content."""
    from medseg import postprocessing

    rows: list[dict[str, Any]] = []
    scores = []
    names: dict[int, str] = {}
    for k in folds:
        for case, prediction, reference, class_names in _fold_predictions(parent / f"fold{k}", cfg, console):
            names = class_names
            case_scores = postprocessing.score_case(prediction, reference, [c for c in names if c > 0])
            scores.append(case_scores)
            rows += [{"fold": k, "case": case, "class": names[c], "value": c, "dice": before, "after": after}
                     for c, (before, after) in case_scores.items()]
    decision = postprocessing.choose(scores, names)
    applied = set(postprocessing.largest_component_classes(decision))
    for row in rows:
        row["dice_postprocessed"] = row["after"] if row["value"] in applied else row["dice"]
    summary = _summary(rows, folds, names, decision)
    postprocessing.write(parent, decision)
    _write(parent, summary, rows)
    return summary


def _fold_predictions(run_dir: Path, cfg: Config, console: Console | None):  # type: ignore[no-untyped-def]
    """(case, prediction, reference, class names) of each validation case of one fold, predicted
    by its best.pt into `run_dir/validation/` as `medseg infer` would."""
    from medseg import checkpoint
    from medseg.data.cases import InferenceInput, find_dataset
    from medseg.data.io import load_volume
    from medseg.infer import Ensemble, Model, Options, segment_inputs

    best = run_dir / "best.pt"
    state = checkpoint.load(best)
    validation = state.get("split", {}).get("validation", [])
    if not validation:
        raise DataError(f"{best}: the fold has no validation cases to score")
    by_name = {case.name: case for case in find_dataset(cfg.data.dataset).cases}
    cases = [by_name[name] for name in validation if name in by_name]
    if len(cases) != len(validation):
        raise DataError(f"{cfg.data.dataset}: validation cases of {best} are missing from the dataset")
    ensemble = Ensemble.from_model(Model((state,), (str(best),)), cfg.train.device)
    out = run_dir / "validation"
    out.mkdir(exist_ok=True)
    options = Options(cfg.validate.overlap, cfg.validate.mirror, cfg.validate.sw_batch_size)
    results = segment_inputs(ensemble, [InferenceInput(c.name, c.images) for c in cases], out, options)
    failed = [r.error for r in results if r.error]
    if failed:
        raise DataError(failed[0])
    class_names = dict(enumerate(ensemble.class_names()))
    for case, result in zip(cases, results):
        assert result.output is not None and case.label is not None
        prediction = load_volume(result.output, label=True)[0][0]
        reference = load_volume(case.label, label=True)[0][0]
        yield case.name, np.asarray(prediction), np.asarray(reference), class_names


def _summary(rows: list[dict[str, Any]], folds: Sequence[int], names: dict[int, str],
             decision: dict[str, Any]) -> dict[str, Any]:
    """Mean Dice per class (NaN cases left out) and over classes: per fold, overall, postprocessed."""
    foreground = [names[c] for c in sorted(names) if c > 0]

    def means(selected: list[dict[str, Any]], key: str) -> dict[str, Any]:
        per_class = {name: nanmean([r[key] for r in selected if r["class"] == name]) for name in foreground}
        return {"dice": per_class, "mean_dice": nanmean(list(per_class.values())),
                "cases": sorted({r["case"] for r in selected})}

    return {
        "folds": {str(k): means([r for r in rows if r["fold"] == k], "dice") for k in folds},
        "overall": means(rows, "dice"),
        "postprocessed": means(rows, "dice_postprocessed"),
        "postprocessing": decision,
    }


def _write(parent: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from medseg.files import atomic_write_text

    atomic_write_text(parent / CROSSVAL_JSON, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["fold", "case", "class", "dice", "dice_postprocessed"])
    for row in rows:
        writer.writerow([row["fold"], row["case"], row["class"], _cell(row["dice"]), _cell(row["dice_postprocessed"])])
    atomic_write_text(parent / CROSSVAL_CSV, buffer.getvalue())


def _parent_folder(cfg: Config) -> Path:
    name = f"{cfg.run_name or Path(cfg.data.dataset).name}-cv-{datetime.now():%Y%m%d-%H%M%S}"
    parent = Path(cfg.output_dir) / name
    try:
        parent.mkdir(parents=True)
    except FileExistsError:
        raise ConfigError(f"{parent}: already exists; start the cross-validation again in a moment or "
                          "give another run_name") from None
    except OSError as exc:
        raise ConfigError(f"{parent}: cannot create the cross-validation folder ({exc.strerror or exc})") from None
    return parent


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"
