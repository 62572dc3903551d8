"""nnU-Net's augmentation recipe, once for every sampler and device.

The recipe's settings are the `augment:` section of the configuration (`AugmentConfig`). As in
TorchIO's random/fixed transform pairs, drawing and applying are apart:

- `draw_sample` turns a sample's uniform numbers into its parameters (`SampleAugmentation`: the
  geometry as a matrix, then noise, blur, brightness, contrast, low resolution and gammas), in
  plain Python on the host, so the parameters do not depend on the device;
- `blur`, `contrast`, `low_resolution`, `gamma` and `apply_intensity` are batched torch maths that
  run wherever the batch is (the training GPU, or the CPU in DataLoader workers).

`medseg.data.device_sampler.DevicePatchSampler` applies the geometry while it samples the patch
from its volume (one `grid_sample` per sample) and the intensity changes through `apply_intensity`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import AugmentConfig
from medseg.errors import ConfigError

Matrix = list[list[float]]
IDENTITY: Matrix = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

# Uniform numbers a sample's draw reads: 19 for the sample, 10 more for each image channel (blur,
# low resolution and both gammas per channel). Always all of them, whatever is applied, so the
# numbers a batch reads do not depend on the recipe's outcome.
UNIFORMS_PER_SAMPLE, UNIFORMS_PER_CHANNEL = 19, 10
# MONAI AdjustContrast's epsilon.
_GAMMA_EPSILON = 1e-7


@dataclass(frozen=True)
class SampleAugmentation:
    """One sample's augmentation parameters; the identity values mean "not applied"."""

    matrix: Matrix  # patch offset -> volume offset: rotation @ scale @ mirroring
    noise_std: float  # 0: no noise
    blur_sigma: list[list[float]]  # per channel and axis; 0: not blurred
    brightness: float  # multiplicative factor; 1: unchanged
    contrast: float  # factor on the deviation from the mean; 1: unchanged
    low_resolution: list[float]  # per channel: zoom of the simulated acquisition; 1: unchanged
    inverted_gamma: list[float]  # per channel, gamma of the inverted image; 1: unchanged
    gamma: list[float]  # per channel; 1: unchanged

    @classmethod
    def identity(cls, channels: int) -> "SampleAugmentation":
        """No augmentation: the patch is a plain slice of its volume."""
        return cls(IDENTITY, 0.0, [[0.0] * 3 for _ in range(channels)], 1.0, 1.0, [1.0] * channels,
                   [1.0] * channels, [1.0] * channels)

    def with_matrix(self, matrix: Matrix) -> "SampleAugmentation":
        """The same intensity changes under another geometry."""
        return SampleAugmentation(matrix, self.noise_std, self.blur_sigma, self.brightness, self.contrast,
                                  self.low_resolution, self.inverted_gamma, self.gamma)


def check_recipe(recipe: AugmentConfig) -> None:
    """Refuse settings the recipe cannot apply (a ConfigError naming the `augment.` key)."""
    for name, value in vars(recipe).items():
        if name.endswith("_prob") and not 0.0 <= value <= 1.0:
            raise ConfigError(f"augment.{name}: a probability must be in [0, 1], got {value}")
    ranges = {"scale_range": (0.0, math.inf), "blur_sigma": (0.0, math.inf), "low_resolution_zoom": (0.0, 1.0),
              "gamma_range": (0.0, math.inf)}
    for name, (floor, ceiling) in ranges.items():
        bounds = list(getattr(recipe, name))
        if len(bounds) != 2 or not floor < bounds[0] <= bounds[1] <= ceiling:
            raise ConfigError(f"augment.{name}: expected [low, high] with {floor} < low <= high <= {ceiling}, "
                              f"got {bounds}")
    for name in ("max_rotation_deg", "max_noise_std", "max_brightness", "max_contrast"):
        if getattr(recipe, name) < 0:
            raise ConfigError(f"augment.{name}: must be at least 0, got {getattr(recipe, name)}")


def uniforms_per_sample(channels: int) -> int:
    """How many uniform numbers `draw_sample` reads for a sample of `channels` image channels."""
    return UNIFORMS_PER_SAMPLE + UNIFORMS_PER_CHANNEL * channels


def draw_sample(recipe: AugmentConfig, u: Sequence[float], channels: int) -> SampleAugmentation:
    """A sample's augmentation from `uniforms_per_sample(channels)` uniform numbers in [0, 1).

    nnU-Net's recipe: rotation and scaling drawn independently, one scale factor for all axes;
    mirroring per axis; blur and low resolution per sample, then per channel with their channel
    probability, each channel its own sigmas or zoom; both gammas per channel, below 1 as often as
    above (`bg_between`).
    """
    (rotate, ax, ay, az, scale, factor_u, contrast_u, noise, noise_u, blur_u, bright, bright_u,
     gamma_u, fx, fy, fz, contrast_value, low_u, inverted_u) = u[:UNIFORMS_PER_SAMPLE]
    matrix = IDENTITY
    if rotate < recipe.rotation_prob:
        largest = math.radians(recipe.max_rotation_deg)
        matrix = rotation([largest * (2 * v - 1) for v in (ax, ay, az)])
    if scale < recipe.scale_prob:
        k = _between(factor_u, recipe.scale_range)
        matrix = [[m * k for m in row] for row in matrix]
    # Mirroring a patch axis negates its offsets: a sign on the matrix column. It commutes with the
    # intensity changes, so doing it with the geometry changes nothing.
    mirror = [-1.0 if v < recipe.flip_prob else 1.0 for v in (fx, fy, fz)]
    matrix = [[m * f for m, f in zip(row, mirror)] for row in matrix]
    sigmas, zooms, inverted_gammas, gammas = [], [], [], []
    for c in range(channels):
        start = UNIFORMS_PER_SAMPLE + UNIFORMS_PER_CHANNEL * c
        (blur_c, sx, sy, sz, low_c, zoom, inverted_half, inverted, gamma_half,
         gamma_value) = u[start:start + UNIFORMS_PER_CHANNEL]
        blurred = blur_u < recipe.blur_prob and blur_c < recipe.blur_channel_prob
        sigmas.append([_between(v, recipe.blur_sigma) for v in (sx, sy, sz)] if blurred else [0.0] * 3)
        coarse = low_u < recipe.low_resolution_prob and low_c < recipe.low_resolution_channel_prob
        zooms.append(_between(zoom, recipe.low_resolution_zoom) if coarse else 1.0)
        inverted_gammas.append(bg_between(inverted_half, inverted, recipe.gamma_range)
                               if inverted_u < recipe.inverted_gamma_prob else 1.0)
        gammas.append(bg_between(gamma_half, gamma_value, recipe.gamma_range) if gamma_u < recipe.gamma_prob else 1.0)
    return SampleAugmentation(
        matrix=matrix,
        noise_std=recipe.max_noise_std * noise_u if noise < recipe.noise_prob else 0.0,
        blur_sigma=sigmas,
        brightness=1 + recipe.max_brightness * (2 * bright_u - 1) if bright < recipe.brightness_prob else 1.0,
        contrast=1 + recipe.max_contrast * (2 * contrast_value - 1) if contrast_u < recipe.contrast_prob else 1.0,
        low_resolution=zooms, inverted_gamma=inverted_gammas, gamma=gammas,
    )


def blur_taps(recipe: AugmentConfig) -> int:
    """Taps of the widest blur kernel the recipe can draw (`blur_kernel` of its largest sigma);
    narrower kernels are padded to it with zeros, which changes nothing."""
    return len(blur_kernel(max(recipe.blur_sigma)))


def intensity_values(augmentations: Sequence[SampleAugmentation], taps: int) -> list[float]:
    """The batch's intensity parameters as one flat list, in `apply_intensity`'s layout: noise
    std, brightness, contrast per sample; inverted gamma, gamma per sample and channel; then, if
    any channel is blurred, every sample's, channel's and axis's kernel of `taps` weights."""
    values = [a.noise_std for a in augmentations] + [a.brightness for a in augmentations]
    values += [a.contrast for a in augmentations]
    values += [g for a in augmentations for g in a.inverted_gamma] + [g for a in augmentations for g in a.gamma]
    if _any_blur(augmentations):
        values += [w for a in augmentations for sigmas in a.blur_sigma for s in sigmas for w in padded_blur_kernel(s, taps)]
    return values


def apply_intensity(image: torch.Tensor, augmentations: Sequence[SampleAugmentation], values: torch.Tensor,
                    taps: int, noise: torch.Generator, noise_seed: int) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma and gamma, in nnU-Net's
    order, for a batch `image` (B, C, X, Y, Z); `values` is `intensity_values(...)` on the
    image's device. The noise is drawn by `noise` (a generator on that device) seeded with
    `noise_seed`.

    Each step runs only when some sample (or channel) of the batch gets it (known on the host);
    the others get identity parameters.
    """
    b, c = image.shape[:2]
    noise_std, brightness, contrast_factor = values[:3 * b].view(3, b)
    inverted_gamma, gamma_value = values[3 * b:b * (3 + 2 * c)].view(2, b, c)
    per_sample = (-1,) + (1,) * (image.ndim - 1)
    per_channel = image.shape[:2] + (1,) * (image.ndim - 2)
    if any(a.noise_std > 0 for a in augmentations):
        noise.manual_seed(noise_seed)
        image = image + torch.randn(image.shape, generator=noise, device=image.device) * noise_std.view(per_sample)
    if _any_blur(augmentations):
        image = blur(image, values[b * (3 + 2 * c):].view(b * c, 3, taps))
    if any(a.brightness != 1 for a in augmentations):
        image = image * brightness.view(per_sample)
    if any(a.contrast != 1 for a in augmentations):
        image = torch.where((contrast_factor != 1).view(per_sample), contrast(image, contrast_factor), image)
    if any(zoom != 1 for a in augmentations for zoom in a.low_resolution):
        image = low_resolution(image, [a.low_resolution for a in augmentations])
    if any(g != 1 for a in augmentations for g in a.inverted_gamma):
        chosen = (inverted_gamma != 1).view(per_channel)
        image = torch.where(chosen, -gamma(-image, inverted_gamma), image)
    if any(g != 1 for a in augmentations for g in a.gamma):
        image = torch.where((gamma_value != 1).view(per_channel), gamma(image, gamma_value), image)
    return image


# --- the maths ------------------------------------------------------------------------------------


def rotation(angles: Sequence[float]) -> Matrix:
    """Rx @ Ry @ Rz of `angles` (radians): MONAI's create_rotate (rotate_order "XYZ", as RandAffine
    uses it)."""
    (cx, cy, cz), (sx, sy, sz) = [math.cos(a) for a in angles], [math.sin(a) for a in angles]
    rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]]
    ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]]
    rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]]
    return _matmul(_matmul(rx, ry), rz)


def bg_between(half: float, u: float, bounds: Sequence[float]) -> float:
    """batchgeneratorsv2's BGContrast sampling from two uniform numbers in [0, 1): with probability
    0.5 (`half` < 0.5) between the lower bound and 1, otherwise between 1 and the upper bound (so
    gamma is below 1 as often as above, whatever the range's lengths)."""
    low, high = bounds
    if half < 0.5 and low < 1:
        return low + (1.0 - low) * u
    low = max(low, 1.0)
    return low + (high - low) * u


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


def padded_blur_kernel(sigma: float, taps: int) -> list[float]:
    """`blur_kernel(sigma)` zero-padded to `taps` (odd) weights; sigma 0 gives the identity kernel."""
    kernel = blur_kernel(sigma).tolist() if sigma > 0 else [1.0]
    padding = [0.0] * ((taps - len(kernel)) // 2)
    return padding + kernel + padding


def blur(image: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, the border reflected (nnU-Net's), one kernel per sample, channel
    and axis.

    `kernels`: (B * C, 3, taps), each sample's kernels for each of its channels. Each axis is a
    weighted sum of shifted copies, elementwise arithmetic in a fixed order on every device: a
    grouped convolution's rounding depends on the algorithm the library picks for the thread
    count, and a DataLoader worker runs on one thread.
    """
    b, c = image.shape[:2]
    taps = kernels.shape[-1]
    x = image.reshape(b * c, *image.shape[2:])
    for axis in range(3):
        padding = [0] * 6  # F.pad: last axis first
        padding[4 - 2 * axis] = padding[5 - 2 * axis] = taps // 2
        # Reflection needs more voxels than the padding; thinner axes (never a real patch) repeat the edge.
        mode = "reflect" if x.shape[1 + axis] > taps // 2 else "replicate"
        padded = F.pad(x[:, None], padding, mode=mode)[:, 0]
        size = x.shape[1 + axis]
        weights = kernels[:, axis].view(b * c, taps, 1, 1, 1)
        x = sum(padded.narrow(1 + axis, k, size) * weights[:, k] for k in range(taps))
    return x.reshape(image.shape)


def gamma(image: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's AdjustContrast(retain_stats=True) per channel, as nnU-Net's GammaTransform: rescale
    each channel to [0, 1] by its min and max, raise to its `gamma` ((B, C)), rescale back, then
    restore the channel's mean and standard deviation. The inverted variant is -gamma(-image)."""
    flat = image.flatten(2)
    shape = image.shape[:2] + (1,) * (image.ndim - 2)
    mean, std = flat.mean(2).view(shape), flat.std(2).view(shape)
    low, high = torch.aminmax(flat, dim=2)
    low, span = low.view(shape), (high - low).view(shape)
    adjusted = ((image - low) / (span + _GAMMA_EPSILON)).pow(gamma.view(shape)) * span + low
    flat = adjusted.flatten(2)
    centred = adjusted - flat.mean(2).view(shape)
    return centred / (flat.std(2).view(shape) + 1e-8) * std + mean


def contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """MONAI's ScaleIntensityFixedMean(preserve_range=True) per sample: deviations from the
    sample's mean scaled by `factor` ((B,)), then clipped to the sample's original range."""
    flat = image.flatten(1)
    shape = (-1,) + (1,) * (image.ndim - 1)
    low, high = torch.aminmax(flat, dim=1)
    mean = flat.mean(1).view(shape)
    return torch.clamp((image - mean) * factor.view(shape) + mean, low.view(shape), high.view(shape))


def low_resolution(image: torch.Tensor, zooms: Sequence[Sequence[float]]) -> torch.Tensor:
    """nnU-Net's SimulateLowResolutionTransform (as MONAI's SimulateLowResolution with
    downsample_mode 'nearest-exact') for the channels with zoom < 1 (`zooms`: per sample and
    channel): down to round(size * zoom) voxels per axis by 'nearest-exact', which takes the voxel
    nearest each coarse voxel's centre ('nearest' takes the one at its corner and moves the image
    by up to a voxel), back up by trilinear interpolation (align_corners=False)."""
    samples = []
    for sample, per_channel in zip(image.unbind(0), zooms):
        channels = list(sample.unbind(0))
        for c, zoom in enumerate(per_channel):
            if zoom != 1:
                size = [max(1, round(s * zoom)) for s in image.shape[2:]]
                small = F.interpolate(channels[c][None, None], size=size, mode="nearest-exact")
                channels[c] = F.interpolate(small, size=image.shape[2:], mode="trilinear", align_corners=False)[0, 0]
        samples.append(torch.stack(channels))
    return torch.stack(samples)


def _any_blur(augmentations: Sequence[SampleAugmentation]) -> bool:
    return any(s > 0 for a in augmentations for sigmas in a.blur_sigma for s in sigmas)


def _between(u: float, bounds: Sequence[float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _matmul(a: Matrix, b: Matrix) -> Matrix:
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]
