"""GPU memory of a training step, predicted on a machine without a GPU, and configurations that fit.

`estimate(cfg, in_channels, num_classes, spacing)` predicts the peak that
`torch.cuda.max_memory_allocated()` reports for one step of `medseg train` in steady state. It runs
the step itself (`medseg.models.build_model`, `medseg.step.build_optimizer`, `medseg.step.train_step`
with `DiceCELoss`) on *fake* tensors: tensors with shapes, dtypes and storages but no data, so
nothing is computed and a step at patch 192³ costs as little as one at 32³ (about a second).
A dispatch mode sees every tensor each operator creates; each new storage is counted at the size
PyTorch's CUDA caching allocator gives its block (`block_bytes`) and uncounted when the storage
dies. As after a warm-up, the optimiser's state exists before the measured step (an optimiser
step on zero gradients creates it), and the running maximum over that step is the prediction.

How the CPU run stands in for CUDA:

- A CPU-only PyTorch cannot fake CUDA tensors through autograd, so the fake tensors are CPU
  tensors and the step runs under CPU autocast. Its casting rules agree with CUDA autocast's for
  every operator this network and loss use (convolutions in the low-precision dtype with cached
  weight casts, norms on the convolution's dtype, the loss in float32 because it casts itself)
  except `group_norm`, which CUDA autocast runs in float32; a forward pre-hook on each GroupNorm
  makes the fake run do the same.
- Non-reentrant activation checkpointing recomputes each stage inside backward; the fake run does
  the same, so the recomputed activations are counted where they live.
- Not modelled: cuDNN workspaces, scratch space that kernels allocate inside one operator
  (contiguous copies of strided gradients, for example), and blocks the caching allocator hands
  out whole because an earlier, larger block was free. The peak of these networks falls in
  backward between convolutions (at an activation's gradient), where no workspace is held;
  `scripts/bench_memory.py` compares prediction and measurement on a GPU.

`fit` chooses patch, batch and checkpointing for a memory budget (the most voxels per unit of step
time, `STEP_TIME`), `largest_fit` the largest patch at a fixed batch, both with `estimate`; `measure`
runs real steps on a GPU; `estimate_inference` predicts sliding-window inference; `parse_size`
reads "24GiB"-style sizes.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import re
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from medseg.config import Config
from medseg.device import amp_dtype as resolve_amp
from medseg.device import amp_name
from medseg.errors import ConfigError, MedsegError

__all__ = [
    "STEP_TIME",
    "MemoryReport",
    "block_bytes",
    "estimate",
    "estimate_inference",
    "fit",
    "largest_fit",
    "measure",
    "parse_size",
]

GiB = 2**30
# The CUDA caching allocator's constants (c10/cuda/CUDACachingAllocator.cpp).
_MIN_BLOCK = 512  # every block is a multiple of 512 bytes
_SMALL_SIZE = 1 << 20  # requests up to 1 MiB come from the small pool
_MIN_LARGE_ALLOC = 10 << 20  # requests of 1-10 MiB share 20 MiB segments
_ROUND_LARGE = 2 << 20  # larger requests get their own segment, rounded up to 2 MiB

# Time of one training step per checkpointing mode, relative to "off", as `fit` weighs them, as
# medseg train runs them on CUDA: scripts/bench_train.py on an H200 at 128³ batch 2 fp16
# (docs/benchmarks.md): off compiled 43.5 ms, selective compiled 47.6 ms (1.09); stage (its two
# finest levels, one sample at a time, each stage compiled on its own): 63.2 ms against 40.1 ms
# off compiled in the same run (1.58). Modes missing here (or from
# medseg.models.CHECKPOINTING_MODES) are never chosen by `fit`.
STEP_TIME: dict[str, float] = {"off": 1.0, "selective": 1.09, "stage": 1.58}

_FIT_MAX_SCALE = 4.0  # fit: patches up to this many times the configured size per axis
_FIT_TIE = 0.05  # fit: candidates within this fraction of the most work count as equal
_FIT_SHRINK = 0.5  # fit: a patch is traded for batch down to at most this fraction of the largest at batch 2
_MODEL_SLACK = 0.05  # fit: how far the linear memory model may be off when ruling candidates out
_NO_BATCH_CAP = 1 << 16  # fit: max_batch=None


@dataclass(frozen=True)
class MemoryReport:
    """Predicted peak GPU memory of one training step, in bytes, and what it is made of.

    `total` is the prediction of `torch.cuda.max_memory_allocated()`. The parts are what was
    alive at that peak: the parameters, their gradients, the optimiser's state, and the rest
    (`activations`: tensors saved for backward, the input batch, autocast's low-precision weight
    copies and the temporaries of the operator running at the peak).
    """

    total: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    patch_size: tuple[int, int, int]
    batch_size: int
    amp: str
    checkpointing: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON safe); sizes in bytes."""
        values = asdict(self)
        values["patch_size"] = list(self.patch_size)
        return values

    def summary(self) -> str:
        """One line: the configuration and the breakdown in GiB."""
        patch = "×".join(str(n) for n in self.patch_size)
        return (
            f"patch {patch}, batch {self.batch_size}, amp {self.amp}, checkpointing {self.checkpointing}: "
            f"{self.total / GiB:.2f} GiB peak (parameters {self.parameters / GiB:.2f}, "
            f"gradients {self.gradients / GiB:.2f}, optimizer state {self.optimizer_state / GiB:.2f}, "
            f"activations {self.activations / GiB:.2f})"
        )


def estimate(cfg: Config, in_channels: int, num_classes: int,
             spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> MemoryReport:
    """Predicted peak GPU memory of one `medseg train` step of `cfg` on a CUDA device.

    Uses `cfg.train` (patch_size, batch_size, amp with "auto" meaning fp16 as on a GPU, optimizer,
    grad_clip) and `cfg.model` (widths, depth, norm, deep supervision, checkpointing); the data
    enter through `in_channels`, `num_classes` and `spacing` (mm), which shape the network.
    Raises ConfigError for a configuration `build_model` rejects.
    """
    return _simulate_step(cfg, in_channels, num_classes, spacing)


def estimate_inference(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                       sw_batch_size: int = 4, volume_shape: Sequence[int] = (128, 128, 128),
                       overlap: float = 0.5) -> int:
    """Predicted peak GPU memory (bytes) of sliding-window inference over one volume, as
    `medseg.infer.predict_logits` runs it with the scores blended on the GPU (no mirroring).

    `volume_shape`: the volume on the network's grid (after cropping and resampling), V voxels once
    padded to at least the patch. Counted: the float32 parameters and autocast's cached
    low-precision copies of them; the input volume moved to the GPU (4·C·V); the blended float32
    scores (4·K·V) and window count map (4·V); the Gaussian importance map; the previous window
    batch's logits, which MONAI still holds while the next batch runs; and the peak of one
    forward pass over `sw_batch_size` windows without gradients. The network is the one `cfg`
    trains, without checkpointing; amp is `cfg.train.amp` ("auto" = fp16, what `medseg infer`
    uses on a GPU). Mirroring (`--mirror`) adds 4·K·V for the running sum of the softmax.
    Not counted: cuDNN workspaces.
    """
    from medseg.models import build_model

    if len(volume_shape) != 3 or min(volume_shape) < 1:
        raise ConfigError(f"volume shape must be three positive integers, got {list(volume_shape)}")
    if sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size must be at least 1, got {sw_batch_size}")
    amp_dtype = _amp_dtype(cfg.train.amp)
    patch = [int(n) for n in cfg.train.patch_size]
    padded = [max(int(v), p) for v, p in zip(volume_shape, patch)]
    total_windows = _window_count(padded, patch, overlap)
    windows = min(sw_batch_size, total_windows)
    previous = windows if total_windows > windows else 0  # a batch before this one
    with FakeTensorMode():
        model = build_model(cfg.replace(model={"checkpointing": "off"}), in_channels, num_classes, tuple(spacing))
        model.eval()
        _emulate_cuda_autocast(model)
        tracker = _AllocationTracker()
        for tensor in (*model.parameters(), *model.buffers()):
            tracker.track(tensor)
        logits_dtype = amp_dtype or torch.float32
        resident = [
            torch.empty((1, in_channels, *padded)),  # the volume on the GPU
            torch.empty((1, num_classes, *padded)),  # blended scores
            torch.empty((1, 1, *padded)),  # window count map
            torch.empty((1, 1, *patch)),  # Gaussian importance map
            torch.empty((previous, num_classes, *patch), dtype=logits_dtype),  # previous batch's logits
            torch.empty((windows, in_channels, *patch)),  # this batch's windows
        ]
        for tensor in resident:
            tracker.track(tensor)
        with tracker, torch.no_grad(), torch.autocast("cpu", dtype=logits_dtype, enabled=amp_dtype is not None):
            logits = model(resident[-1])
            logits *= resident[3]  # MONAI weights the logits in place before adding them up
        del logits
    return tracker.peak


def fit(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float], budget_bytes: int,
        margin: float = 0.1, *, max_patch: Sequence[int] | None = None,
        max_batch: int | None = None) -> tuple[Config, MemoryReport]:
    """The configuration that trains fastest within `budget_bytes * (1 - margin)`.

    "Fastest" is the most training work per unit of time: voxels per step (patch volume × batch)
    divided by the checkpointing mode's relative step time (`STEP_TIME`). The candidates:

    - patch: the configured patch scaled by one factor on every axis (aspect ratio kept, each axis
      a multiple of the network's divisor for the configured patch), smaller or larger, up to
      4 times the configured size and at most `max_patch` per axis (the training data's extent
      in voxels at the target spacing: a patch beyond the data only adds padding);
    - batch: at least 2, as nnU-Net plans (1 only when nothing with 2 fits, or `max_batch` is 1),
      at most `max_batch` (None: as many as fit);
    - checkpointing: every mode of `medseg.models.CHECKPOINTING_MODES` with a step time in
      `STEP_TIME`; the configured mode and batch size are not kept.

    For each mode the largest patch that fits at batch 2 is found, and with it the largest batch B
    at that patch. Smaller patches (each with its largest batch) are candidates only down to the
    volume at which the batch would grow by two, B / (B + 2) of it, and never below half: context
    matters more than batch in segmentation, and the trade is only there to take up the memory
    that the coarse steps between patches (and the rounding of the batch) leave unused. Among the
    candidates the most work wins, but all within 5 % of the most count as equal, and of those the
    cheapest mode (off, selective, stage), then the largest patch, then the largest batch is chosen.
    Finally single axes of the chosen patch grow by half the divisor while it still fits
    (`_grown_axes`), to take up what the steps between scaled patches leave.

    Memory grows with patch volume and with batch, so a few estimates settle it (5-15 for the
    default network, 10-20 s on a laptop CPU): searches over patches and batches, each guess from
    a linear model of the peak in voxels × batch fitted to the estimates so far, candidates ruled
    out without an estimate where the model puts them well beyond the budget or the best.

    Returns the config (`train.batch_size`, `train.patch_size` and `model.checkpointing` set; the
    rest as given) and its report. Raises MedsegError, with the numbers, if nothing fits.
    """
    from medseg.models import CHECKPOINTING_MODES, network_plan

    limit = _usable(budget_bytes, margin)
    if max_batch is not None and max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if max_patch is not None and (len(max_patch) != 3 or min(max_patch) < 1):
        raise ConfigError(f"max_patch must be three positive integers, got {list(max_patch)}")
    modes = sorted((m for m in CHECKPOINTING_MODES if m in STEP_TIME), key=lambda m: STEP_TIME[m])
    if not modes:
        raise MedsegError(f"no checkpointing mode of {CHECKPOINTING_MODES} has a step time in memory.STEP_TIME")
    base = [int(n) for n in cfg.train.patch_size]
    unit = network_plan(cfg, spacing).divisor
    patches = [p for p in _scaled_patches(base, unit, _FIT_MAX_SCALE, max_patch) if _buildable(cfg, p, spacing)]
    if not patches:
        raise MedsegError(f"no patch of the shape of {base} builds a network (divisor {list(unit)})")
    search = _FitSearch(cfg, in_channels, num_classes, spacing, limit, patches)
    cap = max_batch if max_batch is not None else _NO_BATCH_CAP

    # Where the data caps both patch and batch (small cases), the largest patch at the largest batch
    # without checkpointing is the most work there can be, at the cheapest step: if it fits, one
    # estimate settles the search.
    if max_patch is not None and max_batch is not None:
        largest = max(range(len(patches)), key=lambda i: search.volumes[i])
        report = search.report(modes[0], largest, cap)
        if report is not None and report.total <= limit:
            return _grown_axes(cfg, patches[largest], cap, modes[0], report, in_channels, num_classes,
                               spacing, limit, unit, max_patch)

    # The largest patch per mode at the smallest batch allowed: 2, or 1 when 2 fits nowhere.
    smallest_batch = min(2, cap)
    top = search.largest_patches(modes, smallest_batch)
    if not top and smallest_batch == 2:
        smallest_batch = cap = 1
        top = search.largest_patches(modes, 1)
    if not top:
        raise MedsegError(_nothing_fits(budget_bytes, margin, search.smallest()))

    # Every (mode, patch) a candidate, best first by an optimistic guess of its work; the exact largest
    # batch is searched only while a candidate could still come within the tie margin of the best.
    volumes = search.volumes
    guesses = []
    for mode, top_index in top.items():
        # Trading patch for batch only takes up what the batch's rounding leaves unused (less than a
        # sample): smaller patches down to where the batch would grow by two, at most to half the volume.
        top_batch = min(max(search.predicted_batch(mode, top_index) or 0, smallest_batch), cap)
        smallest_volume = volumes[top_index] * max(_FIT_SHRINK, top_batch / (top_batch + 2))
        for index in range(top_index, -1, -1):
            if volumes[index] < smallest_volume:
                break
            batch = search.predicted_batch(mode, index, slack=_MODEL_SLACK)
            batch = min(max(batch if batch is not None else cap, smallest_batch), cap)
            guesses.append((volumes[index] * batch / STEP_TIME[mode], mode, index))
    guesses.sort(key=lambda g: (-g[0], STEP_TIME[g[1]], -g[2]))
    candidates: list[tuple[float, str, int, int]] = []  # (work, mode, patch index, batch)
    best = 0.0
    for optimistic, mode, index in guesses:
        if optimistic < best * (1 - _FIT_TIE):
            break
        # Batch `smallest_batch` fits at this patch: it fits at the mode's top patch, which is no smaller.
        batch = _last_fitting(lambda b: search.fits(mode, index, b), smallest_batch + 1, cap,
                              lambda: search.predicted_batch(mode, index))
        work = volumes[index] * batch / STEP_TIME[mode]
        candidates.append((work, mode, index, batch))
        best = max(best, work)

    while candidates:
        best = max(c[0] for c in candidates)
        equal = [c for c in candidates if c[0] >= best * (1 - _FIT_TIE)]
        choice = min(equal, key=lambda c: (STEP_TIME[c[1]], modes.index(c[1]), -volumes[c[2]], -c[3]))
        _, mode, index, batch = choice
        report = search.report(mode, index, batch)
        if report is not None and report.total <= limit:
            return _grown_axes(cfg, patches[index], batch, mode, report, in_channels, num_classes,
                               spacing, limit, unit, max_patch)
        candidates.remove(choice)  # memory not monotone after all (never seen): the next best
    raise MedsegError(_nothing_fits(budget_bytes, margin, search.smallest()))



def fit_to_data(cfg: Config, prep: Any, summaries: Sequence[Any]) -> tuple[Config, MemoryReport]:
    """The configuration `medseg train` runs for `train.memory_budget`, and its report.

    `fit` within the budget, the patch grown no further than the training data's extent and the
    batch no further than nnU-Net's cap (`medseg.data.fingerprint.growth_limits`), for the network
    `prep` (a `Preprocessing`) describes and the checked training cases `summaries`. `medseg
    memory --gpu-memory` calls this too, so it prints what `train` then runs.
    """
    from medseg.data.fingerprint import growth_limits

    budget = parse_size(cfg.train.memory_budget)
    max_patch, max_batch = growth_limits(summaries, prep.spacing)
    return fit(cfg, prep.channels, prep.num_classes, prep.spacing, budget,
               max_patch=max_patch, max_batch=max(max_batch, cfg.train.batch_size))

def _grown_axes(cfg: Config, patch: Sequence[int], batch: int, mode: str, report: MemoryReport,
                in_channels: int, num_classes: int, spacing: Sequence[float], limit: int,
                unit: Sequence[int], max_patch: Sequence[int] | None) -> tuple[Config, MemoryReport]:
    """Take up what the coarse steps of the scaled patches leave unused: grow single axes of the
    chosen patch, the shortest first, by half the divisor (the network then downsamples that
    axis one time fewer), as long as the step still fits; batch and checkpointing stay."""
    patch = [int(n) for n in patch]
    cache: dict[tuple, MemoryReport | None] = {}
    grown = True
    while grown:
        grown = False
        for axis in sorted(range(3), key=lambda a: (patch[a], a)):
            step = unit[axis] // 2
            larger = list(patch)
            larger[axis] += step
            if step < 8 or (max_patch is not None and larger[axis] > max_patch[axis]):
                continue
            if not _buildable(cfg, larger, spacing):
                continue
            candidate = _candidate(cfg, larger, batch, mode)
            estimate_ = _cached_estimate(cache, candidate, in_channels, num_classes, spacing)
            if estimate_ is not None and estimate_.total <= limit:
                patch, report, grown = larger, estimate_, True
                break
    return _candidate(cfg, patch, batch, mode), report


def largest_fit(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float], budget_bytes: int,
                margin: float = 0.1, max_scale: float = 4.0,
                max_patch: Sequence[int] | None = None) -> tuple[Config, MemoryReport]:
    """The largest patch that fits in `budget_bytes * (1 - margin)` at the configured batch size.

    For recommendations, in nnU-Net's spirit (fix the batch, grow the patch): the configured patch
    shape is scaled by one factor on every axis, so its aspect ratio is kept, each axis rounded
    down to a multiple of the network's divisor for the configured patch, from one divisor up to
    `max_scale` times the configured size and at most `max_patch` (the data's median shape, say).
    Checkpointing stays as configured. If not even the smallest patch fits at the configured batch
    size, the batch size goes down one at a time. Returns the config and its report; raises
    MedsegError if nothing fits at batch 1.
    """
    from medseg.models import network_plan

    limit = _usable(budget_bytes, margin)
    mode = cfg.model.checkpointing
    base = [int(n) for n in cfg.train.patch_size]
    unit = network_plan(cfg, spacing).divisor
    patches = _scaled_patches(base, unit, max_scale, max_patch)
    cache: dict[tuple, MemoryReport | None] = {}

    def report_for(index: int, batch: int) -> MemoryReport | None:
        return _cached_estimate(cache, _candidate(cfg, patches[index], batch, mode), in_channels, num_classes, spacing)

    def fits(index: int, batch: int) -> bool:
        report = report_for(index, batch)
        return report is not None and report.total <= limit

    for batch in range(max(cfg.train.batch_size, 1), 0, -1):
        if not fits(0, batch):
            continue
        # Binary search over the patches, ascending in volume: memory grows with the patch.
        low, high = 0, len(patches) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle, batch):
                low = middle
            else:
                high = middle - 1
        report = report_for(low, batch)
        assert report is not None
        return _candidate(cfg, patches[low], batch, mode), report
    smallest = report_for(0, 1)
    raise MedsegError(_nothing_fits(budget_bytes, margin, smallest))


def parse_size(text: str) -> int:
    """Bytes in a memory size: "24GiB", "24GB", "24g", "8000MiB", "1.5 TiB", "512M", "4096B".

    Units are binary whatever their spelling (K, M, G, T with or without "i" and "B", any case):
    GPU memory is sized in powers of two, and an "80GB" card holds 80 GiB. A unit is required
    ("B" for bytes): a bare "24" is more likely meant as GiB than as bytes. Raises ConfigError.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])i?b?|b)\s*", str(text), flags=re.IGNORECASE)
    if match is None:
        raise ConfigError(f"memory size {text!r}: expected a number and a unit, such as 24GiB, 24GB, 24g or 8000MiB")
    number, prefix = float(match.group(1)), (match.group(2) or "").lower()
    value = int(number * 1024 ** " kmgt".index(prefix or " "))
    if value <= 0:
        raise ConfigError(f"memory size {text!r}: must be more than zero bytes")
    return value


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
    amp_dtype = _amp_dtype(cfg.train.amp)
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


def block_bytes(nbytes: int) -> int:
    """The bytes `torch.cuda.max_memory_allocated` counts for a tensor storage of `nbytes`.

    The caching allocator rounds every request up to a multiple of 512 bytes. A request over
    10 MiB gets a new segment rounded up to 2 MiB, and when that leaves no more than 1 MiB over,
    the segment is not split: the whole of it counts as allocated. (Requests up to 10 MiB share
    2 or 20 MiB segments and are split off exactly.) A block reused from the cache follows the
    same no-split rule against the cached block's size, which this cannot know; the difference
    is below 1 MiB per tensor.
    """
    if nbytes <= 0:
        return 0
    size = -(-nbytes // _MIN_BLOCK) * _MIN_BLOCK
    if size < _MIN_LARGE_ALLOC:
        return size
    segment = -(-size // _ROUND_LARGE) * _ROUND_LARGE
    return segment if segment - size <= _SMALL_SIZE else size


# ---------------------------------------------------------------------------------------------
# Private helpers.


class _AllocationTracker(TorchDispatchMode):
    """Live tensor-storage bytes, as the CUDA caching allocator would count them, and their peak.

    Entered as a context, it sees every operator: each storage an operator returns is counted once
    (views and in-place results share a counted storage) and uncounted when it is garbage, like a
    caching-allocator block going back to the cache. Storages made before (parameters, inputs)
    are counted with `track`. Each storage gets a token; `label` files it for the breakdown.
    """

    def __init__(self, rounding: Callable[[int], int] = block_bytes) -> None:
        super().__init__()
        self.rounding = rounding
        self.current = 0
        self.peak = 0
        self.peak_op = ""  # the operator that reached the peak (for diagnosis)
        self._live: dict[int, list[int]] = {}  # id(storage) -> [token, nbytes, counted bytes]
        self._peak_live: dict[int, int] = {}  # token -> counted bytes, at the peak
        self._labels: dict[int, str] = {}
        self._next = 0
        self._op = "(before the step)"

    def track(self, tensor: torch.Tensor) -> int:
        """Count `tensor`'s storage if it is new; returns its token."""
        storage = tensor.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry[1] != nbytes:  # resized in place (an out= operator)
                counted = self.rounding(nbytes)
                self.current += counted - entry[2]
                entry[1], entry[2] = nbytes, counted
                self._check_peak()
            return entry[0]
        token = self._next
        self._next += 1
        counted = self.rounding(nbytes)
        self._live[key] = [token, nbytes, counted]
        self.current += counted
        # The storage object lives exactly as long as the storage (PyTorch preserves it).
        weakref.finalize(storage, self._release, key)
        self._check_peak()
        return token

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting `tensor`'s storage (it would not be in GPU memory)."""
        entry = self._live.get(id(tensor.untyped_storage()))
        if entry is not None:
            self.current -= entry[2]
            entry[2] = 0

    def label(self, tensor: torch.Tensor | None, name: str) -> None:
        """File `tensor`'s storage under `name` in the breakdown."""
        if tensor is not None:
            self._labels[self.track(tensor)] = name

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = -1
        self._check_peak()

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes alive at the peak per label ("activations" for unlabelled storages)."""
        parts: dict[str, int] = {}
        for token, counted in self._peak_live.items():
            name = self._labels.get(token, "activations")
            parts[name] = parts.get(name, 0) + counted
        return parts

    def _check_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = self._op
            self._peak_live = {token: counted for token, _, counted in self._live.values()}

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[2]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR:
            # .item()/bool() of a tensor whose value a fake tensor cannot know: the GradScaler's
            # found-inf count (0: no overflow, so the optimiser steps, as in steady state) and the
            # loss's finiteness check (True).
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:
                dtype = args[0].dtype
                return True if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        self._op = str(func)
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


def _simulate_step(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
                   fake: bool = True, rounding: Callable[[int], int] = block_bytes,
                   around_step: Callable[[], Any] = contextlib.nullcontext) -> MemoryReport:
    """`estimate`'s work. With `fake=False` the same run happens on real CPU tensors (small
    configurations only; for the tests), and `around_step()` is a context entered around all of it."""
    from medseg.losses import DiceCELoss
    from medseg.models import build_model
    from medseg.step import build_optimizer, train_step

    amp_dtype = _amp_dtype(cfg.train.amp)
    batch, patch = cfg.train.batch_size, tuple(int(n) for n in cfg.train.patch_size)
    if batch < 1:
        raise ConfigError(f"'train.batch_size' must be at least 1, got {batch}")
    with around_step(), (FakeTensorMode() if fake else contextlib.nullcontext()):
        model = build_model(cfg, in_channels, num_classes, tuple(spacing))
        model.train()
        _emulate_cuda_autocast(model)
        optimizer = build_optimizer(cfg, model)
        scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
        loss_fn = DiceCELoss(batch_dice=cfg.train.batch_dice)
        # What the training loader delivers: a float32 image batch and float32 labels.
        image = torch.randn((batch, in_channels, *patch))
        label = torch.randint(0, num_classes, (batch, 1, *patch)).float()

        tracker = _AllocationTracker(rounding)
        for parameter in model.parameters():
            tracker.label(parameter, "parameters")
            parameter.register_post_accumulate_grad_hook(lambda p: tracker.label(p.grad, "gradients"))
        for tensor in (*model.buffers(), image, label):
            tracker.track(tensor)
        with tracker:
            _warm_up(model, optimizer, scaler)
            _label_optimizer_state(tracker, optimizer)
            tracker.reset_peak()
            train_step(model, image, label, loss_fn, optimizer, scaler, amp_dtype, cfg.train.grad_clip)
            _label_optimizer_state(tracker, optimizer)
        parts = tracker.peak_breakdown()
    total = tracker.peak
    parameters = parts.get("parameters", 0)
    gradients = parts.get("gradients", 0)
    optimizer_state = parts.get("optimizer_state", 0)
    return MemoryReport(
        total=total,
        parameters=parameters,
        gradients=gradients,
        optimizer_state=optimizer_state,
        activations=total - parameters - gradients - optimizer_state,
        patch_size=patch,  # type: ignore[arg-type]
        batch_size=batch,
        amp=amp_name(amp_dtype),
        checkpointing=cfg.model.checkpointing,
    )


def _window_count(size: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    # MONAI's sliding-window grid: a step of patch·(1 - overlap) per axis, the last window flush
    # with the far edge.
    count = 1
    for length, roi in zip(size, patch):
        if length <= roi:
            continue
        step = max(int(roi * (1 - overlap)), 1)
        count *= math.ceil((length - roi) / step) + 1
    return count


def _warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    # What the steps before the measured one leave behind: the optimiser's state (momentum
    # buffers; AdamW's moments and step counts) and the GradScaler's scale. An optimiser step on
    # zero gradients creates them as a first training step does, without its forward and backward.
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    scaler.scale(torch.zeros(()))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _label_optimizer_state(tracker: Any, optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            if name == "step" and value.dim() == 0:
                # Adam's step counts stay in host memory for CUDA parameters (unless capturable or
                # fused, which medseg does not use): not GPU memory.
                tracker.forget(value)
            else:
                tracker.label(value, "optimizer_state")


def _emulate_cuda_autocast(model: nn.Module) -> None:
    # CUDA autocast runs group_norm in float32 (its input is cast up); CPU autocast leaves it in
    # the convolution's dtype. Cast up by hand so the CPU run allocates what CUDA would.
    def cast_up(module: nn.Module, args: tuple) -> tuple | None:
        if torch.is_autocast_enabled("cpu") and args and args[0].dtype in (torch.float16, torch.bfloat16):
            return (args[0].float(), *args[1:])
        return None

    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.register_forward_pre_hook(cast_up)


def _amp_dtype(amp: str) -> torch.dtype | None:
    # What medseg train uses on a CUDA device ("auto" is fp16 there).
    return resolve_amp(amp, torch.device("cuda"))


def _usable(budget_bytes: int, margin: float) -> int:
    if budget_bytes <= 0:
        raise ConfigError(f"memory budget must be positive, got {budget_bytes} bytes")
    if not 0 <= margin < 1:
        raise ConfigError(f"memory margin must be in [0, 1), got {margin}")
    return int(budget_bytes * (1 - margin))


def _candidate(cfg: Config, patch: Sequence[int], batch: int, mode: str) -> Config:
    return cfg.replace(train={"patch_size": [int(n) for n in patch], "batch_size": batch},
                       model={"checkpointing": mode})


def _cached_estimate(cache: dict, cfg: Config, in_channels: int, num_classes: int,
                     spacing: Sequence[float]) -> MemoryReport | None:
    """`estimate`, remembered per configuration; None where `build_model` rejects the configuration
    (checkpointing with batch norm, a patch too small for a fixed depth)."""
    key = (tuple(cfg.train.patch_size), cfg.train.batch_size, cfg.model.checkpointing)
    if key not in cache:
        try:
            cache[key] = estimate(cfg, in_channels, num_classes, spacing)
        except ConfigError:
            cache[key] = None
    return cache[key]


def _buildable(cfg: Config, patch: Sequence[int], spacing: Sequence[float]) -> bool:
    # Whether the network geometry exists for this patch (a fixed model.depth needs a large enough
    # patch); geometry only, no estimate.
    from medseg.models import network_plan

    try:
        network_plan(cfg.replace(train={"patch_size": [int(n) for n in patch]}), spacing)
    except ConfigError:
        return False
    return True


def _last_fitting(fits: Callable[[int], bool], lo: int, hi: int, guess: Callable[[], int | None]) -> int:
    """The largest x in [lo, hi] with `fits(x)`, for `fits` true up to some x and false above it;
    lo - 1 if none. The first few tries are `guess()`'s (a model that learns from every estimate,
    so usually two tries settle it), kept inside what is known; then bisection, galloping upwards
    while no upper bound is known."""
    good, bad = lo - 1, hi + 1
    guesses = 0
    while bad - good > 1:
        x = None
        if guesses < 4:
            guesses += 1
            proposal = guess()
            if proposal is not None:
                x = min(max(proposal, good + 1), bad - 1)
        if x is None:
            x = (good + bad) // 2 if bad <= hi else min(hi, max(lo, 2 * good + 1 - lo))
        if fits(x):
            good = x
        else:
            bad = x
    return good


class _FitSearch:
    """`fit`'s estimates for one config over the patches `patches` (ascending in volume), remembered,
    and a linear model of the peak per checkpointing mode, total ≈ F + c · voxels · batch, through
    the last two estimates of that mode (the last one and the parameters, gradients and optimiser
    state at its peak, if only one) that proposes where to look next."""

    def __init__(self, cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
                 limit: int, patches: list[list[int]]) -> None:
        self.cfg, self.in_channels, self.num_classes, self.spacing = cfg, in_channels, num_classes, spacing
        self.limit = limit
        self.patches = patches
        self.volumes = [math.prod(p) for p in patches]
        self.cache: dict[tuple, MemoryReport | None] = {}
        self.points: dict[str, list[tuple[int, int, int]]] = {}  # mode -> (voxels·batch, total, fixed)
        self.last_mode: str | None = None
        base = math.prod(int(n) for n in cfg.train.patch_size)
        # Where to start without a model: the largest patch no larger than the configured one.
        self.reference = max([i for i, v in enumerate(self.volumes) if v <= base] or [0])

    def report(self, mode: str, index: int, batch: int) -> MemoryReport | None:
        candidate = _candidate(self.cfg, self.patches[index], batch, mode)
        key = (tuple(candidate.train.patch_size), batch, mode)
        known = key in self.cache
        report = _cached_estimate(self.cache, candidate, self.in_channels, self.num_classes, self.spacing)
        if report is not None and not known:
            fixed = report.parameters + report.gradients + report.optimizer_state
            self.points.setdefault(mode, []).append((self.volumes[index] * batch, report.total, fixed))
            self.last_mode = mode
        return report

    def fits(self, mode: str, index: int, batch: int) -> bool:
        """Whether the estimate fits; without one where this mode's model puts it clearly above."""
        key = (tuple(self.patches[index]), batch, mode)
        if key not in self.cache and mode in self.points:
            fixed, slope = self.model(mode)  # type: ignore[misc]
            if fixed + slope * self.volumes[index] * batch > self.limit * (1 + _MODEL_SLACK):
                return False
        report = self.report(mode, index, batch)
        return report is not None and report.total <= self.limit

    def model(self, mode: str) -> tuple[float, float] | None:
        """(F, c) for `mode`; another mode's model until this one has an estimate; None before any."""
        points = self.points.get(mode) or (self.points.get(self.last_mode) if self.last_mode else None)
        if not points:
            return None
        x1, y1, fixed = points[-1]
        for x0, y0, _ in reversed(points[:-1]):
            if abs(x1 - x0) > 0.01 * max(x0, x1):
                slope = (y1 - y0) / (x1 - x0)
                if slope > 0 and y1 - slope * x1 >= 0:
                    return y1 - slope * x1, slope
                break
        return float(fixed), max(y1 - fixed, 1) / x1

    def predicted_patch(self, mode: str, batch: int) -> int | None:
        model = self.model(mode)
        if model is None:
            return self.reference
        fixed, slope = model
        return bisect.bisect_right([fixed + slope * v * batch for v in self.volumes], self.limit) - 1

    def predicted_batch(self, mode: str, index: int, slack: float = 0.0) -> int | None:
        model = self.model(mode)
        if model is None:
            return None
        fixed, slope = model
        return max(int((self.limit - fixed) / (slope * (1 - slack) * self.volumes[index])), 0)

    def largest_patches(self, modes: Sequence[str], batch: int) -> dict[str, int]:
        """Per mode, the index of the largest patch that fits at `batch` (modes where none does left out)."""
        top = {}
        for mode in modes:
            index = _last_fitting(lambda i: self.fits(mode, i, batch), 0, len(self.patches) - 1,
                                  lambda: self.predicted_patch(mode, batch))
            if index >= 0:
                top[mode] = index
        return top

    def smallest(self) -> MemoryReport | None:
        """The estimate with the smallest peak (for the message when nothing fits)."""
        reports = [r for r in self.cache.values() if r is not None]
        return min(reports, key=lambda r: r.total) if reports else None


def _scaled_patches(base: list[int], unit: Sequence[int], max_scale: float,
                    max_patch: Sequence[int] | None) -> list[list[int]]:
    """Distinct patches of `base`'s shape scaled by one factor, each axis a multiple of `unit`
    (and at least one unit), ascending in volume, up to `max_scale` times `base` and `max_patch`."""
    cap = [int(b * max_scale) for b in base]
    if max_patch is not None:
        cap = [max(min(c, int(m) // u * u), u) for c, m, u in zip(cap, max_patch, unit)]
    patches: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    # Factors at which some axis reaches its next multiple of its unit.
    factors = sorted({k * u / b for b, u, c in zip(base, unit, cap) for k in range(1, c // u + 1)})
    for factor in factors:
        patch = [min(max(u, int(b * factor + 1e-9) // u * u), c) for b, u, c in zip(base, unit, cap)]
        key = tuple(patch)
        if key not in seen:
            seen.add(key)
            patches.append(patch)
    patches.sort(key=lambda p: (math.prod(p), p))
    return patches


def _nothing_fits(budget_bytes: int, margin: float, smallest: MemoryReport | None) -> str:
    usable = budget_bytes * (1 - margin)
    text = (f"nothing fits in {budget_bytes / GiB:.2f} GiB less the {margin:.0%} margin "
            f"({usable / GiB:.2f} GiB)")
    if smallest is not None:
        patch = "×".join(str(n) for n in smallest.patch_size)
        text += (f"; the smallest configuration tried (patch {patch}, batch {smallest.batch_size}, "
                 f"checkpointing {smallest.checkpointing}, amp {smallest.amp}) needs {smallest.total / GiB:.2f} GiB")
    return text


def overview(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
             budget_bytes: int | None = None, margin: float = 0.1, *, max_patch: Sequence[int] | None = None,
             max_batch: int | None = None) -> dict[str, Any]:
    """What `medseg memory` shows: the predicted peak for AMP {off, the configured mode} × every
    checkpointing mode at the configured patch and batch, whether each fits the budget, and with a
    budget the recommendations: the largest patch at the configured batch and checkpointing
    (`largest`, see `largest_fit`) and the configuration `medseg train --gpu-memory` would choose
    (`fit`; `max_patch` and `max_batch` as there)."""
    from medseg.models import CHECKPOINTING_MODES

    amp = "fp16" if cfg.train.amp in ("auto", "fp16") else cfg.train.amp
    rows = []
    for amp_mode in dict.fromkeys(("off", amp)):
        for mode in CHECKPOINTING_MODES:
            candidate = cfg.replace(train={"amp": amp_mode}, model={"checkpointing": mode})
            report = estimate(candidate, in_channels, num_classes, spacing)
            fits = None if budget_bytes is None else report.total <= _usable(budget_bytes, margin)
            rows.append({**report.to_dict(), "fits": fits})
    result: dict[str, Any] = {"rows": rows, "budget": budget_bytes, "margin": margin}
    if budget_bytes is not None:
        searches: dict[str, Callable[[], tuple[Config, MemoryReport]]] = {
            "largest": lambda: largest_fit(cfg, in_channels, num_classes, spacing, budget_bytes, margin,
                                           max_patch=max_patch),
            "fit": lambda: fit(cfg, in_channels, num_classes, spacing, budget_bytes, margin,
                               max_patch=max_patch, max_batch=max_batch),
        }
        for name, search in searches.items():
            try:
                _, report = search()
                result[name] = report.to_dict()
            except MedsegError as exc:
                result[name] = {"error": str(exc)}
    return result
