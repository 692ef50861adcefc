"""A worker's answers to `hello-cluster dump` and to the master's hang kill.

Two files per worker in the instance's stacks directory (system/stackdump.py):

- `.stacks`: faulthandler writes every thread's stack there on STACK_SIGNAL, from C, so
  the answer comes even while the event loop is stuck in a C call. Registered right after
  the privilege drop, before the app is imported: a worker stuck importing answers too.
- `.tasks`: on TASKS_SIGNAL the event loop appends one JSON line: its pending asyncio
  tasks with the coroutine each one awaits in, and the names of the threads. Only the loop
  can list its tasks, so a blocked loop does not answer; the dump says so.

Neither costs anything until asked: faulthandler's handler is a sigaction, the loop's a
signal handler that runs only when the signal comes.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import os
import signal
import threading
import time
from typing import Any

from hello_cluster.system import stackdump

log = logging.getLogger("hello_cluster.worker")


def _ignore(signum: int, frame: Any) -> None:
    """Until the loop's handler is in place, a tasks request must not kill the worker."""


class Dumps:
    """The worker's two dump files, opened once; None of it when there is no directory."""

    def __init__(self, directory: str, slot: int) -> None:
        self.directory = directory
        self.slot = slot
        pid = os.getpid()
        path = stackdump.file_path(directory, slot, pid, "stacks")
        # Named only once the handler is in place: whoever finds the file may signal us,
        # and before the handler the signal's default action would end the worker.
        self.stacks_fd = stackdump.open_append(path + ".new")
        self.tasks_path = stackdump.file_path(directory, slot, pid, "tasks")
        self.tasks_fd: int | None = None
        signal.signal(stackdump.TASKS_SIGNAL, _ignore)
        faulthandler.register(stackdump.STACK_SIGNAL, file=self.stacks_fd, all_threads=True,
                              chain=False)
        os.rename(path + ".new", path)

    @classmethod
    def start(cls, directory: str | None, slot: int) -> Dumps | None:
        if directory is None:
            return None
        try:
            return cls(directory, slot)
        except OSError as err:  # never a reason not to serve
            log.warning("stack dumps are off for this worker: %s (%s)", directory,
                        err.strerror)
            return None

    def serve_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """From the loop, once it runs: answer TASKS_SIGNAL there."""
        try:
            self.tasks_fd = stackdump.open_append(self.tasks_path)
        except OSError as err:
            log.warning("task dumps are off for this worker: %s", err.strerror)
            return
        loop.add_signal_handler(stackdump.TASKS_SIGNAL, self.write_tasks, loop)

    def write_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.tasks_fd is None:
            return
        try:
            line = json.dumps(tasks_document(loop)) + "\n"
            os.write(self.tasks_fd, line.encode())
        except Exception:  # a dump must never take the worker down
            log.exception("writing the task dump failed")


def tasks_document(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """The loop's pending tasks (each with its coroutine's chain of awaits, outermost
    first) and the process's thread names; `stamp` tells a late answer from a new one."""
    tasks = []
    current = asyncio.current_task(loop)
    for task in asyncio.all_tasks(loop):
        if task is current:
            continue
        frames = stackdump.coroutine_frames(task.get_coro())
        tasks.append({"name": task.get_name(), "coroutine": _qualname(task.get_coro()),
                      "frames": [stackdump.frame_json(f) for f in frames]})
    tasks.sort(key=lambda t: str(t["name"]))
    threads = {f"0x{t.ident:016x}": t.name for t in threading.enumerate() if t.ident}
    return {"stamp": time.monotonic(), "pid": os.getpid(), "tasks": tasks,
            "threads": threads}


def _qualname(coro: Any) -> str:
    return str(getattr(coro, "__qualname__", None) or type(coro).__name__)
