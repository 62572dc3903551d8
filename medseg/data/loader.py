"""Datasets and loaders: preprocessed volumes cached once, patches drawn at random every step."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from monai import data as monai_data
from monai import transforms as T

from medseg.config import Config
from medseg.data.cases import Case
from medseg.data.io import map_cases, usable_cpus
from medseg.data.transforms import Preprocessing, patch_sampling, preprocessing, training_augmentation


def training_batches(cases: Sequence[Case], prep: Preprocessing, cfg: Config, cache_dir: Path | None,
                     device: torch.device) -> Iterable[dict]:
    """Batches of training patches, from the sampler `data.sampler` chooses.

    "workers" (the default without CUDA): MONAI transforms in DataLoader worker processes, one
    patch at a time on the CPU (`training_loader`). "device" (the default with CUDA): the
    preprocessed volumes are kept on the GPU where they fit (in host memory otherwise) and each
    batch is drawn and augmented there with batched tensor operations, so the CPU never limits
    the step rate. Either way an iteration over the result yields `iterations_per_epoch` batches.
    """
    sampler = cfg.data.sampler
    if sampler == "auto":
        sampler = "device" if device.type == "cuda" else "workers"
    if sampler == "workers":
        return training_loader(cases, prep, cfg, cache_dir, device)
    from medseg.data.device_sampler import DevicePatchSampler

    train = cfg.train
    dataset = _dataset([c.as_dict() for c in cases], preprocessing(prep), cfg.data.cache, cache_dir, train.workers)
    volumes = [{"image": item["image"].as_tensor(), "label": item["label"].as_tensor()} for item in dataset]
    resident = None
    if device.type == "cuda":
        # Volumes stay on the GPU while they take at most a fifth of it; beyond that each patch's
        # box is copied from pinned host memory. Under `train.memory_budget` the budget belongs
        # to the training step the estimator fitted into it, so the volumes stay in host memory.
        resident = 0 if train.memory_budget else torch.cuda.get_device_properties(device).total_memory // 5
    return _Epochs(DevicePatchSampler(
        volumes, train.patch_size, prep.num_classes, train.batch_size, cfg.data.foreground_oversample,
        cfg.augment.enabled, device, train.seed, resident_bytes=resident,
    ), train.iterations_per_epoch)


def training_loader(cases: Sequence[Case], prep: Preprocessing, cfg: Config, cache_dir: Path | None,
                    device: torch.device) -> monai_data.DataLoader:
    """An endless-by-epoch loader: each pass yields `iterations_per_epoch` batches of random patches.

    Cases are drawn with replacement (every case equally likely), so an epoch is a number of
    optimiser steps rather than a pass over the cases, as in nnU-Net.
    """
    train = cfg.train
    transform = T.Compose([
        *preprocessing(prep).transforms,
        *patch_sampling(prep, train.patch_size).transforms,
        *training_augmentation(prep, train.patch_size, cfg.data.foreground_oversample, cfg.augment.enabled).transforms,
    ])
    # Seeds: the augmentation's own random state (used without workers) and the loader's
    # generator (case order, and the base seed MONAI derives each worker's random state from).
    transform.set_random_state(seed=train.seed)
    dataset = _dataset([c.as_dict() for c in cases], transform, cfg.data.cache, cache_dir, train.workers)
    generator = torch.Generator().manual_seed(train.seed)
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=train.iterations_per_epoch * train.batch_size, generator=generator
    )
    return monai_data.DataLoader(
        dataset,
        batch_size=train.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=train.workers,
        persistent_workers=train.workers > 0,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def validation_dataset(cases: Sequence[Case], prep: Preprocessing, cfg: Config,
                       cache_dir: Path | None) -> monai_data.Dataset:
    """Whole preprocessed validation volumes, cached like the training ones."""
    return _dataset([c.as_dict() for c in cases], preprocessing(prep), cfg.data.cache, cache_dir, cfg.train.workers)


class _Epochs:
    """An endless batch source seen as epochs of `steps` batches (like a DataLoader's passes)."""

    def __init__(self, source: Iterable[dict], steps: int) -> None:
        self.source, self.steps = source, steps
        self._iterator = iter(source)

    def __iter__(self) -> Iterator[dict]:
        return itertools.islice(self._iterator, self.steps)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
        self._iterator = iter(self.source)


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
