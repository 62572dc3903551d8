"""The volumes `medseg infer` segments, found in the files and folders it is given.

Files: NIfTI, NRRD, MetaImage, segmented whatever their names. Folders, recursively: every such
file inside whose name (or path below the folder) matches an `include` pattern (all files without
one) and no `exclude` pattern, and every DICOM series (one input per series). Label-like files are
left out of folders by default (`LABEL_PATTERNS`, and files in a `labelsTr` folder), with a note:
name such a file itself to segment it. nnU-Net-style channel files `<case>_0000.nii.gz`,
`<case>_0001.nii.gz`, ... are grouped into one case of `channels` channels.

Nothing is skipped silently: a missing or unsupported path, an empty folder and a folder of files
that hold no DICOM series are each a problem (one line); symbolic links are followed, each folder
visited once, so a link back to a folder above ends the walk there (a note) instead of recursing.
A DICOM series is named after its SeriesDescription and SeriesInstanceUID.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from medseg.data.cases import CHANNEL, IMAGE_SUFFIXES, InferenceInput, case_name, image_suffix

# File names in folders that are segmentations rather than images (matched case-insensitively).
LABEL_PATTERNS = ("*_label*", "*_labels*", "*_seg*", "*mask*")
LABEL_FOLDERS = ("labelsTr", "labelsTs")
# Files that are certainly not DICOM slices: a folder of only these is not scanned for a series.
NOT_DICOM = (".json", ".txt", ".csv", ".md", ".yaml", ".yml", ".png", ".jpg", ".pt", ".gz", ".zip", ".py")
MAX_NAME = 120  # characters of a DICOM output name taken from its tags


@dataclass
class FoundInputs:
    """What `find_inputs` found: the inputs, one line per path it could not use (`problems`), and
    notes on what it left out on purpose."""

    inputs: list[InferenceInput] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_inputs(paths: Sequence[Path], channels: int, include: Sequence[str] = (), exclude: Sequence[str] = (),
                skip: Sequence[Path] = ()) -> FoundInputs:
    """Find the volumes to segment in `paths` (see the module docstring); folders in `skip` (the
    output folder) are not entered."""
    found = FoundInputs()
    walk = _Walk(channels, tuple(include), tuple(exclude), {_identity(p) for p in skip if Path(p).is_dir()}, found)
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            before = (len(found.inputs), len(found.problems))
            walk.folder(path, path)
            if (len(found.inputs), len(found.problems)) == before:
                found.problems.append(f"{path}: no images or DICOM series found")
        elif path.is_file() and image_suffix(path):
            files.append(path)
        elif path.is_file():
            found.problems.append(f"{path}: not a supported image ({', '.join(IMAGE_SUFFIXES)}) or a DICOM folder")
        elif os.path.islink(path):
            found.problems.append(f"{path}: broken symbolic link (its target does not exist)")
        else:
            found.problems.append(f"{path}: input does not exist")
    # Files given one by one are grouped like files in a folder (channel files of one case together).
    found.inputs[:0] = group_channels(files, channels)
    if walk.labels:
        shown = ", ".join(str(p) for p in walk.labels[:3]) + (", ..." if len(walk.labels) > 3 else "")
        found.notes.append(f"left out {len(walk.labels)} label-like file(s) ({shown}); name a file itself to "
                           "segment it")
    return found


def group_channels(files: Sequence[Path], channels: int) -> list[InferenceInput]:
    """Inputs from image files: `<case>_0000`, `<case>_0001`, ... of a `channels`-channel model
    together, every other file on its own. A file on its own is keyed by its path: `case.mha` and
    `case.nrrd` (or `case.nii.gz` and `case_0000.nii.gz`) are two inputs of one name, which
    `segment_inputs` refuses to write twice, rather than one of them dropped here."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in files:
        match = CHANNEL.match(case_name(path))
        if match and (channels > 1 or match["channel"] == "0000"):
            groups.setdefault((str(path.parent), match["case"]), []).append(path)
        else:
            groups[(str(path), case_name(path))] = [path]
    # A wrong number of channel files is reported when the case is loaded, per input.
    return [InferenceInput(name, tuple(sorted(members))) for (_, name), members in groups.items()]


def safe_name(text: str) -> str:
    """`text` as a file name: letters, digits, `.`, `-`, `_` kept, runs of anything else one `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:MAX_NAME]


def series_name(folder: Path, uid: str) -> str:
    """The output name of a DICOM series: `<SeriesDescription>_<SeriesInstanceUID>`, sanitised."""
    import SimpleITK as sitk

    description = ""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    if files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.LoadPrivateTagsOff()
        try:
            reader.ReadImageInformation()
            if reader.HasMetaDataKey("0008|103e"):
                description = reader.GetMetaData("0008|103e")
        except RuntimeError:
            pass  # an unreadable slice is reported when the series is read
    parts = [safe_name(description), safe_name(uid)]
    return "_".join(p for p in parts if p) or safe_name(folder.name) or "series"


class _Walk:
    """One recursive walk over folders, remembering the folders it entered (by device and inode)."""

    def __init__(self, channels: int, include: tuple[str, ...], exclude: tuple[str, ...],
                 skip: set[tuple[int, int]], found: FoundInputs) -> None:
        self.channels, self.include, self.exclude, self.found = channels, include, exclude, found
        self.visited: dict[tuple[int, int], Path] = {key: Path("<output folder>") for key in skip}
        self.labels: list[Path] = []

    def folder(self, folder: Path, root: Path) -> None:
        key = _identity(folder)
        if key in self.visited:
            if self.visited[key] != Path("<output folder>"):
                self.found.notes.append(f"{folder}: not entered, it leads back to {self.visited[key]} "
                                        "(a symbolic link loop or a second link to one folder)")
            return
        self.visited[key] = folder
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            self.found.problems.append(f"{folder}: cannot list the folder ({exc.strerror or exc})")
            return
        if not entries:
            self.found.problems.append(f"{folder}: empty folder, nothing to segment")
            return
        images, candidates, folders = [], [], []
        for entry in entries:
            if entry.is_dir():
                folders.append(entry)
            elif entry.is_file() and image_suffix(entry):
                images.append(entry)
            elif entry.is_file() and entry.suffix.lower() not in NOT_DICOM and not entry.name.startswith("."):
                candidates.append(entry)
            elif not entry.exists():
                self.found.problems.append(f"{entry}: broken symbolic link (its target does not exist)")
        if candidates:
            self._series(folder, len(candidates))
        self.found.inputs += group_channels([p for p in images if self._wanted(p, root)], self.channels)
        for sub in folders:
            self.folder(sub, root)

    def _series(self, folder: Path, count: int) -> None:
        import SimpleITK as sitk

        uids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        if not uids:
            self.found.problems.append(f"{folder}: {count} file(s) that are neither images nor a readable "
                                       "DICOM series")
        for uid in uids:
            self.found.inputs.append(InferenceInput(series_name(folder, uid), (folder,), uid))

    def _wanted(self, path: Path, root: Path) -> bool:
        names = (path.name, path.relative_to(root).as_posix()) if path.is_relative_to(root) else (path.name,)
        if self.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.include):
            return False
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude):
            return False
        label_like = path.parent.name in LABEL_FOLDERS or any(
            fnmatch.fnmatchcase(case_name(path).lower(), p) for p in LABEL_PATTERNS)
        if label_like:
            self.labels.append(path)
        return not label_like


def _identity(folder: Path) -> tuple[int, int]:
    status = os.stat(folder)  # follows symbolic links: a linked folder is the folder it names
    return status.st_dev, status.st_ino
