"""Checking a dataset's files before any expensive work: one read per file, one line per problem.

:func:`check_case` reads a case's image file(s) and label once each (through
:func:`medseg.data.io.load_volume`, the same readers as training) and raises
``DataError("<file>: <problem>")`` for anything that would make training fail late or silently
learn garbage: 2D or empty volumes, 4D images where 3D ones are expected, wrong channel counts,
image/label grids that do not match (:func:`medseg.data.grid.grid_difference`), label values
that are undeclared or not integers, and NaN/Inf intensities. :func:`check_dataset` checks every
case and reports all problems at once.

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
from medseg.data.io import load_volume, map_cases, read_header, spacing_in_ras
from medseg.errors import DataError

__all__ = ["CaseSummary", "DatasetCheckError", "check_case", "check_dataset"]

_SHOWN_VALUES = 8  # at most this many offending values are listed in a message


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
    """Several cases have problems: the message is the first one; ``problems`` holds all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        more = len(self.problems) - 1
        message = self.problems[0]
        if more:
            message += f" (and {more} more case{'s' if more != 1 else ''} with problems)"
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
            _check_spacing(path, affine)
        else:
            if file_shape != shape:
                raise DataError(
                    f"{path}: shape {_shape(file_shape)} differs from channel 0 ({first_path}) {_shape(shape)}"
                )
            difference = grid_difference(file_affine, affine, "channel 0")
            if difference:
                raise DataError(f"{path}: {difference}")
        _check_finite(path, array)
        total += array.shape[0]
        del array
    if not multi and channels is not None and total != channels:
        if channels == 1:
            raise DataError(f"{first_path}: 4D image with {total} channels where a 3D image is expected "
                            f"(the dataset declares 1 channel)")
        raise DataError(f"{first_path}: image has {_count(total, 'channel')}, "
                        f"the dataset declares {channels}")

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
        DatasetCheckError: (a DataError) one line: the first problem in case order, plus
            "(and N more cases with problems)"; ``.problems`` lists one line per bad case.
    """
    cases = list(cases)

    def one(case: Case) -> CaseSummary | str:
        try:
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
        raise DatasetCheckError(problems)
    return results  # type: ignore[return-value]


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
    if len(spatial) < 3:
        raise DataError(f"{path}: 2D {what} (shape {_shape(spatial)}); expected a 3D volume")
    if len(spatial) > 3:
        raise DataError(f"{path}: {len(spatial) + 1}D {what} (shape {_shape(array.shape)}); "
                        f"expected a 3D volume, or 4D with channels last")
    if 1 in spatial:
        raise DataError(f"{path}: a single slice (shape {_shape(spatial)}), i.e. a 2D {what}; "
                        f"expected a 3D volume")
    return array


def _empty_reason(path: Path) -> str:
    try:
        header = read_header(path)
    except DataError:
        return "empty image (an axis has length 0)"
    dims = tuple(header.shape) + ((header.channels,) if header.channels != 1 else ())
    axis = next((i for i, n in enumerate(dims) if n == 0), None)
    where = f"axis {axis} has length 0" if axis is not None else "an axis has length 0"
    return f"empty image: {where} (shape {_shape(dims)})"


def _check_spacing(path: Path, affine: np.ndarray) -> None:
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 0):
        raise DataError(f"{path}: invalid voxel spacing {_mm(spacing)} mm in the header")


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


def _mm(values: Sequence[float]) -> str:
    return "×".join(f"{float(v):.4g}" for v in values)


def _num(value: float) -> str:
    value = float(value)
    return repr(value) if np.isfinite(value) else str(value)


def _list(values: Sequence[object]) -> str:
    shown = ", ".join(str(v) for v in list(values)[:_SHOWN_VALUES])
    more = len(values) - _SHOWN_VALUES
    return shown + (f" (+{more} more)" if more > 0 else "")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
