"""`--hooks MODULE`: the app's own code at three points of a worker's life.

gunicorn's `post_fork` is where OpenTelemetry's SDK, a Prometheus client or a database pool
is set up per worker: things that must not be created before a fork (threads, sockets,
connections) and that a WSGI app has no lifespan to create in. Here the hooks module is
imported in each worker from `--app-dir`, like the app, and never in the master (under
`--preload` the template imports it, with the app, and each worker calls it after its fork).

Optional functions, each called with a `WorkerInfo`:

- `post_fork(info)`: in the new worker, before the app is imported (under `--preload`, right
  after the fork from the template, the app already imported there);
- `worker_ready(info)`: once the worker accepts connections, just before it tells the master;
- `worker_exit(info)`: after the drain, before the worker exits.

A hook that raises, or a module that cannot be imported, is an app that cannot start: an
`AppLoadError` (worker exit 4), so the master stops the start with exit 4 or abandons the
reload, saying the one line once. `worker_exit` raising is only logged: the worker has
already drained, and its exit says nothing about the next one.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hello_cluster.errors import AppLoadError
from hello_cluster.worker import loader

log = logging.getLogger("hello_cluster.worker")

NAMES = ("post_fork", "worker_ready", "worker_exit")


@dataclass(frozen=True)
class WorkerInfo:
    """What a hook is told about its worker.

    `slot` is 0-based (the logs and /status say `worker slot + 1`): stable across respawns
    and reloads, so `base_port + slot` or a per-slot file name stays the slot's own.
    `generation` counts reloads (0 at start). `preload` says whether the app was imported
    in a --preload template before this worker was forked.
    """

    slot: int
    pid: int
    generation: int
    app: str
    app_dir: str | None
    preload: bool


@dataclass(frozen=True)
class Hooks:
    """The hooks module's functions (None where it defines none)."""

    module: str
    post_fork: Callable[[WorkerInfo], Any] | None = None
    worker_ready: Callable[[WorkerInfo], Any] | None = None
    worker_exit: Callable[[WorkerInfo], Any] | None = None

    def call(self, name: str, info: WorkerInfo) -> None:
        """Run one hook; anything it raises becomes the worker's one-line start error."""
        hook = getattr(self, name)
        if hook is None:
            return
        try:
            hook(info)
        except BaseException as err:  # the app's own code: SystemExit too is a failed start
            log.debug("--hooks %s: %s raised", self.module, name, exc_info=err)
            raise AppLoadError(f"--hooks {self.module}: {name}(info) raised "
                               f"{type(err).__name__}: {err}{loader.where(err)}") from None

    def exit(self, info: WorkerInfo) -> None:
        """worker_exit: after the drain, so a failure is logged, never a failed start."""
        try:
            self.call("worker_exit", info)
        except AppLoadError as err:
            log.error("worker %d pid %d: %s", info.slot + 1, info.pid, err)


def load(module_name: str | None, app_dir: str | None) -> Hooks | None:
    """Import the hooks module (from --app-dir first) and take its hook functions."""
    if module_name is None:
        return None
    loader.use_app_dir(app_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise AppLoadError(f"--hooks {module_name}: no module named {err.name!r}; put "
                               f"{module_name.replace('.', '/')}.py in --app-dir "
                               f"{app_dir or os.getcwd()} or on PYTHONPATH") from None
        raise AppLoadError(f"--hooks {module_name}: importing it failed: "
                           f"{type(err).__name__}: {err}{loader.where(err)}") from None
    except BaseException as err:  # its own code raised while importing
        log.debug("importing --hooks %s raised", module_name, exc_info=err)
        raise AppLoadError(f"--hooks {module_name}: importing it raised "
                           f"{type(err).__name__}: {err}{loader.where(err)}") from None
    found: dict[str, Callable[[WorkerInfo], Any]] = {}
    for name in NAMES:
        hook = getattr(module, name, None)
        if hook is None:
            continue
        if not callable(hook):
            raise AppLoadError(f"--hooks {module_name}: {name} is a {type(hook).__name__}, "
                               "not a function; define def " + name + "(info): ...")
        found[name] = hook
    if not found:
        raise AppLoadError(f"--hooks {module_name}: defines none of {', '.join(NAMES)}"
                           f"{_misspelt(module)}")
    return Hooks(module_name, **found)


def _misspelt(module: Any) -> str:
    """A module with no hook at all most likely misspells one: name it."""
    for attr in dir(module):
        close = difflib.get_close_matches(attr, NAMES, n=1, cutoff=0.75)
        if close and callable(getattr(module, attr)):
            return f"; did you mean {close[0]} (it defines {attr})?"
    return "; define at least one of them, e.g. def post_fork(info): ..."
