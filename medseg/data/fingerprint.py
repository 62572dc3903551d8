"""Dataset statistics and the preprocessing planned from them: target spacing, normalisation,
label names, CT intensity statistics of the foreground, and how far a patch may grow."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from medseg.config import Config
from medseg.data.cases import Case, DatasetInfo, find_dataset, split
from medseg.data.checks import CaseSummary, check_dataset
from medseg.errors import ConfigError, DataError

if TYPE_CHECKING:  # transforms imports MONAI, which `medseg plan` does without
    from medseg.data.transforms import Preprocessing

# One batch covers at most this share of the dataset's voxels, but holds at least MIN_BATCH
# patches (nnU-Net: max_dataset_covered 0.05, UNet_min_batch_size 2).
MAX_DATASET_COVERED, MIN_BATCH = 0.05, 2


def foreground_intensity_statistics(
    cases: Sequence[Case], percentiles: Sequence[float], samples_per_case: int = 10_000, seed: int = 0
) -> dict[str, tuple[float, ...]]:
    """Per-channel clip window (foreground percentiles) and mean/std of the clipped foreground.

    nnU-Net's CT scheme: sample foreground voxels from every training case, so that the statistics
    describe the structures to segment rather than air or the table.
    """
    from medseg.data.transforms import load

    loader = load(("image", "label"))
    rng = np.random.default_rng(seed)
    samples: list[list[np.ndarray]] = []
    for case in cases:
        item = loader[0](case.as_dict())
        image = np.asarray(item["image"])
        mask = np.asarray(item["label"])[0] > 0
        if not samples:
            samples = [[] for _ in range(image.shape[0])]
        for c in range(image.shape[0]):
            values = image[c][mask]
            if values.size > samples_per_case:
                values = rng.choice(values, samples_per_case, replace=False)
            samples[c].append(values.astype(np.float64))
    low, high, mean, std = [], [], [], []
    for per_case in samples:
        values = np.concatenate(per_case) if per_case else np.zeros(1)
        lo, hi = np.percentile(values, percentiles)
        clipped = np.clip(values, lo, hi)
        low.append(float(lo))
        high.append(float(hi))
        mean.append(float(clipped.mean()))
        std.append(float(clipped.std()))
    return {"clip_low": tuple(low), "clip_high": tuple(high), "mean": tuple(mean), "std": tuple(std)}


def network_inputs(cfg: Config) -> tuple[int, int, tuple[float, float, float]]:
    """What the network needs to know about `cfg`'s dataset, from headers only: input channels,
    output classes (with background) and the spacing it will train at (configured, or the median)."""
    from medseg.data.cases import find_dataset
    from medseg.data.io import read_header, spacing_in_ras
    from medseg.errors import DataError

    dataset = find_dataset(cfg.data.dataset)
    first = dataset.cases[0]
    channels = len(first.images) if len(first.images) > 1 else read_header(first.images[0]).channels
    if not dataset.labels:
        raise DataError(f"{dataset.root}: the classes are unknown without a dataset.json 'labels' entry")
    if cfg.data.spacing:
        spacing = tuple(float(v) for v in cfg.data.spacing)
    else:
        spacings = [spacing_in_ras(read_header(case.images[0]).affine) for case in dataset.cases]
        spacing = tuple(float(v) for v in np.median(spacings, axis=0))
    return channels, dataset.num_classes, spacing  # type: ignore[return-value]


@dataclass(frozen=True)
class TrainingCases:
    """A dataset's checked cases and the fold split that `medseg train` trains on."""

    dataset: DatasetInfo
    summaries: dict[str, CaseSummary]  # by case name, every case of the dataset
    train: list[Case]
    validation: list[Case]

    @property
    def train_summaries(self) -> list[CaseSummary]:
        """The summaries of the training cases, in their order."""
        return [self.summaries[case.name] for case in self.train]


def training_cases(cfg: Config, workers: int) -> TrainingCases:
    """Find `cfg`'s dataset, check every case (`workers` processes) and split it into folds.

    Every file is read and checked once before anything is cached: bad data fails here, with one
    line naming the file, not an hour into training. `train`, `plan` and `memory` all start here.
    """
    dataset = find_dataset(cfg.data.dataset)
    summaries = check_dataset(dataset.cases, dataset.labels, len(dataset.modalities) or None, workers=workers)
    train, validation = split(dataset.cases, cfg.data.folds, cfg.data.fold, cfg.data.split_seed)
    return TrainingCases(dataset, {s.name: s for s in summaries}, train, validation)


def plan_preprocessing(cfg: Config, dataset: DatasetInfo, summaries: list[CaseSummary],
                       train_cases: list[Case]) -> Preprocessing:
    """Preprocessing parameters from the config and the checked training cases."""
    from medseg.data.transforms import Preprocessing

    labels = label_names(dataset, summaries)
    normalization = normalization_for(cfg, dataset)
    prep = Preprocessing(spacing=target_spacing(cfg, summaries), normalization=normalization,
                         channels=summaries[0].channels, num_classes=max(labels) + 1,
                         crop_foreground=cfg.data.crop_foreground, labels=labels)
    if normalization == "ct":
        prep = replace(prep, **foreground_intensity_statistics(train_cases, cfg.data.ct_percentiles))
    return prep


def target_spacing(cfg: Config, summaries: Sequence[CaseSummary]) -> tuple[float, float, float]:
    """The spacing (mm, RAS order) the network trains at: `data.spacing`, else the median of the cases."""
    if cfg.data.spacing:
        spacing = tuple(float(v) for v in cfg.data.spacing)
    else:
        spacing = tuple(float(v) for v in np.median([s.spacing_ras for s in summaries], axis=0))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"'data.spacing' must be three positive numbers, got {list(spacing)}")
    return spacing  # type: ignore[return-value]


def normalization_for(cfg: Config, dataset: DatasetInfo) -> str:
    """`data.normalization`, with auto resolved by modality: ct for CT, zscore otherwise."""
    if cfg.data.normalization != "auto":
        return cfg.data.normalization
    return "ct" if any(m.upper() == "CT" for m in dataset.modalities) else "zscore"


def label_names(dataset: DatasetInfo, summaries: Sequence[CaseSummary]) -> dict[int, str]:
    """Label value -> name: dataset.json's, else the values found in the label files (class_N)."""
    if dataset.labels:
        return dict(dataset.labels)
    highest = max(max(s.label_values, default=0) for s in summaries)
    if highest < 1:
        raise DataError(f"{dataset.root}: the label files hold no foreground")
    return {v: ("background" if v == 0 else f"class_{v}") for v in range(highest + 1)}


def growth_limits(summaries: Sequence[CaseSummary], spacing: Sequence[float]) -> tuple[list[int], int]:
    """How far a memory fit should grow the patch and the batch for these cases at `spacing`.

    The patch: the median case's extent in voxels at that spacing, rounded up to the network's
    divisibility (a larger patch would be mostly padding). The batch: nnU-Net's cap, one batch
    of that patch covers at most 5 % of the dataset's voxels (more would see the same data too
    often per step), rounded to the nearest batch size, but never fewer than 2. As nnU-Net
    (get_plans_for_configuration), the dataset's voxels are approximated by the median case's
    (each case's shape at `spacing` rounded, then the median per axis) times the number of cases.
    """
    target = np.asarray(spacing, dtype=float)
    spacings = np.array([s.spacing_ras for s in summaries])
    shapes = np.array([shape_in_ras(s.shape, s.affine) for s in summaries])
    at_spacing = np.median(shapes * spacings / target, axis=0).round().astype(int)
    patch = _divisible_patch(at_spacing)
    median_voxels = float(np.prod(np.median(np.round(shapes * spacings / target), axis=0), dtype=np.float64))
    covered = MAX_DATASET_COVERED * median_voxels * len(summaries) / float(np.prod(patch, dtype=np.float64))
    return patch, max(MIN_BATCH, round(covered))


def _divisible_patch(shape: np.ndarray, max_downsamplings: int = 5, min_feature_size: int = 4) -> list[int]:
    # Each axis is halved k times while it stays at least `min_feature_size` voxels (nnU-Net's
    # rule); the median shape is rounded up to a multiple of 2**k, so the patch covers the median
    # case (padded where smaller) and the network's strides divide it.
    patch = []
    for size in shape:
        k = int(np.clip(np.floor(np.log2(max(size, 1) / min_feature_size)), 1, max_downsamplings))
        patch.append(int(np.ceil(size / 2**k) * 2**k))
    return patch


def shape_in_ras(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    import nibabel as nib

    order = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    result = [0, 0, 0]
    for axis, target in enumerate(order):
        result[target] = shape[axis]
    return tuple(result)  # type: ignore[return-value]
