"""Finding and recognising the app: --app-dir, --factory, --interface; start-up errors said once.

The interface detection is a pure function, tried here on the real frameworks' objects; the
rest runs the real command from the app's own directory.
"""

from __future__ import annotations

import functools
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import need, need_root, run_cli
from hello_cluster.worker.loader import ASGI, WSGI, detect_interface

BASE = ("--bind", "127.0.0.1:0", "--metrics-bind", "off", "--workers", "2")


# ---- auto: ASGI 3 or WSGI from the callable ------------------------------------------------

async def asgi_function(scope: Any, receive: Any, send: Any) -> None: ...


def wsgi_function(environ: Any, start_response: Any) -> list[bytes]:
    return []


class AsgiInstance:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...


class AsgiReturningAwaitable:  # a sync __call__ of (scope, receive, send): ASGI 3 too
    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return asgi_function(scope, receive, send)


def test_detect_the_real_frameworks() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"])
        django.setup()
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler
    from fastapi import FastAPI
    from flask import Flask
    from starlette.applications import Starlette

    assert detect_interface(FastAPI())[0] == ASGI
    assert detect_interface(Starlette())[0] == ASGI
    assert detect_interface(ASGIHandler())[0] == ASGI
    assert detect_interface(WSGIHandler())[0] == WSGI
    assert detect_interface(Flask("t"))[0] == WSGI
    assert detect_interface(Flask("t").wsgi_app)[0] == WSGI  # a bound method


@pytest.mark.parametrize("app, expected", [
    (asgi_function, ASGI),
    (AsgiInstance(), ASGI),
    (AsgiReturningAwaitable(), ASGI),
    (functools.partial(asgi_function), ASGI),
    (wsgi_function, WSGI),
    (lambda environ, start_response: [], WSGI),
    (42, None),
    (AsgiInstance, None),  # the class, not an instance
    (lambda: None, None),  # a factory without --factory
    (lambda scope: None, None),  # ASGI 2 style
    (lambda *args: None, None),  # cannot tell: --interface says
    (print, None),  # no signature to read
])
def test_detect_interface(app: Any, expected: str | None) -> None:
    chosen, why = detect_interface(app)
    assert chosen == expected, why
    assert why


# ---- the real command, from the app's directory ---------------------------------------------

ASGI_APP = '''
from hello_cluster.app import app
def create():
    return app
'''


def make_app(tmp_path: Path, name: str, text: str) -> Path:
    directory = tmp_path / "app"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(text))
    return directory


def test_app_dir_and_factory(cluster, tmp_path: Path) -> None:
    """--app-dir (flag, or env relative to the working directory) and --factory."""
    app_dir = make_app(tmp_path, "mine", ASGI_APP)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    c = cluster("--workers", "1", "--app", "mine:app", "--app-dir", str(app_dir),
                env={"PYTHONPATH": ""}, cwd=elsewhere, workers=1)
    assert c.get("/")[0] == 200
    f = cluster("--workers", "1", "--app", "mine:create", "--factory",
                env={"PYTHONPATH": "", "HELLO_CLUSTER_APP_DIR": "app"}, cwd=tmp_path, workers=1)
    assert f.get("/")[0] == 200
    # A wrapper auto cannot read (*args) is served once --interface says what it is.
    make_app(tmp_path, "wrapped", """
        def app(*args):
            environ, start_response = args
            start_response("200 OK", [("content-type", "text/plain")])
            return [b"wsgi by --interface"]
    """)
    w = cluster("--workers", "1", "--app", "wrapped:app", "--interface", "wsgi",
                env={"PYTHONPATH": ""}, cwd=app_dir, workers=1)
    assert w.get("/")[2] == b"wsgi by --interface"


ERROR_CASES = [
    # (module text or None, --app, extra args, words in the reason)
    (None, "nosuchmodule_xyz:app", (), ["no module named 'nosuchmodule_xyz'", "--app-dir"]),
    ("app = 1\n", "mod:nope", (), ["module mod has no attribute 'nope'"]),
    ("raise RuntimeError('cannot import this')\n", "mod:app", (),
     ["importing mod raised RuntimeError: cannot import this", "mod.py:1"]),
    ("app = 42\n", "mod:app", (), ["not an application", "not callable"]),
    ("class App:\n    async def __call__(self, s, r, se): ...\n", "mod:App", (),
     ["the class App, not an instance"]),
    ("def app():\n    return None\n", "mod:app", (), ["not an application"]),
    ("async def app(scope):\n    pass\n", "mod:app", (), ["ASGI 2 apps are not supported"]),
    ("def app(*args):\n    pass\n", "mod:app", (), ["use --interface asgi or --interface wsgi"]),
    ("def create():\n    raise ValueError('no config')\n", "mod:create", ("--factory",),
     ["--factory: calling it raised ValueError: no config"]),
    ("def create():\n    return 7\n", "mod:create", ("--factory",), ["not callable"]),
    ("app = 3\n", "mod:app", ("--interface", "wsgi"), ["not an application"]),
]


@pytest.mark.parametrize("text, app, extra, words", ERROR_CASES,
                         ids=[f"{c[1]}{' '.join(c[2])}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_app_errors_said_once(tmp_path: Path, text: str | None, app: str,
                              extra: tuple[str, ...], words: list[str]) -> None:
    """Exit 4 before any worker is ready; at most 3 lines in all: the reason once, no traceback."""
    app_dir = make_app(tmp_path, "mod", text or "")
    proc = run_cli(*BASE, "--app", app, *extra, cwd=app_dir, env={"PYTHONPATH": ""})
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert " ready in " not in proc.stderr  # no worker ever reported ready
    reason = [line for line in lines if words[0] in line]
    assert len(reason) == 1, proc.stderr
    for word in words:
        assert word in reason[0], reason[0]
    assert reason[0] == lines[-1] and "master exiting with code 4" in reason[0]


def test_traceback_only_at_debug(tmp_path: Path) -> None:
    app_dir = make_app(tmp_path, "mod", "def helper():\n    raise KeyError('x')\nhelper()\n")
    proc = run_cli(*BASE, "--app", "mod:app", "--log-level", "debug", cwd=app_dir)
    assert proc.returncode == 4
    assert "Traceback" in proc.stderr and "in helper" in proc.stderr


def test_lifespan_failure_said_once(tmp_path: Path) -> None:
    """A FastAPI lifespan that raises: the exception's line once, not a traceback per worker."""
    app_dir = make_app(tmp_path, "main", '''
        import contextlib
        from fastapi import FastAPI

        @contextlib.asynccontextmanager
        async def lifespan(app):
            raise RuntimeError("database is down")
            yield

        app = FastAPI(lifespan=lifespan)
    ''')
    proc = run_cli(*BASE, "--app", "main:app", "--crash-loop-limit", "4",
                   "--backoff-initial", "10ms", "--backoff-max", "50ms", cwd=app_dir,
                   env={"PYTHONPATH": ""})
    assert proc.returncode == 5, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("cannot start: the app's lifespan startup failed: RuntimeError: "
                             "database is down") == 1, proc.stderr


def test_privilege_drop_failure_said_once() -> None:
    """A worker that cannot become --user stops the start with exit 6, said once."""
    need_root()
    proc = run_cli(*BASE, "--user", "hc-no-such-user")
    assert proc.returncode == 6, proc.stderr
    assert proc.stderr.count("--user hc-no-such-user: no such user") == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3 and "Traceback" not in proc.stderr


def test_private_app_dir_is_read_by_the_worker_user(cluster, tmp_path: Path) -> None:
    """The user's app is imported after the privilege drop: a dir the user cannot read is
    named, with the fix. The built-in app is imported by the master before the drop, so it
    is served from a private working directory all the same."""
    need_root()
    import pwd

    need(any(p.pw_name == "nobody" for p in pwd.getpwall()), "needs the user 'nobody'")
    app_dir = make_app(tmp_path, "mine", ASGI_APP)
    os.chmod(app_dir, 0o700)
    proc = run_cli(*BASE, "--app", "mine:app", "--user", "nobody", cwd=app_dir,
                   env={"PYTHONPATH": ""})
    assert proc.returncode == 4, proc.stderr
    assert f"--app-dir {app_dir} is not readable by uid {pwd.getpwnam('nobody').pw_uid}" \
        in proc.stderr
    c = cluster("--workers", "1", "--user", "nobody", "--group", "nogroup", cwd=app_dir,
                workers=1)
    assert c.get("/")[0] == 200


def test_docs_and_deploy_say_where_the_app_lives() -> None:
    """Every option has a row in the manual; the unit and the image name the app's directory."""
    from conftest import ROOT, manual
    from hello_cluster.config import OPTIONS

    readme = manual()
    for opt in OPTIONS:
        assert f"`{opt.flag}" in readme or f"`--[no-]{opt.name}" in readme, opt.flag
        assert f"`{opt.env}`" in readme, opt.env
    unit = (ROOT / "deploy" / "systemd" / "hello-cluster.service").read_text()
    assert "\nWorkingDirectory=-/srv/hello-cluster\n" in unit
    image = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    assert "\nWORKDIR /app\n" in image
