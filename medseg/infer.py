"""Inference: sliding-window prediction, mapped back onto each input's own grid.

`predict(checkpoint, inputs, out_dir)` segments NIfTI/NRRD/MetaImage files and DICOM series with a
trained checkpoint alone (no config file): the checkpoint carries the model config and the
preprocessing. Several checkpoints (the folds of a cross-validation) form an `Ensemble` whose class
probabilities are averaged; the postprocessing chosen on the cross-validation is applied
(`medseg.postprocessing`) and the label maps written in the format asked for (`medseg.outputs`). Each prediction is resampled back from the network's spacing and orientation with
MONAI's inverse transforms, so the written label map has exactly the input's shape and geometry.

With the model on a GPU, the work on the input's own grid runs there too while it fits
(`medseg.device.restore_device`, one rule for both): preprocessing after the file is read, and
mapping the class probabilities back, a few classes at a time, with the running best probability and
the label map kept on the GPU. Beyond that (or without a GPU) both run on the host, as they always
have; the label maps are the same either way (to float32 rounding).
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from monai import transforms as T
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn

from medseg.device import aggregation_device, restore_device
from medseg.errors import DataError, MedsegError, root_cause
from medseg.postprocessing import keep_largest_component  # noqa: F401  (public here since the first release)


@dataclass
class Prediction:
    """What happened to one input."""

    source: str
    output: Path | None = None
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    seconds: float = 0.0
    error: str | None = None
    # Seconds of each stage: reading, preprocessing, network, restoring (onto the input's grid),
    # writing; postprocessing and preview when asked for.
    stages: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """How `medseg infer` segments: sliding window, test-time mirroring, the postprocessing (the
    classes whose largest component alone is kept) and the output format (`medseg.outputs`)."""

    overlap: float = 0.5
    mirror: bool = False
    sw_batch_size: int = 4
    save_probabilities: bool = False
    largest_component: tuple[int, ...] = ()
    fmt: str = "nii.gz"
    preview: bool = False  # also write <name>_preview.png (medseg.reporting.preview)


def check_options(overlap: float, sw_batch_size: int, device: str, fmt: str = "nii.gz") -> None:
    """ConfigError for an option out of range, before any model or input is read."""
    from medseg.device import resolve_device
    from medseg.errors import ConfigError
    from medseg.outputs import check_format

    if not 0.0 <= overlap < 1.0:  # 1.0 makes the sliding window's step zero
        raise ConfigError(f"--overlap must be in [0, 1), got {overlap:g}")
    if sw_batch_size < 1:
        raise ConfigError(f"--sw-batch-size must be at least 1, got {sw_batch_size}")
    try:
        resolve_device(device)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("'train.device'", "--device")) from None
    check_format(fmt)


@dataclass(frozen=True)
class Model:
    """What CHECKPOINT names: the checkpoint-like states of its members (one per fold or
    checkpoint), where each came from, and the postprocessing recorded with them."""

    states: tuple[dict[str, Any], ...]
    sources: tuple[str, ...]
    postprocessing: dict[str, Any] | None = None
    postprocessing_source: str | None = None


def resolve_model(paths: Sequence[Path]) -> Model:
    """Read the members `paths` name: a checkpoint file; a run folder (its best.pt); a
    cross-validation folder (every fold's best.pt, and its postprocessing.json); a model archive
    (`medseg export`, every fold it holds, and its postprocessing). A postprocessing decision is
    taken only from a single path (several paths: members of different origins)."""
    from medseg import postprocessing
    from medseg.export import is_model_archive, load_checkpoint, load_model_archive, run_checkpoints

    states, sources, decisions = [], [], []
    for path in map(Path, paths):
        if is_model_archive(path):
            archive = load_model_archive(path)
            states += archive.checkpoints
            sources += [f"{path} (fold {s.get('fold', k)})" for k, s in enumerate(archive.checkpoints)]
            decisions.append((archive.postprocessing, str(path)) if archive.postprocessing else None)
            continue
        files = run_checkpoints(path)
        states += [load_checkpoint(f) for f in files]  # its config and preprocessing checked, as an archive's
        sources += [str(f) for f in files]
        recorded = path / postprocessing.FILE_NAME if path.is_dir() else None
        decisions.append((postprocessing.read(recorded), str(recorded))
                         if recorded is not None and recorded.is_file() else None)
    decision, where = decisions[0] if len(paths) == 1 and decisions[0] else (None, None)
    return Model(tuple(states), tuple(sources), decision, where)


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
        from medseg.errors import CheckpointError
        from medseg.export import load_states

        states = load_states(path)
        if len(states) > 1:
            raise CheckpointError(f"{path}: holds {len(states)} folds; this predictor runs one network")
        return cls.from_state(states[0], device, str(path))

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str = "auto", source: str = "checkpoint") -> "Predictor":
        """Build the model a loaded checkpoint (or one fold of a model archive) describes."""
        from medseg import config
        from medseg.data.transforms import Preprocessing
        from medseg.device import amp_dtype, resolve_device
        from medseg.errors import CheckpointError
        from medseg.models import build_model

        try:
            cfg = config.from_dict(state["config"])
            prep = Preprocessing.from_dict(state["preprocessing"])
            model = build_model(cfg.replace(model={"checkpointing": "off"}), prep.channels, prep.num_classes, prep.spacing)
            model.load_state_dict(state["model"])
        except (KeyError, TypeError, RuntimeError, MedsegError) as exc:
            raise CheckpointError(f"{source}: checkpoint does not describe a medseg model ({exc.__class__.__name__})") from None
        torch_device = resolve_device(device)
        model.to(torch_device).eval()
        return cls(model, prep, tuple(cfg.train.patch_size), torch_device, amp_dtype("auto", torch_device))

    def prepare(self, case: Any) -> tuple[MetaTensor, T.Compose]:
        """Read and preprocess one input (`medseg.data.cases.InferenceInput`): the network's input
        and the chain that `segment` inverts to map the prediction back onto the input's grid."""
        return _load_case(case, self)

    def segment(self, image: MetaTensor, chain: T.Compose, output: Path, overlap: float = 0.5,
                mirror: bool = False, sw_batch_size: int = 4, save_probabilities: bool = False,
                largest_component: bool | Iterable[int] = False) -> Path:
        """Predict one preprocessed image and write its label map (NIfTI) on the input's own grid."""
        classes = range(1, self.prep.num_classes) if largest_component is True else (largest_component or ())
        options = Options(overlap, mirror, sw_batch_size, save_probabilities, tuple(classes))
        return Ensemble((self,)).segment(image, chain, output, options)

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

    def probabilities(self, image: MetaTensor, overlap: float = 0.5, mirror: bool = False,
                      sw_batch_size: int = 4) -> torch.Tensor:
        """Class probabilities (K, ...) on the network's grid (the softmax of `scores`)."""
        scores = self.scores(image, overlap, mirror, sw_batch_size)
        return scores if mirror else scores.softmax(0)


@dataclass(frozen=True)
class Ensemble:
    """Networks of one preprocessing (the folds of a cross-validation, or any checkpoints that
    agree on it) whose class probabilities are averaged; one member is a plain model."""

    members: tuple[Predictor, ...]

    @classmethod
    def from_model(cls, model: Model, device: str = "auto") -> "Ensemble":
        """Build every member of `model`; CheckpointError in one line if they disagree on the
        preprocessing (spacing, normalisation, channels, classes): their outputs could not be averaged."""
        members = tuple(Predictor.from_state(s, device, source) for s, source in zip(model.states, model.sources))
        first = members[0].prep.to_dict()
        for member, source in zip(members[1:], model.sources[1:]):
            other = member.prep.to_dict()
            keys = [k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)]
            if keys:
                from medseg.errors import CheckpointError

                raise CheckpointError(f"{source}: its {keys[0]} ({other.get(keys[0])}) differs from {model.sources[0]}'s "
                                      f"({first.get(keys[0])}); ensemble members need the same preprocessing")
        return cls(members)

    @property
    def prep(self) -> Any:
        """The members' common preprocessing (`medseg.data.transforms.Preprocessing`)."""
        return self.members[0].prep

    @property
    def device(self) -> torch.device:
        """Where the members run (`from_model` puts them all on one device)."""
        return self.members[0].device

    def class_names(self) -> list[str]:
        """Class names indexed by label value (0 = background)."""
        from medseg.data.cases import class_name

        return [self.prep.labels.get(c, class_name(c)) for c in range(self.prep.num_classes)]

    def prepare(self, case: Any) -> tuple[MetaTensor, T.Compose]:
        """Read and preprocess one input (`Predictor.prepare`; every member takes the same input)."""
        return self.members[0].prepare(case)

    @torch.no_grad()
    def probabilities(self, image: MetaTensor, overlap: float = 0.5, mirror: bool = False,
                      sw_batch_size: int = 4) -> torch.Tensor:
        """The members' mean class probabilities (K, ...) on the network's grid."""
        total = None
        for member in self.members:
            probabilities = member.probabilities(image, overlap, mirror, sw_batch_size)
            total = probabilities if total is None else total.add_(probabilities.to(total.device))
            del probabilities
        assert total is not None
        return total if len(self.members) == 1 else total.div_(len(self.members))

    def segment(self, image: MetaTensor, chain: T.Compose, output: Path, options: Options = Options(),
                source: Any = None, stages: dict[str, float] | None = None) -> Path:
        """Predict one preprocessed image and write its label map on the input's own grid in
        `options.fmt` (DICOM SEG: `source` is the DICOM input it references). `stages`, if given,
        receives the seconds of each stage (network, restoring, writing, ...)."""
        from medseg.data.io import write_nifti
        from medseg.outputs import write_labels

        with _timed(stages, "network", self.device):
            probabilities = self.probabilities(image, options.overlap, options.mirror, options.sw_batch_size)
        if options.preview:
            from medseg.reporting.preview import write_prediction_preview

            with _timed(stages, "preview"):
                write_prediction_preview(image, probabilities.argmax(0), self.class_names()[1:], output)
        with _timed(stages, "restoring"):
            where, chunk_bytes = restore_device(self.device, _input_voxels(image))
            restored = None
            if options.save_probabilities:
                labels, affine, restored = _restore_probabilities(probabilities, image, chain, chunk_bytes, where)
            else:
                labels, affine = _restore_labels(probabilities, image, chain, chunk_bytes, where)
        del probabilities
        if options.largest_component:
            with _timed(stages, "postprocessing"):
                labels = keep_largest_component(labels, options.largest_component)
        with _timed(stages, "writing"):
            write_labels(labels, affine, output, options.fmt, source, self.class_names())
            if restored is not None:
                write_nifti(restored.movedim(0, -1).numpy().astype(np.float32), affine, probabilities_path(output))
        return output


def probabilities_path(output: Path) -> Path:
    """Where `--save-probabilities` writes the probabilities of the label map `output` (NIfTI)."""
    from medseg.data.cases import case_name

    return output.with_name(f"{case_name(output) if not output.name.endswith('.dcm') else output.stem}"
                            "_probabilities.nii.gz")


def output_path(out_dir: Path, case: Any, fmt: str) -> Path:
    """The label map file of one input in `out_dir`: `<name><suffix of fmt>`."""
    from medseg.outputs import SUFFIXES

    return Path(out_dir) / f"{case.name}{SUFFIXES[fmt]}"


def predict(checkpoint_path: Path | Sequence[Path], inputs: Sequence[Path], out_dir: Path, overlap: float = 0.5,
            mirror: bool = False, save_probabilities: bool = False,
            largest_component: bool | Sequence[int] | None = None, sw_batch_size: int = 4, device: str = "auto",
            on_result: Callable[[Prediction], None] | None = None, fmt: str = "nii.gz",
            include: Sequence[str] = (), exclude: Sequence[str] = (),
            on_start: Callable[[str, int, int], None] | None = None,
            on_note: Callable[[str], None] | None = None, preview: bool = False) -> list[Prediction]:
    """Segment every input with the model (or ensemble) `checkpoint_path` names (`resolve_model`);
    write `<name>.<fmt>` label maps (and probabilities) into `out_dir`.

    `largest_component`: True (every class), False (none), the classes, or None: what the model
    recorded (`postprocessing.json`). Options are checked before anything is read; outputs that
    would overwrite an input refuse the run before anything is written. An input that cannot be
    found or segmented is reported in its `Prediction.error` and the others still run. `on_note`
    hears what was chosen (the members, the postprocessing) and what was left out; `on_start`
    hears (input, index, count) before each input. The next input loads in a background thread
    while the current one is predicted. `preview`: also `<name>_preview.png`, the image's central
    slices with the prediction overlaid.
    """
    from medseg.inputs import find_inputs

    check_options(overlap, sw_batch_size, device, fmt)
    note = on_note or (lambda line: None)
    paths = [Path(checkpoint_path)] if isinstance(checkpoint_path, (str, Path)) else [Path(p) for p in checkpoint_path]
    model = resolve_model(paths)
    ensemble = Ensemble.from_model(model, device)
    classes = _postprocessing_classes(largest_component, model, ensemble.prep.num_classes)
    _describe(model, paths, classes, ensemble, note)
    out_dir = Path(out_dir)
    found = find_inputs(list(inputs), ensemble.prep.channels, include, exclude, skip=[out_dir])
    for line in found.notes:
        note(line)
    if not found.inputs and not found.problems:
        raise DataError(f"{', '.join(map(str, inputs))}: no images or DICOM series found")
    _check_outputs(found.inputs, inputs, out_dir, fmt, save_probabilities)
    results = [Prediction(problem.split(": ", 1)[0], error=problem) for problem in found.problems]
    for result in results:
        if on_result is not None:
            on_result(result)
    if found.inputs:
        _make_output_folder(out_dir)
        options = Options(overlap, mirror, sw_batch_size, save_probabilities, classes, fmt, preview)
        results += segment_inputs(ensemble, found.inputs, out_dir, options, on_result, on_start)
    return results


def segment_inputs(ensemble: Ensemble, cases: Sequence[Any], out_dir: Path, options: Options,
                   on_result: Callable[[Prediction], None] | None = None,
                   on_start: Callable[[str, int, int], None] | None = None) -> list[Prediction]:
    """Segment `cases` (`medseg.data.cases.InferenceInput`) into `out_dir`, one `Prediction` each;
    a failing case is reported in its `error` and the others still run."""
    results = []
    written: dict[str, str] = {}
    for index, (case, loaded, stages) in enumerate(_prefetch(list(cases), ensemble)):
        if on_start is not None:
            on_start(case.source, index, len(cases))
        started = time.perf_counter()
        result = Prediction(case.source, stages=stages)
        output = output_path(out_dir, case, options.fmt)
        try:
            if output.name in written:
                raise DataError(f"{case.source}: output {output.name} is already the prediction of "
                                f"{written[output.name]}; give inputs with different names")
            written[output.name] = case.source
            image, chain = loaded.result()
            original_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
            result.shape = tuple(int(n) for n in image.meta["spatial_shape"])
            result.spacing = tuple(float(s) for s in np.linalg.norm(original_affine[:3, :3], axis=0))
            result.output = ensemble.segment(image, chain, output, options, case, stages)
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


def _postprocessing_classes(choice: bool | Sequence[int] | None, model: Model, num_classes: int) -> tuple[int, ...]:
    from medseg.postprocessing import largest_component_classes

    if choice is None:
        return tuple(largest_component_classes(model.postprocessing))
    if choice is True:
        return tuple(range(1, num_classes))
    return tuple(choice or ())


def _describe(model: Model, paths: Sequence[Path], classes: tuple[int, ...], ensemble: Ensemble,
              note: Callable[[str], None]) -> None:
    """Say which checkpoints run (a folder stands for its best.pt files) and which postprocessing."""
    if len(model.sources) > 1:
        note(f"ensemble of {len(model.sources)} models (mean class probabilities): {', '.join(model.sources)}")
    elif Path(paths[0]).is_dir():
        note(f"{paths[0]}: using {model.sources[0]}")
    names = ensemble.class_names()
    if classes:
        where = f" (recorded in {model.postprocessing_source})" if model.postprocessing_source else ""
        note(f"postprocessing: largest component kept for {', '.join(names[c] if c < len(names) else str(c) for c in classes)}{where}")
    elif model.postprocessing_source:
        note(f"postprocessing: none ({model.postprocessing_source} keeps every component)")


def _check_outputs(cases: Sequence[Any], given: Sequence[Path], out_dir: Path, fmt: str,
                   save_probabilities: bool) -> None:
    """DataError, before anything is written, if an output would overwrite an input or land in an
    input folder the run reads, or if dicom-seg is asked for an input that is not a DICOM series."""
    resolved_out = out_dir.resolve()
    for path in map(Path, given):
        if path.is_dir() and path.resolve() == resolved_out:
            raise DataError(f"{out_dir}: the output folder is the input folder {path}; write the outputs elsewhere "
                            "(-o), they would mix with or overwrite the inputs")
    inputs = {p.resolve() for case in cases for p in case.images}
    for case in cases:
        if fmt == "dicom-seg" and not case.images[0].is_dir():
            raise DataError(f"{case.source}: --format dicom-seg is for DICOM series inputs only; choose nii.gz, "
                            "nrrd or mha")
        output = output_path(out_dir, case, fmt)
        targets = [output, probabilities_path(output)] if save_probabilities else [output]
        for target in targets:
            resolved = target.resolve()
            if resolved in inputs or resolved.parent in {p for p in inputs if p.is_dir()}:
                raise DataError(f"{target}: would overwrite or write into the input {case.source}; "
                                "choose another output folder (-o)")


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


def _prefetch(cases: list, predictor: "Predictor | Ensemble") -> Iterator[tuple[Any, Future, dict[str, float]]]:
    """Yield each case with a future of (preprocessed image, preprocessing chain) and the dict that
    receives its reading and preprocessing seconds; the next case loads in a background thread
    while the caller predicts the current one."""
    if not cases:
        return
    stages: list[dict[str, float]] = [{} for _ in cases]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_case, cases[0], predictor, stages[0])
        for index, case in enumerate(cases):
            current = pending
            if index + 1 < len(cases):
                pending = pool.submit(_load_case, cases[index + 1], predictor, stages[index + 1])
            yield case, current, stages[index]


def _load_case(case: Any, predictor: "Predictor | Ensemble",
               stages: dict[str, float] | None = None) -> tuple[MetaTensor, T.Compose]:
    """Read and preprocess one input. The file is read on the host; the rest of the chain runs on
    the predictor's GPU where `_preprocessing_device` allows (the inverse that maps the prediction
    back reads the steps the image recorded, wherever they ran)."""
    from medseg.data.checks import check_image
    from medseg.data.transforms import preprocessing

    check_image(case.images, case.series_uid)  # medseg's own message for a 2D or unusable header
    check_resampled_size(case, predictor.prep.spacing)
    chain = preprocessing(predictor.prep, with_label=False, series_uid=case.series_uid)
    read = 1 + next(i for i, step in enumerate(chain.transforms) if isinstance(step, T.LoadImaged))
    try:
        with _timed(stages, "reading"):
            data = chain(case.as_dict(), end=read)
        with _timed(stages, "preprocessing"):
            data["image"] = data["image"].to(_preprocessing_device(predictor, data["image"]))
            image = chain(data, start=read)["image"]
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        cause = root_cause(exc)
        if isinstance(cause, torch.cuda.OutOfMemoryError):
            raise cause from None  # not a problem of this input: segment_inputs lets it through
        if isinstance(cause, MedsegError):
            raise DataError(str(cause)) from None
        raise DataError(f"{case.source}: cannot read ({cause.__class__.__name__}: {_first_line(cause)})") from None
    if image.shape[0] != predictor.prep.channels:
        raise DataError(f"{case.source}: {image.shape[0]} channel(s), the model expects {predictor.prep.channels}")
    with _timed(stages, "preprocessing"):
        finite = bool(torch.isfinite(image.as_tensor()).all())
    if not finite:
        # A NaN anywhere spreads through normalisation: the prediction would be all background.
        raise DataError(f"{case.source}: NaN or infinite intensities; fix or replace them before inference")
    return image, chain


def check_resampled_size(case: Any, spacing: Sequence[float]) -> None:
    """DataError naming the input, from its header alone, if it would hold more voxels at the
    model's `spacing` than medseg preprocesses per case: the rule `medseg plan` and `train` apply
    to training cases (`check_resampled_sizes`), here before resampling allocates anything. A
    header's spacing 35 times too coarse would otherwise ask for tens of gigabytes."""
    from medseg.data.checks import CaseSummary, DatasetCheckError
    from medseg.data.fingerprint import check_resampled_sizes
    from medseg.data.io import read_header

    header = read_header(case.images[0], series_uid=case.series_uid)
    channels = len(case.images) if len(case.images) > 1 else header.channels
    summary = CaseSummary(case.source, tuple(header.shape[:3]), tuple(header.spacing[:3]), header.affine,
                          channels, ())
    try:
        check_resampled_sizes([summary], spacing)
    except DatasetCheckError as exc:
        raise DataError(exc.problems[0]) from None


def _preprocessing_device(predictor: "Predictor | Ensemble", image: MetaTensor) -> torch.device:
    """Where preprocessing runs after reading `image` (C, ...): where restoring would run
    (`restore_device`) on the larger of the input's and the network's grids, if restoring could take
    all C channels at once there. Preprocessing's working set per voxel of that grid (the image, its
    reoriented and cropped copies, the sampling grid, the resampled image) is about restoring's."""
    voxels = int(np.prod(image.shape[1:]))
    spacing = [float(s) for s in image.pixdim]
    network_voxels = voxels * float(np.prod(spacing)) / float(np.prod(predictor.prep.spacing))
    size = max(voxels, int(network_voxels))
    where, chunk_bytes = restore_device(predictor.device, size)
    return where if chunk_bytes >= 4 * size * image.shape[0] else torch.device("cpu")


def _input_voxels(image: MetaTensor) -> int:
    """Voxels of the grid the input was read on (before cropping and resampling)."""
    return int(np.prod([int(n) for n in image.meta["spatial_shape"]]))


def _restored_chunks(probabilities: torch.Tensor, image: MetaTensor, chain: T.Compose, chunk_bytes: int,
                     device: torch.device | str) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """(first class, its classes' values (k, ...) on `device` and on the input's grid, that grid's
    affine) for each chunk of classes: at most `chunk_bytes` of them (float32 on the input's grid)
    mapped back at once (one resampling call for several classes costs little more than for one)."""
    step = max(1, chunk_bytes // (4 * _input_voxels(image)))
    for start in range(0, probabilities.shape[0], step):
        chunk = probabilities[start:start + step].to(device, torch.float32)
        restored = _restore_grid(chunk, image, chain, nearest=False)
        yield start, restored.as_tensor(), _affine(restored)


def _restore_labels(probabilities: torch.Tensor, image: MetaTensor, chain: T.Compose,
                    chunk_bytes: int = 1 << 30, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The label map on the input's grid and that grid's affine: each class's probability mapped
    back (interpolated linearly where the grids differ), then the most probable class per voxel,
    as nnU-Net does. Mapping back the network grid's label map instead (nearest neighbour) would
    give staircase boundaries wherever the grids differ. The classes are mapped back on `device` a
    few at a time (`_restored_chunks`), with the running best probability and the labels kept
    there. Outside the box cropped before the network every class restores to 0, and the tie goes
    to class 0, the background (strictly better classes win: the arg-max of all classes at once)."""
    best = labels = affine = None
    for start, values, affine in _restored_chunks(probabilities, image, chain, chunk_bytes, device):
        if best is None:
            best = torch.full(values.shape[1:], -torch.inf, dtype=torch.float32, device=values.device)
            labels = torch.zeros(values.shape[1:], dtype=torch.uint8, device=values.device)
        for offset, class_values in enumerate(values):
            better = class_values > best
            labels.masked_fill_(better, start + offset)
            torch.where(better, class_values, best, out=best)
    assert labels is not None and affine is not None
    return _host_labels(labels), affine


def _restore_probabilities(probabilities: torch.Tensor, image: MetaTensor, chain: T.Compose, chunk_bytes: int,
                           device: torch.device | str) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Labels, affine and every class's probability (K, ...) on the input's grid, in host memory
    (for `--save-probabilities`); mapped back in chunks as `_restore_labels` maps them. Outside the
    cropped box the restored probabilities are all zero: that region is background (class 0 takes
    what the others leave), and the labels are the arg-max."""
    restored = affine = None
    for start, values, affine in _restored_chunks(probabilities, image, chain, chunk_bytes, device):
        if restored is None:
            restored = torch.empty((probabilities.shape[0], *values.shape[1:]), dtype=torch.float32)
        restored[start:start + len(values)] = values.cpu()
    assert restored is not None and affine is not None
    restored[0] = 1 - restored[1:].sum(0)
    return _host_labels(restored.argmax(0).to(torch.uint8)), affine, restored


def _host_labels(labels: torch.Tensor) -> np.ndarray:
    """`labels` (x, y, z) as a host array in NIfTI's own (Fortran) order, transposed where they are
    (on the GPU: at no cost), so that writing them is a plain copy."""
    return labels.permute(2, 1, 0).contiguous().cpu().numpy().transpose(2, 1, 0)


def _affine(image: MetaTensor) -> np.ndarray:
    """The 4x4 affine of `image` as float64 on the host (resampling on a GPU may leave it there)."""
    return torch.as_tensor(image.affine).detach().cpu().numpy().astype(np.float64)


def _restore_grid(values: torch.Tensor, image: MetaTensor, chain: T.Compose, nearest: bool) -> MetaTensor:
    """Map `values` (on the network's grid) back to the input's grid by inverting `chain`."""
    prediction = MetaTensor(values, meta=dict(image.meta))
    inverter = T.Invertd("prediction", transform=chain, orig_keys="image", nearest_interp=nearest)
    return inverter({"image": image, "prediction": prediction})["prediction"]


@contextmanager
def _timed(stages: dict[str, float] | None, name: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the seconds the block takes to `stages[name]` (when `stages` is given); with a CUDA
    `device`, the work the block queued there is waited for first, so it counts in this stage."""
    started = time.perf_counter()
    yield
    if stages is None:
        return
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - started


def _make_output_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create output folder ({exc.strerror})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__
