"""medseg.data.device_sampler: batched patch sampling and augmentation (on the CPU here)."""

from __future__ import annotations

import io
import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg import config
from medseg.data import device_sampler
from medseg.data.augmentation import SampleAugmentation, rotation
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


RECIPE = config.defaults().augment  # nnU-Net's, as the packaged defaults set it


def _recipe(**changes) -> config.AugmentConfig:
    return replace(RECIPE, **changes)


def _sampler(volumes, augment: bool | config.AugmentConfig = True, **overrides) -> DevicePatchSampler:
    """A sampler with the default recipe (augment True), none (False) or the recipe given."""
    recipe = augment if isinstance(augment, config.AugmentConfig) else _recipe(enabled=augment)
    args = dict(patch_size=PATCH, num_classes=3, batch_size=4, foreground_fraction=0.33, augment=recipe,
                device=CPU, seed=0)
    args.update(overrides)
    return DevicePatchSampler(volumes, **args)


def _geometry_only(draw: device_sampler._Draw, channels: int) -> device_sampler._Draw:
    """The draw's geometry without its intensity changes."""
    plain = SampleAugmentation.identity(channels)
    return replace(draw, augmentations=[plain.with_matrix(a.matrix) for a in draw.augmentations])


def _batches(sampler: DevicePatchSampler, n: int) -> list[dict]:
    return list(itertools.islice(iter(sampler), n))


def _padded_slice(volume: torch.Tensor, corner: list[int], patch=PATCH) -> torch.Tensor:
    """The patch of a zero-padded volume whose first voxel is `corner` (may be negative)."""
    pad = max(patch)
    padded = F.pad(volume, (pad, pad) * 3)
    x, y, z = (c + pad for c in corner)
    return padded[:, x:x + patch[0], y:y + patch[1], z:z + patch[2]]


def _assert_close(a: list[dict], b: list[dict]) -> None:
    """The same batches up to float rounding: on large patches the CPU splits a reduction (the
    gamma's and contrast's statistics) over its threads, one in a DataLoader worker, so the sums
    may be ordered differently. Labels are exact."""
    for first, second in zip(a, b, strict=True):
        torch.testing.assert_close(first["image"], second["image"], atol=1e-4, rtol=1e-5)
        assert torch.equal(first["label"], second["label"])


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


def test_foreground_indices_are_bounded():
    label = torch.zeros(1, 12, 12, 12, dtype=torch.uint8)
    label[0, 2:10, 2:10, 2:10] = 1  # 512 voxels
    label[0, 0, 0, :3] = 2  # 3 voxels
    sampler = _sampler([{"image": torch.zeros(1, 12, 12, 12), "label": label}], num_classes=3,
                       max_indices_per_class=50)
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
    for number in range(8):
        draw = _geometry_only(sampler._draw(number), sampler.channels)
        batch = sampler._render(draw)
        for i in range(len(draw.cases)):
            matrix = torch.tensor(draw.augmentations[i].matrix)
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
    matrix = torch.tensor(rotation([0.3, -0.4, 0.5])) * 0.9
    draw = device_sampler._Draw([0], [[4, 4, 4]], [SampleAugmentation.identity(1).with_matrix(matrix.tolist())])
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


def test_label_classes_interpolated_in_passes_give_the_same_label():
    label = torch.randint(0, 20, (1, 10, 11, 12), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    grid = torch.rand(1, 6, 7, 8, 3, generator=torch.Generator().manual_seed(6)) * 1.8 - 0.9
    whole = device_sampler._linear_label(label, grid, 20)
    assert torch.equal(device_sampler._linear_label(label, grid, 20, per_pass=3), whole)
    assert whole.shape == (1, 1, 6, 7, 8) and len(whole.unique()) > 5
    # Outside the volume every indicator is 0: background.
    assert int(device_sampler._linear_label(label, torch.full((1, 2, 2, 2, 3), 3.0), 20).max()) == 0


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
    # showing mostly a thin edge of the structure, blurred, can lose a quarter; the geometry alone is
    # checked exactly in test_spatial_augmentation_maps_image_and_label_through_the_same_grid).
    assert aligned.min() > 0.7 and aligned.mean() > 0.97
    assert misaligned.mean() < aligned.mean() - 0.05


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


# --- the recipe through the sampler -------------------------------------------------------------------

ALL_OFF = dict(rotation_prob=0.0, scale_prob=0.0, flip_prob=0.0, noise_prob=0.0, blur_prob=0.0, brightness_prob=0.0,
               contrast_prob=0.0, low_resolution_prob=0.0, inverted_gamma_prob=0.0, gamma_prob=0.0)


def test_probabilities_zero_give_plain_slices():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    sampler = _sampler(volumes, augment=_recipe(**ALL_OFF), batch_size=6, foreground_fraction=0.0)
    for batch in _batches(sampler, 4):
        _check_unaugmented(batch, volumes)


def test_flip_probability_one_mirrors_every_axis_of_every_patch():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    recipe = _recipe(**{**ALL_OFF, "flip_prob": 1.0})
    flipped = _sampler(volumes, augment=recipe, batch_size=6, foreground_fraction=0.0)
    for batch in _batches(flipped, 3):
        mirrored = {"image": batch["image"].flip(2, 3, 4), "label": batch["label"].flip(2, 3, 4)}
        _check_unaugmented(mirrored, volumes)  # mirrored back: the plain slice


def test_noise_probability_one_changes_every_patch():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    noisy = _sampler(volumes, augment=_recipe(**{**ALL_OFF, "noise_prob": 1.0}), batch_size=6)
    plain = _sampler(volumes, augment=_recipe(**ALL_OFF), batch_size=6)
    for a, b in zip(_batches(noisy, 3), _batches(plain, 3)):
        assert torch.equal(a["label"], b["label"])  # the same patches: noise draws no position
        assert (a["image"] != b["image"]).flatten(1).any(1).all()


def test_blur_wider_than_the_default_range_works():
    volumes = [_coded_volume((16, 16, 16), 0)]
    recipe = _recipe(**{**ALL_OFF, "blur_prob": 1.0, "blur_channel_prob": 1.0, "blur_sigma": [1.5, 2.0]})
    batch = next(iter(_sampler(volumes, augment=recipe, patch_size=(12, 12, 12))))
    assert torch.isfinite(batch["image"]).all()


def test_batches_are_numbered():
    # Batch n depends on the seed and n alone: any process can render any batch.
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    sequence = _batches(_sampler(volumes, seed=4), 5)
    other = _sampler(volumes, seed=4)
    _assert_same([other.batch(n) for n in (3, 0, 4)], [sequence[3], sequence[0], sequence[4]])


# --- the loader: workers and in-process, one sequence ---------------------------------------------------


def _sampled(volumes, workers: int, steps: int = 3):
    from medseg.data.loader import SampledBatches

    return SampledBatches(_sampler(volumes, seed=6, batch_size=2), steps, workers)


def test_worker_processes_give_the_in_process_batches():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    in_process = _sampled(volumes, workers=0)
    expected = [batch for _ in range(2) for batch in in_process]  # two epochs of 3
    workers = _sampled(volumes, workers=2)
    _assert_close([batch for _ in range(2) for batch in workers], expected)
    assert workers.state_dict() == in_process.state_dict() == {"batches": 6}


def test_worker_state_dict_resumes_the_sequence():
    volumes = [_coded_volume(s, i) for i, s in enumerate(SHAPES)]
    in_process = _sampled(volumes, workers=0)
    expected = [batch for _ in range(3) for batch in in_process]
    first = _sampled(volumes, workers=2)
    head = list(first)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # the workers have rendered ahead; the state has not
    buffer.seek(0)
    resumed = _sampled(volumes, workers=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_close(head + list(resumed) + list(resumed), expected)


def _write_case(folder, name: str, seed: int):
    import nibabel as nib
    import numpy as np

    from medseg.data.cases import Case

    """A 16^3 case (image and two-class label) written as NIfTI files into `folder`."""
    generator = np.random.default_rng(seed)
    image = generator.normal(size=(16, 16, 16)).astype(np.float32) + 5
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:10, 5:12, 3:9] = 1
    label[11:14, 2:6, 10:14] = 2
    paths = [folder / f"{name}.nii.gz", folder / f"{name}_seg.nii.gz"]
    for path, array in zip(paths, (image, label)):
        nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.5, 1.0])), str(path))
    return Case(name, (paths[0],), paths[1])


def _training_config(*overrides: str) -> config.Config:
    return config.load(None, ["train.patch_size=[8,8,8]", "train.batch_size=2", "train.iterations_per_epoch=2",
                              "train.workers=0", *overrides])


def _preprocessing():
    from medseg.data.transforms import Preprocessing

    return Preprocessing((1.0, 1.0, 1.5), "zscore", 1, 3)


def test_training_batches_on_workers_and_on_the_device_are_the_same(tmp_path):
    from medseg.data.loader import training_batches

    cases = [_write_case(tmp_path, f"case{i}", i) for i in range(2)]
    runs = {}
    for name, extra in (("workers", ["data.sampler=workers", "train.workers=2"]), ("device", ["data.sampler=device"])):
        batches = training_batches(cases, _preprocessing(), _training_config(*extra), None, CPU)
        runs[name] = [batch for _ in range(2) for batch in batches]
    _assert_close(runs["workers"], runs["device"])
    assert any(bool((b["label"] > 0).any()) for b in runs["workers"])


def test_training_batches_come_from_a_disk_cache(tmp_path):
    from medseg.data.loader import training_batches, training_volumes

    source = tmp_path / "data"
    source.mkdir()
    cases = [_write_case(source, f"case{i}", i) for i in range(2)]
    cfg = _training_config("data.cache=disk")
    cache = tmp_path / "cache"
    written = list(itertools.islice(training_batches(cases, _preprocessing(), cfg, cache, CPU), 2))
    assert len(list(cache.iterdir())) == 2  # one file per preprocessed case
    volumes = training_volumes(cases, _preprocessing(), cfg, cache)
    for case in cases:  # from here on only the cache can give the volumes
        for path in (*case.images, case.label):
            path.unlink()
    again = training_volumes(cases, _preprocessing(), cfg, cache)
    for first, second in zip(volumes, again, strict=True):
        assert torch.equal(first["image"], second["image"]) and torch.equal(first["label"], second["label"])
    _assert_same(list(itertools.islice(training_batches(cases, _preprocessing(), cfg, cache, CPU), 2)), written)


def test_impossible_recipe_fails_before_the_volumes_are_read(tmp_path):
    from medseg.data.cases import Case
    from medseg.data.loader import training_batches
    from medseg.errors import ConfigError

    missing = Case("missing", (tmp_path / "missing.nii.gz",), tmp_path / "missing_seg.nii.gz")
    with pytest.raises(ConfigError, match=r"augment\.gamma_prob"):
        training_batches([missing], _preprocessing(), _training_config("augment.gamma_prob=2"), None, CPU)
