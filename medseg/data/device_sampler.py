"""Patch sampling and augmentation, a whole batch at a time, on any torch device.

`DevicePatchSampler` is the one implementation of training-patch sampling and of nnU-Net's
augmentation recipe (`medseg.data.augmentation`, its settings the `augment:` section). It keeps the
preprocessed volumes on its device (or in CPU memory when they are too large) and produces a batch
with a few dozen batched torch operations. On CUDA it renders each batch on the GPU beside the
training step; without CUDA `medseg.data.loader` runs it on the CPU, in DataLoader worker
processes or in the training process, so CPU- and GPU-trained models see the same data.

1. On the host, from a generator seeded by the run's seed and the batch's number: every random
   choice of the batch (cases, patch positions, the augmentation's parameters). These are a few
   hundred numbers, worked out in plain Python (tiny tensor ops would cost more host time than
   the sampling saves) and sent to the device in one copy: no device synchronisation, and the
   batches do not depend on the device. Batch n is a function of the seed and n alone, so any
   process can render any batch: worker processes render every k-th one, and a resumed run
   continues at the batch it stopped at.
2. On the device: one sampling grid per sample in the volume's voxel coordinates (identity for an
   unaugmented sample, rotation * scale * mirroring otherwise), `grid_sample` of the image
   (bilinear) and the label (nearest where the grid stays on voxels; for rotated or scaled
   samples each class's indicator trilinearly and the largest taken, nnU-Net's mode_seg
   'bilinear'), then noise, blur, brightness, contrast, low resolution and gamma for the whole
   batch (`augmentation.apply_intensity`).

Rotated and scaled patches are sampled from the volume around the patch, not from an already
cropped patch, so their corners hold image rather than zeros; a foreground-centred patch stays
centred on its voxel near the volume's border (nnU-Net's sampler does this on the upper side of
each axis), so in cases smaller than the patch the foreground moves in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import AugmentConfig
from medseg.data.augmentation import (SampleAugmentation, apply_intensity, blur_taps, check_recipe, draw_sample,
                                      intensity_values, uniforms_per_sample)

# Foreground voxels listed per case and class; a bounded random subset keeps memory small for
# large structures.
MAX_INDICES_PER_CLASS = 20_000

# Classes interpolated together when resampling a rotated or scaled label (bounds the memory).
_LABEL_CLASSES_PER_PASS = 16
# Uniform numbers drawn per sample for the case and patch position (the augmentation's follow).
_POSITION_DRAWS = 7

Matrix = list[list[float]]


@dataclass
class _Volume:
    """One case as the sampler keeps it."""

    image: torch.Tensor  # (C, X, Y, Z) float32, on the device or in CPU memory
    label: torch.Tensor  # (1, X, Y, Z) uint8, next to the image
    shape: tuple[int, int, int]  # spatial shape before the padding to at least 2 voxels
    # Flat voxel indices (CPU, int64) of each foreground class present in the case.
    foreground: list[torch.Tensor]


@dataclass
class _Draw:
    """One batch's random choices, as plain Python numbers (one entry per sample)."""

    cases: list[int]
    corners: list[list[int]]  # the patch's first voxel, in volume coordinates (may be negative)
    augmentations: list[SampleAugmentation]
    noise_seed: int = 0


class DevicePatchSampler:
    """Endless batches of random, augmented patches drawn on `device` with batched torch ops.

    `volumes`: preprocessed cases, each `{"image": (C, X, Y, Z) float, "label": (1, X, Y, Z) int}`
    with class indices below `num_classes`. Every batch is
    `{"image": (B, C, *patch_size) float32, "label": (B, 1, *patch_size) uint8}` on `device`.

    Cases are drawn uniformly with replacement. With probability `foreground_fraction` a patch is
    centred on a random voxel of a random foreground class present in the case (classes equally
    likely), reaching beyond the volume where the voxel lies near its border; otherwise its
    position is uniformly random, inside the volume where the volume is at least as large as the
    patch and centred where it is smaller. Outside the volume the image is 0 and the label
    background.

    `augment`: the recipe (`augment:` settings); with `augment.enabled` false the patches are
    plain slices. Batch n comes from a generator seeded with (`seed`, n): the same seed and
    volumes give the same batches on every device and in every process (`batch(n)`), and
    `state_dict()` / `load_state_dict()` continue a sequence exactly.

    `resident_bytes`: keep the volumes on `device` when they take at most this many bytes
    (None: always); otherwise keep them in CPU memory and copy to the device, per sample, only the
    box of voxels its patch reads. Both give identical batches.
    """

    def __init__(self, volumes: Sequence[dict], patch_size: Sequence[int], num_classes: int,
                 batch_size: int, foreground_fraction: float, augment: AugmentConfig,
                 device: torch.device, seed: int, resident_bytes: int | None = None,
                 max_indices_per_class: int = MAX_INDICES_PER_CLASS) -> None:
        if not volumes:
            raise ValueError("DevicePatchSampler needs at least one volume")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes, got {list(patch_size)}")
        if not 2 <= num_classes <= 256:
            raise ValueError(f"num_classes must be in 2..256 (labels are kept as uint8), got {num_classes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        check_recipe(augment)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment
        self.seed = int(seed)
        self._taps = blur_taps(augment)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # the noise generator's device
        self.device = device
        # The noise is the only volume of random numbers: drawn on the device by its own generator,
        # reseeded every batch from the batch's draw.
        self._noise_generator = torch.Generator(device=device)
        self._position = 0  # the number of the next batch handed out

        prepared = [self._prepare(i, v) for i, v in enumerate(volumes)]
        total = sum(image.nbytes + label.nbytes for image, label, _ in prepared)
        self.resident = resident_bytes is None or total <= resident_bytes
        # Host-to-device copies go through pinned buffers, so they are asynchronous. Streamed boxes
        # are staged in pinned memory rather than kept in pinned volumes: a box is not contiguous,
        # so copying it from a pinned volume would gather it into pageable memory first anyway,
        # and pinning a whole dataset locks far more host memory than a batch needs.
        self._pin = self.device.type == "cuda"
        home = self.device if self.resident else torch.device("cpu")
        subsets = torch.Generator().manual_seed(self.seed)  # which foreground voxels are listed
        self._volumes = [
            _Volume(image.to(home).contiguous(), label.to(home).contiguous(), shape,
                    self._foreground_indices(label, shape, max_indices_per_class, subsets))
            for image, label, shape in prepared
        ]
        self.channels = self._volumes[0].image.shape[0]
        if any(v.image.shape[0] != self.channels for v in self._volumes):
            raise ValueError("all volumes must have the same number of image channels")
        # Patch voxel offsets from the patch centre, per axis: the grids are built from these.
        self._offsets = [torch.arange(s, dtype=torch.float32, device=self.device) - (s - 1) / 2
                         for s in self.patch_size]
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the volumes are copied
        # The batch rendered ahead: (its number, batch, its end on the side stream).
        self._ahead: tuple[int, dict[str, torch.Tensor], torch.cuda.Event] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches forever, from the sampler's position on; all iterators share it."""
        while True:
            yield self._next()

    def batch(self, number: int) -> dict[str, torch.Tensor]:
        """Batch `number` of the sequence, rendered now (on this sampler's device)."""
        return self._render(self._draw(number))

    def state_dict(self) -> dict:
        """The number of batches handed out: enough to continue the sequence exactly."""
        return {"batches": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict()`: the next batch is the one that would have followed.
        A state saved before batches were numbered (a generator state) starts the sequence over."""
        self._ahead = None
        self._position = int(state.get("batches", 0))

    def _next(self) -> dict[str, torch.Tensor]:
        number = self._position
        self._position += 1
        if self._stream is None:
            return self.batch(number)
        # On CUDA each batch is rendered one step ahead on a side stream, so its few dozen small
        # kernels run on the GPU beside the training step that uses the batch before it, instead of
        # between two steps. The consumer's stream waits for the batch on the GPU (no host sync).
        ahead = self._ahead if self._ahead is not None and self._ahead[0] == number else self._render_ahead(number)
        _, batch, rendered = ahead
        self._ahead = self._render_ahead(number + 1)
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(rendered)  # this batch only, not the one just started
        for tensor in batch.values():
            # Memory made on the side stream must not be reused before the consumer is done with it.
            tensor.record_stream(consumer)
        return batch

    def _render_ahead(self, number: int) -> tuple[int, dict[str, torch.Tensor], torch.cuda.Event]:
        with torch.cuda.stream(self._stream):
            batch = self.batch(number)
            rendered = torch.cuda.Event()
            rendered.record(self._stream)
        return number, batch, rendered

    # --- construction ---------------------------------------------------------------------------------

    def _prepare(self, index: int, volume: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        # MetaTensors and arrays become plain tensors: the sampler needs no metadata.
        image = torch.as_tensor(volume["image"]).as_subclass(torch.Tensor).float()
        label = torch.as_tensor(volume["label"]).as_subclass(torch.Tensor)
        if image.ndim != 4 or label.ndim != 4 or label.shape[0] != 1 or image.shape[1:] != label.shape[1:]:
            raise ValueError(f"volume {index}: expected image (C, X, Y, Z) and label (1, X, Y, Z) of the same "
                             f"spatial shape, got {tuple(image.shape)} and {tuple(label.shape)}")
        shape = tuple(int(s) for s in image.shape[1:])
        if min(shape) < 1:
            raise ValueError(f"volume {index} is empty: {shape}")
        if label.dtype.is_floating_point:
            label = label.round()
        low, high = int(label.min()), int(label.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"volume {index}: label values must be in 0..{self.num_classes - 1}, got {low}..{high}")
        label = label.to(torch.uint8)
        # grid_sample with align_corners=True maps every coordinate of a 1-voxel axis onto that
        # voxel; a zero second voxel makes "outside is zero" hold there too.
        pad = [p for s in reversed(shape) for p in (0, max(2 - s, 0))]
        if any(pad):
            image, label = F.pad(image, pad), F.pad(label, pad)
        return image, label, shape  # type: ignore[return-value]

    def _foreground_indices(self, label: torch.Tensor, shape: tuple[int, int, int], most: int,
                            generator: torch.Generator) -> list[torch.Tensor]:
        # One pass over the volume and a sort of its foreground voxels, whatever the number of
        # classes. Flat indices refer to the unpadded shape.
        flat = label[0, :shape[0], :shape[1], :shape[2]].cpu().reshape(-1)
        where = flat.nonzero().squeeze(1)
        classes = flat[where].long()
        order = torch.argsort(classes, stable=True)
        counts = torch.bincount(classes, minlength=self.num_classes).tolist()
        present = []
        for indices in torch.split(where[order], counts)[1:]:
            if len(indices) > most:
                indices = indices[torch.randperm(len(indices), generator=generator)[:most]]
            if len(indices):
                present.append(indices.clone())  # a copy, so the list of all voxels can be freed
        return present

    # --- one batch: the random choices, on the host -----------------------------------------------------

    def _draw(self, number: int) -> _Draw:
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, number))
        b = self.batch_size
        # One call for all of the batch's uniforms, always the same number per batch.
        augmented = self.augment.enabled
        columns = _POSITION_DRAWS + (uniforms_per_sample(self.channels) if augmented else 0)
        draws = torch.rand(b, columns, generator=generator, dtype=torch.float64).tolist()
        cases, corners, augmentations = [], [], []
        for u in draws:
            case = _pick(u[0], len(self._volumes))
            cases.append(case)
            corners.append(self._corner(self._volumes[case], u[1:_POSITION_DRAWS]))
            augmentations.append(draw_sample(self.augment, u[_POSITION_DRAWS:], self.channels) if augmented
                                 else SampleAugmentation.identity(self.channels))
        noise_seed = int(torch.randint(2**62, (1,), generator=generator)) if augmented else 0
        return _Draw(cases, corners, augmentations, noise_seed)

    def _corner(self, volume: _Volume, u: list[float]) -> list[int]:
        """The patch's first voxel from uniforms u: [foreground?, class, voxel, x, y, z]."""
        voxel = None
        if u[0] < self.foreground_fraction and volume.foreground:
            indices = volume.foreground[_pick(u[1], len(volume.foreground))]
            voxel = _unravel(int(indices[_pick(u[2], len(indices))]), volume.shape)
        if voxel is not None:
            # Centred on the voxel wherever it lies, reaching beyond the volume if need be (zeros
            # there), so the foreground is seen at every position in the patch, also in cases
            # smaller than the patch. (nnU-Net bounds this shift on the lower side only.)
            return [v - patch // 2 for v, patch in zip(voxel, self.patch_size)]
        corner = []
        for axis, (size, patch) in enumerate(zip(volume.shape, self.patch_size)):
            # Random patches: inside the volume where it is larger than the patch, centred where it
            # is smaller (MONAI's SpatialPad and crop-centre correction, nnU-Net's bbox).
            need = max(patch - size, 0)
            low, high = -(need // 2), size - patch + need - need // 2
            corner.append(low + _pick(u[3 + axis], high - low + 1))
        return corner

    # --- one batch: the work on the device --------------------------------------------------------------

    def _render(self, draw: _Draw) -> dict[str, torch.Tensor]:
        boxes, params = [], []
        matrices = [a.matrix for a in draw.augmentations]
        for case, corner, matrix in zip(draw.cases, draw.corners, matrices):
            box, grid = self._box_and_grid(self._volumes[case], corner, matrix)
            boxes.append(box)
            params += grid
        params += intensity_values(draw.augmentations, self._taps)
        b = len(draw.cases)
        # One host-to-device copy for all of the batch's numbers.
        values = torch.tensor(params, dtype=torch.float32)
        if self._pin:
            values = values.pin_memory()
        values = values.to(self.device, non_blocking=True)
        geometry = values[:b * 12].view(b, 12)
        weights = geometry[:, :9].view(b, 3, 3)  # [sample, patch axis, grid axis]
        origin = geometry[:, 9:]

        # Separable in the patch axes: three small products and three broadcast sums, in plain
        # float32 arithmetic (a matmul could run in TF32 and move the identity grid off the voxels).
        x, y, z = (self._offsets[k][None, :, None] * weights[:, k, None, :] for k in range(3))
        grid = origin[:, None, None, None] + x[:, :, None, None] + y[:, None, :, None] + z[:, None, None, :]

        images, labels = [], []
        for i, (case, box, matrix) in enumerate(zip(draw.cases, boxes, matrices)):
            volume = self._volumes[case]
            region = (slice(None), *(slice(lo, hi) for lo, hi in box))
            image = self._fetch(volume.image[region])
            label = self._fetch(volume.label[region])
            sample_grid = grid[i:i + 1]
            images.append(F.grid_sample(image[None], sample_grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=True))
            if _on_voxels(matrix):  # identity or mirroring: every grid point is a voxel, nearest is exact
                labels.append(F.grid_sample(label[None].float(), sample_grid, mode="nearest", padding_mode="zeros",
                                            align_corners=True))
            else:
                labels.append(_linear_label(label, sample_grid, self.num_classes))
        image = apply_intensity(torch.cat(images), draw.augmentations, values[b * 12:], self._taps,
                                self._noise_generator, draw.noise_seed)
        return {"image": image, "label": torch.cat(labels).to(torch.uint8)}

    def _box_and_grid(self, volume: _Volume, corner: list[int],
                      matrix: Matrix) -> tuple[list[tuple[int, int]], list[float]]:
        """The volume box a sample's grid reads, and the grid's parameters (12 numbers).

        The box: clipped to the volume, at least 2 voxels wide (grid_sample's normalisation).
        The grid: patch voxel offset o from the patch centre c maps to volume voxel c + M o, in
        grid_sample's normalised coordinates of the box (last axis first):
        (c - box start + M o) * 2 / (box size - 1) - 1.
        """
        box, scale, origin = [], [], []
        for axis in range(3):
            centre = corner[axis] + (self.patch_size[axis] - 1) / 2
            # Half the extent of the (rotated, scaled) patch along this axis.
            extent = sum(abs(m) * (p - 1) / 2 for m, p in zip(matrix[axis], self.patch_size))
            # Bilinear reads floor(x) and floor(x) + 1; one more voxel each side against rounding.
            size = volume.image.shape[1 + axis]
            first = min(max(math.floor(centre - extent) - 1, 0), size - 2)
            last = max(min(math.floor(centre + extent) + 3, size), first + 2)
            box.append((first, last))
            scale.append(2.0 / (last - first - 1))
            origin.append((centre - first) * scale[-1] - 1)
        # weights[k][a]: how patch axis k moves grid axis a; grid axes are volume axes reversed.
        weights = [matrix[a][k] * scale[a] for k in range(3) for a in (2, 1, 0)]
        return box, weights + origin[::-1]

    def _fetch(self, box: torch.Tensor) -> torch.Tensor:
        """A box of a volume on the device: the view itself when resident, else a copy."""
        if box.device == self.device:
            return box
        if self._pin:
            staging = torch.empty(box.shape, dtype=box.dtype, pin_memory=True)
            staging.copy_(box)
            return staging.to(self.device, non_blocking=True)
        return box.to(self.device)


def _batch_seed(seed: int, number: int) -> int:
    """The seed of batch `number`'s generator: (seed, number) hashed by NumPy's SeedSequence, so
    neighbouring seeds (the ranks of a multi-GPU run) and numbers give unrelated streams."""
    return int(np.random.SeedSequence([seed % 2**64, number]).generate_state(1, np.uint64)[0])


def _pick(u: float, n: int) -> int:
    """An index in 0..n-1 from a uniform number in [0, 1)."""
    return min(int(u * n), n - 1)


def _on_voxels(matrix: Matrix) -> bool:
    """Whether the matrix only permutes and mirrors axes, so every grid point lands on a voxel."""
    return all(v in (-1.0, 0.0, 1.0) for row in matrix for v in row)


def _linear_label(label: torch.Tensor, grid: torch.Tensor, classes: int,
                  per_pass: int = _LABEL_CLASSES_PER_PASS) -> torch.Tensor:
    """nnU-Net's label resampling under rotation and scaling (mode_seg 'bilinear'): each class's
    indicator interpolated trilinearly through `grid`, the label the class of the largest value
    (the lowest of equal ones), `per_pass` classes at a time. Outside the volume every indicator
    is 0: background.

    `label`: (1, X, Y, Z) integer; returns (1, 1, *grid) float class indices.
    """
    best = index = None
    for first in range(0, classes, per_pass):
        ids = torch.arange(first, min(first + per_pass, classes), device=label.device)
        indicators = (label.long() == ids.view(-1, 1, 1, 1)).float()
        sampled = F.grid_sample(indicators[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        value, which = sampled.max(0)
        if best is None:
            best, index = value, which
        else:
            better = value > best  # strictly: equal values keep the lower class
            best, index = torch.where(better, value, best), torch.where(better, which + first, index)
    return index.float()[None, None]


def _unravel(flat: int, shape: tuple[int, int, int]) -> list[int]:
    return [flat // (shape[1] * shape[2]), (flat // shape[2]) % shape[1], flat % shape[2]]
