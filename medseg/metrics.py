"""Segmentation metrics per class."""

from __future__ import annotations

import torch


def dice_per_class(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class (1..num_classes-1) between two integer label maps.

    A class absent from both gives NaN (excluded from means, as nnU-Net does), not a perfect score.
    """
    prediction = prediction.reshape(-1)
    label = label.reshape(-1).to(prediction.device)
    scores = []
    for cls in range(1, num_classes):
        predicted = prediction == cls
        reference = label == cls
        denominator = int(predicted.sum()) + int(reference.sum())
        intersection = int((predicted & reference).sum())
        scores.append(float("nan") if denominator == 0 else 2.0 * intersection / denominator)
    return scores
