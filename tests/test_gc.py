"""--gc: each worker's cyclic collector once the app has started (worker/gctune.py).

`tuned` (the default) freezes the started app's heap and sets 7000,20,20; `python` leaves
the interpreter's settings alone; three numbers set those. Checked inside real workers, with
and without --preload (whose template freezes for copy-on-write on its own), through an app
that answers with what its worker's collector is set to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hello_cluster.config import TUNED_GC, gc_thresholds, parse_gc
from hello_cluster.errors import ConfigError
from hello_cluster.supervisor import memory

APP = '''
import gc
import json

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                       "enabled": gc.isenabled()}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''


@pytest.mark.parametrize("text, setting, thresholds", [
    ("tuned", "tuned", TUNED_GC),
    (" Python ", "python", None),
    ("700,10,10", "700,10,10", (700, 10, 10)),
    ("0, 0, 0", "0,0,0", (0, 0, 0)),
    ("0100,5,5", "100,5,5", (100, 5, 5)),
])
def test_settings(text: str, setting: str, thresholds: tuple[int, int, int] | None) -> None:
    assert parse_gc(text) == setting
    assert gc_thresholds(setting) == thresholds


@pytest.mark.parametrize("text", ["", "fast", "700", "700,10", "7,0,0,0", "-1,10,10",
                                  "1.5,10,10", "a,b,c", "1,2,1000000001"])
def test_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_gc(text)


def _worker(cluster: Any, app_dir: Path, *args: str) -> Any:
    """One worker serving the app below; answered once, so its start is complete."""
    c = cluster("--workers", "1", "--app", "gcapp:app", "--app-dir", str(app_dir), *args,
                workers=1)
    assert c.get("/")[0] == 200
    return c


def _worker_gc(cluster: Any, app_dir: Path, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_worker(cluster, app_dir, *args).get("/")[2])
    return result


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "gcapp.py").write_text(APP)
    return tmp_path


@pytest.mark.parametrize("preload", [False, True], ids=["fork", "preload"])
def test_tuned_by_default(cluster: Any, app_dir: Path, preload: bool) -> None:
    seen = _worker_gc(cluster, app_dir, *(["--preload"] if preload else []))
    assert seen["threshold"] == list(TUNED_GC)
    assert seen["frozen"] > 1000  # the imported app and server, not a handful of objects
    assert seen["enabled"]


def test_python_leaves_the_interpreter_alone(cluster: Any, app_dir: Path) -> None:
    seen = _worker_gc(cluster, app_dir, "--gc", "python")
    assert seen == {"threshold": [700, 10, 10], "frozen": 0, "enabled": True}


def test_thresholds_given(cluster: Any, app_dir: Path) -> None:
    seen = _worker_gc(cluster, app_dir, "--gc", "2000,10,10")
    assert seen["threshold"] == [2000, 10, 10]
    assert seen["frozen"] > 1000


def test_tuning_copies_no_shared_pages(cluster: Any, app_dir: Path) -> None:
    """Freezing costs no memory: a gc.collect() in the worker would write to every object
    it inherited from the master and copy those pages (5 -> 13 MiB of USS per worker here),
    which --max-worker-memory (this same USS reading) and the pool's memory figures count."""
    seen = {}
    for setting in ("python", "tuned"):
        c = _worker(cluster, app_dir, "--gc", setting)
        seen[setting] = memory.uss_bytes(c.workers()[0])
    assert None not in seen.values(), seen
    assert seen["tuned"] <= seen["python"] + 2 * 2**20, seen  # type: ignore[operator]
