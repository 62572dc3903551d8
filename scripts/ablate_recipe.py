"""Training-recipe ablation on one GPU: several `medseg train` runs of one config side by side, each
with its own overrides, and their final validation Dice in one table.

The runs share the GPU, so their speed says nothing; they train for a fixed number of steps (the
config's epochs × iterations), so their Dice compare. A variant is NAME or NAME:KEY=VALUE,KEY=VALUE
(medseg --set overrides). The runs can use the architectures of nnunet_plain.py: the override
`model.arch=nnunet-plain` trains nnU-Net's PlainConvUNet (dynamic-network-architectures, the `bench`
extra) with the same geometry in medseg's loop.

    python scripts/ablate_recipe.py PLAN.yaml OUT base seed1:train.seed=1 nnunet:model.arch=nnunet-plain \\
        workers:data.sampler=workers,train.workers=4 --set train.epochs=10
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("out", type=Path)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--set", action="append", default=[], dest="common", help="override for every variant")
    args = parser.parse_args()
    runs = {}
    for spec in args.variants:
        name, _, overrides = spec.partition(":")
        sets = [s for s in overrides.split(",") if s]
        command = [sys.executable, __file__, "--one", "train", args.config,
                   "--set", f"output_dir={args.out}", "--set", f"run_name={name}"]
        for s in args.common + sets:
            command += ["--set", s]
        args.out.mkdir(parents=True, exist_ok=True)
        log = open(args.out / f"{name}.log", "w", encoding="utf-8")
        runs[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), spec, time.time())
    print(f"{'variant':<12} {'rc':>3} {'wall s':>7} {'steps':>6} {'Dice':>7}  per class            overrides")
    for name, (process, spec, started) in runs.items():
        rc = process.wait()
        wall = time.time() - started
        rows = _metrics(args.out / name / "metrics.csv")
        last = rows[-1] if rows else {}
        classes = "  ".join(f"{float(v):.4f}" for k, v in last.items() if k.startswith("dice_") and v)
        dice = float(last["val_dice"]) if last.get("val_dice") else float("nan")
        steps = last.get("steps", "-")
        print(f"{name:<12} {rc:>3} {wall:>7.0f} {steps:>6} {dice:>7.4f}  {classes:<20} {spec}", flush=True)


def _metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _one(argv: list[str]) -> None:
    """Run the medseg CLI with the benchmarks' architectures registered."""
    import nnunet_plain  # noqa: F401 - registers model.arch=nnunet-plain; this script's folder is on sys.path
    from medseg.cli import app

    app(args=argv, prog_name="medseg")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        _one(sys.argv[2:])
    else:
        main()
