"""Hostile clients on the app port and privilege separation: workers stay healthy."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from conftest import need, need_root, wait_for

# every test once per worker protocol (--http uvicorn and fast)
pytestmark = pytest.mark.usefixtures("each_http_protocol")


def raw(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_malformed_and_oversized_requests(cluster) -> None:
    c = cluster("--workers", "2", workers=2)
    workers = set(c.workers())
    assert raw(c.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(c.port, b"GET / HTTP/9.9\r\n\r\n").startswith(b"HTTP/1.1 505")
    assert raw(c.port, b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw(c.port, huge).startswith(b"HTTP/1.1 431")
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 20_000 + b"\r\n"
    assert raw(c.port, many).startswith(b"HTTP/1.1 431")
    assert c.get("/")[0] == 200
    assert set(c.workers()) == workers  # nobody died
    wait_for(lambda: c.metric('hello_cluster_http_requests_total{method="GET",status="200"}')
             >= 1, 3, what="the good request counted")


def test_slowloris_does_not_starve_others(cluster) -> None:
    """200 connections dribbling a request head: others are served; the head times out."""
    c = cluster("--workers", "2", workers=2)
    loris = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\n")
            loris.append(s)
        for _ in range(20):
            assert c.get("/", timeout=5)[0] == 200
        # The head clock (10 s) closes them: read until EOF or 408.
        loris[0].settimeout(15)
        started = time.monotonic()
        data = loris[0].recv(1024)
        assert data.startswith(b"HTTP/1.1 408") or data == b""
        assert time.monotonic() - started < 12
    finally:
        for s in loris:
            s.close()
    assert c.get("/")[0] == 200


def test_workers_drop_privileges(cluster) -> None:
    need_root()
    import pwd

    need(any(p.pw_name == "nobody" for p in pwd.getpwall()), "needs the user 'nobody'")
    c = cluster("--workers", "2", "--user", "nobody", "--group", "nogroup", workers=2)
    assert os.stat(f"/proc/{c.pid}").st_uid == 0  # the master keeps root (it bound, it forks)
    for pid in c.workers():
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(pwd.getpwnam("nobody").pw_uid)}
        assert "CapEff:\t0000000000000000" in status
    assert c.get("/")[0] == 200
    wait_for(lambda: c.metric(
        'hello_cluster_http_requests_total{method="GET",status="200"}') >= 1, 3,
        what="request metrics written by unprivileged workers")


def test_metrics_expose_no_secrets(cluster, tmp_path: Path) -> None:
    c = cluster("--workers", "1", "--runtime-dir", str(tmp_path),
                env={"HC_SECRET_TOKEN": "s3cr3t-value"}, workers=1)
    for path in ("/metrics", "/livez", "/readyz", "/nope"):
        _, headers, body = c.metrics_get(path)
        text = body.decode()
        assert "s3cr3t" not in text and str(tmp_path) not in text
        assert "PYTHONPATH" not in text and "/work" not in text
    # Oversized request heads and slow clients are cut off (size and time caps).
    with socket.create_connection(("127.0.0.1", c.metrics_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
        reply = s.recv(1024)
        assert reply.startswith(b"HTTP/1.1 431") or reply.startswith(b"HTTP/1.1 400")
