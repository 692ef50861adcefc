"""uvicorn's httptools protocol with the two things a worker in a pool needs beyond it.

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
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

IDLE_GRACE = 0.5  # seconds an idle connection may still bring one last request when draining
MAX_HEAD_BYTES = 64 * 1024  # request line plus headers
HEAD_TIMEOUT = 10.0  # seconds from connect (or the previous response) to a complete head

_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
        b"connection: close\r\n\r\n")
_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def expire_slow_heads(connections: Iterable[Any], now: float) -> None:
    """Called from the worker's loop once a second: a timestamp per request head and one
    sweep cost less than arming and cancelling a timer for every request."""
    for conn in list(connections):
        if isinstance(conn, WorkerProtocol) and conn.awaiting_head \
                and now - conn.head_since > HEAD_TIMEOUT:
            conn.head_too_slow()


class WorkerProtocol(HttpToolsProtocol):
    """Only `data_received` is on the per-request path; everything else is derived.

    A head is being read while there is no cycle or the last one is complete, and bytes
    have arrived since (or, on a fresh connection, since it was accepted). `_head_of` is
    the cycle the head being read follows, so a new head is noticed without a hook in
    `on_headers_complete` or `on_response_complete`.
    """

    draining = False
    _idle_close: TimerHandle | None = None
    _head_bytes = 0
    _head_of: Any = None
    head_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_since = self.loop.time()  # a silent new connection counts from here

    @property
    def awaiting_head(self) -> bool:
        cycle = self.cycle
        return (cycle is None or cycle.response_complete) and self._head_of is cycle

    def head_too_slow(self) -> None:
        if not self.transport.is_closing():
            if self._head_bytes:
                self.transport.write(_408)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # these bytes belong to a head
            if self._head_of is not cycle:  # the first bytes of the next request
                self._head_of, self._head_bytes = cycle, 0
                self.head_since = self.loop.time()
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.transport.write(_431)
                self.transport.close()
                return
        super().data_received(data)
        if self.draining and self.cycle is not cycle and self.cycle is not None:
            # A request that came in after the drain began: answer it, then close. The
            # app's task has not run yet, so the response will carry `connection: close`.
            self.cycle.keep_alive = False

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
