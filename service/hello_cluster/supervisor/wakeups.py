"""Signals as the loop sees them: numbers read from a wakeup pipe, a burst read as one request.

The C-level handler of each signal in HANDLED writes its number into a pipe
(`signal.set_wakeup_fd`); the Python handler does nothing. The selector wakes on the pipe
and the loop acts, not a handler: nothing interesting happens inside a signal handler, and
PID 1 (which has no default actions) still stops on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
from collections.abc import Iterable
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
           signal.SIGTTIN, signal.SIGTTOU)
SCALING = (signal.SIGTTIN, signal.SIGTTOU)


def requests(pending: Iterable[int]) -> list[int]:
    """What a batch of signals asks for, in order: each SIGTTIN or SIGTTOU (one worker more
    or less), any other signal once (a burst of SIGHUP is one reload), SIGCHLD never (the
    loop reaps every turn anyway)."""
    asked: list[int] = []
    for sig in pending:
        if sig == signal.SIGCHLD or (sig in asked and sig not in SCALING):
            continue
        asked.append(sig)
    return asked


class Wakeups:
    """The wakeup pipe, watched by the master's selector."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.pending: list[int] = []
        selector.register(self.read_fd, selectors.EVENT_READ, self.read)

    def install(self) -> None:
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, _noop)

    def uninstall(self) -> None:
        signal.set_wakeup_fd(-1)

    def read(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self.pending.extend(os.read(self.read_fd, 4096))

    def take(self) -> list[int]:
        """The requests read since the last turn (see `requests`)."""
        pending, self.pending = self.pending, []
        return requests(pending)

    def fds(self) -> list[int]:
        return [self.read_fd, self.write_fd]


def _noop(signum: int, frame: Any) -> None:
    """Wake-up only: the signal number already went down the wakeup pipe."""
