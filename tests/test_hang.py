"""Why a worker hung: its stack at the hang kill, stall reports, `hello-cluster dump`, and
`--request-timeout`, all against real workers serving tests/apps/hc_hang.py."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, TEST_APPS, Cluster, Load, clean_env, http_get, wait_for
from hello_cluster.system import stackdump

Start = Callable[..., Cluster]  # the cluster fixture
APP = TEST_APPS / "hc_hang.py"
WSGI_APP = TEST_APPS / "hc_wsgiapp.py"


def lines_of(marker: str, path: Path = APP) -> list[int]:
    """Every line carrying `marker`: a loop's stack may be sampled on any of its lines."""
    return [n for n, line in enumerate(path.read_text().splitlines(), 1) if marker in line]


def line_of(marker: str, path: Path = APP) -> int:
    """The first line of the test app that carries `marker` (so the tests never hard-code
    it)."""
    found = lines_of(marker, path)
    if not found:
        raise AssertionError(f"{marker} not in {path}")
    return found[0]


def in_background(path: str, port: int, timeout: float = 30.0) -> threading.Thread:
    """A request whose answer (or failure) nobody waits for."""
    def go() -> None:
        try:
            http_get(port, path, timeout=timeout)
        except OSError:
            pass
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def json_lines(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def dump(runtime: Path, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), "dump", "--runtime-dir", str(runtime), *args],
                          env=clean_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


# ---- pure parts ----------------------------------------------------------------------------


def test_faulthandler_text_parses_into_frames_innermost_last(tmp_path: Path) -> None:
    event = threading.Event()
    t = threading.Thread(target=event.wait, name="waiter", daemon=True)
    t.start()
    try:
        with open(tmp_path / "dump", "w+") as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            text = f.read()
    finally:
        event.set()
    once = stackdump.parse_faulthandler(text)
    threads = stackdump.parse_faulthandler(text + text)  # two dumps back to back: once each
    # this thread and the waiter, plus whatever threads the test runner has (xdist: execnet)
    assert len(threads) == len(once) >= 2 and threads[0].current
    assert not any(t.current for t in threads[1:])
    main = threads[0].frames
    assert main[-1].function == "test_faulthandler_text_parses_into_frames_innermost_last"
    assert main[-1].file == __file__ and main[-1].line > 0
    # threading.Event.wait, innermost, in the waiter
    assert any(t.frames and t.frames[-1].function == "wait" for t in threads[1:])
    rendered = stackdump.render(threads)
    assert rendered.index("_pytest") < rendered.index("test_faulthandler_text_parses")
    forked = (stackdump.Frame("/x/hello_cluster/supervisor/master.py", 1, "fork_worker"),
              stackdump.Frame("/x/hello_cluster/worker/process.py", 2, "run"))
    assert stackdump.after_fork(forked) == forked[1:]  # the master's frames left out
    assert stackdump.parse_faulthandler("garbage\n  File nowhere\n") == []


def test_the_blamed_frame_is_the_apps_own() -> None:
    frames = (stackdump.Frame("/srv/app/main.py", 3, "handler"),
              stackdump.Frame(threading.__file__, 10, "wait"),
              stackdump.Frame(stackdump.__file__, 5, "ours"))
    assert stackdump.innermost_app(frames) == frames[0]
    assert stackdump.innermost_app(frames[1:]) == frames[2]  # none of the app's: innermost
    assert not stackdump.is_app_file("/x/lib/python3.11/site-packages/y.py")
    assert not stackdump.is_app_file("<frozen importlib._bootstrap>")
    assert stackdump.innermost_app(()) is None
    assert stackdump.parse_name("slot3-pid42.tasks") == (2, 42, "tasks")
    assert stackdump.parse_name("slot3-pid42.txt") is None


# ---- the hang kill -------------------------------------------------------------------------


def test_a_hang_kill_logs_the_stack_in_a_c_call_and_in_python_code(cluster: Start) -> None:
    c = cluster("--workers", "1", "--app", "hc_hang:app", "--worker-timeout", "1s",
                "--log-format", "json", "--stall-report-after", "0", workers=1)
    for path, function, marker in (("/sleep?s=20", "blocking_sleep", "HANG-SLEEP"),
                                   ("/spin?s=20", "pure_python_spin", "HANG-SPIN")):
        pid = c.workers()[0]
        in_background(path, c.port, timeout=10)

        def killed(pid: int = pid) -> list[dict[str, Any]]:
            return [r for r in json_lines(c.log) if r.get("worker_pid") == pid
                    and "killing it" in r["message"]]

        wait_for(lambda: bool(killed()), 10, what=f"the hang kill of {path}")
        (record,) = killed()
        assert "(--worker-timeout)" in record["message"] and record["level"] == "error"
        loop = [t for t in record["threads"] if t["event_loop"]]
        assert len(loop) == 1, record
        innermost = loop[0]["frames"][-1]
        assert innermost["file"] == str(APP) and innermost["function"] == function, innermost
        assert innermost["line"] in lines_of(marker), innermost
        def respawned(pid: int = pid) -> bool:
            workers = c.workers()  # once: between two reads the pool can be empty again
            return bool(workers) and workers[0] != pid

        wait_for(respawned, 10, what="the respawn")
        c.wait_ready(1)


def test_a_stall_is_reported_with_its_line_and_how_long_it_lasted(cluster: Start) -> None:
    c = cluster("--workers", "1", "--app", "hc_hang:app", "--stall-report-after", "300ms",
                "--log-level", "debug", workers=1)
    assert c.get("/sleep?s=1.2", timeout=10)[0] == 200
    wait_for(lambda: "stall ended" in c.log, 5, what="the end of the stall")
    where = f"{APP}:{line_of('HANG-SLEEP')} in blocking_sleep"
    blocked = [line for line in c.log.splitlines() if "event loop blocked for" in line]
    assert len(blocked) == 1 and where in blocked[0], c.log  # once per stall
    ended = next(line for line in c.log.splitlines() if "stall ended" in line)
    lasted = float(ended.split("blocked for ")[1].split("s,")[0])
    assert 0.9 <= lasted <= 1.8 and where in ended, ended
    stack = c.log.split("the blocked event loop's stack (innermost call last):\n")[1]
    frames = [line for line in stack.splitlines() if line.startswith("  File ")]
    assert frames[-1] == f'  File "{APP}", line {line_of("HANG-SLEEP")}, in blocking_sleep'
    wait_for(lambda: c.metric("hello_cluster_worker_stall_seconds_count") == 1, 5,
             what="the stall histogram")
    assert c.get("/spin?s=0.8", timeout=10)[0] == 200
    wait_for(lambda: c.log.count("stall ended") == 2, 5, what="the second stall's end")
    assert any(f"{APP}:{n} in pure_python_spin" in c.log for n in lines_of("HANG-SPIN")), c.log


# ---- hello-cluster dump --------------------------------------------------------------------


def test_dump_while_serving_blocked_and_awaiting(cluster: Start, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    c = cluster("--workers", "2", "--app", "hc_hang:app", "--runtime-dir", str(runtime),
                workers=2)
    # Dumps taken while a client loop runs cost it nothing.
    dumps = 0
    with Load(c.port, max_seconds=30, max_requests=2500) as load:
        while load.ok + len(load.failures) < 2500 and dumps < 200:
            proc = dump(runtime, "--json")
            assert proc.returncode == 0, proc.stderr
            doc = json.loads(proc.stdout)
            assert sorted(w["slot"] for w in doc["workers"]) == [1, 2]
            assert all(w["tasks"] is not None for w in doc["workers"])
            dumps += 1
            if not load._thread.is_alive():
                break
    assert load.failures == [] and load.ok >= 1000 and dumps >= 3, (load.ok, dumps)

    # An awaiting request shows as a task waiting in the app's line.
    in_background("/forever", c.port)
    await_line = line_of("HANG-AWAIT")

    def awaiting() -> bool:
        doc = json.loads(dump(runtime, "--json").stdout)
        return any(f["line"] == await_line and f["function"] == "await_forever"
                   for w in doc["workers"] for t in w["tasks"] or () for f in t["frames"])

    wait_for(awaiting, 10, what="the awaiting task in a dump")

    # A blocked loop: its thread's stack, and no tasks.
    in_background("/sleep?s=4", c.port, timeout=10)
    sleep_line = line_of("HANG-SLEEP")

    def blocked() -> str | None:
        out = dump(runtime).stdout
        return out if f'line {sleep_line}, in blocking_sleep' in out else None

    wait_for(lambda: blocked() is not None, 5, what="the blocked worker in a dump")
    text = blocked() or ""
    assert "asyncio tasks: unavailable: the event loop is blocked" in text, text
    assert "asyncio tasks (" in text  # the other worker's loop still answers

    # --slot, and the exit codes.
    one = dump(runtime, "--slot", "2", "--json")
    assert one.returncode == 0 and [w["slot"] for w in json.loads(one.stdout)["workers"]] == [2]
    assert dump(runtime, "--slot", "7").returncode == 1
    with tempfile.TemporaryDirectory() as empty:
        gone = dump(Path(empty))
    assert gone.returncode == 3 and "no running hello-cluster" in gone.stderr
    assert gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr

    # Stacks never reach the metrics port, on any path.
    for path in ("/metrics", "/status", "/dump", "/stacks", "/tasks", "/debug", "/livez"):
        _, _, body = c.metrics_get(path)
        assert b"hc_hang" not in body and b'File "' not in body, path
    assert os.stat(runtime / f"stacks-{c.pid}").st_mode & 0o777 == 0o700
    for name in os.listdir(runtime / f"stacks-{c.pid}"):
        assert os.stat(runtime / f"stacks-{c.pid}" / name).st_mode & 0o777 == 0o600


# ---- --request-timeout ---------------------------------------------------------------------


def read_until_closed(port: int, path: str, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:  # closed with a reset: closed all the same
                return data
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"{path}: the connection stayed open: {data!r}")


@pytest.mark.parametrize("http", ["fast", "uvicorn"])
def test_request_timeout_cancels_and_the_worker_serves_on(cluster: Start, http: str) -> None:
    c = cluster("--workers", "1", "--app", "hc_hang:app", "--request-timeout", "1s",
                "--http", http, workers=1)
    pid = c.workers()[0]
    results: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], Any]) -> threading.Thread:
        def go() -> None:
            start = time.monotonic()
            try:
                results[name] = (fn(), time.monotonic() - start)
            except Exception as err:  # said by the assertion below, with the log
                results[name] = (err, time.monotonic() - start)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t

    threads = [run("forever", lambda: http_get(c.port, "/forever", timeout=10)),
               run("stream", lambda: read_until_closed(c.port, "/stream", 10)),
               run("swallow", lambda: http_get(c.port, "/swallow", timeout=10))]
    for t in threads:
        t.join(15)
    assert not any(isinstance(r[0], Exception) for r in results.values()), (results, c.log)
    (status, headers, body), took = results["forever"]
    assert status == 504 and headers["connection"] == "close" and 0.9 < took < 3, took
    streamed, _ = results["stream"]
    assert b" 200 " in streamed and b"first chunk" in streamed
    assert not streamed.endswith(b"0\r\n\r\n")  # cut short: no last chunk
    assert results["swallow"][0][0] == 504
    # The app's finally ran, its lifespan is untouched, the same worker serves on.
    status, headers, body = c.get("/state")
    assert status == 200 and int(headers["x-worker-pid"]) == pid
    assert b"('finally', 1)" in body and b"('started', True)" in body
    assert b"('swallowed', 1)" in body
    wait_for(lambda: c.metric("hello_cluster_request_timeouts_total") == 3, 5,
             what="the timeouts counted")
    lines = [line for line in c.log.splitlines() if "request timeout:" in line]
    assert len(lines) == 3, c.log
    by_path = {line.split("request timeout: GET ")[1].split()[0]: line for line in lines}
    assert f"hc_hang.py:{line_of('HANG-AWAIT')} in await_forever; cancelled; answered 504" \
        in by_path["/forever"]
    assert "in stream_then_wait; cancelled; connection closed" in by_path["/stream"]
    assert "caught the CancelledError and went on" in by_path["/swallow"]
    assert "Exception in ASGI application" not in c.log and "Traceback" not in c.log


def test_request_timeout_for_wsgi_under_preload(cluster: Start, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    c = cluster("--workers", "1", "--app", "hc_wsgiapp:app", "--preload", "--wsgi-threads",
                "2", "--request-timeout", "500ms", "--runtime-dir", str(runtime), workers=1)
    start = time.monotonic()
    status, _, body = c.get("/sleep?s=2", timeout=10)
    assert status == 504 and time.monotonic() - start < 1.8, time.monotonic() - start
    line = next(line for line in c.log.splitlines() if "request timeout:" in line)
    assert f"hc_wsgiapp.py:{line_of('time.sleep(_seconds', WSGI_APP)} in app" in line, line
    assert "a WSGI view cannot be cancelled" in line
    assert c.get("/", timeout=5)[0] == 200  # the worker serves on
    wait_for(lambda: c.metric("hello_cluster_request_timeouts_total") == 1, 5,
             what="the timeout counted")
    # The workers a --preload template forks answer dumps too.
    proc = dump(runtime, "--json")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["workers"]) == 1, proc.stderr
    c.signal(signal.SIGTERM)
    assert c.wait_exit(20) == 0, c.log
    assert not (runtime / f"stacks-{c.pid}").exists() and runtime.is_dir()
