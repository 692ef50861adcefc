"""The operator's view of the pool: the /status document and the per-slot metric samples.

Both are built from a snapshot the master hands out (`PoolSnapshot`: plain values, no
reference to the master's own objects, so this layer never imports the supervisor) plus
what the kernel and the workers' metric files say at the moment of asking, so the workers
do nothing extra for them. The work is bounded by the pool: one /proc/PID/stat read and
up to three small metric files per live worker (the docs give the measured cost at 128
workers).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client.mmap_dict import MmapedDict

from hello_cluster import __version__
from hello_cluster.observe.endpoint import Response
from hello_cluster.observe.metrics import LAG_METRIC, NAMESPACE, SlotSample
from hello_cluster.system import procstat

REQUESTS = f"{NAMESPACE}_http_requests_total"
IN_FLIGHT = f"{NAMESPACE}_http_requests_in_progress"
JSON = "application/json"


@dataclass(frozen=True)
class WorkerView:
    """One live worker as the master sees it, at the moment of the snapshot."""

    pid: int
    slot: int  # 0-based
    generation: int
    spawned_at: float  # monotonic
    state: str  # starting, ready, stalled, draining or hung (worker_state)
    staying: bool  # not being retired: it holds its slot


@dataclass(frozen=True)
class SlotView:
    restarts: int  # unplanned deaths since the master started
    respawn_at: float  # monotonic; in the past when no respawn is pending


@dataclass(frozen=True)
class PoolSnapshot:
    """What /status and the per-slot samples need of the master, and nothing else."""

    pid: int
    state: str  # starting, running, reloading, stopping
    started_at: float
    desired: int
    ready: int
    reloads: int
    restarts: int
    crash_loop: bool
    request_metrics: bool
    multiproc_dir: str | None
    workers: tuple[WorkerView, ...]
    slots: tuple[SlotView, ...]
    slot_cpu: procstat.SlotCpu  # reaped workers' CPU time per slot (read only here)


def worker_state(hung: bool, retiring: bool, ready: bool, stalled: bool) -> str:
    """starting, ready, stalled, draining or hung: the first that holds, in that order
    of precedence from the worst down."""
    if hung:
        return "hung"
    if retiring:
        return "draining"
    if not ready:
        return "starting"
    if stalled:
        return "stalled"
    return "ready"


@dataclass
class WorkerCounts:
    """What one worker's own metric files say (None: the file is not there, e.g.
    --no-request-metrics, or the worker has not flushed yet)."""

    requests: int | None = None
    in_flight: int | None = None
    lag_sum: float | None = None
    lag_ticks: int | None = None


def _key_prefix(metric: str, sample: str) -> str:
    """How prometheus-client's mmap key for a sample begins (json of [metric, sample, ...]).

    Matching on it skips a json.loads per key: at 128 workers /status went from 14.0 to
    9.8 ms of master CPU (bench/scrape_cost.py). tests/test_status.py pins the format."""
    return json.dumps([metric, sample])[:-1] + ","


REQUESTS_KEY = _key_prefix(f"{NAMESPACE}_http_requests", REQUESTS)
IN_FLIGHT_KEY = _key_prefix(IN_FLIGHT, IN_FLIGHT)
LAG_SUM_KEY = _key_prefix(LAG_METRIC, f"{LAG_METRIC}_sum")
LAG_BUCKET_KEY = _key_prefix(LAG_METRIC, f"{LAG_METRIC}_bucket")


def _sums(path: str, prefixes: tuple[str, ...]) -> list[float | None]:
    """The sum of the values whose key starts with each prefix, in one multiprocess file
    (None: no such key, or the file is absent or not sized yet)."""
    sums: list[float | None] = [None] * len(prefixes)
    try:
        if os.path.getsize(path) < 8:
            return sums
        raw = MmapedDict.read_all_values_from_file(path)
    except (OSError, ValueError):
        return sums
    for key, value, _timestamp, _pos in raw:
        for i, prefix in enumerate(prefixes):
            if key.startswith(prefix):
                sums[i] = (sums[i] or 0.0) + value
    return sums


def read_worker_counts(directory: str, pid: int) -> WorkerCounts:
    counts = WorkerCounts()
    (requests,) = _sums(os.path.join(directory, f"counter_{pid}.db"), (REQUESTS_KEY,))
    if requests is not None:
        counts.requests = int(requests)
    (flight,) = _sums(os.path.join(directory, f"gauge_livesum_{pid}.db"), (IN_FLIGHT_KEY,))
    if flight is not None:
        counts.in_flight = int(flight)
    # Histogram files hold per-bucket (not cumulative) counts: their sum is the tick count.
    lag_sum, ticks = _sums(os.path.join(directory, f"histogram_{pid}.db"),
                           (LAG_SUM_KEY, LAG_BUCKET_KEY))
    if lag_sum is not None:
        counts.lag_sum, counts.lag_ticks = lag_sum, int(ticks or 0)
    return counts


def worker_row(pool: PoolSnapshot, w: WorkerView, now: float,
               own_cpus: int) -> dict[str, Any]:
    stat = procstat.read_stat(w.pid)
    counts = (read_worker_counts(pool.multiproc_dir, w.pid)
              if pool.multiproc_dir is not None else WorkerCounts())
    return {
        "slot": w.slot + 1,
        "pid": w.pid,
        "generation": w.generation,
        "state": w.state,
        "uptime_seconds": round(now - w.spawned_at, 3),
        "restarts": pool.slots[w.slot].restarts if w.slot < len(pool.slots) else 0,
        "rss_bytes": stat.rss_bytes if stat else None,
        "cpu_seconds": round(stat.cpu_seconds, 2) if stat else None,
        "pinned_cpu": procstat.pinned_cpu(w.pid, own_cpus),
        # No counter file yet: the worker has served nothing (unless the metrics are off).
        "requests": counts.requests if counts.requests is not None else (
            0 if pool.request_metrics and pool.multiproc_dir else None),
        "in_flight": counts.in_flight,
        "loop_lag": {"sum_seconds": counts.lag_sum, "ticks": counts.lag_ticks},
    }


def document(pool: PoolSnapshot, now: float | None = None) -> dict[str, Any]:
    """The /status document: the master, then one row per live worker and per slot
    waiting to respawn, in slot order."""
    now = time.monotonic() if now is None else now
    own_cpus = len(os.sched_getaffinity(0))  # the master's mask, once, not once per row
    rows = [worker_row(pool, w, now, own_cpus) for w in pool.workers]
    if pool.state != "stopping":
        occupied = {w.slot for w in pool.workers if w.staying}
        for index, slot in enumerate(pool.slots):
            if index not in occupied:
                rows.append({"slot": index + 1, "pid": None, "state": "backoff",
                             "restarts": slot.restarts,
                             "respawn_in_seconds": round(max(0.0, slot.respawn_at - now), 3)})
    rows.sort(key=lambda r: (r["slot"], r["pid"] or 0))
    return {
        "master": {
            "pid": pool.pid,
            "state": pool.state,
            "uptime_seconds": round(now - pool.started_at, 3),
            "version": __version__,
            "workers": {"desired": pool.desired, "ready": pool.ready,
                        "running": len(pool.workers)},
            "reloads": pool.reloads,
            "restarts": pool.restarts,
            "crash_loop": pool.crash_loop,
        },
        "workers": rows,
    }


def status_response(pool: PoolSnapshot) -> Response:
    body = json.dumps(document(pool), separators=(",", ":")).encode() + b"\n"
    return Response(200, body, JSON)


def slot_samples(pool: PoolSnapshot) -> list[SlotSample]:
    """Per-slot /proc numbers for SlotCollector: every desired slot, plus any slot that
    still has a live (draining) worker or a dead one's CPU time."""
    live: dict[int, list[procstat.ProcStat]] = {}
    for w in pool.workers:
        stat = procstat.read_stat(w.pid)
        if stat is not None:
            live.setdefault(w.slot, []).append(stat)
    slots = set(range(pool.desired)) | set(live) | set(pool.slot_cpu.dead)
    samples = []
    for slot in sorted(slots):
        stats = live.get(slot, [])
        cpu = pool.slot_cpu.total(slot, sum(s.cpu_seconds for s in stats))
        if not stats:
            samples.append(SlotSample(slot, cpu))
            continue
        newest = max(stats, key=lambda s: s.start_ticks)
        samples.append(SlotSample(slot, cpu, sum(s.rss_bytes for s in stats),
                                  procstat.start_time(newest)))
    return samples
