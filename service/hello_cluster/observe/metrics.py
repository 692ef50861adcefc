"""Metric names and collection: the master's pool state and the workers' request metrics.

The master's numbers live in the master's own state and are rendered by a custom collector
at scrape time, so supervision never touches prometheus-client objects. Workers record
request metrics with prometheus-client's multiprocess mode (files per pid in a private
directory); the master aggregates them, including workers that have since died.

`PROMETHEUS_MULTIPROC_DIR` must be set before prometheus_client is first imported, which the
CLI does before importing this module.
"""

from __future__ import annotations

import glob
import os
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from hello_cluster import __version__

NAMESPACE = "hello_cluster"
# Observed by each worker (worker/looplag.py), summed by /status: one name for both.
LAG_METRIC = f"{NAMESPACE}_event_loop_lag_seconds"
# Observed by each worker: its stall watch (worker/stalls.py), its request deadline
# (http/deadline.py); the master sums the files like the request metrics.
STALL_METRIC = f"{NAMESPACE}_worker_stall_seconds"
TIMEOUT_METRIC = f"{NAMESPACE}_request_timeouts"  # a counter: exposed with _total
INF = float("inf")
RESTART_REASONS = ("exit", "signal", "timeout", "oom")
RECYCLE_REASONS = ("max_requests", "memory", "lifetime")
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class PoolStats:
    """What the master knows about its pool, as the collector sees it at scrape time."""

    desired: int = 0
    running: int = 0
    ready: int = 0
    spawns: int = 0
    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESTART_REASONS, 0))
    recycles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RECYCLE_REASONS, 0))
    backoff_seconds: float = 0.0
    crash_loop: bool = False
    reloads: int = 0
    steered: int = 0
    stalls: int = 0
    wakeups: int = 0


class PoolCollector:
    """Renders PoolStats; names and help text are the public contract (README lists them)."""

    def __init__(self, stats: Callable[[], PoolStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        yield _gauge("workers_desired", "Worker processes the master wants running.", s.desired)
        yield _gauge("workers_running", "Worker processes alive now.", s.running)
        yield _gauge("workers_ready", "Worker processes accepting connections now.", s.ready)
        yield _gauge("workers_steered",
                     "Worker slots new connections are sent to now (ready, loop turning).",
                     s.steered)
        yield _counter("worker_stalls",
                       "Times a worker's event loop went silent for 0.3 s and new connections "
                       "were steered away from it (blocking code in async handlers).",
                       s.stalls)
        yield _counter("worker_spawns", "Worker processes forked.", s.spawns)
        yield _counter("master_wakeups",
                       "Turns of the master's loop (signals, worker messages, scrapes, "
                       "timers): about 10 a second when idle, whatever the pool size.",
                       s.wakeups)
        restarts = CounterMetricFamily(
            f"{NAMESPACE}_worker_restarts",
            "Unplanned worker deaths that led to a respawn, by reason.", labels=["reason"])
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], s.restarts.get(reason, 0))
        yield restarts
        recycles = CounterMetricFamily(
            f"{NAMESPACE}_worker_recycles",
            "Planned worker replacements (the replacement ready first), by reason.",
            labels=["reason"])
        for reason in RECYCLE_REASONS:
            recycles.add_metric([reason], s.recycles.get(reason, 0))
        yield recycles
        yield _gauge("worker_backoff_seconds",
                     "The longest pending respawn delay now (0 when none is pending).",
                     s.backoff_seconds)
        yield _gauge("crash_loop", "1 when the master gave up on a crash loop.",
                     1 if s.crash_loop else 0)
        yield _counter("reloads", "Rolling reloads started (SIGHUP).", s.reloads)
        info = GaugeMetricFamily(f"{NAMESPACE}_build_info", "hello-cluster version.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{NAMESPACE}_{name}", doc, value=value)


class WorkerFilesCollector(MultiProcessCollector):
    """MultiProcessCollector that skips worker files it cannot read yet.

    prometheus-client creates a .db file and sizes it a moment later, so a scrape can find it
    empty, and a worker killed in that instant leaves it empty for good (client_python
    issue 1199). Such a file holds nothing recorded: skip it rather than fail the scrape.
    """

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) >= 8:
                    files.append(path)
            except OSError:
                continue
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


@dataclass(frozen=True)
class SlotSample:
    """One worker slot as /proc shows it at scrape time (None: no live worker in it)."""

    slot: int  # 0-based; the label is slot + 1
    cpu_seconds: float  # live workers' CPU plus every reaped worker's of this slot
    rss_bytes: int | None = None
    start_time: float | None = None


class SlotCollector:
    """Per-slot memory, CPU and start time, labelled by slot ("1".."N"), never by pid.

    The label set is bounded by the pool size, so cardinality stays bounded however many
    workers come and go; the CPU counter adds the dead workers' time of the slot, so it
    survives respawns (it resets only when the master restarts).
    """

    def __init__(self, slots: Callable[[], list[SlotSample]]) -> None:
        self._slots = slots

    def collect(self) -> Iterable[Metric]:
        rss = GaugeMetricFamily(f"{NAMESPACE}_worker_resident_memory_bytes",
                                "Resident memory of the slot's live worker(s), from /proc.",
                                labels=["slot"])
        cpu = CounterMetricFamily(f"{NAMESPACE}_worker_cpu_seconds",
                                  "User and system CPU time of the slot's workers, past and "
                                  "present, from /proc and wait4.", labels=["slot"])
        start = GaugeMetricFamily(f"{NAMESPACE}_worker_start_time_seconds",
                                  "Start time of the slot's newest live worker, seconds since "
                                  "the epoch.", labels=["slot"])
        for s in self._slots():
            label = [str(s.slot + 1)]
            cpu.add_metric(label, s.cpu_seconds)
            if s.rss_bytes is not None:
                rss.add_metric(label, s.rss_bytes)
            if s.start_time is not None:
                start.add_metric(label, s.start_time)
        yield rss
        yield cpu
        yield start


def master_registry(stats: Callable[[], PoolStats], multiproc_dir: str | None,
                    slots: Callable[[], list[SlotSample]] | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(stats))
    if slots is not None:
        registry.register(SlotCollector(slots))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    if multiproc_dir is not None:
        WorkerFilesCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    return registry


class RequestMetrics:
    """ASGI middleware counting requests in plain Python, flushed to the metric files.

    Writing each request straight into prometheus-client's multiprocess values costs five
    locked mmap writes per request (in-progress up and down, the counter, a bucket, the sum):
    about 6 us, a third of a hello-page request. Here a request costs two dict/list
    increments; `flush()`, called from the worker's loop every tick (0.1 s) and once more
    when it drains, moves the totals into the library's values. A worker SIGKILLed between
    ticks loses at most that last tenth of a second of counts; nothing else changes for
    the scraper.
    """

    def __init__(self, app: Any, registry: CollectorRegistry = REGISTRY) -> None:
        self.app = app
        self.requests = Counter(f"{NAMESPACE}_http_requests", "HTTP requests served.",
                                ["method", "status"], registry=registry)
        self.duration = Histogram(f"{NAMESPACE}_http_request_duration_seconds",
                                  "Time from request start to the end of the response.",
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.in_progress = Gauge(f"{NAMESPACE}_http_requests_in_progress",
                                 "HTTP requests being served now (live workers only).",
                                 multiprocess_mode="livesum", registry=registry)
        self._children: dict[tuple[str, int], Any] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._bounds = list(DURATION_BUCKETS)  # bisect_left gives the bucket Histogram uses
        self._buckets = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        # The run: requests with the same method and status as the one before, each done
        # within the first bucket. `--http fast` counts those (nearly all, on a busy page)
        # with two additions and no tuple or dict; `fold_run` adds them to the rest.
        self.run_method = ""
        self.run_status = 0
        self.run_count = 0
        self.run_sum = 0.0
        self._pending: list[float] = []
        # Bulk-adding bucket counts needs the histogram's values (no public API does it).
        self._bulk = (getattr(self.duration, "_upper_bounds", None) == [*self._bounds, INF]
                      and hasattr(self.duration, "_buckets") and hasattr(self.duration, "_sum"))
        self.in_flight = 0
        # `--http fast` does what observe() does inline (fastproto.Cycle.run), and counts
        # requests in flight from its own tasks at flush time instead of two increments
        # per request.
        self.count_in_flight: Callable[[], int] | None = None

    def _child(self, method: str, status: int) -> Any:
        key = (method, status)
        child = self._children.get(key)
        if child is None:
            label_method = method if method in METHODS else "other"
            # An app's status is anything it sent ("200", 200.0, None): never let it raise here,
            # at the flush, outside any request (a str once killed the worker a second later).
            label_status = str(status) if type(status) is int and 100 <= status <= 599 \
                else "other"
            child = self._children[key] = self.requests.labels(label_method, label_status)
        return child

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        def send_status(message: dict[str, Any]) -> Awaitable[None]:
            # Not a coroutine: it hands back send's own awaitable, one frame less per send.
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)  # type: ignore[no-any-return]

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.in_flight -= 1
            self.observe(scope["method"], status, time.perf_counter() - start)

    def observe(self, method: str, status: int, elapsed: float) -> None:
        """Count one request. `--http fast` calls it for a request outside the run, which
        then becomes the run of this method and status."""
        if self._bulk and (method != self.run_method or status != self.run_status):
            self.fold_run()
            self.run_method, self.run_status = method, status
        key = (method, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._bulk:
            self._buckets[bisect_left(self._bounds, elapsed)] += 1
            self._sum += elapsed
        else:
            self._pending.append(elapsed)

    def fold_run(self) -> None:
        """Add the run's requests to the per-key counts and the first bucket."""
        if self.run_count:
            key = (self.run_method, self.run_status)
            self._counts[key] = self._counts.get(key, 0) + self.run_count
            self._buckets[0] += self.run_count
            self._sum += self.run_sum
            self.run_count, self.run_sum = 0, 0.0

    def counts(self) -> dict[tuple[str, int], int]:
        """Requests counted since the last flush, by (method, status): for the tests."""
        self.fold_run()
        return dict(self._counts)

    def flush(self) -> None:
        """Move what was counted since the last flush into the multiprocess metric files."""
        self.fold_run()
        counts, self._counts = self._counts, {}
        for (method, status), n in counts.items():
            self._child(method, status).inc(n)
        if self._bulk:
            buckets = self.duration._buckets  # noqa: SLF001
            for i, n in enumerate(self._buckets):
                if n:
                    buckets[i].inc(n)
                    self._buckets[i] = 0
            if self._sum:
                self.duration._sum.inc(self._sum)  # noqa: SLF001
                self._sum = 0.0
        else:
            pending, self._pending = self._pending, []
            for elapsed in pending:
                self.duration.observe(elapsed)
        self.in_progress.set(self.in_flight if self.count_in_flight is None
                             else self.count_in_flight())


ARCHIVED_KINDS = ("counter", "histogram")  # values that only add up; gauges are left alone


def worker_gone(directory: str, pid: int) -> None:
    """A reaped worker's files: its live gauges leave the sum (prometheus-client's
    mark_process_dead), its counters and histograms fold into the archive (below)."""
    mark_process_dead(pid, directory)
    archive_dead_worker(directory, pid)


def archive_dead_worker(directory: str, pid: int) -> None:
    """Fold a dead worker's counter and histogram files into one archive file per kind.

    Without this, every worker that ever died leaves its files behind and every scrape
    merges all of them: after months of recycling (--max-requests) or crashes, thousands of
    files read in the master's loop. Summing them into `counter_archive.db` and
    `histogram_archive.db` keeps a scrape's cost proportional to the live workers, and the
    totals unchanged. The master is the only writer of the archive, and scrapes run in the
    same thread, so nothing reads it half-written.
    """
    for kind in ARCHIVED_KINDS:
        dead = os.path.join(directory, f"{kind}_{pid}.db")
        try:
            size = os.path.getsize(dead)
        except FileNotFoundError:
            continue
        if size >= 8:  # an empty file (killed at creation) holds nothing: just remove it
            values = MmapedDict.read_all_values_from_file(dead)
            archive = MmapedDict(os.path.join(directory, f"{kind}_archive.db"))
            try:
                totals = {key: value for key, value, _ in archive.read_all_values()}
                for key, value, timestamp, _ in values:
                    totals[key] = totals.get(key, 0.0) + value
                    archive.write_value(key, totals[key], timestamp)
            finally:
                archive.close()
        os.unlink(dead)
