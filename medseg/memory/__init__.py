"""GPU memory of training: predicted without a GPU, fitted to a budget, measured on one.

- `medseg.memory.estimator`: `estimate` predicts the peak of one training step on fake tensors
  (`MemoryReport`, the CUDA allocator's rounding `block_bytes`);
- `medseg.memory.fitting`: `fit` chooses patch, batch and checkpointing for a budget,
  `fit_to_data` is the fit `medseg train --gpu-memory` runs, `overview` what `medseg memory` shows;
- `medseg.memory.run`: the whole run beside the step (resident volumes, validation, the batch
  rendered ahead, the overhead margin `OVERHEAD`) and its `RunReport`;
- `medseg.memory.measurement`: `measure` runs real steps on a CUDA GPU;
- `medseg.memory.sizes`: `parse_size` reads "24GiB"-style sizes.
"""

from medseg.memory.estimator import MemoryReport, block_bytes, estimate, estimate_inference
from medseg.memory.fitting import STEP_TIME, fit, fit_to_data, overview
from medseg.memory.measurement import measure
from medseg.memory.run import OVERHEAD, Overhead, RunData, RunReport, resident_allowance, run_data
from medseg.memory.sizes import GiB, parse_size

__all__ = [
    "OVERHEAD",
    "GiB",
    "Overhead",
    "RunData",
    "RunReport",
    "estimate_inference",
    "resident_allowance",
    "run_data",
    "STEP_TIME",
    "MemoryReport",
    "block_bytes",
    "estimate",
    "fit",
    "fit_to_data",
    "measure",
    "overview",
    "parse_size",
]
