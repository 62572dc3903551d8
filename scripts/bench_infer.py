"""Inference on a large synthetic CT-like volume: seconds and peak GPU memory.

Builds a checkpoint of medseg's default network (patch 128³, widths 32..320) for N classes with
random weights (memory and time do not depend on the weights), writes a synthetic volume of the
given shape as NIfTI, and runs `medseg.infer.predict` on it, as `medseg infer` would.

    python scripts/bench_infer.py --shape 512 512 600 --classes 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medseg import checkpoint, config
from medseg.data.cases import class_name
from medseg.data.io import write_nifti
from medseg.data.transforms import Preprocessing
from medseg.infer import predict
from medseg.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 600])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0])
    parser.add_argument("--target-spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0])
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--mirror", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    cfg = config.load(None, ["train.patch_size=[128,128,128]"])
    prep = Preprocessing(spacing=tuple(args.target_spacing), normalization="zscore", channels=1,
                         num_classes=args.classes, crop_foreground=True,
                         labels={c: class_name(c) for c in range(args.classes)})
    model = build_model(cfg, 1, args.classes, prep.spacing)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "preprocessing": prep.to_dict(), "epoch": 0}
    checkpoint.save(state, work / "model.pt")

    rng = np.random.default_rng(0)
    volume = rng.normal(0, 300, size=args.shape).astype(np.int16)
    affine = np.diag([*args.spacing, 1.0])
    write_nifti(volume, affine, work / "ct.nii", dtype=np.int16)
    del volume

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    results = predict(work / "model.pt", [work / "ct.nii"], work / "out", mirror=args.mirror)
    seconds = time.perf_counter() - started
    result = results[0]
    assert result.error is None, result.error
    out = nib.load(result.output)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"volume {args.shape} spacing {args.spacing} -> network spacing {args.target_spacing}, "
          f"{args.classes} classes, mirror={args.mirror}")
    print(f"output shape {out.shape}, affine equal: {np.allclose(out.affine, affine, atol=1e-4)}")
    print(f"seconds (load + predict + write): {seconds:.1f}; predict alone: {result.seconds:.1f}")
    print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
          f"reserved: {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
