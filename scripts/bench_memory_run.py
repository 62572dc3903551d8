"""The whole run's GPU memory against the plan: short `medseg train` and `medseg infer` runs held to budgets.

For a config and each budget (GiB) a fresh process holds itself to the budget
(torch.cuda.set_per_process_memory_fraction), runs `medseg train` with `train.memory_budget` set to it
(a few steps, one validation), then `medseg infer` on one training case, and prints the plan's
predicted run peak (`medseg memory`'s fit) against torch.cuda.max_memory_allocated/reserved of
training (with validation) and of inference, and whether the out-of-memory fallback fired.

    python scripts/bench_memory_run.py --make-brats /tmp/brats_synth      # 6 cases, 2 channels, 5 classes, 240×240×155
    python scripts/bench_memory_run.py CONFIG --budgets 8 12 24 [--steps 20] [--set key=value ...]
    python scripts/bench_memory_run.py --dataset /tmp/brats_synth --budgets 8 12 24   # medseg plan first

With --dataset, `medseg plan DATASET --gpu-memory 8GiB` writes the config (and each budget then
refits it). Needs a CUDA GPU, and only medseg's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
CLASSES = 5  # of the synthetic dataset: background and four nested structures


def make_brats(folder: Path, cases: int = 6, shape: tuple[int, int, int] = (240, 240, 155), seed: int = 0) -> Path:
    """A BraTS-sized synthetic MSD dataset: two MR-like channels, labels 0-4 of random nested blobs
    inside a zero-padded ellipsoidal "head" (so the foreground crop has work), 1 mm isotropic."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"))
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    head = (((grid - centre) / (0.45 * np.array(shape, dtype=np.float32)[:, None, None, None])) ** 2).sum(0) <= 1
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for case in range(cases):
        label = np.zeros(shape, np.uint8)
        lesion = centre[:, 0, 0, 0] + rng.uniform(-30, 30, 3)
        for value, radius in ((1, 40.0), (2, 28.0), (3, 16.0), (4, 8.0)):
            # A noisy ball: a smoothed random field thresholded around the radius.
            field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 6) * 60
            distance = np.sqrt(((grid - lesion[:, None, None, None]) ** 2).sum(0)) + field
            label[(distance < radius) & head] = value
        channels = []
        for channel in range(2):
            contrast = np.array([0, 60, 90, 130, 170][::1 if channel == 0 else -1], np.float32)
            image = np.where(head, 300 + contrast[label] + rng.normal(0, 25, shape).astype(np.float32), 0)
            channels.append(ndimage.gaussian_filter(image.astype(np.float32), 0.7))
        name = f"synth_{case:03d}"
        for channel, image in enumerate(channels):
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / f"{name}_{channel:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"{name}.nii.gz")
        print(f"wrote {name}", flush=True)
    dataset = {"name": "BraTS-synthetic", "modality": {"0": "FLAIR", "1": "T1w"},
               "labels": {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing", "4": "necrosis"},
               "numTraining": cases, "file_ending": ".nii.gz",
               "training": [{"image": f"./imagesTr/synth_{c:03d}.nii.gz", "label": f"./labelsTr/synth_{c:03d}.nii.gz"}
                            for c in range(cases)]}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return folder


def one_budget(config_path: str, budget_gib: float, steps: int, overrides: list[str], out: Path) -> dict:
    """In this (fresh) process: the plan's prediction, then train and infer held to the budget."""
    import torch
    from rich.console import Console

    from medseg import config, memory
    from medseg.data.fingerprint import plan_preprocessing, training_cases
    from medseg.infer import predict
    from medseg.device import prefer_growing_segments
    from medseg.train import train

    prefer_growing_segments()  # as `medseg train` does, before CUDA starts
    budget = int(budget_gib * GiB)
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(budget / total, 1.0), device)
    cfg = config.load(Path(config_path), [*overrides, f"train.memory_budget={budget}B", "train.epochs=1",
                                          f"train.iterations_per_epoch={steps}", "validate.every=1",
                                          f"output_dir={out}", f"run_name=budget{budget_gib:g}"])
    started = time.perf_counter()
    cases = training_cases(cfg, workers=4)
    prep = plan_preprocessing(cfg, cases)
    chosen, plan = memory.fit_to_data(cfg, prep, cases.train_summaries,
                                      [cases.summaries[c.name] for c in cases.validation])
    row: dict = {"budget_gib": budget_gib, "plan": plan.to_dict(), "plan_seconds": time.perf_counter() - started}
    console = Console(record=True, width=200)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run_dir = train(cfg, console=console)
        row["train_result"] = "ok"
    except torch.OutOfMemoryError as exc:
        run_dir, row["train_result"] = None, f"OUT OF MEMORY: {str(exc).splitlines()[0]}"
    log = console.export_text()
    if run_dir is not None and (Path(run_dir) / "train.log").exists():
        # The step's out-of-memory notes go to the run's log, not only to the console passed in.
        log += (Path(run_dir) / "train.log").read_text(encoding="utf-8")
    row["oom_fallback"] = [line.strip() for line in log.splitlines() if "out of memory at" in line]
    row["train_allocated"] = torch.cuda.max_memory_allocated(device)
    row["train_reserved"] = torch.cuda.max_memory_reserved(device)
    if run_dir is not None:
        metrics = (Path(run_dir) / "metrics.csv").read_text(encoding="utf-8").splitlines()
        header, last = metrics[0].split(","), metrics[-1].split(",")
        row["gpu_peak_gib"] = float(last[header.index("gpu_peak_gib")]) if "gpu_peak_gib" in header else None
        row.update(_infer(Path(run_dir), cases, predict, device, out))
    return row


def _infer(run_dir: Path, cases, predict, device, out: Path) -> dict:  # type: ignore[no-untyped-def]
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    case = cases.validation[0] if cases.validation else cases.train[0]
    try:
        # Its channel files given one by one: infer groups them into one case.
        results = predict(run_dir / "last.pt", list(case.images), out / f"{run_dir.name}-predictions")
        result = "ok" if all(r.error is None for r in results) else "; ".join(str(r.error) for r in results if r.error)
    except torch.OutOfMemoryError as exc:
        result = f"OUT OF MEMORY: {str(exc).splitlines()[0]}"
    return {"infer_result": result, "infer_allocated": torch.cuda.max_memory_allocated(device),
            "infer_reserved": torch.cuda.max_memory_reserved(device)}


def _print(rows: list[dict]) -> None:
    print(f"\n{'budget':>7} {'chosen':<34} {'plan GiB':>9} {'step':>6} {'vols':>6} {'val':>6} {'train alloc':>12} "
          f"{'train resv':>11} {'gpu_peak':>9} {'infer alloc':>12} {'infer resv':>11}  fallback / result")
    for row in rows:
        if "error" in row:
            print(f"{row['budget_gib']:7g}  {row['error']}")
            continue
        plan = row["plan"]
        name = f"{'x'.join(map(str, plan['patch_size']))} b{plan['batch_size']} {plan['checkpointing']}"
        g = lambda key: f"{row[key] / GiB:.2f}" if isinstance(row.get(key), int) else "-"  # noqa: E731
        print(f"{row['budget_gib']:7g} {name:<34} {plan['total'] / GiB:9.2f} {plan['step'] / GiB:6.2f} "
              f"{plan['resident_volumes'] / GiB:6.2f} {plan['validation'] / GiB:6.2f} {g('train_allocated'):>12} "
              f"{g('train_reserved'):>11} {row.get('gpu_peak_gib') or 0:9.2f} {g('infer_allocated'):>12} "
              f"{g('infer_reserved'):>11}  {'; '.join(row['oom_fallback']) or 'no fallback'} / "
              f"{row['train_result']}, infer {row.get('infer_result', '-')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="Experiment config (or use --dataset).")
    parser.add_argument("--dataset", help="Plan this dataset first (medseg plan --gpu-memory 8GiB).")
    parser.add_argument("--make-brats", metavar="DIR", help="Write the synthetic BraTS-sized dataset and exit.")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--budgets", type=float, nargs="+", default=[8, 12, 24])
    parser.add_argument("--steps", type=int, default=20, help="Training steps (one epoch, then one validation).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="Folder for runs and predictions (default: a temporary one).")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # one budget, in this process
    args = parser.parse_args()
    if args.make_brats:
        make_brats(Path(args.make_brats), args.cases)
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_memory_run-"))
    config_path = args.config
    if args.dataset:
        config_path = str(out / "planned.yaml")
        subprocess.run([sys.executable, "-m", "medseg", "plan", args.dataset, "-o", config_path,
                        "--gpu-memory", "8GiB"], check=True)
    if config_path is None:
        parser.error("a CONFIG or --dataset is needed")
    if args.one is not None:
        print("ROW " + json.dumps(one_budget(config_path, args.one, args.steps, args.overrides, out)), flush=True)
        return
    rows = []
    for budget in args.budgets:
        # A fresh process per budget: the memory fraction, the peaks and the caches start clean.
        command = [sys.executable, __file__, config_path, "--one", str(budget), "--steps", str(args.steps),
                   "--out", str(out), *(f"--set={item}" for item in args.overrides)]
        done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace")
        sys.stderr.write(done.stderr[-4000:])
        found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        rows.append(json.loads(found[-1]) if found else {"budget_gib": budget,
                                                          "error": f"exit {done.returncode}: {done.stdout[-500:]}"})
        print(done.stdout[-3000:], flush=True)
    _print(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
