"""Finding cases: MSD/nnU-Net folders with dataset.json, or plain folders of image/label pairs.

Also the deterministic k-fold split.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import DataError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = ("_label", "_labels", "_seg", "_mask")
# nnU-Net's channel files: <case>_0000, <case>_0001, ... (names without their suffix).
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# dataset.json is a small text file; a larger one is not a dataset description.
MAX_DATASET_JSON_BYTES = 64 << 20


@dataclass(frozen=True)
class Case:
    """One training case: its image file(s) (one per channel, or one multi-channel file) and label."""

    name: str
    images: tuple[Path, ...]
    label: Path | None

    def as_dict(self) -> dict:
        """The dictionary MONAI transforms work on."""
        image: str | list[str] = str(self.images[0]) if len(self.images) == 1 else [str(p) for p in self.images]
        item = {"name": self.name, "image": image}
        if self.label is not None:
            item["label"] = str(self.label)
        return item


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset folder holds."""

    root: Path
    cases: tuple[Case, ...]
    labels: dict[int, str] = field(default_factory=dict)  # label value -> name, 0 = background
    modalities: tuple[str, ...] = ()  # one per input channel, e.g. ("CT",) or ("T1", "T2")

    @property
    def num_classes(self) -> int:
        """Number of output classes including background."""
        return max(self.labels) + 1 if self.labels else 0


def find_dataset(root: str | Path) -> DatasetInfo:
    """Read a dataset folder: `dataset.json` + imagesTr/labelsTr, or image/label pairs."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: dataset path is not a folder")
    description = root / "dataset.json"
    if description.is_file():
        info = _from_dataset_json(root, description)
    else:
        info = _from_pairs(root)
    if not info.cases:
        raise DataError(f"{root}: no cases found (expected dataset.json with imagesTr/labelsTr, or image/label pairs)")
    _check_unique_names(info.cases, description if description.is_file() else root)
    return info


def _check_unique_names(cases: tuple[Case, ...], source: Path) -> None:
    """Each case once: a case listed twice could land in one fold's training and its validation."""
    counts = Counter(case.name for case in cases)
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        raise DataError(f"{source}: case{'s' if len(twice) > 1 else ''} {', '.join(repr(n) for n in twice)} "
                        "listed more than once (each case may appear once)")


def split(cases: tuple[Case, ...] | list[Case], folds: int, fold: int, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic k-fold split: the case names sorted, shuffled by numpy's RandomState(`seed`),
    and cut into `folds` consecutive parts, the first `len % folds` one case larger.

    This is the assignment of scikit-learn's KFold(shuffle=True, random_state=seed), which nnU-Net
    uses for its default split (seed 12345) over the sorted case names: with the same seed, medseg's
    fold k holds the same validation cases as nnU-Net's, so results on a fold compare directly.
    fold = -1 means train on everything, validate on nothing.
    """
    ordered = sorted(cases, key=lambda c: c.name)
    if fold == -1:
        return ordered, []
    if folds < 2 or not 0 <= fold < folds:
        raise DataError(f"fold {fold} is not in 0..{folds - 1} (data.folds={folds})")
    if len(ordered) < folds:
        raise DataError(f"{len(ordered)} cases cannot be split into {folds} folds")
    order = np.arange(len(ordered))
    np.random.RandomState(seed).shuffle(order)
    sizes = [len(ordered) // folds + (k < len(ordered) % folds) for k in range(folds)]
    start = sum(sizes[:fold])
    val_index = set(order[start:start + sizes[fold]].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_index]
    val = [c for i, c in enumerate(ordered) if i in val_index]
    return train, val


def _from_dataset_json(root: Path, path: Path) -> DatasetInfo:
    if path.stat().st_size > MAX_DATASET_JSON_BYTES:
        raise DataError(f"{path}: {path.stat().st_size} bytes, larger than a dataset description can be "
                        f"({MAX_DATASET_JSON_BYTES >> 20} MiB)")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(description, dict):
        raise DataError(f"{path}: expected a JSON object")
    labels = _labels(description.get("labels", {}), path)
    modalities = description.get("channel_names") or description.get("modality") or {}
    if not isinstance(modalities, dict) or not all(str(k).isdigit() and isinstance(v, str)
                                                   for k, v in modalities.items()):
        raise DataError(f"{path}: 'modality' / 'channel_names' must map channel numbers to names, "
                        f"e.g. {{\"0\": \"CT\"}}")
    modality_names = tuple(str(modalities[k]) for k in sorted(modalities, key=lambda k: int(k)))
    ending = description.get("file_ending", ".nii.gz")
    if not isinstance(ending, str):
        raise DataError(f"{path}: 'file_ending' must be a string such as \".nii.gz\", got {_json_kind(ending)}")
    if ending.lower() not in IMAGE_SUFFIXES:
        # The folder scan joins case names with it: anything but an image suffix could name a file
        # elsewhere ("/../../x.nii.gz") or one medseg cannot read.
        raise DataError(f"{path}: 'file_ending' {ending!r} is not one of {', '.join(IMAGE_SUFFIXES)}")
    cases = []
    if isinstance(description.get("training"), list):
        for number, entry in enumerate(description["training"]):
            if not isinstance(entry, dict) or "image" not in entry:
                raise DataError(f"{path}: each 'training' entry needs an 'image'")
            for key in ("image", "label"):
                if key in entry and not isinstance(entry[key], str) and not (key == "label" and entry[key] is None):
                    raise DataError(f"{path}: 'training' entry {number}: '{key}' must be a path (a string), "
                                    f"got {_json_kind(entry[key])}")
            image = _inside(root, entry["image"], path)
            label = _inside(root, entry["label"], path) if entry.get("label") else None
            name = case_name(image)
            images = _channel_files(image, ending)
            if not images:
                raise DataError(f"{image}: listed in {path.name} but missing")
            if label is not None and not label.exists():
                raise DataError(f"{label}: listed in {path.name} but missing")
            cases.append(Case(name, images, label))
    else:
        cases = _scan(root / "imagesTr", root / "labelsTr", ending)
    for case in cases:  # every derived path too: channel files, case names joined with file_ending
        for derived in (*case.images, *([case.label] if case.label is not None else [])):
            _inside(root, str(derived), path)
    return DatasetInfo(root, tuple(cases), labels, modality_names)


def _from_pairs(root: Path) -> DatasetInfo:
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (root / images_dir).is_dir() and (root / labels_dir).is_dir():
            return DatasetInfo(root, tuple(_scan(root / images_dir, root / labels_dir, None)))
    # A flat folder: <case>.nii.gz beside <case>_label.nii.gz (or _seg, _mask).
    files = sorted(p for p in root.iterdir() if image_suffix(p))
    labels = {}
    for p in files:
        stem = case_name(p)
        for marker in LABEL_SUFFIXES:
            if stem.endswith(marker):
                labels[stem[: -len(marker)]] = p
    cases = [
        Case(case_name(p), (p,), labels[case_name(p)])
        for p in files
        if case_name(p) in labels
    ]
    return DatasetInfo(root, tuple(cases))


def _scan(images_dir: Path, labels_dir: Path, ending: str | None) -> list[Case]:
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: folder does not exist")
    cases = []
    for label in sorted(p for p in labels_dir.iterdir() if image_suffix(p)):
        name = case_name(label)
        images = _channel_files(images_dir / (name + (ending or image_suffix(label))), ending or image_suffix(label))
        if not images:
            raise DataError(f"{label}: no image for case '{name}' in {images_dir}")
        cases.append(Case(name, images, label))
    return cases


def _channel_files(image: Path, ending: str) -> tuple[Path, ...]:
    """The image itself if it exists, else nnU-Net's per-channel files <case>_0000<ending>, ..."""
    if image.exists():
        return (image,)
    ending = image_suffix(image) or ending
    stem = str(image)[: -len(ending)] if ending and str(image).endswith(ending) else str(image)
    channels = []
    while Path(f"{stem}_{len(channels):04d}{ending}").exists():
        channels.append(Path(f"{stem}_{len(channels):04d}{ending}"))
    return tuple(channels)


def _inside(root: Path, relative: str, source: Path) -> Path:
    # Paths in dataset.json are relative to the dataset; refuse ones that leave it (judged on the
    # text of the path, so that a dataset of symbolic links to files elsewhere still works).
    if not relative or "\0" in relative:
        raise DataError(f"{source}: path {relative!r} is empty or holds a NUL character")
    base = Path(os.path.normpath(root.absolute()))
    path = Path(os.path.normpath(base / relative))
    if path == base or not path.is_relative_to(base):
        raise DataError(f"{source}: path '{relative}' points outside the dataset folder")
    return path


def _json_kind(value: object) -> str:
    """How a malformed dataset.json value is named in a message: its JSON type."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _labels(raw: object, path: Path) -> dict[int, str]:
    if not isinstance(raw, dict):
        raise DataError(f"{path}: 'labels' must be an object")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}.
        if isinstance(value, int) and not isinstance(value, bool):
            labels[value] = str(key)
        elif str(key).lstrip("-").isdigit():
            labels[int(key)] = str(value)
        else:
            raise DataError(f"{path}: label entry {key!r}: {value!r} is neither 'value: name' nor 'name: value'")
    if labels and sorted(labels) != list(range(len(labels))):
        raise DataError(f"{path}: label values must be 0..{len(labels) - 1}, got {sorted(labels)}")
    return labels


def class_name(value: int) -> str:
    """The name of a label value without a dataset.json 'labels' entry: background, class_1, class_2, ..."""
    return "background" if value == 0 else f"class_{value}"


def image_suffix(path: Path) -> str:
    """The image suffix of `path` (one of IMAGE_SUFFIXES, lower case), or "" for other files."""
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and not name.startswith("."):
            return suffix
    return ""


def case_name(path: Path) -> str:
    """The case a file belongs to: its name without the image suffix (`case_001.nii.gz` -> `case_001`)."""
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


@dataclass(frozen=True)
class InferenceInput:
    """One volume to segment: its file(s) (one per channel) or a DICOM series in a directory."""

    name: str
    images: tuple[Path, ...]
    series_uid: str | None = None

    @property
    def source(self) -> str:
        """How the input is named in messages and tables."""
        where = str(self.images[0]) if len(self.images) == 1 else f"{self.images[0]} (+{len(self.images) - 1} channels)"
        return f"{where} [series {self.series_uid}]" if self.series_uid else where

    def as_dict(self) -> dict:
        """The dictionary MONAI transforms work on."""
        image: str | list[str] = str(self.images[0]) if len(self.images) == 1 else [str(p) for p in self.images]
        return {"name": self.name, "image": image}
