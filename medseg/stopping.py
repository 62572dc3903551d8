"""Stop requests: SIGINT and SIGTERM ask training to stop after the current step."""

from __future__ import annotations

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

    def __call__(self) -> bool:
        return self.reason is not None

    def __enter__(self) -> "StopRequests":
        # Signal handlers can only be installed from the main thread; elsewhere (a worker thread
        # running training) the process's own handling stays.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        if self.reason is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(number).name
