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

5. The RFC refusals, trailers kept out of the headers and bounded, errors that wait for
   the responses owed before them, and answers to a client that half-closed: policy.py
   decides them for both protocols; this class wires them into uvicorn's callbacks.

The head is told apart from bodies and pipelined requests by httptools' callbacks
(`on_message_begin` .. `on_headers_complete`), not by counting every byte that arrives
between responses: a body sent with its head, or the next requests of a pipeline, are
not head, and are bounded by flow control instead (reading stops while 64 KiB of body
wait for the app, or while pipelined requests wait for the one before them).
"""

from __future__ import annotations

import asyncio
import time
from asyncio import TimerHandle
from collections.abc import Iterable
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hello_cluster.http.policy import (
    ACCEPTED,
    HEAD_TIMEOUT,
    IDLE_GRACE,
    INVALID_REQUEST,
    LENIENCIES,
    MAX_HEAD_BYTES,
    MAX_TRAILER_BYTES,
    RESPONSE_400,
    RESPONSE_408,
    RESPONSE_431,
    RESPONSE_HTTP09,
    check_request,
    http09,
    make_room,
    parser_refusal,
    trailer_refusal,
)


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
    _refused = False  # a request was refused: the parser is dead, answer no more
    _owed = b""  # that refusal's answer, written once the responses before it are out
    _eof = False  # the client half-closed: answer what it sent, then close
    _hosts = 0  # Host lines of the open head (policy.check_request), the last in `_host`
    _host = b""
    _te: bytes | None = None
    _body_open = False  # head done, message not yet
    _completed = 0  # messages parsed whole on this connection
    _chunk_open = False  # between on_chunk_header and on_chunk_complete
    _chunk_data = False  # that chunk had data (so it is not the last, and no trailers)
    _trailer_bytes = 0
    _trailer_since = 0.0
    head_since = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parser.set_dangerous_leniencies(**LENIENCIES)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ACCEPTED[0] += 1
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
        CRLFs would otherwise hold the connection forever. A body still arriving after its
        answer is no head: the keep-alive timer was armed again for it."""
        cycle = self.cycle
        return cycle is None or (cycle.response_complete and not self._body_open
                                 and self.timeout_keep_alive_task is None)

    def head_too_slow(self) -> None:
        if not self.transport.is_closing():
            if self._head_open:
                self.transport.write(RESPONSE_408)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = self._head_new = True
        self._head_known = self._head_bound = self._hosts = self._trailer_bytes = 0
        self._trailer_since = 0.0
        self._te = None
        if self.cycle is not None:  # the first head's clock started at connect
            self.head_since = self.loop.time()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_open:  # a trailer field: bounded, never merged into the headers
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > MAX_TRAILER_BYTES:
                raise HeadTooLarge
            return
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp strips leading OWS only (RFC 9112 5.1: both)
        if name == b"host":
            self._hosts += 1
            self._host = value
        elif name == b"expect":
            if value.lower() == b"100-continue":
                self.expect_100_continue = True
        elif name == b"transfer-encoding":
            self._te = value
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_open = False
        if self._head_bound + self._read > MAX_HEAD_BYTES \
                and head_size(self.url, self.headers) > MAX_HEAD_BYTES:
            raise HeadTooLarge
        version, refusal = check_request(
            self.parser.get_http_version(), self.parser.get_method().decode("ascii"),
            self.url, self._hosts, self._host, self._te)
        if refusal is not None:
            raise refusal
        self._body_open = True
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:
            make_room(self.connections, self, limit, self.loop.time())
        super().on_headers_complete()
        if version != self.scope["http_version"]:
            self.scope["http_version"] = version  # HTTP/1.2 and later 1.x: served as 1.1

    def on_body(self, body: bytes) -> None:
        self._chunk_data = True
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._chunk_open = True
        self._chunk_data = False

    def on_chunk_complete(self) -> None:
        self._chunk_open = False

    def on_message_complete(self) -> None:
        self._body_open = False
        self._completed += 1
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self.timeout_keep_alive_task is None \
                and not self.pipeline and not self.transport.is_closing():
            # The rest of a body answered before it was read: its bytes cancelled the
            # keep-alive timer (uvicorn's data_received does); idle again from here.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """The client half-closed: a request it sent whole is still answered, then the
        connection closes (fastproto's eof_received says why)."""
        self._eof = True
        cycle = self.cycle
        if self._body_open or self._head_open:
            return None
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return True
        return None

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, plus the head accounting, the refusals and the drain.
        if self._refused:
            return
        self._unset_keepalive_if_required()
        cycle = self.cycle
        self._read = n = len(data)
        at_start = not self._head_open and not self._body_open
        in_trailers = self._chunk_open and not self._chunk_data
        completed = self._completed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as err:
            if isinstance(err.__context__, HeadTooLarge):
                if self._body_open:
                    self._refuse_body(RESPONSE_431)
                else:
                    self._refuse_head()
            elif self._body_open:
                self.logger.warning(INVALID_REQUEST)
                self._refuse_body(RESPONSE_400)
            else:
                self.logger.warning(INVALID_REQUEST)
                fresh = at_start and self._completed == completed  # the line is data[0:]
                self._refuse_after(parser_refusal(err, data, fresh))
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
            if http09(self.parser.get_http_version(), data):
                self._refuse_after(RESPONSE_HTTP09)
                return
        elif in_trailers and self._chunk_open and not self._chunk_data:
            now = time.monotonic()
            if not self._trailer_since:
                self._trailer_since = now
            self._trailer_bytes += n
            refusal = trailer_refusal(self._trailer_bytes, self._trailer_since, now)
            if refusal is not None:
                self._refuse_body(refusal)
            return
        if self.draining and self.cycle is not cycle and self.cycle is not None:
            # A request that came in after the drain began: answer it, then close. The
            # app's task has not run yet, so the response will carry `connection: close`.
            self.cycle.keep_alive = False

    def _refuse_head(self) -> None:
        self._refuse_after(RESPONSE_431)

    def _refuse_after(self, response: bytes) -> None:
        """`response`, then close, after the responses still owed on the connection (a
        pipeline, a streaming response): an error never lands inside them."""
        self._refused = True
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the last request parsed, so the last to be answered
        if (cycle is None or cycle.response_complete) and not self.pipeline:
            self.transport.write(response)
            self.transport.close()
        else:
            self._owed = response
            self.flow.pause_reading()

    def _refuse_body(self, response: bytes) -> None:
        """The request whose body or trailers are being read is refused: its app sees the
        client leave; the client gets `response` if no response began, else the close."""
        cycle = self.cycle
        if cycle is not None and self.pipeline and self.pipeline[0][0] is cycle:
            self.pipeline.popleft()  # queued, never started: refused in its turn
            self._refuse_after(response)
            return
        self._refused = True
        if self.transport.is_closing():
            return
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self.transport.write(response)
        self.transport.close()

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
        cycle = self.cycle  # the last request parsed: once it is answered, nothing is owed
        if (self._owed or self._eof) and (cycle is None or cycle.response_complete) \
                and not self.transport.is_closing():
            if self._owed:  # a refusal waited for this response, or the client half-closed
                self.transport.write(self._owed)
            self.transport.close()
            return
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
