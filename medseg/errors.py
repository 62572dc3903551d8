"""Errors users can cause. The CLI prints them as one line and exits with code 2."""


class MedsegError(Exception):
    """Base class: a problem with the user's input, printed without a traceback."""


class ConfigError(MedsegError):
    """A config file or override is malformed, unknown or of the wrong type."""


class DataError(MedsegError):
    """A dataset, image or label file is missing, unreadable or inconsistent."""


class CheckpointError(MedsegError):
    """A checkpoint is missing, corrupted, unsafe or does not match the data."""


class TrainingInterrupted(MedsegError):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved; the message says how to resume."""


class StopSignal(BaseException):
    """SIGINT/SIGTERM ended a command at once, raised from the signal handler wherever the program
    was (an import, a reader, a library's loop): a BaseException, so that no `except Exception` on
    the way (MONAI's optional imports have one) swallows the stop. The message says what was kept.
    The CLI prints it like TrainingInterrupted, exit code 130."""


def _chain(error: BaseException) -> list[BaseException]:
    """`error`, then the exception it was raised from or during, and so on."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: MONAI wraps a reader's error in "applying transform ..."."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return error


class doing:
    """Context manager naming what medseg is doing, for the one-line message of an unexpected error.

    `with doing("reading case X (path)"):` adds that text as a note to any exception other than a
    MedsegError that leaves the block (notes survive pickling, so a worker process's error keeps
    them). The innermost note is the most precise one; `describe` shows it.
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> "doing":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, Exception) and not isinstance(error, MedsegError):
            notes = getattr(error, "__notes__", None)
            if notes is None:
                error.__notes__ = notes = []
            notes.append(f"medseg: while {self.what}")
        return False


# The note `medseg.files.RunLock` adds when it appended an error's traceback to the run's log.
LOGGED_NOTE = "medseg: traceback appended to "

# Exceptions raised by bad, hostile or too large input rather than by a bug in medseg: the CLI
# reports them with exit code 2 (the user can act on them); anything else is an internal error
# (exit code 1).
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, IndexError, EOFError, MemoryError, RecursionError, OverflowError,
)


def is_input_error(error: BaseException) -> bool:
    """True for an exception that bad input causes (see INPUT_ERRORS), judged on the whole chain."""
    import pickle
    import struct
    import zipfile
    import zlib

    kinds = INPUT_ERRORS + (pickle.UnpicklingError, struct.error, zlib.error, zipfile.BadZipFile)
    return isinstance(error, kinds) or isinstance(_innermost(error), kinds)


def _innermost(error: BaseException) -> BaseException:
    # A worker process's error arrives raised from a RemoteTraceback (multiprocessing's; the
    # _RemoteTraceback of concurrent.futures) holding the worker's traceback as text: the error
    # itself is the one to name.
    chain = [e for e in _chain(error) if type(e).__name__.lstrip("_") != "RemoteTraceback"]
    return chain[-1] if chain else error


def describe(error: BaseException) -> str:
    """One line for an unexpected exception: what medseg was doing, on which file, the error itself.

    "while reading case X (path): UnicodeDecodeError: 'utf-8' codec can't decode byte ...".
    """
    where = None
    for link in reversed(_chain(error)):  # the innermost block that named itself is the most precise
        notes = [n for n in getattr(link, "__notes__", ()) if n.startswith("medseg: while ")]
        if notes:
            where = notes[0][len("medseg: "):]
            break
    cause = _innermost(error)
    text = " ".join(str(cause).split()) or "(no message)"
    filename = getattr(cause, "filename", None)
    if filename is not None and str(filename) not in text:
        text = f"{filename}: {text}"
    if len(text) > 300:
        text = text[:297] + "..."
    line = f"{type(cause).__name__}: {text}"
    logged = [n[len(LOGGED_NOTE):] for n in getattr(error, "__notes__", ()) if n.startswith(LOGGED_NOTE)]
    if logged:
        line += f" (traceback in {logged[0]})"
    return f"{where}: {line}" if where else line
