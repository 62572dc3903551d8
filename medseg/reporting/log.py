"""train.log: everything a training run prints, as plain text in its run directory."""

from __future__ import annotations

import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.control import Control

from medseg.files import append_text

LOG_NAME = "train.log"
LOG_WIDTH = 120  # wide enough for the validation tables; the log has no terminal to ask


class _LogFile:
    """A text stream for a rich Console that appends each flushed print to the log file (through
    medseg.files.append_text, which refuses a symlink in the log's place). Until `attach` names the
    file (the run directory is created only once the data has been checked), it keeps the text."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        if self.path is not None and self._pending:
            text, self._pending = "".join(self._pending), []
            append_text(self.path, text)

    def isatty(self) -> bool:
        return False

    def take_pending(self) -> str:
        """The text kept so far (and forget it)."""
        text, self._pending = "".join(self._pending), []
        return text


class _TeeConsole(Console):
    """A Console that prints to the terminal and the same renderables, without styles, to a log."""

    def __init__(self, log: Console, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_console = log

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 (rich's name)
        super().print(*objects, **kwargs)
        # A live display (a progress bar) refreshes by printing empty Control renderables: those
        # belong to the terminal only; the log gets the lines said about the run.
        if not all(isinstance(item, Control) for item in objects):
            self.log_console.print(*objects, **kwargs)


class TrainLog:
    """The console of a training run, teed into `<run>/train.log` (plain text, appended on resume).

    `console` prints to the terminal of the `terminal` console given and to the log. Lines printed
    before `attach(run_dir)` are kept and written once the run directory exists. With
    `enabled=False` (a process other than the main one) nothing is printed or written.
    """

    def __init__(self, terminal: Console, enabled: bool = True) -> None:
        self._file = _LogFile()
        self._log = Console(file=self._file, color_system=None, force_terminal=False, force_jupyter=False,
                            width=LOG_WIDTH, soft_wrap=True, highlight=False, emoji=False,
                            quiet=not enabled)
        self.console: Console = _TeeConsole(
            self._log, file=terminal.file, quiet=terminal.quiet or not enabled, color_system=terminal.color_system,
            force_terminal=terminal.is_terminal, width=None if terminal.is_terminal else terminal.width,
            highlight=False)
        self.path: Path | None = None

    def attach(self, run_dir: Path) -> Path:
        """Write to `run_dir/train.log` from now on (and what was printed before); returns its path."""
        if self._log.quiet:
            return Path(run_dir) / LOG_NAME
        self.path = self._file.path = Path(run_dir) / LOG_NAME
        self.write(f"--- medseg train, {datetime.now():%Y-%m-%d %H:%M:%S}\n" + self._file.take_pending())
        return self.path

    def write(self, text: str) -> None:
        """Append `text` to the log alone (not the terminal)."""
        if self.path is not None:
            append_text(self.path, text)

    def write_traceback(self, error: BaseException) -> None:
        """Append `error`'s traceback to the log (for errors the console shows in one line)."""
        self.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
