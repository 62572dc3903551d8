"""Data files named by text headers: MetaImage's `ElementDataFile` and NRRD's `data file`.

A `.mhd`/`.mha` or `.nhdr`/`.nrrd` header may keep its voxels in other files, named relative to
the header's folder: one file, a `LIST` of files (one per slice), or a printf-style pattern with a
range (`slice%03d.raw 1 40 1`). `check_data_files` parses the text header itself, reading a
bounded number of bytes, and refuses every such name that is absolute or leaves the header's
folder (`..`), before SimpleITK opens anything. Names are judged on their text, `..` folded, so a
symbolic link inside the folder is followed as its owner meant.
"""

from __future__ import annotations

import os
import re

from medseg.errors import DataError

# A header, with a LIST of slice files after it, is text of a few KB; more is not read.
MAX_HEADER_BYTES = 1 << 20
_PATTERN = re.compile(r"^(?P<pattern>.*%.*?)\s+-?\d+\s+-?\d+\s+-?\d+(\s+\d+)?$")
_NRRD_LIST = re.compile(r"^LIST(\s+\d+)?$", re.IGNORECASE)
_META_LIST = re.compile(r"^LIST(\s+\w+)?$", re.IGNORECASE)


def check_data_files(path: str) -> None:
    """DataError if the MetaImage or NRRD header at `path` names a data file outside its folder.

    Other files (NIfTI, folders) are left alone. A MetaImage header without `ElementDataFile` in
    its first MAX_HEADER_BYTES is refused too (SimpleITK would search further).
    """
    name = path.lower()
    if os.path.isdir(path):
        return
    if name.endswith((".mha", ".mhd")):
        for data_file in _metaimage_data_files(path):
            _check_inside(path, data_file, "ElementDataFile")
    elif name.endswith((".nrrd", ".nhdr")):
        for data_file in _nrrd_data_files(path):
            _check_inside(path, data_file, "data file")


def _read_head(path: str) -> tuple[list[str], bool]:
    """The first MAX_HEADER_BYTES of `path` as lines (latin-1: any byte decodes), and whether that
    is the whole file."""
    with open(path, "rb") as stream:
        head = stream.read(MAX_HEADER_BYTES + 1)
    whole = len(head) <= MAX_HEADER_BYTES
    return head[:MAX_HEADER_BYTES].decode("latin-1").splitlines(), whole


def _metaimage_data_files(path: str) -> list[str]:
    lines, whole = _read_head(path)
    for index, line in enumerate(lines):
        key, separator, value = line.partition("=")
        if not separator or key.strip().lower() != "elementdatafile":
            continue
        value = value.strip()
        if value.upper() == "LOCAL":
            return []
        if _META_LIST.match(value):
            return _listed(path, lines[index + 1:], whole)
        return [_pattern_or_name(value)]
    raise DataError(f"{path}: not a MetaImage header (no ElementDataFile in its first "
                    f"{MAX_HEADER_BYTES >> 20} MiB)")


def _nrrd_data_files(path: str) -> list[str]:
    lines, whole = _read_head(path)
    for index, line in enumerate(lines):
        if index and not line.strip():
            return []  # the blank line ends the header: the data follow it in this file
        if line.startswith("#") or ":=" in line:
            continue  # comments and key/value pairs
        key, separator, value = line.partition(":")
        if separator and key.strip().lower() in ("data file", "datafile"):
            value = value.strip()
            if _NRRD_LIST.match(value):  # the names follow, one a line, to the end of the file
                return _listed(path, lines[index + 1:], whole)
            return [_pattern_or_name(value)]
    return []


def _listed(path: str, lines: list[str], whole: bool) -> list[str]:
    if not whole:
        raise DataError(f"{path}: its list of data files is longer than {MAX_HEADER_BYTES >> 20} MiB")
    return [line.strip() for line in lines if line.strip()]


def _pattern_or_name(value: str) -> str:
    # "slice%03d.raw 1 40 1": the numbers fill the pattern and cannot add a folder to it.
    match = _PATTERN.match(value)
    return match["pattern"].strip() if match else value


def _check_inside(header: str, data_file: str, field: str) -> None:
    folder = os.path.normpath(os.path.dirname(os.path.abspath(header)))
    target = os.path.normpath(os.path.join(folder, data_file))
    outside = (not data_file or "\0" in data_file or os.path.isabs(data_file) or data_file.startswith("\\")
               or os.path.commonpath([folder, target]) != folder or target == folder)
    if outside:
        raise DataError(f"{header}: {field} '{data_file[:200]}' points outside the header's folder "
                        f"(refused before reading it)")
