"""Atomic file writes: every file medseg writes goes through `atomic_write`.

The payload goes to a temporary file created exclusively (a unique name, no symlink followed) in
the target's own folder, is flushed to disk, then renamed over the target: a crash at any moment
leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from medseg.errors import DataError


def atomic_write(target: Path, payload: bytes) -> None:
    """Write `payload` to `target` atomically; DataError naming the file if that fails."""
    atomic_write_with(target, lambda stream: stream.write(payload))


def atomic_write_text(target: Path, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    atomic_write(target, text.encode("utf-8"))


def atomic_write_with(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let `write(stream)` fill a temporary file, then rename it over `target`.

    For writers that stream (torch.save): the file only appears once it is complete.
    """
    target = Path(target)
    directory = target.parent
    if not directory.is_dir():
        raise DataError(f"{target}: directory {directory} does not exist")
    try:
        # mkstemp opens with O_CREAT | O_EXCL under a random name: a planted symlink is never followed.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise DataError(f"{target}: cannot write to {directory} ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, target)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise DataError(f"{target}: cannot write ({exc.strerror or exc})") from exc
        raise
    _fsync_directory(directory)


def _umask() -> int:
    # mkstemp creates files 0600; the renamed file gets the permissions of a plain open().
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
