"""A dataset's fingerprint and the preprocessing planned from it: one home for each rule.

`medseg plan`, `medseg train` and `medseg memory` all take their target spacing, label names,
normalisation and foreground intensity statistics from the functions here, so they agree exactly.

Over which cases: the fingerprint is the whole dataset's, every case `find_dataset` finds (as
nnU-Net fingerprints all of imagesTr), not the training cases of one fold. The preprocessing then
does not depend on the fold: every fold of a cross-validation trains at the same spacing with the
same CT statistics (so their models can be ensembled), `medseg plan` (which knows no fold) writes
the spacing that `medseg train` with `data.spacing: null` computes, and a label value found only in
a validation case still gets its class.

This module imports no MONAI (`medseg plan` does without it): volumes are read through
:mod:`medseg.data.io`, and :class:`~medseg.data.transforms.Preprocessing` is imported where it is
built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Sequence

import numpy as np

from medseg.config import Config
from medseg.data.cases import Case, DatasetInfo, class_name, find_dataset, split
from medseg.data.checks import CaseSummary, DatasetCheckError, check_dataset
from medseg.data.io import MAX_VOXELS, load_volume, map_cases
from medseg.errors import ConfigError, DataError

if TYPE_CHECKING:  # transforms imports MONAI, which `medseg plan` does without
    from medseg.data.transforms import Preprocessing

# One batch covers at most this share of the dataset's voxels, but holds at least MIN_BATCH
# patches (nnU-Net: max_dataset_covered 0.05, UNet_min_batch_size 2).
MAX_DATASET_COVERED, MIN_BATCH = 0.05, 2
# An axis counts as coarse when its median spacing exceeds the finest by this factor (nnU-Net: 3).
ANISOTROPY = 3.0
# Foreground voxels sampled per case and channel for the intensity statistics (nnU-Net: 10,000).
SAMPLES_PER_CASE = 10_000


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

    @property
    def dataset_summaries(self) -> list[CaseSummary]:
        """The summaries of every case, in the dataset's order: what the fingerprint is computed over."""
        return [self.summaries[case.name] for case in self.dataset.cases]


def training_cases(cfg: Config, workers: int) -> TrainingCases:
    """Find `cfg`'s dataset, check every case (`workers` processes) and split it into folds.

    Every file is read and checked once before anything is cached: bad data fails here, with one
    line naming the file, not an hour into training. `train` and `memory` start here; `plan`
    checks the same way but splits nothing (it knows no fold).
    """
    dataset = find_dataset(cfg.data.dataset)
    summaries = check_dataset(dataset.cases, dataset.labels, len(dataset.modalities) or None, workers=workers)
    train, validation = split(dataset.cases, cfg.data.folds, cfg.data.fold, cfg.data.split_seed)
    return TrainingCases(dataset, {s.name: s for s in summaries}, train, validation)


def plan_preprocessing(cfg: Config, cases: TrainingCases, workers: int = 1) -> Preprocessing:
    """The preprocessing `medseg train` runs: the config's settings and the dataset's fingerprint.

    Spacing, label names and CT statistics come from every case of the dataset (see the module
    docstring), whatever the fold; `workers` processes read the volumes for the CT statistics.
    """
    from medseg.data.transforms import Preprocessing

    summaries = cases.dataset_summaries
    labels = label_names(cases.dataset, summaries)
    normalization = normalization_for(cfg, cases.dataset)
    prep = Preprocessing(spacing=target_spacing(cfg, summaries), normalization=normalization,
                         channels=summaries[0].channels, num_classes=max(labels) + 1,
                         crop_foreground=cfg.data.crop_foreground, labels=labels)
    if normalization == "ct":
        sample = sample_foreground(cases.dataset.cases, prep.channels, prep.num_classes, workers=workers)
        prep = replace(prep, **ct_statistics(sample, cfg.data.ct_percentiles))
    return prep


def target_spacing(cfg: Config, summaries: Sequence[CaseSummary]) -> tuple[float, float, float]:
    """The spacing (mm, RAS order) the network trains at: `data.spacing`, else :func:`spacing_rule`
    over `summaries` (every case of the dataset, for `plan` and `train` alike)."""
    if cfg.data.spacing:
        spacing = tuple(float(v) for v in cfg.data.spacing)
    else:
        spacing = spacing_rule([s.spacing_ras for s in summaries])
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ConfigError(f"'data.spacing' must be three positive numbers, got {list(spacing)}")
    check_resampled_sizes(summaries, spacing)
    return spacing  # type: ignore[return-value]


def check_resampled_sizes(summaries: Sequence[CaseSummary], spacing: Sequence[float]) -> None:
    """Refuse, from the headers alone, cases that would hold more than
    :data:`medseg.data.io.MAX_VOXELS` voxels (all channels) once resampled to `spacing`: a 600 mm
    voxel in one header, or a `data.spacing` far finer than the data, would otherwise ask
    preprocessing for terabytes.

    Raises:
        DatasetCheckError: one line per such case, naming its file and both shapes.
    """
    target = np.asarray(spacing, dtype=np.float64)
    problems = []
    for summary in summaries:
        shape = np.asarray(shape_in_ras(summary.shape, summary.affine), dtype=np.float64)
        resampled = np.maximum(np.round(shape * np.asarray(summary.spacing_ras) / target), 1)
        voxels = float(np.prod(resampled)) * summary.channels
        if voxels > MAX_VOXELS:
            problems.append(
                f"case '{summary.name}': {_shape(shape)} voxels of {_shape(summary.spacing_ras, '.4g')} mm "
                f"become {_shape(resampled)} at the target spacing {_shape(target, '.4g')} mm, "
                f"{voxels:,.0f} voxels, more than medseg preprocesses per case ({MAX_VOXELS:,}); "
                f"check the header's spacing or data.spacing")
    if problems:
        raise DatasetCheckError(problems, total=len(summaries))


def _shape(values: Sequence[float], form: str = ".0f") -> str:
    return "×".join(format(float(v), form) for v in values)


def spacing_rule(spacings: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """The target spacing (mm, RAS order) for cases of these spacings (one row per case).

    nnU-Net's rule: the median spacing per axis; where the coarsest axis of that median exceeds
    :data:`ANISOTROPY` times the finest, that axis takes the 10th percentile of the cases' spacings
    instead, since resampling every case to the median slice thickness would blur the thin-slice
    cases.
    """
    values = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    target = np.median(values, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] > ANISOTROPY * target.min():
        target[coarse] = np.percentile(values[:, coarse], 10)
    return tuple(float(v) for v in target)  # type: ignore[return-value]


def normalization_for(cfg: Config, dataset: DatasetInfo) -> str:
    """`data.normalization`, with auto resolved by modality: ct for CT, zscore otherwise."""
    if cfg.data.normalization != "auto":
        return cfg.data.normalization
    return "ct" if any(m.upper() == "CT" for m in dataset.modalities) else "zscore"


def label_names(dataset: DatasetInfo, summaries: Sequence[CaseSummary]) -> dict[int, str]:
    """Label value -> name: dataset.json's, else every value up to the highest found in the label
    files, named by :func:`medseg.data.cases.class_name`."""
    if dataset.labels:
        return dict(dataset.labels)
    highest = max(max(s.label_values, default=0) for s in summaries)
    if highest < 1:
        raise DataError(f"{dataset.root}: the label files hold no foreground")
    return {v: class_name(v) for v in range(highest + 1)}


@dataclass(frozen=True)
class ForegroundSample:
    """Intensities sampled from the foreground (label > 0) of a dataset's cases.

    Attributes:
        intensities: per channel, the sampled values of every case together (float64).
        class_voxels: the voxel count of each label value 0..classes-1 over all cases (not sampled).
    """

    intensities: tuple[np.ndarray, ...]
    class_voxels: np.ndarray


def sample_foreground(cases: Sequence[Case], channels: int, classes: int,
                      samples_per_case: int = SAMPLES_PER_CASE, seed: int = 0,
                      workers: int = 1) -> ForegroundSample:
    """Sample each case's foreground intensities per channel: the one sampler behind the
    intensities `medseg plan` prints and the CT normalisation `medseg train` uses.

    Up to `samples_per_case` voxels per case and channel, drawn without replacement (all of them
    in a smaller foreground), so that large cases do not dominate. `workers` processes read the
    files; the draws happen here, case by case in order from one generator seeded by `seed`, so the
    sample does not depend on the number of workers. Cases without a label are skipped.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros(classes, dtype=np.int64)
    samples: list[list[np.ndarray]] = [[] for _ in range(channels)]
    labelled = [case for case in cases if case.label is not None]
    for case_counts, foreground in map_cases(partial(_case_foreground, classes=classes, channels=channels),
                                             labelled, workers):
        counts += case_counts
        for channel, values in enumerate(foreground):
            if values.size > samples_per_case:
                values = rng.choice(values, samples_per_case, replace=False)
            samples[channel].append(values.astype(np.float64))
    intensities = tuple(np.concatenate(per_case) if per_case else np.zeros(0) for per_case in samples)
    return ForegroundSample(intensities, counts)


def intensity_summary(sample: ForegroundSample) -> list[dict[str, float]]:
    """Per channel: the 0.5th, 50th and 99.5th percentiles, mean and std of the sampled foreground."""
    summary = []
    for values in sample.intensities:
        values = values if values.size else np.zeros(1)
        low, median, high = np.percentile(values, [0.5, 50, 99.5])
        summary.append({"p0.5": float(low), "median": float(median), "p99.5": float(high),
                        "mean": float(values.mean()), "std": float(values.std())})
    return summary


def ct_statistics(sample: ForegroundSample, percentiles: Sequence[float]) -> dict[str, tuple[float, ...]]:
    """nnU-Net's CT normalisation from the sampled foreground, per channel: the clip window
    (`percentiles` of the foreground) and the mean and std of the foreground clipped to it.

    The foreground describes the structures to segment rather than air or the table; the keys are
    those of :class:`~medseg.data.transforms.Preprocessing` (clip_low, clip_high, mean, std).
    """
    low, high, mean, std = [], [], [], []
    for values in sample.intensities:
        values = values if values.size else np.zeros(1)
        lo, hi = np.percentile(values, percentiles)
        clipped = np.clip(values, lo, hi)
        low.append(float(lo))
        high.append(float(hi))
        mean.append(float(clipped.mean()))
        std.append(float(clipped.std()))
    return {"clip_low": tuple(low), "clip_high": tuple(high), "mean": tuple(mean), "std": tuple(std)}


def _case_foreground(case: Case, classes: int, channels: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A case's voxel count per label value and its foreground intensities per channel (float32)."""
    label, _ = load_volume(case.label, label=True)  # type: ignore[arg-type]
    image, _ = load_volume(list(case.images) if len(case.images) > 1 else case.images[0])
    label = np.asarray(label[0]).astype(np.int64)
    counts = np.bincount(label.ravel(), minlength=classes)[:classes]
    foreground = label > 0
    return counts, [image[c][foreground] for c in range(min(channels, image.shape[0]))]


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
    patch = divisible_patch(at_spacing)
    median_voxels = float(np.prod(np.median(np.round(shapes * spacings / target), axis=0), dtype=np.float64))
    covered = MAX_DATASET_COVERED * median_voxels * len(summaries) / float(np.prod(patch, dtype=np.float64))
    return patch, max(MIN_BATCH, round(covered))


def divisible_patch(shape: Sequence[int], max_downsamplings: int = 5, min_feature_size: int = 4) -> list[int]:
    """`shape` rounded up, per axis, to what the network's strides divide.

    Each axis is halved k times while it stays at least `min_feature_size` voxels (nnU-Net's rule,
    at most `max_downsamplings` times); the size is rounded up to a multiple of 2**k, so the patch
    covers the median case (padded where smaller).
    """
    patch = []
    for size in shape:
        k = int(np.clip(np.floor(np.log2(max(size, 1) / min_feature_size)), 1, max_downsamplings))
        patch.append(int(np.ceil(size / 2**k) * 2**k))
    return patch


def shape_in_ras(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    """A volume's spatial shape in the axis order it has after reorientation to RAS."""
    import nibabel as nib

    order = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    result = [0, 0, 0]
    for axis, target in enumerate(order):
        result[target] = shape[axis]
    return tuple(result)  # type: ignore[return-value]
