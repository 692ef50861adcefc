"""Stall reports: which line blocked the event loop, said while it is still blocked.

The loop cannot report on itself while it is blocked, so a small daemon thread watches its
tick (the 0.1 s uvicorn tick, stamped by `tick`). When the last tick is older than
`--stall-report-after` plus one tick period, the thread reads the loop thread's frames
(sys._current_frames) and logs, once per stall, the innermost frame of the app's own code
(outside the standard library, site-packages and hello-cluster), the whole stack at debug.
The loop's next tick logs how long the stall lasted and observes
hello_cluster_worker_stall_seconds.

The thread sleeps until the moment the current tick would be too old, and re-arms when
it finds a newer tick: while the loop turns it wakes about once per `after` seconds
(once a second by default), reads one float and sleeps again. A loop blocked in a C call
released the GIL, so the thread gets it at once; a loop busy in Python hands it over
within the interpreter's 5 ms switch interval.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from hello_cluster.observe.metrics import STALL_METRIC
from hello_cluster.system import stackdump

log = logging.getLogger("hello_cluster.worker")

STALL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class StallWatch:
    def __init__(self, after: float, period: float) -> None:
        self.after = after
        self.period = period
        self.beat = time.monotonic()
        self.loop_thread = threading.get_ident()  # made from the loop's thread
        self.reported: float | None = None  # the beat a report was made for
        self.where = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hello-cluster stall watch",
                                        daemon=True)
        self.histogram: Any = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import Histogram

            self.histogram = Histogram(
                STALL_METRIC, "How long each reported event loop stall lasted.",
                buckets=STALL_BUCKETS, registry=None)

    @classmethod
    def for_worker(cls, after: float, period: float) -> StallWatch | None:
        return cls(after, period) if after > 0 else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def tick(self, now: float) -> None:
        """From the loop, every tick: stamp, and close a reported stall."""
        reported = self.reported
        if reported is not None:
            self.reported = None
            lasted = max(0.0, now - reported - self.period)
            log.warning("event loop stall ended: blocked for %.1fs, in %s", lasted,
                        self.where, extra={"fields": {"stall_seconds": round(lasted, 3)}})
            if self.histogram is not None:
                self.histogram.observe(lasted)
        self.beat = now

    def _watch(self) -> None:
        # Dump requests go to the main thread (tgkill); keep them off this one too.
        signal.pthread_sigmask(signal.SIG_BLOCK, {stackdump.STACK_SIGNAL,
                                                  stackdump.TASKS_SIGNAL, signal.SIGTERM})
        while not self._stop.is_set():
            beat = self.beat
            wait = beat + self.period + self.after - time.monotonic()
            if wait > 0 or self.reported == beat:
                self._stop.wait(wait if wait > 0 else self.after)
                continue
            self.report(beat, time.monotonic())

    def report(self, beat: float, now: float) -> None:
        frame = sys._current_frames().get(self.loop_thread)  # noqa: SLF001
        frames = stackdump.frames_of(frame)
        del frame
        if self.beat != beat:  # the loop ticked meanwhile: no stall after all
            return
        blamed = stackdump.innermost_app(frames)
        self.where = blamed.short() if blamed is not None else "(no Python frame)"
        self.reported = beat
        blocked = now - beat - self.period
        log.warning("event loop blocked for %.1fs so far (--stall-report-after), in %s",
                    blocked, self.where, extra={"fields": {
                        "blocked_seconds": round(blocked, 3),
                        "frame": stackdump.frame_json(blamed) if blamed else None}})
        if log.isEnabledFor(logging.DEBUG):
            log.debug("the blocked event loop's stack (innermost call last):\n%s",
                      "\n".join(f"  {f}" for f in frames),
                      extra={"fields": {"frames": [stackdump.frame_json(f) for f in frames]}})
