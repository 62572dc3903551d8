"""The network contract: what training, the memory estimator and inference ask of a network.

Any `torch.nn.Module` that also has the members of `SegmentationNetwork` can be registered as an
architecture (`medseg.models.register`) and trained, estimated and used for inference by medseg.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

# Activation checkpointing modes, cheapest first in time, most expensive first in memory. A network
# supports some of them (its `checkpointing_modes`), always "off".
CHECKPOINTING_MODES = ("off", "selective", "stage")


@runtime_checkable
class SegmentationNetwork(Protocol):
    """A 3D segmentation network as medseg's training loop, memory estimator and inference use it.

    Besides these members it is an `nn.Module` (parameters, state_dict, train/eval, to).

    Forward: `network(image)` with image `(batch, channels, x, y, z)` returns, in training mode
    with deep supervision, a list of logits `(batch, classes, ...)`, finest (full resolution)
    first, each coarser output at the resolution of one decoder stage; otherwise (eval mode, or
    without deep supervision) the full-resolution logits alone, one tensor.
    """

    # The 1x1x1 segmentation heads, coarsest first: heads[-1] gives the full-resolution output,
    # heads[-1 - i] the i-th output of the deep-supervision list. Training freezes the heads whose
    # output the loss does not weigh.
    heads: nn.ModuleList
    # Whether training-mode forward returns the deep-supervision list.
    deep_supervision: bool
    # The current activation checkpointing mode, one of `checkpointing_modes`.
    checkpointing: str
    # The modes `set_checkpointing` accepts, in CHECKPOINTING_MODES order, "off" first.
    checkpointing_modes: tuple[str, ...]

    def set_checkpointing(self, mode: str) -> None:
        """Switch activation checkpointing (the out-of-memory fallback does so between steps).
        Raises ValueError for a mode outside `checkpointing_modes`."""
        ...

    def compile_stages(self) -> None:
        """torch.compile the network in place in parts that `stage` checkpointing leaves eager
        around them; training calls it instead of compiling the whole network when
        `checkpointing == "stage"`."""
        ...

    def __call__(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        ...
