"""examples/sessions: the Node note's caveat (sessions are not shared between workers), shown.

One client's visit counter, kept in a server-side session, is served by hello-cluster with
two workers. With the sessions in a real Redis (Debian's redis-server on loopback, private
port and directory, no persistence) the count goes on as the client's connections land on
every worker, through a rolling reload and a SIGKILLed worker. With each worker's own dict
the count breaks as soon as a connection lands on the other worker, and a reload loses it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, Cluster, free_port, http_get, need_command, wait_for

EXAMPLE = ROOT / "examples" / "sessions"
APP = "sessions_app:app"
SERVE = ("--app", APP, "--app-dir", str(EXAMPLE))  # as `cd examples/sessions` would


@dataclass
class RedisServer:
    """A private redis-server: loopback only, its own port and directory, nothing saved."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = need_command("redis-server", "redis-server")
    port = free_port()
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    log = open(tmp_path / "redis.log", "wb")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
         "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = RedisServer(proc, port, data_dir)
    try:
        wait_for(lambda: proc.poll() is None and server.ping(), 15, what="redis-server to answer")
        yield server
    finally:
        server.stop()
        log.close()
    assert not any(data_dir.iterdir()), "redis-server wrote to disk despite --save ''"


def example_env(store: str, redis_url: str = "redis://127.0.0.1:1/0") -> dict[str, str]:
    return {"SESSION_STORE": store, "REDIS_URL": redis_url, "SESSION_COOKIE_SECURE": "0"}


@dataclass
class Client:
    """One browser: keeps its session cookie, opens a new connection for every request."""

    port: int
    cookie: str | None = None
    seen: list[tuple[int, int]] = field(default_factory=list)  # (visits, worker pid)

    def visit(self) -> tuple[int, int]:
        headers = {"Cookie": f"session={self.cookie}"} if self.cookie else {}
        status, got, body = http_get(self.port, "/", headers=headers, timeout=10)
        assert status == 200, (status, body)
        if "set-cookie" in got:
            self.cookie = got["set-cookie"].split(";", 1)[0].split("=", 1)[1]
        data = json.loads(body)
        assert data["worker_pid"] == int(got["x-worker-pid"])
        self.seen.append((data["visits"], data["worker_pid"]))
        return self.seen[-1]

    def visits(self, n: int) -> set[int]:
        """n visits; the set of workers that answered them."""
        return {self.visit()[1] for _ in range(n)}

    def visit_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Keep visiting (one request every 20 ms at most) until `done`, bounded in time."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"not done after {timeout}s of visits"
            self.visit()
            time.sleep(0.02)


def reload_done(c: Cluster, old: set[int]) -> Callable[[], bool]:
    return lambda: (len(c.workers()) == 2 and not set(c.workers()) & old
                    and c.metric("hello_cluster_workers_ready") == 2)


def test_redis_sessions_count_on_across_workers_reload_and_kill(cluster, redis_server) -> None:
    c = cluster("--workers", "2", *SERVE, env=example_env("redis", redis_server.url),
                workers=2)
    client = Client(c.port)

    first = client.visits(20)
    assert len(first) == 2, f"20 new connections all landed on {first}"

    old = set(c.workers())
    c.signal(signal.SIGHUP)  # rolling reload while the client keeps visiting
    client.visit_until(reload_done(c, old), timeout=30)
    reloaded = client.visits(20)
    assert len(reloaded) == 2 and not reloaded & old, (reloaded, old)

    victim = min(reloaded)
    os.kill(victim, signal.SIGKILL)  # the client's next connections may be queued on its slot
    client.visit_until(lambda: victim not in c.workers() and len(c.workers()) == 2
                       and c.metric("hello_cluster_workers_ready") == 2, timeout=30)
    after = client.visits(20)
    assert len(after) == 2 and victim not in after, (after, victim)

    counts = [visits for visits, _ in client.seen]
    assert counts == list(range(1, len(counts) + 1)), counts  # never lost, never repeated
    assert len({pid for _, pid in client.seen}) >= 5  # 2 original, 2 reloaded, 1 respawned
    assert "worker 2 died" in c.log or "worker 1 died" in c.log

    # Redis gone: the page says 503, the workers stay up (no respawn storm).
    workers = set(c.workers())
    redis_server.stop()
    status, got, _ = http_get(c.port, "/", headers={"Cookie": f"session={client.cookie}"})
    assert status == 503 and got["retry-after"] == "1"
    assert set(c.workers()) == workers


def test_in_process_sessions_break_across_workers(cluster) -> None:
    c = cluster("--workers", "2", *SERVE, env=example_env("memory"), workers=2)
    client = Client(c.port)

    workers = client.visits(20)
    assert len(workers) == 2, f"20 new connections all landed on {workers}"
    counts = [visits for visits, _ in client.seen]
    # Each worker knows only the sessions it created: landing on the other worker starts over.
    assert max(counts) < 20 and counts.count(1) >= 2, counts
    switches = [i for i in range(1, 20) if client.seen[i][1] != client.seen[i - 1][1]]
    assert switches and all(client.seen[i][0] == 1 for i in switches), client.seen

    old = set(c.workers())
    c.signal(signal.SIGHUP)
    wait_for(reload_done(c, old), 30, what="the rolling reload")
    assert client.visit()[0] == 1  # every session left with the old workers


def test_any_session_cookie_is_a_fresh_session(cluster) -> None:
    """A client-chosen id is never adopted: any cookie gets visit 1 and a new id, never a 5xx."""
    c = cluster("--workers", "1", *SERVE, env=example_env("memory"))

    @settings(max_examples=40, deadline=None, database=None)
    @given(cookie=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300))
    def check(cookie: str) -> None:
        status, got, body = http_get(c.port, "/", headers={"Cookie": f"session={cookie}"})
        assert status == 200, (status, body)
        assert json.loads(body)["visits"] == 1
        issued = got["set-cookie"].split(";", 1)[0].split("=", 1)[1]
        assert issued != cookie and len(issued) == 32

    check()
