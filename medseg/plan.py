"""`medseg plan`: a dataset fingerprint turned into a training configuration by rules.

The rules follow nnU-Net's (well tested) defaults: median spacing (for strongly anisotropic data
the coarse axis takes its 10th percentile instead), normalisation by modality, a patch from the
median shape at that spacing rounded to the network's divisibility, and batch size and
checkpointing from a GPU memory budget through medseg's own memory estimator. Each rule lives in
:mod:`medseg.data.fingerprint`, which `medseg train` uses too: the spacing written here is the one
train computes for the same dataset without `data.spacing`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from medseg import config
from medseg.data.cases import DatasetInfo, find_dataset
from medseg.data.checks import CaseSummary, check_dataset
from medseg.data.fingerprint import (SAMPLES_PER_CASE, growth_limits, intensity_summary, label_names,
                                     normalization_for, sample_foreground, shape_in_ras, target_spacing)
from medseg.data.io import usable_cpus

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
    warnings: list[str] = field(default_factory=list)  # what would surprise later (plan_warnings)

    def to_yaml(self) -> str:
        """The config overrides file `medseg train` takes, with the fingerprint as comments."""
        header = [
            f"# Planned by medseg plan for {self.dataset}: {self.cases} cases, {self.channels} channel(s)"
            f" ({', '.join(self.modalities) or 'unknown modality'}), classes {self.labels}.",
            f"# Median shape {list(self.median_shape)} at spacing {_round(self.median_spacing)} mm;"
            f" at the target spacing {list(self.shape_at_spacing)}.",
            f"# {self.memory}",
            *[f"# warning: {text}" for text in self.warnings],
        ]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.overrides, sort_keys=False)


def plan(dataset_path: Path, budget_bytes: int, workers: int | None = None,
         samples_per_case: int = SAMPLES_PER_CASE, modality: str | None = None) -> Plan:
    """Fingerprint the dataset (checking every case on the way) and derive a configuration.

    The spacing, labels, normalisation and intensities come from :mod:`medseg.data.fingerprint`,
    over every case, exactly as `medseg train` computes them. `workers`: processes reading the
    files (None: every usable core). `modality` (CT, MR, ...) is every channel's, in place of
    dataset.json's; it chooses the normalisation (CT: clipped to foreground percentiles, then
    z-scored with foreground statistics; anything else: z-scored per image)."""
    from medseg import memory

    workers = usable_cpus() if workers is None else workers
    dataset = find_dataset(dataset_path)
    summaries = check_dataset(dataset.cases, dataset.labels, len(dataset.modalities) or None, workers=workers)
    found = dataset.modalities
    if modality is not None:
        dataset = replace(dataset, modalities=(modality.strip(),) * summaries[0].channels)
    base = config.load(None, [f"data.dataset={dataset_path}"])
    # The defaults leave data.spacing null and normalization auto: the rules decide, as in train.
    # The spacing is written unrounded (YAML keeps a float exactly), so train runs at the same one.
    target = target_spacing(base, summaries)
    spacings = np.array([s.spacing_ras for s in summaries])
    shapes = np.array([shape_in_ras(s.shape, s.affine) for s in summaries])
    at_spacing = np.median(shapes * spacings / np.asarray(target), axis=0).round().astype(int)

    labels = label_names(dataset, summaries)
    channels = summaries[0].channels
    sample = sample_foreground(dataset.cases, channels, max(labels) + 1, samples_per_case, workers=workers)
    patch, largest = growth_limits(summaries, target)
    cfg = base.replace(train={"patch_size": patch, "batch_size": 2})
    # The whole run within the budget: every case stands in for the training and the validation volumes.
    data = memory.run_data(summaries, summaries, target, channels)
    chosen, report = memory.fit(cfg, channels, len(labels), target, budget_bytes, data=data, max_patch=patch,
                                max_batch=largest)
    overrides = {
        "data": {"dataset": str(dataset_path), "spacing": list(target),
                 "normalization": normalization_for(base, dataset)},
        "model": {"checkpointing": chosen.model.checkpointing},
        "train": {"patch_size": list(chosen.train.patch_size), "batch_size": chosen.train.batch_size,
                  "batch_dice": uses_batch_dice(chosen.train.patch_size, at_spacing)},
    }
    total = sample.class_voxels.sum()
    return Plan(
        dataset=str(dataset_path), cases=len(summaries), channels=channels,
        modalities=dataset.modalities, labels=labels,
        median_shape=tuple(int(v) for v in np.median(shapes, axis=0)),  # type: ignore[arg-type]
        median_spacing=tuple(float(v) for v in np.median(spacings, axis=0)),  # type: ignore[arg-type]
        spacing=target,
        shape_at_spacing=tuple(int(v) for v in at_spacing),  # type: ignore[arg-type]
        class_fraction={labels[c]: float(sample.class_voxels[c] / total) for c in sorted(labels)},
        intensity=intensity_summary(sample), overrides=overrides,
        memory=f"memory budget {budget_bytes / 2**30:.1f} GiB: {report.summary()}",
        warnings=plan_warnings(dataset, summaries, base, found),
    )


def plan_warnings(dataset: DatasetInfo, summaries: Sequence[CaseSummary], cfg: config.Config,
                  found_modalities: Sequence[str]) -> list[str]:
    """What `medseg plan` warns about because it would surprise later: declared classes that no
    label holds, fewer cases than folds, an unknown modality (normalised by z-score), and folders
    of the dataset that no case uses."""
    notes = []
    present = {v for s in summaries for v in s.label_values}
    absent = [name for value, name in sorted(dataset.labels.items()) if value > 0 and value not in present]
    if absent:
        declared = sum(1 for value in dataset.labels if value > 0)
        notes.append(f"{len(absent)} of the {declared} classes dataset.json declares occur in no label file "
                     f"({', '.join(absent)}): the network learns nothing about them")
    folds = cfg.data.folds
    if len(summaries) < folds:
        notes.append(f"{len(summaries)} cases are fewer than data.folds={folds}: set data.folds to at most "
                     f"{len(summaries)}, or data.fold=-1 to train on every case without validation")
    if not dataset.modalities:
        notes.append("the modality is unknown (no dataset.json): each image is z-scored; for CT give "
                     "--modality CT (clipped to the foreground's intensity percentiles first)")
    elif found_modalities and tuple(found_modalities) != tuple(dataset.modalities):
        notes.append(f"--modality {dataset.modalities[0]} replaces dataset.json's {', '.join(found_modalities)}")
    ignored = unused_folders(dataset)
    if ignored:
        notes.append(f"ignored (no case uses them): {', '.join(f'{name}/' for name in ignored)}")
    return notes


def unused_folders(dataset: DatasetInfo) -> list[str]:
    """The dataset's sub-folders no case reads from (a masks/ folder, say); imagesTs/, which holds
    images for inference, and hidden folders are not counted."""
    paths = [Path(os.path.abspath(p)) for case in dataset.cases for p in (*case.images, case.label) if p is not None]
    used = set(paths) | {path.parent for path in paths}
    root = Path(os.path.abspath(dataset.root))
    return sorted(entry.name for entry in root.iterdir()
                  if entry.is_dir() and entry not in used and entry.name != "imagesTs"
                  and not entry.name.startswith("."))


def uses_batch_dice(patch: list[int], median_shape: np.ndarray) -> bool:
    """Dice over the whole batch where a patch holds less than a quarter of the median case's
    voxels, per sample otherwise: nnU-Net's rule (below that quarter it also plans a low-resolution
    stage, and uses batch Dice at full resolution)."""
    return float(np.prod(patch, dtype=float)) < BATCH_DICE_SHARE * float(np.prod(median_shape, dtype=float))


def _round(values: Any) -> list[float]:
    return [round(float(v), 3) for v in values]
