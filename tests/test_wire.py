"""Wire-level behaviour of the workers' HTTP protocols, `--http fast` and `--http uvicorn`.

The same battery runs against both (one single-worker cluster each, module-scoped): request
smuggling shapes, a 1000-request pipeline, `Expect: 100-continue`, a 100 MB upload, a client
leaving mid-body, HEAD, 204/304, a slow reader of a large response (flow control), a
websocket upgrade, the keep-alive timeout, and the request metrics. Everything goes over
loopback with raw sockets, every read has a deadline, and the clusters are killed at the
end whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Cluster, run_cli, wait_for

PROTOCOLS = ["fast", "uvicorn"]
DEADLINE = 30.0  # seconds for any one exchange
SMUGGLED = b"GET /echo?smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
# name -> a request whose body framing is ambiguous, followed by a request hidden in it.
# llhttp refuses every one of them; the hidden request must never be answered.
SMUGGLING = {
    "content-length and transfer-encoding": b"POST /echo HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding xchunked": b"POST /echo HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "xchunked with content-length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: xchunked\r\n\r\nabc",
    "chunked, identity": b"POST /echo HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "duplicate content-length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 40\r\n\r\nabc",
    "LF-only line ends": b"POST /echo HTTP/1.1\nHost: x\nContent-Length: 3\n\nabc",
    "obs-fold": b"POST /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nContent-Length: 3\r\n\r\nabc",
    "space before colon": b"POST /echo HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "signed content-length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
}


@pytest.fixture(scope="module", params=PROTOCOLS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("wire"),
                ["--app", "hc_wire:app", "--workers", "1", "--http", request.param,
                 "--keep-alive-timeout", "1s"])
    try:
        c.wait_ready(1)
        yield c
    finally:
        c.kill_all()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    chunks, deadline = [], time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class Reader:
    """Reads HTTP/1.1 responses off a socket: content-length, chunked, or no body."""

    def __init__(self, s: socket.socket) -> None:
        self.s, self.buf = s, b""

    def _fill(self) -> None:
        chunk = self.s.recv(1 << 16)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_only: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(b":", 1) for line in lines[1:])}
        if head_only or status in (100, 204, 304):
            return status, headers, b""
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    self._line()
                    return status, headers, body
                body += self._take(size)
                self._take(2)
        return status, headers, self._take(int(headers.get(b"content-length", b"0")))


def exchange(port: int, payload: bytes) -> bytes:
    with connect(port) as s:
        s.sendall(payload)
        return read_until_closed(s)


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shapes_are_refused(server: Cluster, shape: str) -> None:
    answer = exchange(server.port, SMUGGLING[shape] + SMUGGLED)
    # 400 where llhttp refuses the framing, 501 for a coding it took but we do not decode
    # (`xchunked` alone: RFC 9112 6.1); either way the connection closes unread
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 501 ")), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1 and b"smuggled" not in answer, answer
    assert server.get("/")[0] == 200  # and the worker is fine


def test_pipeline_of_1000_answered_in_order(server: Cluster) -> None:
    with connect(server.port) as s:
        s.sendall(b"".join(b"GET /echo?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                           for i in range(1000)))
        reader = Reader(s)
        for i in range(1000):
            status, _, body = reader.response()
            assert status == 200 and json.loads(body)["query"] == f"i={i}"


def test_expect_100_continue(server: Cluster) -> None:
    body = b"x" * 5000
    with connect(server.port) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 5000\r\n\r\n")
        reader = Reader(s)
        assert reader.response()[0] == 100  # asked for the body: the app called receive()
        s.sendall(body)
        status, _, answer = reader.response()
        assert status == 200 and json.loads(answer)["length"] == 5000


def worker_rss_kib(server: Cluster) -> int:
    return int(server.get("/rss")[2])


def test_upload_of_100_mb_is_streamed(server: Cluster) -> None:
    size, block = 100 * 1024 * 1024, bytes(range(256)) * 4096  # 1 MiB
    before = worker_rss_kib(server)
    with connect(server.port) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            s.sendall(block)
        status, _, answer = Reader(s).response()
    echo = json.loads(answer)
    assert status == 200 and echo["length"] == size
    assert echo["sha256"] == hashlib.sha256(block * (size // len(block))).hexdigest()
    assert worker_rss_kib(server) - before < 32 * 1024  # read as it came, never all held


def test_client_leaving_mid_body_is_seen_by_the_app(server: Cluster) -> None:
    before = server.get("/seen")[2].count(b"disconnect")
    with connect(server.port) as s:
        s.sendall(b"POST /disconnect HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                  + b"y" * 1000)
        time.sleep(0.2)
    wait_for(lambda: server.get("/seen")[2].count(b"disconnect") == before + 1, 10,
             what="the app to receive http.disconnect")


def test_head_and_bodiless_statuses_keep_the_connection_in_sync(server: Cluster) -> None:
    with connect(server.port) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /status?code=204 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /status?code=304 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /echo?after HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = Reader(s)
        status, headers, _ = reader.response(head_only=True)
        assert status == 200 and headers[b"content-length"] == b"43"  # the GET's length
        for code in (204, 304):
            status, headers, _ = reader.response()
            assert status == code and b"transfer-encoding" not in headers
            assert b"content-length" not in headers
        status, _, body = reader.response()  # no stray body bytes were in between
        assert status == 200 and json.loads(body)["query"] == "after"


def test_slow_reader_does_not_make_the_worker_buffer(server: Cluster) -> None:
    before = worker_rss_kib(server)
    with connect(server.port) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /big?mb=96 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.5)  # not reading: the app must be held in send(), not buffered
        grown = worker_rss_kib(server) - before  # a second connection: the worker answers
        status, _, body = Reader(s).response()
    assert grown < 32 * 1024, f"worker grew {grown} KiB while the client did not read"
    assert status == 200 and len(body) == 96 << 20


def test_response_head_is_not_held_while_the_app_waits(server: Cluster) -> None:
    """--http fast holds a head for its body (one write); not while the app waits."""
    with connect(server.port) as s:
        started = time.monotonic()
        s.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(0.8)
        first = s.recv(1 << 16)  # the head, well before the body's second
        assert first.startswith(b"HTTP/1.1 200 "), first
        assert time.monotonic() - started < 0.8
        s.settimeout(DEADLINE)
        reader = Reader(s)
        reader.buf = first
        status, headers, body = reader.response()
        assert body == b"late" and headers[b"transfer-encoding"] == b"chunked"


def test_websocket_upgrade_is_handed_over(server: Cluster) -> None:
    from websockets.sync.client import connect as ws_connect

    with ws_connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10,
                    close_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"


def test_idle_keep_alive_connection_is_closed(server: Cluster) -> None:
    with connect(server.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert Reader(s).response()[0] == 200
        started = time.monotonic()
        assert read_until_closed(s) == b""  # --keep-alive-timeout 1s
        assert 0.5 < time.monotonic() - started < 5


def test_request_metrics_count_what_was_served(server: Cluster) -> None:
    name = 'hello_cluster_http_requests_total{method="PUT",status="200"}'
    with connect(server.port) as s:
        for _ in range(3):
            s.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz")
            assert Reader(s).response()[0] == 200
    wait_for(lambda: server.metric(name) == 3, 5, what="three PUTs counted")


def test_requests_in_progress_gauge(server: Cluster) -> None:
    name = "hello_cluster_http_requests_in_progress"
    with connect(server.port) as s:
        s.sendall(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")  # its app runs for 1 s
        wait_for(lambda: server.metric(name) == 1, 0.9, interval=0.02,
                 what="the running request in the gauge")
        assert Reader(s).response()[2] == b"late"
    wait_for(lambda: server.metric(name) == 0, 5, what="the gauge back at 0")


def test_http_option_refuses_unknown_values(tmp_path: Path) -> None:
    done = run_cli("--http", "h2", "--metrics-bind", "off")
    assert done.returncode == 2 and "--http" in done.stderr and "fast, uvicorn" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = run_cli("--metrics-bind", "off", env={"HELLO_CLUSTER_HTTP": "quick"})
    assert done.returncode == 2 and "HELLO_CLUSTER_HTTP" in done.stderr
