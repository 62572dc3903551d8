"""Whether two volumes lie on the same voxel grid: one rule for every comparison medseg makes.

An image and its label (dataset checks), the channel files of one case (the checks, and the
SimpleITK reader stacking them), a prediction and its reference (`medseg evaluate`): all are
compared by :func:`grid_difference`, with one pair of tolerances.

The 3x3 part of the affine (spacing times direction) is compared relative to its largest entry,
so that a rounding error in a header counts the same at 0.5 mm voxels as at 5 mm ones; the origin
is compared absolutely, in mm. Both tolerances are far below any real misregistration (a tenth
of a voxel is hundreds of times larger) and above the rounding of headers written as text (NRRD,
DICOM) or in float32 (NIfTI).

This module imports numpy only, so ``medseg plan`` and the checks stay free of MONAI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MATRIX_TOLERANCE", "ORIGIN_TOLERANCE_MM", "grid_difference"]

# Origins may lie this far apart (Euclidean distance, mm).
ORIGIN_TOLERANCE_MM = 1e-3
# The 3x3 parts may differ by this share of the reference's largest entry.
MATRIX_TOLERANCE = 1e-4


def grid_difference(affine: np.ndarray, reference: np.ndarray, what: str) -> str | None:
    """How the grid of `affine` differs from that of `reference`, in words; None where it does not.

    Args:
        affine: 4x4 voxel-to-world affine of the volume being checked.
        reference: 4x4 affine it should match.
        what: the reference, as the message names it (e.g. "its image", "the reference").

    Returns:
        None when the grids agree within :data:`MATRIX_TOLERANCE` and :data:`ORIGIN_TOLERANCE_MM`,
        else one phrase: the voxel spacing, the orientation (the largest angle between matching
        axes) or the origin that differs, with both values. Shapes are compared by the caller.
    """
    affine = np.asarray(affine, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if not (np.all(np.isfinite(affine)) and np.all(np.isfinite(reference))):
        return "invalid (non-finite) affine in the header"
    matrix, ref_matrix = affine[:3, :3], reference[:3, :3]
    scale = float(np.abs(ref_matrix).max()) or 1.0
    if np.abs(matrix - ref_matrix).max() > MATRIX_TOLERANCE * scale:
        spacing, ref_spacing = np.linalg.norm(matrix, axis=0), np.linalg.norm(ref_matrix, axis=0)
        if np.abs(spacing - ref_spacing).max() > MATRIX_TOLERANCE * scale:
            return f"voxel spacing {_mm(spacing)} mm differs from {what} ({_mm(ref_spacing)} mm)"
        directions = matrix / np.where(spacing > 0, spacing, 1.0)
        ref_directions = ref_matrix / np.where(ref_spacing > 0, ref_spacing, 1.0)
        cosines = np.clip(np.sum(directions * ref_directions, axis=0), -1.0, 1.0)
        angle = float(np.degrees(np.arccos(cosines)).max())
        return f"orientation (direction of the axes) differs from {what} by {angle:.3g}°"
    shift = float(np.linalg.norm(affine[:3, 3] - reference[:3, 3]))
    if shift > ORIGIN_TOLERANCE_MM:
        return (f"origin differs from {what} by {shift:.3g} mm "
                f"({_point(affine[:3, 3])} vs {_point(reference[:3, 3])})")
    return None


def _mm(values: Sequence[float]) -> str:
    return "×".join(f"{float(v):.4g}" for v in values)


def _point(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
