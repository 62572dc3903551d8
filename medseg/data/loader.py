"""Training and validation data: preprocessed volumes cached once, patches drawn at random every step."""

from __future__ import annotations

import itertools
import os
import pickle
from pathlib import Path
from typing import Iterator, Sequence

import torch
from monai import data as monai_data
from monai import transforms as T

from medseg.config import Config
from medseg.data.augmentation import check_recipe
from medseg.data.cases import Case
from medseg.data.device_sampler import DevicePatchSampler
from medseg.data.io import map_cases, usable_cpus
from medseg.data.transforms import Preprocessing, preprocessing
from medseg.stopping import ignore_in_worker, signals_blocked


def training_batches(cases: Sequence[Case], prep: Preprocessing, cfg: Config, cache_dir: Path | None,
                     device: torch.device) -> "SampledBatches":
    """Batches of augmented training patches; an iteration over the result yields
    `iterations_per_epoch` batches, and its `state_dict()` continues the sequence exactly.

    One sampler (`DevicePatchSampler`, the `augment:` recipe) draws them, where `data.sampler`
    says. "device" (the default with CUDA): the preprocessed volumes are kept on the GPU where they
    fit (in host memory otherwise) and each batch is drawn and augmented there, so the CPU never
    limits the step rate. "workers" (the default without CUDA): the sampler runs on the CPU in
    `train.workers` DataLoader worker processes (in this process with 0), each rendering every
    `workers`-th batch. Both give the same batches for the same seed (up to the float rounding of
    the statistics of large patches, whose sums the CPU splits over its threads).
    """
    check_recipe(cfg.augment)  # before the volumes are read and cached
    sampler = cfg.data.sampler
    if sampler == "auto":
        sampler = "device" if device.type == "cuda" else "workers"
    train = cfg.train
    volumes = training_volumes(cases, prep, cfg, cache_dir)
    resident = None
    if sampler == "device" and device.type == "cuda":
        # Volumes stay on the GPU while they take at most a fifth of it (of `train.memory_budget`
        # when set, which the memory plan reserves for them); beyond that each patch's box is
        # copied from pinned host memory.
        from medseg.memory import parse_size, resident_allowance

        capacity = (parse_size(train.memory_budget) if train.memory_budget
                    else torch.cuda.get_device_properties(device).total_memory)
        resident = resident_allowance(capacity)
    renders_on = device if sampler == "device" else torch.device("cpu")
    patches = DevicePatchSampler(
        volumes, train.patch_size, prep.num_classes, train.batch_size, cfg.data.foreground_oversample,
        cfg.augment, renders_on, train.seed, resident_bytes=resident,
    )
    workers = train.workers if sampler == "workers" else 0
    return SampledBatches(patches, train.iterations_per_epoch, workers, pin_memory=device.type == "cuda")


def usable_workers(requested: int) -> int:
    """`train.workers` held to the cores this process may use: more worker processes than cores
    only compete for them (and the DataLoader warns about it)."""
    return max(0, min(requested, usable_cpus()))


def training_volumes(cases: Sequence[Case], prep: Preprocessing, cfg: Config,
                     cache_dir: Path | None) -> list[dict[str, torch.Tensor]]:
    """The preprocessed training volumes as plain tensors, through `data.cache` (memory, disk
    under `cache_dir`, or none)."""
    dataset = _dataset([c.as_dict() for c in cases], preprocessing(prep), cfg.data.cache, cache_dir,
                       cfg.train.workers)
    # The memory cache holds MetaTensors, the disk cache reads plain tensors back: the sampler
    # needs no metadata either way.
    return [{key: torch.as_tensor(item[key]).as_subclass(torch.Tensor) for key in ("image", "label")}
            for item in dataset]


def validation_dataset(cases: Sequence[Case], prep: Preprocessing, cfg: Config,
                       cache_dir: Path | None) -> monai_data.Dataset:
    """Whole preprocessed validation volumes, cached like the training ones."""
    return _dataset([c.as_dict() for c in cases], preprocessing(prep), cfg.data.cache, cache_dir, cfg.train.workers)


class SampledBatches:
    """A sampler's endless batch sequence seen as epochs of `steps` batches (like a DataLoader's
    passes), rendered in this process (`workers` 0) or by `workers` DataLoader worker processes,
    worker w rendering batches w, w + workers, ... (each holds a copy of the sampler: its numbered
    batches make the copies agree). The batches and their order are the same either way (up to the
    float rounding of sums that the CPU splits over its threads, one thread in a worker)."""

    def __init__(self, sampler: DevicePatchSampler, steps: int, workers: int = 0, pin_memory: bool = False) -> None:
        self.sampler, self.steps, self.workers, self.pin_memory = sampler, steps, workers, pin_memory
        self._handed_out = [0]  # batches handed out (a cell the batch generator shares)
        self._iterator: Iterator[dict] | None = None  # started on first use, not before a state is loaded

    def __iter__(self) -> Iterator[dict]:
        if self._iterator is None:
            self._iterator = _counted(self._start(), self._handed_out)
        return itertools.islice(self._iterator, self.steps)

    def state_dict(self) -> dict:
        """The number of batches handed out (the sampler's state)."""
        return {"batches": self._handed_out[0]}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batches `state` counts (workers restart there)."""
        self._handed_out[0] = int(state.get("batches", 0))
        self._iterator = None

    def _start(self) -> Iterator[dict]:
        start = self._handed_out[0]
        self.sampler.load_state_dict({"batches": start})
        if self.workers == 0:
            return iter(self.sampler)
        # Worker processes are forked with the volumes (copy-on-write) and live as long as the
        # iterator, across epochs: no per-epoch start-up. Each worker runs torch on one thread.
        # Workers ignore SIGINT and SIGTERM (sent to the whole process group by a terminal or a
        # scheduler): the training process stops and shuts them down; a worker killed by the signal
        # would end training with the DataLoader's error instead. They are forked with the signals
        # blocked, so that none reaches them before they ignore it.
        loader = torch.utils.data.DataLoader(_BatchStream(self.sampler, start), batch_size=None,
                                             num_workers=self.workers, pin_memory=self.pin_memory,
                                             worker_init_fn=ignore_in_worker,
                                             multiprocessing_context="fork" if hasattr(os, "fork") else None)
        with signals_blocked():
            return iter(loader)


def _counted(batches: Iterator[dict], handed_out: list[int]) -> Iterator[dict]:
    # A function, not a method: the generator must not hold the SampledBatches, so that dropping
    # it frees the DataLoader iterator at once and its workers are shut down then, not at exit.
    for batch in batches:
        handed_out[0] += 1
        yield batch


class _BatchStream(torch.utils.data.IterableDataset):
    """The sampler's batches from number `start` on; in a DataLoader worker only every
    num_workers-th of them, so that the loader (which takes one batch from each worker in turn)
    yields them in order."""

    def __init__(self, sampler: DevicePatchSampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for number in itertools.count(self.start + first, step):
            yield self.sampler.batch(number)


def _dataset(items: list[dict], transform: T.Compose, cache: str, cache_dir: Path | None,
             workers: int) -> monai_data.Dataset:
    # MONAI's cached datasets run the transforms up to the first random one once, keep the result,
    # and apply only the random rest per draw: epochs after the first never re-read or re-resample.
    if cache == "memory":
        return _CacheDataset(items, transform, num_workers=max(workers, 1), progress=False,
                             processes=usable_cpus() if workers > 0 else 1)
    if cache == "disk":
        assert cache_dir is not None
        cache_dir.mkdir(parents=True, exist_ok=True)
        return monai_data.PersistentDataset(items, transform, cache_dir=cache_dir)
    return monai_data.Dataset(items, transform)


class _CacheDataset(monai_data.CacheDataset):
    """MONAI's CacheDataset, its cache filled by `processes` forked processes (all the usable
    cores) instead of a thread pool: MONAI's transforms hold the GIL most of the time, so threads
    ran them hardly faster than one (195 hippocampus cases: 5.5 s with 2 or 4 threads, 5.8 s
    with one). Each child runs torch on one thread, so the z-score's mean and std sum in one fixed
    order: the cache matches the threads' to the last bit or within a float32 rounding step (their
    reductions split over the machine's cores). Items travel back pickled through a pipe, not
    shared memory, which containers often keep small. `train.workers=0` keeps it in-process."""

    def __init__(self, *args, processes: int = 1, **kwargs) -> None:
        self.processes = processes
        super().__init__(*args, **kwargs)

    def _fill_cache(self, indices=None) -> list:
        if self.processes <= 1 or self.cache_num <= 1:
            return super()._fill_cache(indices)
        if indices is None:
            indices = list(range(self.cache_num))
        return [pickle.loads(item) for item in map_cases(self._pickled_cache_item, indices, self.processes)]

    def _pickled_cache_item(self, index: int) -> bytes:
        return pickle.dumps(self._load_cache_item(index), protocol=pickle.HIGHEST_PROTOCOL)
