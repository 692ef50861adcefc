"""The master's own HTTP listener (/metrics, /livez, /readyz), served from its main loop.

No thread and no blocking call: each connection is a non-blocking socket in the master's
selector, parsed by httptools (llhttp, the parser uvicorn's workers use too), bounded in
request size, in time and in number. A client that connects and says nothing, or one byte
a second, only costs a slot until its deadline; supervision never waits on it.

The endpoint is a guest in the supervision loop, so three more rules hold:

- nothing a client sends can raise out of it: every step on a connection runs under a
  guard that drops that connection and logs one line (at most one per 10 s);
- the response head is ours alone: status, reason and headers are constants or numbers,
  never bytes copied from the request;
- its work per loop turn is bounded (64 accepts and about 5 ms): a flood of connections
  waits in the kernel's queue, not in front of the worker pipes and signals. A request
  that arrives complete with its connection (the usual case) is answered right at accept,
  without taking a slot or a trip through the selector. That path costs 20-25 us of the
  master's CPU a scrape (tests/test_scrape_burst.py prints it); with h11 as the parser it
  was 45 us, which a burst of thousands pays in /livez latency.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

log = logging.getLogger("hello_cluster.endpoint")

MAX_REQUEST_BYTES = 8192
MAX_HEADERS = 100  # scrapers send a handful; 1600 tiny ones in 8 KiB cost 140 us to parse
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 128
ACCEPTS_PER_TURN = 64
TURN_BUDGET = 0.005  # seconds of endpoint work per loop turn, then the rest waits a turn
COMPLAIN_EVERY = 10.0  # seconds between two log lines about dropped connections


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str, str, str], Response]  # (method, path, accept) -> Response


class _Request:
    """httptools' callbacks: the parts of a request the endpoint looks at."""

    def __init__(self) -> None:
        self.target = b""
        self.accept: list[bytes] = []
        self.complete = False  # the head is complete (a body, if any, is never read)
        self.headers = 0

    def on_url(self, url: bytes) -> None:
        self.target += url  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1
        if self.headers > MAX_HEADERS:
            raise OverflowError("too many headers")  # stops the parser: answered 431
        if name.lower() == b"accept":
            self.accept.append(value)

    def on_headers_complete(self) -> None:
        self.complete = True


@dataclass
class _Conn:
    sock: socket.socket
    fd: int
    deadline: float
    request: _Request = field(default_factory=_Request)
    parser: httptools.HttpRequestParser = field(init=False)
    received: int = 0  # bytes of the request so far; more than MAX_REQUEST_BYTES: 431
    out: bytes = b""  # the response still to send; empty while reading the request
    closed: bool = False

    def __post_init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self.request)


def encode_response(response: Response, head_only: bool) -> bytes:
    """The bytes of an HTTP/1.1 response; every header name and value is ours (ASCII)."""
    status = HTTPStatus(response.status)
    head = [f"HTTP/1.1 {status.value} {status.phrase}",
            f"content-type: {response.content_type}",
            f"content-length: {len(response.body)}",
            "connection: close", "cache-control: no-store"]
    if response.status == 405:
        head.append("allow: GET, HEAD")
    out = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
    return out if head_only else out + response.body


class Endpoint:
    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 handler: Handler) -> None:
        self.sock = sock
        self.selector = selector
        self.handler = handler
        self.conns: dict[int, _Conn] = {}  # connections waiting on the selector, by fd
        self._turn_started: float | None = None
        self._complained_at = -COMPLAIN_EVERY
        self._unreported = 0
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.selector.unregister(self.sock)
        self.sock.close()

    def next_deadline(self) -> float | None:
        self._turn_started = None  # the master is about to wait: a new turn begins
        return min((c.deadline for c in self.conns.values()), default=None)

    def expire(self, now: float) -> None:
        self._turn_started = None
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self._drop(conn)

    # ---- per loop turn: bounded work ----------------------------------------------------

    def _out_of_time(self) -> bool:
        """True once this turn's budget is spent; what is left stays ready for the next.

        The master starts a turn in next_deadline() and ends it in expire(); should it ever
        stop calling them, a turn older than 20 budgets counts as over, so the endpoint
        goes on working.
        """
        now = time.perf_counter()
        if self._turn_started is None or now - self._turn_started > 20 * TURN_BUDGET:
            self._turn_started = now
            return False
        return now - self._turn_started > TURN_BUDGET

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            if self._out_of_time():
                return
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the client will retry; supervision goes on
            try:
                sock.setblocking(False)
                conn = _Conn(sock, sock.fileno(), time.monotonic() + REQUEST_TIMEOUT)
            except Exception as err:  # the guard's job, before there is a conn
                sock.close()
                self._complain(err)
                continue
            self._guarded(conn)  # most requests arrive with the connection: answer now

    def _on_ready(self, conn: _Conn) -> None:
        if not self._out_of_time():
            self._guarded(conn)

    # ---- one connection: read, answer, write, close -------------------------------------

    def _guarded(self, conn: _Conn) -> None:
        """The last line of defence: nothing on one connection reaches the master's loop."""
        try:
            if conn.out:
                self._write(conn)
            else:
                self._read(conn)
        except Exception as err:  # by design; logged, rate-limited
            self._drop(conn)
            self._complain(err)

    def _complain(self, err: Exception) -> None:
        now = time.monotonic()
        if now - self._complained_at < COMPLAIN_EVERY:
            self._unreported += 1
            return
        more = f" ({self._unreported} more since the last report)" if self._unreported else ""
        # ascii() and a cap: the message may carry client bytes, which must not forge lines.
        log.warning("metrics endpoint dropped a connection: %s: %s%s",
                    type(err).__name__, ascii(str(err))[:200], more)
        self._complained_at, self._unreported = now, 0

    def _read(self, conn: _Conn) -> None:
        try:
            # Never more than the limit and one byte: the head must end within the limit.
            data = conn.sock.recv(MAX_REQUEST_BYTES + 1 - conn.received)
        except (BlockingIOError, InterruptedError):
            self._wait(conn, selectors.EVENT_READ)
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)  # gone before finishing a request: nobody to answer
            return
        conn.received += len(data)
        try:
            conn.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the head is complete; what follows is a protocol we do not speak
        except httptools.HttpParserError:
            if conn.request.headers > MAX_HEADERS:
                self._respond(conn, Response(431, b"too many headers\n"), head_only=False)
                return
            if not conn.request.complete:  # a client's fault is a 400, never a 5xx
                self._respond(conn, Response(400, b"bad request\n"), head_only=False)
                return
        if not conn.request.complete:
            if conn.received > MAX_REQUEST_BYTES:
                self._respond(conn, Response(431, b"request head too large\n"),
                              head_only=False)
            else:
                self._wait(conn, selectors.EVENT_READ)
            return
        if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._drop(conn)  # reset while its request waited: skip the work
            return
        method = conn.parser.get_method().decode("ascii", "replace")
        target = conn.request.target.decode("ascii", "replace").split("?", 1)[0]
        accept = ", ".join(value.decode("latin-1") for value in conn.request.accept)
        if method not in ("GET", "HEAD"):
            response = Response(405, b"method not allowed\n")
        else:
            try:
                response = self.handler(method, target, accept)
            except Exception:  # our bug, not the client's: logged, 500
                log.exception("metrics endpoint handler failed")
                response = Response(500, b"internal error\n")
        self._respond(conn, response, head_only=method == "HEAD")

    def _respond(self, conn: _Conn, response: Response, head_only: bool) -> None:
        conn.out = encode_response(response, head_only)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._wait(conn, selectors.EVENT_WRITE)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._drop(conn)

    def _wait(self, conn: _Conn, events: int) -> None:
        """Park the connection in the selector until it can go on (taking a slot)."""
        if conn.fd in self.conns:
            self.selector.modify(conn.sock, events, lambda c=conn: self._on_ready(c))
            return
        if len(self.conns) >= MAX_CONNECTIONS:
            self._drop(min(self.conns.values(), key=lambda c: c.deadline))
        self.conns[conn.fd] = conn
        self.selector.register(conn.sock, events, lambda c=conn: self._on_ready(c))

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self.conns.pop(conn.fd, None) is not None:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass
