"""Real apps the way people run them: FastAPI, Django (ASGI and WSGI) and Flask.

Each app is a file in its own directory, started from there with `--app module:attr` and the
default `--app-dir` (the working directory), as `uvicorn main:app` would be. One cluster per
framework goes through a rolling reload (SIGHUP) under load with no failed request, then a
SIGKILLed worker under load (a killed worker can lose only what it had accepted: with one
sequential client, at most the one request in flight, never a refused connection; the rule
of test_supervision and test_chaos), and its requests are counted by the master's metrics.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

from conftest import Cluster, Load, wait_for

FASTAPI_APP = '''
import contextlib, os
from fastapi import FastAPI, WebSocket

state = {}

@contextlib.asynccontextmanager
async def lifespan(app):
    state["started"] = os.getpid()  # proves the lifespan ran in this worker
    yield

app = FastAPI(lifespan=lifespan)

@app.get("/")
async def index():
    return {"framework": "fastapi", "lifespan": state.get("started") == os.getpid()}

@app.websocket("/ws")
async def echo(ws: WebSocket):
    await ws.accept()
    async for text in ws.iter_text():
        await ws.send_text(f"echo {text}")
'''

FLASK_APP = '''
from flask import Flask, request, url_for

app = Flask(__name__)

@app.get("/")
def index():
    return {"framework": "flask", "script_name": request.environ["SCRIPT_NAME"],
            "url": url_for("index"), "remote": request.remote_addr}
'''

DJANGO_SETTINGS = '''
SECRET_KEY = "only-for-this-test"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "site_urls"
INSTALLED_APPS = []
MIDDLEWARE = []
DATABASES = {}
USE_TZ = True
'''

DJANGO_URLS = '''
from django.http import JsonResponse
from django.urls import path

def index(request):
    return JsonResponse({"framework": "django", "path": request.path})

urlpatterns = [path("", index)]
'''

DJANGO_ENTRY = '''
import os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")
from django.core.{kind} import get_{kind}_application
application = get_{kind}_application()
'''


def write_app(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


APPS = {
    "fastapi": ({"main.py": FASTAPI_APP}, "main:app", "ASGI 3"),
    "flask": ({"web.py": FLASK_APP}, "web:app", "WSGI"),
    "django-asgi": ({"site_settings.py": DJANGO_SETTINGS, "site_urls.py": DJANGO_URLS,
                     "site_asgi.py": DJANGO_ENTRY.format(kind="asgi")},
                    "site_asgi:application", "ASGI 3"),
    "django-wsgi": ({"site_settings.py": DJANGO_SETTINGS, "site_urls.py": DJANGO_URLS,
                     "site_wsgi.py": DJANGO_ENTRY.format(kind="wsgi")},
                    "site_wsgi:application", "WSGI"),
}


def get_ok(c: Cluster) -> float:
    try:
        return c.metric('hello_cluster_http_requests_total{method="GET",status="200"}')
    except KeyError:
        return 0.0


def settled_count(c: Cluster) -> float:
    """The GET 200 count once the workers' 0.1 s flushes have caught up: the same in two
    scrapes 0.3 s apart (three flushes), within 15 s."""
    seen = [-1.0]

    def settled() -> bool:
        now = get_ok(c)
        same = now == seen[0]
        seen[0] = now
        return same

    wait_for(settled, 15, interval=0.3, what="the request count to stop moving")
    return seen[0]


def survive_reload_and_kill(c: Cluster) -> None:
    """SIGHUP under load: 0 failures. SIGKILL a worker under load: only what it had accepted."""
    with Load(c.port, max_seconds=30) as load:
        wait_for(lambda: load.ok >= 20, 10, what="load to get going")
        old = set(c.workers())
        c.signal(signal.SIGHUP)
        wait_for(lambda: "reload complete" in c.log and not old & set(c.workers()), 20,
                 what="the rolling reload")
        served = load.ok
        wait_for(lambda: load.ok >= served + 20, 10, what="requests after the reload")
    assert load.failures == [], load.failures[:5]
    workers = c.workers()
    with Load(c.port, max_seconds=30) as load:
        wait_for(lambda: load.ok >= 20, 10, what="load to get going")
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: workers[0] not in c.workers() and len(c.workers()) == 2
                 and c.metric("hello_cluster_workers_ready") == 2, 10, what="respawn")
        served = load.ok
        wait_for(lambda: load.ok >= served + 20, 10, what="requests after the respawn")
    assert len(load.failures) <= 1, load.failures
    assert not any("Refused" in f for f in load.failures), load.failures


@pytest.mark.parametrize("name", list(APPS))
def test_framework_app_from_its_directory(cluster, tmp_path: Path, name: str) -> None:
    files, spec, interface = APPS[name]
    app_dir = write_app(tmp_path / name, files)
    # No PYTHONPATH to the app: only the working directory (the default --app-dir) finds it.
    c = cluster("--workers", "2", "--app", spec, env={"PYTHONPATH": ""}, cwd=app_dir,
                workers=2)
    assert f"--app {spec}: " in c.log and interface in c.log  # what auto chose, said once
    assert c.log.count(f"--app {spec}: ") == 1
    status, headers, body = c.get("/")
    assert status == 200, body
    import json

    answer = json.loads(body)
    assert answer["framework"] == name.split("-")[0]
    if name == "fastapi":
        assert answer["lifespan"] is True
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{c.port}/ws", open_timeout=5, close_timeout=2) as ws:
            ws.send("hi")
            assert ws.recv(timeout=5) == "echo hi"
    if name == "flask":  # mounted at the root, the client seen as itself
        assert answer == {"framework": "flask", "script_name": "", "url": "/",
                          "remote": "127.0.0.1"}
    if name.startswith("django"):
        assert answer["path"] == "/"

    survive_reload_and_kill(c)
    # Every request a worker answers is counted by the master: 25 more, 25 more counted.
    before = settled_count(c)
    for _ in range(25):
        assert c.get("/")[0] == 200
    wait_for(lambda: get_ok(c) == before + 25, 5, what="25 requests counted")
    assert "Traceback" not in c.log


@pytest.mark.parametrize("name", [n for n, app in APPS.items() if app[2] == "WSGI"])
def test_wsgi_framework_on_the_loop(cluster, tmp_path: Path, name: str) -> None:
    """--wsgi-dispatch loop: the same answers from a real framework, and a SIGHUP under load
    and a killed worker cost what they cost with threads."""
    files, spec, _ = APPS[name]
    app_dir = write_app(tmp_path / name, files)
    threaded = cluster("--workers", "1", "--app", spec, env={"PYTHONPATH": ""}, cwd=app_dir,
                       workers=1)
    c = cluster("--workers", "2", "--app", spec, "--wsgi-dispatch", "loop",
                env={"PYTHONPATH": ""}, cwd=app_dir, workers=2)
    status, _, body = c.get("/")
    assert status == 200, body
    assert body == threaded.get("/")[2]
    survive_reload_and_kill(c)
