"""Training-step time, peak GPU memory and achieved TFLOP/s: nnU-Net's network against medseg's.

Part 1 (default) measures, in one run and side by side, one training step of
- nnU-Net's PlainConvUNet (dynamic_network_architectures) with nnU-Net's 3d_fullres arguments and
  the same stages/strides/kernels/widths as medseg's plan for the patch (`model.arch=nnunet-plain`,
  registered by nnunet_plain.py), eager and torch.compile'd;
- medseg's UNet3D (`model.arch=unet`) for every checkpointing mode;
both built by `medseg.models.build_model`;
each eager, compiled (network and loss) or as CUDA graphs, optionally channels-last (`-cl`).
Everything else is identical: the step is `medseg.step.train_step` (fp16 autocast + GradScaler, SGD
Nesterov, fused on CUDA, Dice+CE with deep supervision, grad clip 12), on resident random tensors. Median of N
steps after warm-up, timed with CUDA events; peak from torch.cuda.max_memory_allocated. FLOPs of a
step (forward + backward, checkpointing off: the useful work) from FlopCounterMode, compared with a
large fp16 matmul measured in the same run.

Part 2 (`--full DATASET ...`) runs `python -m medseg train` on each dataset for a few epochs and
compares its ms per iteration (epochs after the first) with the pure compiled step of the same
network, patch and batch. `--make-large DIR` writes a synthetic large-volume MSD dataset.

    python scripts/bench_train.py --patch 128 128 128 --batch 2 --json bench.json
    python scripts/bench_train.py --hippocampus-plan
    python scripts/bench_train.py --patch 256 256 256 --batch 2 --memory-limit 24 \\
        --configs medseg-stage-compiled nnunet-compiled
    python scripts/bench_train.py --hippocampus-plan --configs nnunet-compiled medseg-off-compiled medseg-off-graphs
    python scripts/bench_train.py --configs medseg-off-compiled medseg-stage-compiled@0:0 medseg-stage-compiled --profile 3
    python scripts/bench_train.py --configs medseg-off-compiled medseg-off-compiled%0.5 medseg-off-compiled%0.3
    python scripts/bench_train.py --make-large /tmp/large --large-cases 30
    python scripts/bench_train.py --full .data/hippocampus
    python scripts/bench_train.py --full /tmp/large --patch 128 128 128 --batch 2
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medseg import config
from medseg.device import amp_dtype as resolve_amp
from medseg.device import amp_name
from medseg.losses import DiceCELoss
from medseg.models import CHECKPOINTING_MODES, CheckpointedLevels, build_model, network_plan
from medseg.step import GraphedStep, build_optimizer, compile_for_training, train_step
from medseg.step import compile_setting, memory_format

if str(Path(__file__).resolve().parent) not in sys.path:  # nnunet_plain, also when loaded as a module
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import nnunet_plain  # noqa: E402 - registers model.arch=nnunet-plain

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS_PATCH, HIPPOCAMPUS_BATCH = [40, 56, 40], 7


# How a configuration runs: eager, torch.compile'd (network and loss, as `medseg train` with
# train.compile=on), the compiled or the eager step recorded whole as one CUDA graph
# (train.compile=graphs, eager-graphs), or, for comparison, torch.compile's own CUDA graphs of the
# compiled forward and backward (mode="reduce-overhead"; no train.compile setting).
RUN_KINDS = {"eager": "off", "compiled": "on", "graphs": "graphs", "eagergraphs": "eager-graphs",
             "treegraphs": "treegraphs"}


def all_configs() -> list[str]:
    """Configuration names: FAMILY[-MODE]-KIND[-cl]; -cl = channels-last (NDHWC) memory layout."""
    names = []
    for kind in RUN_KINDS:
        names += [f"nnunet-{kind}", f"nnunet-{kind}-cl"]
        for mode in CHECKPOINTING_MODES:
            names += [f"medseg-{mode}-{kind}", f"medseg-{mode}-{kind}-cl"]
    return names


def run_kind(name: str) -> str:
    """train.compile setting of a configuration name."""
    return RUN_KINDS[_base(name).removesuffix("-cl").rsplit("-", 1)[1]]


def _base(name: str) -> str:
    """A configuration name without its suffixes. `@ENCODER:DECODER[w]`: medseg-stage-KIND@2:1 runs
    `stage` checkpointing over the 2 finest encoder levels and the finest decoder level instead of
    UNet3D's default `checkpointed_levels`; a trailing `w` recomputes whole batches instead of one
    sample at a time (UNet3D's `per_sample=False`). `%BUDGET`: medseg-off-compiled%0.5 compiles with
    torch.compile's activation memory budget (torch._functorch.config.activation_memory_budget,
    the fraction of the saved activations to keep; its partitioner recomputes the rest, cheapest
    first)."""
    return name.split("@")[0].split("%")[0]


def unet_options(name: str) -> dict[str, Any]:
    """The UNet3D constructor arguments that a configuration name's `@ENCODER:DECODER[w]` suffix
    sets (see _base); none without one."""
    if "@" not in name:
        return {}
    levels = name.split("@")[1].split("%")[0]
    encoder, decoder = levels.removesuffix("w").split(":")
    return {"checkpointed_levels": CheckpointedLevels(encoder=int(encoder), decoder=int(decoder)),
            "per_sample": not levels.endswith("w")}


def activation_budget(name: str) -> contextlib.AbstractContextManager:
    """torch.compile's activation memory budget as a configuration name's `%BUDGET` suffix sets it,
    for the duration of the context (see _base)."""
    from torch._functorch import config as functorch_config

    if "%" not in name:
        return contextlib.nullcontext()
    return functorch_config.patch(activation_memory_budget=float(name.split("%")[1].split("@")[0]))


def model_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.base_width is not None:
        out.append(f"model.base_width={args.base_width}")
    if args.max_width is not None:
        out.append(f"model.max_width={args.max_width}")
    if args.depth is not None:
        out.append(f"model.depth={args.depth}")
    return out


def make_cfg(patch: list[int], batch: int, mode: str, extra: list[str]) -> config.Config:
    return config.load(None, [f"train.patch_size={list(patch)}", f"train.batch_size={batch}",
                              f"model.checkpointing={mode}", *extra])


def build(name: str, patch: list[int], batch: int, extra: list[str], in_channels: int, classes: int,
          spacing=(1.0, 1.0, 1.0)) -> tuple[nn.Module, config.Config]:
    """(model, cfg) of a configuration name (see all_configs)."""
    parts = name.split("-")
    if parts[0] == "nnunet":
        cfg = make_cfg(patch, batch, "off", [*extra, f"model.arch={nnunet_plain.ARCH}"])
        return build_model(cfg, in_channels, classes, spacing), cfg
    cfg = make_cfg(patch, batch, parts[1], extra)
    return build_model(cfg, in_channels, classes, spacing, **unet_options(name)), cfg


def count_flops(name: str, patch: list[int], batch: int, extra: list[str], in_channels: int, classes: int,
                spacing=(1.0, 1.0, 1.0)) -> float:
    """FLOPs of forward + backward of one step (checkpointing off: no recomputation counted).

    Counted on fake tensors on the CPU, so it costs no GPU memory at any patch size. Only matrix
    operations (convolutions) count; the loss is elementwise and not counted by FlopCounterMode.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    family = "nnunet-eager" if name.startswith("nnunet") else "medseg-off-eager"
    with FakeTensorMode():
        model, _ = build(family, patch, batch, extra, in_channels, classes, spacing)
        model.train()
        image = torch.empty(batch, in_channels, *patch)
        counter = FlopCounterMode(display=False)
        with counter:
            outputs = model(image)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            sum(o.float().sum() for o in outputs).backward()
    return float(counter.get_total_flops())


class Timer:
    """CUDA events on a GPU, perf_counter on the CPU; milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1000


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_step(model: nn.Module, cfg: config.Config, kind: str, device: torch.device,
                 amp: torch.dtype | None, in_channels: int, classes: int, steps: int, warmup: int,
                 channels_last: bool = False, profile: int = 0) -> dict[str, Any]:
    """Median step time and memory of `model` (moved to `device`) with `medseg.step.train_step`,
    run as `kind` (a train.compile setting: off, on, graphs)."""
    patch, batch = list(cfg.train.patch_size), cfg.train.batch_size
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout).train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn = DiceCELoss(batch_dice=cfg.train.batch_dice)
    image = torch.randn(batch, in_channels, *patch, device=device).contiguous(memory_format=layout)
    label = torch.randint(0, classes, (batch, 1, *patch), device=device, dtype=torch.uint8)
    if kind == "treegraphs":
        trained, loss_fn = torch.compile(model, mode="reduce-overhead"), torch.compile(loss_fn, mode="reduce-overhead")
    else:
        trained, loss_fn = compile_for_training(model, loss_fn, kind)  # as medseg.train does
    graph = GraphedStep(trained, loss_fn, optimizer, scaler, amp, cfg.train.grad_clip) \
        if kind in ("graphs", "eager-graphs") and device.type == "cuda" else None  # on the CPU: unrecorded
    timer = Timer(device)
    losses: list[torch.Tensor] = []

    def step() -> None:
        if graph is not None:
            loss, _ = graph(image, label)
        else:
            loss, _ = train_step(trained, image, label, loss_fn, optimizer, scaler, amp, cfg.train.grad_clip)
        losses.append(loss.clone())

    started = time.perf_counter()
    first_ms = timer.time(step)  # includes compilation when compiled
    # Compiled: one more warm-up step; torch.compile's CUDA graphs: three more (warm-up runs and
    # recording); a step recorded whole as a graph: its warm-up steps and the recording.
    extra = {"off": 0, "on": 1, "treegraphs": 3}.get(kind, (graph.warmup + 1) if graph else 1)
    for _ in range(warmup + extra - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    # Wall time until steady steps: compilation, recording, cuDNN's algorithm search, warm-up steps.
    startup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [timer.time(step) for _ in range(steps)]
    result: dict[str, Any] = {"status": "ok", "ms": statistics.median(times), "ms_min": min(times),
                              "first_step_ms": first_ms, "startup_s": startup_s, "final_loss": float(losses[-1])}
    if graph is not None and graph.failure:
        result["status"] = f"error: CUDA graph not recorded: {graph.failure}"
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        result["reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    if profile:
        result["profile"] = profile_steps(step, device, profile)
    del trained, model, optimizer, scaler, image, label, losses, graph
    return result


def profile_steps(step: Callable[[], None], device: torch.device, steps: int, top: int = 12) -> dict[str, Any]:
    """Where a step's time goes: torch.profiler over `steps` steps. On CUDA, `busy_ms` is the
    kernels' summed time per step (against the wall time per step: the rest is the GPU waiting
    for the host); `top` lists the operators and kernels with the most device time (CPU time on
    the CPU) per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1000 / steps
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    busy_ms = sum(own(e) for e in events) / 1000 / steps
    ranked = sorted(events, key=own, reverse=True)[:top]
    return {"wall_ms": wall_ms, "busy_ms": busy_ms,
            "top": [{"name": e.key[:80], "ms": own(e) / 1000 / steps, "calls": e.count // steps} for e in ranked]}


def print_profile(figures: dict[str, Any], device: torch.device) -> None:
    where = "device" if device.type == "cuda" else "CPU"
    print(f"  profiled: {figures['wall_ms']:.1f} ms/step wall, {figures['busy_ms']:.1f} ms/step of {where} time "
          f"in operators and kernels; most {where} time per step:")
    for entry in figures["top"]:
        print(f"    {entry['ms']:8.2f} ms  {entry['calls']:5d}x  {entry['name']}")


def run_config(name: str, args: argparse.Namespace, device: torch.device, amp: torch.dtype | None,
               patch: list[int], batch: int, extra: list[str], in_channels: int = 1, classes: int = 3,
               spacing=(1.0, 1.0, 1.0)) -> dict[str, Any]:
    try:
        model, cfg = build(name, patch, batch, extra, in_channels, classes, spacing)
        with activation_budget(name):
            result = measure_step(model, cfg, run_kind(name), device, amp, in_channels, classes, args.steps,
                                  args.warmup, channels_last=_base(name).endswith("-cl"), profile=args.profile)
        del model
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not end the run
        result = {"status": "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"}
    free(device)
    return result


def matmul_tflops(device: torch.device, n: int) -> float:
    """Median TFLOP/s of an n×n @ n×n matmul (fp16 on a GPU, fp32 on the CPU)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = Timer(device)
    for _ in range(3):
        torch.mm(a, b)
    times = [timer.time(lambda: torch.mm(a, b)) for _ in range(10)]
    del a, b
    free(device)
    return 2 * n**3 / (statistics.median(times) / 1000) / 1e12


def fmt(value: Any, spec: str) -> str:
    """format(value, spec), or a dash as wide as the spec's width for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = spec.split(".")[0]
        return "-".rjust(int(width)) if width.isdigit() else "-"
    return format(value, spec)


def print_table(results: dict[str, dict[str, Any]], peak_tflops: float) -> list[str]:
    """The comparison table; returns the summary lines printed below it."""
    def ok(name: str) -> dict[str, Any] | None:
        r = results.get(name)
        return r if r and r.get("status") == "ok" else None

    nn_ref = ok("nnunet-compiled") or ok("nnunet-eager")
    nn_ref_name = "nnunet-compiled" if ok("nnunet-compiled") else "nnunet-eager"
    header = (f"{'configuration':<28} {'ms/step':>9} {'start s':>8} {'peak GiB':>9} {'resv GiB':>9} "
              f"{'TFLOP/s':>8} {'% mm':>6} {'t/nnU':>6} {'m/nnU':>6} {'t/off':>6} {'m/off':>6}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if r.get("status") != "ok":
            print(f"{name:<28} {r.get('status')}")
            continue
        tflops = r.get("tflops")
        pct = 100 * tflops / peak_tflops if tflops and peak_tflops else None
        r["pct_of_matmul"] = pct
        t_nn = r["ms"] / nn_ref["ms"] if nn_ref else None
        m_nn = r["peak_gib"] / nn_ref["peak_gib"] if nn_ref and "peak_gib" in r and "peak_gib" in nn_ref else None
        t_off = m_off = None
        if name.startswith("medseg-"):
            off = ok(f"medseg-off-{_base(name).split('-', 2)[2]}")
            if off:
                t_off = r["ms"] / off["ms"]
                m_off = r["peak_gib"] / off["peak_gib"] if "peak_gib" in r and "peak_gib" in off else None
        r.update(time_vs_nnunet=t_nn, memory_vs_nnunet=m_nn, time_vs_off=t_off, memory_vs_off=m_off)
        print(f"{name:<28} {r['ms']:9.1f} {r['startup_s']:8.1f} {fmt(r.get('peak_gib'), '9.2f')} "
              f"{fmt(r.get('reserved_gib'), '9.2f')} {fmt(tflops, '8.2f')} {fmt(pct, '6.1f')} {fmt(t_nn, '6.2f')} "
              f"{fmt(m_nn, '6.2f')} {fmt(t_off, '6.2f')} {fmt(m_off, '6.2f')}")
    print(f"(start s: wall seconds until steady steps (compilation, graph recording, warm-up steps); "
          f"t/nnU, m/nnU: time and peak relative to {nn_ref_name}; t/off, m/off: relative to medseg-off "
          f"with the same compile setting; % mm: of the {peak_tflops:.3g} TFLOP/s matmul)")
    summary = []
    medseg_ok = {n: r for n, r in results.items() if n.startswith("medseg-") and r.get("status") == "ok"}
    if medseg_ok and nn_ref:
        best = min(medseg_ok, key=lambda n: medseg_ok[n]["ms"])
        ratio = medseg_ok[best]["ms"] / nn_ref["ms"]
        summary.append(f"fastest medseg setting {best}: {medseg_ok[best]['ms']:.1f} ms vs {nn_ref_name} "
                       f"{nn_ref['ms']:.1f} ms -> time ratio {ratio:.3f} ({1 / ratio:.2f}x the speed)")
    for line in summary:
        print(line)
    return summary


def part1(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> dict[str, Any]:
    patch, batch = args.patch or [128, 128, 128], args.batch or 2
    extra = model_overrides(args)
    if args.hippocampus_plan:
        extra.append("train.batch_dice=false")  # as medseg plan chooses for this data
    names = args.configs or [n for n in all_configs() if not n.endswith("-cl")]  # -cl: when asked for
    if args.no_compile:
        names = [n for n in names if run_kind(n) == "off"]
    unknown = [n for n in names if _base(n) not in all_configs()]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {all_configs()}")
    cfg = make_cfg(patch, batch, "off", extra)
    plan = network_plan(cfg, (1.0, 1.0, 1.0))
    print(f"patch {patch}  batch {batch}  amp {amp_name(amp)}  stages {len(plan.widths)}  widths {list(plan.widths)}  "
          f"strides {[list(s) for s in plan.strides]}", flush=True)
    peak_tflops = matmul_tflops(device, args.matmul_size)
    print(f"matmul {args.matmul_size}^3 ({'fp16' if device.type == 'cuda' else 'fp32'}): {peak_tflops:.3g} TFLOP/s",
          flush=True)
    flops: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        family = name.split("-")[0]
        if family not in flops:
            try:
                flops[family] = count_flops(name, patch, batch, extra, 1, 3)
            except Exception as exc:  # noqa: BLE001
                print(f"FLOP count of {family} failed: {exc}")
                flops[family] = math.nan
            print(f"{family}: {flops[family] / 1e12:.4g} TFLOP per step (forward + backward)", flush=True)
        print(f"{name} ...", end=" ", flush=True)
        r = run_config(name, args, device, amp, patch, batch, extra)
        if r["status"] == "ok":
            r["flops"] = flops[family]
            r["tflops"] = flops[family] / (r["ms"] / 1000) / 1e12 if not math.isnan(flops[family]) else None
            print(f"{r['ms']:.1f} ms/step" + (f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""), flush=True)
            if "profile" in r:
                print_profile(r["profile"], device)
        else:
            print(r["status"], flush=True)
        results[name] = r
    print()
    summary = print_table(results, peak_tflops)
    return {"patch": patch, "batch": batch, "amp": amp_name(amp), "widths": list(plan.widths),
            "strides": [list(s) for s in plan.strides], "matmul_tflops": peak_tflops, "flops": flops,
            "configs": results, "summary": summary}


# ----------------------------------------------------------------------------------------------- Part 2


def dataset_channels(path: Path) -> tuple[int, int]:
    """(in_channels, classes) from dataset.json; (1, 3) without one."""
    description = path / "dataset.json"
    if not description.is_file():
        return 1, 3
    info = json.loads(description.read_text(encoding="utf-8"))
    modality = info.get("modality") or info.get("channel_names") or {"0": ""}
    return len(modality), len(info.get("labels") or {"0": 0, "1": 1, "2": 2})


def part2(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for dataset in args.full:
        path = Path(dataset).resolve()
        config_file = args.full_config
        if config_file is None and "hippocampus" in path.name.lower():
            config_file = str(REPO / "configs" / "hippocampus.yaml")
        overrides = [f"data.dataset={path}", "data.fold=-1", "validate.every=0",
                     f"train.epochs={args.full_epochs}", f"train.iterations_per_epoch={args.full_iterations}",
                     f"train.device={args.device}", *model_overrides(args)]
        if args.patch:
            overrides.append(f"train.patch_size=[{','.join(map(str, args.patch))}]")
        if args.batch:
            overrides.append(f"train.batch_size={args.batch}")
        if args.no_compile:
            overrides.append("train.compile=off")
        overrides += args.full_set
        cfg = config.load(config_file, overrides)
        kind = compile_setting(cfg, device)
        amp = resolve_amp(cfg.train.amp, device)
        patch, batch = list(cfg.train.patch_size), cfg.train.batch_size
        spacing = tuple(cfg.data.spacing) if cfg.data.spacing else (1.0, 1.0, 1.0)
        in_channels, classes = dataset_channels(path)
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            command = [sys.executable, "-m", "medseg", "train", *([config_file] if config_file else [])]
            for item in [*overrides, f"output_dir={tmp}", "run_name=bench"]:
                command += ["--set", item]
            print(f"\n{path}: patch {patch} batch {batch} checkpointing {cfg.model.checkpointing} "
                  f"compile {kind} amp {amp_name(amp)}\n$ {shlex.join(command)}", flush=True)
            started = time.perf_counter()
            done = subprocess.run(command, env=os.environ.copy(), cwd=REPO)
            wall = time.perf_counter() - started
            metrics = Path(tmp) / "bench" / "metrics.csv"
            if done.returncode != 0 or not metrics.is_file():
                print(f"medseg train failed (exit {done.returncode})")
                rows.append({"dataset": str(path), "status": f"train failed ({done.returncode})"})
                continue
            with metrics.open(encoding="utf-8") as stream:
                history = list(csv.DictReader(stream))
        later = history[1:] or history  # the first epoch includes compilation
        seconds = sum(float(r["train_seconds"]) for r in later)
        steps = sum(int(r["steps"]) for r in later)
        loop_ms = 1000 * seconds / steps
        name = f"medseg-{cfg.model.checkpointing}-{next(k for k, v in RUN_KINDS.items() if v == kind)}"
        if memory_format(cfg, device, kind) == torch.channels_last_3d:
            name += "-cl"  # the pure step in the layout the training ran in
        extra = [f"model.{k}={getattr(cfg.model, k)}" for k in ("base_width", "max_width", "norm", "deep_supervision")]
        extra.append(f"train.batch_dice={str(cfg.train.batch_dice).lower()}")
        if cfg.model.depth is not None:
            extra.append(f"model.depth={cfg.model.depth}")
        print(f"pure step ({name}, resident random tensors) ...", flush=True)
        pure = run_config(name, args, device, amp, patch, batch, extra, in_channels, classes, spacing)
        row: dict[str, Any] = {
            "dataset": str(path), "status": "ok", "patch": patch, "batch": batch, "configuration": name,
            "epochs": len(history), "first_epoch_seconds": float(history[0]["train_seconds"]),
            "loop_ms_per_it": loop_ms, "loop_it_per_s": 1000 / loop_ms, "train_wall_seconds": wall,
            "pure": pure,
        }
        if pure.get("status") == "ok":
            row["pure_ms_per_step"] = pure["ms"]
            row["ratio_loop_over_pure"] = loop_ms / pure["ms"]
            row["pure_it_per_s"] = 1000 / pure["ms"]
        rows.append(row)
    print(f"\n{'dataset':<30} {'patch':<14} {'b':>2} {'loop ms/it':>11} {'pure ms':>8} {'ratio':>6} "
          f"{'loop it/s':>10} {'pure it/s':>10} {'1st epoch s':>12}")
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['dataset']:<30} {row['status']}")
            continue
        print(f"{row['dataset']:<30} {'x'.join(map(str, row['patch'])):<14} {row['batch']:>2} "
              f"{row['loop_ms_per_it']:11.1f} {fmt(row.get('pure_ms_per_step'), '8.1f')} "
              f"{fmt(row.get('ratio_loop_over_pure'), '6.2f')} {row['loop_it_per_s']:10.2f} "
              f"{fmt(row.get('pure_it_per_s'), '10.2f')} {row['first_epoch_seconds']:12.1f}")
    return rows


# ------------------------------------------------------------------------------------ synthetic dataset


def _write_case(root: str, index: int, shape: tuple[int, int, int], seed: int) -> str:
    import nibabel as nib

    rng = np.random.default_rng(seed + index)
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    image = np.zeros(shape, dtype=np.float32)
    for _ in range(4):  # smooth background: separable Gaussian blobs
        centre = rng.uniform(0, 1, 3) * np.array(shape)
        sigma = rng.uniform(0.1, 0.3, 3) * np.array(shape)
        g = [np.exp(-0.5 * ((a - c) / s) ** 2).astype(np.float32) for a, c, s in zip(axes, centre, sigma)]
        image += rng.uniform(50, 150) * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
    label = np.zeros(shape, dtype=np.uint8)
    for cls in (1, 2):  # one ellipsoid per class
        centre = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        radii = rng.uniform(0.08, 0.18, 3) * np.array(shape)
        q = [((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)]
        inside = (q[0][:, None, None] + q[1][None, :, None] + q[2][None, None, :]) <= 1.0
        label[inside] = cls
        image[inside] += 60.0 * cls
    image += rng.standard_normal(shape, dtype=np.float32) * 10.0
    affine = np.eye(4)  # 1 mm
    name = f"large_{index:03d}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(Path(root) / "imagesTr" / name))
    nib.save(nib.Nifti1Image(label, affine), str(Path(root) / "labelsTr" / name))
    return name


def make_large(root: Path, cases: int, shape: list[int], seed: int = 0) -> None:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workers = max(1, min(cases, (os.cpu_count() or 1)))
    with ProcessPoolExecutor(workers) as pool:
        names = list(pool.map(_write_case, [str(root)] * cases, range(cases), [tuple(shape)] * cases,
                              [seed] * cases))
    description = {
        "name": "synthetic-large", "description": "bench_train.py synthetic large volumes",
        "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": cases,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=2))
    print(f"wrote {cases} cases of {shape} to {root} in {time.perf_counter() - started:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="default 128 128 128 (Part 2: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="default 2 (Part 2: the config's)")
    parser.add_argument("--hippocampus-plan", action="store_true", help="--patch 40 56 40 --batch 7")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N steps of each configuration and print where the time goes")
    parser.add_argument("--warmup", type=int, default=5, help="eager warm-up steps; compiled: one more")
    parser.add_argument("--configs", nargs="+", default=None, help=f"subset of {all_configs()}")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (smoke tests)")
    parser.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"],
                        help="auto = fp16 on CUDA, as medseg train (on the CPU: bf16 if fast, else off)")
    parser.add_argument("--memory-limit", type=float, default=None, help="GiB the process may allocate")
    parser.add_argument("--base-width", type=int, default=None)
    parser.add_argument("--max-width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--matmul-size", type=int, default=None, help="default 8192 on CUDA, 512 on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--full", nargs="+", default=None, metavar="DATASET", help="Part 2: medseg train loop")
    parser.add_argument("--full-config", default=None,
                        help="config for --full (default: configs/hippocampus.yaml for a *hippocampus* folder, "
                             "else configs/default.yaml)")
    parser.add_argument("--full-epochs", type=int, default=3)
    parser.add_argument("--full-iterations", type=int, default=100)
    parser.add_argument("--full-set", nargs="*", default=[], help="extra section.key=value overrides for --full")
    parser.add_argument("--make-large", type=Path, default=None, metavar="DIR", help="write a synthetic dataset")
    parser.add_argument("--large-cases", type=int, default=30)
    parser.add_argument("--large-shape", type=int, nargs=3, default=[256, 256, 200])
    args = parser.parse_args(argv)
    if args.hippocampus_plan:
        args.patch, args.batch = args.patch or HIPPOCAMPUS_PATCH, args.batch or HIPPOCAMPUS_BATCH
    if args.make_large is not None:
        make_large(args.make_large, args.large_cases, args.large_shape)
        if args.full is None:
            return

    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    if args.matmul_size is None:
        args.matmul_size = 8192 if device.type == "cuda" else 512
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "steps": args.steps,
                              "warmup": args.warmup}
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)  # CUDA events and caches on the same device
        torch.backends.cudnn.benchmark = True
        total = torch.cuda.get_device_properties(device).total_memory
        report["gpu"] = torch.cuda.get_device_name(device)
        report["gpu_total_gib"] = total / GiB
        if args.memory_limit is not None:
            fraction = min(1.0, args.memory_limit * GiB / total)
            torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
            report["memory_limit_gib"] = args.memory_limit
        print(f"GPU {report['gpu']} ({total / GiB:.1f} GiB"
              f"{f', limited to {args.memory_limit:g} GiB' if args.memory_limit else ''})  torch {torch.__version__}")
    else:
        print(f"device {device}  torch {torch.__version__}  (CPU timers, no memory figures)")
    if args.full is not None:
        report["full"] = part2(args, device)
    else:
        report.update(part1(args, device, amp))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
