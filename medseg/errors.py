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
