"""WSGI apps in real workers: environ, streaming bodies, blocking views, recycling, drain."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_APPS, clean_env, free_port, http_get, wait_for

WSGI = ("--app", "hc_wsgiapp:app")


def test_wsgi_environ_is_right(cluster) -> None:
    """SCRIPT_NAME from the environment, REMOTE_ADDR behind a trusted proxy, wsgi.errors."""
    c = cluster("--workers", "1", *WSGI, "--forwarded-allow-ips", "127.0.0.1",
                env={"SCRIPT_NAME": "/prefix"}, workers=1)
    seen = json.loads(c.get("/prefix/environ?x=1")[2])
    assert seen == {"SCRIPT_NAME": "/prefix", "PATH_INFO": "/environ", "REMOTE_ADDR": "127.0.0.1",
                    "QUERY_STRING": "x=1", "wsgi.url_scheme": "http", "errors_is_stderr": True}
    proxied = json.loads(c.get("/prefix/environ", headers={
        "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})[2])
    assert proxied["REMOTE_ADDR"] == "203.0.113.7" and proxied["wsgi.url_scheme"] == "https"
    assert c.get("/prefix/errors")[2] == b"written\n"
    # Only a whole leading segment is the mount point.
    assert json.loads(c.get("/prefix?environ")[2])["PATH_INFO"] == ""
    assert json.loads(c.get("/prefixes/x?environ")[2])["PATH_INFO"] == "/prefixes/x"
    wait_for(lambda: "hc_wsgiapp: a line on wsgi.errors" in c.log, 5, what="wsgi.errors line")
    # Not a trusted proxy: X-Forwarded-For is not believed.
    plain = cluster("--workers", "1", *WSGI, workers=1)
    seen = json.loads(plain.get("/environ", headers={"X-Forwarded-For": "203.0.113.7"})[2])
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["SCRIPT_NAME"] == "" and seen["PATH_INFO"] == "/environ"


def _read_until(sock: socket.socket, marker: bytes, limit: int = 65536) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_wsgi_bodies_stream_both_ways(cluster) -> None:
    """The view reads wsgi.input as the client sends it and its output leaves as it is
    yielded: the answer to the first line arrives before the second line is sent."""
    c = cluster("--workers", "1", *WSGI, workers=1)
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"9\r\nline one\n\r\n")
        first = _read_until(s, b"got line one\n")
        assert first.startswith(b"HTTP/1.1 200"), first
        assert b"got line one\n" in first  # while the request body is still open
        s.sendall(b"9\r\nline two\n\r\n0\r\n\r\n")
        rest = _read_until(s, b"0\r\n\r\n")
        assert b"got line two\n" in rest and rest.endswith(b"0\r\n\r\n")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.parametrize("dispatch", ["threads", "loop"])
def test_wsgi_stream_backpressure(cluster, dispatch: str) -> None:
    """A view yielding 48 MiB to a client that reads nothing for a while: the view's thread
    waits (a few chunks are queued, not the stream), and the client then gets every byte.
    With --wsgi-dispatch loop the stream begins on the loop and moves to a pool thread
    once a few chunks wait; either way the loop serves others meanwhile."""
    c = cluster("--workers", "1", *WSGI, "--wsgi-dispatch", dispatch, workers=1)
    pid = c.workers()[0]
    assert c.get("/stream?n=4")[2] == b"x" * 4 * 65536  # warm: the pool thread exists
    before = _rss(pid)
    chunks = 768
    with socket.create_connection(("127.0.0.1", c.port), timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"GET /stream?n={chunks} HTTP/1.1\r\nHost: x\r\n"
                  "Connection: close\r\n\r\n".encode())
        time.sleep(2.0)  # not reading: the socket buffers fill, then the transport pauses
        assert c.get("/", timeout=5)[0] == 200  # the loop is free while the stream waits
        grown = _rss(pid) - before
        assert grown < 16 * 2**20, f"the worker buffered {grown} bytes for a stalled reader"
        received = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = s.recv(1 << 20)
            if not data:
                break
            received += len(data)
    body = chunks * 65536
    assert received > body  # the head and the chunk framing come on top of the body
    assert received < body + chunks * 16 + 4096
    assert c.get("/")[0] == 200
    assert c.workers() == [pid]


@pytest.mark.parametrize("dispatch", ["threads", "loop"])
def test_wsgi_view_that_raises(cluster, dispatch: str) -> None:
    """A view's exception is a 500 with the traceback in the log, and the worker serves on
    (on the loop too: it costs its own request, not the worker)."""
    c = cluster("--workers", "1", *WSGI, "--wsgi-dispatch", dispatch, workers=1)
    pid = c.workers()[0]
    for _ in range(3):
        assert c.get("/boom")[0] == 500
    assert c.get("/")[2] == b"hello from wsgi\n"
    wait_for(lambda: "hc_wsgiapp: boom" in c.log, 5, what="the view's exception in the log")
    assert c.workers() == [pid]


def test_wsgi_view_blocking_past_worker_timeout(cluster) -> None:
    """A view that blocks longer than --worker-timeout holds a thread, not the event loop:
    the worker keeps beating and is not killed; once the pool is full, requests queue."""
    c = cluster("--workers", "1", *WSGI, "--worker-timeout", "1s", "--wsgi-threads", "2",
                workers=1)
    pid = c.workers()[0]
    results: list[tuple[int, float]] = []  # (status, when the answer came)

    def slow() -> None:
        status = c.get("/sleep?s=1.5", timeout=20)[0]
        results.append((status, time.monotonic()))

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(3)]
    for n, t in enumerate(threads, 1):
        t.start()
        c.wait_in_flight(n)  # in this order: the third is the one that waits for a thread
    # While both threads block, the loop turns: the master still steers connections to it.
    wait_for(lambda: c.metric("hello_cluster_workers_steered") == 1, 5, what="still steered")
    for t in threads:
        t.join(timeout=30)
    assert sorted(status for status, _ in results) == [200, 200, 200]
    # Two threads: the third view waited for a free one, so it ran its 1.5 s after the first
    # answer (the first two ran side by side).
    done = sorted(when for _, when in results)
    assert done[2] - done[0] >= 1.4, done
    assert c.workers() == [pid]
    assert c.metric('hello_cluster_worker_restarts_total{reason="timeout"}') == 0
    assert "silent for" not in c.log


def test_wsgi_max_requests_and_drain(cluster) -> None:
    """--max-requests recycles a WSGI worker; SIGTERM lets an in-flight view finish."""
    c = cluster("--workers", "1", *WSGI, "--max-requests", "10", "--graceful-timeout", "10s",
                workers=1)
    first = c.workers()[0]
    for _ in range(12):
        assert c.get("/")[0] == 200
    wait_for(lambda: first not in c.workers() and len(c.workers()) == 1
             and c.metric("hello_cluster_workers_ready") == 1, 10, what="the recycled worker")
    assert "(--max-requests); asking to be replaced" in c.log
    answer: list[int] = []
    t = threading.Thread(target=lambda: answer.append(c.get("/sleep?s=1.5", timeout=20)[0]),
                         daemon=True)
    t.start()
    c.wait_in_flight(1)  # the view is running
    c.signal(signal.SIGTERM)
    t.join(timeout=20)
    assert answer == [200]
    assert c.wait_exit(20) == 0


# ---- what a client sends, fuzzed, against uvicorn --interface wsgi ------------------------

_SAFE = "abcXYZ019-._~!$&'()*+,;=:@/%"
paths = st.text(_SAFE, max_size=40).map(lambda p: "/environ/" + p)
queries = st.text(_SAFE + "?", max_size=30)
lines = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\n"),
                 max_size=5)


def _start_uvicorn(port: int) -> subprocess.Popen[bytes]:
    uvicorn = Path(sys.executable).parent / "uvicorn"
    return subprocess.Popen(
        [str(uvicorn), "hc_wsgiapp:app", "--interface", "wsgi", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--app-dir", str(TEST_APPS)],
        env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/echo", body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("dispatch", ["threads", "loop"])
def test_wsgi_environ_and_bodies_match_uvicorn(cluster, dispatch: str) -> None:
    """Fuzzed paths, queries and bodies: the WSGI app sees what uvicorn --interface wsgi
    gives it (except the two fixes: wsgi.errors, SCRIPT_NAME), and never a 5xx; with
    --wsgi-dispatch loop too (the GETs run on the loop, the POSTs in the pool)."""
    c = cluster("--workers", "1", *WSGI, "--wsgi-dispatch", dispatch, workers=1)
    port = free_port()
    peer = _start_uvicorn(port)
    try:
        wait_for(lambda: http_get(port, "/")[0] == 200, 15, what="uvicorn to serve")

        @settings(max_examples=60, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(path=paths, query=queries, body=lines)
        def same(path: str, query: str, body: list[bytes]) -> None:
            target = f"{path}?{query}" if query else path
            ours, theirs = c.get(target), http_get(port, target)
            assert ours[0] == theirs[0] and ours[0] < 500, (ours, theirs)
            if ours[0] == 200:
                mine, peer_seen = json.loads(ours[2]), json.loads(theirs[2])
                peer_seen["errors_is_stderr"] = True  # a2wsgi hands out stdout: our fix
                assert mine == peer_seen
            data = b"".join(body)
            assert _post(c.port, data) == _post(port, data) == (
                200, b"".join(b"got " + line for line in body))

        same()
    finally:
        os.killpg(peer.pid, signal.SIGKILL)
        peer.wait(timeout=10)
    assert len(c.workers()) == 1 and "Traceback" not in c.log


# ---- --wsgi-dispatch loop: views without a body on the event loop -----------------------

LOOP = (*WSGI, "--wsgi-dispatch", "loop")


def test_loop_dispatch_runs_bodiless_views_on_the_loop(cluster) -> None:
    """GETs run on the worker's main thread; a request with a body, and every view under
    --request-timeout, still runs in the pool; what the view sees and answers is the same."""
    c = cluster("--workers", "1", *LOOP, workers=1)
    assert c.get("/sleep?s=0")[2] == b"slept in MainThread\n"
    assert c.get("/")[2] == b"hello from wsgi\n"
    seen = json.loads(c.get("/environ?x=1")[2])
    assert seen["PATH_INFO"] == "/environ" and seen["QUERY_STRING"] == "x=1"
    assert _post(c.port, b"one\ntwo\n") == (200, b"got one\ngot two\n")  # in a pool thread
    # Content-Length: 0 is no body: on the loop.
    assert c.get("/sleep?s=0", headers={"Content-Length": "0"})[2] == b"slept in MainThread\n"
    timed = cluster("--workers", "1", *LOOP, "--request-timeout", "30s", workers=1)
    assert timed.get("/sleep?s=0")[2].startswith(b"slept in WSGI_")
    plain = cluster("--workers", "1", *WSGI, workers=1)
    assert plain.get("/sleep?s=0")[2].startswith(b"slept in WSGI_")
