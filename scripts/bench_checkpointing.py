"""Step time and peak GPU memory of medseg's network for each checkpointing mode (and AMP mode).

One training step = forward, Dice+CE loss with deep supervision, backward, SGD step, exactly as
`medseg train` runs it (`medseg.step.train_step`). Median of N steps after warm-up, timed with
CUDA events; peak from torch.cuda.max_memory_allocated.

    python scripts/bench_checkpointing.py --patch 128 128 128 --batch 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from medseg import config
from medseg.losses import DiceCELoss
from medseg.models import build_model
from medseg.step import build_optimizer, train_step


def measure(patch: list[int], batch: int, classes: int, amp: str, mode: str, steps: int, warmup: int) -> tuple[float, float]:
    cfg = config.load(None, [f"train.patch_size={patch}", f"train.batch_size={batch}", f"model.checkpointing={mode}"])
    device = torch.device("cuda")
    model = build_model(cfg, 1, classes, (1.0, 1.0, 1.0)).to(device)
    optimizer = build_optimizer(cfg, model)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loss_fn = DiceCELoss()
    image = torch.randn(batch, 1, *patch, device=device)
    label = torch.randint(0, classes, (batch, 1, *patch), device=device)
    torch.backends.cudnn.benchmark = True
    for _ in range(warmup):
        train_step(model, image, label, loss_fn, optimizer, scaler, dtype, 12.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(model, image, label, loss_fn, optimizer, scaler, dtype, 12.0)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer, image, label
    torch.cuda.empty_cache()
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--amp", nargs="+", default=["fp16", "bf16", "off"])
    parser.add_argument("--modes", nargs="+", default=["off", "stage"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  patch {args.patch} batch {args.batch} "
          f"classes {args.classes}")
    print(f"{'amp':<5} {'checkpointing':<14} {'ms/step':>8} {'peak GiB':>9} {'time x':>7} {'memory x':>9}")
    for amp in args.amp:
        baseline = None
        for mode in args.modes:
            ms, peak = measure(args.patch, args.batch, args.classes, amp, mode, args.steps, args.warmup)
            baseline = baseline or (ms, peak)
            print(f"{amp:<5} {mode:<14} {ms:8.1f} {peak:9.2f} {ms / baseline[0]:7.2f} {peak / baseline[1]:9.2f}", flush=True)


if __name__ == "__main__":
    main()
