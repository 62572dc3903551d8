"""medseg.data.cases: finding cases in MSD / nnU-Net v2 / plain / flat folders, and the k-fold split."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.cases import Case, DatasetInfo, find_dataset, split
from medseg.errors import DataError

_RNG = np.random.default_rng(0)


def _nifti(path: Path, label: bool = False) -> Path:
    """A random 8^3 volume (float image, or uint8 label) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _RNG.integers(0, 2, (8, 8, 8)).astype(np.uint8) if label else _RNG.random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _names(info: DatasetInfo) -> list[str]:
    return [c.name for c in info.cases]


def _by_name(info: DatasetInfo) -> dict[str, Case]:
    return {c.name: c for c in info.cases}


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --- MSD ----------------------------------------------------------------------------------------


@pytest.fixture
def msd(tmp_path) -> Path:
    root = tmp_path / "Task02_Heart"
    training = []
    for name in ("la_003", "la_007", "la_010"):
        _nifti(root / "imagesTr" / f"{name}.nii.gz")
        _nifti(root / "labelsTr" / f"{name}.nii.gz", label=True)
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    _nifti(root / "imagesTs" / "la_001.nii.gz")  # test images are not training cases
    (root / "dataset.json").write_text(json.dumps({
        "name": "LeftAtrium",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "numTraining": 3,
        "training": training,
        "test": ["./imagesTs/la_001.nii.gz"],
    }))
    return root


def test_msd_layout(msd):
    info = find_dataset(msd)
    assert sorted(_names(info)) == ["la_003", "la_007", "la_010"]
    case = _by_name(info)["la_007"]
    assert len(case.images) == 1
    assert _same(case.images[0], msd / "imagesTr" / "la_007.nii.gz")
    assert _same(case.label, msd / "labelsTr" / "la_007.nii.gz")
    assert info.labels == {0: "background", 1: "left atrium"}
    assert info.num_classes == 2
    assert info.modalities == ("MRI",)
    item = case.as_dict()
    assert item["name"] == "la_007"
    assert isinstance(item["image"], str) and Path(item["image"]).is_file()
    assert Path(item["label"]).is_file()


def test_msd_layout_accepts_a_str_path(msd):
    assert sorted(_names(find_dataset(str(msd)))) == ["la_003", "la_007", "la_010"]


# --- nnU-Net v2 ---------------------------------------------------------------------------------


@pytest.fixture
def nnunet(tmp_path) -> Path:
    root = tmp_path / "Dataset005_Prostate"
    for name in ("prostate_00", "prostate_01"):
        _nifti(root / "imagesTr" / f"{name}_0000.nii.gz")
        _nifti(root / "imagesTr" / f"{name}_0001.nii.gz")
        _nifti(root / "labelsTr" / f"{name}.nii.gz", label=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "a": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }))
    return root


def test_nnunet_v2_layout(nnunet):
    info = find_dataset(nnunet)
    assert sorted(_names(info)) == ["prostate_00", "prostate_01"]
    case = _by_name(info)["prostate_01"]
    assert len(case.images) == 2
    assert _same(case.images[0], nnunet / "imagesTr" / "prostate_01_0000.nii.gz")
    assert _same(case.images[1], nnunet / "imagesTr" / "prostate_01_0001.nii.gz")
    assert _same(case.label, nnunet / "labelsTr" / "prostate_01.nii.gz")
    assert info.labels == {0: "background", 1: "a"}
    assert info.num_classes == 2
    assert info.modalities == ("T2", "ADC")
    image = case.as_dict()["image"]
    assert isinstance(image, list) and len(image) == 2


def test_nnunet_v2_image_missing_for_a_label(nnunet):
    (nnunet / "imagesTr" / "prostate_01_0000.nii.gz").unlink()
    (nnunet / "imagesTr" / "prostate_01_0001.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        find_dataset(nnunet)
    assert "prostate_01" in str(info.value)


def test_bad_label_values_are_refused(nnunet):
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 2}}))
    with pytest.raises(DataError) as info:
        find_dataset(nnunet)
    assert str(nnunet / "dataset.json") in str(info.value)


# --- plain and flat folders ---------------------------------------------------------------------


def test_plain_images_and_labels_folders(tmp_path):
    root = tmp_path / "plain"
    for name in ("b", "a"):
        _nifti(root / "images" / f"{name}.nii.gz")
        _nifti(root / "labels" / f"{name}.nii.gz", label=True)
    info = find_dataset(root)
    assert _names(info) == ["a", "b"]
    assert _same(info.cases[1].images[0], root / "images" / "b.nii.gz")
    assert _same(info.cases[1].label, root / "labels" / "b.nii.gz")
    assert info.labels == {} and info.num_classes == 0  # unknown until the labels are read


def test_flat_folder_of_pairs(tmp_path):
    root = tmp_path / "flat"
    _nifti(root / "x.nii.gz")
    _nifti(root / "x_seg.nii.gz", label=True)
    _nifti(root / "y.nii.gz")
    _nifti(root / "y_label.nii.gz", label=True)
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    info = find_dataset(root)
    assert _names(info) == ["x", "y"]
    x = _by_name(info)["x"]
    assert _same(x.images[0], root / "x.nii.gz") and len(x.images) == 1
    assert _same(x.label, root / "x_seg.nii.gz")
    assert _same(_by_name(info)["y"].label, root / "y_label.nii.gz")


# --- errors -------------------------------------------------------------------------------------


def _data_error(root: Path) -> str:
    with pytest.raises(DataError) as info:
        find_dataset(root)
    return str(info.value)


def test_missing_folder(tmp_path):
    root = tmp_path / "does_not_exist"
    assert str(root) in _data_error(root)


def test_path_is_a_file(tmp_path):
    path = tmp_path / "file.nii.gz"
    path.write_bytes(b"")
    assert str(path) in _data_error(path)


def test_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    message = _data_error(root)
    assert str(root) in message
    assert "no cases" in message


def test_folder_with_images_but_no_labels(tmp_path):
    root = tmp_path / "unlabelled"
    _nifti(root / "x.nii.gz")
    assert str(root) in _data_error(root)


def test_dataset_json_not_json(msd):
    (msd / "dataset.json").write_text("{ this is not json", encoding="utf-8")
    assert str(msd / "dataset.json") in _data_error(msd)


def test_dataset_json_lists_a_missing_image(msd):
    (msd / "imagesTr" / "la_007.nii.gz").unlink()
    message = _data_error(msd)
    assert str(msd / "imagesTr" / "la_007.nii.gz") in message


def test_dataset_json_lists_a_missing_label(msd):
    (msd / "labelsTr" / "la_010.nii.gz").unlink()
    message = _data_error(msd)
    assert str(msd / "labelsTr" / "la_010.nii.gz") in message


@pytest.mark.parametrize("field", ["image", "label"])
def test_dataset_json_path_escaping_the_dataset(msd, field):
    outside = _nifti(msd.parent / "outside.nii.gz", label=field == "label")  # exists, still refused
    description = json.loads((msd / "dataset.json").read_text(encoding="utf-8"))
    description["training"][0][field] = "./imagesTr/../../outside.nii.gz"
    (msd / "dataset.json").write_text(json.dumps(description))
    message = _data_error(msd)
    assert str(msd / "dataset.json") in message
    assert "../../outside.nii.gz" in message
    assert outside.is_file()


def test_dataset_of_symbolic_links_to_files_elsewhere_is_accepted(msd, tmp_path):
    # Only the text of a listed path must stay inside the dataset, not its link target.
    store = tmp_path / "store"
    for kind in ("imagesTr", "labelsTr"):
        target = store / kind / "la_003.nii.gz"
        target.parent.mkdir(parents=True)
        (msd / kind / "la_003.nii.gz").rename(target)
        (msd / kind / "la_003.nii.gz").symlink_to(target)
    case = _by_name(find_dataset(msd))["la_003"]
    assert case.images[0].is_file() and case.label.is_file()
    assert _same(case.images[0], store / "imagesTr" / "la_003.nii.gz")


def test_nnunet_layout_without_labels_folder(nnunet):
    for path in (nnunet / "labelsTr").iterdir():
        path.unlink()
    (nnunet / "labelsTr").rmdir()
    assert str(nnunet / "labelsTr") in _data_error(nnunet)


# --- split --------------------------------------------------------------------------------------


def _cases(n: int = 11) -> list[Case]:
    return [Case(f"case_{i:03d}", (Path(f"/d/case_{i:03d}.nii.gz"),), Path(f"/d/case_{i:03d}_seg.nii.gz"))
            for i in range(n)]


def _names_of(cases) -> list[str]:
    return [c.name for c in cases]


def test_split_is_deterministic_and_independent_of_input_order():
    cases = _cases()
    first = split(cases, folds=5, fold=2, seed=7)
    again = split(list(reversed(cases)), folds=5, fold=2, seed=7)
    assert first == again
    assert _names_of(first[0]) == sorted(_names_of(first[0]))  # lists come sorted by name


def test_folds_partition_all_cases():
    cases = _cases()
    all_names = set(_names_of(cases))
    validation = []
    for fold in range(5):
        train, val = split(cases, folds=5, fold=fold, seed=7)
        assert set(_names_of(train)) | set(_names_of(val)) == all_names
        assert not set(_names_of(train)) & set(_names_of(val))
        assert len(train) + len(val) == len(cases)
        validation.append(set(_names_of(val)))
    for i in range(5):
        for j in range(i + 1, 5):
            assert not validation[i] & validation[j]
    assert set().union(*validation) == all_names
    assert sorted(len(v) for v in validation) == [2, 2, 2, 2, 3]  # as even as possible


def _assignment(seed: int) -> list[list[str]]:
    return [_names_of(split(_cases(), folds=5, fold=f, seed=seed)[1]) for f in range(5)]


def test_different_seed_gives_a_different_split():
    assert _assignment(7) == _assignment(7)
    assert _assignment(7) != _assignment(8)


def test_fold_minus_one_trains_on_everything():
    cases = _cases()
    train, val = split(cases, folds=5, fold=-1, seed=7)
    assert val == []
    assert _names_of(train) == sorted(_names_of(cases))


@pytest.mark.parametrize(("folds", "fold"), [(5, 5), (5, -2), (5, 17), (1, 0), (0, 0)])
def test_bad_fold_raises(folds, fold):
    with pytest.raises(DataError, match=str(fold)):
        split(_cases(), folds=folds, fold=fold, seed=7)


def test_more_folds_than_cases_raises():
    with pytest.raises(DataError, match="3 cases"):
        split(_cases(3), folds=5, fold=0, seed=7)
