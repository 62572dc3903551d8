"""Every format must load to the same array and the same RAS affine as MONAI's nibabel path."""

from __future__ import annotations

import errno
import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import NibabelReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from medseg.data import io
from medseg.data.io import Header, load_volume, read_header, spacing_in_ras, write_nifti
from medseg.data.readers import SimpleITKReader, readers
from medseg.errors import DataError
from tests.dicom import write_series
from tests.geometry import rotation

SHAPE = (12, 10, 8)  # (x, y, z)
SPACING = (0.7, 0.9, 3.0)
ORIGIN_LPS = (12.5, -30.25, 41.0)
UID = "1.2.826.0.1.3680043.2.1125.9.4711"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# Oblique, with the voxel axes permuted and flipped against LPS, so reorientation is not a no-op.
PERMUTE = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
DIRECTION = rotation(2, 20) @ rotation(1, -15) @ rotation(0, 10) @ PERMUTE


def _volume(scale: int = 1) -> np.ndarray:
    """Integer-valued, asymmetric along every axis, unique per voxel; indexed (x, y, z)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return ((x + 20 * y + 250 * z + (x * y) % 7) * scale).astype(np.int16)


def _lps_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = DIRECTION @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN_LPS
    return affine


RAS_AFFINE = LPS_TO_RAS @ _lps_affine()


def _sitk_image(volume: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN_LPS)
    image.SetDirection(DIRECTION.ravel().tolist())
    return image


def _write_nifti(volume: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(volume.astype(np.float32), RAS_AFFINE), path)
    return path


def _write_sitk(volume: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(_sitk_image(volume.astype(np.float32)), str(path))
    return path


def _write_dicom(volume: np.ndarray, directory: Path, series: str = "1") -> Path:
    return write_series(_sitk_image(volume.astype(np.int16)), directory, series, "CT", UID)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    volume = _volume()
    out = {"nii.gz": _write_nifti(volume, root / "img.nii.gz")}
    for suffix in ("nrrd", "nhdr", "mha", "mhd"):
        out[suffix] = _write_sitk(volume, root / f"img.{suffix}")
    out["dicom"] = _write_dicom(volume, root / "dicom")
    return out


def _pipeline() -> Compose:
    return Compose(
        [
            LoadImaged(keys="image", reader=readers()),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS", labels=None),
        ]
    )


def _load(path: Path | list[Path]) -> tuple[np.ndarray, np.ndarray]:
    image = _pipeline()({"image": path})["image"]
    return image.numpy(), image.affine.numpy()


def test_all_formats_match_nifti_after_ras_orientation(sources: dict[str, Path]) -> None:
    ref_array, ref_affine = _load(sources["nii.gz"])
    assert ref_array.shape[0] == 1 and sorted(ref_array.shape[1:]) == sorted(SHAPE)
    assert not np.allclose(ref_affine, RAS_AFFINE)  # reorientation did something
    for name, path in sources.items():
        array, affine = _load(path)
        assert array.shape == ref_array.shape, name
        atol = 0.5 if name == "dicom" else 0.0
        np.testing.assert_allclose(array, ref_array, atol=atol, err_msg=name)
        np.testing.assert_allclose(affine, ref_affine, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("name", ["nrrd", "mha", "dicom"])
def test_get_data_follows_nibabel_reader_conventions(sources: dict[str, Path], name: str) -> None:
    nib_reader = NibabelReader()
    ref_array, ref_meta = nib_reader.get_data(nib_reader.read(str(sources["nii.gz"])))
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(str(sources[name])))
    assert array.shape == ref_array.shape == SHAPE
    np.testing.assert_allclose(array, ref_array, atol=0.5)
    np.testing.assert_allclose(meta["affine"], RAS_AFFINE, atol=1e-4)
    np.testing.assert_allclose(meta["original_affine"], ref_meta["original_affine"], atol=1e-4)
    assert meta["affine"].shape == (4, 4) and meta["affine"].dtype == np.float64
    np.testing.assert_array_equal(meta["spatial_shape"], ref_meta["spatial_shape"])
    assert meta["space"] == ref_meta["space"] == "RAS"
    assert np.isnan(meta["original_channel_dim"]) and np.isnan(ref_meta["original_channel_dim"])


def test_readers_route_nifti_to_nibabel_and_the_rest_to_simpleitk(sources: dict[str, Path]) -> None:
    chosen: list[str] = []
    reader_list = readers()
    for reader in reader_list:
        original = reader.get_data

        def spy(img, _original=original, _name=type(reader).__name__):  # type: ignore[no-untyped-def]
            chosen.append(_name)
            return _original(img)

        reader.get_data = spy  # type: ignore[method-assign]
    load = LoadImaged(keys="image", reader=reader_list)
    for name in ("nii.gz", "nrrd", "mha", "dicom"):
        load({"image": sources[name]})
    assert chosen == ["NibabelReader", "SimpleITKReader", "SimpleITKReader", "SimpleITKReader"]
    # SimpleITK could read NIfTI itself; the routing above relies on it refusing to.
    assert not SimpleITKReader().verify_suffix(sources["nii.gz"])
    with pytest.raises(DataError, match="img.nii.gz"):
        SimpleITKReader().read(sources["nii.gz"])
    assert SimpleITKReader().verify_suffix([sources["nrrd"], sources["dicom"]])


def test_multichannel_list_of_files(sources: dict[str, Path], tmp_path: Path) -> None:
    second = _write_sitk(_volume(scale=2), tmp_path / "second.mha")
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read([str(sources["nrrd"]), str(second)]))
    assert array.shape == (2, *SHAPE) and meta["original_channel_dim"] == 0
    loaded, affine = _load([sources["nrrd"], second])
    single, single_affine = _load(sources["nrrd"])
    assert loaded.shape == (2, *single.shape[1:])
    np.testing.assert_allclose(loaded[0], single[0])
    np.testing.assert_allclose(loaded[1], 2 * single[0])
    np.testing.assert_allclose(affine, single_affine)
    stacked, _ = load_volume([sources["nrrd"], second])
    assert stacked.shape == (2, *SHAPE) and stacked.dtype == np.float32


def test_vector_pixels_are_channel_last(tmp_path: Path) -> None:
    both = np.stack([_volume(), _volume(scale=3)], axis=-1)  # (x, y, z, c)
    image = sitk.GetImageFromArray(np.ascontiguousarray(both.transpose(2, 1, 0, 3)), isVector=True)
    image.SetSpacing(SPACING)
    path = tmp_path / "vector.mha"
    sitk.WriteImage(image, str(path))
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(path))
    assert array.shape == (*SHAPE, 2) and meta["original_channel_dim"] == -1
    np.testing.assert_array_equal(array, both)
    loaded, _ = load_volume(path)
    np.testing.assert_array_equal(loaded, np.moveaxis(both, -1, 0))
    assert read_header(path).channels == 2


def test_read_header(sources: dict[str, Path]) -> None:
    for name, path in sources.items():
        header = read_header(path)
        assert isinstance(header, Header)
        assert header.shape == SHAPE, name
        np.testing.assert_allclose(header.spacing, SPACING, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(header.affine, RAS_AFFINE, atol=1e-4, err_msg=name)
        assert header.channels == 1, name


def test_spacing_in_ras_matches_orientationd(sources: dict[str, Path]) -> None:
    image = _pipeline()({"image": sources["nii.gz"]})["image"]
    expected = tuple(image.pixdim.tolist())
    np.testing.assert_allclose(spacing_in_ras(RAS_AFFINE), expected, atol=1e-6)
    assert sorted(spacing_in_ras(RAS_AFFINE)) == pytest.approx(sorted(SPACING))
    assert spacing_in_ras(RAS_AFFINE) != pytest.approx(SPACING)  # the axes really were permuted


def test_dicom_directory_with_two_series(tmp_path: Path) -> None:
    directory = _write_dicom(_volume(), tmp_path / "two", series="1")
    _write_dicom(_volume(scale=2), directory, series="2")
    with pytest.raises(DataError, match=r"two: directory holds 2 DICOM series"):
        SimpleITKReader().read(directory)
    reader = SimpleITKReader(series_uid=f"{UID}.2.2")
    array, _ = reader.get_data(reader.read(directory))
    np.testing.assert_array_equal(array, _volume(scale=2))


def test_load_volume(sources: dict[str, Path]) -> None:
    image, affine = load_volume(sources["nii.gz"])
    assert image.shape == (1, *SHAPE) and image.dtype == np.float32
    np.testing.assert_allclose(affine, RAS_AFFINE, atol=1e-6)
    label, dicom_affine = load_volume(sources["dicom"], label=True)
    assert label.dtype == np.int16
    np.testing.assert_array_equal(label[0], _volume())
    np.testing.assert_allclose(dicom_affine, RAS_AFFINE, atol=1e-4)


def _bad_files(tmp_path: Path, sources: dict[str, Path]) -> list[Path]:
    data = sources["nii.gz"].read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image\n", encoding="utf-8")
    bad_nrrd = tmp_path / "broken.nrrd"
    bad_nrrd.write_text("not nrrd either\n", encoding="utf-8")
    unsupported = tmp_path / "table.csv"
    unsupported.write_text("a,b\n", encoding="utf-8")
    return [truncated, text, bad_nrrd, unsupported, tmp_path / "missing.nii.gz", tmp_path / "missing_dir"]


def test_unreadable_files_raise_one_line_data_error(tmp_path: Path, sources: dict[str, Path]) -> None:
    for path in _bad_files(tmp_path, sources):
        with pytest.raises(DataError) as caught:
            load_volume(path)
        message = str(caught.value)
        assert message.startswith(str(path)), message
        assert "\n" not in message and len(message) < 400, message


def test_read_header_errors(tmp_path: Path, sources: dict[str, Path]) -> None:
    short = tmp_path / "short.nii.gz"
    short.write_bytes(sources["nii.gz"].read_bytes()[:40])
    bad = [p for p in _bad_files(tmp_path, sources) if p.name != "truncated.nii.gz"] + [short]
    for path in bad:
        with pytest.raises(DataError, match=path.name) as caught:
            read_header(path)
        assert "\n" not in str(caught.value)


def test_write_nifti_round_trip(tmp_path: Path) -> None:
    labels = (_volume() % 5).astype(np.int64)
    path = tmp_path / "label.nii.gz"
    write_nifti(labels, RAS_AFFINE, path)
    with gzip.open(path) as handle:  # really gzip-compressed
        handle.read(4)
    image = nib.load(path)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), labels)
    np.testing.assert_allclose(image.affine, RAS_AFFINE, atol=1e-6)
    loaded, affine = load_volume(path, label=True)
    np.testing.assert_array_equal(loaded[0], labels)
    np.testing.assert_allclose(affine, RAS_AFFINE, atol=1e-6)
    # Read back through SimpleITK too: the written geometry is what ITK sees.
    itk_image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(itk_image.GetOrigin(), ORIGIN_LPS, atol=1e-4)
    np.testing.assert_allclose(np.reshape(itk_image.GetDirection(), (3, 3)), DIRECTION, atol=1e-4)

    write_nifti(labels * 100, RAS_AFFINE, path)
    assert nib.load(path).get_data_dtype() == np.int16
    write_nifti(labels + 40000, RAS_AFFINE, path)
    assert nib.load(path).get_data_dtype() == np.uint16
    write_nifti(labels.astype(np.float64) + 0.25, RAS_AFFINE, path, dtype=np.uint8)
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), labels)
    with pytest.raises(ValueError, match="channel-first"):
        write_nifti(labels[None], RAS_AFFINE, path)
    assert [p.name for p in tmp_path.iterdir()] == ["label.nii.gz"]  # no temporary files left


def test_failed_write_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "label.nii.gz"
    write_nifti(np.ones(SHAPE, np.uint8), RAS_AFFINE, path)
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", failing_fsync)
    with pytest.raises(DataError, match=r"(?i)label\.nii\.gz: cannot write \(no space left on device"):
        write_nifti(np.zeros(SHAPE, np.uint8), RAS_AFFINE, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["label.nii.gz"]

    with pytest.raises(DataError, match="missing"):
        write_nifti(np.ones(SHAPE, np.uint8), RAS_AFFINE, tmp_path / "missing" / "x.nii.gz")


def test_unwritable_directory(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "locked"
    directory.mkdir()
    path = directory / "label.nii.gz"
    write_nifti(np.ones(SHAPE, np.uint8), RAS_AFFINE, path)
    before = path.read_bytes()
    directory.chmod(0o500)
    if os.geteuid() == 0:  # root ignores directory permissions: refuse the temporary file as the OS would
        def refused(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

        monkeypatch.setattr(tempfile, "mkstemp", refused)
    try:
        with pytest.raises(DataError, match="label.nii.gz"):
            write_nifti(np.zeros(SHAPE, np.uint8), RAS_AFFINE, path)
    finally:
        directory.chmod(0o700)
    assert path.read_bytes() == before
