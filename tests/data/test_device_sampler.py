"""medseg.data.device_sampler: batched patch sampling and augmentation (on the CPU here)."""

from __future__ import annotations

import io
import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from monai import transforms as T
from torch import nn

from medseg.data import device_sampler
from medseg.data import transforms as medseg_transforms
from medseg.data.device_sampler import DevicePatchSampler
from medseg.losses import DiceCELoss

CPU = torch.device("cpu")
PATCH = (8, 10, 8)


def _coordinates(shape: tuple[int, int, int]) -> torch.Tensor:
    """(3, X, Y, Z) float: each voxel's own coordinates."""
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))


def _coded_volume(shape: tuple[int, int, int], case: int, classes: int = 3) -> dict:
    """Image channels x+1, y+1, z+1 and 100*(case+1) (all non-zero inside, so outside is visible);
    label (x + 2y + 3z) mod `classes`."""
    xyz = _coordinates(shape)
    image = torch.cat([xyz + 1, torch.full((1, *shape), 100.0 * (case + 1))])
    label = ((xyz[0] + 2 * xyz[1] + 3 * xyz[2]) % classes).to(torch.uint8)[None]
    return {"image": image, "label": label}


def _sampler(volumes, **overrides) -> DevicePatchSampler:
    args = dict(patch_size=PATCH, num_classes=3, batch_size=4, foreground_fraction=0.33, augment=True,
                device=CPU, seed=0)
    args.update(overrides)
    return DevicePatchSampler(volumes, **args)


def _batches(sampler: DevicePatchSampler, n: int) -> list[dict]:
    return list(itertools.islice(iter(sampler), n))


def _padded_slice(volume: torch.Tensor, corner: list[int], patch=PATCH) -> torch.Tensor:
    """The patch of a zero-padded volume whose first voxel is `corner` (may be negative)."""
    pad = max(patch)
    padded = F.pad(volume, (pad, pad) * 3)
    x, y, z = (c + pad for c in corner)
    return padded[:, x:x + patch[0], y:y + patch[1], z:z + patch[2]]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for first, second in zip(a, b, strict=True):
        assert torch.equal(first["image"], second["image"])
        assert torch.equal(first["label"], second["label"])


SHAPES = [(12, 16, 20), (24, 13, 18), (6, 20, 24)]  # the last is thinner than the patch on x


# --- output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [False, True])
def test_batch_shapes_and_dtypes(augment):
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    sampler = _sampler(volumes, augment=augment, batch_size=5)
    for batch in _batches(sampler, 3):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (5, 4, *PATCH) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (5, 1, *PATCH) and batch["label"].dtype == torch.uint8
        assert batch["image"].device == CPU and batch["label"].device == CPU
        assert torch.isfinite(batch["image"]).all()
        assert int(batch["label"].max()) < 3


def test_batches_train_through_the_loss_and_train_step():
    from medseg.step import train_step

    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    batch = next(iter(_sampler(volumes)))
    model = nn.Conv3d(4, 3, kernel_size=1)
    loss_fn = DiceCELoss()
    logits = model(batch["image"])
    assert logits.shape == (4, 3, *PATCH)
    loss = loss_fn(logits, batch["label"])
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Deep supervision (a coarser output) resizes the label: that path must accept it too.
    assert torch.isfinite(loss_fn([logits, logits[:, :, ::2, ::2, ::2]], batch["label"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    step_loss, finite = train_step(model, batch["image"], batch["label"], loss_fn, optimizer,
                                   torch.amp.GradScaler("cpu", enabled=False), None, grad_clip=1.0)
    assert finite and torch.isfinite(step_loss)
    assert not torch.equal(model.weight, before)


# --- patch position and content -------------------------------------------------------------------


def _check_unaugmented(batch: dict, volumes: list[dict], patch=PATCH) -> list[tuple[int, list[int]]]:
    """Each patch equals the slice of its (zero-padded) volume; returns (case, corner) per sample."""
    found = []
    for image, label in zip(batch["image"], batch["label"]):
        case = int(round(float(image[3].max()) / 100)) - 1
        inside = (image[0] > 0.5).nonzero()
        assert len(inside), "a patch must overlap its volume"
        i, j, k = inside[0].tolist()
        corner = [int(round(float(image[a, i, j, k]))) - 1 - offset for a, offset in enumerate((i, j, k))]
        expected_image = _padded_slice(volumes[case]["image"], corner, patch)
        expected_label = _padded_slice(volumes[case]["label"], corner, patch)
        torch.testing.assert_close(image, expected_image, atol=1e-4, rtol=1e-6)
        assert torch.equal(label, expected_label)
        found.append((case, corner))
    return found


def test_unaugmented_patch_is_the_slice_of_the_padded_volume():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    sampler = _sampler(volumes, augment=False, batch_size=6, foreground_fraction=0.0)
    cases = set()
    for batch in _batches(sampler, 8):
        for case, corner in _check_unaugmented(batch, volumes):
            cases.add(case)
            for size, patch, start in zip(SHAPES[case], PATCH, corner):
                if size >= patch:  # inside the volume where it is large enough
                    assert 0 <= start <= size - patch
                else:  # centred (padded) where it is thinner than the patch
                    assert start == -((patch - size) // 2)
    assert cases == {0, 1, 2}  # every case drawn (uniform with replacement)


@pytest.mark.parametrize("shape", [(5, 6, 7), (1, 12, 12), (2, 1, 1)])
def test_volumes_smaller_than_the_patch(shape):
    volumes = [_coded_volume(shape, 0)]
    for batch in _batches(_sampler(volumes, augment=False, foreground_fraction=0.0), 3):
        for _, corner in _check_unaugmented(batch, volumes):
            for size, patch, start in zip(shape, PATCH, corner):
                assert start == -((patch - size) // 2) if size < patch else 0 <= start <= size - patch
    for batch in _batches(_sampler(volumes, augment=True), 5):  # augmentation works on them too
        assert batch["image"].shape == (4, 4, *PATCH) and torch.isfinite(batch["image"]).all()


def _single_foreground(shape=(24, 24, 24), voxel=(20, 3, 17)) -> dict:
    label = torch.zeros(1, *shape, dtype=torch.uint8)
    label[(0, *voxel)] = 1
    return {"image": torch.randn(2, *shape), "label": label}


def test_foreground_fraction_one_always_contains_foreground():
    sampler = _sampler([_single_foreground()], num_classes=2, foreground_fraction=1.0, augment=False,
                       patch_size=(6, 6, 6))
    for batch in _batches(sampler, 10):
        assert (batch["label"].flatten(1) == 1).any(dim=1).all()


@pytest.mark.parametrize("voxel", [(20, 3, 17), (0, 23, 12), (2, 2, 2)])
def test_foreground_patch_is_centred_on_its_voxel_even_at_the_border(voxel):
    # Near the border the patch reaches beyond the volume: the foreground voxel is always at the
    # patch's centre, so every position of the patch sees foreground over the training.
    volume = _single_foreground(voxel=voxel)
    sampler = _sampler([volume], num_classes=2, foreground_fraction=1.0, augment=False, patch_size=(6, 8, 7))
    for batch in _batches(sampler, 3):
        for label in batch["label"][:, 0]:
            assert (label == 1).nonzero().tolist() == [[3, 4, 3]]


def test_foreground_moves_in_a_case_smaller_than_the_patch():
    # Random patches of a case thinner than the patch sit at one place (centred); foreground-centred
    # ones follow their voxel, so the structure is seen at different places of the patch.
    label = torch.zeros(1, 6, 6, 6, dtype=torch.uint8)
    label[0, 1:5, 1:5, 1:5] = 1
    sampler = _sampler([{"image": torch.randn(1, 6, 6, 6), "label": label}], num_classes=2,
                       foreground_fraction=1.0, augment=False, patch_size=(8, 8, 8), batch_size=8)
    positions = {tuple((b == 1).nonzero()[0].tolist()) for batch in _batches(sampler, 4) for b in batch["label"][:, 0]}
    assert len(positions) > 5


def test_foreground_fraction_zero_draws_uniform_positions():
    sampler = _sampler([_single_foreground()], num_classes=2, foreground_fraction=0.0, augment=False,
                       patch_size=(6, 6, 6))
    hits = torch.cat([(b["label"].flatten(1) == 1).any(dim=1) for b in _batches(sampler, 20)])
    assert hits.float().mean() < 0.2  # a random 6^3 patch of 24^3 holds this voxel about 1 time in 70


def test_present_foreground_classes_are_equally_likely():
    # Class 1 fills a slab, class 2 is one voxel far from it: patches centred on class 1 cannot
    # reach class 2, so half the patches (those centred on class 2) hold it.
    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, :8] = 1
    label[0, 20, 20, 20] = 2
    sampler = _sampler([{"image": torch.randn(1, 24, 24, 24), "label": label}], num_classes=4,
                       foreground_fraction=1.0, augment=False, patch_size=(6, 6, 6), batch_size=10)
    batches = _batches(sampler, 30)
    has_two = torch.cat([(b["label"].flatten(1) == 2).any(dim=1) for b in batches]).float().mean()
    assert 0.38 < has_two < 0.62
    for b in batches:  # every patch is centred on a foreground class (class 3 is absent)
        assert (b["label"].flatten(1) > 0).any(dim=1).all()


def test_foreground_indices_are_bounded(monkeypatch):
    monkeypatch.setattr(device_sampler, "MAX_INDICES_PER_CLASS", 50)
    label = torch.zeros(1, 12, 12, 12, dtype=torch.uint8)
    label[0, 2:10, 2:10, 2:10] = 1  # 512 voxels
    label[0, 0, 0, :3] = 2  # 3 voxels
    sampler = _sampler([{"image": torch.zeros(1, 12, 12, 12), "label": label}], num_classes=3)
    ones, twos = sampler._volumes[0].foreground
    assert len(ones) == 50 and len(ones.unique()) == 50
    assert (label.flatten()[ones] == 1).all()
    assert sorted(twos.tolist()) == [0, 1, 2]


# --- augmentation -----------------------------------------------------------------------------------


def test_spatial_augmentation_maps_image_and_label_through_the_same_grid():
    """Image channels = voxel coordinates (bilinear interpolation of a linear function is exact),
    plus a channel of ones (exactly 1 where all interpolated voxels are inside the volume). With
    the intensity augmentation switched off, every patch voxel inside the volume must hold the
    coordinates `centre + matrix @ offset`, and its label the label of the nearest voxel there
    when the patch is only mirrored, else (rotated or scaled) nnU-Net's: the class whose indicator,
    interpolated trilinearly there, is largest."""
    shape = (20, 22, 24)
    xyz = _coordinates(shape)
    image = torch.cat([xyz, torch.ones(1, *shape)])
    label = ((xyz[0] + 2 * xyz[1] + 3 * xyz[2]) % 5).to(torch.uint8)[None]
    # Random positions (inside the volume): foreground-centred patches may sit mostly outside it.
    sampler = _sampler([{"image": image, "label": label}], num_classes=5, batch_size=8, foreground_fraction=0.0)
    offsets = _coordinates(PATCH) - ((torch.tensor(PATCH, dtype=torch.float32) - 1) / 2)[:, None, None, None]
    rotated = mirrored = 0
    for _ in range(8):
        draw = sampler._draw()
        b = len(draw.cases)
        plain = device_sampler._unaugmented(draw.cases, draw.corners, sampler.channels)
        draw = replace(plain, matrices=draw.matrices)
        batch = sampler._render(draw)
        for i in range(b):
            matrix = torch.tensor(draw.matrices[i])
            # Column lengths are the scale, the same for every axis (rotation keeps lengths), columns orthogonal.
            gram = matrix.T @ matrix
            scales = gram.diagonal().sqrt()
            assert ((scales > 0.7 - 1e-4) & (scales < 1.4 + 1e-4)).all()
            torch.testing.assert_close(scales, scales[:1].expand(3), atol=1e-5, rtol=0)
            torch.testing.assert_close(gram, torch.diag_embed(gram.diagonal()), atol=1e-5, rtol=0)
            rotated += not torch.allclose(matrix.abs(), torch.eye(3))
            mirrored += bool((matrix.diagonal() < 0).any()) and torch.allclose(matrix.abs(), torch.eye(3))

            centre = torch.tensor(draw.corners[i]) + (torch.tensor(PATCH, dtype=torch.float32) - 1) / 2
            expected = centre[:, None, None, None] + torch.einsum("ak,kxyz->axyz", matrix, offsets)
            sampled = batch["image"][i]
            inside = (sampled[3] - 1).abs() < 1e-4
            assert inside.float().mean() > 0.3
            torch.testing.assert_close(sampled[:3][:, inside], expected[:, inside], atol=2e-3, rtol=0)
            coords = expected[:, inside]
            if torch.equal(matrix.abs(), torch.eye(3)):
                # Mirrored only: the grid points are voxels, the label theirs exactly.
                nearest = coords.round().long()
                assert torch.equal(batch["label"][i, 0][inside], label[0, nearest[0], nearest[1], nearest[2]])
                continue
            # Trilinear class indicators, largest wins: skip points where two classes nearly tie.
            scores = _trilinear_class_scores(label[0], coords, 5)
            top = scores.topk(2, dim=0).values
            clear = (top[0] - top[1]) > 1e-2
            assert clear.float().mean() > 0.5
            assert torch.equal(batch["label"][i, 0][inside][clear], scores.argmax(0)[clear].to(torch.uint8))
    assert rotated > 0 and mirrored > 0  # both kinds of geometry were exercised


def _trilinear_class_scores(label: torch.Tensor, coords: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, N): each class's indicator of `label` (X, Y, Z) interpolated trilinearly at the
    points `coords` (3, N), all of whose neighbours lie inside the volume."""
    base = coords.floor().long()
    frac = coords - base
    scores = torch.zeros(classes, coords.shape[1])
    for corner in itertools.product((0, 1), repeat=3):
        step = torch.tensor(corner)[:, None]
        weight = torch.where(step == 1, frac, 1 - frac).prod(0)
        x, y, z = (base + step).clamp(min=0).unbind(0)
        x, y, z = x.clamp(max=label.shape[0] - 1), y.clamp(max=label.shape[1] - 1), z.clamp(max=label.shape[2] - 1)
        scores.scatter_add_(0, label[x, y, z].long()[None], weight[None])
    return scores


def test_rotated_labels_are_interpolated_per_class_not_nearest():
    # A ball rotated and scaled: nnU-Net's per-class trilinear resampling gives a different (smoother)
    # label than the nearest voxel's on some voxels, and agrees with a direct computation.
    shape = (20, 20, 20)
    xyz = _coordinates(shape)
    label = ((((xyz - 9.3) ** 2).sum(0) < 5.5 ** 2).to(torch.uint8) + (xyz[0] > 14).to(torch.uint8))[None]
    patch = (12, 12, 12)
    sampler = _sampler([{"image": torch.ones(1, *shape), "label": label}], num_classes=3, patch_size=patch,
                       batch_size=1, foreground_fraction=0.0)
    matrix = torch.tensor(device_sampler._rotation([0.3, -0.4, 0.5])) * 0.9
    draw = replace(device_sampler._unaugmented([0], [[4, 4, 4]], 1), matrices=[matrix.tolist()])
    resampled = sampler._render(draw)["label"][0, 0]
    offsets = _coordinates(patch) - 5.5
    coords = torch.full((3,), 9.5)[:, None, None, None] + torch.einsum("ak,kxyz->axyz", matrix, offsets)
    coords = coords.flatten(1)
    scores = _trilinear_class_scores(label[0], coords, 3)
    top = scores.topk(2, dim=0).values
    clear = (top[0] - top[1]) > 1e-3
    assert torch.equal(resampled.flatten()[clear], scores.argmax(0)[clear].to(torch.uint8))
    nearest = coords.round().long().clamp(0, 19)
    nearest_label = label[0, nearest[0], nearest[1], nearest[2]]
    assert (resampled.flatten()[clear] != nearest_label[clear]).sum() >= 5


def test_label_classes_interpolated_in_passes_give_the_same_label(monkeypatch):
    label = torch.randint(0, 20, (1, 10, 11, 12), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    grid = torch.rand(1, 6, 7, 8, 3, generator=torch.Generator().manual_seed(6)) * 1.8 - 0.9
    whole = device_sampler._linear_label(label, grid, 20)
    monkeypatch.setattr(device_sampler, "_LABEL_CLASSES_PER_PASS", 3)
    assert torch.equal(device_sampler._linear_label(label, grid, 20), whole)
    assert whole.shape == (1, 1, 6, 7, 8) and len(whole.unique()) > 5
    # Outside the volume every indicator is 0: background.
    assert int(device_sampler._linear_label(label, torch.full((1, 2, 2, 2, 3), 3.0), 20).max()) == 0


def test_rotation_and_scaling_are_drawn_independently():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    sampler = _sampler(volumes, batch_size=100)
    rotated = scaled = both = 0
    n = 0
    for _ in range(20):
        for matrix in sampler._draw().matrices:
            m = torch.tensor(matrix).abs()
            scale = float((torch.tensor(matrix).T @ torch.tensor(matrix)).diagonal()[0].sqrt())
            is_scaled = abs(scale - 1) > 1e-6
            is_rotated = not torch.allclose(m / scale, torch.eye(3))
            rotated, scaled, both, n = rotated + is_rotated, scaled + is_scaled, both + (is_rotated and is_scaled), n + 1
    # nnU-Net: rotation with probability 0.2, scaling with 0.2, independently (both: 0.04).
    assert abs(rotated / n - 0.2) < 0.04 and abs(scaled / n - 0.2) < 0.04
    assert abs(both / n - 0.04) < 0.02


def _agreement(batch: dict) -> torch.Tensor:
    """Per sample: fraction of voxels where 'image above its midpoint' matches 'label foreground'."""
    image = batch["image"][:, 0].flatten(1)
    low, high = image.min(1, keepdim=True).values, image.max(1, keepdim=True).values
    return ((image > (low + high) / 2) == (batch["label"][:, 0].flatten(1) > 0)).float().mean(1)


def test_augmented_image_and_label_stay_aligned():
    # An asymmetric label (a slab and an off-centre block), image = label * 10.
    label = torch.zeros(1, 20, 22, 24, dtype=torch.uint8)
    label[0, :, :7] = 1
    label[0, 12:18, 10:20, 4:12] = 1
    sampler = _sampler([{"image": label.float() * 10, "label": label}], num_classes=2, foreground_fraction=0.5,
                       batch_size=8)
    batches = _batches(sampler, 12)
    # Augmentation happened: the images are not just label * 10.
    changed = torch.cat([(b["image"][:, 0] != b["label"][:, 0].float() * 10).flatten(1).any(1) for b in batches])
    assert changed.float().mean() > 0.3
    aligned, misaligned = [], []
    for batch in batches:
        # Only patches holding both background and foreground say anything about alignment.
        fg = (batch["label"][:, 0].flatten(1) > 0).float().mean(1)
        keep = (fg > 0.1) & (fg < 0.9)
        aligned.append(_agreement(batch)[keep])
        # The same measure catches a label mirrored apart from its image.
        misaligned.append(_agreement({"image": batch["image"], "label": batch["label"].flip(3)})[keep])
    aligned, misaligned = torch.cat(aligned), torch.cat(misaligned)
    assert len(aligned) >= 20
    # Not all 1: blur, bilinear vs nearest at edges and the patch border move a few voxels (a patch
    # showing mostly a thin edge of the structure, blurred, can lose a fifth; the geometry alone is
    # checked exactly in test_spatial_augmentation_maps_image_and_label_through_the_same_grid).
    assert aligned.min() > 0.75 and aligned.mean() > 0.97
    assert misaligned.mean() < aligned.mean() - 0.05


def test_blur_matches_the_pipelines_nnunet_blur():
    image = torch.randn(2, 3, 9, 10, 11, generator=torch.Generator().manual_seed(1))
    # Per sample and channel: sigma per axis (0: that channel unblurred).
    sigma = [[[0.5, 0.8, 1.0], [0.0, 0.0, 0.0], [0.9, 0.6, 0.7]], [[0.0] * 3] * 3]
    kernels = torch.tensor([[device_sampler._blur_kernel(s) for s in sigmas] for channels in sigma
                            for sigmas in channels])
    blurred = device_sampler._blur(image, kernels)
    blur = medseg_transforms.RandGaussianBlur(1.0, (0.5, 1.0))
    for c in (0, 2):
        blur.sigmas = sigma[0][c]
        expected = blur(image[0, c:c + 1], randomize=False)
        torch.testing.assert_close(blurred[0, c:c + 1], torch.as_tensor(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blurred[0, 1], image[0, 1])  # sigma 0: unchanged
    torch.testing.assert_close(blurred[1], image[1])


def test_blur_kernel_is_nnunets():
    # batchgeneratorsv2: about 6 sigma rounded to an odd size, the sampled Gaussian normalised.
    for sigma, taps in ((0.5, 3), (0.6, 5), (0.75, 5), (0.9, 5), (1.0, 7)):
        assert _kernel_size(sigma) == taps
        kernel = medseg_transforms.blur_kernel(sigma)
        assert len(kernel) == taps and abs(kernel.sum() - 1) < 1e-12
        x = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        torch.testing.assert_close(torch.tensor(kernel), pdf / pdf.sum())
        padded = torch.tensor(device_sampler._blur_kernel(sigma), dtype=torch.float64)
        tail = device_sampler._BLUR_TAIL
        torch.testing.assert_close(padded[tail - (taps - 1) // 2:tail + (taps - 1) // 2 + 1], pdf / pdf.sum())
        assert padded.sum() == pytest.approx(1.0)
    assert device_sampler._BLUR_TAPS == max(_kernel_size(s / 100) for s in range(50, 101))


def test_blur_reflects_the_border():
    # Normalised kernel and reflection: a constant image stays constant up to its border (a
    # zero-padded or unnormalised blur changes it there).
    image = torch.full((1, 1, 6, 7, 8), 3.0)
    kernels = torch.tensor([[device_sampler._blur_kernel(s) for s in (0.5, 0.75, 1.0)]])
    torch.testing.assert_close(device_sampler._blur(image, kernels), image)


def test_gamma_matches_monai_adjust_contrast_per_channel():
    image = torch.randn(3, 2, 6, 7, 8, generator=torch.Generator().manual_seed(2)) * 5 + 1
    image[:, 1] = image[:, 1] * 3 + 10  # channels of different ranges: statistics are per channel
    gamma = torch.tensor([[0.7, 1.3], [1.0, 1.0], [1.5, 0.8]])
    adjusted = device_sampler._gamma(image, gamma)
    for i, c in itertools.product(range(3), range(2)):
        expected = torch.as_tensor(T.AdjustContrast(gamma=float(gamma[i, c]), retain_stats=True)(image[i, c:c + 1]))
        torch.testing.assert_close(adjusted[i, c:c + 1], expected, atol=1e-4, rtol=1e-5)
    # Each channel's mean and standard deviation are kept.
    torch.testing.assert_close(adjusted.flatten(2).mean(2), image.flatten(2).mean(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(adjusted.flatten(2).std(2), image.flatten(2).std(2), atol=1e-4, rtol=1e-5)
    # The inverted variant: MONAI's invert_image=True.
    inverted = -device_sampler._gamma(-image, gamma)
    for i, c in itertools.product(range(3), range(2)):
        expected = torch.as_tensor(
            T.AdjustContrast(gamma=float(gamma[i, c]), invert_image=True, retain_stats=True)(image[i, c:c + 1]))
        torch.testing.assert_close(inverted[i, c:c + 1], expected, atol=1e-4, rtol=1e-5)


def test_contrast_matches_monai_scale_intensity_fixed_mean():
    image = torch.randn(2, 2, 6, 7, 8, generator=torch.Generator().manual_seed(3)) * 3
    factor = torch.tensor([1.25, 0.8])
    changed = device_sampler._contrast(image, factor)
    for i in range(2):
        expected = T.ScaleIntensityFixedMean(factor=float(factor[i]) - 1, preserve_range=True)(image[i])
        torch.testing.assert_close(changed[i], torch.as_tensor(expected), atol=1e-5, rtol=1e-5)
    assert changed.min() >= image.min() and changed.max() <= image.max()


def test_low_resolution_matches_monai_simulate_low_resolution():
    image = torch.randn(3, 2, 9, 10, 11, generator=torch.Generator().manual_seed(4))
    zooms = [[0.5, 1.0], [1.0, 1.0], [0.73, 0.61]]  # per sample and channel
    simulated = device_sampler._low_resolution(image, zooms)
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


def _blob(shape=(24, 26, 22), centre=(11.3, 12.6, 10.2), sigma=3.0) -> tuple[torch.Tensor, torch.Tensor]:
    xyz = _coordinates(shape)
    centre = torch.tensor(centre)
    return torch.exp(-((xyz - centre[:, None, None, None]) ** 2).sum(0) / (2 * sigma ** 2))[None], xyz


def _centroid(image: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    weights = image[0].clamp(min=0)
    return (xyz * weights).flatten(1).sum(1) / weights.sum()


@pytest.mark.parametrize("zoom", [0.6, 0.67, 0.73, 0.8, 0.85, 0.9])
def test_low_resolution_does_not_move_the_image(zoom):
    # 'nearest' downsampling moved a blob by 0.5-0.9 voxel against its (unchanged) label;
    # 'nearest-exact' keeps it in place, in both samplers.
    blob, xyz = _blob()
    centre = _centroid(blob, xyz)
    simulated = device_sampler._low_resolution(blob[None], [[zoom]])[0]
    assert not torch.allclose(simulated, blob)
    assert (_centroid(simulated, xyz) - centre).abs().max() < 0.2
    pipeline = medseg_transforms.RandChannelwised(
        "image", T.RandSimulateLowResolution(prob=1.0, downsample_mode="nearest-exact", zoom_range=(zoom, zoom)),
        prob=1.0, channel_prob=1.0)
    torch.testing.assert_close(pipeline({"image": blob})["image"], simulated, atol=1e-5, rtol=1e-5)


def test_augmentation_parameters_stay_in_range():
    sampler = _sampler([_coded_volume((12, 12, 12), 0)], batch_size=64)
    draws = [sampler._draw() for _ in range(20)]
    noise = torch.tensor([v for d in draws for v in d.noise_std])
    # Per sample and channel (4 channels): flattened over both.
    sigma = torch.tensor([v for d in draws for v in d.blur_sigma]).flatten(0, 1)
    brightness = torch.tensor([v for d in draws for v in d.brightness])
    gamma = torch.tensor([v for d in draws for v in d.gamma]).flatten()
    contrast = torch.tensor([v for d in draws for v in d.contrast])
    low_resolution = torch.tensor([v for d in draws for v in d.low_resolution]).flatten()
    inverted = torch.tensor([v for d in draws for v in d.inverted_gamma]).flatten()
    matrices = torch.tensor([m for d in draws for m in d.matrices], dtype=torch.float64)
    spatial = ~torch.isclose(matrices.abs(), torch.eye(3, dtype=torch.float64)).flatten(1).all(1)
    # Rotations of at most 30 degrees keep the diagonal positive: its sign is the mirroring.
    mirrored = (matrices.diagonal(dim1=1, dim2=2) < 0).double()
    n = len(noise)
    assert ((noise >= 0) & (noise <= 0.1)).all()
    assert ((sigma == 0) | ((sigma >= 0.5) & (sigma <= 1.0))).all()
    assert ((brightness >= 0.75) & (brightness <= 1.25)).all()
    assert ((gamma >= 0.7) & (gamma <= 1.5)).all()
    # Probabilities as in training_augmentation() (1280 samples, 5120 channels: loose bounds, fixed
    # seed). Blur and low resolution: nnU-Net's per sample probability times 0.5 per channel.
    assert abs((noise > 0).sum() / n - 0.1) < 0.04
    assert abs((sigma[:, 0] > 0).double().mean() - 0.1) < 0.025
    assert abs((brightness != 1).sum() / n - 0.15) < 0.05
    assert abs((gamma != 1).double().mean() - 0.3) < 0.05
    assert ((contrast >= 0.75) & (contrast <= 1.25)).all() and abs((contrast != 1).sum() / n - 0.15) < 0.05
    assert ((low_resolution >= 0.5) & (low_resolution <= 1)).all()
    assert abs((low_resolution != 1).double().mean() - 0.125) < 0.025
    assert ((inverted >= 0.7) & (inverted <= 1.5)).all() and abs((inverted != 1).double().mean() - 0.1) < 0.04
    assert abs(spatial.double().mean() - 0.36) < 0.05  # rotation 0.2 or scaling 0.2, independently
    assert (abs(mirrored.mean(0) - 0.5) < 0.06).all()


# --- determinism and state --------------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_batches():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    first = _batches(_sampler(volumes, seed=3), 4)
    _assert_same(first, _batches(_sampler(volumes, seed=3), 4))
    other = _batches(_sampler(volumes, seed=4), 4)
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_resident_and_streamed_volumes_give_identical_batches():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    resident = _sampler(volumes, seed=5, batch_size=8)
    streamed = _sampler(volumes, seed=5, batch_size=8, resident_bytes=0)
    assert resident.resident and not streamed.resident
    assert _sampler(volumes, resident_bytes=10**9).resident
    _assert_same(_batches(resident, 6), _batches(streamed, 6))


def test_state_dict_round_trip_continues_the_sequence():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    sampler = _sampler(volumes, seed=7)
    head = _batches(sampler, 2)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = _batches(sampler, 3)
    buffer.seek(0)
    restored = _sampler(volumes, seed=7)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_same(_batches(restored, 3), expected)
    # Without the state, a fresh sampler starts over instead.
    _assert_same(_batches(_sampler(volumes, seed=7), 2), head)
    assert not torch.equal(head[0]["image"], expected[0]["image"])


def test_bad_labels_are_refused():
    volume = _coded_volume((8, 8, 8), 0, classes=3)
    with pytest.raises(ValueError, match="label values"):
        _sampler([volume], num_classes=2)
    with pytest.raises(ValueError, match="same spatial shape"):
        _sampler([{"image": volume["image"], "label": volume["label"][:, :4]}])


def test_metatensor_and_float_labels_are_accepted():
    from monai.data import MetaTensor

    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    as_loaded = [{"image": MetaTensor(v["image"]), "label": MetaTensor(v["label"].float())} for v in volumes]
    _assert_same(_batches(_sampler(as_loaded, seed=2), 2), _batches(_sampler(volumes, seed=2), 2))


@pytest.mark.gpu
def test_cuda_resident_streamed_and_cpu_agree():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    cuda = torch.device("cuda")
    resident = _batches(_sampler(volumes, device=cuda, seed=9, batch_size=8), 4)
    streamed = _batches(_sampler(volumes, device=cuda, seed=9, batch_size=8, resident_bytes=0), 4)
    _assert_same(resident, streamed)
    assert resident[0]["image"].is_cuda and resident[0]["label"].dtype == torch.uint8
    # Without augmentation (no device-generated noise) the device does not change the batches.
    on_gpu = _batches(_sampler(volumes, device=cuda, seed=9, augment=False), 3)
    on_cpu = _batches(_sampler(volumes, seed=9, augment=False), 3)
    for gpu_batch, cpu_batch in zip(on_gpu, on_cpu):
        torch.testing.assert_close(gpu_batch["image"].cpu(), cpu_batch["image"], atol=1e-4, rtol=1e-5)
        assert torch.equal(gpu_batch["label"].cpu(), cpu_batch["label"])


def test_blur_and_low_resolution_choose_channels_independently():
    sampler = _sampler([_coded_volume((12, 12, 12), 0)], batch_size=100)  # 4 channels
    draws = [sampler._draw() for _ in range(30)]
    blurred = torch.tensor([[s[0] > 0 for s in channels] for d in draws for channels in d.blur_sigma])
    coarse = torch.tensor([[z != 1 for z in zooms] for d in draws for zooms in d.low_resolution])
    for chosen, sample_prob in ((blurred, 0.2), (coarse, 0.25)):
        touched = chosen.any(1).double().mean()
        # P(some channel) = p * (1 - 0.5 ** 4); within a touched sample each channel with 0.5.
        assert abs(touched - sample_prob * (1 - 0.5 ** 4)) < 0.03
        assert abs(chosen[chosen.any(1)].double().mean() - 0.5 / (1 - 0.5 ** 4)) < 0.05
    # Channels of one sample get their own parameters.
    sigmas = [channels for d in draws for channels in d.blur_sigma if sum(s[0] > 0 for s in channels) > 1]
    assert all(len({tuple(s) for s in channels if s[0] > 0}) > 1 for channels in sigmas)


def test_gammas_are_below_one_as_often_as_above():
    # nnU-Net's BGContrast sampling of (0.7, 1.5): half from (0.7, 1), half from (1, 1.5); a uniform
    # draw on (0.7, 1.5) would be below 1 only 3 times in 8.
    sampler = _sampler([_coded_volume((12, 12, 12), 0)], batch_size=100)
    draws = [sampler._draw() for _ in range(30)]
    for name in ("gamma", "inverted_gamma"):
        values = torch.tensor([getattr(d, name) for d in draws]).flatten()
        applied = values[values != 1]
        assert len(applied) > 300
        assert abs((applied < 1).double().mean() - 0.5) < 0.06
        above = applied[applied > 1]
        assert abs(float(above.mean()) - 1.25) < 0.03  # uniform on (1, 1.5)
        assert abs(float(applied[applied < 1].mean()) - 0.85) < 0.03  # uniform on (0.7, 1)


def _kernel_size(sigma: float) -> int:
    return len(medseg_transforms.blur_kernel(sigma))


@pytest.mark.gpu
def test_cuda_batches_rendered_ahead_keep_the_sequence_and_its_state():
    # On CUDA each batch is rendered one step ahead on a side stream; the batches, and the state a
    # checkpoint saves between them, are those of a sampler that renders on demand (the CPU's).
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    cuda = torch.device("cuda")
    sampler = _sampler(volumes, device=cuda, seed=3, augment=False)
    head = _batches(sampler, 2)
    state = sampler.state_dict()
    tail = _batches(sampler, 3)
    expected = _batches(_sampler(volumes, seed=3, augment=False), 5)
    for gpu_batch, cpu_batch in zip(head + tail, expected, strict=True):
        torch.testing.assert_close(gpu_batch["image"].cpu(), cpu_batch["image"], atol=1e-4, rtol=1e-5)
        assert torch.equal(gpu_batch["label"].cpu(), cpu_batch["label"])
    restored = _sampler(volumes, device=cuda, seed=3, augment=False)
    restored.load_state_dict(state)
    _assert_same(_batches(restored, 3), tail)
