"""GPU memory of a whole `medseg train` run: the training step and what the run keeps beside it.

Besides the step (`medseg.memory.estimator.estimate`), `medseg train` on CUDA places on the GPU:

- the batch the device sampler renders one step ahead (`next_batch_bytes`);
- the preprocessed training volumes, resident when they take at most a fifth of the budget (or of
  the GPU without one: `resident_allowance`, the rule `medseg.data.loader` passes to the sampler);
- between epochs, validation: the network's inference activations for `validate.sw_batch_size`
  windows, the volume on the GPU, the window outputs, and, where `medseg.device.aggregation_device`
  blends on the GPU, the aggregated scores (`validation_buffer_bytes`), beside the parameters, the
  optimiser state and the ahead batch (gradients are freed between steps);
- what none of these model: cuDNN's workspaces (allocated through the caching allocator), the
  sampler's render temporaries, kernels' scratch space and the allocator's rounding and
  fragmentation: `OVERHEAD`, a fraction of the budget plus a constant.

The run's peak is the volumes plus the larger of the step phase and the validation phase, plus
the overhead; `medseg.memory.fitting.fit` chooses patch, batch and checkpointing so that it fits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from medseg.memory.estimator import MemoryReport
from medseg.memory.sizes import GiB

__all__ = ["OVERHEAD", "VOLUME_SHARE", "Overhead", "RunData", "RunReport", "next_batch_bytes", "resident_allowance",
           "run_data", "validation_buffer_bytes"]

MiB = 2**20


class Overhead(NamedTuple):
    """What the plan keeps free of a budget for what it does not model: `fraction` of it plus `constant` bytes."""

    fraction: float
    constant: int

    def bytes(self, budget: int) -> int:
        """The bytes kept free of `budget`."""
        return int(budget * self.fraction) + self.constant


# The one overhead margin of every memory plan (`medseg train --gpu-memory`, `medseg plan`,
# `medseg memory`): cuDNN workspaces, the device sampler's render temporaries and the allocator's
# rounding and fragmentation grow with the step (the fraction); the allocator's fixed small-block
# segments and per-stream pools do not (the constant). scripts/bench_memory_run.py measures the
# whole run against the plan on a GPU.
OVERHEAD = Overhead(fraction=0.05, constant=512 * MiB)

# Training volumes stay on the GPU when they take at most 1/VOLUME_SHARE of its memory or budget.
VOLUME_SHARE = 5

# Bytes per voxel of a validation volume besides the class scores: the argmax (int64).
_PREDICTION_BYTES = 8


def resident_allowance(capacity_bytes: int) -> int:
    """The most bytes of training volumes the device sampler keeps on a GPU of `capacity_bytes`
    (the budget, or the card's memory without one); beyond it they stay in host memory and each
    patch's box is copied."""
    return int(capacity_bytes) // VOLUME_SHARE


@dataclass(frozen=True)
class RunData:
    """What the data contribute to the run's memory: an upper bound of the training volumes' bytes
    as the sampler holds them, and the validation volumes' largest extent (per axis) at the
    network's spacing (None: no validation)."""

    volume_bytes: int
    validation_shape: tuple[int, int, int] | None


def run_data(train_summaries: Sequence[Any], validation_summaries: Sequence[Any], spacing: Sequence[float],
             channels: int) -> RunData:
    """`RunData` for checked cases (`medseg.data.checks.CaseSummary`) resampled to `spacing`.

    Each case's shape at the target spacing is bounded from above (one voxel more per axis than
    the exact size, which resampling rounds; the foreground crop only makes it smaller); the sampler
    keeps float32 images and uint8 labels.
    """
    from medseg.data.fingerprint import shape_in_ras

    def at_spacing(summary: Any) -> list[int]:
        shape = np.asarray(shape_in_ras(summary.shape, summary.affine), dtype=float)
        size = shape * np.asarray(summary.spacing_ras, dtype=float) / np.asarray(spacing, dtype=float)
        return [max(int(math.ceil(n)) + 1, 2) for n in size]

    volume_bytes = sum(math.prod(at_spacing(s)) * (4 * channels + 1) for s in train_summaries)
    shapes = [at_spacing(s) for s in validation_summaries]
    largest = tuple(int(max(axis)) for axis in zip(*shapes)) if shapes else None
    return RunData(volume_bytes, largest)  # type: ignore[arg-type]


def next_batch_bytes(patch: Sequence[int], batch: int, channels: int) -> int:
    """The batch the device sampler renders one step ahead: float32 images, uint8 labels."""
    return batch * math.prod(patch) * (4 * channels + 1)


def validation_buffer_bytes(shape: Sequence[int], patch: Sequence[int], channels: int, classes: int,
                            sw_batch: int, mirror: bool, budget: int | None) -> int:
    """GPU bytes of validating one volume of `shape` besides the network's own activations.

    The image on the GPU and its copy padded to at least the patch; each batch of windows'
    float32 outputs and their Gaussian-weighted copy; and where `medseg.device.aggregation_device`
    blends on the GPU (for `budget`), the float32 score sums with their count map, with `mirror`
    the softmax of one flip and the running sum, and the argmax.
    """
    import torch

    from medseg.device import aggregation_device

    voxels = math.prod(shape)
    padded = math.prod(max(s, p) for s, p in zip(shape, patch))
    total = 4 * channels * (voxels + padded) + 2 * 4 * sw_batch * classes * math.prod(patch)
    volume = torch.empty((1, 1, *shape), device="meta")
    if budget is None or aggregation_device(torch.device("cuda"), volume, classes, budget).type == "cuda":
        score_copies = 3 if mirror else 1
        total += 4 * padded * (classes * score_copies + 1) + _PREDICTION_BYTES * voxels
    return total


@dataclass(frozen=True)
class RunReport:
    """Predicted peak GPU memory of a `medseg train` run, in bytes, and its parts.

    `total` = `resident_volumes` + max(step phase, validation phase) + `overhead`; the step phase
    is the step's peak (`step`) plus `next_batch`; the validation phase is the parameters, the
    optimiser state, `next_batch`, the network's `inference` activations and `validation_buffers`.
    """

    step: MemoryReport
    next_batch: int
    resident_volumes: int
    inference: int
    validation_buffers: int
    overhead: int
    budget: int | None

    @property
    def step_phase(self) -> int:
        """The training step's peak with the batch rendered ahead."""
        return self.step.total + self.next_batch

    @property
    def validation(self) -> int:
        """The validation phase's peak, without the resident volumes."""
        if not self.validation_buffers and not self.inference:
            return 0
        persistent = self.step.parameters + self.step.optimizer_state
        return persistent + self.next_batch + self.inference + self.validation_buffers

    @property
    def total(self) -> int:
        """The run's predicted peak (what the budget must hold)."""
        return self.resident_volumes + max(self.step_phase, self.validation) + self.overhead

    # The chosen configuration, as on the step's report.
    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.step.patch_size

    @property
    def batch_size(self) -> int:
        return self.step.batch_size

    @property
    def amp(self) -> str:
        return self.step.amp

    @property
    def checkpointing(self) -> str:
        return self.step.checkpointing

    def parts(self) -> dict[str, int]:
        """The run's parts by name, in bytes (what `medseg memory` tabulates)."""
        return {"step": self.step.total, "next_batch": self.next_batch, "resident_volumes": self.resident_volumes,
                "validation": self.validation, "inference": self.inference,
                "validation_buffers": self.validation_buffers, "overhead": self.overhead, "total": self.total}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON safe), sizes in bytes: the step's report with its total as `step_total`,
        the run's parts, and `total` the run's peak."""
        values = self.step.to_dict()
        values["step_total"] = values.pop("total")
        values.update({k: v for k, v in asdict(self).items() if k != "step"})
        values.update(self.parts())  # "step": the step's peak
        return values

    def summary(self) -> str:
        """One line: the configuration, the run's peak and its parts in GiB."""
        patch = "×".join(str(n) for n in self.patch_size)
        return (f"patch {patch}, batch {self.batch_size}, amp {self.amp}, checkpointing {self.checkpointing}: "
                f"{self.total / GiB:.2f} GiB for the run (step {self.step.total / GiB:.2f}, next batch "
                f"{self.next_batch / GiB:.2f}, resident volumes {self.resident_volumes / GiB:.2f}, validation "
                f"{self.validation / GiB:.2f}, overhead {self.overhead / GiB:.2f})")
