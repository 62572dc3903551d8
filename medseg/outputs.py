"""Writing label maps in the format a viewer or PACS takes: one small function per format.

Every writer takes the label map indexed `(x, y, z)` on the input's grid with its RAS affine (what
`medseg.infer` restores) and writes atomically (`medseg.files`): a crash leaves no half-written
file. DICOM SEG (through highdicom, the `dicom` extra) is for DICOM inputs only: it references the
source series slice by slice and names its segments after the model's classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.errors import DataError, MedsegError

FORMATS = ("nii.gz", "nrrd", "mha", "dicom-seg")
SUFFIXES = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, its own inverse
# How far (in voxels) a DICOM slice's position may lie off the grid the labels were restored on.
SLICE_TOLERANCE = 0.01


def check_format(fmt: str) -> None:
    """MedsegError unless `fmt` is one of FORMATS (and highdicom is installed for dicom-seg)."""
    if fmt not in FORMATS:
        raise MedsegError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "dicom-seg":
        try:
            import highdicom  # noqa: F401
        except ImportError:
            raise MedsegError("--format dicom-seg needs highdicom: pip install 'medseg[dicom]'") from None


def write_labels(labels: np.ndarray, affine: np.ndarray, target: Path, fmt: str,
                 source: Any = None, class_names: Sequence[str] = ()) -> Path:
    """Write `labels` (x, y, z) with its RAS `affine` to `target` in `fmt`. For dicom-seg, `source`
    is the DICOM input (`medseg.data.cases.InferenceInput`) and `class_names` are indexed by label
    value (0 = background)."""
    if fmt == "nii.gz":
        from medseg.data.io import write_nifti

        write_nifti(labels, affine, target)
    elif fmt in ("nrrd", "mha"):
        write_sitk(labels, affine, target)
    elif fmt == "dicom-seg":
        write_dicom_seg(labels, affine, target, source, class_names)
    else:
        check_format(fmt)
    return target


def write_sitk(labels: np.ndarray, affine: np.ndarray, target: Path) -> None:
    """NRRD or MetaImage (by `target`'s suffix), compressed, uint8 where the labels fit."""
    import SimpleITK as sitk

    from medseg.files import atomic_path

    image = sitk_image(labels, affine)
    with atomic_path(target) as path:
        sitk.WriteImage(image, str(path), True)


def sitk_image(labels: np.ndarray, affine: np.ndarray) -> "Any":
    """A SimpleITK image of `labels` (x, y, z) on the grid of the RAS `affine` (ITK keeps LPS)."""
    import SimpleITK as sitk

    dtype = np.uint8 if labels.max(initial=0) < 256 and labels.min(initial=0) >= 0 else np.int32
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(dtype, copy=False).T))
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (LPS @ (linear / spacing)).ravel()])
    image.SetOrigin([float(v) for v in LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]])
    return image


def write_dicom_seg(labels: np.ndarray, affine: np.ndarray, target: Path, source: Any,
                    class_names: Sequence[str]) -> None:
    """A DICOM Segmentation (binary, one segment per foreground class) referencing every slice of
    the source series; frame k of the source is `labels[:, :, k]` once its position is checked."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medseg
    from medseg.files import atomic_path

    slices = _source_slices(source)
    frames = np.stack([_frame(labels, affine, dataset, source) for dataset in slices]).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", family=codes.cid7162.ArtificialIntelligence,
                                                   version=medseg.__version__)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=value, segment_label=str(class_names[value] if value < len(class_names) else f"class_{value}")[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for value in range(1, max(len(class_names), int(labels.max(initial=0)) + 1))
    ]
    if not segments:
        raise DataError(f"{target}: the model has no foreground class to write as a DICOM segment")
    description = str(getattr(slices[0], "SeriesDescription", "") or "")
    segmentation = hd.seg.Segmentation(
        source_images=slices, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=_series_number(slices[0]),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name="medseg",
        software_versions=medseg.__version__, device_serial_number="0", omit_empty_frames=False,
        series_description=f"medseg {description}".strip()[:64])
    with atomic_path(target) as path:
        segmentation.save_as(str(path))


def _source_slices(source: Any) -> list[Any]:
    """The source series' datasets (without pixel data), in the order SimpleITK stacks them."""
    import pydicom
    import SimpleITK as sitk

    folder = source.images[0] if source is not None else None
    if folder is None or not Path(folder).is_dir():
        raise MedsegError(f"{source.source if source is not None else 'input'}: --format dicom-seg is for DICOM "
                          "series inputs only; choose nii.gz, nrrd or mha")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), source.series_uid or "")
    if not files:
        raise DataError(f"{source.source}: no DICOM series to reference")
    return [pydicom.dcmread(name, stop_before_pixels=True) for name in files]


def _frame(labels: np.ndarray, affine: np.ndarray, dataset: Any, source: Any) -> np.ndarray:
    """The (rows, columns) labels of one source slice, found by its ImagePositionPatient."""
    position = LPS @ np.asarray([float(v) for v in dataset.ImagePositionPatient])
    index = np.linalg.solve(np.asarray(affine, dtype=np.float64)[:3, :3], position - np.asarray(affine)[:3, 3])
    k = int(round(float(index[2])))
    if np.abs(index[:2]).max() > SLICE_TOLERANCE or abs(index[2] - k) > SLICE_TOLERANCE or not 0 <= k < labels.shape[2]:
        raise DataError(f"{source.source}: slice {getattr(dataset, 'SOPInstanceUID', '?')} lies off the grid "
                        "of the series it belongs to; cannot reference it in a DICOM SEG")
    if labels.shape[:2] != (int(dataset.Columns), int(dataset.Rows)):
        raise DataError(f"{source.source}: slice size {dataset.Columns}x{dataset.Rows} differs from the label map")
    return labels[:, :, k].T


def _series_number(dataset: Any) -> int:
    number = getattr(dataset, "SeriesNumber", None)
    try:
        return int(number) + 1000 if number is not None else 1000
    except (TypeError, ValueError):
        return 1000
