"""The master's children and its clock, behind one small protocol.

The master forks workers, signals them, reaps them and reads the time through a
`ProcessTable`. `Os` is the real one (os.fork, os.kill, os.wait4, time.monotonic);
tests/test_master.py hands the master a fake one, as gunicorn's tests/test_arbiter.py
patches os.fork and os.waitpid, so every decision of the loop (a death, a hang, a reload,
a crash loop) is reached in milliseconds, without a process or a sleep. Everything else
the master touches stays real in those tests: the pipes, the selector, the beat table.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections.abc import Iterable
from typing import Protocol

from hello_cluster.config import Config
from hello_cluster.worker import process as worker

Reaped = tuple[int, int, resource.struct_rusage]  # pid, wait status, its resource usage


class ProcessTable(Protocol):
    def monotonic(self) -> float:
        """The clock every deadline of the master is measured on."""

    def fork_worker(self, cfg: Config, spec: worker.WorkerSpec,
                    unblock: Iterable[int]) -> int:
        """A new worker's pid (the child runs `worker.run`); OSError if it cannot fork."""

    def kill(self, pid: int, sig: int) -> None:
        """Send `sig`; a process already gone is no error (it is reaped next turn)."""

    def reap(self) -> Reaped | None:
        """One child that ended, without waiting; None when none has."""


class Os:
    """The operating system's process table."""

    def monotonic(self) -> float:
        return time.monotonic()

    def fork_worker(self, cfg: Config, spec: worker.WorkerSpec,
                    unblock: Iterable[int]) -> int:
        pid = os.fork()
        if pid == 0:
            worker.run(cfg, spec, unblock=set(unblock))
        return pid

    def kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def reap(self) -> Reaped | None:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        return None if pid == 0 else (pid, status, usage)


def describe_status(status: int) -> str:
    """A wait status as the log lines say it: `exit status 4`, `killed by SIGKILL`."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"
