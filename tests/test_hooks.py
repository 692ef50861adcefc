"""--hooks MODULE: post_fork, worker_ready and worker_exit run in each worker (never the
master), in that order, with the worker's slot, pid and generation; a hook that raises is an
app that cannot start (exit 4 at start, an abandoned reload)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import Load, run_cli, wait_for
from hello_cluster.worker import hooks

APP = '''
import os

import events

AT_IMPORT = events.SEEN  # what post_fork had done (or not) when the app was imported

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-worker-pid", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": AT_IMPORT.encode()})
'''
# A module the hooks and the app share: post_fork must run before the app is imported.
EVENTS = '''
SEEN = "app imported before post_fork"
'''
HOOKS = '''
import json
import os
import sys

import events

LOG = os.environ["HOOK_LOG"]


def _note(name, info):
    with open(LOG, "a") as f:
        f.write(json.dumps({{"hook": name, "slot": info.slot, "pid": info.pid, "me": os.getpid(),
                            "generation": info.generation, "preload": info.preload,
                            "app_loaded": "main" in sys.modules}}) + "\\n")


def post_fork(info):
    _note("post_fork", info)
    events.SEEN = "post_fork first"
    {fail_post_fork}


def worker_ready(info):
    _note("worker_ready", info)


def worker_exit(info):
    _note("worker_exit", info)
'''


def app_dir(tmp_path: Path, fail: str = "") -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "main.py").write_text(APP)
    (tmp_path / "events.py").write_text(EVENTS)
    (tmp_path / "hooks.py").write_text(HOOKS.format(fail_post_fork=fail))
    return tmp_path


def notes(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("preload", [False, True])
def test_hooks_run_in_each_worker_in_order(cluster, tmp_path, preload) -> None:
    log = tmp_path / "hooks.jsonl"
    d = app_dir(tmp_path / "app")  # not the test's tmp root: the cluster log lives there
    args = ["--workers", "2", "--app", "main:app", "--app-dir", str(d), "--hooks", "hooks"]
    c = cluster(*args, *(["--preload"] if preload else []), env={"HOOK_LOG": str(log)},
                workers=2)
    status, headers, body = c.get()
    assert status == 200
    # Without --preload the app is imported after post_fork; with it, in the template before.
    assert body == (b"app imported before post_fork" if preload else b"post_fork first")
    c.signal(signal.SIGTERM)
    assert c.wait_exit(20) == 0
    seen = notes(log)
    pids = {n["pid"] for n in seen}
    assert len(pids) == 2 and c.pid not in pids  # the workers, never the master
    for pid in pids:
        mine = [n for n in seen if n["pid"] == pid]
        assert [n["hook"] for n in mine] == ["post_fork", "worker_ready", "worker_exit"]
        assert all(n["me"] == pid and n["generation"] == 0 and n["preload"] is preload
                   for n in mine)
        assert mine[0]["app_loaded"] is preload and mine[1]["app_loaded"] is True
    assert sorted(n["slot"] for n in seen if n["hook"] == "post_fork") == [0, 1]


@pytest.mark.parametrize(("fail", "line", "preload"), [
    ('raise RuntimeError("no database")',
     "--hooks hooks: post_fork(info) raised RuntimeError: no database", False),
    ('raise RuntimeError("no database")',
     "--hooks hooks: post_fork(info) raised RuntimeError: no database", True),
    # Under --preload the template imports the module: its failure is the same exit 4.
    ('pass\n\nraise ImportError("no driver")',
     "--hooks hooks: importing it raised ImportError: no driver", True),
])
def test_a_raising_hook_stops_the_start_with_exit_4(tmp_path, fail, line, preload) -> None:
    d = app_dir(tmp_path, fail=fail)
    proc = run_cli("--workers", "2", "--app", "main:app", "--app-dir", str(d), "--hooks",
                   "hooks", "--bind", "127.0.0.1:0", "--metrics-bind", "off",
                   *(["--preload"] if preload else []),
                   env={"HOOK_LOG": str(tmp_path / "h.jsonl")})
    assert proc.returncode == 4, proc.stderr
    assert line in proc.stderr and "hooks.py:" in proc.stderr
    assert proc.stderr.count(line) == 1  # two workers failed alike: said once
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("module", "words"), [
    ("nosuch", "--hooks nosuch: no module named 'nosuch'; put nosuch.py in --app-dir"),
    ("typo", "--hooks typo: defines none of post_fork, worker_ready, worker_exit; did you "
             "mean post_fork (it defines postfork)?"),
])
def test_a_hooks_module_that_cannot_be_used_is_exit_4(tmp_path, module, words) -> None:
    (tmp_path / "typo.py").write_text("def postfork(info):\n    pass\n")
    proc = run_cli("--workers", "1", "--hooks", module, "--app-dir", str(tmp_path),
                   "--bind", "127.0.0.1:0", "--metrics-bind", "off")
    assert proc.returncode == 4, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("value", "words"), [
    ("hooks.py", "--hooks: 'hooks.py' is a file name; give the module: hooks"),
    ("my-hooks", "--hooks: 'my-hooks' is not a module name; use e.g. hooks"),
])
def test_a_bad_hooks_name_is_exit_2(value, words) -> None:
    proc = run_cli("--hooks", value)
    assert proc.returncode == 2
    assert words in proc.stderr


def test_a_raising_worker_ready_abandons_the_reload(cluster, tmp_path) -> None:
    log = tmp_path / "hooks.jsonl"
    d = app_dir(tmp_path / "app")
    c = cluster("--workers", "2", "--app", "main:app", "--app-dir", str(d), "--hooks", "hooks",
                env={"HOOK_LOG": str(log)}, workers=2)
    first = {n["pid"] for n in notes(log)}
    broken = HOOKS.format(fail_post_fork="").replace(
        '    _note("worker_ready", info)\n',
        '    _note("worker_ready", info)\n    raise ValueError("cache unreachable")\n')
    (d / "hooks.py").write_text(broken)
    with Load(c.port, max_seconds=20) as load:
        c.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in c.log, 15, what="the reload to fail")
    assert load.failures == [], load.failures[:5]
    assert "worker_ready(info) raised ValueError: cache unreachable" in c.log
    assert "keeping 2 workers of the previous generation" in c.log
    # The new workers accepted before worker_ready ran (and drained what they had: no
    # failure above); from here on only the old ones serve.
    wait_for(lambda: len(c.workers()) == 2, 10, what="the new workers to drain and exit")
    served = {int(c.get()[1]["x-worker-pid"]) for _ in range(20)}
    assert served <= first and c.proc.poll() is None


def test_info_is_frozen_and_names_the_worker() -> None:
    info = hooks.WorkerInfo(slot=0, pid=1, generation=2, app="main:app", app_dir="/srv",
                            preload=False)
    with pytest.raises(AttributeError):
        info.slot = 3
    assert {"slot", "pid", "generation"} <= set(info.__dataclass_fields__)
