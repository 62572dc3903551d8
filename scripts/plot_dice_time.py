"""Validation Dice against wall time, from the metrics.csv of one or more `medseg train` runs.

    python scripts/plot_dice_time.py "10 min=runs/ten/run/metrics.csv" "2 min=runs/two/run/metrics.csv" \
        --reference 0.893 "nnU-Net, 50 epochs (6 min 20 s)" -o docs/dice_vs_time.png

Each run's points are its validations: mean Dice over the foreground classes at the minute of the
run (elapsed_minutes, counted from the start of `medseg train`, reading and caching included)
when that validation ended. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.csv")
    parser.add_argument("--reference", nargs=2, metavar=("DICE", "LABEL"), help="a horizontal reference line")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for item in args.runs:
        label, _, path = item.rpartition("=")  # the path is after the last "="
        rows = [r for r in csv.DictReader(open(path, encoding="utf-8")) if r.get("val_dice")]
        minutes = [float(r["elapsed_minutes"]) for r in rows]
        dice = [float(r["val_dice"]) for r in rows]
        axes.plot(minutes, dice, marker="o", label=label)
    if args.reference:
        axes.axhline(float(args.reference[0]), color="grey", linestyle="--", label=args.reference[1])
    axes.set_xlabel("wall time since the start of medseg train (minutes)")
    axes.set_ylabel("validation Dice (mean of foreground classes)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
