"""`--cpu-affinity auto` inside a worker: on its slot's CPU while its traffic is keep-alive.

A threaded WSGI worker hands every request from its event loop to a view thread and the
response back: two thread wake-ups, which cost 49.8 us of CPU per round trip when the
threads sit on different CPUs of this kind of machine and 13.7 us on one
(bench/thread_wake.py). Pinned to one CPU (the loop thread and every view thread: they
inherit it), Flask on keep-alive connections went from 0.86x to 1.16x granian's throughput
and a view sleeping 5 ms from 0.74x to 0.92x (bench/results/apps/2026-12-03-affinity.md).
With a connection per request it went the other way (0.79x to 0.54x): the accept, the
handshake and the close are kernel work the loop thread does beside the views, which a
second CPU absorbs. So the worker starts pinned (most WSGI traffic comes through a proxy
or load balancer that keeps its upstream connections alive), counts requests and new
connections over a window, and stays pinned only while requests outnumber connections,
with hysteresis so that it does not flap. An ASGI worker (or `--wsgi-dispatch loop`) has
no hand-off per request, and pinning it measured no gain: `auto` leaves it free; `always`
pins every worker at start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("hello_cluster.worker")

# Seconds of traffic each decision looks at: three of the worker's 0.1 s ticks, so that a
# worker started pinned into a connection per request leaves its CPU within 0.3 s.
WINDOW = 0.3
PIN_AT = 4.0  # requests per new connection at or above which the worker pins itself
UNPIN_AT = 2.0  # at or below which it lets the kernel move it again
MIN_REQUESTS = 30  # fewer in a window (100 a second): too little traffic to matter


def verdict(pinned: bool, requests: int, connections: int) -> bool:
    """Pure: pinned or not after a window that served `requests` on `connections` new ones."""
    if requests < MIN_REQUESTS:
        return pinned
    per_connection = requests / max(1, connections)
    if pinned:
        return per_connection > UNPIN_AT
    return per_connection >= PIN_AT


def set_all_threads(cpus: set[int]) -> str | None:
    """Every thread of this process onto `cpus` (threads started later inherit the mask of
    the thread that starts them); why not, if the kernel refused."""
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
    except OSError as err:
        return f"could not set the CPU affinity ({err.strerror})"
    return None


@dataclass
class Pinner:
    """The worker's state: its slot's CPU, the mask it had before, and the last window."""

    cpu: int
    free: set[int]  # the mask it started with: where it goes back to
    pinned: bool = False
    since: float | None = None  # the start of the window (None: before the first tick)
    requests: int = 0
    connections: int = 0
    failed: bool = False  # the kernel refused once: stay as we are, say it once

    @classmethod
    def start(cls, cpu: int) -> Pinner:
        """Pinned from the start: most traffic reaches a WSGI app through a proxy or load
        balancer that keeps its upstream connections alive, where pinning measured 1.48x;
        a connection per request unpins it after one window (WINDOW), where pinning
        measured 0.54-0.93x."""
        pinner = cls(cpu, os.sched_getaffinity(0))
        if pinner.move(True):
            log.debug("pinned to CPU %d from the start (--cpu-affinity auto)", cpu)
        return pinner

    def move(self, pinned: bool) -> bool:
        """Onto the slot's CPU or back to the starting mask; False (and `failed`, said once,
        every thread back where it started) if the kernel refused: the CPU left our cpuset,
        or a seccomp filter denies the call."""
        refused = set_all_threads({self.cpu} if pinned else self.free)
        if refused is not None:
            self.failed = True
            set_all_threads(self.free)
            log.warning("%s; --cpu-affinity auto stays off in this worker", refused)
            return False
        self.pinned = pinned
        return True

    def tick(self, now: float, requests: int, connections: int) -> None:
        """Called from the worker's 0.1 s tick with its running totals."""
        if self.failed:
            return
        if self.since is None:
            self.since, self.requests, self.connections = now, requests, connections
            return
        if now - self.since < WINDOW:
            return
        served, made = requests - self.requests, connections - self.connections
        self.since, self.requests, self.connections = now, requests, connections
        wanted = verdict(self.pinned, served, made)
        if wanted == self.pinned:
            return
        if not self.move(wanted):
            return
        log.info("%s (%d requests on %d new connections in the last %.1f s)",
                 f"pinned to CPU {self.cpu}" if wanted else "unpinned", served, made, WINDOW)
