#!/usr/bin/env python
"""Generate a tiny synthetic MR-like segmentation dataset (no download needed).

The result lets a new user train and evaluate ``medseg`` on a laptop CPU in
about a minute. It is laid out like a Medical Segmentation Decathlon (MSD) /
nnU-Net raw dataset::

    sample_data/
        dataset.json
        imagesTr/sample_000.nii.gz ... sample_011.nii.gz   (int16 image)
        labelsTr/sample_000.nii.gz ... sample_011.nii.gz   (uint8 labels)

Every case is a small volume (28-40 voxels per axis, spacing 1.0-1.3 mm
in-plane and 1.5 mm through-plane) showing a head-like ellipsoid of tissue
(intensity ~100 under a smooth bias field) on a zero background. Inside it sit
two labelled structures:

* label 1, ``core``: an ellipsoid, brighter than tissue (~160);
* label 2, ``shell``: a curved cap wrapped around one side of the core,
  darker than tissue (~60).

The affine is deliberately *not* the identity: the voxel grid is rotated by
5-20 degrees about a random axis, has a non-zero origin, and some cases are
stored with flipped axes (LPS- or LAS-like instead of RAS). All anatomy is
defined in world (scanner, mm) coordinates and then sampled on the voxel grid,
so the geometry stays consistent and reorientation / resampling code paths are
actually exercised. The image is slightly blurred (partial-volume edges) and
gets Rician noise (sigma 8-10); labels stay crisp.

Generation is deterministic for a given ``--seed``: every case draws from its
own ``np.random.default_rng((seed, case_index))``, never from the global
NumPy RNG.

Usage::

    python scripts/make_sample_data.py                 # 12 cases -> ./sample_data
    python scripts/make_sample_data.py --cases 4 --out /tmp/tiny --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

_REPO_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_OUT = _REPO_ROOT / "sample_data"
_CASE_PREFIX = "sample"
_LABELS = {"0": "background", "1": "core", "2": "shell"}

# Geometry / appearance ranges (mm, intensity units).
_SHAPE_RANGE = (28, 40)  # voxels per axis, inclusive
_INPLANE_SPACING_RANGE = (1.0, 1.3)
_Z_SPACING = 1.5
_ROTATION_DEG_RANGE = (5.0, 20.0)
_ORIGIN_CENTER_RANGE_MM = 40.0  # volume centre lies within +-40 mm of 0
_FLIPS = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1)}
_FLIP_PROBS = (0.5, 0.3, 0.2)
_SHELL_OUTER_SCALE = 1.45  # outer surface of the shell, in core radii
_BLUR_SIGMA_VOX = 0.6
_NOISE_SIGMA_RANGE = (8.0, 10.0)
_MIN_LABEL_VOXELS = 300
_MAX_ATTEMPTS = 50


@dataclass(frozen=True)
class _Case:
    """One generated case: arrays plus the metadata printed in the summary."""

    name: str
    image: np.ndarray  # int16, (X, Y, Z)
    label: np.ndarray  # uint8, (X, Y, Z)
    affine: np.ndarray  # 4x4 voxel -> world (RAS+, mm)
    spacing: tuple[float, float, float]
    rotation_deg: float


def _rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation by ``angle_rad`` about unit vector ``axis`` (Rodrigues' formula)."""
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1.0 - math.cos(angle_rad)) * (k @ k)


def _random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _random_rotation(rng: np.random.Generator, max_deg: float, min_deg: float = 0.0) -> tuple[np.ndarray, float]:
    """Rotation about a random axis by a random angle with |angle| in [min_deg, max_deg]."""
    angle = rng.uniform(min_deg, max_deg) * rng.choice((-1.0, 1.0))
    return _rotation_matrix(_random_unit_vector(rng), math.radians(angle)), float(angle)


def _make_affine(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Random oblique voxel->world affine with a non-zero origin.

    Returns the 4x4 affine, the grid rotation (without flips, used to align
    the head with the field of view) and the rotation angle in degrees.
    """
    min_deg, max_deg = _ROTATION_DEG_RANGE
    grid_rot, angle = _random_rotation(rng, max_deg, min_deg)
    flip = _FLIPS[str(rng.choice(list(_FLIPS), p=_FLIP_PROBS))]
    linear = grid_rot @ np.diag(flip) @ np.diag(spacing)
    centre_world = rng.uniform(-_ORIGIN_CENTER_RANGE_MM, _ORIGIN_CENTER_RANGE_MM, size=3)
    centre_voxel = (np.asarray(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre_world - linear @ centre_voxel
    return _qform_representable(affine), grid_rot, angle


def _qform_representable(affine: np.ndarray) -> np.ndarray:
    """Round ``affine`` to what the NIfTI qform (float32 quaternion) can store.

    Using this exact matrix for both sform and qform keeps the two consistent
    in the saved files, so readers that prefer either one agree.
    """
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    return header.get_qform()


def _world_coordinates(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of every voxel centre, shape (3, X*Y*Z)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return affine[:3, :3] @ ijk + affine[:3, 3:4]


def _local(world: np.ndarray, centre: np.ndarray, rot: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid coordinates: |q| <= 1 is inside the ellipsoid."""
    return (rot.T @ (world - centre[:, None])) / semi_axes[:, None]


def _draw_anatomy(
    rng: np.random.Generator,
    world: np.ndarray,
    half_fov: np.ndarray,
    grid_rot: np.ndarray,
    volume_centre: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw head, core and shell in world space.

    Returns flat boolean masks (head, core, shell) and the flat bias field.
    """
    # Head: ellipsoid roughly filling the field of view, aligned with the grid
    # up to a small extra tilt (like a head positioned in the scanner).
    head_axes = half_fov * rng.uniform(0.80, 0.90, size=3)
    head_rot = grid_rot @ _random_rotation(rng, 6.0)[0]
    head_centre = volume_centre + rng.uniform(-0.03, 0.03, size=3) * half_fov
    q_head = _local(world, head_centre, head_rot, head_axes)
    r_head = np.linalg.norm(q_head, axis=0)
    head = r_head <= 1.0

    # Core: ellipsoid inside the head, sized relative to it, with its own tilt,
    # placed so that the core plus its shell stays inside the head.
    core_frac = rng.uniform(0.36, 0.46, size=3)
    core_axes = head_axes * core_frac
    core_rot = head_rot @ _random_rotation(rng, 25.0)[0]
    room = np.clip(0.92 - _SHELL_OUTER_SCALE * core_frac, 0.0, None)
    core_offset = rng.uniform(-1.0, 1.0, size=3) * room * head_axes
    core_centre = head_centre + head_rot @ core_offset
    q_core = _local(world, core_centre, core_rot, core_axes)
    r_core = np.linalg.norm(q_core, axis=0)
    core = r_core <= 1.0

    # Shell: a curved cap hugging slightly more than one half of the core.
    cap_dir = _random_unit_vector(rng)
    cap_cos = rng.uniform(-0.3, 0.0)
    towards_cap = (cap_dir @ q_core) > cap_cos * r_core
    shell = (r_core > 1.0) & (r_core <= _SHELL_OUTER_SCALE) & towards_cap & (r_head <= 0.95)

    # Smooth multiplicative bias field: a linear ramp plus a mild dome.
    gradient = _random_unit_vector(rng) * rng.uniform(0.08, 0.15)
    bias = 1.0 + gradient @ q_head - 0.06 * r_head**2
    return head, core, shell, bias


def _make_case(index: int, seed: int) -> _Case:
    """Generate one case deterministically from ``(seed, index)``."""
    rng = np.random.default_rng((seed, index))
    name = f"{_CASE_PREFIX}_{index:03d}"
    lo, hi = _SHAPE_RANGE
    shape = tuple(int(n) for n in rng.integers(lo, hi + 1, size=3))
    spacing = np.array([*rng.uniform(*_INPLANE_SPACING_RANGE, size=2), _Z_SPACING])
    affine, grid_rot, angle = _make_affine(rng, shape, spacing)
    world = _world_coordinates(shape, affine)
    half_fov = np.asarray(shape) * spacing / 2.0
    volume_centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]

    for _ in range(_MAX_ATTEMPTS):
        head, core, shell, bias = _draw_anatomy(rng, world, half_fov, grid_rot, volume_centre)
        if min(int(core.sum()), int(shell.sum())) >= _MIN_LABEL_VOXELS:
            break
    else:  # pragma: no cover - parameters above make this practically unreachable
        raise RuntimeError(f"{name}: could not place structures with >= {_MIN_LABEL_VOXELS} voxels each")

    label = np.zeros(head.shape, dtype=np.uint8)
    label[shell] = 2
    label[core] = 1

    tissue, core_val, shell_val = rng.uniform(95, 105), rng.uniform(150, 170), rng.uniform(55, 65)
    clean = np.zeros(head.shape, dtype=np.float64)
    clean[head] = tissue
    clean[shell] = shell_val
    clean[core] = core_val
    clean *= bias
    clean = ndimage.gaussian_filter(clean.reshape(shape), sigma=_BLUR_SIGMA_VOX)

    sigma = rng.uniform(*_NOISE_SIGMA_RANGE)
    noisy = np.hypot(clean + rng.normal(0.0, sigma, size=shape), rng.normal(0.0, sigma, size=shape))
    image = np.clip(np.rint(noisy), 0, np.iinfo(np.int16).max).astype(np.int16)

    return _Case(
        name=name,
        image=image,
        label=label.reshape(shape),
        affine=affine,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        rotation_deg=angle,
    )


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save with identical sform/qform (scanner coordinates) and mm units."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units(xyz="mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))


def _dataset_json(names: list[str]) -> dict:
    """MSD-style dataset.json (plus nnU-Net v2 ``channel_names``/``file_ending``)."""
    return {
        "name": "MedsegSample",
        "description": (
            "Synthetic MR-like toy dataset generated by scripts/make_sample_data.py "
            "(head-like ellipsoid with a bright 'core' ellipsoid and a dark curved 'shell' "
            "around it, oblique affines, bias field, Rician noise). Not real patient data; "
            "meant for smoke tests and quick CPU demos."
        ),
        "reference": "medseg scripts/make_sample_data.py",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "channel_names": {"0": "MRI"},
        "labels": dict(_LABELS),
        "numTraining": len(names),
        "numTest": 0,
        "file_ending": ".nii.gz",
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names
        ],
        "test": [],
    }


def _remove_stale_cases(out: Path) -> None:
    """Delete previously generated case files so a smaller --cases leaves no leftovers."""
    for sub in ("imagesTr", "labelsTr"):
        for path in (out / sub).glob(f"{_CASE_PREFIX}_*.nii.gz"):
            path.unlink()


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12, help="number of cases (default: 12)")
    parser.add_argument(
        "--out", type=Path, default=_DEFAULT_OUT, help=f"output folder (default: {_DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    out: Path = args.out
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    _remove_stale_cases(out)

    names: list[str] = []
    for index in range(args.cases):
        case = _make_case(index, args.seed)
        _save_nifti(case.image, case.affine, out / "imagesTr" / f"{case.name}.nii.gz")
        _save_nifti(case.label, case.affine, out / "labelsTr" / f"{case.name}.nii.gz")
        names.append(case.name)
        counts = np.bincount(case.label.ravel(), minlength=3)
        spacing = ", ".join(f"{s:.2f}" for s in case.spacing)
        print(
            f"{case.name}: shape={case.image.shape} spacing=({spacing}) mm "
            f"orient={''.join(nib.aff2axcodes(case.affine))} rot={case.rotation_deg:+.1f}deg "
            f"voxels bg={counts[0]} core={counts[1]} shell={counts[2]}"
        )

    (out / "dataset.json").write_text(json.dumps(_dataset_json(names), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(names)} cases to {out} ({_dir_size(out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
