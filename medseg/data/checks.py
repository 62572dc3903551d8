"""Checking a dataset's files before any expensive work: one read per file, one line per problem.

:func:`check_case` reads a case's image file(s) and label once each (through
:func:`medseg.data.io.load_volume`, the same readers as training) and raises
``DataError("<file>: <problem>")`` for anything that would make training fail late or silently
learn garbage: 2D, empty or all-zero volumes, headers describing more voxels than
:data:`medseg.data.io.MAX_VOXELS` or unusable geometry, complex or RGB voxels, 4D images where 3D ones are expected, wrong channel counts,
image/label grids that do not match (:func:`medseg.data.grid.grid_difference`), label values
that are undeclared, not integers or above :data:`MAX_LABEL`, and NaN/Inf intensities.
:func:`check_dataset` checks every case and reports all problems at once, one line per case.

The returned :class:`CaseSummary` (shape, spacing, channels, label values) is what planning needs,
so that a checked dataset does not have to be read again for its fingerprint.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.cases import Case
from medseg.data.grid import grid_difference
from medseg.data.io import check_geometry, load_volume, map_cases, read_header, spacing_in_ras
from medseg.errors import DataError, doing

__all__ = ["MAX_LABEL", "CaseSummary", "DatasetCheckError", "check_case", "check_dataset", "check_image"]

_SHOWN_VALUES = 8  # at most this many offending values are listed in a message
# The highest label value: label maps are cached and written as uint8 (a wider type would double
# the memory of every cached label for a case no dataset in practice has).
MAX_LABEL = 255


@dataclass(frozen=True, eq=False)
class CaseSummary:
    """What checking a case learnt about it, enough for planning.

    Attributes:
        name: the case name.
        shape: spatial shape in array axis order ``(x, y, z)``, as the readers return it.
        spacing: voxel size in mm along those same axes.
        affine: the image's 4x4 voxel-to-RAS affine.
        channels: number of image channels (files, or the 4th axis of a single file).
        label_values: the distinct values in the label map (empty without a label).
    """

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    channels: int
    label_values: tuple[int, ...]

    @property
    def spacing_ras(self) -> tuple[float, float, float]:
        """Voxel size in mm in the axis order after reorientation to RAS (what planning uses)."""
        return spacing_in_ras(self.affine)


class DatasetCheckError(DataError):
    """Some cases have problems: the message lists every one, one line per case, then a summary
    line; ``problems`` holds those lines."""

    def __init__(self, problems: list[str], total: int | None = None) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        if count == 1:
            message = self.problems[0]
        else:
            of = f" of {total}" if total is not None else ""
            message = "\n".join([*self.problems, f"{count}{of} cases have problems"])
        super().__init__(message)


def check_case(case: Case, labels: dict[int, str] | None, channels: int | None = None) -> CaseSummary:
    """Read a case's image file(s) and label once each and check them.

    Args:
        case: the case to check.
        labels: the label values the dataset declares (dataset.json ``labels``); ``None`` or
            empty to accept any non-negative integer values.
        channels: the number of input channels the dataset declares; ``None`` to accept any.

    Returns:
        The case's :class:`CaseSummary`.

    Raises:
        DataError: ``"<file>: <problem>"`` for the first problem found.
    """
    if not case.images:
        raise DataError(f"case '{case.name}': no image files")
    multi = len(case.images) > 1
    if multi and channels is not None and len(case.images) != channels:
        raise DataError(
            f"{case.images[0]}: case '{case.name}' has {len(case.images)} channel files, "
            f"the dataset declares {_count(channels, 'channel')}"
        )
    first_path = case.images[0]
    shape: tuple[int, ...] = ()
    affine = np.eye(4)
    total = 0
    blank = True
    for index, path in enumerate(case.images):
        array, file_affine = load_volume(path, label=True)
        array = _spatial(array, path, "image")
        file_shape = array.shape[1:]
        if multi and array.shape[0] > 1:
            raise DataError(
                f"{path}: 4D image with {array.shape[0]} volumes; per-channel files "
                f"(_0000, _0001, ...) must be 3D each"
            )
        if index == 0:
            shape, affine = file_shape, file_affine
            check_geometry(path, affine)
        else:
            if file_shape != shape:
                raise DataError(
                    f"{path}: shape {_shape(file_shape)} differs from channel 0 ({first_path}) {_shape(shape)}"
                )
            difference = grid_difference(file_affine, affine, "channel 0")
            if difference:
                raise DataError(f"{path}: {difference}")
        _check_finite(path, array)
        blank = blank and not np.any(array)
        total += array.shape[0]
        del array
    if not multi and channels is not None and total != channels:
        if channels == 1:
            raise DataError(f"{first_path}: 4D image with {total} channels where a 3D image is expected "
                            f"(the dataset declares 1 channel)")
        raise DataError(f"{first_path}: image has {_count(total, 'channel')}, "
                        f"the dataset declares {channels}")

    if blank:
        raise DataError(f"{first_path}: every voxel is 0 (an empty image: nothing to learn from, no "
                        f"foreground to crop to)")
    values: tuple[int, ...] = ()
    if case.label is not None:
        values = _check_label(case.label, first_path, shape, affine, labels)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return CaseSummary(case.name, shape, spacing, affine, total, values)  # type: ignore[arg-type]


def check_dataset(
    cases: Sequence[Case],
    labels: dict[int, str] | None,
    channels: int | None = None,
    workers: int = 1,
) -> list[CaseSummary]:
    """Check every case; report all problems in one :class:`DatasetCheckError`.

    Without ``channels``, every case must have the channel count most cases have.

    Args:
        cases: the cases, e.g. ``find_dataset(root).cases``.
        labels: declared label values (``DatasetInfo.labels``), or ``None``/empty.
        channels: declared channel count (``len(DatasetInfo.modalities)``), or ``None``.
        workers: processes reading files concurrently (see `medseg.data.io.map_cases`).

    Returns:
        One summary per case, in the order of ``cases``.

    Raises:
        DatasetCheckError: (a DataError) one line per bad case, in case order, then
            "N of M cases have problems" (a single bad case: its line alone); ``.problems``
            lists the per-case lines.
    """
    cases = list(cases)
    if labels and max(labels) > MAX_LABEL:
        raise DataError(f"dataset.json declares label values up to {max(labels)}; medseg holds at most "
                        f"{MAX_LABEL + 1} classes (0..{MAX_LABEL})")

    def one(case: Case) -> CaseSummary | str:
        try:
            with doing(f"checking case {case.name} ({case.images[0]})"):
                return check_case(case, labels, channels)
        except DataError as exc:
            return _one_line(str(exc))

    results = map_cases(one, cases, workers)

    if channels is None:
        counts = Counter(r.channels for r in results if isinstance(r, CaseSummary))
        if len(counts) > 1:
            usual = counts.most_common(1)[0][0]
            for i, (case, result) in enumerate(zip(cases, results)):
                if isinstance(result, CaseSummary) and result.channels != usual:
                    results[i] = (
                        f"{case.images[0]}: image has {_count(result.channels, 'channel')}, "
                        f"most cases have {usual}"
                    )
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        raise DatasetCheckError(problems, total=len(cases))
    return results  # type: ignore[return-value]


def check_image(paths: Sequence[Path | str], series_uid: str | None = None) -> None:
    """Check an image to segment from its headers alone, before any reader allocates its voxels:
    the header rules of :func:`medseg.data.io.read_header` (size, voxel type, geometry) and a 3D
    shape, so that a 2D or unusable input gets medseg's one-line message rather than a reader's.

    Raises:
        DataError: ``"<file>: <problem>"``.
    """
    for path in paths:
        header = read_header(path, series_uid=series_uid)
        _check_spatial_shape(path, header.shape, "image")


# ---------------------------------------------------------------------------------------------
# private helpers


def _spatial(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """The channel-first array with exactly three spatial axes, or a DataError saying why not."""
    if array.size == 0:
        raise DataError(f"{path}: {_empty_reason(path)}")
    # A 5D NIfTI with a singleton 4th axis (x, y, z, 1, c) loads as (c, x, y, z, 1).
    while array.ndim > 4 and array.shape[-1] == 1:
        array = array[..., 0]
    spatial = array.shape[1:]
    if len(spatial) > 3:
        raise DataError(f"{path}: {len(spatial) + 1}D {what} (shape {_shape(array.shape)}); "
                        f"expected a 3D volume, or 4D with channels last")
    _check_spatial_shape(path, spatial, what)
    return array


def _check_spatial_shape(path: Path | str, spatial: Sequence[int], what: str) -> None:
    if len(spatial) < 3:
        raise DataError(f"{path}: 2D {what} (shape {_shape(spatial)}); expected a 3D volume")
    if 0 in spatial:
        raise DataError(f"{path}: empty {what} (shape {_shape(spatial)})")
    if 1 in spatial:
        raise DataError(f"{path}: a single slice (shape {_shape(spatial)}), i.e. a 2D {what}; "
                        f"expected a 3D volume")


def _empty_reason(path: Path) -> str:
    try:
        header = read_header(path)
    except DataError:
        return "empty image (an axis has length 0)"
    dims = tuple(header.shape) + ((header.channels,) if header.channels != 1 else ())
    axis = next((i for i, n in enumerate(dims) if n == 0), None)
    where = f"axis {axis} has length 0" if axis is not None else "an axis has length 0"
    return f"empty image: {where} (shape {_shape(dims)})"


def _check_finite(path: Path, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.complexfloating):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.isnan(array).sum())
    inf = int(array.size - finite.sum()) - nan
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    raise DataError(f"{path}: {' and '.join(p for p in parts if p)} intensities; "
                    f"fix or replace them before training")


def _check_label(path: Path, image_path: Path, shape: tuple[int, ...], affine: np.ndarray,
                 labels: dict[int, str] | None) -> tuple[int, ...]:
    array, label_affine = load_volume(path, label=True)
    array = _spatial(array, path, "label map")
    if array.shape[0] > 1:
        raise DataError(f"{path}: 4D label map with {array.shape[0]} volumes; expected one 3D label map")
    if array.shape[1:] != shape:
        raise DataError(f"{path}: shape {_shape(array.shape[1:])} differs from its image's "
                        f"{_shape(shape)} ({image_path})")
    difference = grid_difference(label_affine, affine, "its image")
    if difference:
        raise DataError(f"{path}: {difference} ({image_path})")
    values = _label_values(path, array)
    too_high = [v for v in values if v > MAX_LABEL]
    if too_high:
        raise DataError(f"{path}: label values {_list(too_high)} exceed {MAX_LABEL}; medseg holds at most "
                        f"{MAX_LABEL + 1} classes (0..{MAX_LABEL})")
    if labels:
        undeclared = [v for v in values if v not in labels]
        if undeclared:
            declared = ", ".join(str(v) for v in sorted(labels))
            raise DataError(f"{path}: label values {_list(undeclared)} are not declared in "
                            f"dataset.json 'labels' ({declared})")
    else:
        negative = [v for v in values if v < 0]
        if negative:
            raise DataError(f"{path}: negative label values {_list(negative)}")
    return values


def _label_values(path: Path, array: np.ndarray) -> tuple[int, ...]:
    if np.issubdtype(array.dtype, np.bool_):
        return tuple(int(v) for v in np.unique(array))
    if not np.issubdtype(array.dtype, np.integer):
        distinct = np.unique(array)  # sorted, NaN last
        bad = distinct[~np.isfinite(distinct) | (distinct != np.round(distinct))]
        if bad.size:
            raise DataError(f"{path}: non-integer label values {_list([_num(v) for v in bad])}; "
                            f"label maps hold whole class numbers")
        return tuple(int(v) for v in distinct)
    flat = array.reshape(-1)
    low, high = int(flat.min()), int(flat.max())
    if low >= 0 and high < 1 << 16:
        counts = np.bincount(flat.astype(np.intp, copy=False) if flat.dtype.itemsize > 2 else flat,
                             minlength=high + 1)
        return tuple(int(v) for v in np.flatnonzero(counts))
    return tuple(int(v) for v in np.unique(flat))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(int(n)) for n in shape)


def _num(value: float) -> str:
    value = float(value)
    return repr(value) if np.isfinite(value) else str(value)


def _list(values: Sequence[object]) -> str:
    shown = ", ".join(str(v) for v in list(values)[:_SHOWN_VALUES])
    more = len(values) - _SHOWN_VALUES
    return shown + (f" (+{more} more)" if more > 0 else "")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
