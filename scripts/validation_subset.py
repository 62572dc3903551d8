"""Link one fold's validation cases into images/ and labels/ folders, for `medseg infer` + `evaluate`.

    python scripts/validation_subset.py .data/hippocampus --fold 0 --limit 20 -o /tmp/val
    medseg infer runs/x/best.pt /tmp/val/images -o /tmp/val/pred
    medseg evaluate /tmp/val/pred /tmp/val/labels
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.data.cases import find_dataset, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=12345)
    parser.add_argument("--limit", type=int, default=0, help="first N validation cases (0 = all)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    _, validation = split(find_dataset(args.dataset).cases, args.folds, args.fold, args.split_seed)
    if args.limit:
        validation = validation[: args.limit]
    for kind in ("images", "labels"):
        (args.out / kind).mkdir(parents=True, exist_ok=True)
    for case in validation:
        for index, image in enumerate(case.images):
            suffix = f"_{index:04d}" if len(case.images) > 1 else ""
            (args.out / "images" / f"{case.name}{suffix}.nii.gz").symlink_to(image.absolute())
        (args.out / "labels" / f"{case.name}.nii.gz").symlink_to(case.label.absolute())
    print(f"{len(validation)} validation cases of fold {args.fold} linked under {args.out}")


if __name__ == "__main__":
    main()
