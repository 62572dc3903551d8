"""Stop requests: SIGINT and SIGTERM ask training to stop after the current step."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class StopRequests:
    """While active (a context manager), SIGINT and SIGTERM ask training to stop after the current
    step (a second SIGINT stops at once). Calling the object tells whether a stop was asked for;
    `reason` names the signal."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._owner = os.getpid()

    def __call__(self) -> bool:
        return self.reason is not None

    def __enter__(self) -> "StopRequests":
        # Signal handlers can only be installed from the main thread; elsewhere (a worker thread
        # running training) the process's own handling stays.
        self._owner = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        if os.getpid() != self._owner:
            # A process forked meanwhile (a DataLoader worker) inherits the handler; there the
            # signal keeps its previous meaning, so that terminating a worker ends it.
            self._pass_on(number, frame)
            return
        if self.reason is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(number).name

    def _pass_on(self, number: int, frame: Any) -> None:
        previous = self._previous.get(number, signal.SIG_DFL)
        if callable(previous):
            previous(number, frame)
            return
        signal.signal(number, previous)
        if previous == signal.SIG_DFL:
            os.kill(os.getpid(), number)
