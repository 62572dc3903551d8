"""Inference: sliding-window prediction, mapped back onto each input's own grid.

`predict(checkpoint, inputs, out_dir)` segments NIfTI/NRRD/MetaImage files and DICOM series with a
trained checkpoint alone (no config file): the checkpoint carries the model config and the
preprocessing. Each prediction is resampled back from the network's spacing and orientation with
MONAI's inverse transforms, so the written label map has exactly the input's shape and geometry.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from monai import transforms as T
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.errors import DataError, MedsegError, root_cause


@dataclass
class Prediction:
    """What happened to one input."""

    source: str
    output: Path | None = None
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Predictor:
    """A trained model ready for inference, with what it needs to know about its inputs."""

    model: nn.Module
    prep: Any  # medseg.data.transforms.Preprocessing
    patch_size: tuple[int, ...]
    device: torch.device
    amp_dtype: torch.dtype | None

    @classmethod
    def from_checkpoint(cls, path: Path, device: str = "auto") -> "Predictor":
        """Load a checkpoint or a one-fold model archive (`medseg export`; safely: weights and plain
        data only) and build its model."""
        from medseg import config
        from medseg.data.transforms import Preprocessing
        from medseg.errors import CheckpointError
        from medseg.export import load_states
        from medseg.models import build_model
        from medseg.device import amp_dtype, resolve_device

        states = load_states(path)
        if len(states) > 1:
            raise CheckpointError(f"{path}: holds {len(states)} folds; this predictor runs one network")
        state = states[0]
        try:
            cfg = config.from_dict(state["config"])
            prep = Preprocessing.from_dict(state["preprocessing"])
            model = build_model(cfg.replace(model={"checkpointing": "off"}), prep.channels, prep.num_classes, prep.spacing)
            model.load_state_dict(state["model"])
        except (KeyError, TypeError, RuntimeError, MedsegError) as exc:
            raise CheckpointError(f"{path}: checkpoint does not describe a medseg model ({exc.__class__.__name__})") from None
        torch_device = resolve_device(device)
        model.to(torch_device).eval()
        return cls(model, prep, tuple(cfg.train.patch_size), torch_device, amp_dtype("auto", torch_device))

    def prepare(self, case: Any) -> tuple[MetaTensor, T.Compose]:
        """Read and preprocess one input (`medseg.data.cases.InferenceInput`): the network's input
        and the chain that `segment` inverts to map the prediction back onto the input's grid."""
        return _load_case(case, self)

    def segment(self, image: MetaTensor, chain: T.Compose, output: Path, overlap: float = 0.5,
                mirror: bool = False, sw_batch_size: int = 4, save_probabilities: bool = False,
                largest_component: bool = False) -> Path:
        """Predict one preprocessed image and write its label map on the input's own grid."""
        from medseg.data.io import write_nifti

        scores = self.scores(image, overlap, mirror, sw_batch_size)
        probabilities = scores if mirror else scores.softmax(0)
        del scores
        restored = None
        if save_probabilities:  # all classes mapped back at once; the labels are their arg-max
            mapped = _restore_grid(probabilities.cpu(), image, chain, nearest=False)
            affine = np.asarray(mapped.affine, dtype=np.float64)
            restored = mapped.as_tensor()
            # Outside the cropped box the restored scores are all zero: that region is background.
            restored[0] = 1 - restored[1:].sum(0)
            labels = restored.argmax(0).to(torch.uint8).numpy()
        else:
            labels, affine = _restore_labels(probabilities, image, chain)
        if largest_component:
            labels = keep_largest_component(labels, range(1, self.prep.num_classes))
        write_nifti(labels, affine, output)
        if restored is not None:
            name = output.name.removesuffix(".nii.gz")
            write_nifti(restored.movedim(0, -1).numpy().astype(np.float32), affine,
                        output.with_name(f"{name}_probabilities.nii.gz"))
        return output

    @torch.no_grad()
    def scores(self, image: MetaTensor, overlap: float = 0.5, mirror: bool = False,
               sw_batch_size: int = 4) -> torch.Tensor:
        """Class scores (K, ...) on the network's grid: logits, or with `mirror` the mean softmax
        over all 8 combinations of flipping the three axes. Their argmax is the label. They stay
        where they were blended (the GPU, or host memory for very large volumes).
        """
        volume = image.as_tensor()[None]
        aggregate = aggregation_device(self.device, volume, self.prep.num_classes)
        return predict_scores(self.model, volume, self.patch_size, overlap, sw_batch_size, self.amp_dtype,
                              aggregate, mirror)[0]


def predict(checkpoint_path: Path, inputs: Sequence[Path], out_dir: Path, overlap: float = 0.5,
            mirror: bool = False, save_probabilities: bool = False, largest_component: bool = False,
            sw_batch_size: int = 4, device: str = "auto",
            on_result: Callable[[Prediction], None] | None = None) -> list[Prediction]:
    """Segment every input; write `<name>.nii.gz` label maps (and probabilities) into `out_dir`.

    A failing input is reported in its `Prediction.error` and the others still run. Loading and
    preprocessing of the next input run in a background thread while the current one is predicted.
    """
    from medseg.data.cases import find_inputs

    predictor = Predictor.from_checkpoint(checkpoint_path, device)
    cases = find_inputs(list(inputs), predictor.prep.channels)
    if not cases:
        raise DataError(f"{', '.join(map(str, inputs))}: no images or DICOM series found")
    out_dir = Path(out_dir)
    _make_output_folder(out_dir)
    results = []
    written: dict[str, str] = {}
    for case, loaded in _prefetch(cases, predictor):
        started = time.perf_counter()
        result = Prediction(case.source)
        try:
            if case.name in written:
                raise DataError(f"{case.source}: output {case.name}.nii.gz is already the prediction of "
                                f"{written[case.name]}; give inputs with different names")
            written[case.name] = case.source
            image, chain = loaded.result()
            original_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
            result.shape = tuple(int(n) for n in image.meta["spatial_shape"])
            result.spacing = tuple(float(s) for s in np.linalg.norm(original_affine[:3, :3], axis=0))
            result.output = predictor.segment(image, chain, out_dir / f"{case.name}.nii.gz", overlap, mirror,
                                              sw_batch_size, save_probabilities, largest_component)
        except MedsegError as exc:
            result.error = str(exc)
        except (RuntimeError, ValueError, OSError) as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            result.error = f"{case.source}: {_first_line(exc)}"
        result.seconds = time.perf_counter() - started
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def keep_largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Keep only the largest 26-connected component of each class; the rest becomes background."""
    from scipy import ndimage

    result = labels.copy()
    for cls in classes:
        components, count = ndimage.label(labels == cls, structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            result[(components != 0) & (components != sizes.argmax())] = 0
    return result


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int], overlap: float = 0.5,
                   sw_batch_size: int = 2, amp_dtype: torch.dtype | None = None,
                   aggregate_device: torch.device | None = None) -> torch.Tensor:
    """Logits (B, K, ...) of a whole preprocessed volume (B, C, ...) by Gaussian-weighted sliding windows.

    Windows run on the model's device under autocast; blending happens in float32 on
    `aggregate_device` (default: the model's device).
    """
    device = next(model.parameters()).device
    model.eval()
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = sliding_window_inference(
            image.to(device), roi_size=list(patch_size), sw_batch_size=sw_batch_size, predictor=model,
            overlap=overlap, mode="gaussian", sigma_scale=0.125, padding_mode="constant",
            sw_device=device, device=aggregate_device or device,
        )
    return logits.float()


def aggregation_device(device: torch.device, volume: torch.Tensor, num_classes: int,
                       memory_bytes: int | None = None) -> torch.device:
    """Where to blend the window scores of `volume` (B, C, ...): on the GPU only while they (float32,
    one per class and voxel) and a softmax copy take at most a quarter of its memory (or of
    `memory_bytes`, a budget the process keeps to), in host memory beyond that: bounded GPU memory
    for any volume size."""
    if device.type != "cuda":
        return device
    score_bytes = num_classes * volume[0, 0].numel() * 4
    total = memory_bytes or torch.cuda.get_device_properties(device).total_memory
    return device if 2 * score_bytes <= total // 4 else torch.device("cpu")


def predict_scores(model: nn.Module, image: torch.Tensor, patch_size: Sequence[int], overlap: float = 0.5,
                   sw_batch_size: int = 2, amp_dtype: torch.dtype | None = None,
                   aggregate_device: torch.device | None = None, mirror: bool = False) -> torch.Tensor:
    """Class scores (B, K, ...) of a whole preprocessed volume (B, C, ...): the logits, or with
    `mirror` the mean softmax over all 8 combinations of flipping the three axes (test-time
    augmentation, as nnU-Net's validation). Their argmax is the label."""
    flips: list[tuple[int, ...]] = [()]
    if mirror:
        flips += [axes for r in (1, 2, 3) for axes in itertools.combinations((2, 3, 4), r)]
    total = None
    for axes in flips:
        flipped = image.flip(axes) if axes else image
        logits = predict_logits(model, flipped, patch_size, overlap, sw_batch_size, amp_dtype, aggregate_device)
        if not mirror:
            return logits
        scores = logits.softmax(1).flip(axes) if axes else logits.softmax(1)
        del logits
        total = scores if total is None else total.add_(scores)
    return total / len(flips)


def _prefetch(cases: list, predictor: Predictor) -> Iterator[tuple[Any, Future]]:
    """Yield each case with a future of (preprocessed image, preprocessing chain); the next case
    loads in a background thread while the caller predicts the current one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_case, cases[0], predictor)
        for index, case in enumerate(cases):
            current = pending
            if index + 1 < len(cases):
                pending = pool.submit(_load_case, cases[index + 1], predictor)
            yield case, current


def _load_case(case: Any, predictor: Predictor) -> tuple[MetaTensor, T.Compose]:
    from medseg.data.transforms import preprocessing

    from medseg.data.checks import check_image

    check_image(case.images, case.series_uid)  # medseg's own message for a 2D or unusable header
    chain = preprocessing(predictor.prep, with_label=False, series_uid=case.series_uid)
    try:
        image = chain(case.as_dict())["image"]
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        cause = root_cause(exc)
        if isinstance(cause, MedsegError):
            raise DataError(str(cause)) from None
        raise DataError(f"{case.source}: cannot read ({cause.__class__.__name__}: {_first_line(cause)})") from None
    if image.shape[0] != predictor.prep.channels:
        raise DataError(f"{case.source}: {image.shape[0]} channel(s), the model expects {predictor.prep.channels}")
    if not torch.isfinite(image.as_tensor()).all():
        # A NaN anywhere spreads through normalisation: the prediction would be all background.
        raise DataError(f"{case.source}: NaN or infinite intensities; fix or replace them before inference")
    return image, chain


def _restore_labels(probabilities: torch.Tensor, image: MetaTensor, chain: T.Compose,
                    chunk_bytes: int = 1 << 30) -> tuple[np.ndarray, np.ndarray]:
    """The label map on the input's grid and that grid's affine: each class's probability mapped
    back (interpolated linearly where the grids differ), then the most probable class per voxel,
    as nnU-Net does. Mapping back the network grid's label map instead (nearest neighbour) would
    give staircase boundaries wherever the grids differ. The classes are mapped back a few at a
    time, at most `chunk_bytes` of them at once on the input's grid (one resampling call for
    several classes costs little more than for one). Outside the box cropped before the network
    every class restores to 0, and the tie goes to class 0, the background."""
    first = _restore_grid(probabilities[:1].float().cpu(), image, chain, nearest=False)
    best = first.as_tensor()[0].clone()
    affine = np.asarray(first.affine, dtype=np.float64)
    labels = torch.zeros(best.shape, dtype=torch.uint8)
    step = max(1, chunk_bytes // (4 * best.numel()))
    for start in range(1, probabilities.shape[0], step):
        chunk = probabilities[start:start + step].float().cpu()
        for offset, values in enumerate(_restore_grid(chunk, image, chain, nearest=False).as_tensor()):
            better = values > best
            best[better] = values[better]
            labels[better] = start + offset
    return labels.numpy(), affine


def _restore_grid(values: torch.Tensor, image: MetaTensor, chain: T.Compose, nearest: bool) -> MetaTensor:
    """Map `values` (on the network's grid) back to the input's grid by inverting `chain`."""
    prediction = MetaTensor(values, meta=dict(image.meta))
    inverter = T.Invertd("prediction", transform=chain, orig_keys="image", nearest_interp=nearest)
    return inverter({"image": image, "prediction": prediction})["prediction"]


def _make_output_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create output folder ({exc.strerror})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__
