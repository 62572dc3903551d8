"""Peak GPU memory of real training steps on a CUDA device, to compare with the estimate."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from medseg.config import Config
from medseg.errors import MedsegError
from medseg.memory.estimator import cuda_amp_dtype

__all__ = ["measure"]


def measure(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float] = (1.0, 1.0, 1.0),
            steps: int = 3, warmup: int = 2, device: str | torch.device = "cuda") -> dict[str, Any]:
    """Peak GPU memory of real training steps of `cfg` on a CUDA device, to compare with `estimate`.

    Random data of the training loader's shapes and dtypes; `warmup` steps first (cuDNN set-up,
    optimiser state), then the peak statistics are reset and `steps` steps run. Returns bytes:
    `max_memory_allocated`, `max_memory_reserved`, and `seconds_per_step` (mean). Leaves
    `torch.backends.cudnn.benchmark` as the caller set it.
    """
    from medseg.losses import DiceCELoss
    from medseg.models import build_model
    from medseg.step import build_optimizer, train_step

    if not torch.cuda.is_available():
        raise MedsegError("measuring GPU memory needs a CUDA GPU; none is available")
    device = torch.device(device)
    amp_dtype = cuda_amp_dtype(cfg.train.amp)
    batch, patch = cfg.train.batch_size, [int(n) for n in cfg.train.patch_size]
    torch.cuda.empty_cache()
    model = build_model(cfg, in_channels, num_classes, tuple(spacing)).to(device)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_fn = DiceCELoss(batch_dice=cfg.train.batch_dice)
    image = torch.randn((batch, in_channels, *patch), device=device)
    label = torch.randint(0, num_classes, (batch, 1, *patch), device=device).float()
    try:
        for _ in range(warmup):
            train_step(model, image, label, loss_fn, optimizer, scaler, amp_dtype, cfg.train.grad_clip)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for _ in range(steps):
            train_step(model, image, label, loss_fn, optimizer, scaler, amp_dtype, cfg.train.grad_clip)
        torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - started) / max(steps, 1)
        return {
            "max_memory_allocated": int(torch.cuda.max_memory_allocated(device)),
            "max_memory_reserved": int(torch.cuda.max_memory_reserved(device)),
            "seconds_per_step": seconds,
        }
    finally:
        del model, optimizer, image, label, scaler
        torch.cuda.empty_cache()

