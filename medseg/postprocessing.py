"""Postprocessing of label maps, chosen on the cross-validation as nnU-Net chooses it.

The one rule: keep only the largest connected component of a class where doing so does not lower
that class's mean Dice over the cross-validation predictions (nnU-Net applies a step unless it makes
Dice worse, so a tie keeps the step: it removes stray islands a reader would otherwise see).
`choose` applies the rule; its decision is written beside the folds as `postprocessing.json`:

    {"rule": "...", "cases": 12,
     "largest_component": [1],                       # the classes it applies to
     "classes": {"1": {"name": "...", "dice": 0.81, "dice_largest_component": 0.83, "apply": true}, ...}}

`medseg infer` applies `largest_component_classes(decision)` unless told otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medseg.errors import DataError
from medseg.metrics import dice, json_safe, nanmean

FILE_NAME = "postprocessing.json"
RULE = ("keep only the largest connected component of a class where that does not lower the class's "
        "mean cross-validation Dice")


def keep_largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Keep only the largest 26-connected component of each class; the rest becomes background."""
    from scipy import ndimage

    result = labels.copy()
    for cls in classes:
        components, count = ndimage.label(labels == cls, structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            result[(components != 0) & (components != sizes.argmax())] = 0
    return result


def class_dice(prediction: np.ndarray, reference: np.ndarray, cls: int) -> float:
    """Dice of class `cls` between two label maps on one grid (NaN when both lack it)."""
    predicted, referenced = prediction == cls, reference == cls
    return dice(int(np.count_nonzero(predicted & referenced)), int(np.count_nonzero(predicted)),
                int(np.count_nonzero(referenced)))


def score_case(prediction: np.ndarray, reference: np.ndarray, classes: Iterable[int]) -> dict[int, tuple[float, float]]:
    """Per class of one case: (Dice as predicted, Dice with only the largest component kept)."""
    return {cls: (class_dice(prediction, reference, cls),
                  class_dice(keep_largest_component(prediction, [cls]), reference, cls)) for cls in classes}


def choose(scores: Sequence[dict[int, tuple[float, float]]], class_names: dict[int, str]) -> dict[str, Any]:
    """The postprocessing decision (see the module docstring) from `score_case` of every
    cross-validation case, for the foreground classes in `class_names` ({value: name})."""
    classes: dict[str, Any] = {}
    chosen = []
    for cls, name in sorted(class_names.items()):
        if cls == 0:
            continue
        mean_before = nanmean([case[cls][0] for case in scores if cls in case])
        mean_after = nanmean([case[cls][1] for case in scores if cls in case])
        # A class never present scores NaN both ways: nothing to remove, nothing applied.
        apply = not math.isnan(mean_before) and mean_after >= mean_before
        classes[str(cls)] = {"name": name, "dice": json_safe(mean_before),
                             "dice_largest_component": json_safe(mean_after), "apply": apply}
        if apply:
            chosen.append(cls)
    return {"rule": RULE, "cases": len(scores), "largest_component": chosen, "classes": classes}


def largest_component_classes(decision: dict[str, Any] | None) -> list[int]:
    """The classes a decision keeps the largest component of ([] without a decision)."""
    if not decision:
        return []
    return [int(c) for c in decision.get("largest_component", [])]


def write(folder: Path, decision: dict[str, Any]) -> Path:
    """Write `decision` as `folder/postprocessing.json`, atomically."""
    from medseg.files import atomic_write_text

    path = Path(folder) / FILE_NAME
    atomic_write_text(path, json.dumps(decision, indent=2, allow_nan=False) + "\n")
    return path


def read(path: Path) -> dict[str, Any]:
    """A decision `write` wrote; DataError naming the file if it is not one."""
    try:
        decision = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: cannot read the postprocessing decision ({exc.__class__.__name__})") from None
    values = decision.get("largest_component") if isinstance(decision, dict) else None
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                               for v in values):
        raise DataError(f"{path}: 'largest_component' must be a list of class values (1, 2, ...)")
    return decision
