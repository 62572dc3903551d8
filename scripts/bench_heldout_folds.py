"""Cross-validation and the fold ensemble measured on a held-out test set, through the real CLI.

A seeded split puts a fraction of the cases (a fifth by default) aside as a test set that no fold
sees. The rest become a dataset folder of their own (links to the original files, or copies) on
which `medseg plan` and `medseg train PLAN --folds all` run as a user runs them. Then every fold's
best.pt and the fold ensemble (`medseg infer` of the cross-validation folder, with the
postprocessing the cross-validation chose) segment the test images, and `medseg evaluate
--require-all` scores them. One table compares each fold's cross-validation Dice (on its own
validation cases) with the held-out Dice of its model, and the ensemble's held-out Dice with the
cross-validation's; it is printed and written as heldout.json and heldout.md with the wall time
of every stage.

    python scripts/bench_heldout_folds.py DATASET -o OUT [--test-fraction 0.2] [--seed 0] \\
        [--folds-count 5] [--gpu-memory 24GiB] [--copy] [--set train.max_minutes=1 ...]

OUT (which must not exist, or be empty) then holds dataset/ (the working cases and their
dataset.json), test/imagesTs and test/labelsTs, plan.yaml, runs/bench-cv-<stamp>/ (the folds),
heldout/fold<k>/ and heldout/ensemble/ (predictions with evaluation.csv/json), logs/<step>.log
(each command's output), heldout.json and heldout.md. Inference uses the overlap, mirroring and
sliding-window batch the folds validated with (their config.yaml), so held-out and
cross-validation Dice are measured alike. A failed step ends the script with exit code 1, naming
the step and its log; bad arguments or data end it with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.metrics import json_safe, nanmean

# Keys the script itself sets: a --set of one of these would break the layout it reads back.
RESERVED = ("output_dir", "run_name", "data.dataset", "data.folds", "data.fold")
RUN_NAME = "bench"


class BenchError(Exception):
    """Bad arguments or data: one line, exit code 2."""


class StepFailed(Exception):
    """A medseg command exited non-zero: one line naming it, exit code 1."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit code (0, 1 for a failed step, 2 for bad input)."""
    args = _arguments(argv)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench_heldout_folds: error: {exc}", file=sys.stderr)
        return 2
    except StepFailed as exc:
        print(f"bench_heldout_folds: {exc}", file=sys.stderr)
        return 1
    print(markdown(report))
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in order (see the module docstring); the report heldout.json holds."""
    out: Path = args.out.absolute()  # plan and the runs record absolute paths, whatever the cwd
    _check_arguments(args)
    walls: dict[str, float] = {}
    started = time.perf_counter()
    names = source_case_names(args.dataset)
    test = choose_test_cases(names, args.test_fraction, args.seed, args.folds_count)
    try:
        write_split(args.dataset, out, test, copy=args.copy)
    except OSError as exc:
        raise BenchError(f"{out}: cannot write the split ({exc.strerror or exc})") from None
    walls["split"] = time.perf_counter() - started
    logs = out / "logs"
    medseg = [sys.executable, "-m", "medseg"]
    memory = ["--gpu-memory", args.gpu_memory] if args.gpu_memory else []
    walls["plan"] = run_step("plan", [*medseg, "plan", str(out / "dataset"), "-o", str(out / "plan.yaml"), *memory], logs)
    sets = [*args.set, f"output_dir={out / 'runs'}", f"run_name={RUN_NAME}", f"data.folds={args.folds_count}"]
    walls["train --folds all"] = run_step(
        "train", [*medseg, "train", str(out / "plan.yaml"), "--folds", "all", *_flags("--set", sets)], logs)
    parent = cross_validation_folder(out / "runs")
    crossval = _read_json(parent / "crossval.json")
    folds = sorted(int(k) for k in crossval["folds"])
    check_held_out(parent, folds, test)
    options = inference_options(parent / f"fold{folds[0]}" / "config.yaml")
    heldout: dict[str, dict[str, Any]] = {}
    for name, model in [*((f"fold{k}", parent / f"fold{k}" / "best.pt") for k in folds), ("ensemble", parent)]:
        predictions = out / "heldout" / name
        walls[f"infer {name}"] = run_step(
            f"infer-{name}", [*medseg, "infer", str(model), str(out / "test" / "imagesTs"), "-o", str(predictions),
                              *options], logs)
        walls[f"evaluate {name}"] = run_step(
            f"evaluate-{name}", [*medseg, "evaluate", str(predictions), str(out / "test" / "labelsTs"),
                                 "--checkpoint", str(model), "--require-all"], logs)
        heldout[name] = heldout_dice(predictions / "evaluation.json")
    walls["total"] = time.perf_counter() - started
    report = build_report(args, len(names) - len(test), test, parent, crossval, heldout, walls)
    (out / "heldout.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    (out / "heldout.md").write_text(markdown(report) + "\n")
    return report


def source_case_names(dataset: Path) -> list[str]:
    """The case names of an MSD-layout dataset (dataset.json, imagesTr, labelsTr), as medseg reads it."""
    from medseg.data.cases import find_dataset
    from medseg.errors import MedsegError

    if not (dataset / "dataset.json").is_file():
        raise BenchError(f"{dataset}: not an MSD-layout dataset (no dataset.json)")
    try:
        info = find_dataset(dataset)
    except MedsegError as exc:
        raise BenchError(str(exc)) from None
    unlabelled = [case.name for case in info.cases if case.label is None]
    if unlabelled:
        raise BenchError(f"{dataset}: cases without a label cannot be scored ({', '.join(unlabelled[:5])})")
    return sorted(case.name for case in info.cases)


def choose_test_cases(names: Sequence[str], fraction: float, seed: int, folds: int) -> list[str]:
    """The held-out cases: round(fraction x cases) of the sorted names (at least one), drawn by
    numpy's RandomState(seed), so one seed gives one test set; sorted. BenchError when fewer
    than `folds` cases would be left for the cross-validation."""
    ordered = sorted(names)
    count = max(1, int(len(ordered) * fraction + 0.5))
    if len(ordered) - count < folds:
        raise BenchError(f"{len(ordered)} cases: holding out {count} leaves {len(ordered) - count}, fewer than "
                         f"the {folds} folds need (lower --folds-count or --test-fraction)")
    chosen = np.random.RandomState(seed).permutation(len(ordered))[:count]
    return sorted(ordered[i] for i in chosen)


def write_split(dataset: Path, out: Path, test: Sequence[str], copy: bool = False) -> None:
    """OUT/dataset/ (imagesTr, labelsTr and a dataset.json listing the other cases) and
    OUT/test/imagesTs, OUT/test/labelsTs, each file a link to the original (or a copy).

    The links lie inside the new dataset folder and its dataset.json names them by paths inside
    it: medseg follows links placed inside a dataset (docs/reliability.md)."""
    from medseg.data.cases import find_dataset, image_suffix

    info = find_dataset(dataset)
    description = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    held_out = set(test)
    training = []
    for case in sorted(info.cases, key=lambda c: c.name):
        into = ("test", "imagesTs", "labelsTs") if case.name in held_out else ("dataset", "imagesTr", "labelsTr")
        images, labels = out / into[0] / into[1], out / into[0] / into[2]
        suffix = image_suffix(case.images[0])
        for index, image in enumerate(case.images):
            channel = f"_{index:04d}" if len(case.images) > 1 else ""
            _place(image, images / f"{case.name}{channel}{image_suffix(image)}", copy)
        assert case.label is not None  # source_case_names refused unlabelled cases
        _place(case.label, labels / f"{case.name}{image_suffix(case.label)}", copy)
        if case.name not in held_out:
            training.append({"image": f"./imagesTr/{case.name}{suffix}",
                             "label": f"./labelsTr/{case.name}{image_suffix(case.label)}"})
    description.update(training=training, numTraining=len(training), test=[], numTest=0)
    (out / "dataset" / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")


def run_step(name: str, command: Sequence[str], logs: Path) -> float:
    """Run one medseg command, its output shown and kept in logs/<name>.log; its wall seconds.
    StepFailed naming the step and its log when it exits non-zero."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as stream:
        # Rich wraps at 80 columns when it does not write to a terminal: wider keeps paths on one line.
        env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "160")}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                   errors="replace", env=env)
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            stream.write(line)
        code = process.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        raise StepFailed(f"step '{name}' failed with exit code {code} after {seconds:.1f} s (output in {log})")
    return seconds


def cross_validation_folder(runs: Path) -> Path:
    """The one folder `medseg train --folds` made under `runs`."""
    found = sorted(runs.glob(f"{RUN_NAME}-cv-*"))
    if len(found) != 1:
        raise StepFailed(f"step 'train' left {len(found)} cross-validation folders in {runs}, expected 1")
    return found[0]


def check_held_out(parent: Path, folds: Sequence[int], test: Sequence[str]) -> None:
    """StepFailed unless every fold's best.pt was trained and validated on none of the test cases
    (the split its checkpoint records)."""
    from medseg import checkpoint

    for k in folds:
        split = checkpoint.load(parent / f"fold{k}" / "best.pt").get("split", {})
        seen = set(split.get("train", [])) | set(split.get("validation", []))
        leaked = sorted(seen & set(test))
        if not seen or leaked:
            raise StepFailed(f"fold {k} saw held-out cases ({', '.join(leaked)})" if leaked
                             else f"fold {k}: its best.pt records no split to check the test set against")


def inference_options(config_yaml: Path) -> list[str]:
    """`medseg infer` options for the overlap, mirroring and window batch a fold validated with."""
    import yaml

    validate = yaml.safe_load(config_yaml.read_text(encoding="utf-8"))["validate"]
    options = ["--overlap", str(validate["overlap"]), "--sw-batch-size", str(validate["sw_batch_size"])]
    return options + (["--mirror"] if validate["mirror"] else [])


def heldout_dice(evaluation_json: Path) -> dict[str, Any]:
    """{"dice": {class: mean over the test cases}, "mean_dice": over classes} from evaluation.json
    (a class absent from every case, NaN, is left out of the mean, as crossval.json does)."""
    summary = _read_json(evaluation_json)["summary"]
    dice = {name: _number(metrics["dice"]["mean"]) for name, metrics in summary.items()}
    return {"dice": dice, "mean_dice": nanmean(list(dice.values()))}


def build_report(args: argparse.Namespace, working: int, test: Sequence[str], parent: Path,
                 crossval: dict[str, Any], heldout: dict[str, dict[str, Any]],
                 walls: dict[str, float]) -> dict[str, Any]:
    """What heldout.json holds: the settings, the per-fold and ensemble Dice, the wall times."""
    folds = sorted(int(k) for k in crossval["folds"])
    classes = list(crossval["overall"]["dice"])
    fold_rows = [{"fold": k, "cv": _dice(crossval["folds"][str(k)]), "heldout": heldout[f"fold{k}"]}
                 for k in folds]
    per_class = {c: nanmean([row["heldout"]["dice"][c] for row in fold_rows]) for c in classes}
    names = {int(v): item["name"] for v, item in crossval["postprocessing"]["classes"].items()}
    return {
        "dataset": str(args.dataset), "test_fraction": args.test_fraction, "seed": args.seed,
        "folds_count": args.folds_count, "overrides": list(args.set), "cross_validation_folder": str(parent),
        "cases": {"working": working, "test": len(test), "test_cases": list(test)},
        "classes": classes,
        "folds": fold_rows,
        "cv_overall": _dice(crossval["overall"]),
        "heldout_fold_mean": {"dice": per_class, "mean_dice": nanmean(list(per_class.values()))},
        "ensemble": {"cv_postprocessed": _dice(crossval["postprocessed"]), "heldout": heldout["ensemble"],
                     "largest_component": [names[c] for c in crossval["postprocessing"]["largest_component"]]},
        "wall_seconds": {stage: round(seconds, 2) for stage, seconds in walls.items()},
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown snippet: the Dice table, then the wall time of each stage."""
    classes = report["classes"]
    header = ["model", *(f"CV {c}" for c in classes), "CV mean", *(f"held-out {c}" for c in classes), "held-out mean"]
    rows = [(f"fold {row['fold']}", row["cv"], row["heldout"]) for row in report["folds"]]
    rows.append(("all folds (CV overall; held-out: mean of the fold models)", report["cv_overall"],
                 report["heldout_fold_mean"]))
    kept = ", ".join(report["ensemble"]["largest_component"]) or "none"
    rows.append((f"ensemble (CV: overall after postprocessing; largest component: {kept})",
                 report["ensemble"]["cv_postprocessed"], report["ensemble"]["heldout"]))
    cases = report["cases"]
    lines = [f"Held-out test of {report['folds_count']}-fold cross-validation on {report['dataset']}: "
             f"{cases['working']} cases cross-validated, {cases['test']} held out (fraction {report['test_fraction']}, "
             f"seed {report['seed']}); overrides: {' '.join(report['overrides']) or 'none'}.", "",
             _row(header), _row(["---"] * len(header))]
    for label, cv, held in rows:
        lines.append(_row([label, *(_cell(cv["dice"][c]) for c in classes), _cell(cv["mean_dice"]),
                           *(_cell(held["dice"][c]) for c in classes), _cell(held["mean_dice"])]))
    lines += ["", _row(["stage", "wall s"]), _row(["---", "---"])]
    lines += [_row([stage, f"{seconds:.1f}"]) for stage, seconds in report["wall_seconds"].items()]
    return "\n".join(lines)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="MSD-layout dataset folder (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (new, or empty)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="fraction of the cases held out (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split (0)")
    parser.add_argument("--folds-count", type=int, default=5, help="folds of the cross-validation (5)")
    parser.add_argument("--gpu-memory", help="medseg plan's --gpu-memory (its default without it)")
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="medseg train --set override (repeatable)")
    return parser.parse_args(argv)


def _check_arguments(args: argparse.Namespace) -> None:
    if not 0 < args.test_fraction < 1:
        raise BenchError(f"--test-fraction {args.test_fraction}: expected a fraction in (0, 1)")
    if args.folds_count < 2:
        raise BenchError(f"--folds-count {args.folds_count}: at least 2")
    for item in args.set:
        if item.partition("=")[0].strip() in RESERVED:
            raise BenchError(f"--set {item}: the script sets {item.partition('=')[0].strip()} itself "
                             "(use --folds-count for data.folds)")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise BenchError(f"{args.out}: exists and is not an empty folder")
    if not args.dataset.is_dir():
        raise BenchError(f"{args.dataset}: dataset folder does not exist")


def _flags(flag: str, values: Sequence[str]) -> list[str]:
    return [part for value in values for part in (flag, value)]


def _place(source: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(source, target)
    else:
        target.symlink_to(Path(os.path.abspath(source)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StepFailed(f"{path}: cannot read what the step wrote ({exc})") from None


def _dice(entry: dict[str, Any]) -> dict[str, Any]:
    dice = {name: _number(value) for name, value in entry["dice"].items()}
    return {"dice": dice, "mean_dice": _number(entry["mean_dice"])}


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
