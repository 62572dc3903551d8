"""Comparing predicted label maps with reference label maps: Dice, HD95, mean surface distance, volumes.

Files are matched by case name: the file name without its image suffix (``case_001.nii.gz`` and
``case_001.nrrd`` are the same case), so predictions and references may be stored in different
formats. Every pair must lie on the same voxel grid: the same shape, and affines the same by
:func:`medseg.data.grid.grid_difference` (the rule the dataset checks apply to images and labels).

Conventions, per case and per class:

* **Dice** ``2|P∩R| / (|P|+|R|)`` (:func:`medseg.metrics.dice`, as in validation). Both empty:
  NaN, left out of the means (a class absent from a case is neither a success nor a failure). One
  empty, the other not: 0.
* **HD95** and **MSD** (mean symmetric surface distance), in mm, from MONAI's
  ``compute_hausdorff_distance(percentile=95)`` and
  ``compute_average_surface_distance(symmetric=True)`` with the reference's voxel spacing. A surface
  voxel is a foreground voxel with a background 6-neighbour (outside the volume counts as
  background), as in MONAI's ``get_mask_edges``. HD95 is the larger of the two directed 95th
  percentiles; MSD is the mean over the distances of both surfaces to each other, pooled. When
  either side is empty the distances are undefined and reported as NaN (not inf), so they are left
  out of the means; each such case is recorded in :attr:`Evaluation.notes`.
* **Volumes** in mL: voxel count × |det| of the affine's 3x3 part / 1000.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

from medseg.data.cases import IMAGE_SUFFIXES, case_name, class_name, image_suffix
from medseg.data.grid import grid_difference
from medseg.data.io import load_volume
from medseg.errors import DataError
from medseg.files import atomic_write
from medseg.metrics import dice

__all__ = ["COLUMNS", "METRICS", "Evaluation", "evaluate"]

METRICS = ("dice", "hd95_mm", "msd_mm", "volume_pred_ml", "volume_ref_ml")
COLUMNS = ("case", "class", *METRICS)

_SHOWN_NAMES = 5  # case names listed in an error message
# A label map holds a few values; an image given as a reference holds hundreds or thousands.
MAX_LABELS = 1000  # distinct values of a label map without the model's classes to compare with
LABELS_PER_CLASS = 2  # with the classes known: at most this many times as many values as classes
_CHUNK = 1 << 24  # voxels per chunk when counting label values


@dataclass
class Evaluation:
    """Result of :func:`evaluate`.

    Attributes:
        rows: one dict per (case, class), keys :data:`COLUMNS`; ``class`` is the class name.
            Undefined values are NaN (see the module docstring for when).
        summary: ``{class name: {metric: (mean, std, n)}}`` over the cases where the metric is
            defined (NaN left out); ``std`` is the population standard deviation (ddof=0); with
            ``n == 0`` mean and std are NaN.
        unmatched: case names of predictions without a reference (ignored).
        missing: case names of references without a prediction (not scored; an error with
            ``require_all``).
        notes: one line per (case, class) whose surface distances are NaN because exactly one
            side is empty.
    """

    rows: list[dict] = field(default_factory=list)
    summary: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def write_csv(self, path: str | Path) -> None:
        """Write the per-case rows as CSV (header :data:`COLUMNS`; NaN as an empty field), atomically.

        Raises:
            DataError: the folder is missing or not writable.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in self.rows:
            writer.writerow([_csv_value(row[key]) for key in COLUMNS])
        atomic_write(Path(path), buffer.getvalue().encode("utf-8"))

    def write_json(self, path: str | Path) -> None:
        """Write rows, summary, unmatched cases and notes as JSON (NaN as null), atomically.

        The summary is ``{class: {metric: {"mean": .., "std": .., "n": ..}}}``.

        Raises:
            DataError: the folder is missing or not writable.
        """
        document = {
            "rows": [{key: _json_value(row[key]) for key in COLUMNS} for row in self.rows],
            "summary": {
                name: {
                    metric: {"mean": _json_value(mean), "std": _json_value(std), "n": n}
                    for metric, (mean, std, n) in metrics.items()
                }
                for name, metrics in self.summary.items()
            },
            "unmatched": list(self.unmatched),
            "missing": list(self.missing),
            "notes": list(self.notes),
        }
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        atomic_write(Path(path), text.encode("utf-8"))


def evaluate(
    predictions: Path,
    references: Path,
    labels: dict[int, str] | None = None,
    require_all: bool = False,
) -> Evaluation:
    """Compare predicted label maps with reference label maps, case by case and class by class.

    Args:
        predictions: a folder of predicted label maps, or one file.
        references: a folder of reference label maps, or one file. When both are files they
            are compared whatever their names; the case is named after the reference.
        labels: ``{value: name}`` of the classes to score (value 0, background, is skipped).
            Without it: every value > 0 found in any matched reference or prediction, named
            ``class_<value>``.
        require_all: a reference without a prediction is an error (default: it is listed in
            :attr:`Evaluation.missing` and the cases found are scored).

    Returns:
        An :class:`Evaluation`; rows sorted by case name, then class value.

    Raises:
        DataError: a path is missing; no references; no prediction for any reference (or, with
            ``require_all``, for one); a pair differs in shape or affine; a label map has several
            channels, non-integer or negative values, or far more distinct values than a label
            map has (more than ``LABELS_PER_CLASS`` x the classes of ``labels``, or
            ``MAX_LABELS``): an image given as a reference.
    """
    predictions, references = Path(predictions), Path(references)
    pairs, unmatched, missing = _match(predictions, references, require_all)
    wanted = None if labels is None else sorted(v for v in labels if v != 0)
    limit = MAX_LABELS if wanted is None else LABELS_PER_CLASS * (len(wanted) + 1)

    per_case: list[tuple[str, dict[int, dict[str, float]]]] = []
    notes: list[str] = []
    found: set[int] = set()
    for case, prediction_file, reference_file in pairs:
        scores = _score_case(prediction_file, reference_file, wanted, limit)
        found.update(scores)
        per_case.append((case, scores))

    values = wanted if wanted is not None else sorted(found)
    names = {v: (labels[v] if labels is not None else class_name(v)) for v in values}
    rows: list[dict] = []
    for case, scores in per_case:
        for value in values:
            score = scores.get(value) or _absent()
            rows.append({"case": case, "class": names[value], **score})
            pred_ml, ref_ml = score["volume_pred_ml"], score["volume_ref_ml"]
            if (pred_ml == 0) != (ref_ml == 0):
                empty = "prediction" if pred_ml == 0 else "reference"
                notes.append(
                    f"{case} {names[value]}: {empty} empty; Dice 0, HD95 and MSD undefined (NaN)"
                )
    summary = _summarise(rows, [names[v] for v in values])
    return Evaluation(rows=rows, summary=summary, unmatched=unmatched, missing=missing, notes=notes)


# ---------------------------------------------------------------------------------------------
# private helpers


def _match(predictions: Path, references: Path,
           require_all: bool) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pairs ``(case, prediction, reference)`` sorted by case, unmatched prediction names and
    references without a prediction."""
    for path, role in ((predictions, "predictions"), (references, "references")):
        if not path.exists():
            raise DataError(f"{path}: {role} path does not exist")
    if predictions.is_file() and references.is_file():
        return [(case_name(references), predictions, references)], [], []
    predicted = _label_files(predictions)
    referenced = _label_files(references)
    if not referenced:
        raise DataError(f"{references}: no label maps found ({', '.join(IMAGE_SUFFIXES)})")
    missing = sorted(set(referenced) - set(predicted))
    if missing and (require_all or len(missing) == len(referenced)):
        shown = ", ".join(missing[:_SHOWN_NAMES]) + (", ..." if len(missing) > _SHOWN_NAMES else "")
        raise DataError(
            f"{predictions}: no prediction for {len(missing)} of {len(referenced)} reference cases ({shown})"
        )
    unmatched = sorted(set(predicted) - set(referenced))
    pairs = [(case, predicted[case], referenced[case]) for case in sorted(referenced) if case in predicted]
    return pairs, unmatched, missing


def _label_files(path: Path) -> dict[str, Path]:
    """Case name -> file, for one file or the label-map files directly inside a folder."""
    if path.is_file():
        return {case_name(path): path}
    files: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        if not entry.is_file() or not image_suffix(entry):
            continue
        case = case_name(entry)
        if case in files:
            raise DataError(f"{path}: two files for case '{case}' ({files[case].name}, {entry.name})")
        files[case] = entry
    return files


def _score_case(
    prediction_file: Path, reference_file: Path, wanted: list[int] | None, limit: int
) -> dict[int, dict[str, float]]:
    """Metrics of every wanted class (or every class present) of one pair: value -> metrics."""
    reference, reference_affine = _load_labels(reference_file)
    prediction, prediction_affine = _load_labels(prediction_file)
    _check_grid(prediction_file, prediction.shape, prediction_affine, reference.shape, reference_affine)
    linear = reference_affine[:3, :3]
    spacing = tuple(float(s) for s in np.linalg.norm(linear, axis=0))
    voxel_ml = abs(float(np.linalg.det(linear))) / 1000.0

    pred_counts = _value_counts(prediction)
    ref_counts = _value_counts(reference)
    _check_label_values(reference_file, ref_counts, limit, wanted)
    _check_label_values(prediction_file, pred_counts, limit, wanted)
    if wanted is None:
        values = sorted(v for v in set(pred_counts) | set(ref_counts) if v > 0)
    else:
        values = wanted
    scores: dict[int, dict[str, float]] = {}
    for value in values:
        n_pred, n_ref = pred_counts.get(value, 0), ref_counts.get(value, 0)
        if n_pred == 0 and n_ref == 0:
            scores[value] = _absent()
            continue
        pred_mask = prediction == value
        ref_mask = reference == value
        overlap = int(np.count_nonzero(pred_mask & ref_mask))
        if n_pred and n_ref:
            hd95, msd = _surface_distances(pred_mask, ref_mask, spacing)
        else:
            hd95 = msd = math.nan
        scores[value] = {
            "dice": dice(overlap, n_pred, n_ref),
            "hd95_mm": hd95,
            "msd_mm": msd,
            "volume_pred_ml": n_pred * voxel_ml,
            "volume_ref_ml": n_ref * voxel_ml,
        }
    return scores


def _load_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label map as an integer array ``(x, y, z)`` and its affine; refuses non-integer values."""
    array, affine = load_volume(path, label=True)
    if array.shape[0] != 1:
        raise DataError(f"{path}: label map has {array.shape[0]} channels, expected 1")
    array = array[0]
    if array.ndim != 3:
        raise DataError(f"{path}: label map has {array.ndim} spatial dimensions, expected 3")
    if array.dtype == bool:
        return array.astype(np.uint8), affine
    if np.issubdtype(array.dtype, np.integer):
        return array, affine
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: label map has unsupported voxel type {array.dtype}")
    bad = ~np.isfinite(array)
    bad |= array != np.round(array)
    if bad.any():
        example = array[bad].flat[0]
        raise DataError(f"{path}: label map holds non-integer values (e.g. {example!r})")
    low, high = float(array.min()), float(array.max())
    if low < np.iinfo(np.int32).min or high > np.iinfo(np.int32).max:
        raise DataError(f"{path}: label values {low:g}..{high:g} are out of range")
    return array.astype(np.int32), affine


def _check_label_values(path: Path, counts: dict[int, int], limit: int, wanted: list[int] | None) -> None:
    """DataError if the values of `path` cannot be a label map: negative ones, or far more distinct
    values than classes (an image passed as a label map)."""
    if min(counts, default=0) < 0:
        raise DataError(f"{path}: holds negative values (e.g. {min(counts)}); not a label map")
    if len(counts) > limit:
        of = f"the {len(wanted) + 1} classes (background included)" if wanted is not None else "a label map"
        raise DataError(f"{path}: holds {len(counts)} distinct values (up to {max(counts)}), far more than {of} "
                        f"(at most {limit}); not a label map")


def _check_grid(
    prediction_file: Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    reference_shape: tuple[int, ...],
    reference_affine: np.ndarray,
) -> None:
    if tuple(shape) != tuple(reference_shape):
        raise DataError(
            f"{prediction_file}: shape {_tuple(shape)} vs reference {_tuple(reference_shape)}"
        )
    difference = grid_difference(affine, reference_affine, "the reference")
    if difference:
        raise DataError(f"{prediction_file}: {difference}")


def _value_counts(array: np.ndarray) -> dict[int, int]:
    """Voxel count of every value, chunk by chunk to keep memory low on large volumes."""
    flat = array.reshape(-1)
    counts: dict[int, int] = {}
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        low, high = int(chunk.min()), int(chunk.max())
        if low >= 0 and high < (1 << 20):
            binned = np.bincount(chunk, minlength=0)
            values = np.flatnonzero(binned)
            pairs = zip(values.tolist(), binned[values].tolist())
        else:
            unique, number = np.unique(chunk, return_counts=True)
            pairs = zip(unique.tolist(), number.tolist())
        for value, number in pairs:
            counts[value] = counts.get(value, 0) + number
    return counts


def _surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[float, float]:
    """HD95 and mean symmetric surface distance (mm) of two non-empty masks on the same grid.

    Both masks are cropped to the bounding box of their union plus one voxel (clamped to the
    volume): surfaces and distances between them do not change, and the work shrinks.
    """
    union = pred_mask | ref_mask
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=others))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    region = tuple(box)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred_mask[region]))[None, None].float()
    y_ref = torch.from_numpy(np.ascontiguousarray(ref_mask[region]))[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; both are non-empty here
        hd95 = compute_hausdorff_distance(
            y_pred, y_ref, include_background=True, percentile=95, spacing=list(spacing)
        )
        msd = compute_average_surface_distance(
            y_pred, y_ref, include_background=True, symmetric=True, spacing=list(spacing)
        )
    return float(hd95[0, 0]), float(msd[0, 0])


def _absent() -> dict[str, float]:
    """Metrics of a class absent from both prediction and reference."""
    return {
        "dice": math.nan,
        "hd95_mm": math.nan,
        "msd_mm": math.nan,
        "volume_pred_ml": 0.0,
        "volume_ref_ml": 0.0,
    }


def _summarise(rows: list[dict], names: list[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    summary: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name in names:
        summary[name] = {}
        for metric in METRICS:
            values = np.array(
                [row[metric] for row in rows if row["class"] == name], dtype=np.float64
            )
            values = values[np.isfinite(values)]
            if values.size == 0:
                summary[name][metric] = (math.nan, math.nan, 0)
            else:
                summary[name][metric] = (float(values.mean()), float(values.std()), int(values.size))
    return summary


def _tuple(values: Iterable, spec: str = "d") -> str:
    return "(" + ",".join(format(int(v) if spec == "d" else float(v), spec) for v in values) + ")"


def _csv_value(value: object) -> object:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else format(value, ".10g")
    return value


def _json_value(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
