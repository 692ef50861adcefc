"""The master's own HTTP listener (/metrics, /livez, /readyz), served from its main loop.

No thread and no blocking call: each connection is a non-blocking socket in the master's
selector, parsed by h11 (a sans-IO HTTP/1.1 library), bounded in request size, in time and
in number. A client that connects and says nothing, or one byte a second, only costs a
slot until its deadline; supervision never waits on it.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

log = logging.getLogger("hello_cluster.endpoint")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 128


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str, str, str], Response]  # (method, path, accept) -> Response


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    parser: h11.Connection = field(
        default_factory=lambda: h11.Connection(h11.SERVER,
                                               max_incomplete_event_size=MAX_REQUEST_BYTES))
    out: bytes = b""


class Endpoint:
    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 handler: Handler) -> None:
        self.sock = sock
        self.selector = selector
        self.handler = handler
        self.conns: dict[int, _Conn] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.selector.unregister(self.sock)
        self.sock.close()

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self.conns.values()), default=None)

    def expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self._drop(conn)

    def _accept(self) -> None:
        for _ in range(64):  # bounded: a flood of connects must not monopolise a loop turn
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the client will retry; supervision goes on
            if len(self.conns) >= MAX_CONNECTIONS:
                oldest = min(self.conns.values(), key=lambda c: c.deadline)
                self._drop(oldest)
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + REQUEST_TIMEOUT)
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, lambda c=conn: self._read(c))

    def _drop(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.parser.receive_data(data)
        try:
            event = conn.parser.next_event()
        except h11.RemoteProtocolError as err:
            self._respond(conn, Response(err.error_status_hint, b"bad request\n"), "GET")
            return
        if event is h11.NEED_DATA:
            if not data:
                self._drop(conn)
            return
        if isinstance(event, h11.Request):
            method = event.method.decode("ascii", "replace")
            target = event.target.decode("ascii", "replace").split("?", 1)[0]
            accept = ""
            for name, value in event.headers:
                if name == b"accept":
                    accept = value.decode("latin-1")
            if method not in ("GET", "HEAD"):
                response = Response(405, b"method not allowed\n")
            else:
                try:
                    response = self.handler(method, target, accept)
                except Exception:  # the endpoint is a guest in the supervision loop
                    log.exception("metrics endpoint handler failed")
                    response = Response(500, b"internal error\n")
            self._respond(conn, response, "HEAD" if method == "HEAD" else "GET")
        else:
            self._drop(conn)

    def _respond(self, conn: _Conn, response: Response, method: str) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))),
                   ("connection", "close"), ("cache-control", "no-store")]
        if response.status == 405:
            headers.append(("allow", "GET, HEAD"))
        writer = h11.Connection(h11.SERVER)
        # h11 renders a response only after it has seen a request, and the reading parser
        # may be in an error state: a fresh one, shown the same method, renders the bytes.
        writer.receive_data(f"{method} / HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        writer.next_event()
        reason = HTTPStatus(response.status).phrase.encode()
        out = writer.send(h11.Response(status_code=response.status, headers=headers,
                                       reason=reason)) or b""
        if method != "HEAD":
            out += writer.send(h11.Data(data=response.body)) or b""
        out += writer.send(h11.EndOfMessage()) or b""
        conn.out = out
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, lambda c=conn: self._write(c))
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(conn)
