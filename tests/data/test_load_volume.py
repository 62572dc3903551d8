"""`load_volume` reads without MONAI, and must give what training's MONAI loader gives.

Training loads through ``LoadImage(reader=readers())``; `medseg plan` and the dataset checks through
`load_volume`. Every case here is written as a real file and loaded both ways; array (dtype,
shape, values) and affine must be identical, not merely close.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage

from medseg.data.io import load_volume, read_header
from medseg.data.readers import readers
from medseg.errors import DataError
from tests.dicom import write_series
from tests.geometry import rotation

SHAPE = (9, 7, 5)  # (x, y, z)


def _affine(matrix: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = matrix @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


OBLIQUE = _affine(rotation(2, 20) @ rotation(0, -10), (0.8, 0.9, 2.5), (12.5, -30.25, 41.0))
OTHER = _affine(rotation(1, 5), (1.1, 1.2, 1.3), (1.0, 2.0, 3.0))


def _values(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Unique per voxel and asymmetric along every axis, so any transposition shows."""
    return (np.arange(int(np.prod(shape))).reshape(shape) % 251 * 1.5 + 0.25).astype(dtype)


def _save(array: np.ndarray, path: Path, affine: np.ndarray = OBLIQUE, dtype: type | None = None) -> Path:
    image = nib.Nifti1Image(array, affine)
    if dtype is not None:
        image.set_data_dtype(dtype)
    nib.save(image, path)
    return path


def _float_nifti(tmp_path: Path) -> tuple[Path, bool]:
    return _save(_values(SHAPE), tmp_path / "image.nii.gz"), False


def _scaled_int16_nifti(tmp_path: Path) -> tuple[Path, bool]:
    # Floats stored as int16: nibabel writes them with scl_slope and scl_inter.
    path = _save(_values(SHAPE, np.float64) * 3.7 - 120.0, tmp_path / "scaled.nii", dtype=np.int16)
    image = nib.load(path)
    assert image.get_data_dtype() == np.int16
    # nibabel moves the file's scaling from the header onto the array proxy when loading.
    assert image.dataobj.slope != 1.0 and image.dataobj.inter != 0.0
    return path, False


def _uint8_label(tmp_path: Path) -> tuple[Path, bool]:
    return _save((_values(SHAPE) % 4).astype(np.uint8), tmp_path / "label.nii.gz"), True


def _int16_as_image(tmp_path: Path) -> tuple[Path, bool]:
    return _save(_values(SHAPE, np.int16), tmp_path / "ct.nii.gz"), False


def _multichannel_nifti(tmp_path: Path) -> tuple[Path, bool]:
    return _save(_values((*SHAPE, 3)), tmp_path / "channels.nii.gz"), False


def _five_dim_nifti(tmp_path: Path) -> tuple[Path, bool]:
    # NIfTI's vector layout (x, y, z, t=1, c); MONAI leaves the header of 5D images uncorrected,
    # so give it a pixdim that disagrees with its sform, which a 3D image would have replaced.
    array = _values((*SHAPE, 1, 2))
    header = _header(array)
    header.set_qform(OTHER, code=1)
    header.set_sform(OBLIQUE, code=2)
    return _save_with_header(array, header, tmp_path / "vector.nii.gz"), False


def _sform_disagreeing_with_pixdim(tmp_path: Path) -> tuple[Path, bool]:
    # nibabel uses the sform; MONAI, finding pixdim agree with the qform only, uses the qform.
    array = _values(SHAPE)
    header = _header(array)
    header.set_qform(OTHER, code=1)  # also sets pixdim to OTHER's voxel sizes
    header.set_sform(OBLIQUE, code=2)
    path = _save_with_header(array, header, tmp_path / "mismatch.nii.gz")
    assert np.allclose(nib.load(path).affine, OBLIQUE)
    return path, False


def _two_dim_unused_sform(tmp_path: Path) -> tuple[Path, bool]:
    # A 2D image whose oblique qform disagrees with pixdim in-plane and whose unused (code 0) sform
    # agrees: MONAI makes the sform the qform.
    array = _values(SHAPE[:2])
    header = _header(array)
    header.set_qform(OBLIQUE, code=1)
    header.set_sform(_affine(rotation(2, 30), (0.8, 0.9, 1.0), (4.0, 5.0, 6.0)), code=0)
    path = _save_with_header(array, header, tmp_path / "slice.nii")
    assert np.allclose(nib.load(path).affine, OBLIQUE, atol=1e-5)
    return path, False


def _header(array: np.ndarray) -> nib.Nifti1Header:
    """A header for `array`, its shape set first (setting the shape resets unused pixdim)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    return header


def _save_with_header(array: np.ndarray, header: nib.Nifti1Header, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, None, header=header), path)
    return path


def _sitk_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((12.5, -30.25, 41.0))
    image.SetDirection((rotation(2, 20) @ rotation(0, -10)).ravel().tolist())
    return image


def _nrrd(tmp_path: Path) -> tuple[Path, bool]:
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(_sitk_image(_values(SHAPE)), str(path))
    return path, False


def _dicom_label(tmp_path: Path) -> tuple[Path, bool]:
    return write_series(_sitk_image(_values(SHAPE, np.int16)), tmp_path / "dicom"), True


def _nifti_channel_files(tmp_path: Path) -> tuple[list[Path], bool]:
    first = _save(_values(SHAPE), tmp_path / "case_0000.nii.gz")
    second = _save(_values(SHAPE) * 2, tmp_path / "case_0001.nii.gz")
    return [first, second], False


def _nrrd_channel_files(tmp_path: Path) -> tuple[list[Path], bool]:
    paths = [tmp_path / "case_0000.nrrd", tmp_path / "case_0001.mha"]
    for scale, path in enumerate(paths, start=1):
        sitk.WriteImage(_sitk_image(_values(SHAPE) * scale), str(path))
    return paths, False


def _multichannel_nifti_files(tmp_path: Path) -> tuple[list[Path], bool]:
    # Files that have channels are joined along their channel axis: 2 + 3 channels.
    first = _save(_values((*SHAPE, 2)), tmp_path / "a.nii.gz")
    second = _save(_values((*SHAPE, 3)) + 7, tmp_path / "b.nii.gz")
    return [first, second], False


CASES: dict[str, Callable[[Path], tuple[Path | list[Path], bool]]] = {
    "float32 nifti, oblique affine": _float_nifti,
    "int16 nifti with scl_slope/scl_inter": _scaled_int16_nifti,
    "uint8 label nifti": _uint8_label,
    "int16 nifti as image": _int16_as_image,
    "4D multichannel nifti": _multichannel_nifti,
    "5D nifti (x, y, z, 1, c)": _five_dim_nifti,
    "sform disagreeing with pixdim": _sform_disagreeing_with_pixdim,
    "2D nifti with an unused sform": _two_dim_unused_sform,
    "nrrd": _nrrd,
    "dicom series as label": _dicom_label,
    "two nifti files as channels": _nifti_channel_files,
    "nrrd and mha files as channels": _nrrd_channel_files,
    "two multichannel nifti files": _multichannel_nifti_files,
}


def _through_monai(path: Path | list[Path], label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training's loader, then channels first as load_volume has always moved them."""
    source = [str(p) for p in path] if isinstance(path, list) else str(path)
    image, meta = LoadImage(reader=readers(), image_only=False, dtype=None)(source)
    array = np.asarray(image.array)
    channel_dim = meta["original_channel_dim"]
    if isinstance(channel_dim, float) and np.isnan(channel_dim):
        array = array[None]
    else:
        array = np.moveaxis(array, int(channel_dim), 0)
    if not label:
        array = array.astype(np.float32)
    return array, np.asarray(meta["affine"])


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_load_volume_equals_monai_loadimage(tmp_path: Path, make: Callable) -> None:
    path, label = make(tmp_path)
    expected_array, expected_affine = _through_monai(path, label)
    array, affine = load_volume(path, label=label)
    assert type(array) is np.ndarray and array.flags.c_contiguous
    assert array.dtype == expected_array.dtype
    assert array.shape == expected_array.shape
    np.testing.assert_array_equal(array, expected_array)
    assert affine.dtype == np.float64 and affine.shape == (4, 4)
    np.testing.assert_array_equal(affine, expected_affine)


def test_header_corrections_change_the_affine(tmp_path: Path) -> None:
    # The cases above only prove something if MONAI's affine differs from nibabel's here.
    path, _ = _sform_disagreeing_with_pixdim(tmp_path)
    np.testing.assert_allclose(load_volume(path)[1], OTHER, atol=1e-5)
    path, _ = _two_dim_unused_sform(tmp_path)
    assert not np.allclose(load_volume(path)[1], nib.load(path).affine, atol=1e-3)
    path, _ = _five_dim_nifti(tmp_path)
    array, affine = load_volume(path)
    assert array.shape == (2, *SHAPE, 1)
    np.testing.assert_allclose(affine, OBLIQUE, atol=1e-6)


def test_read_header_gives_the_corrected_affine_too(tmp_path: Path) -> None:
    # `medseg plan` and the dataset checks take spacing and orientation from read_header: it must
    # see the same geometry as the loader, corrections included.
    path, _ = _sform_disagreeing_with_pixdim(tmp_path)
    header = read_header(path)
    np.testing.assert_allclose(header.affine, load_volume(path)[1], atol=1e-6)
    np.testing.assert_allclose(header.spacing, np.linalg.norm(OTHER[:3, :3], axis=0), atol=1e-5)


def test_scaled_values_and_label_dtypes(tmp_path: Path) -> None:
    path, _ = _scaled_int16_nifti(tmp_path)
    image, _ = load_volume(path)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image[0], _values(SHAPE, np.float64) * 3.7 - 120.0, atol=0.05)
    path, _ = _uint8_label(tmp_path)
    label, _ = load_volume(path, label=True)
    assert label.dtype == np.uint8 and label.shape == (1, *SHAPE)


def test_channel_files_with_different_geometry_are_refused(tmp_path: Path) -> None:
    first = _save(_values(SHAPE), tmp_path / "a_0000.nii.gz")
    moved = _save(_values(SHAPE), tmp_path / "a_0001.nii.gz", affine=OTHER)
    smaller = _save(_values((4, 4, 4)), tmp_path / "a_0002.nii.gz")
    for second, reason in ((moved, "differ in affine"), (smaller, "differ in shape")):
        with pytest.raises(DataError, match=reason) as caught:
            load_volume([first, second])
        message = str(caught.value)
        assert message.startswith(f"{first}, {second}: ") and "\n" not in message, message
        with pytest.raises(RuntimeError):  # MONAI refuses them too
            _through_monai([first, second], False)
