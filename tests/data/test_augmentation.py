"""The MONAI augmentation pipeline's own scaling transform: nnU-Net's direction and probability."""

from __future__ import annotations

import torch

from medseg.data.transforms import RandIsotropicScaled


def _cube() -> torch.Tensor:
    image = torch.zeros(1, 21, 21, 21)
    image[0, 8:13, 8:13, 8:13] = 1  # 125 voxels about the centre
    return image


def test_a_factor_above_one_makes_structures_smaller():
    # As in the device sampler, whose matrix maps a patch offset o to the volume offset k R o.
    for factor, expected in ((1.4, 27), (0.7, 343)):  # 5 voxels per side become 3 or 7
        scale = RandIsotropicScaled(("image", "label"), 1.0, (factor, factor), ("bilinear", "nearest"))
        out = scale({"image": _cube(), "label": _cube()})
        assert out["image"].shape == (1, 21, 21, 21)
        assert int(out["label"].sum()) == expected
        assert int((out["image"] > 0.5).sum()) == expected


def test_scaling_happens_with_its_probability_and_is_reproducible():
    scale = RandIsotropicScaled(("image",), 0.2, (0.7, 1.4), ("bilinear",))
    scale.set_random_state(seed=0)
    changed = [not torch.equal(scale({"image": _cube()})["image"], _cube()) for _ in range(500)]
    assert abs(sum(changed) / 500 - 0.2) < 0.05
    first = RandIsotropicScaled(("image",), 1.0, (0.7, 1.4), ("bilinear",)).set_random_state(seed=3)
    second = RandIsotropicScaled(("image",), 1.0, (0.7, 1.4), ("bilinear",)).set_random_state(seed=3)
    assert torch.equal(first({"image": _cube()})["image"], second({"image": _cube()})["image"])


# --- per-channel blur, low resolution and gamma (nnU-Net's) ---------------------------------------


def _pipeline_step(kind: type, inner: type | None = None):
    from medseg.data.transforms import Preprocessing, training_augmentation

    steps = training_augmentation(Preprocessing((1.0, 1.0, 1.0), "zscore", 2, 3), [8, 8, 8], 0.33).transforms
    return [s for s in steps if isinstance(s, kind) and (inner is None or isinstance(s.transform, inner))]


def test_pipeline_uses_nnunets_per_channel_probabilities():
    from monai import transforms as T

    from medseg.data.transforms import RandChannelwised, RandGammad, RandGaussianBlur

    (blur,) = _pipeline_step(RandChannelwised, RandGaussianBlur)
    assert (blur.prob, blur.channel_prob, blur.transform.sigma_range) == (0.2, 0.5, (0.5, 1.0))
    (low,) = _pipeline_step(RandChannelwised, T.RandSimulateLowResolution)
    assert (low.prob, low.channel_prob) == (0.25, 0.5)
    assert str(low.transform.downsample_mode) == "nearest-exact" and str(low.transform.upsample_mode) == "trilinear"
    inverted, gamma = _pipeline_step(RandChannelwised, RandGammad)
    assert (inverted.prob, inverted.transform.invert_image, gamma.prob, gamma.transform.invert_image) == (
        0.1, True, 0.3, False)
    assert inverted.channel_prob == gamma.channel_prob == 1.0
    assert not _pipeline_step(T.RandGaussianSmoothd) and not _pipeline_step(T.RandSimulateLowResolutiond)


def test_channels_are_changed_independently_with_their_probability():
    from monai import transforms as T

    from medseg.data.transforms import RandChannelwised

    low = RandChannelwised("image", T.RandSimulateLowResolution(prob=1.0, downsample_mode="nearest-exact"),
                           prob=0.25, channel_prob=0.5).set_random_state(seed=1)
    image = torch.randn(2, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    changed = torch.tensor([[not torch.equal(a, b) for a, b in zip(low({"image": image})["image"], image)]
                            for _ in range(2000)])
    assert abs(changed.double().mean() - 0.125) < 0.02  # nnU-Net: 0.25 per sample * 0.5 per channel
    both = changed.all(1).double().mean()
    assert abs(both - 0.25 * 0.25) < 0.02


def test_gamma_is_below_one_as_often_as_above():
    from medseg.data.transforms import RandGammad

    gamma = RandGammad(prob=1.0, gamma=(0.7, 1.5), retain_stats=True)
    gamma.set_random_state(seed=2)
    values = []
    for _ in range(4000):
        gamma.randomize()
        values.append(gamma.gamma_value)
    values = torch.tensor(values)
    assert ((values >= 0.7) & (values <= 1.5)).all()
    assert abs((values < 1).double().mean() - 0.5) < 0.03  # uniform on (0.7, 1.5): 0.375
    assert abs(float(values[values > 1].mean()) - 1.25) < 0.02


def test_blur_is_nnunets_normalised_reflected_kernel():
    from medseg.data.transforms import RandGaussianBlur, blur_kernel

    assert [len(blur_kernel(s)) for s in (0.5, 0.75, 1.0)] == [3, 5, 7]
    blur = RandGaussianBlur(1.0, (0.5, 1.0))
    constant = torch.full((1, 5, 6, 7), 2.0)
    torch.testing.assert_close(blur(constant), constant)  # no darkened border
    image = torch.randn(1, 5, 6, 7, generator=torch.Generator().manual_seed(3))
    blur.sigmas = [0.8, 0.5, 1.0]
    out = blur(image, randomize=False)
    # Along the first axis alone, by hand: reflected padding, then the kernel.
    axis0 = RandGaussianBlur(1.0, (0.5, 1.0))
    axis0.randomize()
    axis0.sigmas = [0.8, 1e-3, 1e-3]  # sigma 1e-3: a 1-tap kernel, unchanged
    padded = torch.cat([image[:, 1:3].flip(1), image, image[:, -3:-1].flip(1)], 1)
    kernel = torch.tensor(blur_kernel(0.8), dtype=torch.float32)
    expected = sum(kernel[k] * padded[:, k:k + 5] for k in range(5))
    torch.testing.assert_close(axis0(image, randomize=False), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, image)
