"""MONAI dictionary transforms for training, validation and inference.

`preprocessing()` is deterministic and cached: load, channel-first, RAS orientation, foreground
crop, resampling to the target spacing, intensity normalisation. `training_augmentation()` is the
random part applied to cached volumes every time a patch is drawn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai import transforms as T
from monai.config import KeysCollection
from monai.utils import MAX_SEED
from scipy import ndimage

from medseg.data.readers import readers


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


class RandIsotropicScaled(T.RandomizableTransform, T.MapTransform):
    """With probability `prob`, scale every key about the patch centre by one factor for all axes,
    drawn uniformly from `scale_range`, in RandAffine's sense: a factor above 1 samples a larger
    region into the patch, so structures look smaller (nnU-Net's convention). Outside is zero."""

    def __init__(self, keys: KeysCollection, prob: float, scale_range: tuple[float, float],
                 modes: tuple[str, ...]) -> None:
        T.MapTransform.__init__(self, keys)
        T.RandomizableTransform.__init__(self, prob)
        self.scale_range, self.modes = scale_range, modes
        self.factor = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.factor = float(self.R.uniform(*self.scale_range))

    def __call__(self, data: dict) -> dict:
        self.randomize()
        if not self._do_transform:
            return data
        d = dict(data)
        for key, mode in zip(self.keys, self.modes):
            spatial = d[key].ndim - 1
            d[key] = T.Affine(scale_params=(self.factor,) * spatial, mode=mode, padding_mode="zeros",
                              image_only=True)(d[key])
        return d


class RandChannelwised(T.RandomizableTransform, T.MapTransform):
    """nnU-Net's per-channel augmentation (a RandomTransform around a transform with
    p_per_channel): with probability `prob` per sample, each channel of every key independently,
    with probability `channel_prob`, goes through `transform`, a randomizable array transform that
    draws its own parameters for every channel it changes (give it prob=1)."""

    def __init__(self, keys: KeysCollection, transform: T.RandomizableTransform, prob: float,
                 channel_prob: float) -> None:
        T.MapTransform.__init__(self, keys)
        T.RandomizableTransform.__init__(self, prob)
        self.transform, self.channel_prob = transform, channel_prob

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> "RandChannelwised":
        super().set_random_state(seed, state)
        # The inner transform draws from its own state, seeded from this one (not with the same seed).
        self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        return self

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = [torch.as_tensor(self.transform(image[c:c + 1])) if self.R.rand() < self.channel_prob
                        else image[c:c + 1] for c in range(image.shape[0])]
            d[key] = torch.cat(channels)
        return d


class RandGaussianBlur(T.RandomizableTransform):
    """nnU-Net's Gaussian blur (batchgeneratorsv2 GaussianBlurTransform) of an array: with
    probability `prob`, a sigma per axis drawn uniformly from `sigma_range`, separable kernels of
    the Gaussian sampled at integer offsets (`blur_kernel`), the border reflected (torch's
    'reflect', scipy's 'mirror')."""

    def __init__(self, prob: float, sigma_range: tuple[float, float]) -> None:
        T.RandomizableTransform.__init__(self, prob)
        self.sigma_range = sigma_range
        self.sigmas = [1.0, 1.0, 1.0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.sigmas = [float(self.R.uniform(*self.sigma_range)) for _ in range(3)]

    def __call__(self, img: Any, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        array = np.asarray(torch.as_tensor(img).detach().cpu(), dtype=np.float32)
        for axis, sigma in enumerate(self.sigmas[:array.ndim - 1]):
            array = ndimage.correlate1d(array, blur_kernel(sigma), axis=1 + axis, mode="mirror")
        return torch.as_tensor(array)


def blur_kernel(sigma: float) -> np.ndarray:
    """nnU-Net's blur kernel (batchgeneratorsv2 _build_kernel, truncate 6): sigma * 6 + 0.5 rounded
    to the nearest odd number of taps, the Gaussian sampled at their integer offsets from the
    centre, normalised to sum 1."""
    n = sigma * 6 + 0.5
    size = round(n)
    if size % 2 == 0:
        size = size + 1 if n - size >= 0 else size - 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    pdf = np.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


class RandGammad(T.RandAdjustContrast):
    """MONAI's RandAdjustContrast with nnU-Net's gamma sampling (batchgeneratorsv2 BGContrast): with
    probability 0.5 uniform between the lower bound and 1, otherwise between 1 and the upper bound
    (so gamma below 1 as often as above, whatever the range's lengths)."""

    def randomize(self, data: Any = None) -> None:
        T.RandomizableTransform.randomize(self, None)
        if not self._do_transform:
            return
        self.gamma_value = bg_between(float(self.R.rand()), float(self.R.rand()), self.gamma)


def bg_between(half: float, u: float, bounds: tuple[float, float]) -> float:
    """batchgeneratorsv2's BGContrast sampling from two uniform numbers in [0, 1): with probability
    0.5 (`half` < 0.5) between the lower bound and 1, otherwise between 1 and the upper bound."""
    low, high = bounds
    if half < 0.5 and low < 1:
        return low + (1.0 - low) * u
    low = max(low, 1.0)
    return low + (high - low) * u


def load(keys: tuple[str, ...] = ("image", "label"), series_uid: str | None = None) -> list:
    """Read files into channel-first MetaTensors in RAS orientation (no resampling)."""
    return [
        T.LoadImaged(keys, reader=readers(series_uid), image_only=True, ensure_channel_first=True,
                     allow_missing_keys=True),
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


def patch_sampling(p: Preprocessing, patch_size: list[int], max_per_class: int = 20_000) -> T.Compose:
    """Deterministic preparation for patch sampling, cached with the preprocessed volume: pad to at
    least the patch size, then list voxel indices per class (a bounded random subset of each) so
    that drawing a foreground-centred patch costs nothing per step."""
    return T.Compose([
        T.SpatialPadd(("image", "label"), spatial_size=patch_size),
        T.ClassesToIndicesd("label", num_classes=p.num_classes, max_samples_per_class=max_per_class),
    ])


def training_augmentation(p: Preprocessing, patch_size: list[int], foreground_fraction: float,
                          augment: bool = True) -> T.Compose:
    """Random patch sampling (foreground-balanced) and spatial/intensity augmentation, applied to
    volumes prepared by `preprocessing` and `patch_sampling`.

    Defaults follow nnU-Net's: rotations up to 30 degrees and scaling 0.7-1.4 (the same along every
    axis), each with probability 0.2, mirroring on every axis, Gaussian noise and blur, brightness,
    contrast, simulated low resolution, and gamma changes of the image and of its inverse that keep
    its mean and standard deviation. Blur, low resolution and gamma act on each channel with its
    own parameters, as nnU-Net's.
    """
    keys = ("image", "label")
    foreground_classes = max(p.num_classes - 1, 1)
    ratios = [1.0 - foreground_fraction] + [foreground_fraction / foreground_classes] * foreground_classes
    steps: list = [
        T.EnsureTyped("label", dtype=torch.float32, track_meta=False),
        T.EnsureTyped("image", track_meta=False),
        T.RandCropByLabelClassesd(
            keys, label_key="label", spatial_size=patch_size, ratios=ratios,
            num_classes=p.num_classes, num_samples=1, indices_key="label_cls_indices", warn=False,
        ),
    ]
    if augment:
        rotation = math.pi / 6
        steps += [
            # Rotation and scaling drawn independently, one scale factor for all axes (nnU-Net's).
            # The label takes the nearest voxel's class here; nnU-Net (and DevicePatchSampler)
            # interpolate each class's indicator and take the largest, which in these CPU workers
            # would cost a float patch per class for every rotated or scaled sample.
            T.RandRotated(keys, range_x=rotation, range_y=rotation, range_z=rotation, prob=0.2,
                          mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True),
            RandIsotropicScaled(keys, prob=0.2, scale_range=(0.7, 1.4), modes=("bilinear", "nearest")),
            T.RandGaussianNoised("image", prob=0.1, std=0.1),
            # nnU-Net: probability 0.2 per sample, then each channel with probability 0.5.
            RandChannelwised("image", RandGaussianBlur(1.0, (0.5, 1.0)), prob=0.2, channel_prob=0.5),
            T.RandScaleIntensityd("image", prob=0.15, factors=0.25),
            T.RandScaleIntensityFixedMeand("image", prob=0.15, factors=0.25, preserve_range=True),
            # nnU-Net: probability 0.25 per sample, then each channel with probability 0.5; down by
            # 'nearest-exact' ('nearest' would move the image against the label), up trilinearly.
            RandChannelwised("image", T.RandSimulateLowResolution(prob=1.0, downsample_mode="nearest-exact",
                                                                  zoom_range=(0.5, 1.0)),
                             prob=0.25, channel_prob=0.5),
            # nnU-Net's two gamma transforms, each channel with its own gamma (below 1 as often as
            # above), keeping the channel's mean and standard deviation.
            RandChannelwised("image", RandGammad(prob=1.0, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
                             prob=0.1, channel_prob=1.0),
            RandChannelwised("image", RandGammad(prob=1.0, gamma=(0.7, 1.5), retain_stats=True),
                             prob=0.3, channel_prob=1.0),
            T.RandFlipd(keys, prob=0.5, spatial_axis=0),
            T.RandFlipd(keys, prob=0.5, spatial_axis=1),
            T.RandFlipd(keys, prob=0.5, spatial_axis=2),
        ]
    steps.append(T.SelectItemsd(keys))
    return T.Compose(steps)


def _nonzero(image: Any) -> Any:
    # Module-level (not a lambda) so the transform pickles into data-loading workers.
    return image != 0
