"""Inference: sliding-window prediction over whole volumes."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int], overlap: float = 0.5,
                   sw_batch_size: int = 2, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits (B, K, ...) of a whole preprocessed volume (B, C, ...) by Gaussian-weighted sliding windows.

    Windows run on the model's device under autocast; blending happens in float32 on the same device.
    """
    device = next(model.parameters()).device
    model.eval()
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = sliding_window_inference(
            image.to(device), roi_size=list(patch_size), sw_batch_size=sw_batch_size, predictor=model,
            overlap=overlap, mode="gaussian", sigma_scale=0.125, padding_mode="constant",
        )
    return logits.float()
