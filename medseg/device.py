"""Where training and inference run, and in which precision: one place for both choices."""

from __future__ import annotations

import os

import torch

from medseg.distributed import Context
from medseg.errors import ConfigError

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}

# The caching allocator's setting for training and inference: segments that grow in place instead
# of new ones beside them, so that what the memory plan fitted into a budget is what the card must
# hold (fragmentation otherwise reaches the budget before the allocated bytes do).
GROWING_SEGMENTS = "expandable_segments:True"


def prefer_growing_segments() -> None:
    """Set `GROWING_SEGMENTS` for this process and its children, unless the user chose a setting.

    The allocator reads it when CUDA first allocates: call this before any CUDA work."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", GROWING_SEGMENTS)


def resolve_device(name: str, context: Context = Context()) -> torch.device:
    """The device `train.device` names ("auto": CUDA when there is one); under torchrun, this
    process's own GPU."""
    if context.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", context.local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"'train.device' is {name!r} but no CUDA GPU is available")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"'train.device' must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"'train.device' is {name!r} but this machine has {count} CUDA GPU"
                          f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp` on `device` (None: full fp32)."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.float16
        # bf16 pays on CPUs with bf16 instructions; elsewhere it is emulated and about 20x slower
        # than fp32 for 3D convolutions (measured on an AVX2-only CPU), so auto falls back to fp32.
        return torch.bfloat16 if _cpu_has_bf16() else None
    return AMP_DTYPES[amp]


def amp_name(dtype: torch.dtype | None) -> str:
    """"fp16", "bf16" or "off"."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", None: "off"}[dtype]


def _cpu_has_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def aggregation_device(device: torch.device, volume: torch.Tensor, num_classes: int,
                       memory_bytes: int | None = None) -> torch.device:
    """Where to blend the window scores of `volume` (B, C, ...): on the GPU only while they (float32,
    one per class and voxel) and a softmax copy take at most a quarter of its memory (or of
    `memory_bytes`, a budget the process keeps to), in host memory beyond that: bounded GPU memory
    for any volume size."""
    if device.type != "cuda":
        return device
    score_bytes = num_classes * volume[0, 0].numel() * 4
    total = memory_bytes or torch.cuda.get_device_properties(device).total_memory
    return device if 2 * score_bytes <= total // 4 else torch.device("cpu")


# Mapping class probabilities back onto an input's grid (medseg.infer), in bytes per voxel of that
# grid. Fixed: the running best probability (float32), the label map (uint8), the mask of voxels a
# class wins (bool) and the sampling grid (three float32 coordinates). Per class mapped at once: its
# resampled values, their copy padded back to the uncropped grid, and the reoriented copy (float32).
RESTORE_FIXED_BYTES = 4 + 1 + 1 + 3 * 4
RESTORE_CLASS_BYTES = 3 * 4
# Bytes of classes (float32 on the input's grid) mapped back at once. More classes per resampling call
# save only that call's own overhead (the sampling grid, the metadata), small beside each class's
# memory traffic, so chunks stop growing there: GPU memory stays bounded (about 6 GiB of working set
# at this size) whatever the GPU has free. On the host: the chunk medseg has always used.
RESTORE_GPU_CHUNK_BYTES = 2 << 30
RESTORE_HOST_CHUNK_BYTES = 1 << 30


def restore_device(device: torch.device, voxels: int, memory_bytes: int | None = None) -> tuple[torch.device, int]:
    """Where to map class probabilities back onto an input's grid of `voxels` voxels, and how many
    bytes of classes (float32 on that grid) to map at once: on the GPU `device` while the fixed
    working set and one class fit in `memory_bytes` (default: half the GPU memory free now, counting
    what PyTorch's cache holds unused), in chunks sized to what is left (at most
    RESTORE_GPU_CHUNK_BYTES); on the host beyond that (chunks of RESTORE_HOST_CHUNK_BYTES), as on a
    machine without a GPU. The host path is bounded by host memory alone, for any volume size."""
    host = (torch.device("cpu"), RESTORE_HOST_CHUNK_BYTES)
    if device.type != "cuda":
        return host
    if memory_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        memory_bytes = (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // 2
    voxels = max(int(voxels), 1)
    classes = (memory_bytes - RESTORE_FIXED_BYTES * voxels) // (RESTORE_CLASS_BYTES * voxels)
    if classes < 1:
        return host
    return device, 4 * voxels * max(1, min(classes, RESTORE_GPU_CHUNK_BYTES // (4 * voxels)))
