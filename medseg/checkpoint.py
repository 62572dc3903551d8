"""Saving and loading checkpoints: atomic writes, checked and safe loads (no code execution).

Before `torch.load` sees a file, `verify` checks it as a zip archive in torch's format without
decompressing or allocating anything its records claim: a sane central directory, every record
stored (not compressed) and inside the file, records not overlapping, every record's CRC (read
in bounded chunks), and every tensor storage the pickle declares no larger than its record. A
small hostile file therefore cannot make medseg allocate more than about its own size, and a
corrupted weight record is refused instead of loading silently.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError, doing
from medseg.files import atomic_write_with

# A medseg checkpoint holds a few hundred records; far more is not one of ours.
MAX_RECORDS = 100_000
_CHUNK = 1 << 20
# Bytes per element of the storage types torch's pickler names (torch.<Name>Storage).
_ITEM_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
    "Float8_e4m3fnStorage": 1, "Float8_e5m2Storage": 1, "UInt16Storage": 2, "UInt32Storage": 4,
    "UInt64Storage": 8,
}


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically (`medseg.files.atomic_write_with`).

    A crash at any moment leaves either the previous file or the new one, never half of one.
    """
    atomic_write_with(Path(path), lambda stream: torch.save(state, stream))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain data only, never code.

    The file is checked first (`verify`); CheckpointError names the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with doing(f"loading checkpoint {path}"):
        verify(path)
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "unsupported content"
            raise CheckpointError(f"{path}: refused to load: it holds more than weights and data ({reason[:120]})") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a medseg checkpoint")
    return state


def verify(path: Path) -> None:
    """Check `path` as a checkpoint in torch's zip format, reading at most its own size.

    Raises:
        CheckpointError: not such a zip, a record compressed, outside the file, overlapping another
            or failing its CRC, or a tensor storage declared larger than its record.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = _check_directory(path, archive, size)
            for info in records:
                _check_crc(path, archive, info)
            pickles = [i for i in records if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: not a torch checkpoint (no single data.pkl record)")
            prefix = pickles[0].filename[: -len("data.pkl")]
            sizes = {i.filename: i.file_size for i in records}
            for key, storage, numel in _declared_storages(path, archive.read(pickles[0])):
                record = sizes.get(f"{prefix}data/{key}")
                if record is None:
                    raise CheckpointError(f"{path}: tensor storage {key!r} has no record")
                if numel * _ITEM_BYTES[storage] > record:
                    raise CheckpointError(f"{path}: tensor storage {key!r} claims {numel} elements of "
                                          f"{storage}, more than its {record}-byte record holds")
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint (not a valid zip archive: {exc})") from None
    except (OSError, EOFError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({exc.__class__.__name__}: {exc})") from None


def _check_directory(path: Path, archive: zipfile.ZipFile, size: int) -> list[zipfile.ZipInfo]:
    records = archive.infolist()
    if not records or len(records) > MAX_RECORDS:
        raise CheckpointError(f"{path}: not a torch checkpoint ({len(records)} zip records)")
    spans = []
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{path}: record {info.filename!r} is compressed; torch stores records "
                                  f"uncompressed (refused before decompressing it)")
        if info.header_offset < 0 or info.header_offset + info.compress_size > size:
            raise CheckpointError(f"{path}: record {info.filename!r} claims {info.file_size} bytes at "
                                  f"offset {info.header_offset}, beyond the file's {size} bytes")
        spans.append((info.header_offset, info.header_offset + 30 + len(info.filename) + info.compress_size))
    spans.sort()
    if any(end > following for (_, end), (following, _) in zip(spans, spans[1:])):
        raise CheckpointError(f"{path}: zip records overlap (not a file torch wrote)")
    return records


def _check_crc(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    # Reading a record to its end makes zipfile compare its CRC; chunks keep memory bounded.
    try:
        with archive.open(info) as stream:
            while stream.read(_CHUNK):
                pass
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: corrupted checkpoint: record {info.filename!r} fails its "
                              f"check ({exc})") from None


class _Stub:
    """Stands for any global the pickle names: accepts any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Stub":
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageLister(pickle.Unpickler):
    """Walks torch's data.pkl without running anything: every global is a `_Stub`, and every
    persistent id ('storage', type, key, location, numel) is recorded."""

    def __init__(self, stream: Any, path: Path) -> None:
        super().__init__(stream)
        self.path = path
        self.storages: list[tuple[str, str, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return name  # the storage type, as its name
        return _Stub

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent record {str(pid)[:80]!r}")
        _, storage, key, _, numel = pid
        if storage not in _ITEM_BYTES or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.path}: unexpected tensor storage {str(pid)[:80]!r}")
        self.storages.append((key, storage, numel))
        return _Stub()


def _declared_storages(path: Path, payload: bytes) -> list[tuple[str, str, int]]:
    import io

    lister = _StorageLister(io.BytesIO(payload), path)
    try:
        lister.load()
    except CheckpointError:
        raise
    except Exception as exc:  # a malformed pickle: torch.load would refuse it too
        raise CheckpointError(f"{path}: corrupted checkpoint (its data.pkl does not parse: "
                              f"{exc.__class__.__name__})") from None
    return lister.storages


# Files `medseg train` writes into a run folder from its start on (train.log first, config.yaml once
# the data is planned); last.pt follows at the first save.
RUN_FILES = ("last.pt", "config.yaml", "train.log")


def load_for_resume(run_dir: Path) -> dict[str, Any]:
    """The checkpoint `medseg train --resume RUN_DIR` continues from, with messages that say what
    to do when the folder is not a run or holds no checkpoint yet."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder (--resume takes a folder medseg train created)")
    if not (run_dir / "last.pt").is_file():
        if not any((run_dir / name).is_file() for name in RUN_FILES):
            # Not one of medseg's runs (a dataset folder, say): never advise removing it.
            raise CheckpointError(f"{run_dir}: not a run folder (it holds no {', '.join(RUN_FILES)}); "
                                  "--resume takes a folder medseg train created")
        raise CheckpointError(no_checkpoint_yet(run_dir))
    return load(run_dir / "last.pt")


def no_checkpoint_yet(run_dir: Path) -> str:
    """The message for a run folder without last.pt: the run ended before its first save."""
    config = run_dir / "config.yaml"
    again = (f"start it again from its config with: medseg train {config} --set run_name=<new name>"
             if config.is_file() else "run the same command with another run_name")
    return (f"{run_dir}: holds no checkpoint (the run ended before its first epoch was saved); "
            f"nothing to resume: remove the folder and run the same command again, or {again}")


def existing_run(run_dir: Path) -> str:
    """The message for a new run whose folder exists: resume it, or say it has nothing to resume."""
    if (run_dir / "last.pt").is_file():
        return f"{run_dir}: run directory exists; use --resume {run_dir} or another run_name"
    return no_checkpoint_yet(run_dir)
