"""Patch sampling and augmentation on the training device, a whole batch at a time.

The MONAI pipeline (`training_augmentation()`) draws one patch per call in DataLoader workers on
the CPU. With small volumes and a fast GPU those workers cannot keep up with the training step.
`DevicePatchSampler` keeps the preprocessed volumes on the device (or in CPU memory when they are
too large) and produces a batch with a few dozen batched torch operations:

1. On the host, from one seeded `torch.Generator`: every random choice of the batch (cases, patch
   positions, rotation/scale/mirroring, intensity parameters) and everything derived from them.
   These are a few hundred numbers, worked out in plain Python (tiny tensor ops would cost more
   host time than the sampling saves) and sent to the device in one copy: no device
   synchronisation, and the batches do not depend on the device.
2. On the device: one sampling grid per sample in the volume's voxel coordinates (identity for an
   unaugmented sample, rotation * scale * mirroring otherwise), `grid_sample` of the image
   (bilinear) and the label (nearest where the grid stays on voxels; for rotated or scaled
   samples each class's indicator trilinearly and the largest taken, nnU-Net's mode_seg
   'bilinear'), then noise, blur, brightness, contrast, low resolution and gamma for the whole
   batch.

The augmentation follows `training_augmentation()` (nnU-Net's defaults), with three differences:
rotated and scaled patches are sampled from the volume around the patch, not from the already
cropped patch, so their corners hold image rather than zeros; their labels are interpolated as
nnU-Net's (the MONAI pipeline takes the nearest voxel's); and a foreground-centred patch stays
centred on its voxel near the volume's border (nnU-Net's sampler does this on the upper side of
each axis), where the MONAI crop keeps the patch inside the padded volume. In cases smaller than
the patch the MONAI crop therefore always sits at the same place; here the foreground moves in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from medseg.data.transforms import bg_between, blur_kernel

# Foreground voxels listed per case and class; a bounded random subset keeps memory small for
# large structures (as `patch_sampling()`'s ClassesToIndicesd).
MAX_INDICES_PER_CLASS = 20_000

# nnU-Net's defaults, as in `training_augmentation()`: rotation and scaling are drawn
# independently, the scaling is the same along every axis.
ROTATION_PROB, SCALE_PROB = 0.2, 0.2
MAX_ROTATION = math.pi / 6  # radians, about each axis
SCALE_RANGE = (0.7, 1.4)  # one factor for all axes
NOISE_PROB, MAX_NOISE_STD = 0.1, 0.1
# Gaussian blur with probability 0.2 per sample, then each channel with probability 0.5 (nnU-Net:
# p_per_channel 0.5), a sigma per channel and axis; nnU-Net's kernel (the Gaussian sampled at
# integer offsets, about 6 sigma wide, normalised to sum 1), the border reflected.
BLUR_PROB, BLUR_CHANNEL_PROB, BLUR_SIGMA = 0.2, 0.5, (0.5, 1.0)
BRIGHTNESS_PROB, MAX_BRIGHTNESS = 0.15, 0.25
CONTRAST_PROB, MAX_CONTRAST = 0.15, 0.25  # deviations from the mean scaled by 1 ± 0.25, range kept
# Simulated low resolution as nnU-Net's: with probability 0.25 per sample, then each channel with
# probability 0.5 (nnU-Net: p_per_channel 0.5) and its own zoom (the same for all axes): down by
# 'nearest-exact' (the voxel nearest each coarse voxel's centre, so the image does not move against
# the label) and up again by trilinear interpolation.
LOW_RESOLUTION_PROB, LOW_RESOLUTION_CHANNEL_PROB, LOW_RESOLUTION_ZOOM = 0.25, 0.5, (0.5, 1.0)
INVERTED_GAMMA_PROB = 0.1  # gamma of the inverted image, as nnU-Net's second gamma transform
# Both gammas: each channel its own gamma, with probability 0.5 from (0.7, 1) and otherwise from
# (1, 1.5) (nnU-Net's BGContrast sampling), keeping the channel's mean and standard deviation.
GAMMA_PROB, GAMMA_RANGE = 0.3, (0.7, 1.5)
FLIP_PROB = 0.5

# The widest blur kernel: nnU-Net's kernel for sigma 1 has 7 taps (`blur_kernel`). Narrower kernels
# are padded with zeros, which changes nothing.
_BLUR_TAIL = 3
# MONAI AdjustContrast's epsilon.
_GAMMA_EPSILON = 1e-7
_BLUR_TAPS = 2 * _BLUR_TAIL + 1
# Classes interpolated together when resampling a rotated or scaled label (bounds the memory).
_LABEL_CLASSES_PER_PASS = 16
# Uniform numbers drawn per sample and batch: 7 for the case and patch position, 19 for the
# augmentation, and 10 more for each image channel (blur, low resolution and gammas per channel).
_POSITION_DRAWS, _AUGMENT_DRAWS, _CHANNEL_DRAWS = 7, 19, 10

Matrix = list[list[float]]
_IDENTITY: Matrix = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


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
    matrices: list[Matrix] = field(default_factory=list)  # patch offset -> volume offset: rotation @ scale @ mirror
    noise_std: list[float] = field(default_factory=list)  # 0: no noise
    blur_sigma: list[list[list[float]]] = field(default_factory=list)  # per channel and axis; 0: no blur
    brightness: list[float] = field(default_factory=list)  # multiplicative factor; 1: unchanged
    contrast: list[float] = field(default_factory=list)  # factor on the deviation from the mean; 1: unchanged
    # Per channel: zoom of the simulated acquisition; 1: unchanged.
    low_resolution: list[list[float]] = field(default_factory=list)
    inverted_gamma: list[list[float]] = field(default_factory=list)  # per channel, of the inverted image; 1: unchanged
    gamma: list[list[float]] = field(default_factory=list)  # per channel; 1: unchanged
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
    patch and centred where it is smaller (as MONAI's crop after `SpatialPadd`). Outside the volume
    the image is 0 and the label background.

    With `augment`, each sample gets nnU-Net's augmentation (see `training_augmentation()`).
    All randomness comes from one generator seeded with `seed`: the same seed and volumes give the
    same batches, and `state_dict()` / `load_state_dict()` continue a sequence exactly.

    `resident_bytes`: keep the volumes on `device` when they take at most this many bytes
    (None: always); otherwise keep them in CPU memory and copy to the device, per sample, only the
    box of voxels its patch reads. Both give identical batches.
    """

    def __init__(self, volumes: Sequence[dict], patch_size: Sequence[int], num_classes: int,
                 batch_size: int, foreground_fraction: float, augment: bool,
                 device: torch.device, seed: int, resident_bytes: int | None = None) -> None:
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
        self.patch_size = tuple(int(s) for s in patch_size)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.foreground_fraction = float(foreground_fraction)
        self.augment = augment
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # the noise generator's device
        self.device = device
        self._generator = torch.Generator().manual_seed(seed)
        # The noise is the only volume of random numbers: drawn on the device by its own generator,
        # reseeded every batch from the main one, so the main generator's state is the whole state.
        self._noise_generator = torch.Generator(device=device)

        prepared = [self._prepare(i, v) for i, v in enumerate(volumes)]
        total = sum(image.nbytes + label.nbytes for image, label, _ in prepared)
        self.resident = resident_bytes is None or total <= resident_bytes
        # Host-to-device copies go through pinned buffers, so they are asynchronous. Streamed boxes
        # are staged in pinned memory rather than kept in pinned volumes: a box is not contiguous,
        # so copying it from a pinned volume would gather it into pageable memory first anyway,
        # and pinning a whole dataset locks far more host memory than a batch needs.
        self._pin = self.device.type == "cuda"
        home = self.device if self.resident else torch.device("cpu")
        self._volumes = [
            _Volume(image.to(home).contiguous(), label.to(home).contiguous(), shape,
                    self._foreground_indices(label, shape))
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
        # The batch rendered ahead: (generator state before its draw, batch, its end on the side stream).
        self._ahead: tuple[torch.Tensor, dict[str, torch.Tensor], torch.cuda.Event] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches forever; all iterators share the sampler's random state."""
        while True:
            yield self._next()

    def state_dict(self) -> dict:
        """The random state (a CPU byte tensor): enough to continue the batch sequence exactly."""
        if self._ahead is not None:  # the batch drawn ahead has not been handed out yet
            return {"generator": self._ahead[0].clone()}
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict()`: the next batch is the one that would have followed."""
        self._ahead = None
        self._generator.set_state(state["generator"].cpu())

    def _next(self) -> dict[str, torch.Tensor]:
        if self._stream is None:
            return self._render(self._draw())
        # On CUDA each batch is rendered one step ahead on a side stream, so its few dozen small
        # kernels run on the GPU beside the training step that uses the batch before it, instead of
        # between two steps. The consumer's stream waits for the batch on the GPU (no host sync).
        _, batch, rendered = self._ahead if self._ahead is not None else self._render_ahead()
        self._ahead = self._render_ahead()
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(rendered)  # this batch only, not the one just started
        for tensor in batch.values():
            # Memory made on the side stream must not be reused before the consumer is done with it.
            tensor.record_stream(consumer)
        return batch

    def _render_ahead(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.cuda.Event]:
        state = self._generator.get_state()
        with torch.cuda.stream(self._stream):
            batch = self._render(self._draw())
            rendered = torch.cuda.Event()
            rendered.record(self._stream)
        return state, batch, rendered

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

    def _foreground_indices(self, label: torch.Tensor, shape: tuple[int, int, int]) -> list[torch.Tensor]:
        # One pass over the volume and a sort of its foreground voxels, whatever the number of
        # classes. Flat indices refer to the unpadded shape.
        flat = label[0, :shape[0], :shape[1], :shape[2]].cpu().reshape(-1)
        where = flat.nonzero().squeeze(1)
        classes = flat[where].long()
        order = torch.argsort(classes, stable=True)
        counts = torch.bincount(classes, minlength=self.num_classes).tolist()
        present = []
        for indices in torch.split(where[order], counts)[1:]:
            if len(indices) > MAX_INDICES_PER_CLASS:
                indices = indices[torch.randperm(len(indices), generator=self._generator)[:MAX_INDICES_PER_CLASS]]
            if len(indices):
                present.append(indices.clone())  # a copy, so the list of all voxels can be freed
        return present

    # --- one batch: the random choices, on the host -----------------------------------------------------

    def _draw(self) -> _Draw:
        b = self.batch_size
        # One call for all of the batch's uniforms, always the same number per batch.
        columns = _POSITION_DRAWS + (_AUGMENT_DRAWS + _CHANNEL_DRAWS * self.channels if self.augment else 0)
        draws = torch.rand(b, columns, generator=self._generator, dtype=torch.float64).tolist()
        cases, corners = [], []
        for u in draws:
            case = _pick(u[0], len(self._volumes))
            cases.append(case)
            corners.append(self._corner(self._volumes[case], u[1:_POSITION_DRAWS]))
        if not self.augment:
            return _unaugmented(cases, corners, self.channels)

        draw = _Draw(cases, corners)
        for u in draws:
            (rotate, ax, ay, az, scale, factor_u, contrast, noise, noise_std, blur, bright, factor,
             gamma_u, fx, fy, fz, contrast_u, low_u, inverted_u) = u[_POSITION_DRAWS:_POSITION_DRAWS + _AUGMENT_DRAWS]
            matrix = _IDENTITY
            if rotate < ROTATION_PROB:
                matrix = _rotation([MAX_ROTATION * (2 * v - 1) for v in (ax, ay, az)])
            if scale < SCALE_PROB:
                k = _between(factor_u, SCALE_RANGE)
                matrix = [[m * k for m in row] for row in matrix]
            # Mirroring a patch axis is negating its offsets: a sign on the matrix column. It
            # commutes with the intensity changes, so doing it first changes nothing.
            mirror = [-1.0 if v < FLIP_PROB else 1.0 for v in (fx, fy, fz)]
            draw.matrices.append([[m * f for m, f in zip(row, mirror)] for row in matrix])
            draw.noise_std.append(MAX_NOISE_STD * noise_std if noise < NOISE_PROB else 0.0)
            draw.brightness.append(1 + MAX_BRIGHTNESS * (2 * factor - 1) if bright < BRIGHTNESS_PROB else 1.0)
            draw.contrast.append(1 + MAX_CONTRAST * (2 * contrast_u - 1) if contrast < CONTRAST_PROB else 1.0)
            sigmas, zooms, inverted_gammas, gammas = [], [], [], []
            for c in range(self.channels):
                start = _POSITION_DRAWS + _AUGMENT_DRAWS + _CHANNEL_DRAWS * c
                (blur_c, sx, sy, sz, low_c, zoom, inverted_half, inverted, gamma_half,
                 gamma) = u[start:start + _CHANNEL_DRAWS]
                blurred = blur < BLUR_PROB and blur_c < BLUR_CHANNEL_PROB
                sigmas.append([_between(v, BLUR_SIGMA) for v in (sx, sy, sz)] if blurred else [0.0] * 3)
                coarse = low_u < LOW_RESOLUTION_PROB and low_c < LOW_RESOLUTION_CHANNEL_PROB
                zooms.append(_between(zoom, LOW_RESOLUTION_ZOOM) if coarse else 1.0)
                inverted_gammas.append(bg_between(inverted_half, inverted, GAMMA_RANGE)
                                       if inverted_u < INVERTED_GAMMA_PROB else 1.0)
                gammas.append(bg_between(gamma_half, gamma, GAMMA_RANGE) if gamma_u < GAMMA_PROB else 1.0)
            draw.blur_sigma.append(sigmas)
            draw.low_resolution.append(zooms)
            draw.inverted_gamma.append(inverted_gammas)
            draw.gamma.append(gammas)
        draw.noise_seed = int(torch.randint(2**62, (1,), generator=self._generator))
        return draw

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
        for case, corner, matrix in zip(draw.cases, draw.corners, draw.matrices):
            box, grid = self._box_and_grid(self._volumes[case], corner, matrix)
            boxes.append(box)
            params += grid
        blur = any(sigma > 0 for channels in draw.blur_sigma for sigmas in channels for sigma in sigmas)
        if self.augment:
            params += draw.noise_std + draw.brightness + draw.contrast
            params += [g for channels in draw.inverted_gamma + draw.gamma for g in channels]
        if blur:
            for channels in draw.blur_sigma:  # each sample's kernels, for each of its channels
                params += [w for sigmas in channels for sigma in sigmas for w in _blur_kernel(sigma)]
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
        for i, (case, box, matrix) in enumerate(zip(draw.cases, boxes, draw.matrices)):
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
        image = torch.cat(images)
        label = torch.cat(labels).to(torch.uint8)
        if self.augment:
            c = self.channels
            factors = values[b * 12:b * 15].view(3, b)  # noise std, brightness, contrast
            gammas = values[b * 15:b * (15 + 2 * c)].view(2, b, c)  # inverted gamma, gamma
            kernels = values[b * (15 + 2 * c):].view(-1, 3, _BLUR_TAPS) if blur else None
            image = self._intensity(image, draw, factors, gammas, kernels)
        return {"image": image, "label": label}

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

    def _intensity(self, image: torch.Tensor, draw: _Draw, factors: torch.Tensor, gammas: torch.Tensor,
                   kernels: torch.Tensor | None) -> torch.Tensor:
        """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, in
        `training_augmentation()`'s (nnU-Net's) order, for the whole batch.

        Each step runs only when some sample (or channel) of the batch gets it (known on the host);
        the others get identity parameters. `factors`: (3, B) noise std, brightness, contrast.
        `gammas`: (2, B, C) inverted gamma, gamma. `kernels`: (B * C, 3, taps), None when nothing
        is blurred.
        """
        noise_std, brightness, contrast = factors
        inverted_gamma, gamma = gammas
        per_sample = (-1,) + (1,) * (image.ndim - 1)
        per_channel = image.shape[:2] + (1,) * (image.ndim - 2)
        if any(std > 0 for std in draw.noise_std):
            self._noise_generator.manual_seed(draw.noise_seed)
            noise = torch.randn(image.shape, generator=self._noise_generator, device=image.device)
            image = image + noise * noise_std.view(per_sample)
        if kernels is not None:
            image = _blur(image, kernels)
        if any(factor != 1 for factor in draw.brightness):
            image = image * brightness.view(per_sample)
        if any(factor != 1 for factor in draw.contrast):
            image = torch.where((contrast != 1).view(per_sample), _contrast(image, contrast), image)
        if any(zoom != 1 for zooms in draw.low_resolution for zoom in zooms):
            image = _low_resolution(image, draw.low_resolution)
        if any(value != 1 for values in draw.inverted_gamma for value in values):
            chosen = (inverted_gamma != 1).view(per_channel)
            image = torch.where(chosen, -_gamma(-image, inverted_gamma), image)
        if any(value != 1 for values in draw.gamma for value in values):
            image = torch.where((gamma != 1).view(per_channel), _gamma(image, gamma), image)
        return image


def _unaugmented(cases: list[int], corners: list[list[int]], channels: int) -> _Draw:
    """A draw whose patches are plain slices: identity geometry and intensity."""
    b = len(cases)
    per_channel = [[1.0] * channels for _ in range(b)]
    return _Draw(cases, corners, matrices=[_IDENTITY] * b, noise_std=[0.0] * b,
                 blur_sigma=[[[0.0] * 3 for _ in range(channels)] for _ in range(b)],
                 brightness=[1.0] * b, contrast=[1.0] * b, low_resolution=per_channel,
                 inverted_gamma=[list(g) for g in per_channel], gamma=[list(g) for g in per_channel])


def _pick(u: float, n: int) -> int:
    """An index in 0..n-1 from a uniform number in [0, 1)."""
    return min(int(u * n), n - 1)


def _between(u: float, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _on_voxels(matrix: Matrix) -> bool:
    """Whether the matrix only permutes and mirrors axes, so every grid point lands on a voxel."""
    return all(v in (-1.0, 0.0, 1.0) for row in matrix for v in row)


def _linear_label(label: torch.Tensor, grid: torch.Tensor, classes: int) -> torch.Tensor:
    """nnU-Net's label resampling under rotation and scaling (mode_seg 'bilinear'): each class's
    indicator interpolated trilinearly through `grid`, the label the class of the largest value
    (the lowest of equal ones). Outside the volume every indicator is 0: background.

    `label`: (1, X, Y, Z) integer; returns (1, 1, *grid) float class indices.
    """
    best = index = None
    for first in range(0, classes, _LABEL_CLASSES_PER_PASS):
        ids = torch.arange(first, min(first + _LABEL_CLASSES_PER_PASS, classes), device=label.device)
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


def _rotation(angles: list[float]) -> Matrix:
    """Rx @ Ry @ Rz: MONAI's create_rotate (rotate_order "XYZ", as RandAffine uses it)."""
    (cx, cy, cz), (sx, sy, sz) = [math.cos(a) for a in angles], [math.sin(a) for a in angles]
    rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]]
    ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]]
    rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]]
    return _matmul(_matmul(rx, ry), rz)


def _matmul(a: Matrix, b: Matrix) -> Matrix:
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _blur_kernel(sigma: float) -> list[float]:
    """nnU-Net's kernel (`medseg.data.transforms.blur_kernel`) zero-padded to 2 * _BLUR_TAIL + 1
    taps; sigma 0 gives the identity kernel."""
    kernel = blur_kernel(sigma).tolist() if sigma > 0 else [1.0]
    padding = [0.0] * (_BLUR_TAIL - (len(kernel) - 1) // 2)
    return padding + kernel + padding


def _blur(image: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, the border reflected (nnU-Net's), one kernel per sample, channel
    and axis.

    `kernels`: (B * C, 3, taps), each sample's kernels for each of its channels. The batch's
    channels become the groups of one convolution per axis.
    """
    b, c = image.shape[:2]
    taps = kernels.shape[-1]
    x = image.reshape(1, b * c, *image.shape[2:])
    for axis in range(3):
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = taps
        padding = [0] * 6  # F.pad: last axis first
        padding[4 - 2 * axis] = padding[5 - 2 * axis] = taps // 2
        # Reflection needs more voxels than the padding; thinner axes (never a real patch) repeat the edge.
        mode = "reflect" if x.shape[2 + axis] > taps // 2 else "replicate"
        x = F.conv3d(F.pad(x, padding, mode=mode), kernels[:, axis].reshape(shape), groups=b * c)
    return x.reshape(image.shape)


def _gamma(image: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's AdjustContrast(retain_stats=True) per channel, as nnU-Net's GammaTransform: rescale
    each channel to [0, 1] by its min and max, raise to its `gamma` ((B, C)), rescale back, then
    restore the channel's mean and standard deviation."""
    flat = image.flatten(2)
    shape = image.shape[:2] + (1,) * (image.ndim - 2)
    mean, std = flat.mean(2).view(shape), flat.std(2).view(shape)
    low, high = torch.aminmax(flat, dim=2)
    low, span = low.view(shape), (high - low).view(shape)
    adjusted = ((image - low) / (span + _GAMMA_EPSILON)).pow(gamma.view(shape)) * span + low
    flat = adjusted.flatten(2)
    centred = adjusted - flat.mean(2).view(shape)
    return centred / (flat.std(2).view(shape) + 1e-8) * std + mean


def _contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """MONAI's ScaleIntensityFixedMean(preserve_range=True) per sample: deviations from the
    sample's mean scaled by `factor`, then clipped to the sample's original range."""
    flat = image.flatten(1)
    shape = (-1,) + (1,) * (image.ndim - 1)
    low, high = torch.aminmax(flat, dim=1)
    mean = flat.mean(1).view(shape)
    return torch.clamp((image - mean) * factor.view(shape) + mean, low.view(shape), high.view(shape))


def _low_resolution(image: torch.Tensor, zooms: list[list[float]]) -> torch.Tensor:
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
