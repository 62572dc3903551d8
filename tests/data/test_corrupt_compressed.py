"""Corrupt, truncated or mis-sized compressed data are refused with one line naming the file, by
medseg's reading functions, MONAI's LoadImage with medseg's readers, and the CLI; ITK's own
complaints stay off stderr; good files read as before."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage

from medseg.data.io import load_volume
from medseg.data.readers import readers
from medseg.errors import DataError
from tests.trained_run import SAMPLE, trained_run

SOURCE = SAMPLE / "imagesTr" / "sample_000.nii.gz"


def _both_readers(path: Path, match: str) -> None:
    """Both of medseg's reading paths refuse `path` with a DataError naming it and matching `match`."""
    with pytest.raises(DataError, match=match) as by_load_volume:
        load_volume(path)
    assert str(path) in str(by_load_volume.value)
    loader = LoadImage(reader=readers(dtype=np.float32), dtype=np.float32, image_only=True)
    with pytest.raises(DataError, match=match) as by_monai:
        loader(str(path))
    assert str(path) in str(by_monai.value)


def _stored_gzip(tmp_path: Path) -> bytearray:
    """The sample image as float32 NIfTI, gzip with stored (uncompressed) deflate blocks."""
    image = nib.load(SOURCE)
    data = np.asarray(image.dataobj).astype(np.float32)
    return bytearray(gzip.compress(nib.Nifti1Image(data, image.affine).to_bytes(), compresslevel=0))


def _corrupt_nifti(tmp_path: Path) -> Path:
    payload = _stored_gzip(tmp_path)
    payload[2015:42015] = b"\x42" * 40000  # inside the first stored block: deflate decodes, the CRC differs
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(payload))
    return path


def _metaimage(tmp_path: Path, name: str, compressed: bool) -> tuple[Path, bytes, int]:
    """A good MetaImage of the sample, its bytes, and where its element data begin."""
    path = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(str(SOURCE), sitk.sitkFloat32), str(path), useCompression=compressed)
    data = path.read_bytes()
    return path, data, data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")


def test_nifti_gz_with_wrong_crc_is_refused(tmp_path: Path) -> None:
    _both_readers(_corrupt_nifti(tmp_path), r"corrupt or truncated gzip data \(CRC check failed")


def test_nifti_gz_missing_its_trailer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.nii.gz"
    path.write_bytes(bytes(_stored_gzip(tmp_path)[:-8]))  # every voxel there, the CRC and length gone
    _both_readers(path, r"corrupt or truncated gzip data \(Compressed file ended")


def test_good_nifti_gz_reads_as_nibabel_reads_it(tmp_path: Path) -> None:
    image = nib.load(SOURCE)
    scaled = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    scaled.header.set_slope_inter(0.5, -3.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(scaled, path)
    for source in (SOURCE, path):
        expected = np.asanyarray(nib.load(source).dataobj)
        array, _ = load_volume(source)
        np.testing.assert_array_equal(array[0], expected.astype(np.float32))
        loaded = LoadImage(reader=readers(dtype=np.float32), dtype=np.float32, image_only=True)(str(source))
        np.testing.assert_array_equal(np.asarray(loaded), expected.astype(np.float32))


def test_garbage_compressed_metaimage_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    image = sitk.ReadImage(str(SOURCE), sitk.sitkFloat32)
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"ElementSpacing = {' '.join(map(str, image.GetSpacing()))}\n"
              f"DimSize = {' '.join(map(str, image.GetSize()))}\nElementType = MET_FLOAT\n"
              "CompressedData = True\nCompressedDataSize = 1000\nElementDataFile = LOCAL\n")
    path = tmp_path / "garbage.mha"
    path.write_bytes(header.encode() + np.random.default_rng(0).bytes(1000))
    _both_readers(path, "compressed data are corrupt")
    assert "Uncompress failed" not in capfd.readouterr().err


@pytest.mark.parametrize("damage, match", [
    ("truncated", "compressed data truncated"),
    ("flipped", "compressed data are corrupt"),
    ("size too small", "compressed data truncated or corrupt"),
    ("size too large", "compressed data truncated"),
])
def test_damaged_compressed_metaimage_is_refused(tmp_path: Path, damage: str, match: str) -> None:
    path, data, start = _metaimage(tmp_path, "damaged.mha", compressed=True)
    size = len(data) - start
    if damage == "truncated":
        data = data[: start + size // 2]
    elif damage == "flipped":
        data = data[: start + 100] + b"\0" * 200 + data[start + 300:]
    else:
        wrong = size // 2 if damage == "size too small" else size + 10
        data = data.replace(f"CompressedDataSize = {size}\n".encode(), f"CompressedDataSize = {wrong}\n".encode())
    path.write_bytes(data)
    _both_readers(path, match)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_truncated_file_is_refused_without_itk_output(tmp_path: Path, suffix: str,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"cut{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(SOURCE), sitk.sitkFloat32), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    capfd.readouterr()
    _both_readers(path, "truncated")
    assert capfd.readouterr().err == ""


def test_itk_complaints_are_kept_off_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A layout the MetaImage check leaves to ITK (data at the end of a separate file): ITK prints
    'data not read completely' itself, medseg's message replaces it."""
    _, data, start = _metaimage(tmp_path, "whole.mha", compressed=False)
    header = data[: data.index(b"ElementDataFile")] + b"HeaderSize = -1\nElementDataFile = cut.raw\n"
    (tmp_path / "cut.mhd").write_bytes(header)
    (tmp_path / "cut.raw").write_bytes(data[start:][:5000])
    capfd.readouterr()
    _both_readers(tmp_path / "cut.mhd", "voxel data truncated or unreadable")
    assert capfd.readouterr().err == ""


def test_good_metaimage_reads_as_before(tmp_path: Path) -> None:
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(SOURCE), sitk.sitkFloat32)).T
    for compressed in (False, True):
        path, _, _ = _metaimage(tmp_path, f"good{int(compressed)}.mha", compressed)
        array, _ = load_volume(path)
        np.testing.assert_array_equal(array[0], expected)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.mark.parametrize("kind", ["nifti", "metaimage"])
def test_infer_refuses_corrupt_input(run: Path, tmp_path: Path, kind: str) -> None:
    if kind == "nifti":
        image = _corrupt_nifti(tmp_path)
    else:
        image, data, start = _metaimage(tmp_path, "cut.mha", compressed=True)
        image.write_bytes(data[: start + (len(data) - start) // 2])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "medseg", "infer", str(run), str(image), "-o", str(out),
                             "--device", "cpu"], capture_output=True, encoding="utf-8", timeout=600)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(image) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.rglob("*.nii*"))
