"""`medseg infer` end to end on a large synthetic CT: seconds per stage, peak GPU and host memory.

    python scripts/bench_ct_inference.py --out ct_inference.json     # 512x512x400 at 0.8x0.8x1 mm; 104 and 12 classes

1. Synthesis, outside every timed part: a CT of --shape voxels at --spacing mm (int16 Hounsfield-like
   values: air, a body of soft tissue under a fat layer, lungs, liver, kidneys, a contrast-filled
   aorta, spine and ribs, noise), written as .nii.gz at gzip level 1 (compressed in parallel as a
   multi-member gzip file, which reads as any other does). Beside it, in a child process (it imports
   MONAI), for every --classes count a checkpoint of medseg's default network for a CT model at
   --target-spacing mm, built from medseg's config and models and saved as `medseg train` saves one
   (`medseg.run_state.RunState`), so `medseg infer` loads it as it loads any. The networks are
   UNTRAINED: their weights are random; time and memory do not depend on them.
2. Inference: for each checkpoint a fresh child process runs `medseg.infer.predict` (what `medseg
   infer` runs) on the CT and reports the seconds of each stage (`Prediction.stages`: reading,
   preprocessing, network, restoring onto the input's grid, writing), of the whole call (model
   loading included, "other" = what the stages leave), its peak GPU memory (PyTorch's allocator:
   max allocated and reserved) and its peak resident host memory (ru_maxrss, imports included).
   The written label map's grid is checked against the input's (shape, affine).
3. A table, and JSON at --out.

On the CPU (`--device cpu`, a tiny --shape and `--set model.base_width=4 ...`) this is a smoke test of
the script; its times are no measurement.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GiB = 2**30
STAGES = ("reading", "preprocessing", "network", "restoring", "writing")
TARGETS = {"total_s": 60.0, "gpu_reserved_gib": 24.0, "host_peak_rss_gib": 16.0}
WEIGHTS = "random (untrained networks): the time and memory of inference do not depend on the weights"
# Made-up CT statistics of the "training set" (clip window, mean and std in HU): the values only
# set the normalisation's constants, whose cost does not depend on them.
CT_STATISTICS = {"clip_low": (-1000.0,), "clip_high": (1500.0,), "mean": (40.0,), "std": (350.0,)}


def main() -> None:
    args = _parser().parse_args()
    if args.role in ("build", "infer"):
        from medseg.monai_import import skip_monai_extras

        skip_monai_extras()  # as the `medseg` command does, before MONAI is imported
    if args.role == "build":
        return build_checkpoints(Path(args.work), args.classes, args.target_spacing, args.set)
    if args.role == "infer":
        return run_inference(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_ct_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = benchmark(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


def benchmark(args: argparse.Namespace, work: Path) -> dict:
    """Synthesise the CT (and, beside it, the checkpoints), then run one inference child per model."""
    builder = subprocess.Popen([sys.executable, __file__, "--role", "build", "--work", str(work), "--out", "-",
                                "--target-spacing", str(args.target_spacing), "--classes", *map(str, args.classes),
                                *[f"--set={item}" for item in args.set]])
    started = time.perf_counter()
    image = work / "ct.nii.gz"
    affine = synthesise_ct(tuple(args.shape), tuple(args.spacing), image)
    synthesis = time.perf_counter() - started
    if builder.wait() != 0:
        sys.exit("building the checkpoints failed (see above)")
    runs = [infer_child(args, work, image, affine, classes) for classes in args.classes]
    grid = [round(n * s / args.target_spacing) for n, s in zip(args.shape, args.spacing)]
    on_gpu = all(run["gpu"] is not None for run in runs)
    return {
        "weights": WEIGHTS,
        "measurement": on_gpu,
        "note": None if on_gpu else "CPU run: a smoke test of the script; these times are no measurement",
        "gpu": runs[0]["gpu"], "torch": runs[0]["torch"],
        "input": {"shape": list(args.shape), "spacing_mm": list(args.spacing), "dtype": "int16",
                  "file_mib": round(image.stat().st_size / 2**20, 1), "synthesis_s": round(synthesis, 2)},
        "network": {"target_spacing_mm": args.target_spacing, "grid_about": grid, "overrides": list(args.set),
                    "overlap": args.overlap, "sw_batch_size": args.sw_batch_size},
        "targets": TARGETS,
        "runs": runs,
    }


def infer_child(args: argparse.Namespace, work: Path, image: Path, affine: np.ndarray, classes: int) -> dict:
    """One model's inference in a process of its own; its report, with the output's grid checked."""
    import nibabel as nib

    result = work / f"result_{classes}.json"
    predictions = work / f"predictions_{classes}"
    command = [sys.executable, __file__, "--role", "infer", "--out", str(result), "--device", args.device,
               "--checkpoint", str(work / f"model_{classes}.pt"), "--image", str(image),
               "--predictions", str(predictions), "--overlap", str(args.overlap),
               "--sw-batch-size", str(args.sw_batch_size)]
    started = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        sys.exit(f"inference with {classes} classes failed (see above)")
    process_s = time.perf_counter() - started
    run = json.loads(result.read_text(encoding="utf-8"))
    run["process_s"] = round(process_s, 2)  # the child's whole life: interpreter, imports, total
    written = nib.load(run.pop("output"))
    run["classes"] = classes
    run["output_on_input_grid"] = bool(written.shape == tuple(args.shape)
                                       and np.allclose(written.affine, affine, atol=1e-4)
                                       and written.get_data_dtype() == np.uint8)
    run["other_s"] = round(run["total_s"] - sum(run["stages"].values()), 2)
    if run["gpu"] is not None:
        run["within_targets"] = bool(run["total_s"] <= TARGETS["total_s"]
                                     and run["gpu_max_reserved_gib"] <= TARGETS["gpu_reserved_gib"]
                                     and run["host_peak_rss_gib"] <= TARGETS["host_peak_rss_gib"])
    shutil.rmtree(predictions, ignore_errors=True)
    return run


def run_inference(args: argparse.Namespace) -> None:
    """The child: `medseg.infer.predict` on the CT, as `medseg infer` runs it, and what it cost."""
    started = time.perf_counter()
    import torch

    from medseg.device import prefer_growing_segments
    from medseg.infer import predict

    prefer_growing_segments()  # as `medseg infer` does, before CUDA starts
    imports = time.perf_counter() - started
    begun = time.perf_counter()
    [result] = predict(Path(args.checkpoint), [Path(args.image)], Path(args.predictions), overlap=args.overlap,
                       sw_batch_size=args.sw_batch_size, device=args.device)
    total = time.perf_counter() - begun
    if result.error is not None:
        sys.exit(result.error)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    report = {
        "stages": {name: round(seconds, 2) for name, seconds in result.stages.items()},
        "total_s": round(total, 2), "imports_s": round(imports, 2),
        "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
        "gpu_max_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
        "gpu_max_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2),
        "output": str(result.output),
    }
    Path(args.out).write_text(json.dumps(report))


def build_checkpoints(work: Path, classes: list[int], spacing: float, overrides: list[str]) -> None:
    """For each class count, an untrained CT model of medseg's default network (or `overrides`),
    saved as `medseg train` saves its checkpoints."""
    import torch

    from medseg import checkpoint, config
    from medseg.data.cases import class_name
    from medseg.data.transforms import Preprocessing
    from medseg.models import build_model
    from medseg.run_state import RunState
    from medseg.schedule import Schedule
    from medseg.step import build_optimizer

    target = [spacing] * 3
    for count in classes:
        cfg = config.load(None, [f"data.spacing={target}", "data.normalization=ct", *overrides])
        prep = Preprocessing(spacing=tuple(target), normalization="ct", channels=1, num_classes=count,
                             crop_foreground=cfg.data.crop_foreground, labels={c: class_name(c) for c in range(count)},
                             **CT_STATISTICS)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, prep.channels, prep.num_classes, prep.spacing)
        optimizer = build_optimizer(cfg, model)
        run = RunState(cfg, prep, {"train": [], "validation": []}, model, optimizer, Schedule(optimizer, cfg),
                       torch.amp.GradScaler("cpu", enabled=False))
        checkpoint.save(run.state_dict(), work / f"model_{count}.pt")


def synthesise_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], path: Path) -> np.ndarray:
    """Write a CT-like int16 volume (x, y, z) to `path` (.nii.gz, gzip level 1); its affine. The
    affine is what converters write for an axial CT (x and y reversed, RAS), so the inference
    reorients it and back. Each axial slice is one of a few templates (the organs its height
    holds) plus noise, so synthesis takes a second or two."""
    import nibabel as nib

    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    volume = np.empty(shape, dtype=np.int16, order="F")  # NIfTI's order: written without a transpose
    noise = np.random.default_rng(0).normal(0, 15, (*shape[:2], 8)).astype(np.int16)
    templates: dict[tuple, np.ndarray] = {}
    for k in range(shape[2]):
        height = k / max(shape[2] - 1, 1)
        disc = (k * spacing[2]) % 30.0 < 6.0  # an intervertebral disc every 30 mm
        key = (_organs(height), disc)
        if key not in templates:
            templates[key] = _axial_slice(shape[:2], spacing[:2], key[0], disc)
        np.add(templates[key], noise[:, :, k % noise.shape[2]], out=volume[:, :, k])
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    path.write_bytes(_parallel_gzip(image.to_bytes()))
    return affine


def _organs(height: float) -> tuple[str, ...]:
    """The organs an axial slice at `height` (0 = feet end, 1 = head end of the scan) holds."""
    ranges = {"kidneys": (0.15, 0.35), "liver": (0.3, 0.6), "lungs": (0.55, 0.95), "ribs": (0.45, 0.95),
              "aorta": (0.05, 0.9)}
    return tuple(name for name, (low, high) in ranges.items() if low <= height <= high)


def _axial_slice(size: tuple[int, ...], spacing: tuple[float, ...], organs: tuple[str, ...], disc: bool) -> np.ndarray:
    """One axial slice (x, y) in HU: air, the body (fat layer, soft tissue), the given organs, the spine."""
    u = ((np.arange(size[0]) - size[0] / 2) * spacing[0])[:, None]  # mm; y grows posterior
    v = ((np.arange(size[1]) - size[1] / 2) * spacing[1])[None, :]
    a, b = 0.42 * size[0] * spacing[0], 0.32 * size[1] * spacing[1]  # the body's semi-axes

    def ellipse(cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1

    hu = np.full(size, -1000, dtype=np.int16)
    hu[ellipse(0, 0, a, b)] = -100  # subcutaneous fat
    hu[ellipse(0, 0, 0.9 * a, 0.88 * b)] = 40  # soft tissue
    if "lungs" in organs:
        for side in (-1, 1):
            hu[ellipse(side * 0.42 * a, -0.05 * b, 0.33 * a, 0.6 * b)] = -850
    if "liver" in organs:
        hu[ellipse(-0.35 * a, -0.1 * b, 0.35 * a, 0.5 * b)] = 60
    if "kidneys" in organs:
        for side in (-1, 1):
            hu[ellipse(side * 0.35 * a, 0.45 * b, 0.1 * a, 0.16 * b)] = 150
    if "aorta" in organs:
        hu[ellipse(0.05 * a, 0.3 * b, 12, 12)] = 250  # contrast-filled
    hu[ellipse(0, 0.62 * b, 22, 22)] = 900  # the vertebra's cortical bone ...
    hu[ellipse(0, 0.62 * b, 18, 18)] = 80 if disc else 300  # ... round its body, or a disc
    if "ribs" in organs:
        for angle in np.linspace(0.2, 2 * np.pi - 0.2, 12):
            hu[ellipse(0.86 * a * np.sin(angle), 0.84 * b * np.cos(angle), 5, 5)] = 1100
    return hu


def _parallel_gzip(payload: bytes, level: int = 1, piece: int = 8 << 20) -> bytes:
    """gzip at `level`, pieces compressed in parallel threads (zlib releases the GIL) into one
    multi-member gzip file; reading it decompresses as fast as a single member."""
    view = memoryview(payload)
    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        members = pool.map(lambda start: gzip.compress(view[start:start + piece], compresslevel=level, mtime=0),
                           range(0, len(payload), piece))
        return b"".join(members)


def print_table(report: dict) -> None:
    """The runs, one line each, and what they were measured on."""
    source, network = report["input"], report["network"]
    print(f"CT {'x'.join(map(str, source['shape']))} at {'x'.join(f'{s:g}' for s in source['spacing_mm'])} mm "
          f"({source['file_mib']} MiB .nii.gz, synthesised in {source['synthesis_s']} s, not timed); network at "
          f"{network['target_spacing_mm']:g} mm, grid about {'x'.join(map(str, network['grid_about']))}")
    print(f"weights: {report['weights']}")
    print(f"on: {report['gpu'] or 'CPU'} (torch {report['torch']})")
    if report["note"]:
        print(report["note"])
    header = ["classes", *STAGES, "other", "total s", "process s", "GPU alloc GiB", "GPU resv GiB", "host RSS GiB",
              "grid", "targets"]
    widths = [max(len(h), 6) for h in header]
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for run in report["runs"]:
        gib = [run["gpu_max_allocated_gib"], run["gpu_max_reserved_gib"], run["host_peak_rss_gib"]]
        cells = [run["classes"], *(f"{run['stages'].get(name, 0.0):.2f}" for name in STAGES), f"{run['other_s']:.2f}",
                 f"{run['total_s']:.2f}", f"{run['process_s']:.2f}", *(f"{g:.2f}" if g is not None else "-" for g in gib),
                 "same" if run["output_on_input_grid"] else "WRONG",
                 {True: "met", False: "missed"}.get(run.get("within_targets"), "-")]
        print("  ".join(f"{cell:>{w}}" for cell, w in zip(map(str, cells), widths)))
    targets = report["targets"]
    print(f"targets: total <= {targets['total_s']:g} s, GPU reserved <= {targets['gpu_reserved_gib']:g} GiB, "
          f"host RSS <= {targets['host_peak_rss_gib']:g} GiB (on a GPU only); process s: the inference process's "
          f"whole life (interpreter start, imports, model loading, total)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400], help="CT voxels (x, y, z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0], help="CT spacing (mm)")
    parser.add_argument("--target-spacing", type=float, default=1.5, help="the model's isotropic spacing (mm)")
    parser.add_argument("--classes", type=int, nargs="+", default=[104, 12], help="class counts, one model each")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (as medseg infer's --device)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (medseg infer's default)")
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows at once (medseg infer's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the model (as medseg train --set), e.g. model.base_width=4")
    parser.add_argument("--work", help="folder for the CT, checkpoints and outputs (default: a temporary one, removed)")
    for hidden in ("--checkpoint", "--image", "--predictions"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--role", default="main", choices=("main", "build", "infer"), help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    main()
