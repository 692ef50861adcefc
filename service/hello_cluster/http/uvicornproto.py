"""uvicorn's httptools protocol with what a worker facing any client needs beyond it.

1. A drain that loses no request. On shutdown uvicorn closes every idle keep-alive
   connection at once: a client that sent its next request in that same instant (a load
   balancer, wrk, any busy keep-alive client) gets a reset instead of a response, and so
   does a connection accepted just before the listener closed whose request bytes have not
   been read yet. Here an idle connection gets a short grace: a request that arrives is
   served with `connection: close`, and only a connection that stays silent is closed.
   uvicorn also closes a connection after the response in progress, even when that
   response's head already went out without `connection: close` (a streamed body, a WSGI
   app's chunks from a thread): the client then sends its next request into a closing
   socket. Here such a connection gets the idle grace once its response is complete.
   That is what makes reloads, scale-down and recycling lossless.
2. Limits on the request head. httptools has no size limit and uvicorn no timeout for a
   head that never completes, so one slowloris client could hold a connection forever and a
   huge header block could grow without bound. A head must complete within
   HEAD_TIMEOUT and MAX_HEAD_BYTES, else 408 / 431 and the connection closes.
3. Room for real requests at the connection limit. uvicorn answers 503 to every request
   once a worker holds `--limit-concurrency` connections, however many of them are idle:
   a few thousand connections that send nothing lock real clients out. Here a worker at
   its limit first closes idle connections (no request in flight; a connection still
   waiting for or sending its head counts), oldest first, and answers 503 only when every
   connection is busy.
4. A bounded pipeline. uvicorn resumes reading after every answer even with requests
   still queued, so a client that streams pipelined requests grows the queue without
   bound; here reading waits until the queue is empty (PipelineFlowControl).

The head is told apart from bodies and pipelined requests by httptools' callbacks
(`on_message_begin` .. `on_headers_complete`), not by counting every byte that arrives
between responses: a body sent with its head, or the next requests of a pipeline, are
not head, and are bounded by flow control instead (reading stops while 64 KiB of body
wait for the app, or while pipelined requests wait for the one before them).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import resource
import sys
import termios
from asyncio import TimerHandle
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("hello_cluster.worker")

IDLE_GRACE = 0.5  # seconds an idle connection may still bring one last request when draining
MAX_HEAD_BYTES = 64 * 1024  # request target plus header lines
HEAD_TIMEOUT = 10.0  # seconds from connect (or the start of a later head) to a complete head
FD_RESERVE = 64  # descriptors a worker keeps for everything but client connections
ROOM_LOG_EVERY = 60.0  # seconds between log lines about closing idle connections

_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
        b"connection: close\r\n\r\n")
_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_room_logged = [-ROOM_LOG_EVERY]


class HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over MAX_HEAD_BYTES."""


def head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """The request target plus `name: value\\r\\n` for each header, as parsed."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def expire_slow_heads(connections: Iterable[Any], now: float) -> None:
    """Called from the worker's loop once a second: a timestamp per request head and one
    sweep cost less than arming and cancelling a timer for every request."""
    for conn in list(connections):
        if isinstance(conn, WorkerProtocol) and conn.awaiting_head \
                and now - conn.head_since > HEAD_TIMEOUT:
            conn.head_too_slow()


def connection_limit(configured: int, nofile: int | None = None) -> int:
    """--limit-concurrency, lowered to what the worker's open-file limit can hold.

    Past the fd limit accept() fails, and a connection that is never accepted can neither
    be served nor make an idle one give way: the limit must bite first.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile - FD_RESERVE >= configured:
        return configured
    lowered = max(1, nofile - FD_RESERVE)
    log.warning("--limit-concurrency %d lowered to %d: the open-file limit is %d; raise "
                "LimitNOFILE= / ulimit -n to allow more", configured, lowered, nofile)
    return lowered


def unread_bytes(conn: Any) -> int:
    """Bytes the kernel holds for this connection that the loop has not read yet."""
    sock = conn.transport.get_extra_info("socket")
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, AttributeError):
        return 0
    return int.from_bytes(raw, sys.byteorder)


def make_room(connections: set[Any], keep: Any, limit: int, now: float) -> int:
    """Close idle connections, oldest first, until the worker is below `limit` again.

    A little more than needed (1/64 of the limit): under a flood of new connections the
    sweep then runs once per batch instead of once per connection. A connection whose
    next request already waits in the kernel is not idle, only not read yet: it is
    skipped (one FIONREAD per candidate, only at the limit). Closed connections leave
    the set at once, so uvicorn's limit check that follows sees the room.
    """
    excess = len(connections) - limit + 1 + limit // 64
    idle = sorted((c for c in connections
                   if c is not keep and getattr(c, "idle", False)),  # ours, either --http
                  key=attrgetter("head_since"))
    closed = 0
    for conn in idle:
        if closed >= excess:
            break
        if unread_bytes(conn):
            continue
        conn.transport.close()
        connections.discard(conn)
        closed += 1
    if closed and now - _room_logged[0] >= ROOM_LOG_EVERY:
        _room_logged[0] = now
        log.warning("connection limit (%d, --limit-concurrency) reached: closed %d idle "
                    "connections, oldest first (logged once a minute)", limit, closed)
    return closed


class PipelineFlowControl(FlowControl):
    """uvicorn's flow control, but reading stays paused while pipelined requests wait.

    uvicorn resumes reading after every response and on every `receive()`, even with
    requests still queued; each resume lets one more read (up to 256,000 bytes, about
    14,000 small requests) be parsed into the queue. A client that streams pipelined
    requests and reads the answers grows the queue without bound: plain uvicorn went from
    32 to 860 MiB in 8 s, answering 22 requests (bench/limits.py). A queued request's
    body is complete (the parser has read past it), so nothing waits on the reading
    this withholds.
    """

    def __init__(self, transport: asyncio.Transport, pipeline: Any) -> None:
        super().__init__(transport)
        self._pipeline = pipeline

    def resume_reading(self) -> None:
        if not self._pipeline:
            super().resume_reading()


class WorkerProtocol(HttpToolsProtocol):
    """uvicorn's protocol plus head limits, room at the limit and a lossless drain.

    Head accounting: `_head_open` runs from httptools' on_message_begin to
    on_headers_complete. Bytes of a read that continues an open head are all head
    (`_head_known`, a lower bound: a head past MAX_HEAD_BYTES while still open is refused
    at once). A read in which a head began may also hold the end of a body or earlier
    pipelined requests, so it only raises the upper bound (`_head_bound`); when the head
    completes and that bound could exceed the limit, the parsed head is measured exactly.
    An ordinary request (one read, a small head) costs two comparisons.
    """

    draining = False
    _idle_close: TimerHandle | None = None
    _head_open = False
    _head_new = False  # the open head began in the read being parsed
    _head_known = 0
    _head_bound = 0
    _read = 0  # length of the read being parsed
    _refused = False  # a head was refused: the parser is dead, answer no more
    head_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = PipelineFlowControl(transport, self.pipeline)
        self.head_since = self.loop.time()  # a silent new connection counts from here
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:
            make_room(self.connections, self, limit, self.head_since)

    @property
    def idle(self) -> bool:
        """No request in flight or queued: closing it loses nothing a client sent whole."""
        cycle = self.cycle
        return (cycle is None or cycle.response_complete) and not self.pipeline \
            and not self.transport.is_closing()

    @property
    def awaiting_head(self) -> bool:
        """A head is due: none yet on a fresh connection, or bytes came after the last
        answer (they cancel uvicorn's keep-alive timer, which otherwise applies between
        requests). Bytes that begin no head (blank lines) count too: a client dribbling
        CRLFs would otherwise hold the connection forever."""
        cycle = self.cycle
        return cycle is None or (cycle.response_complete and self.timeout_keep_alive_task is None)

    def head_too_slow(self) -> None:
        if not self.transport.is_closing():
            if self._head_open:
                self.transport.write(_408)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = self._head_new = True
        self._head_known = self._head_bound = 0
        if self.cycle is not None:  # the first head's clock started at connect
            self.head_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._head_open = False
        if self._head_bound + self._read > MAX_HEAD_BYTES \
                and head_size(self.url, self.headers) > MAX_HEAD_BYTES:
            raise HeadTooLarge
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:
            make_room(self.connections, self, limit, self.loop.time())
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, plus the head accounting and the drain.
        self._unset_keepalive_if_required()
        cycle = self.cycle
        self._read = n = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as err:
            if self._refused or isinstance(err.__context__, HeadTooLarge):
                self._refuse_head()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._head_open:  # a head is still incomplete after this read
            if self._head_new:
                self._head_new = False
                self._head_bound = n
            else:
                self._head_bound += n
                self._head_known += n
                if self._head_known > MAX_HEAD_BYTES:
                    self._refuse_head()
                    return
        if self.draining and self.cycle is not cycle and self.cycle is not None:
            # A request that came in after the drain began: answer it, then close. The
            # app's task has not run yet, so the response will carry `connection: close`.
            self.cycle.keep_alive = False

    def _refuse_head(self) -> None:
        """431 and close. Behind requests still being answered (a pipelined oversized
        head), a 431 would land inside their answers: they are answered, the last with
        `connection: close`, and nothing more is read (the parser is dead anyway)."""
        self._refused = True
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the last request parsed, so the last to be answered
        if cycle is None or cycle.response_complete:
            self.transport.write(_431)
            self.transport.close()
        else:
            cycle.keep_alive = False
            self.flow.pause_reading()

    def shutdown(self) -> None:
        self.draining = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._idle_close = self.loop.call_later(IDLE_GRACE, self._close_if_idle)
        elif not cycle.response_started:
            cycle.keep_alive = False  # its head, still to come, will say `connection: close`
        # Otherwise the head already went out promising keep-alive, and the client will send
        # its next request as soon as the body is in: on_response_complete grants the grace.

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.draining and not self.transport.is_closing():
            if self._idle_close is not None:
                self._idle_close.cancel()
            self._idle_close = self.loop.call_later(IDLE_GRACE, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) \
                and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_close is not None:
            self._idle_close.cancel()
        super().connection_lost(exc)


def checked_status(app: Any) -> Any:
    """uvicorn's protocol writes any status an app sends ("200" raises after the response
    began; 101 goes out as an upgrade nobody asked for): refuse it before uvicorn sees it,
    so its cycle answers 500 and the worker serves on, as --http fast does (fastproto's
    FINAL_LINE)."""

    async def checked(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_checked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = message.get("status")
                if type(status) is not int or not 200 <= status <= 599:
                    raise RuntimeError(f"the app's response status {status!r} is not an int "
                                       "from 200 to 599")
            await send(message)

        await app(scope, receive, send_checked)

    return checked

