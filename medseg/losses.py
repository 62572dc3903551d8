"""Dice + cross-entropy loss with deep-supervision weights (nnU-Net's training loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def deep_supervision_weights(outputs: int) -> list[float]:
    """Weights 1, 1/2, 1/4, ... finest first; the coarsest output gets 0; normalised to sum 1."""
    weights = [0.5**i for i in range(outputs)]
    if outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DiceCELoss(nn.Module):
    """Soft Dice over the foreground classes plus cross-entropy, per output scale.

    `batch_dice`: one Dice per class over the whole batch (nnU-Net's choice for full-resolution
    training of cases much larger than the patch); otherwise one per sample and class, averaged
    (nnU-Net's choice where a patch holds most of a case). Computed in float32 whatever the
    autocast dtype: softmax sums and the Dice ratio lose too much precision in fp16.
    """

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = True) -> None:
        super().__init__()
        self.smooth = smooth
        self.batch_dice = batch_dice

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """`outputs`: logits (B, K, ...) or a list of them, finest first. `label`: (B, 1, ...) ints."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits in zip(weights, outputs):
            if weight == 0.0:
                continue
            target = _resize_label(label, logits.shape[2:])
            total = total + weight * self._single(logits.float(), target)
        return total

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target[:, 0].long()
        cross_entropy = F.cross_entropy(logits, target)
        probabilities = logits.softmax(dim=1)[:, 1:]
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probabilities.dtype)
        axes = ([0] if self.batch_dice else []) + list(range(2, logits.ndim))
        intersection = (probabilities * one_hot).sum(axes)
        denominator = probabilities.sum(axes) + one_hot.sum(axes)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        return cross_entropy + (1 - dice.mean())


def _resize_label(label: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if label.shape[2:] == size:
        return label
    with torch.no_grad():
        return F.interpolate(label.float(), size=tuple(size), mode="nearest")
