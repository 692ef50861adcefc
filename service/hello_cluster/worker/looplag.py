"""How late a worker's event loop runs its 0.1 s tick: hello_cluster_event_loop_lag_seconds.

uvicorn's main loop sleeps 0.1 s between ticks; a tick that comes later than that means the
loop was busy (or blocked) for the difference. Node exposes the same figure
(`monitorEventLoopDelay`); gunicorn and uvicorn cannot see a blocked loop at all.

Each worker records into prometheus-client's multiprocess files (one observe per tick,
ten a second), and the master sums them with the request metrics. A loop blocked for B
seconds shows one tick late by between B - 0.1 and B seconds (the block may begin anywhere
in the 0.1 s sleep).
"""

from __future__ import annotations

import os
import time

from hello_cluster.observe.metrics import LAG_METRIC as LAG_METRIC  # its name, here too

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def lag(previous: float, now: float, period: float) -> float:
    """Lateness of a tick: the interval since the previous one minus the period, >= 0."""
    return max(0.0, now - previous - period)


class LoopLag:
    """Observes each tick's lateness into a multiprocess histogram."""

    def __init__(self, period: float) -> None:
        from prometheus_client import Histogram

        self.period = period
        self.previous: float | None = None
        # registry=None: only the files matter; the master collects them.
        self.histogram = Histogram(LAG_METRIC,
                                   "How late the worker's event loop ran its 0.1 s tick.",
                                   buckets=LAG_BUCKETS, registry=None)

    @classmethod
    def for_worker(cls, period: float) -> LoopLag | None:
        """None when the metrics endpoint is off (no multiprocess dir to write into)."""
        return cls(period) if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None

    def tick(self, now: float | None = None) -> None:
        # time.monotonic, not uvloop's loop.time(): that one is cached per loop turn in ms.
        now = time.monotonic() if now is None else now
        if self.previous is not None:
            self.histogram.observe(lag(self.previous, now, self.period))
        self.previous = now
