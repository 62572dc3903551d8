"""What training does when a step runs out of GPU memory: the fallback, cheapest first, and with
several processes the fallback they agree on before training starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from medseg import distributed
from medseg.errors import MedsegError
from medseg.models import CHECKPOINTING_MODES

if TYPE_CHECKING:
    from medseg.step import TrainingStep


@dataclass
class MemoryFallback:
    """What an out-of-memory error during training changes, cheapest first: switch activation
    checkpointing on, then split each batch into 2, 4, ... micro-batches (gradients accumulated, so
    the optimiser step stays the same).

    `enabled=False` (several processes): a change in one process alone would desynchronise them,
    so `cheaper` ends the run instead; `agree_on_memory` applies changes all processes agreed on.
    `compiled`: the network is compiled whole, which stops at selective checkpointing (stage needs
    its stages compiled one by one when the step is built).
    """

    micro_batches: int = 1
    enabled: bool = True
    compiled: bool = False

    def cheaper(self, model: nn.Module, batch_shape: torch.Size) -> str:
        """Apply the next fallback and say what changed; MedsegError when none is left."""
        batch_size, patch = batch_shape[0], list(batch_shape[2:])
        if not self.enabled:
            raise MedsegError(f"out of memory (patch {patch}, batch {batch_size} per GPU); with several GPUs "
                              f"there is no automatic fallback: set model.checkpointing=stage or a smaller batch")
        return self.apply_next(model, batch_shape)

    def apply_next(self, model: nn.Module, batch_shape: torch.Size) -> str:
        """`cheaper` without the check: for a change all processes have agreed on."""
        batch_size, patch = batch_shape[0], list(batch_shape[2:])
        # The next checkpointing mode in order of memory saved (off -> selective -> stage).
        modes = list(CHECKPOINTING_MODES)
        current = getattr(model, "checkpointing", modes[-1])
        if self.compiled and current != "stage":
            modes.remove("stage")
        if current != modes[-1]:
            model.set_checkpointing(modes[modes.index(current) + 1])
            return f"activation checkpointing switched to {model.checkpointing}"
        if self.micro_batches < batch_size:
            self.micro_batches = min(self.micro_batches * 2, batch_size)
            return f"batch split into {self.micro_batches} micro-batches of {-(-batch_size // self.micro_batches)}"
        raise MedsegError(
            f"out of memory even with checkpointing and one sample per micro-batch "
            f"(patch {patch}); use a smaller train.patch_size or a larger GPU"
        )


def agree_on_memory(step: "TrainingStep", batch: dict, context: distributed.Context) -> list[str]:
    """With several processes: every process runs one forward and backward on `batch` without
    exchanging gradients; if any runs out of memory, all apply the same fallback and try again.
    The fallback is thus agreed across processes before training; an out-of-memory error later
    ends the run with a message (torchrun then stops every process). Returns the changes made."""
    image, label = step.inputs(batch)
    changes = []
    while True:
        failed = False
        try:
            step.forward_backward_alone(image, label)
        except torch.OutOfMemoryError:
            failed = True
        step.network.zero_grad(set_to_none=True)
        if not distributed.any_true(context, failed, image.device):
            return changes
        if image.device.type == "cuda":
            torch.cuda.empty_cache()
        changes.append(step.fallback.apply_next(step.network, image.shape))
