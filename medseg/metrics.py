"""Segmentation metrics per class: the one Dice that validation and `medseg evaluate` both report."""

from __future__ import annotations

import math
from typing import Any

import torch


def dice(overlap: int, predicted: int, reference: int) -> float:
    """Dice ``2|P∩R| / (|P|+|R|)`` from voxel counts: `overlap` = |P∩R|, `predicted` = |P|, `reference` = |R|.

    Both empty gives NaN (left out of means, as nnU-Net does): a class absent from a case is
    neither a success nor a failure. One empty and the other not gives 0.
    """
    denominator = predicted + reference
    return float("nan") if denominator == 0 else 2.0 * overlap / denominator


def dice_per_class(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice (:func:`dice`) of each foreground class 1..num_classes-1 between two integer label maps."""
    prediction = prediction.reshape(-1)
    label = label.reshape(-1).to(prediction.device)
    scores = []
    for cls in range(1, num_classes):
        predicted = prediction == cls
        reference = label == cls
        scores.append(dice(int((predicted & reference).sum()), int(predicted.sum()), int(reference.sum())))
    return scores


def nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN (a class absent from a case scores NaN); NaN if none is."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def json_safe(value: Any) -> Any:
    """NaN as None (JSON null), recursively through dicts and lists: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
