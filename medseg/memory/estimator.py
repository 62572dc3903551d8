"""GPU memory of a training step, predicted on a machine without a GPU.

`estimate(cfg, in_channels, num_classes, spacing)` predicts the peak that
`torch.cuda.max_memory_allocated()` reports for one step of `medseg train` in steady state. It runs
the step itself (`medseg.models.build_model`, `medseg.step.build_optimizer`, `medseg.step.train_step`
with `DiceCELoss`) on *fake* tensors: tensors with shapes, dtypes and storages but no data, so
nothing is computed and a step at a large patch costs as little as one at a small patch.
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
  `scripts/bench_memory.py` compares prediction and measurement on a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from medseg.config import Config
from medseg.device import amp_dtype as resolve_amp
from medseg.device import amp_name
from medseg.errors import ConfigError
from medseg.memory.sizes import GiB

__all__ = ["MemoryReport", "block_bytes", "cuda_amp_dtype", "estimate", "estimate_inference", "simulate_step"]

# The CUDA caching allocator's constants (c10/cuda/CUDACachingAllocator.cpp).
_MIN_BLOCK = 512  # every block is a multiple of 512 bytes
_SMALL_SIZE = 1 << 20  # requests up to 1 MiB come from the small pool
_MIN_LARGE_ALLOC = 10 << 20  # requests of 1-10 MiB share 20 MiB segments
_ROUND_LARGE = 2 << 20  # larger requests get their own segment, rounded up to 2 MiB


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
    return simulate_step(cfg, in_channels, num_classes, spacing)



def estimate_inference(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
                       batch: int) -> int:
    """Predicted peak GPU bytes of the network's forward in eval mode without gradients (sliding-window
    validation and inference) on `batch` windows of `train.patch_size`, beyond its parameters and
    buffers: the activations alive at once, autocast's weight copies, the input and the logits.
    Under `train.amp` as `estimate` reads it. Raises ConfigError as `build_model` does."""
    from medseg.models import build_model

    amp_dtype = cuda_amp_dtype(cfg.train.amp)
    patch = tuple(int(n) for n in cfg.train.patch_size)
    with FakeTensorMode():
        model = build_model(cfg, in_channels, num_classes, tuple(spacing))
        model.eval()
        _emulate_cuda_autocast(model)
        tracker = _AllocationTracker()
        resident = [*model.parameters(), *model.buffers()]
        for tensor in resident:
            tracker.track(tensor)
        before = tracker.current
        with tracker, torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype or torch.float32,
                                                      enabled=amp_dtype is not None):
            logits = model(torch.randn((batch, in_channels, *patch)))
            del logits
    return tracker.peak - before


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


def simulate_step(cfg: Config, in_channels: int, num_classes: int, spacing: Sequence[float],
                  fake: bool = True, rounding: Callable[[int], int] = block_bytes,
                  around_step: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> MemoryReport:
    """`estimate`'s work, with its parts exposed so that it can be checked against reality.

    With `fake=False` the same step runs on real CPU tensors (small configurations only), so the
    count can be compared with the CPU allocator's; `rounding` maps a storage's bytes to what is
    counted (the CUDA allocator's `block_bytes`, or the bytes themselves); `around_step()` is a
    context entered around all of it (a profiler, say)."""
    from medseg.losses import DiceCELoss
    from medseg.models import build_model
    from medseg.step import build_optimizer, train_step

    amp_dtype = cuda_amp_dtype(cfg.train.amp)
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


def cuda_amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype `medseg train` uses on a CUDA device for `train.amp` ("auto" is fp16
    there); None without autocast."""
    return resolve_amp(amp, torch.device("cuda"))

