"""`--reload`: a watcher process that asks the master for a rolling reload when code changes.

The master is one thread and never imports the app, so it does not watch files itself:
it forks a watcher (like a worker: signals reset, none of the master's fds, dead with the
master). The watcher runs watchfiles (the library uvicorn's --reload uses; inotify, with
Rust threads of its own, all in the watcher) over --app-dir and sends the master SIGHUP,
which is the same rolling reload as `kill -HUP` or `systemctl reload`: each slot's new
worker is ready before the old one drains, so the server keeps answering while you edit.

A changed `.py` file is compiled first (not run): a syntax error is said once, with the
file and line, and no reload is asked for, so the old workers serve on; the next save that
fixes it reloads. Any other failure of the new code (an import error, a hook that raises)
is the master's failed reload: said once, the old workers kept.

The master reaps the watcher like its workers; one that dies is started again a second
later, and on shutdown it is stopped (SIGTERM, then SIGKILL and a reap at the exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import NoReturn

from hello_cluster.config import Config
from hello_cluster.worker import process as worker

log = logging.getLogger("hello_cluster.master")

RESTART_DELAY = 1.0  # a watcher that died is started again this long after
# Never watched, whatever --reload-include says: caches, VCS metadata, virtualenvs.
IGNORED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".nox", ".venv",
                          "venv", "node_modules", ".mypy_cache", ".pytest_cache",
                          ".ruff_cache", ".hypothesis", "site-packages"})


def wanted(path: str, root: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether a change to `path` asks for a reload: under `root`, not in an ignored
    directory, neither it nor a parent directory excluded, and its name included.

    Patterns match from the right, as pathlib's `PurePath.match` does: `*.py` is any .py
    file at any depth, `tests` the tests directories, `templates/*.html` the files directly
    in a templates directory.
    """
    try:
        rel = PurePath(os.path.relpath(path, root))
    except ValueError:
        return False
    if not rel.parts or rel.parts[0] == ".." or IGNORED_DIRS.intersection(rel.parts[:-1]):
        return False
    prefixes = [PurePath(*rel.parts[:i]) for i in range(1, len(rel.parts) + 1)]
    if any(p.match(glob) for glob in exclude for p in prefixes):
        return False
    return any(rel.match(glob) for glob in include)


def syntax_error(path: str, root: str) -> str | None:
    """A .py file that does not compile: `file:line: what`; None if it compiles (or is
    gone, or is not Python: the import in the new worker judges that)."""
    if not path.endswith(".py"):
        return None
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError:
        return None
    try:
        compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as err:
        return f"{os.path.relpath(path, root)}:{err.lineno}: {err.msg}"
    except ValueError as err:  # a NUL byte in the source
        return f"{os.path.relpath(path, root)}: {err}"
    return None


@dataclass
class Broken:
    """The changed files that do not compile, and the last line said about them."""

    files: dict[str, str] = field(default_factory=dict)
    said: str = ""

    def update(self, paths: Iterable[str], root: str) -> str | None:
        """Re-check the changed files; the line to say, if it is news."""
        for path in paths:
            error = syntax_error(path, root)
            if error is None:
                self.files.pop(path, None)
            else:
                self.files[path] = error
        line = "; ".join(self.files[p] for p in sorted(self.files))
        news = line if line and line != self.said else None
        self.said = line
        return news


@dataclass
class Watcher:
    """The master's handle on the watcher process."""

    cfg: Config
    master_pid: int
    pid: int | None = None
    due: float = 0.0  # when to start it (again)
    stopping: bool = False

    def tend(self, now: float, stopping: bool, close_fds: Callable[[], Sequence[int]],
             signals: Iterable[int]) -> None:
        """Each turn of the master: stopped with the master, else kept running."""
        if stopping:
            self.stop()
        self.keep_running(now, close_fds, signals)

    def keep_running(self, now: float, close_fds: Callable[[], Sequence[int]],
                     signals: Iterable[int]) -> None:
        """Start the watcher when there is none and it is due; `signals` are the master's,
        blocked across the fork so none reaches the master's wakeup pipe from the child."""
        if self.pid is not None or self.stopping or now < self.due:
            return
        fds = close_fds()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            pid = os.fork()
            if pid == 0:
                _run_watcher(self.cfg, self.master_pid, blocked, fds)
        except OSError as err:
            log.warning("--reload: cannot fork the watcher (%s); trying again in %gs",
                        err.strerror, RESTART_DELAY)
            self.due = now + RESTART_DELAY
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.pid = pid
        log.debug("--reload: watcher pid %d started", pid)

    def reaped(self, pid: int, status: int, now: float) -> bool:
        """True if `pid` was the watcher (now forgotten, and due again unless stopping)."""
        if pid != self.pid:
            return False
        self.pid = None
        if not self.stopping:
            how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
                   if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}")
            log.warning("--reload: watcher pid %d ended (%s); a new one starts in %gs",
                        pid, how, RESTART_DELAY)
            self.due = now + RESTART_DELAY
        return True

    def stop(self) -> None:
        """The master is stopping: no more reloads, the watcher ends (reaped as usual)."""
        if not self.stopping and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        self.stopping = True

    def close(self) -> None:
        """At the master's exit: a watcher not yet reaped is killed and reaped now."""
        self.stopping = True
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.pid = None


# ---- the watcher process ---------------------------------------------------------------

def _run_watcher(cfg: Config, master_pid: int, unblock: Iterable[int],
                 close_fds: Sequence[int]) -> NoReturn:
    code = 1
    try:
        worker.become_child(master_pid, unblock, close_fds, "reloader",
                            title="reload watcher")
        code = watch(cfg, master_pid)
    except BaseException:
        log.exception("--reload: the watcher crashed")
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def watch(cfg: Config, master_pid: int) -> int:
    """Watch --app-dir until the master is gone; SIGHUP it for each batch of changes."""
    import watchfiles

    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # its "1 change detected"

    root = cfg.app_dir or os.getcwd()
    include, exclude = cfg.reload_include, cfg.reload_exclude
    broken = Broken()
    said = False
    # The watch is in place once watchfiles yields the first time (its notifier is set up
    # before its first wait): a timeout every 0.2 s yields an empty set, so "watching" is
    # said when it is true, and a file saved after that line is never missed.
    for changes in watchfiles.watch(
            root, watch_filter=lambda _, path: wanted(path, root, include, exclude),
            raise_interrupt=False, yield_on_timeout=True, rust_timeout=200):
        if not said:
            said = True
            log.info("--reload: watching %s for changes to %s%s (development only)", root,
                     ", ".join(include), f", not {', '.join(exclude)}" if exclude else "")
        if not changes:
            continue
        paths = sorted({path for _, path in changes})
        news = broken.update(paths, root)
        if broken.files:
            if news is not None:
                log.error("--reload: %s; not reloading, the workers serve the code they "
                          "have (save a fix to reload)", news)
            continue
        names = [os.path.relpath(p, root) for p in paths]
        log.info("--reload: %s changed; reloading", ", ".join(names[:3])
                 + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
        if os.getppid() != master_pid:
            return 0
        os.kill(master_pid, signal.SIGHUP)  # a burst of HUPs is one reload
    return 0
