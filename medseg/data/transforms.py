"""MONAI dictionary transforms for training, validation and inference: the deterministic part.

`preprocessing()` is cached: load, channel-first, RAS orientation, foreground crop, resampling to
the target spacing, intensity normalisation. Patches are drawn from its output, and augmented, by
`medseg.data.device_sampler` with the recipe of `medseg.data.augmentation`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai import transforms as T
from monai.config import KeysCollection

from medseg.data.readers import readers

# What every volume is loaded as (LoadImaged's default), images and labels alike.
LOADED_DTYPE = np.float32


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a raw volume into network input; stored in every checkpoint."""

    spacing: tuple[float, float, float]
    normalization: str  # "ct" | "zscore" | "none"
    channels: int
    num_classes: int
    crop_foreground: bool = True
    # CT only, one entry per channel: clip window and z-score statistics of the training foreground.
    clip_low: tuple[float, ...] = ()
    clip_high: tuple[float, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    labels: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with weights_only=True."""
        values = asdict(self)
        values["labels"] = {str(k): v for k, v in self.labels.items()}
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        """Inverse of `to_dict`."""
        values = dict(values)
        values["labels"] = {int(k): v for k, v in values.get("labels", {}).items()}
        for key in ("spacing", "clip_low", "clip_high", "mean", "std"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


class ClipAndStandardized(T.MapTransform):
    """CT normalisation with dataset statistics: clip each channel to a fixed window, then z-score."""

    def __init__(self, keys: KeysCollection, low: tuple[float, ...], high: tuple[float, ...],
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(keys)
        self.low, self.high, self.mean, self.std = low, high, mean, std

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            for c in range(image.shape[0]):
                image[c] = (image[c].clamp(self.low[c], self.high[c]) - self.mean[c]) / max(self.std[c], 1e-8)
            d[key] = image
        return d


def load(keys: tuple[str, ...] = ("image", "label"), series_uid: str | None = None) -> list:
    """Read files into channel-first MetaTensors in RAS orientation (no resampling)."""
    import logging
    import warnings

    # With pydicom installed (highdicom, for DICOM SEG output), LoadImaged builds MONAI's optional
    # nvImageCodec DICOM reader, which warns on every construction that nvImageCodec is missing;
    # medseg reads DICOM through its own readers, so that warning says nothing to the user.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        # The readers cast to LoadImaged's dtype while they reorder the voxels into C order, the one
        # copy of reading (medseg.data.readers); LoadImaged then has nothing left to convert.
        loader = T.LoadImaged(keys, reader=readers(series_uid, dtype=LOADED_DTYPE), dtype=LOADED_DTYPE,
                              image_only=True, ensure_channel_first=True, allow_missing_keys=True)
    return [
        loader,
        T.Orientationd(keys, axcodes="RAS", labels=None, allow_missing_keys=True),
    ]


def preprocessing(p: Preprocessing, with_label: bool = True, series_uid: str | None = None) -> T.Compose:
    """Deterministic chain from files to normalised tensors at the target spacing.

    Every spatial step records itself on the MetaTensor, so `T.Invertd` can map a prediction back
    onto the input's original grid.
    """
    keys = ("image", "label") if with_label else ("image",)
    steps = load(keys, series_uid)
    if p.crop_foreground:
        # Crop to the image's non-zero box before resampling: less work, and the zero background
        # of skull-stripped or cropped MRI carries no information.
        steps.append(T.CropForegroundd(keys, source_key="image", select_fn=_nonzero, allow_smaller=True))
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps.append(T.Spacingd(keys, pixdim=p.spacing, mode=modes, dtype=np.float32))
    if p.normalization == "zscore":
        steps.append(T.NormalizeIntensityd("image", nonzero=True, channel_wise=True))
    elif p.normalization == "ct":
        steps.append(ClipAndStandardized("image", p.clip_low, p.clip_high, p.mean, p.std))
    steps.append(T.EnsureTyped("image", dtype=torch.float32, track_meta=True))
    if with_label:
        # Labels are cached as uint8: a quarter of float32's memory for large volumes.
        steps.append(T.EnsureTyped("label", dtype=torch.uint8, track_meta=True))
    return T.Compose(steps)


def _nonzero(image: Any) -> Any:
    # Module-level (not a lambda) so the transform pickles into data-loading workers. An image
    # without a non-zero voxel keeps its whole extent: an empty crop cannot be resampled.
    mask = image != 0
    return mask if mask.any() else mask | True
