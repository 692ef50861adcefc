"""The prefork core against the real command: fork, share, respawn, drain, die with the master."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import pytest

from conftest import alive, need_command, need_root, run_cli, wait_for


def test_three_workers_share_the_port(cluster) -> None:
    c = cluster("--workers", "3", workers=3)
    workers = c.workers()
    assert len(workers) == 3
    for pid in workers:
        assert open(f"/proc/{pid}/cmdline").read().startswith("hello-cluster: worker")
    assert open(f"/proc/{c.pid}/cmdline").read().startswith("hello-cluster: master")
    pids = set()
    for _ in range(60):
        status, headers, body = c.get("/")
        assert status == 200
        assert body == b"<h1>Hello Python!</h1><p>Hello Cluster!</p>"
        assert headers["content-type"].startswith("text/html")
        pids.add(int(headers["x-worker-pid"]))
    assert len(pids) > 1
    assert pids <= set(workers)
    assert c.pid not in pids  # the master never serves traffic


def test_sigkill_worker_is_replaced_within_a_second(cluster) -> None:
    c = cluster("--workers", "3", workers=3)
    victim = c.workers()[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> bool:
        pids = c.workers()
        return len(pids) == 3 and victim not in pids and c.get("/", timeout=1)[0] == 200

    wait_for(replaced, 1.0, interval=0.01, what="a replacement worker")
    assert time.monotonic() - killed_at < 1.0
    wait_for(lambda: c.metric("hello_cluster_workers_ready") == 3, 2)
    assert re.search(rf"pid {victim} signal, killed by SIGKILL", c.log)


def test_graceful_stop_finishes_in_flight_request(cluster) -> None:
    c = cluster("--workers", "2", "--app", "hc_testapp:app", "--graceful-timeout", "10s",
                workers=2)
    tree = [c.pid, *c.workers()]
    result: dict[str, object] = {}

    def slow() -> None:
        result["status"] = c.get("/slow?s=2", timeout=10)[0]

    t = threading.Thread(target=slow)
    t.start()
    c.wait_in_flight(1)  # the request is inside a worker
    started = time.monotonic()
    c.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", c.port), timeout=0.5):
                return False
        except ConnectionRefusedError:
            return True

    wait_for(refused, 3, what="listeners to close")
    assert c.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 10
    t.join(timeout=10)
    assert result.get("status") == 200
    wait_for(lambda: not any(alive(p) for p in tree), 2, what="no process of the tree left")


def test_workers_die_with_the_master(cluster) -> None:
    c = cluster("--workers", "2", workers=2)
    workers = c.workers()
    os.kill(c.pid, signal.SIGKILL)
    c.proc.wait(timeout=5)
    wait_for(lambda: not any(alive(p) for p in workers), 2, what="workers to die with master")


def test_sigquit_stops_at_once(cluster) -> None:
    c = cluster("--workers", "2", "--app", "hc_testapp:app", workers=2)
    workers = c.workers()
    c.signal(signal.SIGQUIT)
    assert c.wait_exit(timeout=3) == 0
    wait_for(lambda: not any(alive(p) for p in workers), 2, what="workers gone")


def _one_line_error(proc, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert errors, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_port_in_use(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("--bind", f"127.0.0.1:{port}", "--metrics-bind", "off")
    _one_line_error(proc, 3, "address already in use", f"127.0.0.1:{port}")


def test_permission_denied_on_bind() -> None:
    need_root()  # to take CAP_NET_BIND_SERVICE away from a root process
    setpriv = need_command("setpriv", "util-linux")
    proc = run_cli("--bind", "127.0.0.1:81", "--metrics-bind", "off",
                   wrapper=[setpriv, "--bounding-set", "-net_bind_service", "--inh-caps",
                            "-net_bind_service"])
    _one_line_error(proc, 3, "permission denied", "CAP_NET_BIND_SERVICE")


@pytest.mark.parametrize("app, code, words", [
    ("hc_importerror:app", 4, ["hc_importerror", "ValueError", "broken on purpose"]),
    ("no_such_module_xyz:app", 4, ["no module named 'no_such_module_xyz'"]),
    ("hc_testapp:nope", 4, ["no attribute 'nope'"]),
    ("hc_notcallable:app", 4, ["not callable", "not an ASGI or WSGI app"]),
    ("not-a-spec", 2, ["module:attr"]),
])
def test_app_errors(app: str, code: int, words: list[str]) -> None:
    proc = run_cli("--app", app, "--bind", "127.0.0.1:0", "--metrics-bind", "off",
                   "--workers", "2")
    _one_line_error(proc, code, *words)
    # One failed import, not a respawn storm: at most one attempt per worker slot.
    assert proc.stderr.count("cannot start") <= 2


def test_demo_exit_after_seed_experiment(cluster) -> None:
    """Node's seed demo: workers exit 1 s after each request; every request is still served."""
    c = cluster("--workers", "2", "--demo-exit-after", "1s", workers=2)
    for _ in range(5):
        status, _, _ = c.get("/", timeout=15)
        assert status == 200
        time.sleep(1.0)
    wait_for(lambda: c.log.count("exit status 1") >= 3 and c.log.count("ready in") >= 5, 10,
             what="deaths and respawns in the log")
    assert c.log.count("respawn in") >= 3


def test_json_logs_and_auto_workers(cluster) -> None:
    """--log-format json: every line is one object; auto sizing says what it decided and why."""
    import json

    c = cluster("--log-format", "json")
    c.signal(signal.SIGTERM)
    assert c.wait_exit(15) == 0
    entries = [json.loads(line) for line in c.log.splitlines() if line.strip()]
    assert entries and all({"time", "level", "pid", "role", "message"} <= set(e)
                           for e in entries)
    decision = next(e for e in entries if e["message"].startswith("workers: "))
    assert "auto: " in decision["message"] and "CPUs" in decision["message"]
    assert {e["role"] for e in entries} >= {"master"}


def test_forwarded_headers_only_from_trusted_proxies(cluster) -> None:
    """By default X-Forwarded-* are not believed; --forwarded-allow-ips names who may set them."""
    forged = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    plain = cluster("--workers", "1", "--app", "hc_testapp:app", metrics=False)
    assert plain.get("/client", headers=forged)[2] == b"127.0.0.1 http"
    trusting = cluster("--workers", "1", "--app", "hc_testapp:app", "--forwarded-allow-ips",
                       "127.0.0.1", metrics=False)
    assert trusting.get("/client", headers=forged)[2] == b"203.0.113.7 https"
    others = cluster("--workers", "1", "--app", "hc_testapp:app", "--forwarded-allow-ips",
                     "10.0.0.0/8", metrics=False)
    assert others.get("/client", headers=forged)[2] == b"127.0.0.1 http"
