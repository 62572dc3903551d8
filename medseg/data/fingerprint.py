"""Dataset statistics the preprocessing needs: CT intensity statistics of the foreground."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medseg.config import Config
from medseg.data.cases import Case


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
