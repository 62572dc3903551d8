"""medseg.data.augmentation: the recipe's draws (from the `augment:` settings) and its maths."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from monai import transforms as T
from scipy import ndimage

from medseg import config
from medseg.data import augmentation
from medseg.data.augmentation import SampleAugmentation, draw_sample, uniforms_per_sample
from medseg.errors import ConfigError

CHANNELS = 4


def _recipe(*overrides: str) -> config.AugmentConfig:
    """The `augment:` section with `--set`-style overrides, through the config loader."""
    return config.load(None, [f"augment.{item}" for item in overrides]).augment


def _draws(recipe: config.AugmentConfig, n: int = 2000, channels: int = CHANNELS, seed: int = 0) -> list[SampleAugmentation]:
    uniforms = torch.rand(n, uniforms_per_sample(channels), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64).tolist()
    return [draw_sample(recipe, u, channels) for u in uniforms]


def _applied(draws: list[SampleAugmentation]) -> dict[str, torch.Tensor]:
    """Per sample (or per sample and channel): whether each part of the recipe was applied."""
    matrices = torch.tensor([d.matrix for d in draws], dtype=torch.float64)
    scale = (matrices.transpose(1, 2) @ matrices).diagonal(dim1=1, dim2=2)[:, 0].sqrt()
    unscaled = matrices / scale[:, None, None]
    return {
        "rotation": ~torch.isclose(unscaled.abs(), torch.eye(3, dtype=torch.float64)).flatten(1).all(1),
        "scale": (scale - 1).abs() > 1e-9,
        # Rotations of at most 30 degrees keep the diagonal positive: its sign is the mirroring.
        "flip": matrices.diagonal(dim1=1, dim2=2) < 0,
        "noise": torch.tensor([d.noise_std > 0 for d in draws]),
        "blur": torch.tensor([[s[0] > 0 for s in d.blur_sigma] for d in draws]),
        "brightness": torch.tensor([d.brightness != 1 for d in draws]),
        "contrast": torch.tensor([d.contrast != 1 for d in draws]),
        "low_resolution": torch.tensor([[z != 1 for z in d.low_resolution] for d in draws]),
        "inverted_gamma": torch.tensor([[g != 1 for g in d.inverted_gamma] for d in draws]),
        "gamma": torch.tensor([[g != 1 for g in d.gamma] for d in draws]),
    }


# --- the draws follow the recipe -------------------------------------------------------------------

# nnU-Net's defaults: per sample, or per channel (blur and low resolution: per sample times 0.5
# per channel), as the default `augment:` section sets them.
DEFAULT_RATES = {"rotation": 0.2, "scale": 0.2, "flip": 0.5, "noise": 0.1, "blur": 0.1, "brightness": 0.15,
                 "contrast": 0.15, "low_resolution": 0.125, "inverted_gamma": 0.1, "gamma": 0.3}


def test_default_recipe_applies_nnunets_probabilities():
    applied = _applied(_draws(_recipe()))
    for name, rate in DEFAULT_RATES.items():
        assert abs(applied[name].double().mean() - rate) < 0.03, name
    both = (applied["rotation"] & applied["scale"]).double().mean()
    assert abs(both - 0.04) < 0.015  # rotation and scaling drawn independently


PROBABILITIES = {  # key -> the part it switches (with a channel probability: the sample's)
    "rotation_prob": "rotation", "scale_prob": "scale", "flip_prob": "flip", "noise_prob": "noise",
    "blur_prob": "blur", "brightness_prob": "brightness", "contrast_prob": "contrast",
    "low_resolution_prob": "low_resolution", "inverted_gamma_prob": "inverted_gamma", "gamma_prob": "gamma",
}


@pytest.mark.parametrize("key", sorted(PROBABILITIES))
def test_each_probability_takes_effect(key):
    name = PROBABILITIES[key]
    extra = [f"{name}_channel_prob=1"] if name in ("blur", "low_resolution") else []
    never = _applied(_draws(_recipe(f"{key}=0", *extra), n=300))
    always = _applied(_draws(_recipe(f"{key}=1", *extra), n=300))
    assert not never[name].any()
    assert always[name].all()
    # The other parts keep their own rates.
    for other, rate in DEFAULT_RATES.items():
        if other != name and not {name, other} <= {"rotation", "scale"}:
            assert abs(always[other].double().mean() - rate) < 0.08, other


@pytest.mark.parametrize("name", ["blur", "low_resolution"])
def test_channel_probabilities_take_effect(name):
    half = _applied(_draws(_recipe(f"{name}_prob=1", f"{name}_channel_prob=0.5")))[name]
    assert abs(half.double().mean() - 0.5) < 0.03
    # Channels chosen independently: all four together about 1 time in 16.
    assert abs(half.all(1).double().mean() - 0.5 ** 4) < 0.02
    assert not _applied(_draws(_recipe(f"{name}_prob=1", f"{name}_channel_prob=0"), n=200))[name].any()


def test_ranges_take_effect():
    draws = _draws(_recipe("rotation_prob=1", "max_rotation_deg=10", "scale_prob=1", "scale_range=[1.2,1.2]",
                           "noise_prob=1", "max_noise_std=0.02", "blur_prob=1", "blur_channel_prob=1",
                           "blur_sigma=[0.3,0.4]", "brightness_prob=1", "max_brightness=0.05", "contrast_prob=1",
                           "max_contrast=0.5", "low_resolution_prob=1", "low_resolution_channel_prob=1",
                           "low_resolution_zoom=[0.8,0.9]", "gamma_prob=1", "inverted_gamma_prob=1",
                           "gamma_range=[0.9,1.1]"), n=500)
    matrices = torch.tensor([d.matrix for d in draws], dtype=torch.float64)
    gram = matrices.transpose(1, 2) @ matrices
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64).expand_as(gram) * 1.44)
    # Rotation about each axis by at most 10 degrees: no axis turns by more than about 17.
    diagonal = (matrices.diagonal(dim1=1, dim2=2).abs() / 1.2).clamp(max=1)
    assert diagonal.min() > math.cos(math.radians(17.5)) and diagonal.min() < math.cos(math.radians(5))
    noise = torch.tensor([d.noise_std for d in draws])
    assert noise.max() <= 0.02 and noise.max() > 0.019
    sigma = torch.tensor([d.blur_sigma for d in draws])
    assert sigma.min() >= 0.3 and sigma.max() <= 0.4
    for name, low, high in (("brightness", 0.95, 1.05), ("contrast", 0.5, 1.5)):
        values = torch.tensor([getattr(d, name) for d in draws])
        assert values.min() >= low and values.max() <= high and values.max() - values.min() > 0.9 * (high - low)
    zoom = torch.tensor([d.low_resolution for d in draws])
    assert zoom.min() >= 0.8 and zoom.max() <= 0.9
    for name in ("gamma", "inverted_gamma"):
        values = torch.tensor([getattr(d, name) for d in draws])
        assert values.min() >= 0.9 and values.max() <= 1.1


def test_a_disabled_part_leaves_the_recipe_an_identity():
    everything_off = [f"{key}=0" for key in PROBABILITIES]
    for draw in _draws(_recipe(*everything_off), n=50):
        assert draw == SampleAugmentation.identity(CHANNELS)


def test_gammas_are_below_one_as_often_as_above():
    # nnU-Net's BGContrast sampling of (0.7, 1.5): half from (0.7, 1), half from (1, 1.5); a uniform
    # draw on (0.7, 1.5) would be below 1 only 3 times in 8.
    draws = _draws(_recipe("gamma_prob=1", "inverted_gamma_prob=1"), n=1000)
    for name in ("gamma", "inverted_gamma"):
        values = torch.tensor([getattr(d, name) for d in draws]).flatten()
        assert abs((values < 1).double().mean() - 0.5) < 0.03
        assert abs(float(values[values > 1].mean()) - 1.25) < 0.02
        assert abs(float(values[values < 1].mean()) - 0.85) < 0.02


def test_channels_get_their_own_parameters():
    draws = _draws(_recipe("blur_prob=1", "blur_channel_prob=1", "low_resolution_prob=1",
                           "low_resolution_channel_prob=1", "gamma_prob=1"), n=20)
    for draw in draws:
        for values in (draw.low_resolution, draw.gamma, [tuple(s) for s in draw.blur_sigma]):
            assert len(set(values)) == CHANNELS


@pytest.mark.parametrize("item, key", [
    ("noise_prob=1.5", "augment.noise_prob"), ("blur_channel_prob=-0.1", "augment.blur_channel_prob"),
    ("scale_range=[1.4,0.7]", "augment.scale_range"), ("low_resolution_zoom=[0.5,1.5]", "augment.low_resolution_zoom"),
    ("gamma_range=[0,1.5]", "augment.gamma_range"), ("max_rotation_deg=-5", "augment.max_rotation_deg"),
    ("blur_sigma=[0.5]", "augment.blur_sigma"),
])
def test_impossible_settings_are_refused_naming_the_key(item, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        augmentation.check_recipe(_recipe(item))


# --- the maths ------------------------------------------------------------------------------------


def test_blur_kernel_is_nnunets():
    # batchgeneratorsv2: about 6 sigma rounded to an odd size, the sampled Gaussian normalised.
    for sigma, taps in ((0.5, 3), (0.6, 5), (0.75, 5), (0.9, 5), (1.0, 7)):
        kernel = augmentation.blur_kernel(sigma)
        assert len(kernel) == taps and abs(kernel.sum() - 1) < 1e-12
        x = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        torch.testing.assert_close(torch.tensor(kernel), pdf / pdf.sum())
        padded = torch.tensor(augmentation.padded_blur_kernel(sigma, 9), dtype=torch.float64)
        torch.testing.assert_close(padded[4 - (taps - 1) // 2:4 + (taps - 1) // 2 + 1], pdf / pdf.sum())
        assert padded.sum() == pytest.approx(1.0)
    assert augmentation.padded_blur_kernel(0.0, 5) == [0.0, 0.0, 1.0, 0.0, 0.0]
    # The recipe's widest kernel bounds every kernel it draws.
    for bounds, taps in (("[0.5,1.0]", 7), ("[0.5,2.0]", 13), ("[0.3,0.4]", 3)):
        recipe = _recipe(f"blur_sigma={bounds}")
        assert augmentation.blur_taps(recipe) == taps
        low, high = recipe.blur_sigma
        assert max(len(augmentation.blur_kernel(low + (high - low) * k / 100)) for k in range(101)) == taps


def test_blur_is_nnunets_reflected_separable_blur():
    image = torch.randn(2, 3, 9, 10, 11, generator=torch.Generator().manual_seed(1))
    # Per sample and channel: sigma per axis (0: that channel unblurred).
    sigma = [[[0.5, 0.8, 1.0], [0.0, 0.0, 0.0], [0.9, 0.6, 0.7]], [[0.0] * 3] * 3]
    kernels = torch.tensor([[augmentation.padded_blur_kernel(s, 7) for s in sigmas] for channels in sigma
                            for sigmas in channels])
    blurred = augmentation.blur(image, kernels)
    for c in (0, 2):
        # scipy's 'mirror' is torch's 'reflect' (the edge voxel not repeated).
        expected = image[0, c].double().numpy()
        for axis, s in enumerate(sigma[0][c]):
            expected = ndimage.correlate1d(expected, augmentation.blur_kernel(s), axis=axis, mode="mirror")
        torch.testing.assert_close(blurred[0, c], torch.as_tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blurred[0, 1], image[0, 1])  # sigma 0: unchanged
    torch.testing.assert_close(blurred[1], image[1])
    constant = torch.full((1, 1, 6, 7, 8), 3.0)  # normalised and reflected: no darkened border
    flat_kernels = torch.tensor([[augmentation.padded_blur_kernel(s, 7) for s in (0.5, 0.75, 1.0)]])
    torch.testing.assert_close(augmentation.blur(constant, flat_kernels), constant)


def test_gamma_matches_monai_adjust_contrast_per_channel():
    image = torch.randn(3, 2, 6, 7, 8, generator=torch.Generator().manual_seed(2)) * 5 + 1
    image[:, 1] = image[:, 1] * 3 + 10  # channels of different ranges: statistics are per channel
    gamma = torch.tensor([[0.7, 1.3], [1.0, 1.0], [1.5, 0.8]])
    adjusted = augmentation.gamma(image, gamma)
    inverted = -augmentation.gamma(-image, gamma)
    for i, c in itertools.product(range(3), range(2)):
        g = float(gamma[i, c])
        expected = torch.as_tensor(T.AdjustContrast(gamma=g, retain_stats=True)(image[i, c:c + 1]))
        torch.testing.assert_close(adjusted[i, c:c + 1], expected, atol=1e-4, rtol=1e-5)
        expected = torch.as_tensor(T.AdjustContrast(gamma=g, invert_image=True, retain_stats=True)(image[i, c:c + 1]))
        torch.testing.assert_close(inverted[i, c:c + 1], expected, atol=1e-4, rtol=1e-5)
    # Each channel's mean and standard deviation are kept.
    torch.testing.assert_close(adjusted.flatten(2).mean(2), image.flatten(2).mean(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(adjusted.flatten(2).std(2), image.flatten(2).std(2), atol=1e-4, rtol=1e-5)


def test_contrast_matches_monai_scale_intensity_fixed_mean():
    image = torch.randn(2, 2, 6, 7, 8, generator=torch.Generator().manual_seed(3)) * 3
    factor = torch.tensor([1.25, 0.8])
    changed = augmentation.contrast(image, factor)
    for i in range(2):
        expected = T.ScaleIntensityFixedMean(factor=float(factor[i]) - 1, preserve_range=True)(image[i])
        torch.testing.assert_close(changed[i], torch.as_tensor(expected), atol=1e-5, rtol=1e-5)
    assert changed.min() >= image.min() and changed.max() <= image.max()


def test_low_resolution_matches_monai_simulate_low_resolution():
    image = torch.randn(3, 2, 9, 10, 11, generator=torch.Generator().manual_seed(4))
    zooms = [[0.5, 1.0], [1.0, 1.0], [0.73, 0.61]]  # per sample and channel
    simulated = augmentation.low_resolution(image, zooms)
    for i, c in itertools.product(range(3), range(2)):
        zoom = zooms[i][c]
        if zoom == 1:
            assert torch.equal(simulated[i, c], image[i, c])
            continue
        monai_transform = T.RandSimulateLowResolution(prob=1.0, downsample_mode="nearest-exact",
                                                      zoom_range=(zoom, zoom))
        expected = torch.as_tensor(monai_transform(image[i, c:c + 1]))
        torch.testing.assert_close(simulated[i, c:c + 1], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(simulated[i, c], image[i, c])


@pytest.mark.parametrize("zoom", [0.6, 0.67, 0.73, 0.8, 0.85, 0.9])
def test_low_resolution_does_not_move_the_image(zoom):
    # 'nearest' downsampling moved a blob by 0.5-0.9 voxel against its (unchanged) label;
    # 'nearest-exact' keeps it in place.
    shape = (24, 26, 22)
    xyz = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor([11.3, 12.6, 10.2])[:, None, None, None]
    blob = torch.exp(-((xyz - centre) ** 2).sum(0) / 18.0)[None]
    simulated = augmentation.low_resolution(blob[None], [[zoom]])[0]
    assert not torch.allclose(simulated, blob)

    def centroid(image: torch.Tensor) -> torch.Tensor:
        weights = image[0].clamp(min=0)
        return (xyz * weights).flatten(1).sum(1) / weights.sum()

    assert (centroid(simulated) - centroid(blob)).abs().max() < 0.2


def test_apply_intensity_changes_only_what_was_drawn():
    image = torch.randn(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(5)) + 2
    identity = SampleAugmentation.identity(2)
    brighter = dataclasses.replace(identity, brightness=1.2)
    noisy = dataclasses.replace(identity, noise_std=0.1)
    augmentations = [identity, brighter, noisy]
    values = torch.tensor(augmentation.intensity_values(augmentations, 7), dtype=torch.float32)
    out = augmentation.apply_intensity(image, augmentations, values, 7, torch.Generator(), noise_seed=3)
    assert torch.equal(out[0], image[0])
    torch.testing.assert_close(out[1], image[1] * 1.2)
    assert 0.08 < float((out[2] - image[2]).std()) < 0.12
    again = augmentation.apply_intensity(image, augmentations, values, 7, torch.Generator(), noise_seed=3)
    assert torch.equal(again, out)  # the noise is the seed's


def test_rotation_is_monais_xyz_order():
    angles = [0.3, -0.2, 0.5]
    from monai.transforms.utils import create_rotate

    expected = np.asarray(create_rotate(3, angles))[:3, :3]
    np.testing.assert_allclose(np.asarray(augmentation.rotation(angles)), expected, atol=1e-12)
