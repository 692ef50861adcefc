"""Find, import and recognise the application: `--app`, `--app-dir`, `--factory`, `--interface`.

A worker calls `load` after fork (and after dropping privileges), so a reload imports new code
and a user's app is only ever read by the unprivileged user. Everything that can go wrong is
an `AppLoadError` whose one-line message names the problem and the fix; the master then stops
the start with exit code 4 before any worker reports ready.

Telling ASGI from WSGI: uvicorn's `auto` only tells ASGI 3 from ASGI 2 (a coroutine function,
or a class with `__await__`) and needs `--interface wsgi` for Flask or Django; granian always
needs `--interface`. Here `auto` looks at what calling the app would run: a coroutine function
taking (scope, receive, send) is ASGI 3; a plain callable taking (environ, start_response) is
WSGI; a plain callable taking three arguments is ASGI 3 returning an awaitable; anything else
is refused with a message that says which `--interface` to force if we guessed wrong.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hello_cluster.config import DEFAULT_WSGI_THREADS
from hello_cluster.errors import AppLoadError

log = logging.getLogger("hello_cluster.worker")

ASGI = "asgi"
WSGI = "wsgi"


@dataclass(frozen=True)
class LoadedApp:
    """The application as an ASGI 3 callable, and how it was recognised."""

    app: Any
    interface: str  # ASGI or WSGI: what the user's callable speaks
    why: str  # what auto-detection saw, for the log


def use_app_dir(app_dir: str | None) -> None:
    """Put --app-dir first on sys.path, as uvicorn --app-dir and `python -m` do."""
    if app_dir and (not sys.path or sys.path[0] != app_dir):
        sys.path.insert(0, app_dir)


def where(err: BaseException) -> str:
    """The innermost frame of the app's own code: importlib's frozen frames say nothing to
    an operator (`<frozen importlib._bootstrap>:241`), and a SyntaxError carries its own."""
    if isinstance(err, SyntaxError) and err.filename:
        return f" ({err.filename}:{err.lineno})"
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith("<frozen ")]
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _not_found_hint(app_dir: str | None) -> str:
    if app_dir and not os.access(app_dir, os.R_OK | os.X_OK):
        return (f"--app-dir {app_dir} is not readable by uid {os.getuid()}; make it readable "
                "by the --user the workers run as, or move the app")
    if app_dir:
        return f"looked in --app-dir {app_dir} and on PYTHONPATH; run from the app's directory " \
               "or set --app-dir"
    return "check the name and that it is on PYTHONPATH"


def import_app(spec: str, app_dir: str | None = None) -> Any:
    """Import `module:attr` with messages that name what is wrong and where."""
    use_app_dir(app_dir)
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        log.debug("importing %s failed", module_name, exc_info=err)
        if err.name and module_name.startswith(err.name):
            raise AppLoadError(f"--app {spec}: no module named {err.name!r}; "
                               f"{_not_found_hint(app_dir)}") from None
        raise AppLoadError(f"--app {spec}: importing {module_name} failed: "
                           f"{type(err).__name__}: {err}{where(err)}") from None
    except BaseException as err:  # the app's own code raised while importing
        log.debug("importing %s raised", module_name, exc_info=err)
        raise AppLoadError(f"--app {spec}: importing {module_name} raised "
                           f"{type(err).__name__}: {err}{where(err)}") from None
    app: Any = module
    for part in attr_path.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise AppLoadError(f"--app {spec}: module {module_name} has no attribute "
                               f"{attr_path!r}") from None
    return app


def call_factory(spec: str, factory: Any) -> Any:
    """--factory: the attribute is a zero-argument callable that returns the app."""
    if not callable(factory):
        raise AppLoadError(f"--app {spec} --factory: {type(factory).__name__} is not callable")
    try:
        return factory()
    except BaseException as err:
        log.debug("the factory %s raised", spec, exc_info=err)
        raise AppLoadError(f"--app {spec} --factory: calling it raised "
                           f"{type(err).__name__}: {err}{where(err)}") from None


def _positional(call: Callable[..., Any]) -> tuple[int, int] | None:
    """(required, most) positional arguments `call` takes; most=-1 for *args; None if unknown."""
    try:
        sig = inspect.signature(call)
    except (TypeError, ValueError):
        return None
    required = most = 0
    for param in sig.parameters.values():
        if param.kind == param.VAR_POSITIONAL:
            return required, -1
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            most += 1
            required += param.default is param.empty
        elif param.kind == param.KEYWORD_ONLY and param.default is param.empty:
            return None  # cannot be called positionally at all
    return required, most


def _accepts(shape: tuple[int, int] | None, count: int) -> bool:
    return shape is not None and shape[0] <= count and (shape[1] == -1 or shape[1] >= count)


def detect_interface(app: Any) -> tuple[str | None, str]:
    """ASGI, WSGI or None (neither), and what was seen, from the callable alone."""
    if inspect.isclass(app):
        return None, (f"it is the class {app.__name__}, not an instance; pass an instance, "
                      "or --factory if it builds the app")
    if not callable(app):
        return None, f"it is not callable (type {type(app).__name__}), not an ASGI or WSGI app"
    call = app if inspect.isroutine(app) or isinstance(app, functools.partial) \
        else type(app).__call__
    shape = _positional(app)
    if _is_coroutine_function(call):
        if _accepts(shape, 3):
            return ASGI, "a coroutine function of (scope, receive, send): ASGI 3"
        return None, ("it is a coroutine function but does not take (scope, receive, send); "
                      "ASGI 2 apps are not supported")
    if shape is None or shape[1] == -1:
        return None, ("cannot tell ASGI from WSGI from its signature; use --interface asgi "
                      "or --interface wsgi")
    if _accepts(shape, 2) and not _accepts(shape, 3):
        return WSGI, "a plain callable of (environ, start_response): WSGI"
    if _accepts(shape, 3) and not _accepts(shape, 2):
        return ASGI, "a plain callable of (scope, receive, send): ASGI 3"
    if shape == (0, 0):
        return None, ("it takes no arguments: if it builds and returns the app, add --factory "
                      "(HELLO_CLUSTER_FACTORY=1)")
    return None, (f"it takes {shape[0]} to {shape[1]} positional arguments, neither ASGI 3 "
                  "(scope, receive, send) nor WSGI (environ, start_response)")


def _is_coroutine_function(call: Any) -> bool:
    if inspect.iscoroutinefunction(call):
        return True
    # asgiref's markcoroutinefunction (Django's sync_to_async views, some middleware).
    return getattr(call, "_is_coroutine", None) is getattr(
        sys.modules.get("asyncio.coroutines"), "_is_coroutine", object())


def wsgi_to_asgi(app: Any, threads: int) -> Any:
    """Serve a WSGI app with a2wsgi: views run in a pool of `threads`, the loop stays free.

    a2wsgi over asgiref's WsgiToAsgi and uvicorn's WSGIMiddleware: it streams both ways
    (wsgi.input reads from `receive` as the view asks, each response chunk is sent as it is
    yielded, with a bounded queue for backpressure), where WsgiToAsgi spools the whole request
    body first and uvicorn's copy is deprecated; and its pool is an explicit size. Its
    responder is replaced by http/wsgi.py's Responder, whose view thread does not wait for
    the loop at every message it sends, and its environ is built by http/environ.py (with
    the fixes a server owes the app: wsgi.errors, SCRIPT_NAME).
    """
    from hello_cluster.http.wsgi import WSGIMiddleware

    return WSGIMiddleware(app, workers=threads)


def load(spec: str, app_dir: str | None = None, factory: bool = False,
         interface: str = "auto", wsgi_threads: int = DEFAULT_WSGI_THREADS) -> LoadedApp:
    """Import, build (--factory), recognise (--interface) and adapt the app to ASGI 3."""
    app = import_app(spec, app_dir)
    if factory:
        app = call_factory(spec, app)
    if interface == "auto":
        chosen, why = detect_interface(app)
        if chosen is None:
            raise AppLoadError(f"--app {spec}: not an application: {why}")
    else:
        if not callable(app) or inspect.isclass(app):
            _, why = detect_interface(app)
            raise AppLoadError(f"--app {spec}: not an application: {why}")
        chosen, why = interface, f"--interface {interface}"
    served = wsgi_to_asgi(app, wsgi_threads) if chosen == WSGI else app
    return LoadedApp(served, chosen, why)
