#!/usr/bin/env bash
# From raw files to a validated model within a time budget, as a new user would run it:
#   medseg plan  ->  medseg train (train.max_minutes)  ->  medseg infer + medseg evaluate on the
# validation fold with the trained checkpoint. Prints the wall time of plan + train (which ends
# with its own sliding-window validation) and leaves everything under OUT. Validation and inference
# use test-time mirroring, as nnU-Net's final validation does.
#
#   scripts/time_to_dice.sh DATASET OUT MINUTES [extra medseg train options...]
#   scripts/time_to_dice.sh .data/hippocampus /tmp/fast 1.5
set -euo pipefail
dataset=$1 out=$2 minutes=$3
shift 3
mkdir -p "$out"
started=$(date +%s.%N)
python3 -m medseg plan "$dataset" -o "$out/plan.yaml"
python3 -m medseg train "$out/plan.yaml" --set output_dir="$out" --set run_name=run \
  --set train.max_minutes="$minutes" --set train.epochs=10000 --set validate.every=0 --set validate.mirror=true "$@"
finished=$(date +%s.%N)
echo "plan + train + validation: $(python3 -c "print(f'{$finished - $started:.1f}')") s wall"
python3 scripts/validation_subset.py "$dataset" -o "$out/val"
python3 -m medseg infer "$out/run/last.pt" "$out/val/images" -o "$out/val/pred" --mirror
python3 -m medseg evaluate "$out/val/pred" "$out/val/labels" --checkpoint "$out/run/last.pt"
