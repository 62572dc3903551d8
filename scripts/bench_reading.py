"""Reading and preprocessing a large CT, the two-copy way medseg read before and its one-pass reading,
side by side in one run.

    python scripts/bench_reading.py                       # 512x512x400 int16 CT at 0.8x0.8x1 mm, 5 repetitions
    python scripts/bench_reading.py --shape 64 64 40 --repetitions 2  # a quick smoke test

1. Synthesis, not timed: the CT of `bench_ct_inference.py` (int16 Hounsfield-like values, gzip
   level 1), written as .nii.gz into a temporary folder.
2. Three pairs, timed alternately within each repetition, which of a pair goes first alternating too
   (so a load on the machine hits both alike):
   - reading: ``LoadImaged`` as ``medseg infer`` runs it (the "reading" stage). Before: MONAI's own
     ``LoadImaged`` with MONAI's own ``NibabelReader`` (what ``medseg.data.readers`` gave it for NIfTI),
     which casts int16 to float32 in Fortran order and then copies that into C order for torch. Now:
     the same step with medseg's readers, which cast while they reorder, in one copy.
   - reading + preprocessing: the whole chain of a CT model at --target-spacing mm (reorientation,
     foreground crop, resampling, CT normalisation), with either loading step; the steps after it are
     the same objects.
   - load_volume (``medseg plan``, the dataset checks, fingerprints). Before: nibabel's array,
     ``astype(float32)``, then ``np.ascontiguousarray``, as load_volume did. Now: ``load_volume``.
   Each pair's outputs are checked to be bit-identical (values, dtype, affine and meta). Each is run
   once untimed first (imports made on first use, such as SimpleITK by medseg's readers).
3. Median seconds of each and the ratio before/now. Times are of the machine the script runs on:
   on a CPU they are CPU figures (torch's threads as it sets them); nothing here runs on a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def main() -> None:
    args = _parser().parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_reading_"))
    try:
        path = work / "ct.nii.gz"
        _synthesise(tuple(args.shape), tuple(args.spacing), path)
        pairs = _pairs(path, args.target_spacing)
        times = {name: ([], []) for name in pairs}
        for before, now, _ in pairs.values():  # once untimed: lazy imports and first-call costs
            before(), now()
        for repetition in range(args.repetitions):
            for name, (before, now, same) in pairs.items():
                # Which goes first alternates, so that neither always finds the other's memory freed.
                if repetition % 2 == 0:
                    old, new = _timed(before, times[name][0]), _timed(now, times[name][1])
                else:
                    new, old = _timed(now, times[name][1]), _timed(before, times[name][0])
                same(old, new)  # outside the timing
                del old, new
        _report(args, path, times)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _synthesise(shape: tuple[int, ...], spacing: tuple[float, ...], path: Path) -> None:
    from bench_ct_inference import synthesise_ct  # this script's folder is on sys.path

    started = time.perf_counter()
    synthesise_ct(shape, spacing, path)
    print(f"CT {'x'.join(map(str, shape))} int16 at {'x'.join(f'{s:g}' for s in spacing)} mm: "
          f"{path.stat().st_size / 2**20:.0f} MiB .nii.gz (gzip level 1), synthesised in "
          f"{time.perf_counter() - started:.1f} s (not timed)")


def _pairs(path: Path, target_spacing: float) -> dict[str, tuple[Callable, Callable, Callable]]:
    """For each measurement: (before, now, check that their results are identical)."""
    import nibabel as nib
    from bench_ct_inference import CT_STATISTICS
    from monai import transforms as T
    from monai.data import NibabelReader as MonaiNibabelReader

    from medseg.data.io import load_volume
    from medseg.data.transforms import Preprocessing, preprocessing

    prep = Preprocessing(spacing=(target_spacing,) * 3, normalization="ct", channels=1, num_classes=2,
                         **CT_STATISTICS)
    chain = preprocessing(prep, with_label=False)
    stock_loader = T.LoadImaged(("image",), reader=MonaiNibabelReader(), image_only=True, ensure_channel_first=True)
    stock_chain = T.Compose([stock_loader, *chain.transforms[1:]])
    case = {"image": str(path)}

    def old_load_volume() -> tuple[np.ndarray, np.ndarray]:
        image = nib.load(path)
        return np.ascontiguousarray(np.asanyarray(image.dataobj)[None].astype(np.float32)), image.affine

    loader = chain.transforms[0]
    return {
        "reading (LoadImaged)": (lambda: stock_loader(dict(case))["image"], lambda: loader(dict(case))["image"],
                                 _same_image),
        "reading + preprocessing": (lambda: stock_chain(dict(case))["image"], lambda: chain(dict(case))["image"],
                                    _same_image),
        "load_volume": (old_load_volume, lambda: load_volume(path), _same_volume),
    }


def _timed(function: Callable, seconds: list[float]) -> object:
    started = time.perf_counter()
    result = function()
    seconds.append(time.perf_counter() - started)
    return result


def _same_image(before: object, now: object) -> None:
    """The MetaTensors hold the same bits, dtype and meta."""
    assert before.dtype == now.dtype and before.shape == now.shape, (before.dtype, now.dtype)
    assert before.numpy().tobytes() == now.numpy().tobytes(), "the values differ"
    assert sorted(before.meta) == sorted(now.meta), "the meta keys differ"
    for key, value in before.meta.items():
        value = np.asarray(value)
        assert np.array_equal(value, np.asarray(now.meta[key]), equal_nan=value.dtype.kind == "f"), key


def _same_volume(before: tuple[np.ndarray, np.ndarray], now: tuple[np.ndarray, np.ndarray]) -> None:
    assert before[0].dtype == now[0].dtype and before[0].tobytes() == now[0].tobytes(), "the values differ"
    assert np.array_equal(before[1], now[1]), "the affines differ"


def _report(args: argparse.Namespace, path: Path, times: dict[str, tuple[list[float], list[float]]]) -> None:
    import torch

    print(f"{args.repetitions} repetitions, alternating; on the CPU (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); every pair's outputs bit-identical")
    print(f"{'':26}{'before s':>10}{'now s':>10}{'before/now':>12}   (median; every repetition: before | now)")
    for name, (before, now) in times.items():
        ratio = statistics.median(before) / statistics.median(now)
        each = " ".join(f"{b:.2f}" for b in before) + " | " + " ".join(f"{n:.2f}" for n in now)
        print(f"{name:26}{statistics.median(before):10.2f}{statistics.median(now):10.2f}{ratio:12.2f}   ({each})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400], help="CT voxels (x, y, z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0], help="CT spacing (mm)")
    parser.add_argument("--target-spacing", type=float, default=1.5, help="the model's isotropic spacing (mm)")
    parser.add_argument("--repetitions", type=int, default=5, help="timed repetitions of each pair")
    return parser


if __name__ == "__main__":
    main()
