"""medseg's Python API: `Segmenter` (a trained model from a notebook), `train` and `evaluate`.

```python
from medseg import Segmenter

segmenter = Segmenter.from_checkpoint("runs/<run>")          # a run folder, best.pt or model.zip
result = segmenter.predict("scan.nii.gz")                     # a file, a DICOM folder, a SimpleITK
result = segmenter.predict(array, affine=affine)              #   image, or an array and its affine
result.labels, result.affine, result.class_names              # on the input's own grid
result.save("scan_seg.nii.gz")
```

Arrays follow nibabel's convention: `array[i, j, k]` is the voxel at `affine @ (i, j, k, 1)` in RAS
world coordinates (mm); `nibabel.load(f).get_fdata()` and `.affine` are such a pair. Every input
takes the one inference path of `medseg infer` (`medseg.infer.Predictor`): images that are not
files are written to a temporary file first, so they segment exactly as the same file would.
A cross-validation folder or a model archive of several folds is their ensemble, and the
postprocessing recorded with the model is applied, as `medseg infer` applies them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import DataError, MedsegError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from medseg.config import Config
    from medseg.evaluate import Evaluation
    from medseg.infer import Ensemble

# ITK's world axes are LPS, nibabel's RAS: the first two axes change sign between them.
_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Segmentation:
    """A label map on the grid of the image it segments.

    Attributes:
        labels: label values (uint8), indexed like the input: `labels[i, j, k]` for the voxel
            `(i, j, k)` of the input file or array (for a SimpleITK image: its index `(x, y, z)`, the
            transpose of `GetArrayFromImage`; `to_sitk()` gives that image's own layout).
        affine: 4x4 voxel-to-world matrix, RAS, mm (nibabel's convention).
        class_names: the name of each label value; index 0 is the background.
        probabilities: with `predict(..., probabilities=True)`, float32 `(classes, i, j, k)`: each
            class's probability on the input's grid (`labels` is their arg-max); else None.
    """

    labels: np.ndarray
    affine: np.ndarray
    class_names: list[str]
    probabilities: np.ndarray | None = None
    reference: Any = field(default=None, repr=False)  # the SimpleITK image segmented, if one was

    def to_sitk(self) -> "sitk.Image":
        """The label map as a SimpleITK image with the input's origin, spacing and direction."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.labels.T))
        if self.reference is not None:
            image.CopyInformation(self.reference)
            return image
        matrix = self.affine[:3, :3]
        spacing = np.linalg.norm(matrix, axis=0)
        image.SetSpacing([float(s) for s in spacing])
        image.SetDirection([float(v) for v in (_LPS @ matrix / spacing).ravel()])
        image.SetOrigin([float(v) for v in _LPS @ self.affine[:3, 3]])
        return image

    def save(self, path: str | Path) -> Path:
        """Write the label map, atomically: NIfTI (`.nii.gz`, `.nii`) with `affine`, or any format
        SimpleITK writes by suffix (`.nrrd`, `.mha`, `.nhdr`...) with `to_sitk()`'s geometry."""
        from medseg.data.io import write_nifti
        from medseg.files import atomic_write

        path = Path(path)
        if path.name.lower().endswith((".nii", ".nii.gz")):
            write_nifti(self.labels, self.affine, path)
            return path
        import SimpleITK as sitk

        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder) / f"labels{''.join(path.suffixes[-2:]) or path.suffix}"
            try:
                sitk.WriteImage(self.to_sitk(), str(staged), True)
            except RuntimeError as exc:
                raise DataError(f"{path}: SimpleITK cannot write this format ({str(exc).strip().splitlines()[-1][:120]})") from None
            atomic_write(path, staged.read_bytes())
        return path


class Segmenter:
    """A trained model (one network or a fold ensemble) for segmenting images from Python; see the
    module docstring. It segments as `medseg infer` does (`medseg.infer.Ensemble`)."""

    def __init__(self, ensemble: "Ensemble", largest_component: tuple[int, ...] = ()) -> None:
        self.ensemble = ensemble
        self.largest_component = tuple(largest_component)  # the postprocessing recorded with the model
        self.class_names = ensemble.class_names()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Segmenter":
        """Load a model as `medseg infer` does: a checkpoint file, a run folder (its `best.pt`), a
        cross-validation folder (every fold's `best.pt`: their ensemble) or a `medseg export` model
        archive, safely (weights and plain data only), with the postprocessing recorded with it.
        `device`: auto, cpu, cuda or cuda:N."""
        from medseg.device import prefer_growing_segments
        from medseg.infer import Ensemble, resolve_model
        from medseg.postprocessing import largest_component_classes

        prefer_growing_segments()  # has effect only before this process's first CUDA work
        model = resolve_model([Path(path)])
        return cls(Ensemble.from_model(model, device), tuple(largest_component_classes(model.postprocessing)))

    def predict(self, image: Any, affine: np.ndarray | None = None, probabilities: bool = False,
                mirror: bool = False, overlap: float = 0.5, largest_component: bool | None = None) -> Segmentation:
        """Segment `image` and return the result on the image's own grid.

        Args:
            image: a file (NIfTI, NRRD, MetaImage) or DICOM series folder; a SimpleITK image; or a
                numpy array `(i, j, k)` (or `(i, j, k, channel)`) with its `affine`.
            affine: 4x4 voxel-to-RAS matrix of an array (nibabel's convention); only for arrays.
            probabilities: also return each class's probability on the input's grid.
            mirror: test-time augmentation, the mean over the 8 flips of the axes (as `--mirror`).
            overlap: sliding-window overlap (0..1).
            largest_component: None: the model's recorded postprocessing; True: keep only the
                largest component of every class; False: no postprocessing.
        """
        from medseg.infer import Options, probabilities_path

        classes = (self.largest_component if largest_component is None
                   else tuple(range(1, len(self.class_names))) if largest_component else ())
        with tempfile.TemporaryDirectory(prefix="medseg-") as folder:
            source, reference, known_affine = self._staged(image, affine, Path(folder))
            case = self._one_input(source)
            prepared, chain = self.ensemble.prepare(case)
            output = Path(folder) / "labels.nii.gz"
            options = Options(overlap=overlap, mirror=mirror, save_probabilities=probabilities,
                              largest_component=classes)
            self.ensemble.segment(prepared, chain, output, options)
            labels, written_affine = _read_nifti(output)
            scores = np.moveaxis(_read_nifti(probabilities_path(output))[0], -1, 0) if probabilities else None
        if known_affine is None:
            from medseg.data.io import read_header

            known_affine = read_header(case.images[0], case.series_uid).affine
        if not np.allclose(written_affine, known_affine, atol=1e-4):  # NIfTI stores the affine in float32
            raise MedsegError(f"{case.source}: the prediction's grid differs from the input's")
        return Segmentation(labels.astype(np.uint8, copy=False), np.array(known_affine, dtype=np.float64),
                            list(self.class_names), scores, reference)

    def _staged(self, image: Any, affine: np.ndarray | None, folder: Path) -> tuple[Path, Any, np.ndarray | None]:
        """A file the inference chain reads for `image`, the SimpleITK image given (if one), and the
        input's affine where it is known without reading the file."""
        if isinstance(image, (str, os.PathLike)):
            if affine is not None:
                raise MedsegError("affine= is for numpy arrays; a file carries its own geometry")
            return Path(image), None, None
        if isinstance(image, np.ndarray):
            return _staged_array(image, affine, folder), None, np.asarray(affine, dtype=np.float64)
        import SimpleITK as sitk

        if isinstance(image, sitk.Image):
            from medseg.data.io import sitk_volume

            if affine is not None:
                raise MedsegError("affine= is for numpy arrays; a SimpleITK image carries its own geometry")
            # Its voxels and RAS affine, staged as an array is: the same image segments the same
            # whether it comes as a file, an array or a SimpleITK image.
            volume = sitk_volume(image)
            return _staged_array(volume.array, volume.affine, folder), image, volume.affine
        raise MedsegError(f"cannot segment a {type(image).__name__}: give a file path, a SimpleITK image "
                          "or a numpy array with its affine")

    def _one_input(self, source: Path) -> Any:
        from medseg.inputs import find_inputs

        found = find_inputs([source], self.ensemble.prep.channels)
        if found.problems:
            raise DataError(found.problems[0])
        if len(found.inputs) != 1:
            raise DataError(f"{source}: {len(found.inputs)} images or series found; predict segments one at a time")
        return found.inputs[0]


def train(config: "str | Path | Config", **overrides: Any) -> Path:
    """Train as `medseg train CONFIG --set ...` does; returns the run directory.

    `config`: a YAML file or a `medseg.config.Config`. Overrides by section, checked as `--set`
    checks them: `train(cfg, train={"epochs": 2}, data={"dataset": "my_data"}, run_name="try1")`.
    """
    from medseg import config as config_module
    from medseg.device import prefer_growing_segments
    from medseg.train import train as run_training

    prefer_growing_segments()
    settings = []
    for key, value in overrides.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        settings += [f"{key}{'.' + name if name else ''}={_yaml_value(v)}" for name, v in items]
    if isinstance(config, config_module.Config):
        with tempfile.TemporaryDirectory() as folder:
            config_module.dump(config, Path(folder) / "config.yaml")
            cfg = config_module.load(Path(folder) / "config.yaml", settings)
    else:
        cfg = config_module.load(Path(config), settings)
    return run_training(cfg)


def evaluate(predictions: str | Path, references: str | Path, labels: dict[int, str] | None = None,
             checkpoint: str | Path | None = None, out: str | Path | None = None) -> "Evaluation":
    """Score predicted label maps against references as `medseg evaluate` does (`medseg.evaluate`).

    `labels` ({value: name}) or `checkpoint` (its class names) name the classes; with `out`,
    `evaluation.csv` and `evaluation.json` are written into that folder.
    """
    from medseg.evaluate import evaluate as run_evaluation

    if labels is None and checkpoint is not None:
        from medseg.export import load_states

        names = load_states(checkpoint)[0]["preprocessing"]["labels"]
        labels = {int(k): v for k, v in names.items() if int(k) > 0}
    result = run_evaluation(Path(predictions), Path(references), labels)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        result.write_csv(Path(out) / "evaluation.csv")
        result.write_json(Path(out) / "evaluation.json")
    return result


def _yaml_value(value: Any) -> str:
    import json

    # JSON is YAML: a string stays a string, a list a list, as `--set` reads them.
    return json.dumps(value)


def _staged_array(array: np.ndarray, affine: np.ndarray | None, folder: Path) -> Path:
    from medseg.data.io import write_nifti

    if affine is None or np.shape(affine) != (4, 4):
        raise MedsegError("a numpy image needs affine=, its 4x4 voxel-to-RAS matrix (nibabel's convention)")
    if array.ndim not in (3, 4):
        raise MedsegError(f"a numpy image is indexed (i, j, k) or (i, j, k, channel); got shape {array.shape}")
    staged = folder / "image.nii.gz"
    write_nifti(array.astype(np.float32, copy=False), np.asarray(affine, dtype=np.float64), staged)
    return staged


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
