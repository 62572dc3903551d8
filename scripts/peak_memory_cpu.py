"""Peak memory of one training step on the CPU, per checkpointing mode, eager and compiled: a
GPU-free way to compare checkpointing designs before measuring them on a GPU.

Each configuration runs in a fresh process. After two warm-up steps (compilation included) the
kernel's peak-resident-size counter is reset (Linux: ``/proc/self/clear_refs``) and one more step
runs: its peak resident size above the size before it is the step's peak memory (activations,
gradients, temporaries). ``MALLOC_MMAP_THRESHOLD_`` is fixed so that freed tensors go back to the
kernel at once instead of staying in the C heap. fp32 (CPU autocast kernels are slow), so absolute
figures are about twice fp16's; compare ratios between modes.

    python scripts/peak_memory_cpu.py --patch 48 --modes off selective stage
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(mode: str, compiled: bool, patch: int, batch: int) -> dict[str, float]:
    """One configuration, in this process: peak bytes above the resident size before the step."""
    import torch

    from medseg import config
    from medseg.losses import DiceCELoss
    from medseg.models import build_model
    from medseg.step import build_optimizer, compile_for_training, train_step

    torch.manual_seed(0)
    cfg = config.load(None, [f"train.patch_size={[patch] * 3}", f"train.batch_size={batch}",
                             f"model.checkpointing={mode}"])
    model = build_model(cfg, 1, 3, (1.0, 1.0, 1.0)).train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    trained, loss_fn = compile_for_training(model, DiceCELoss(), "on" if compiled else "off")
    image = torch.randn(batch, 1, patch, patch, patch)
    label = torch.randint(0, 3, (batch, 1, patch, patch, patch), dtype=torch.uint8)
    for _ in range(2):
        train_step(trained, image, label, loss_fn, optimizer, scaler, None, cfg.train.grad_clip)
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = _status("VmRSS:")
    started = time.perf_counter()
    train_step(trained, image, label, loss_fn, optimizer, scaler, None, cfg.train.grad_clip)
    seconds = time.perf_counter() - started
    return {"peak_mib": (_status("VmHWM:") - before) / 2**20, "step_s": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=48, help="cubic patch edge in voxels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["off", "selective", "stage"])
    parser.add_argument("--kinds", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process
        print(json.dumps(measure(args.one[0], args.one[1] == "compiled", args.patch, args.batch)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results: dict[tuple[str, str], dict[str, float]] = {}
    for kind in args.kinds:
        for mode in args.modes:
            done = subprocess.run([sys.executable, __file__, "--patch", str(args.patch), "--batch", str(args.batch),
                                   "--one", mode, kind], env=env, capture_output=True, encoding="utf-8", errors="replace")
            if done.returncode != 0:
                print(f"{mode} {kind}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            results[mode, kind] = json.loads(done.stdout.strip().splitlines()[-1])
            base = results.get(("off", kind))
            ratio = f"{results[mode, kind]['peak_mib'] / base['peak_mib']:.2f}x of off" if base else ""
            print(f"{mode:10s} {kind:8s} {args.patch}^3 batch {args.batch}: peak {results[mode, kind]['peak_mib']:7.1f} MiB"
                  f"  {ratio}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([{"mode": mode, "kind": kind, **figures} for (mode, kind), figures in results.items()], out, indent=2)


if __name__ == "__main__":
    main()
