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
