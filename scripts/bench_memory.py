"""Predicted vs measured peak GPU memory of medseg training steps (medseg.memory on a GPU machine).

For each configuration: `medseg.memory.estimate` (fake tensors on the CPU) against
`medseg.memory.measure` (real steps on the GPU after warm-up; torch.cuda.max_memory_allocated and
max_memory_reserved), with the error in percent of the measurement, then the median and worst
absolute error. All configurations run in one process, the allocator's cache emptied between them;
an out-of-memory configuration is reported and skipped.

    python scripts/bench_memory.py                  # the table
    python scripts/bench_memory.py --fit 8 12 24    # also: fit() under a capped memory fraction
    python scripts/bench_memory.py --only 0 3 --cudnn-benchmark

With --fit, for each budget (GiB) the process's memory is capped at that budget
(torch.cuda.set_per_process_memory_fraction), `medseg.memory.fit` picks patch, batch and
checkpointing for the default network (patch 192³ requested; the rule: the most voxels per unit of
step time, `medseg.memory.STEP_TIME` by default, within the budget less the overhead margin and the batch rendered ahead; --fit-max-patch and
--fit-max-batch pass its caps), and 50 real training steps of it run on random data through
`medseg.step.train_step`: chosen configuration, predicted and measured peak, share of the budget
used, time per step, the seconds fit() took on this machine's CPU, and whether it ran out of memory.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from medseg import config, memory

GiB = 2**30

# (patch, batch, amp, checkpointing, in_channels, classes, spacing, extra overrides)
CONFIGS: list[tuple[list[int], int, str, str, int, int, tuple[float, float, float], list[str]]] = [
    ([64, 64, 64], 2, "fp16", "off", 1, 3, (1.0, 1.0, 1.0), []),
    ([64, 64, 64], 4, "off", "stage", 4, 14, (1.0, 1.0, 1.0), []),
    ([96, 96, 96], 2, "bf16", "off", 1, 14, (1.0, 1.0, 1.0), []),
    ([128, 128, 128], 2, "fp16", "off", 1, 3, (1.0, 1.0, 1.0), []),
    ([128, 128, 128], 2, "fp16", "stage", 1, 3, (1.0, 1.0, 1.0), []),
    ([128, 128, 128], 2, "off", "off", 1, 3, (1.0, 1.0, 1.0), []),
    ([128, 128, 128], 2, "bf16", "stage", 4, 3, (1.0, 1.0, 1.0), []),
    ([128, 128, 128], 1, "off", "stage", 1, 14, (1.0, 1.0, 1.0), []),
    ([128, 128, 128], 3, "fp16", "off", 1, 3, (1.0, 1.0, 1.0), ["train.optimizer=adamw"]),
    ([128, 128, 128], 2, "fp16", "off", 1, 3, (1.0, 1.0, 1.0), ["model.norm=group"]),
    ([160, 160, 160], 2, "fp16", "off", 4, 3, (1.0, 1.0, 1.0), []),
    ([160, 160, 160], 1, "bf16", "stage", 1, 14, (1.0, 1.0, 1.0), []),
    ([192, 192, 192], 1, "fp16", "off", 1, 3, (1.0, 1.0, 1.0), []),
    ([192, 192, 192], 2, "fp16", "stage", 1, 14, (1.0, 1.0, 1.0), []),
    ([192, 192, 192], 4, "fp16", "stage", 1, 3, (1.0, 1.0, 1.0), []),
    ([192, 192, 192], 2, "off", "off", 1, 3, (1.0, 1.0, 1.0), []),
    ([160, 160, 48], 2, "fp16", "off", 1, 3, (0.8, 0.8, 3.0), []),
    ([160, 160, 48], 4, "off", "stage", 4, 14, (0.8, 0.8, 3.0), []),
]


def build(patch: list[int], batch: int, amp: str, mode: str, extra: list[str]) -> config.Config:
    return config.load(None, [f"train.patch_size={patch}", f"train.batch_size={batch}", f"train.amp={amp}",
                              f"model.checkpointing={mode}", *extra])


def describe(patch: list[int], batch: int, amp: str, mode: str, channels: int, classes: int,
             spacing: tuple[float, ...], extra: list[str]) -> str:
    text = f"{'x'.join(map(str, patch))} b{batch} {amp} {mode} c{channels} k{classes}"
    if spacing != (1.0, 1.0, 1.0):
        text += " sp" + ",".join(f"{s:g}" for s in spacing)
    for item in extra:
        text += " " + item.split(".")[-1]
    return text


def table(indices: list[int], steps: int) -> list[dict]:
    rows = []
    print(f"{'#':>2} {'configuration':<44} {'pred GiB':>9} {'meas GiB':>9} {'resv GiB':>9} {'err %':>7} "
          f"{'est s':>6} {'ms/step':>8}", flush=True)
    for index in indices:
        patch, batch, amp, mode, channels, classes, spacing, extra = CONFIGS[index]
        cfg = build(patch, batch, amp, mode, extra)
        name = describe(patch, batch, amp, mode, channels, classes, spacing, extra)
        started = time.perf_counter()
        predicted = memory.estimate(cfg, channels, classes, spacing)
        seconds = time.perf_counter() - started
        row = {"index": index, "config": name, "predicted": predicted.total, "estimate_seconds": seconds,
               "breakdown": predicted.to_dict()}
        try:
            measured = memory.measure(cfg, channels, classes, spacing, steps=steps)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{index:>2} {name:<44} {predicted.total / GiB:9.2f} {'OOM':>9}", flush=True)
            row["error"] = "out of memory"
            rows.append(row)
            continue
        allocated = measured["max_memory_allocated"]
        row.update(measured=allocated, reserved=measured["max_memory_reserved"],
                   error_percent=100 * (predicted.total - allocated) / allocated,
                   ms_per_step=1000 * measured["seconds_per_step"])
        rows.append(row)
        print(f"{index:>2} {name:<44} {predicted.total / GiB:9.2f} {allocated / GiB:9.2f} "
              f"{row['reserved'] / GiB:9.2f} {row['error_percent']:+7.1f} {seconds:6.1f} {row['ms_per_step']:8.0f}",
              flush=True)
    errors = [abs(r["error_percent"]) for r in rows if "error_percent" in r]
    if errors:
        print(f"median |error| {statistics.median(errors):.1f} %, worst {max(errors):.1f} % "
              f"over {len(errors)} configurations", flush=True)
    return rows


def fit_runs(budgets: list[float], steps: int, max_patch: list[int] | None = None,
             max_batch: int | None = None) -> list[dict]:
    from medseg.losses import DiceCELoss
    from medseg.models import build_model
    from medseg.device import amp_dtype as resolve_amp
    from medseg.step import build_optimizer, train_step

    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    base = config.load(None, ["train.patch_size=[192,192,192]", "train.batch_size=2"])
    rows = []
    caps = f", max_patch {max_patch}" if max_patch else ""
    caps += f", max_batch {max_batch}" if max_batch else ""
    print(f"\nfit(): default network, patch 192³ batch 2 requested{caps}, {steps} steps each; "
          f"step times {dict(memory.STEP_TIME)}", flush=True)
    print(f"{'budget':>7} {'chosen':<36} {'pred GiB':>9} {'meas GiB':>9} {'resv GiB':>9} {'% budget':>9} "
          f"{'ms/step':>8} {'fit s':>6}  result", flush=True)
    for gib in budgets:
        budget = int(gib * GiB)
        started = time.perf_counter()
        try:
            chosen, report = memory.fit(base, 1, 3, (1.0, 1.0, 1.0), budget, max_patch=max_patch, max_batch=max_batch)
        except Exception as exc:  # MedsegError when nothing fits
            print(f"{gib:7g} {'-':<36} {'':>9} {'':>9} {'':>9} {'':>9}  {exc}", flush=True)
            rows.append({"budget_gib": gib, "error": str(exc)})
            continue
        fit_seconds = time.perf_counter() - started
        t = chosen.train
        name = f"{'x'.join(map(str, t.patch_size))} b{t.batch_size} ckpt {chosen.model.checkpointing}"
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(budget / total, 1.0), device)
        torch.cuda.reset_peak_memory_stats(device)
        result = "ok"
        model = optimizer = image = label = None
        step_seconds = float("nan")
        try:
            amp_dtype = resolve_amp(t.amp, device)
            model = build_model(chosen, 1, 3, (1.0, 1.0, 1.0)).to(device)
            optimizer = build_optimizer(chosen, model)
            scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
            loss_fn = DiceCELoss()
            warmup = min(5, steps // 2)
            for step in range(steps):
                if step == warmup:
                    torch.cuda.synchronize(device)
                    timed = time.perf_counter()
                image = torch.randn((t.batch_size, 1, *t.patch_size), device=device)
                label = torch.randint(0, 3, (t.batch_size, 1, *t.patch_size), device=device).float()
                train_step(model, image, label, loss_fn, optimizer, scaler, amp_dtype, t.grad_clip)
            torch.cuda.synchronize(device)
            if steps > warmup:
                step_seconds = (time.perf_counter() - timed) / (steps - warmup)
        except torch.OutOfMemoryError:
            result = "OUT OF MEMORY"
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        del model, optimizer, image, label
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        # This runs the step alone: the step's share of the plan is what it predicts.
        print(f"{gib:7g} {name:<36} {report.step.total / GiB:9.2f} {allocated / GiB:9.2f} {reserved / GiB:9.2f} "
              f"{100 * allocated / budget:8.1f}% {1000 * step_seconds:8.0f} {fit_seconds:6.1f}  {result}", flush=True)
        rows.append({"budget_gib": gib, "chosen": chosen.to_dict()["train"] | {"checkpointing": chosen.model.checkpointing},
                     "predicted": report.step.total, "predicted_run": report.total, "measured": allocated, "reserved": reserved, "result": result,
                     "seconds_per_step": step_seconds, "fit_seconds": fit_seconds,
                     "voxels_per_second": math.prod(t.patch_size) * t.batch_size / step_seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="+", help="Run only these configuration numbers.")
    parser.add_argument("--skip-table", action="store_true", help="Only the --fit runs.")
    parser.add_argument("--steps", type=int, default=3, help="Measured steps per configuration (after 2 warm-up).")
    parser.add_argument("--fit", type=float, nargs="+", metavar="GIB", help="Budgets (GiB) for the fit() runs.")
    parser.add_argument("--fit-steps", type=int, default=50)
    parser.add_argument("--fit-max-patch", type=int, nargs=3, metavar="N",
                        help="fit(max_patch=...): the data's extent in voxels per axis.")
    parser.add_argument("--fit-max-batch", type=int, help="fit(max_batch=...).")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (medseg train leaves it off).")
    parser.add_argument("--json", help="Also write the rows to this file.")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_memory.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuDNN {torch.backends.cudnn.version()}  "
          f"cudnn.benchmark={args.cudnn_benchmark}", flush=True)
    started = time.perf_counter()
    results: dict = {}
    if not args.skip_table:
        results["table"] = table(args.only if args.only is not None else list(range(len(CONFIGS))), args.steps)
    if args.fit:
        results["fit"] = fit_runs(args.fit, args.fit_steps, args.fit_max_patch, args.fit_max_batch)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
