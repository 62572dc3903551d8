"""Stop requests: SIGINT and SIGTERM ask training to stop at the next safe point and save.

The handler only records the request and says so (it never writes a file): a signal that arrives
while a checkpoint is written lets the write finish. A request that interrupts an import is taken
when the signal comes again after it (`_deliver_later`): saying so prints, and printing may import
the very module that is half-imported then. Where training is at decides what "at once"
means, and the acknowledgement says it:

- setting up (reading and caching the data, before the first step): nothing is saved yet, the
  run ends at once (`StopSignal` raised from the handler);
- training: the current step finishes, then the run saves a checkpoint and ends;
- validating: validation is abandoned before its next case; the epoch's training is saved;
- saving: the checkpoint being written is finished, then the run ends.

A second signal ends the run at once (`StoppedAtOnce`, raised from the handler), whatever it is
doing; the files written so far stay complete because every write is atomic.

"At once" is a `StopSignal` raised from the handler in the main thread, wherever the program is,
with two guards (`_Ending`), because an exception raised at a random point can be lost: a stop
that interrupts an import (torch imports much of itself lazily, the optimiser its compiler with
sympy) waits for the import to finish (raised inside it, the library's own error handling could
catch it, or leave a module half-imported: numpy without its types); and the stop is raised again
every 50 ms until the block that installed the handler has ended, so that one swallowed (by a
library's `except BaseException`, or as an "ignored" exception in a fork hook or a finaliser)
still ends the command (where Python ignores it, nothing is printed: `_hide_ignored_stops`).

`stopping_at_once` is the handling of every other command, and of train's start: the command ends
at once. Processes forked while either handler is installed ignore SIGINT and end at once on
SIGTERM (`_as_a_child`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from medseg.errors import StopSignal

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# What each stage's acknowledgement says; {signal} is the signal's name.
_ACKNOWLEDGEMENTS = {
    "setup": "{signal}: stopping (nothing to save yet)",
    "training": "{signal}: stopping after this step... (again to stop at once)",
    "validation": "{signal}: stopping: validation interrupted, saving the epoch's training... (again to stop at once)",
    "saving": "{signal}: stopping once this checkpoint is written... (again to stop at once)",
}


class StoppedAtOnce(StopSignal):
    """A second SIGINT or SIGTERM: the run ended without saving; earlier checkpoints are complete."""


class StopRequests:
    """While active (a context manager), SIGINT and SIGTERM ask training to stop. Calling the
    object tells whether a stop was asked for; `reason` names the signal. `notify(text)` prints the
    acknowledgement (stderr by default); `stage` (set with `during`) is where training is;
    `run_dir`, once set, is named in the message of a second signal.

    Processes forked meanwhile inherit the handler; there SIGINT is ignored (a terminal's Ctrl-C
    reaches the whole process group; the training process shuts its children down) and SIGTERM
    ends the process at once (`_as_a_child`). DataLoader workers ignore both (`ignore_in_worker`).
    """

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.reason: str | None = None
        self.stage = "setup"
        self.run_dir: Path | None = None
        self.notify = notify or _to_stderr
        self._previous: dict[int, Any] = {}
        self._owner = os.getpid()
        self._ending = _Ending()

    def __call__(self) -> bool:
        return self.reason is not None

    def __enter__(self) -> "StopRequests":
        # Signal handlers can only be installed from the main thread; elsewhere (a worker thread
        # running training) the process's own handling stays.
        self._owner = os.getpid()
        self._ending = _Ending()
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._ending.ended()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def during(self, stage: str) -> Iterator["StopRequests"]:
        """Within the block training is at `stage` ("training", "validation", "saving"); a request
        made before it (in the setup) is honoured as the block starts."""
        assert stage in _ACKNOWLEDGEMENTS, stage
        previous, self.stage = self.stage, stage
        try:
            yield self
        finally:
            self.stage = previous

    def _handle(self, number: int, frame: Any) -> None:
        if os.getpid() != self._owner:
            _as_a_child(number)
            return
        name = signal.Signals(number).name
        if self.reason is None and self._ending.error is None and _in_an_import(frame):
            # The acknowledgement prints, and printing may import (rich its emoji codes, on first
            # use): inside the import this signal interrupted, that module would be half-imported.
            # The request is taken when the signal comes again, after the import.
            _deliver_later(number)
            return
        if self._ending.error is None:  # else: delivered again until the stop has ended the run
            if self.reason is not None:
                self._ending.error = StoppedAtOnce(f"stopped at once by a second {name}; {self._left()}")
            else:
                self.reason = name
                self.notify(_ACKNOWLEDGEMENTS[self.stage].format(signal=name))
                if self.stage != "setup":
                    return
                self._ending.error = StopSignal(f"stopped by {name} before training started; nothing was saved")
        self._ending.raise_from_handler(number, frame)

    def _left(self) -> str:
        if self.run_dir is not None and (self.run_dir / "last.pt").is_file():
            return f"the last complete checkpoint is kept; continue with: {resume_command(self.run_dir)}"
        return "no checkpoint was written yet"


def ignore_in_worker(*_: Any) -> None:
    """A DataLoader worker's `worker_init_fn`: SIGINT and SIGTERM (sent to the whole process group
    by a terminal or a scheduler) are ignored; the training process stops and shuts the workers
    down. Workers are started with both blocked (`signals_blocked`), so none arrives before this."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back in the block (children forked in it start with them blocked);
    one that arrived meanwhile is delivered as the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def stopping_at_once(moment: str) -> Iterator[None]:
    """In the block (in the main thread), SIGINT and SIGTERM end the command at once with
    `StopSignal` ("stopped by SIGTERM {moment}"; exit code 130): for every command, and for the
    start of `medseg train` before `StopRequests` takes over. Not KeyboardInterrupt: one raised
    inside the code torch runs while it is imported makes Python end with SIGINT even after it was
    caught. The previous handling is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ending = _Ending()
    handler = functools.partial(_end_at_once, os.getpid(), moment, ending)
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        ending.ended()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_at_once(owner: int, moment: str, ending: "_Ending", number: int, frame: Any) -> None:
    if os.getpid() != owner:  # a process forked meanwhile
        _as_a_child(number)
        return
    if ending.error is None:
        ending.error = StopSignal(f"stopped by {signal.Signals(number).name} {moment}")
    ending.raise_from_handler(number, frame)


class _Ending:
    """The stop a handler has decided on (`error`), raised from the handler where it cannot be
    lost (see the module's docstring) and again until `ended()` (the handler's block is over)."""

    def __init__(self) -> None:
        self.error: StopSignal | None = None
        self._again: threading.Timer | None = None
        self._over = False
        self._unraisable_hook: Callable[[Any], None] | None = None

    def raise_from_handler(self, number: int, frame: Any) -> None:
        """Raise `error` now, unless the handler interrupted an import or a stop already on its
        way out (its `finally` blocks, which must run): either way it is delivered again soon."""
        assert self.error is not None
        self._deliver_again(number)
        if _in_an_import(frame) or isinstance(sys.exc_info()[1], StopSignal):
            return
        self._hide_ignored_stops()
        raise self.error

    def ended(self) -> None:
        self._over = True
        if self._again is not None:
            self._again.cancel()
        if self._unraisable_hook is not None:
            sys.unraisablehook, self._unraisable_hook = self._unraisable_hook, None

    def _hide_ignored_stops(self) -> None:
        # Raised again where Python ignores exceptions (in a generator it finalises as the stop
        # unwinds its caller, in a finaliser), the stop would be printed with its traceback as
        # "Exception ignored in ..."; it is delivered again anyway. Other exceptions print as before.
        if self._unraisable_hook is None:
            previous = self._unraisable_hook = sys.unraisablehook

            def hook(unraisable: Any) -> None:
                if not isinstance(unraisable.exc_value, StopSignal):
                    previous(unraisable)

            sys.unraisablehook = hook

    def _deliver_again(self, number: int) -> None:
        self._again = _deliver_later(number, lambda: not self._over)


def _deliver_later(number: int, wanted: Callable[[], bool] = lambda: True) -> threading.Timer:
    """Signal `number` delivered again to the main thread in _AGAIN_AFTER seconds if `wanted()`
    then: there it waits while that thread holds the signals back (`signals_blocked`); another
    thread would run the handler at once."""
    main = threading.main_thread().ident
    assert main is not None

    def deliver() -> None:
        if wanted():
            signal.pthread_kill(main, number)

    timer = threading.Timer(_AGAIN_AFTER, deliver)
    timer.daemon = True
    timer.start()
    return timer


def _in_an_import(frame: Any) -> bool:
    """Whether the signal handler interrupted an import: a frame of Python's import machinery is
    on the stack."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# Seconds after which a stop not yet raised, or not yet done, is delivered again.
_AGAIN_AFTER = 0.05


def _as_a_child(number: int) -> None:
    """A process forked with medseg's handler installed (a helper the training process shuts
    down): Ctrl-C, which a terminal sends to the whole process group, is ignored; SIGTERM ends it
    at once, quietly, as if no handler had been installed. Never an exception: raised inside the
    child's own start-up or a queue's lock it would leave its pool waiting forever."""
    if number == signal.SIGINT:
        return
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`, from any folder."""
    return f"medseg train --resume {shlex.quote(os.path.abspath(run_dir))}"


def _to_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
