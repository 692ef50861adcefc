"""What the master's port answers: /metrics, /status, /livez and /readyz.

The endpoint (observe/endpoint.py) reads requests in the master's selector and calls
`Answers.answer` for each; every answer is built from the pool (supervisor/pool.py) at that
moment, in the loop's thread, between two of its turns. A scrape that fails is a 500, never
an exception out of the loop: nothing a client of this port does may stop supervision.
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass

from hello_cluster.observe.endpoint import Endpoint, Response
from hello_cluster.observe.metrics import PoolStats, master_registry
from hello_cluster.observe.scrape import RenderFailed, Scrapes, choose_format
from hello_cluster.observe.status_page import PoolSnapshot, slot_samples, status_response

log = logging.getLogger("hello_cluster.master")

FAILED = b"collecting metrics failed; see the log\n"


@dataclass
class Answers:
    scrapes: Scrapes
    snapshot: Callable[[], PoolSnapshot]
    readiness: Callable[[], tuple[bool, str]]
    clock: Callable[[], float]

    def answer(self, path: str, accept: str) -> Response:
        if path == "/metrics":
            fmt = choose_format(accept)  # the client picks one of ours; its bytes stay out
            try:
                body = self.scrapes.body(fmt, self.clock())
            except RenderFailed:
                return Response(500, FAILED)
            except Exception:  # a scrape must never take supervision down
                log.exception("collecting metrics failed")
                return Response(500, FAILED)
            return Response(200, body, fmt.content_type)
        if path == "/status":
            return status_response(self.snapshot())
        if path == "/livez":
            return Response(200, b"ok: master loop turning\n")
        if path == "/readyz":
            ok, why = self.readiness()
            return Response(200 if ok else 503, why.encode() + b"\n")
        return Response(404, b"not found: try /metrics, /status, /livez or /readyz\n")


def open_endpoint(sock: socket.socket, selector: selectors.BaseSelector,
                  pool_stats: Callable[[], PoolStats], multiproc_dir: str | None,
                  snapshot: Callable[[], PoolSnapshot],
                  readiness: Callable[[], tuple[bool, str]],
                  clock: Callable[[], float]) -> Endpoint:
    """The master's port on `sock`, served from `selector`: the registry (the pool's
    gauges, the workers' multiprocess files, the per-slot samples) and the answers."""
    registry = master_registry(pool_stats, multiproc_dir, lambda: slot_samples(snapshot()))
    answers = Answers(Scrapes(registry, pool_stats), snapshot, readiness, clock)
    return Endpoint(sock, selector, lambda method, path, accept: answers.answer(path, accept))
