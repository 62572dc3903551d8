"""`medseg plan`: a dataset fingerprint turned into a training configuration by rules.

The rules follow nnU-Net's (well tested) defaults: median spacing (for strongly anisotropic data
the coarse axis takes its 10th percentile instead), normalisation by modality, a patch from the
median shape at that spacing rounded to the network's divisibility, and batch size and
checkpointing from a GPU memory budget through medseg's own memory estimator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medseg import config
from medseg.data.cases import find_dataset
from medseg.data.checks import check_dataset
from medseg.data.fingerprint import growth_limits, shape_in_ras
from medseg.data.io import load_volume, map_cases, usable_cpus

# An axis counts as coarse when its spacing exceeds the finest by this factor (nnU-Net: 3).
ANISOTROPY = 3.0
# A patch holding less than this share of the median case's voxels trains with batch Dice (nnU-Net's rule).
BATCH_DICE_SHARE = 0.25


@dataclass
class Plan:
    """The fingerprint and the configuration derived from it."""

    dataset: str
    cases: int
    channels: int
    modalities: tuple[str, ...]
    labels: dict[int, str]
    median_shape: tuple[int, int, int]  # voxels, RAS axis order, at the original spacing
    median_spacing: tuple[float, float, float]
    spacing: tuple[float, float, float]  # target
    shape_at_spacing: tuple[int, int, int]
    class_fraction: dict[str, float]  # voxels of each class / all voxels
    intensity: list[dict[str, float]]  # per channel, over foreground voxels
    overrides: dict[str, Any] = field(default_factory=dict)
    memory: str = ""

    def to_yaml(self) -> str:
        """The config overrides file `medseg train` takes, with the fingerprint as comments."""
        header = [
            f"# Planned by medseg plan for {self.dataset}: {self.cases} cases, {self.channels} channel(s)"
            f" ({', '.join(self.modalities) or 'unknown modality'}), classes {self.labels}.",
            f"# Median shape {list(self.median_shape)} at spacing {_round(self.median_spacing)} mm;"
            f" at the target spacing {list(self.shape_at_spacing)}.",
            f"# {self.memory}",
        ]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.overrides, sort_keys=False)


def plan(dataset_path: Path, budget_bytes: int, workers: int | None = None, samples_per_case: int = 10_000) -> Plan:
    """Fingerprint the dataset (checking every case on the way) and derive a configuration.

    `workers`: processes reading the files (None: every usable core)."""
    from medseg import memory

    workers = usable_cpus() if workers is None else workers
    dataset = find_dataset(dataset_path)
    summaries = check_dataset(dataset.cases, dataset.labels, len(dataset.modalities) or None, workers=workers)
    spacings = np.array([s.spacing_ras for s in summaries])
    shapes = np.array([shape_in_ras(s.shape, s.affine) for s in summaries])
    median_spacing = np.median(spacings, axis=0)
    target = median_spacing.copy()
    coarse = int(np.argmax(target))
    if target[coarse] > ANISOTROPY * target.min():
        # Strongly anisotropic: resampling every case to the median slice thickness would blur the
        # thin-slice cases; the coarse axis takes the 10th percentile instead (nnU-Net's rule).
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    at_spacing = np.median(shapes * spacings / target, axis=0).round().astype(int)

    labels = dataset.labels or {v: f"class_{v}" for v in range(max(max(s.label_values) for s in summaries) + 1)}
    counts, intensity = _voxel_statistics(dataset.cases, len(labels), summaries[0].channels, samples_per_case,
                                          workers)
    normalization = "ct" if any(m.upper() == "CT" for m in dataset.modalities) else "zscore"

    base = config.load(None, [f"data.dataset={dataset_path}"])
    patch, largest = growth_limits(summaries, target)
    cfg = base.replace(train={"patch_size": patch, "batch_size": 2})
    chosen, report = memory.fit(cfg, summaries[0].channels, len(labels), tuple(target), budget_bytes,
                                max_patch=patch, max_batch=largest)
    overrides = {
        "data": {"dataset": str(dataset_path), "spacing": [round(float(v), 4) for v in target],
                 "normalization": normalization},
        "model": {"checkpointing": chosen.model.checkpointing},
        "train": {"patch_size": list(chosen.train.patch_size), "batch_size": chosen.train.batch_size,
                  "batch_dice": _batch_dice(chosen.train.patch_size, at_spacing)},
    }
    total = counts.sum()
    return Plan(
        dataset=str(dataset_path), cases=len(summaries), channels=summaries[0].channels,
        modalities=dataset.modalities, labels=labels,
        median_shape=tuple(int(v) for v in np.median(shapes, axis=0)),  # type: ignore[arg-type]
        median_spacing=tuple(float(v) for v in median_spacing),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in target),  # type: ignore[arg-type]
        shape_at_spacing=tuple(int(v) for v in at_spacing),  # type: ignore[arg-type]
        class_fraction={labels[c]: float(counts[c] / total) for c in range(len(labels))},
        intensity=intensity, overrides=overrides,
        memory=f"memory budget {budget_bytes / 2**30:.1f} GiB: {report.summary()}",
    )


def _batch_dice(patch: list[int], median_shape: np.ndarray) -> bool:
    """Dice over the whole batch where a patch holds less than a quarter of the median case's
    voxels, per sample otherwise: nnU-Net's rule (below that quarter it also plans a low-resolution
    stage, and uses batch Dice at full resolution)."""
    return float(np.prod(patch, dtype=float)) < BATCH_DICE_SHARE * float(np.prod(median_shape, dtype=float))


def _voxel_statistics(cases: Any, classes: int, channels: int, samples_per_case: int,
                      workers: int = 1) -> tuple[np.ndarray, list[dict[str, float]]]:
    # The files are read in parallel; the foreground samples are drawn here, case by case in
    # order from one generator, so the result does not depend on the number of workers.
    rng = np.random.default_rng(0)
    counts = np.zeros(classes, dtype=np.int64)
    samples: list[list[np.ndarray]] = [[] for _ in range(channels)]
    for case_counts, foreground in map_cases(partial(_case_voxels, classes=classes, channels=channels),
                                             list(cases), workers):
        counts += case_counts
        for c, values in enumerate(foreground):
            if values.size > samples_per_case:
                values = rng.choice(values, samples_per_case, replace=False)
            samples[c].append(values.astype(np.float64))
    intensity = []
    for per_case in samples:
        values = np.concatenate(per_case) if per_case else np.zeros(1)
        low, median, high = np.percentile(values, [0.5, 50, 99.5])
        intensity.append({"p0.5": float(low), "median": float(median), "p99.5": float(high),
                          "mean": float(values.mean()), "std": float(values.std())})
    return counts, intensity


def _case_voxels(case: Any, classes: int, channels: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A case's voxel count per class and its foreground intensities per channel (float32)."""
    label, _ = load_volume(case.label, label=True)
    image, _ = load_volume(list(case.images) if len(case.images) > 1 else case.images[0])
    label = np.asarray(label[0]).astype(np.int64)
    counts = np.bincount(label.ravel(), minlength=classes)[:classes]
    foreground = label > 0
    return counts, [image[c][foreground] for c in range(min(channels, image.shape[0]))]


def _round(values: Any) -> list[float]:
    return [round(float(v), 3) for v in values]
