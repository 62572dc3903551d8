"""Writing real DICOM series in tests (SimpleITK), with the tags ITK needs for the geometry."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

UID_ROOT = "1.2.826.0.1.3680043.8.498.77"


def write_series(image: sitk.Image, directory: Path, series: str = "1", modality: str = "CT",
                 uid_root: str = UID_ROOT, description: str | None = None) -> Path:
    """One int16 file per slice of the 3D `image` into `directory` (one series, number `series`;
    with `description` as its SeriesDescription)."""
    directory.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    spacing = image.GetSpacing()
    storage = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}[modality]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": storage,  # SOP Class
            "0008|0018": f"{uid_root}.{series}.3.{k + 1}",  # SOPInstanceUID
            "0008|0060": modality,
            "0010|0020": "TEST",
            "0020|000d": f"{uid_root}.1",  # StudyInstanceUID
            "0020|000e": f"{uid_root}.{series}.2",  # SeriesInstanceUID
            "0020|0052": f"{uid_root}.{series}.4",  # FrameOfReferenceUID (DICOM SEG references it)
            "0020|0011": series,  # SeriesNumber
            "0020|0013": str(k + 1),  # InstanceNumber
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),  # ImagePositionPatient
            "0020|0037": orientation,  # ImageOrientationPatient
            "0028|0030": f"{spacing[1]:.10g}\\{spacing[0]:.10g}",  # PixelSpacing: row\column
            "0018|0050": f"{spacing[2]:.10g}",  # SliceThickness
        }
        if description is not None:
            tags["0008|103e"] = description  # SeriesDescription
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(directory / f"s{series}_{k:03d}.dcm"))
        writer.Execute(slice_)
    return directory
