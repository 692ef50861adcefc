"""uvicorn's httptools protocol with a drain that loses no request.

On shutdown uvicorn closes every idle keep-alive connection at once. A client that sent its
next request in that same instant (a load balancer, wrk, any busy keep-alive client) gets a
reset instead of a response; so does a connection accepted just before the listener closed
whose request bytes have not been read yet. Here an idle connection gets a short grace: a
request that arrives is served with `connection: close`, and only a connection that stays
silent is closed. That is what makes reloads, scale-down and recycling lossless.
"""

from __future__ import annotations

from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

IDLE_GRACE = 0.5  # seconds an idle connection may still bring one last request


class DrainingProtocol(HttpToolsProtocol):
    draining = False
    _idle_close: TimerHandle | None = None

    def shutdown(self) -> None:
        self.draining = True
        if self.cycle is None or self.cycle.response_complete:
            self._idle_close = self.loop.call_later(IDLE_GRACE, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) \
                and not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle_close is not None:
            self._idle_close.cancel()
        super().connection_lost(exc)
