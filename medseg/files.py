"""Atomic file writes: every file medseg writes goes through `atomic_write` (or `atomic_path`
for writers that need a file name), and the run folder's lock.

The payload goes to a temporary file created exclusively (a unique name, O_CREAT | O_EXCL, so a
symlink planted at any name is never followed) in the target's own folder, is flushed and
fsynced, then renamed over the target (which replaces a symlink there, never writes through it):
a crash at any moment leaves either the previous file or the new one, never half of one. A
failed write removes its temporary file. The temporary names, `.<target name>.<8 random
characters>.tmp[<suffix>]`, are what `remove_stale_temporaries` removes after a kill -9.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
import traceback as traceback_module
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from medseg.errors import LOGGED_NOTE, ConfigError, DataError, MedsegError

# What `tempfile.mkstemp` names its files: the prefix, 8 characters of its alphabet, the suffix.
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]{1,16})?$")
LOCK_NAME = ".lock"


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
    fd, tmp_name = _exclusive_temporary(target, "")
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
            raise DataError(f"{target}: cannot write ({_reason(exc)})") from exc
        raise
    _fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """For writers that take a file name (SimpleITK, nibabel, matplotlib): yields a new, empty,
    exclusively created temporary path in `target`'s folder with `target`'s suffix; when the block
    ends without an error it is fsynced and renamed over `target`, else removed.

        with atomic_path(out / "case.nrrd") as path:
            sitk.WriteImage(image, str(path))
    """
    target = Path(target)
    suffix = "".join(target.suffixes[-2:]) if target.name.lower().endswith(".nii.gz") else target.suffix
    fd, tmp_name = _exclusive_temporary(target, suffix)
    os.close(fd)
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, OSError):
            raise DataError(f"{target}: cannot write ({_reason(exc)})") from exc
        raise
    _fsync_directory(target.parent)


def _exclusive_temporary(target: Path, suffix: str) -> tuple[int, str]:
    directory = target.parent
    if not directory.is_dir():
        raise DataError(f"{target}: directory {directory} does not exist")
    try:
        # mkstemp opens with O_CREAT | O_EXCL under a random name: a planted symlink is never followed.
        return tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=directory)
    except OSError as exc:
        raise DataError(f"{target}: cannot write to {directory} ({_reason(exc)})") from exc


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device; the previous file is kept"
    return exc.strerror or str(exc)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files `atomic_write` left in `folder` when its process was killed
    (kill -9 during a save): only names of its own pattern, only files or symlinks (never followed),
    never recursing. Call it only while holding the folder's `RunLock`. Returns what was removed."""
    removed = []
    for entry in os.scandir(folder):
        if _TEMPORARY.match(entry.name) and (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def append_text(path: Path, text: str) -> None:
    """Append `text` to the log file `path` (created if missing; a symlink there is refused, not followed)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: is a symbolic link; medseg does not write through links (remove it)") from None
        raise DataError(f"{path}: cannot write ({_reason(exc)})") from exc
    try:
        os.write(fd, text.encode("utf-8", errors="replace"))
    finally:
        os.close(fd)


def check_path_component(key: str, value: str) -> None:
    """ConfigError unless `value` is one plain path component (a file or folder name): no `/` or
    `\\`, not `.`, `..`, empty or absolute, no NUL."""
    bad = (not value or value in (".", "..") or any(c in value for c in "/\\\0")
           or os.path.isabs(value) or value != value.strip())
    if bad:
        raise ConfigError(f"'{key}' must be a single folder name (no '/', '\\', '..' or absolute path), "
                          f"got {value!r}")


class RunLock:
    """The lock of a run folder: `fcntl.flock` on `<run>/.lock`, held from `hold(run_dir)` until the
    `with` block ends, so that two processes never train the same run at once.

    Holding it, it removes the stale temporary files a killed save left there. When an unexpected
    error (not a MedsegError, not Ctrl-C) leaves the block, its traceback is appended to
    `<run>/train.log` and the error noted so that the CLI's one line says where it is.
    """

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        return self

    def hold(self, folder: Path) -> None:
        """Take the lock of `folder` (no-op if held); MedsegError if another process holds it."""
        if self._fd is not None:
            return
        lock = Path(folder) / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise MedsegError(f"{lock}: cannot open the run's lock file ({_reason(exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MedsegError(f"{folder}: another medseg process is training this run (it holds {lock}); "
                              f"wait for it to end or stop it first") from None
        self._fd, self.folder = fd, Path(folder)
        remove_stale_temporaries(self.folder)

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if self.folder is not None and isinstance(error, Exception) and not isinstance(error, MedsegError):
                log = self.folder / "train.log"
                with contextlib.suppress(OSError):
                    append_text(log, "".join(traceback_module.format_exception(kind, error, traceback)))
                    error.add_note(f"{LOGGED_NOTE}{log}")
        finally:
            if self._fd is not None:
                os.close(self._fd)  # closing the descriptor releases the flock
                self._fd = None
        return False


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


def cache_key(values: dict) -> str:
    """A short stable name for `values` (plain JSON data): the folder a cache of them lives in."""
    import hashlib
    import json

    text = json.dumps(values, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
