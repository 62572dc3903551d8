"""Reading in one pass (the readers cast while they reorder into C order) changes no value.

The references are built without the code under test: the array from nibabel or SimpleITK
directly, cast and made C-ordered the straightforward way; the preprocessed image from the same
chain whose first step is MONAI's own ``LoadImaged`` with MONAI's own ``NibabelReader``, the
two-copy path medseg read NIfTI through before. Equality is bit for bit (NaN payloads and the
sign of zero included), and the meta must be the same keys and values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai import transforms as T
from monai.data import NibabelReader as MonaiNibabelReader

from medseg.data.io import c_order, load_volume
from medseg.data.readers import readers
from medseg.data.transforms import Preprocessing, preprocessing
from tests.dicom import write_series

# Crosses c_order's tile edges (64 along the fast axes, 16 along the others) on every axis.
SHAPE = (70, 18, 66)
AFFINE = np.array([[-0.8, 0.0, 0.0, 30.0], [0.0, -0.8, 0.0, 20.0], [0.0, 0.0, 1.0, -40.0], [0.0, 0.0, 0.0, 1.0]])


def _hounsfield(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """CT-like int16 values that differ along every axis (any transposition shows), air at the rim."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape[:3]), indexing="ij")
    values = ((x * 37 + y * 101 + z * 7) % 2500 - 1000).astype(np.int16)
    values[:3] = -1000
    return values if len(shape) == 3 else np.stack([values + 5 * c for c in range(shape[3])], axis=-1)


def _write(path: Path, array: np.ndarray, dtype: str | None = None, slope: float = 1.0, inter: float = 0.0,
           endianness: str = "<") -> Path:
    header = nib.Nifti1Header(endianness=endianness)
    header.set_data_dtype(np.dtype(dtype or array.dtype).newbyteorder("="))
    image = nib.Nifti1Image(array, AFFINE, header=header)
    image.header.set_slope_inter(slope, inter)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=1)
    nib.save(image, path)
    return path


def _float64_with_specials() -> np.ndarray:
    # Rounds to float32 (half-way cases, beyond float32's range, signed zeros, NaN, infinities).
    values = _hounsfield().astype(np.float64) / 3.0 + 1e-9
    values[0, 0, :6] = [np.nan, np.inf, -np.inf, -0.0, 1e300, 1.0 + 2.0**-24]
    return values


NIFTI: dict[str, Callable[[Path], Path]] = {
    "int16 .nii.gz": lambda d: _write(d / "ct.nii.gz", _hounsfield()),
    "int16 .nii": lambda d: _write(d / "ct.nii", _hounsfield()),
    "int16 big-endian .nii.gz": lambda d: _write(d / "big.nii.gz", _hounsfield(), endianness=">"),
    "int16 with scl_slope and scl_inter": lambda d: _write(d / "scaled.nii.gz", _hounsfield(), slope=0.37, inter=-12.5),
    "uint8 .nii.gz": lambda d: _write(d / "mask.nii.gz", (_hounsfield() % 7).astype(np.uint8)),
    "uint8 with scl_slope": lambda d: _write(d / "scaled8.nii", (_hounsfield() % 200).astype(np.uint8), slope=2.5),
    "uint16 .nii.gz": lambda d: _write(d / "mr.nii.gz", (_hounsfield() + 1000).astype(np.uint16)),
    "float32 .nii.gz": lambda d: _write(d / "float.nii.gz", _hounsfield().astype(np.float32) * 0.25),
    "float64 .nii": lambda d: _write(d / "double.nii", _float64_with_specials()),
    "4D int16 (channels last)": lambda d: _write(d / "channels.nii.gz", _hounsfield((*SHAPE, 2))),
}


def _nibabel_reference(path: Path) -> np.ndarray:
    """What the file holds, straight from nibabel, cast to float32 and then made C-ordered."""
    return np.ascontiguousarray(np.asanyarray(nib.load(path).dataobj).astype(np.float32))


def _same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


def _same_meta(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        if isinstance(value, (np.ndarray, torch.Tensor)):
            np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(value), err_msg=key)
        elif isinstance(value, float) and np.isnan(value):
            assert np.isnan(actual[key]), key
        else:
            assert actual[key] == value, key


@pytest.mark.parametrize("make", NIFTI.values(), ids=NIFTI.keys())
def test_readers_give_the_file_values_in_c_order_in_one_pass(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path)
    reader = readers(dtype=np.float32)[0]
    array, meta = reader.get_data(reader.read(str(path)))
    assert type(array) is np.ndarray and array.flags.c_contiguous
    _same_bits(array, _nibabel_reference(path))
    stock = MonaiNibabelReader()
    _, expected_meta = stock.get_data(stock.read(str(path)))
    _same_meta(meta, expected_meta)
    # Without a dtype the stored one is kept (byte order included), as nibabel gives it.
    plain = readers()[0]
    stored, _ = plain.get_data(plain.read(str(path)))
    expected = np.asanyarray(nib.load(path).dataobj)
    assert stored.flags.c_contiguous and stored.dtype == expected.dtype
    _same_bits(stored, np.ascontiguousarray(expected))


PREPROCESSING = {
    "ct": Preprocessing(spacing=(1.3, 1.1, 1.7), normalization="ct", channels=1, num_classes=3,
                        clip_low=(-900.0,), clip_high=(1200.0,), mean=(35.0,), std=(310.0,)),
    "zscore, no crop": Preprocessing(spacing=(0.8, 0.8, 1.0), normalization="zscore", channels=1, num_classes=3,
                                     crop_foreground=False),
    "none": Preprocessing(spacing=(2.0, 0.7, 1.0), normalization="none", channels=1, num_classes=3),
}


def _stock_chain(chain: T.Compose, keys: tuple[str, ...]) -> T.Compose:
    """`chain` with its loading done by MONAI's own LoadImaged and NibabelReader (two copies)."""
    loader = T.LoadImaged(keys, reader=MonaiNibabelReader(), image_only=True, ensure_channel_first=True)
    return T.Compose([loader, *chain.transforms[1:]])


@pytest.mark.parametrize("name", ["int16 .nii.gz", "int16 with scl_slope and scl_inter", "float64 .nii",
                                  "uint16 .nii.gz", "int16 big-endian .nii.gz"])
@pytest.mark.parametrize("prep", PREPROCESSING.values(), ids=PREPROCESSING.keys())
def test_preprocessed_image_is_bit_identical_to_monai_loading(tmp_path: Path, name: str, prep: Preprocessing) -> None:
    path = NIFTI[name](tmp_path)
    if name == "float64 .nii":  # NaN would make every normalised value NaN; keep the rounding cases
        array = np.nan_to_num(np.asanyarray(nib.load(path).dataobj), nan=0.0, posinf=3e38, neginf=-3e38)
        path = _write(tmp_path / "finite.nii", array)
    chain = preprocessing(prep, with_label=False)
    image = chain({"image": str(path)})["image"]
    expected = _stock_chain(chain, ("image",))({"image": str(path)})["image"]
    assert image.dtype == expected.dtype == torch.float32
    _same_bits(image.numpy(), expected.numpy())
    _same_meta(image.meta, expected.meta)
    assert len(image.applied_operations) == len(expected.applied_operations)


def test_training_cache_with_labels_is_bit_identical(tmp_path: Path) -> None:
    # Training caches this chain's output (image and label), so it must not change either.
    image_path = NIFTI["int16 with scl_slope and scl_inter"](tmp_path)
    label_path = _write(tmp_path / "label.nii.gz", (_hounsfield() > 200).astype(np.uint8) + (_hounsfield() > 900))
    chain = preprocessing(PREPROCESSING["ct"], with_label=True)
    case = {"image": str(image_path), "label": str(label_path)}
    result, expected = chain(dict(case)), _stock_chain(chain, ("image", "label"))(dict(case))
    for key, dtype in (("image", torch.float32), ("label", torch.uint8)):
        assert result[key].dtype == expected[key].dtype == dtype
        _same_bits(result[key].numpy(), expected[key].numpy())
        _same_meta(result[key].meta, expected[key].meta)
    assert int(result["label"].max()) == 2  # the label survived resampling


def _sitk_files(tmp_path: Path) -> dict[str, Path]:
    image = sitk.GetImageFromArray(np.ascontiguousarray(_hounsfield().transpose(2, 1, 0)))
    image.SetSpacing((0.8, 0.8, 1.0))
    image.SetOrigin((-30.0, -20.0, -40.0))
    paths = {suffix: tmp_path / f"ct.{suffix}" for suffix in ("nrrd", "mha")}
    for path in paths.values():
        sitk.WriteImage(image, str(path))
    paths["dicom"] = write_series(image, tmp_path / "dicom")
    return paths


def test_nrrd_mha_and_dicom_read_as_simpleitk_gives_them(tmp_path: Path) -> None:
    for name, path in _sitk_files(tmp_path).items():
        reference = sitk.ReadImage(str(path)) if name != "dicom" else _dicom(path)
        expected = np.ascontiguousarray(sitk.GetArrayFromImage(reference).T.astype(np.float32))
        loaded = T.LoadImaged("image", reader=readers(dtype=np.float32), image_only=True,
                              ensure_channel_first=True)({"image": str(path)})["image"]
        _same_bits(loaded.numpy()[0], expected)
        # The same as when LoadImaged casts the stored dtype itself (the readers without a dtype).
        two_step = T.LoadImaged("image", reader=readers(), image_only=True,
                                ensure_channel_first=True)({"image": str(path)})["image"]
        _same_bits(loaded.numpy(), two_step.numpy())
        _same_meta(loaded.meta, two_step.meta)
        array, affine = load_volume(path)
        _same_bits(array, expected[None])
        np.testing.assert_array_equal(affine, loaded.affine.numpy())


def _dicom(directory: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory)))
    return reader.Execute()


@pytest.mark.parametrize("make", NIFTI.values(), ids=NIFTI.keys())
def test_load_volume_matches_nibabel(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path)
    stored = np.asanyarray(nib.load(path).dataobj)
    stored = stored[None] if stored.ndim == 3 else np.moveaxis(stored, -1, 0)
    image, _ = load_volume(path)
    _same_bits(image, np.ascontiguousarray(stored.astype(np.float32)))
    label, _ = load_volume(path, label=True)
    _same_bits(label, np.ascontiguousarray(stored))


LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Fortran order (NIfTI)": lambda a: np.asfortranarray(a),
    "transposed view (SimpleITK)": lambda a: np.ascontiguousarray(a.transpose(2, 1, 0)).T,
    "channel first, Fortran": lambda a: np.asfortranarray(a)[None],
    "reversed axes": lambda a: np.asfortranarray(a)[::-1, :, ::-2],
    "one voxel thick": lambda a: np.asfortranarray(a[:, :1]),
    "C order": lambda a: np.ascontiguousarray(a),
    "1D strided": lambda a: a.ravel()[::3],
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("source, target", [(np.int16, np.float32), (np.float64, np.float32), (np.dtype(">i2"), None),
                                            (np.uint8, np.float32), (np.float32, None)])
def test_c_order_is_astype_then_ascontiguousarray(layout: Callable, source: type, target: type | None) -> None:
    values = _float64_with_specials() if source is np.float64 else _hounsfield().astype(source)
    array = layout(values)
    result = c_order(array, target)
    assert result.flags.c_contiguous
    _same_bits(result, np.ascontiguousarray(array.astype(target or array.dtype)))


def test_c_order_copies_nothing_it_need_not() -> None:
    array = np.ascontiguousarray(_hounsfield())
    assert c_order(array) is array and c_order(array, np.int16) is array
    assert not np.shares_memory(c_order(np.asfortranarray(array)), array)
