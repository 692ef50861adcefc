"""A worker's Python stacks, taken from outside it: faulthandler on a signal, into a file.

A Python signal handler runs only between two bytecodes of the main thread, so it never
runs while that thread sits in a C call (`time.sleep`, a blocking read, a lock): exactly
when a stack is wanted. faulthandler's handler is C: it writes every thread's frames to a
file descriptor from inside the signal handler, whatever the thread is doing, and costs
nothing until the signal comes. Each worker registers it on STACK_SIGNAL for its own file
in the instance's stacks directory (`stacks-<master pid>` under the runtime dir, mode
0700, files 0600: stacks show code, so only the service's user and root read them).

The file is opened O_APPEND, so any number of readers (the master at a hang kill,
`hello-cluster dump`) each note its size, send the signal and read what was appended.
The signal goes to the worker's main thread (tgkill), so faulthandler's "Current thread"
is the event loop's. A dump is complete once bytes were appended and the signal is neither
pending nor blocked for that thread (the kernel blocks it while the handler runs), read
from /proc: no marker, no guessing from timing.

TASKS_SIGNAL asks the worker's event loop for its pending asyncio tasks (worker/taskdump.py):
a loop handler, so it answers only when the loop turns.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

STACK_SIGNAL = signal.SIGUSR2
TASKS_SIGNAL = signal.SIGUSR1
DIR_PREFIX = "stacks-"
_NAME = re.compile(r"^slot(\d+)-pid(\d+)\.(stacks|tasks)$")
_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-fA-F]+) \(most recent call first\):$")
_FRAME = re.compile(r'^  File "(.*)", line (\d+|\?\?\?) in (.*)$')
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f'File "{self.file}", line {self.line}, in {self.function}'

    def short(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


@dataclass(frozen=True)
class ThreadStack:
    """One thread: its id as faulthandler prints it, and its frames, innermost last."""

    ident: str
    current: bool  # the thread that took the signal: the worker's main thread, its loop
    frames: tuple[Frame, ...]

    def label(self) -> str:
        return f"thread {self.ident}" + (" (main thread, the event loop)" if self.current
                                         else "")


# ---- where the files are ------------------------------------------------------------------


def stacks_dir(runtime_dir: str, master_pid: int) -> str:
    return os.path.join(runtime_dir, f"{DIR_PREFIX}{master_pid}")


def file_path(directory: str, slot: int, pid: int, kind: str) -> str:
    """`kind` is "stacks" (faulthandler's) or "tasks" (the loop's); slot is 0-based."""
    return os.path.join(directory, f"slot{slot + 1}-pid{pid}.{kind}")


def parse_name(name: str) -> tuple[int, int, str] | None:
    """(slot, pid, kind) of a file name from file_path (slot 0-based), else None."""
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)) - 1, int(match.group(2)), match.group(3)


def open_append(path: str) -> int:
    """The worker's end: created 0600, appended to by every dump."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def remove_files(directory: str, slot: int, pid: int) -> None:
    for kind in ("stacks", "tasks"):
        try:
            os.unlink(file_path(directory, slot, pid, kind))
        except OSError:
            pass


# ---- asking and reading -------------------------------------------------------------------


def signal_main_thread(pid: int, sig: int) -> None:
    """Send `sig` to the main thread of `pid` (its thread id is the pid): tgkill(2)."""
    if _LIBC.tgkill(pid, pid, int(sig)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mask(status: str, field: str) -> int:
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


def signal_settled(pid: int, sig: int) -> bool:
    """Neither pending nor blocked in `pid`'s main thread: a handler that ran is done."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return True  # gone: nothing more will come
    bit = 1 << (int(sig) - 1)
    return not any(_mask(status, name) & bit for name in ("SigPnd", "ShdPnd", "SigBlk"))


@dataclass
class StackRequest:
    """One dump asked of one worker: where its output starts, and until when to wait."""

    path: str
    pid: int
    offset: int
    deadline: float

    @classmethod
    def send(cls, path: str, pid: int, wait: float) -> StackRequest | None:
        """Signal the worker; None if it has no stacks file (not registered yet) or is gone.
        PermissionError passes: the caller says who may ask."""
        try:
            offset = os.stat(path).st_size
        except OSError:
            return None
        try:
            signal_main_thread(pid, STACK_SIGNAL)
        except ProcessLookupError:
            return None
        except OSError as err:
            if err.errno == 3:  # ESRCH
                return None
            raise
        return cls(path, pid, offset, time.monotonic() + wait)

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return self.offset

    def done(self) -> bool:
        return self.size() > self.offset and signal_settled(self.pid, STACK_SIGNAL)

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def read(self) -> list[ThreadStack]:
        return parse_faulthandler(read_from(self.path, self.offset))


def read_from(path: str, offset: int, limit: int = 4 * 1024 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def wait_all(requests: Sequence[StackRequest], poll: float = 0.005) -> None:
    """Block until every request is done or past its deadline (the dump command's wait)."""
    while True:
        now = time.monotonic()
        if all(r.done() or r.expired(now) for r in requests):
            return
        time.sleep(poll)


# ---- faulthandler's text ------------------------------------------------------------------


def parse_faulthandler(text: str) -> list[ThreadStack]:
    """Threads from faulthandler's output, frames innermost last; each thread once (two
    dumps appended back to back keep the first)."""
    threads: list[ThreadStack] = []
    seen: set[str] = set()
    ident, current = "", False
    frames: list[Frame] = []

    def close() -> None:
        if ident and ident not in seen:
            seen.add(ident)
            threads.append(ThreadStack(ident, current, after_fork(tuple(reversed(frames)))))

    for line in text.splitlines():
        head = _THREAD.match(line)
        if head is not None:
            close()
            ident, current, frames = head.group(2), head.group(1) == "Current thread", []
            continue
        frame = _FRAME.match(line)
        if frame is not None and ident:
            number = frame.group(2)
            frames.append(Frame(frame.group(1), int(number) if number.isdigit() else 0,
                                frame.group(3)))
    close()
    threads.sort(key=lambda t: not t.current)  # the event loop's thread first
    return threads


_SUPERVISOR = f"{os.sep}hello_cluster{os.sep}supervisor{os.sep}"


def after_fork(frames: tuple[Frame, ...]) -> tuple[Frame, ...]:
    """A forked worker's main thread still carries the frames of the master (or template)
    that called fork(): they say nothing about the worker. Keep what is below them."""
    for i in range(len(frames) - 1, -1, -1):
        if _SUPERVISOR in frames[i].file:
            return frames[i + 1:]
    return frames


def render(threads: Iterable[ThreadStack], indent: str = "  ") -> str:
    """Text like a traceback: per thread, innermost call last."""
    lines = []
    for t in threads:
        lines.append(f"{indent}{t.label()}:")
        lines.extend(f"{indent}  {f}" for f in t.frames)
        if not t.frames:
            lines.append(f"{indent}  (no Python frame)")
    return "\n".join(lines)


def to_json(threads: Iterable[ThreadStack]) -> list[dict[str, Any]]:
    return [{"thread": t.ident, "event_loop": t.current,
             "frames": [frame_json(f) for f in t.frames]} for t in threads]


def frame_json(f: Frame) -> dict[str, Any]:
    return {"file": f.file, "line": f.line, "function": f.function}


# ---- frames inside this process ----------------------------------------------------------


def frames_of(frame: FrameType | None, limit: int = 200) -> tuple[Frame, ...]:
    """A live thread's frames, innermost last."""
    out: list[Frame] = []
    while frame is not None and len(out) < limit:
        out.append(Frame(frame.f_code.co_filename, frame.f_lineno or 0, frame.f_code.co_name))
        frame = frame.f_back
    return tuple(reversed(out))


def coroutine_frames(coro: Any, limit: int = 200) -> tuple[Frame, ...]:
    """Where a suspended coroutine waits: its chain of awaits, outermost first. A task's
    own stack (Task.get_stack) stops at its outermost coroutine. A generator that hands on
    a coroutine without `yield from` names it `delegated` (running.py's `resumed` before
    its first resume): the chain goes on through it."""
    out: list[Frame] = []
    while coro is not None and len(out) < limit:
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is not None:
            out.append(Frame(frame.f_code.co_filename, frame.f_lineno or 0,
                             frame.f_code.co_name))
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None)
                or (frame.f_locals.get("delegated") if frame is not None
                    and hasattr(coro, "gi_frame") else None))
    return tuple(out)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # hello_cluster
    return tuple(os.path.join(d, "") for d in sorted(dirs) if d)


_LIBRARIES = _library_dirs()


def is_app_file(path: str) -> bool:
    """The app's own code: not the standard library, not site-packages, not ours."""
    if path.startswith("<"):  # <frozen ...>, <string>
        return False
    if "/site-packages/" in path or "/dist-packages/" in path:
        return False
    return not path.startswith(_LIBRARIES)


def innermost_app(frames: Sequence[Frame]) -> Frame | None:
    """The innermost frame of the app's own code, else the innermost frame at all."""
    for f in reversed(frames):
        if is_app_file(f.file):
            return f
    return frames[-1] if frames else None
