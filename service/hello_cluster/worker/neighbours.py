"""Helping the next slot's worker with its accept queue while ours is empty.

The steering (balance.py) gives each new connection to one ready worker at random, on that
worker's own socket. Random placement spreads connections evenly but does not look at who is
free: a connection can wait behind a busy or descheduled worker while its sibling sits idle.
With a connection per request (`Connection: close`) that is what kept the steered default
below one shared socket (bench/accept_queues.py: queues at 63/0, the machine 11% idle).

So each worker also watches the socket of the next slot in its group (slot i watches i + 1,
the last watches the first). When connections wait there while our own queue is empty (two
or more, or one that is still there RECHECK later), we open a listener of our own on a
duplicate of that socket for HELP_WINDOW: the event loop's native accept path takes what
waits, as on one shared socket, and the window closes again. A free owner accepts a
connection within microseconds, so on a quiet machine there is nothing to take when we look
and the even spread stays (tests/test_balance.py). A stalled or stopped worker's queue is
emptied by its neighbour instead of waiting for it to turn again. We look on a readable
event, and after a look that found our own queue busy only after RECHECK, so watching costs
a bounded number of wake-ups whatever the rate. listen() on the duplicate only re-sets the
backlog of a socket that already listens, so the group's order, which the steering program
indexes, does not change; closing the window closes the duplicate alone.

Tuned on this machine with `wrk -H "Connection: close"` against 2 workers: windows of 5, 20,
50 and 100 ms with rechecks of 0.5-2 ms gave about 23k, 25-27k, 28.5-29.3k and 28.6-29.8k
req/s (one shared socket: 28-30k).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("hello_cluster.worker")

HELP_WINDOW = 0.05  # seconds a listener on the neighbour's socket stays open per look
RECHECK = 0.001  # our own queue was busy: look again after this, not at the next readable
MIN_WAITING = 2  # fewer waiting: give the owner RECHECK to take it before we do

_TCP_INFO_LEN = 104  # enough of struct tcp_info for tcpi_unacked
_UNACKED = struct.Struct("<I")  # tcpi_unacked, offset 24: a listener's accept queue length


def queued(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (Linux TCP_INFO)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return 0
    return int(_UNACKED.unpack_from(info, 24)[0])


class Helper:
    """Watches the neighbour slot's sockets; opens a short-lived listener on a busy one."""

    def __init__(self, socks: Sequence[socket.socket], own: Sequence[socket.socket],
                 protocol_factory: Callable[[], Any], ssl: Any, backlog: int) -> None:
        self.socks = list(socks)
        self.own = list(own)
        self.factory = protocol_factory
        self.ssl = ssl
        self.backlog = backlog
        self.loop: asyncio.AbstractEventLoop | None = None
        self.servers: dict[int, asyncio.AbstractServer] = {}  # neighbour fd -> open window
        self.stopped = False
        self.windows = 0  # windows opened: said at debug level when the worker drains

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for sock in self.socks:
            self._watch(sock)

    def stop(self) -> None:
        """Draining: no more windows; an open one stops accepting now."""
        self.stopped = True
        log.debug("helped the next slot's worker in %d windows", self.windows)
        if self.loop is None:
            return
        for sock in self.socks:
            self.loop.remove_reader(sock.fileno())
        for server in self.servers.values():
            server.close()
        self.servers.clear()

    def _watch(self, sock: socket.socket) -> None:
        assert self.loop is not None
        if not self.stopped:
            self.loop.add_reader(sock.fileno(), self._look, sock)

    def _look(self, sock: socket.socket, again: bool = False) -> None:
        """Something waits on the neighbour's socket (or a recheck is due): help or not."""
        assert self.loop is not None
        self.loop.remove_reader(sock.fileno())
        if self.stopped:
            return
        if any(queued(own) for own in self.own):
            self.loop.call_later(RECHECK, self._look, sock)  # busy ourselves
            return
        waiting = queued(sock)
        if waiting == 0:
            self._watch(sock)
            return
        if waiting < MIN_WAITING and not again:
            # Likely the owner's next accept; if it still waits after RECHECK, the owner
            # is not turning (busy, descheduled, stalled) and we take it.
            self.loop.call_later(RECHECK, self._look, sock, True)
            return
        self.windows += 1
        self.loop.create_task(self._window(sock))

    async def _window(self, sock: socket.socket) -> None:
        assert self.loop is not None
        helper = sock.dup()
        try:
            server = await self.loop.create_server(self.factory, sock=helper, ssl=self.ssl,
                                                   backlog=self.backlog)
        except OSError as err:
            helper.close()
            log.warning("helping the next slot's worker failed: %s", err)
            return
        if self.stopped:
            server.close()
            return
        self.servers[sock.fileno()] = server
        await asyncio.sleep(HELP_WINDOW)
        if self.servers.pop(sock.fileno(), None) is server:
            server.close()  # closes our duplicate only; the owner's socket stays
            self.loop.call_soon(self._look, sock)  # still waiting there? another window
