"""One training step: the optimiser, the AMP step itself (forward, backward, clipping, update),
the step as torch.compile or a CUDA graph runs it, and the run settings that choose how
(`compile_setting`, `memory_format`).

`medseg train`, the memory estimator and the benchmarks all run this same step."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

from medseg import distributed
from medseg.config import Config
from medseg.errors import MedsegError
from medseg.oom import MemoryFallback

# Steps of at most this many voxels (batch x patch) run as CUDA graphs with train.compile=auto.
GRAPH_MAX_VOXELS = 2**20
# Runs limited to at most this many minutes record the eager step as a CUDA graph instead of
# compiling it (train.compile=auto): compiling costs a start-up that a run this short does not earn
# back in faster steps (docs/benchmarks.md, "The eager step recorded as a CUDA graph").
SHORT_RUN_MINUTES = 3.0


def train_step(model: nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
               grad_clip: float, micro_batches: int = 1,
               context: distributed.Context = distributed.Context()) -> tuple[torch.Tensor, bool]:
    """The AMP step, written once: forward under autocast, scaled backward, clip, step, update.

    With `micro_batches` > 1 the batch is split and the gradients accumulated (the out-of-memory
    fallback): same step, less activation memory. Returns the loss and whether it was finite (a
    boolean tensor on the loss's device); a non-finite loss takes no optimiser step.
    """
    loss = forward_backward(model, image, label, loss_fn, scaler, amp_dtype, micro_batches)
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = torch.isfinite(loss)
    if context.enabled:  # all processes skip together
        finite = torch.tensor(distributed.all_true(context, finite), device=loss.device)
    if scaler.is_enabled():
        # fp16: GradScaler skips the step itself when the gradients overflowed, which a non-finite
        # loss makes them; with a fused optimiser it decides on the GPU, without a host sync.
        scaler.step(optimizer)
    elif is_fused(optimizer):
        # bf16 and fp32: the fused optimiser skips the update itself where `found_inf` is set
        # (the flag GradScaler hands it), so the GPU decides, without a host sync.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        del optimizer.found_inf
    elif finite:  # otherwise the host decides (a sync)
        optimizer.step()
    scaler.update()
    # set_to_none frees the gradient memory between steps instead of writing zeros into it.
    optimizer.zero_grad(set_to_none=True)
    return loss, finite


def forward_backward(model: nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: nn.Module,
                     scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, micro_batches: int = 1) -> torch.Tensor:
    """Forward under autocast and scaled backward, in `micro_batches` parts whose gradients add up
    to the whole batch's; returns the (detached) loss of the whole batch.

    Runs under `compile_errors_run_eagerly()`: a part of a compiled network or loss that
    torch.compile cannot handle runs eagerly instead of failing the run."""
    loss = image.new_zeros((), dtype=torch.float32)
    with compile_errors_run_eagerly():
        for part_image, part_label in zip(image.tensor_split(micro_batches), label.tensor_split(micro_batches)):
            with torch.autocast(image.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                part_loss = loss_fn(model(part_image), part_label) * (part_image.shape[0] / image.shape[0])
            scaler.scale(part_loss).backward()
            loss = loss + part_loss.detach()
    return loss


def compile_errors_run_eagerly() -> ContextManager[None]:
    """While active, a frame torch.compile fails on (no compiler, an unsupported GPU, an operator
    it cannot trace) runs eagerly instead of raising: torch._dynamo's `suppress_errors`, set for the
    training step only (compilation happens lazily, at a compiled module's first calls), never for
    the whole process."""
    return torch._dynamo.config.patch(suppress_errors=True)


class GraphedStep:
    """`train_step` recorded once as a CUDA graph and replayed: forward, backward, clipping, the
    optimiser and the loss scaling launched as one graph (`train.compile=graphs` records the
    compiled step, `eager-graphs` the eager one).

    A small step is bound by kernel launches, not arithmetic, and a graph launches them all at
    once (docs/benchmarks.md, "The eager step recorded as a CUDA graph": recording the eager
    step takes the time of a few steps, compiling much longer). The first `warmup` calls run the step on a side stream (torch.compile compiles,
    the optimiser creates its state and cuDNN picks its algorithms, as capture requires), the
    next records the graph, every call replays it on new data. The batch shape must stay the
    same; `release()` drops the graph for good (the out-of-memory fallback, which changes the
    network, then runs unrecorded steps).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, grad_clip: float,
                 warmup: int = 3) -> None:
        self.model, self.loss_fn, self.optimizer, self.scaler = model, loss_fn, optimizer, scaler
        self.amp_dtype, self.grad_clip, self.warmup = amp_dtype, grad_clip, warmup
        self.calls = 0
        self.active = True
        self.failure: str | None = None  # why recording failed, if it did
        self._graph: torch.cuda.CUDAGraph | None = None

    def usable(self, micro_batches: int) -> bool:
        """Whether this step can run as the graph (not after release, not split into micro-batches)."""
        return self.active and micro_batches == 1

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on (image, label); returns (loss, finite) as `train_step`."""
        self.calls += 1
        if self._graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream(image.device)
            side.wait_stream(torch.cuda.current_stream(image.device))
            with torch.cuda.stream(side):
                result = self._eager(image, label)
            torch.cuda.current_stream(image.device).wait_stream(side)
            return result
        if self._graph is None:
            try:
                self._record(image, label)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # something in the step cannot be recorded on this machine
                self._abandon(exc)
                return self._eager(image, label)
        self._image.copy_(image)
        self._label.copy_(label)
        # The recorded optimiser reads its learning rate from this tensor: the schedule's value
        # is copied in before every replay (a float would have been frozen into the graph).
        self._lr.fill_(self.optimizer.param_groups[0]["lr"])
        self._graph.replay()
        return self._loss, self._finite

    def release(self) -> None:
        """Drop the graph and its memory; later steps run eagerly."""
        self.active = False
        self._graph = None
        for name in ("_image", "_label", "_loss", "_finite", "_lr"):
            self.__dict__.pop(name, None)

    def _eager(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return train_step(self.model, image, label, self.loss_fn, self.optimizer, self.scaler, self.amp_dtype,
                          self.grad_clip)

    def _abandon(self, exc: Exception) -> None:
        # A failed recording ran none of its kernels, but left gradients pointing at memory it never
        # wrote and GradScaler halfway through its step (private state, reset to what update() leaves).
        self.release()
        self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler._per_optimizer_states.clear()

    def _record(self, image: torch.Tensor, label: torch.Tensor) -> None:
        groups = self.optimizer.param_groups
        if len({group["lr"] for group in groups}) != 1:
            raise MedsegError("CUDA-graph training needs one learning rate for all parameters")
        self._image, self._label = image.clone(), label.clone()
        self._lr = torch.tensor(float(groups[0]["lr"]), device=image.device)
        rates = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = self._lr
        # Gradients set to None now are created inside the graph, in its private memory pool, so
        # every replay writes them at the same addresses.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._loss, self._finite = self._eager(self._image, self._label)
        finally:
            for group, rate in zip(groups, rates):
                group["lr"] = rate  # floats again: what the schedule sets and checkpoints save
        self._graph = graph


def compile_for_training(model: nn.Module, loss_fn: nn.Module, mode: str) -> tuple[nn.Module, nn.Module]:
    """The network and the loss as the training step runs them: eager (`off`, `eager-graphs`) or
    compiled with torch.compile (`on`, `graphs`). The graphs are recorded by GraphedStep, around
    the whole step.

    The loss is compiled with the network: eager, its softmax, one-hot, sums and their backward
    for every deep-supervision output are dozens of small kernels per step. With `stage`
    checkpointing the network's stages are compiled one by one (UNet3D.compile_stages).
    """
    if mode in ("off", "eager-graphs"):
        return model, loss_fn
    # What cannot compile runs eagerly: `forward_backward` runs the step under
    # compile_errors_run_eagerly(), where torch.compile does its work.
    network = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if getattr(network, "checkpointing", "off") == "stage":
        network.compile_stages()  # the checkpoints stay eager around the compiled stages
        return model, torch.compile(loss_fn)
    return torch.compile(model), torch.compile(loss_fn)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    # On CUDA the fused implementation: a few kernels for all parameters, and it takes GradScaler's
    # overflow flag on the GPU, so skipping an overflowed fp16 step needs no host sync. Elsewhere
    # foreach: one kernel per parameter group instead of one per tensor.
    speed = {"fused": True} if trainable and all(p.is_cuda for p in trainable) else {"foreach": True}
    if t.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=t.lr, momentum=t.momentum, nesterov=True,
                               weight_decay=t.weight_decay, **speed)
    return torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay, **speed)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(group.get("fused") for group in optimizer.param_groups)


def compile_setting(cfg: Config, device: torch.device, distributed_run: bool = False) -> str:
    """How the step runs for `train.compile` on `device`: "off" (eager), "on" (torch.compile),
    "graphs" (the compiled step recorded as a CUDA graph) or "eager-graphs" (the eager step so).

    auto: eager off CUDA; on CUDA graphs for small steps (`small_step`), the eager step recorded
    for short runs (at most SHORT_RUN_MINUTES), torch.compile otherwise.
    """
    setting = cfg.train.compile
    if setting == "auto":
        setting = "off" if device.type != "cuda" else ("graphs" if small_step(cfg) else "on")
        if setting == "graphs" and cfg.train.max_minutes is not None and cfg.train.max_minutes <= SHORT_RUN_MINUTES:
            setting = "eager-graphs"
    # CUDA graphs need CUDA, and replay no collective communication: with several processes
    # (DistributedDataParallel's gradient all-reduce) or on the CPU they fall back to plain compile,
    # and the eager step recorded as a graph to the eager step.
    # With "stage" checkpointing neither is recorded: its checkpoints run eagerly between the
    # compiled stages.
    if setting in ("graphs", "eager-graphs") and (device.type != "cuda" or distributed_run
                                                  or cfg.model.checkpointing == "stage"):
        setting = "on" if setting == "graphs" else "off"
    return setting


def small_step(cfg: Config) -> bool:
    """Whether the step is small enough (at most GRAPH_MAX_VOXELS) for auto to record it as a CUDA graph.

    CUDA graphs pay where kernel launches, not arithmetic, bound the step; on large steps capturing
    torch.compile's graphs costs minutes for little gain (docs/benchmarks.md, "The compiled step
    recorded whole as one CUDA graph"). Not under a memory budget: the graphs' private memory pool
    is outside what the estimator fitted.
    """
    voxels = cfg.train.batch_size * math.prod(cfg.train.patch_size)
    return voxels <= GRAPH_MAX_VOXELS and not cfg.train.memory_budget


def memory_format(cfg: Config, device: torch.device, compile_mode: str) -> torch.memory_format:
    """The layout of the network's weights and inputs for `train.channels_last`.

    auto: channels-last (NDHWC) only where it was measured faster, compiled on CUDA without
    checkpointing; with CUDA graphs it gained nothing, with eager stage checkpointing it was slower
    (docs/benchmarks.md, "Training speed, CUDA graphs, channels-last").
    """
    setting = cfg.train.channels_last
    if setting == "auto":
        fits = device.type == "cuda" and compile_mode == "on" and cfg.model.checkpointing == "off"
        setting = "on" if fits else "off"
    return torch.channels_last_3d if setting == "on" else torch.contiguous_format


def inner_network(model: nn.Module) -> nn.Module:
    """The network inside torch.compile's and DistributedDataParallel's wrappers."""
    while hasattr(model, "_orig_mod") or isinstance(model, nn.parallel.DistributedDataParallel):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


@dataclass
class TrainingStep:
    """The training step as one run takes it: `trained` (the network as compiled and/or wrapped in
    DistributedDataParallel) stepped by `optimizer`, as the CUDA graph `graph` while that is
    usable, with the out-of-memory `fallback` applied to `network` (the module inside) when a step
    runs out of memory. Inputs are moved to the network's device in the memory `layout` of its
    weights. `report` receives what changed (a graph not recorded, a fallback)."""

    network: nn.Module
    trained: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    grad_clip: float
    fallback: MemoryFallback = field(default_factory=MemoryFallback)
    graph: GraphedStep | None = None
    context: distributed.Context = field(default_factory=distributed.Context)
    layout: torch.memory_format = torch.contiguous_format
    report: Callable[[str], object] = print

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's image (in the step's memory layout) and label, on the network's device."""
        device = next(self.network.parameters()).device
        image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=self.layout)
        return image, batch["label"].to(device, non_blocking=True)

    def __call__(self, image: torch.Tensor, label: torch.Tensor, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on (image, label), retried more cheaply after an out-of-memory
        error; returns (loss, finite) as `train_step`. `where` names the step in messages."""
        while True:
            try:
                return self._once(image, label)
            except torch.OutOfMemoryError:
                pass  # leave the except block first, so the failed step's tensors are freed
            if self.graph is not None:
                self.graph.release()  # the fallback changes the network: the recorded step is void
            self.optimizer.zero_grad(set_to_none=True)
            if image.device.type == "cuda":
                torch.cuda.empty_cache()
            change = self.fallback.cheaper(self.network, image.shape)
            self.report(f"out of memory at {where}: {change}; retrying the step")

    def forward_backward_alone(self, image: torch.Tensor, label: torch.Tensor) -> None:
        """Forward and backward without exchanging gradients between processes (DDP's no_sync),
        and without an optimiser step: a trial of the step's memory."""
        wrapper = self.trained._orig_mod if hasattr(self.trained, "_orig_mod") else self.trained
        alone = wrapper.no_sync() if isinstance(wrapper, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
        with alone:
            forward_backward(self.trained, image, label, self.loss_fn, self.scaler, self.amp_dtype,
                             self.fallback.micro_batches)

    def _once(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None and self.graph.usable(self.fallback.micro_batches):
            result = self.graph(image, label)
            if self.graph.failure:
                self.report(f"CUDA graph not recorded ({self.graph.failure}); steps run without it")
                self.graph = None
            return result
        return train_step(self.trained, image, label, self.loss_fn, self.optimizer, self.scaler, self.amp_dtype,
                          self.grad_clip, self.fallback.micro_batches, self.context)
