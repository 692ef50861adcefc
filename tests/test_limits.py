"""The app port's limits (README "Limits"): what each one refuses, and what it must not.

The head limit applies to the request head alone, never to a body or to the requests of a
pipeline; a worker at --limit-concurrency makes room by closing idle connections, oldest
first, and answers 503 only when every connection has a request in flight.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import need
from hello_cluster.http.policy import (
    FD_RESERVE,
    HEAD_TIMEOUT,
    MAX_HEAD_BYTES,
    connection_limit,
    unread_bytes,
)

# every test once per worker protocol (--http uvicorn and fast)
pytestmark = pytest.mark.usefixtures("each_http_protocol")
ECHO = ("--app", "hc_echo:app")


def recv_all(s: socket.socket, limit: float = 10.0) -> bytes:
    s.settimeout(limit)
    chunks = []
    try:
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def test_open_head_refused_as_soon_as_it_passes_the_limit(cluster) -> None:
    """A head that never ends, sent in pieces: 431 once it passes the limit (it may be
    up to one read past it), long before the head timeout."""
    c = cluster("--workers", "1", *ECHO, workers=1)
    with socket.create_connection(("127.0.0.1", c.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        sent = 0
        try:
            for _ in range(MAX_HEAD_BYTES // 4096 + 80):  # up to 64 KiB + 320 KiB
                s.sendall(b"X-Pad: " + b"p" * 4086 + b"\r\n")
                sent += 4096
                time.sleep(0.002)  # separate reads
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = recv_all(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    assert time.monotonic() - started < HEAD_TIMEOUT / 2
    assert c.get("/")[0] == 200


def test_pipelined_heads_measured_alone(cluster) -> None:
    """After a 1 MiB body in the same send: a 60 KB head is served, a 70 KB one gets 431.
    (Counting bytes per read would refuse both: the body is in the reads.)"""
    c = cluster("--workers", "1", *ECHO, workers=1)
    body = b"b" * (1 << 20)
    upload = b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    for pad, served in ((60_000, True), (70_000, False)):
        big = b"GET /big HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n"
        with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
            s.sendall(upload + big + b"GET /end HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            reply = recv_all(s)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
        assert b"POST /u - 1048576 " in reply, reply[:300]
        if served:
            assert statuses == [b"200", b"200", b"200"] and b"GET /big - 0 " in reply
        else:
            # Refused. The upload's answer was still being written when the oversized
            # head was parsed: the 431 follows it, never inside it, and the connection closes.
            assert statuses == [b"200", b"431"] and b"GET /big" not in reply


def test_oversized_head_behind_requests_in_flight(cluster) -> None:
    """A 70 KB head pipelined behind a slow request and a queued one, then more bytes
    while they are answered: both are answered whole, then the 431 (the error for request
    n+1 follows response n, never inside it), then the connection closes."""
    c = cluster("--workers", "1", *ECHO, workers=1)
    big = b"GET /big HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 70_000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /queued HTTP/1.1\r\nHost: t\r\n\r\n" + big)
        time.sleep(0.3)  # the slow request is being answered: these bytes come behind it
        with contextlib.suppress(OSError):
            s.sendall(b"GET /more HTTP/1.1\r\nHost: t\r\n\r\n" * 100)
        reply = recv_all(s)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", reply) == [b"200", b"200", b"431"], reply[:400]
    queued, refusal = reply.split(b"HTTP/1.1 431 ")
    assert queued.endswith(b"GET /queued - 0 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca49"
                           b"5991b7852b855\n")
    assert b"connection: close" in refusal


def test_connection_limit_follows_the_fd_limit() -> None:
    assert connection_limit(1000, 1_000_000) == 1000
    assert connection_limit(1000, 1024) == 1024 - FD_RESERVE
    assert connection_limit(1000, 10) == 1
    assert connection_limit(1000, resource.RLIM_INFINITY) == 1000


def test_unread_bytes_sees_what_the_loop_has_not_read() -> None:
    """make_room skips a connection whose next request waits in the kernel: the check
    works on a real uvloop transport (the event order that needs it cannot be forced
    from outside a worker)."""
    import asyncio

    import uvloop

    seen: list[int] = []

    class Paused(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_later(0.2, lambda: seen.append(unread_bytes(self)))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Paused, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.sleep(0.1)
            s.sendall(b"x" * 1234)  # arrives while reading is paused
            await asyncio.sleep(0.3)
        server.close()

    uvloop.run(main())
    assert seen == [1234]


@contextmanager
def silent_connections(port: int, count: int, keep_up: bool) -> Iterator[list[int]]:
    """`count` connections that send the first byte of a head and then nothing (a
    slowloris: a connection that sends nothing at all waits in the kernel under
    --defer-accept, see test_a_silent_connection_waits_in_the_kernel); with keep_up, a
    thread reopens each one the server closes (an attacker who keeps the flood up).
    Yields [reopened]."""
    sel = selectors.DefaultSelector()
    stop = threading.Event()
    reopened = [0]

    def open_one() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"G")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)

    def keep() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                sel.unregister(key.fileobj)
                key.fileobj.close()
                if keep_up and not stop.is_set():
                    open_one()
                    reopened[0] += 1

    try:
        for _ in range(count):
            open_one()
        thread = threading.Thread(target=keep, daemon=True)
        thread.start()
        yield reopened
    finally:
        stop.set()
        if "thread" in locals():
            thread.join(timeout=10)
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


def real_requests(port: int, count: int) -> list[int]:
    statuses = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/real")
            statuses.append(conn.getresponse().status)
        except (OSError, http.client.HTTPException) as err:
            statuses.append(-1)
            print(f"request failed: {err!r}")
        finally:
            conn.close()
    return statuses


def test_idle_connections_make_room_for_requests(cluster) -> None:
    """The mechanism at a small scale: 300 idle connections (a head begun, then silence)
    against a limit of 50. A request in flight is never closed to make room; 503 only
    when all are busy."""
    c = cluster("--workers", "1", "--limit-concurrency", "50", *ECHO, workers=1)
    slow = http.client.HTTPConnection("127.0.0.1", c.port, timeout=15)
    slow.request("GET", "/slow?s=2")
    time.sleep(0.2)  # it is in flight
    with silent_connections(c.port, 300, keep_up=True) as reopened:
        time.sleep(0.5)
        statuses = real_requests(c.port, 30)
        # Never a 503 while idle connections can make room. At this small scale (300
        # reopening silent connections against 50 places, the set turning over every few
        # ms) a fresh connection can itself be the oldest idle one for an instant before
        # its request bytes are read, and be closed: at most one such loss is allowed here
        # (README, Limits). The default-scale test below allows none.
        assert statuses.count(200) >= 29 and 503 not in statuses, statuses
        assert reopened[0] > 0  # the server closed idle ones to make room
    assert slow.getresponse().status == 200
    slow.close()

    busy = [http.client.HTTPConnection("127.0.0.1", c.port, timeout=15) for _ in range(50)]
    try:
        for conn in busy:
            conn.request("GET", "/slow?s=3")
        time.sleep(0.5)
        assert real_requests(c.port, 1) == [503]  # every connection has a request in flight
        assert [conn.getresponse().status for conn in busy].count(200) >= 48
    finally:
        for conn in busy:
            conn.close()


def test_idle_flood_at_default_limit(cluster) -> None:
    """2 workers, the default --limit-concurrency: 2100 idle connections (a head begun,
    then silence), kept up by reopening those the server closes, must not fail a real
    request."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096  # 2100 silent connections, the real ones, and the test's own files
    if soft < want:
        try:  # root (CI) may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):
            need(False, f"needs an open-file limit of {want} for the test process "
                        f"(hard limit {hard}): ulimit -n {want}")
    c = cluster("--workers", "2", *ECHO, workers=2)
    with silent_connections(c.port, 2100, keep_up=True):
        time.sleep(1.0)  # both workers have accepted their share
        statuses = real_requests(c.port, 100)
    assert statuses == [200] * 100, {s: statuses.count(s) for s in set(statuses)}


def server_side_states(port: int) -> dict[int, str]:
    """The TCP states (/proc/net/tcp's hex codes) of the server's ends of the connections
    to `port` on 127.0.0.1, by the client's port: 03 is SYN_RECV (the kernel holds it), 01
    ESTABLISHED."""
    states = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if local == f"0100007F:{port:04X}" and remote != "00000000:0000":
                states[int(remote.split(":")[1], 16)] = state
    return states


@pytest.mark.parametrize("defer", [True, False])
def test_a_silent_connection_waits_in_the_kernel(cluster, defer: bool) -> None:
    """--defer-accept (the default): a connection that has sent nothing stays with the
    kernel (the server's end in SYN_RECV, the client's established) instead of taking a
    worker's place, until the deferral ends; one whose request comes later is answered at
    once. Off, the server's end is established as soon as the client's is."""
    from hello_cluster.system.sockets import DEFER_ACCEPT_S

    c = cluster("--workers", "1", *ECHO, *([] if defer else ["--no-defer-accept"]),
                workers=1)
    silent: list[socket.socket] = []
    try:
        held = 0
        for _ in range(20):  # bounded; each connection is looked at right after it is made
            sock = socket.create_connection(("127.0.0.1", c.port), timeout=5)
            silent.append(sock)
            made = time.monotonic()
            state = server_side_states(c.port).get(sock.getsockname()[1])
            if defer and state == "01":  # established on the server side: only once the
                assert time.monotonic() - made >= 0.5 * DEFER_ACCEPT_S, state  # deferral ended
            elif defer:
                assert state == "03", state
                held += 1
            else:  # the client's last ACK may still be on its way through loopback
                deadline = time.monotonic() + 1
                while state != "01" and time.monotonic() < deadline:
                    time.sleep(0.01)
                    state = server_side_states(c.port).get(sock.getsockname()[1])
                assert state == "01", state
                held += 1
            if held == 3:
                break
        assert held == 3  # a machine too slow to look within the deferral 20 times over
        started = time.monotonic()
        silent[-1].sendall(b"GET /late HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        silent[-1].settimeout(5)
        reply = b""
        while chunk := silent[-1].recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK"), reply
        assert time.monotonic() - started < 0.9  # with its bytes, not at the deferral's end
    finally:
        for sock in silent:
            sock.close()


def test_a_probe_that_connects_and_closes_is_handed_over_at_once() -> None:
    """What --defer-accept relies on, from the kernel: a TCP health check (kubelet's
    tcpSocket probe, a balancer's) connects and closes without a byte, and its FIN hands
    the connection to accept() at once, where a worker reads the EOF; a silent one comes
    after the deferral (DEFER_ACCEPT_S), not never."""
    from hello_cluster.config import BindAddress
    from hello_cluster.system.sockets import DEFER_ACCEPT_S, bind

    server = bind(BindAddress("127.0.0.1", 0), defer_accept=True)
    try:
        port = server.getsockname()[1]
        server.settimeout(0.5)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        conn, _ = server.accept()  # TimeoutError if the probe were held back
        with conn:
            assert conn.recv(1) == b""
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        with silent:
            started = time.monotonic()
            server.settimeout(DEFER_ACCEPT_S + 5)
            conn, _ = server.accept()
            conn.close()
            assert time.monotonic() - started >= DEFER_ACCEPT_S * 0.5
    finally:
        server.close()


def test_every_socket_of_a_steered_group_defers_accept() -> None:
    """A SO_REUSEPORT group gets one socket per worker slot, more with each SIGTTIN: every
    one of them is set as the first was (--defer-accept on or off)."""
    from hello_cluster.config import BindAddress
    from hello_cluster.system.sockets import PortGroup

    for defer in (True, False):
        group = PortGroup.bind(BindAddress("127.0.0.1", 0), 1, defer)
        try:
            group.grow(3)  # what a SIGTTIN to 3 workers does
            values = [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
                      for sock in group.socks]
            assert len(values) == 3 and all((value > 0) == defer for value in values), values
        finally:
            group.close()


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) // 1024


def test_endless_pipeline_is_bounded(cluster) -> None:
    """A client streams pipelined GETs for 3 s and reads the answers. uvicorn resumes
    reading after every answer and queues another read's worth each time (plain uvicorn:
    31 MiB to 1.1 GiB in 8 s); here reading waits until the queue is empty, so memory
    stays flat and the answers keep coming."""
    c = cluster("--workers", "1", *ECHO, workers=1)
    (worker,) = c.workers()
    before = rss_mib(worker)
    answered = [0]
    with socket.create_connection(("127.0.0.1", c.port), timeout=1) as s:
        def read() -> None:
            tail = b""
            try:
                while data := s.recv(1 << 20):
                    answered[0] += (tail + data).count(b"HTTP/1.1 200")
                    tail = data[-11:]  # a match split across reads counts once
            except OSError:
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        burst = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 10_000
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                s.send(burst)
            except TimeoutError:
                pass
        grown = rss_mib(worker) - before
        s.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=5)
    assert grown < 150, f"worker grew by {grown} MiB"
    assert answered[0] > 1000
    assert c.get("/")[0] == 200


def test_keep_alive_connection_dribbling_gets_the_head_timeout(cluster) -> None:
    """After an answer, a client that sends a partial head, or only blank lines (which
    begin no head), a byte a second: closed at the head timeout, not held forever."""
    c = cluster("--workers", "1", *ECHO, workers=1)
    conns = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", c.port), timeout=1)
        s.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = b""
        while not answer.endswith(b"b855\n"):  # the end of the echo's body (empty sha256)
            answer += s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        conns.append(s)
    partial, blank = conns
    started = time.monotonic()
    closed: dict[str, float] = {}
    partial.sendall(b"GET /second HTTP/1.1\r\n")
    while len(closed) < 2 and time.monotonic() - started < HEAD_TIMEOUT + 5:
        for name, s, byte in (("partial", partial, b"X"), ("blank", blank, b"\r\n")):
            if name in closed:
                continue
            try:
                s.sendall(byte)
                s.settimeout(0.01)
                data = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            closed[name] = time.monotonic() - started
            if name == "partial":
                assert data.startswith(b"HTTP/1.1 408") or data == b"", data
        time.sleep(0.5)
    for s in conns:
        s.close()
    assert set(closed) == {"partial", "blank"}, closed
    assert all(HEAD_TIMEOUT - 1 < t < HEAD_TIMEOUT + 3 for t in closed.values()), closed
