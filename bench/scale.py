"""Scale sweep: what the master costs as the pool grows, 1 to 256 workers on this machine.

    .venv/bin/python bench/scale.py [--workers 1,8,32,128,256] [--hc PATH] [--out DIR]
                                    [--label before] [--reps 3] [--idle-seconds 5] [--no-chart]
    .venv/bin/python bench/scale.py --chart before.json [after.json] [--out DIR]

For each pool size N one hello-cluster is started (request metrics on, a private
NOTIFY_SOCKET, logs at info) and taken through one life: start to all ready, traffic that
reaches every worker, the master's idle CPU, /metrics scrapes, a SIGHUP reload, SIGKILLed
workers' respawns, the master's RSS and fds, and a clean stop; the whole sweep is repeated
`--reps` times (pool sizes in turn) and the table shows medians. Every wait has a deadline
that grows with N; a phase that runs out of time is recorded as a timeout and the sweep
goes on. Writes <out>/<label>-<date>.json (every sample), .md (the table, PASS/FAIL against
issue 13's targets, the machine's conditions) and .png (drawn by bench/scale_chart.py in
bench/.venv). See bench/README.md, "Scale sweep".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import peers  # noqa: E402
from run import base_env  # noqa: E402

RESULTS = peers.BENCH / "results" / "scale"
LOGS = peers.WORK / "logs" / "scale"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRAPES = 10
RESPAWN_KILLS = 3
SETTLE_BETWEEN = 3.0  # s after a pool stopped: its exits and freed memory settle
WORKER_MIB_ESTIMATE = 45  # per worker, with headroom (a worker is 25-35 MiB)
READY_LINE = re.compile(r"worker (\d+) pid (\d+) ready in (\d+) ms")
FAILURE = re.compile(r"failure (\d+) in a row, respawn in ([\d.]+)s")
READYZ = re.compile(rb"ready: (\d+)/(\d+) workers")

# (key in a row, what, threshold, workers it applies to)
TARGETS = [
    ("idle_cpu_pct", "idle master CPU, % of a core", 1.0, 128),
    ("scrape_ms", "/metrics scrape, median ms", 100.0, 128),
    ("ready_s", "start to all ready (READY=1), s", 2.0, 128),
]


# ---- small readers -------------------------------------------------------------------------

def readyz(port: int) -> tuple[int, int] | None:
    """(ready, desired) from the master's /readyz, None while it does not answer."""
    try:
        _, body = h.http_get(port, "/readyz", timeout=2.0)
    except OSError:
        return None
    m = READYZ.search(body)
    return (int(m.group(1)), int(m.group(2))) if m else (0, -1)


def metric_sum(body: bytes, name: str) -> float | None:
    """Sum of every sample of one metric (all label sets) in a Prometheus text body."""
    total, found = 0.0, False
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks (/proc/PID/stat fields 14 and 15)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def cpu_ns(pid: int) -> int | None:
    """Time on CPU in ns (/proc/PID/schedstat): a finer cross-check of the tick count."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> set[int]:
    """Live (non-zombie) children of pid: the master's workers."""
    return {child for child, parent, _ in h.live_processes() if parent == pid}


def status_kib(pid: int, key: str) -> int | None:
    """One integer field of /proc/PID/status (kB for the Vm* ones)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


class LogTail:
    """The master's log file, read from a remembered offset (no thread, no blocking)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def since_mark(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


# ---- traffic -------------------------------------------------------------------------------

async def _connection(port: int, requests: int, seen: Counter[int], errors: Counter[str],
                      limit: asyncio.Semaphore) -> None:
    """One TCP connection, `requests` GETs on it (keep-alive), the last with close."""
    async with limit:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, TimeoutError) as err:
            errors[type(err).__name__] += 1
            return
        try:
            for i in range(requests):
                close = b"Connection: close\r\n" if i == requests - 1 else b""
                writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + close + b"\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                await asyncio.wait_for(reader.readexactly(int(length.group(1)) if length
                                                          else 0), 10)
                pid = h.PID_RE.search(head)
                if not head.startswith(b"HTTP/1.1 200") or pid is None:
                    errors[head.split(b"\r\n", 1)[0].decode(errors="replace")] += 1
                    continue
                seen[int(pid.group(1))] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            errors[type(err).__name__] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)


async def _traffic(port: int, keepalive_conns: int, per_conn: int, close_conns: int,
                   seen: Counter[int], errors: Counter[str]) -> None:
    limit = asyncio.Semaphore(32)
    jobs = [_connection(port, per_conn, seen, errors, limit) for _ in range(keepalive_conns)]
    jobs += [_connection(port, 1, seen, errors, limit) for _ in range(close_conns)]
    await asyncio.gather(*jobs)


def traffic(port: int, workers: set[int], deadline_s: float) -> dict[str, Any]:
    """Requests over keep-alive and fresh connections until every worker served some.

    New connections are steered at random over the ready workers, so 12 per worker make a
    worker that served nothing unlikely; rounds of fresh connections follow until each
    current worker has answered (bounded), so each has request-metric files to scrape.
    """
    n = len(workers)
    seen: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    rounds = []
    t0 = time.monotonic()
    plan = [(max(50, n), 20, max(1000, 12 * n))] + [(0, 1, max(200, 8 * n))] * 4
    for ka, per, close in plan:
        left = deadline_s - (time.monotonic() - t0)
        if left <= 0:
            break
        t = time.monotonic()
        with contextlib.suppress(TimeoutError):
            asyncio.run(asyncio.wait_for(_traffic(port, ka, per, close, seen, errors), left))
        rounds.append({"keepalive_conns": ka, "requests_per_conn": per, "close_conns": close,
                       "s": round(time.monotonic() - t, 3)})
        if workers <= set(seen):
            break
    return {"requests_ok": sum(seen.values()), "errors": dict(errors), "rounds": rounds,
            "workers_served": len(workers & set(seen)), "workers": n,
            "per_worker_min": min((seen[p] for p in workers), default=0),
            "per_worker_max": max((seen[p] for p in workers), default=0),
            "s": round(time.monotonic() - t0, 3)}


# ---- one life of one pool ------------------------------------------------------------------

class Timeout(Exception):
    """A bounded wait ran out: recorded as such, never a crash of the sweep."""


def wait_until(what: str, timeout: float, check: Any, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise Timeout(f"{what}: timeout after {timeout:.0f}s")


class Pool:
    """One hello-cluster --workers N, its notify socket, log and ports."""

    def __init__(self, hc: str, n: int, tag: str) -> None:
        self.n = n
        self.port, self.mport = h.free_port(), h.free_port()
        self.notify = h.NotifySocket(peers.WORK)
        env = {**base_env(), "NOTIFY_SOCKET": self.notify.path}
        self.log_path = LOGS / f"{tag}-{n}.log"
        self.log_path.unlink(missing_ok=True)
        argv = [hc, "--workers", str(n), "--bind", f"127.0.0.1:{self.port}",
                "--metrics-bind", f"127.0.0.1:{self.mport}", "--request-metrics",
                "--log-level", "info"]
        self.argv = argv
        self.t0 = time.monotonic()
        self.proc = h.Proc(argv, env, self.log_path)
        self.log = LogTail(self.log_path)

    def close(self) -> None:
        try:
            self.proc.stop()
        finally:
            self.notify.close()


def phase_start(p: Pool, timeout: float) -> dict[str, Any]:
    """Launch to READY=1, and launch to /readyz reporting N/N (polled every 20 ms)."""
    out: dict[str, Any] = {}

    def all_ready() -> bool:
        if not p.proc.alive():
            raise Timeout(f"start: hello-cluster exited with {p.proc.popen.returncode}")
        got = readyz(p.mport)
        return got is not None and got[0] == got[1] == p.n

    wait_until("start to /readyz N/N", timeout, all_ready, interval=0.02)
    out["readyz_s"] = time.monotonic() - p.t0
    ready = wait_until("start to READY=1", max(1.0, timeout - out["readyz_s"]),
                       lambda: p.notify.first("READY=1"))
    out["notify_s"] = ready - p.t0
    _, body = h.http_get(p.mport, "/metrics", timeout=30)
    out["workers_ready_gauge"] = metric_sum(body, "hello_cluster_workers_ready")
    return out


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all cores from /proc/stat: what else the machine was doing."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def phase_idle(p: Pool, settle: float, window: float) -> dict[str, Any]:
    """Master (and all workers') CPU over `window` s with no client connected.

    The whole machine's busy share over the same window is recorded too: on a shared
    machine it says how much of the rest was other people's work.
    """
    time.sleep(settle)
    kids = children(p.proc.pid)
    busy0 = machine_busy()
    m0, ns0 = cpu_ticks(p.proc.pid), cpu_ns(p.proc.pid)
    sw0 = status_kib(p.proc.pid, "voluntary_ctxt_switches")
    w0 = {k: cpu_ticks(k) for k in kids}
    t0 = time.monotonic()
    time.sleep(window)
    m1, ns1 = cpu_ticks(p.proc.pid), cpu_ns(p.proc.pid)
    sw1 = status_kib(p.proc.pid, "voluntary_ctxt_switches")
    w1 = {k: cpu_ticks(k) for k in kids}
    span = time.monotonic() - t0
    busy1 = machine_busy()
    if m0 is None or m1 is None:
        raise Timeout("idle: master vanished")
    workers_ticks = sum((w1[k] or 0) - (w0[k] or 0) for k in kids
                        if w0[k] is not None and w1[k] is not None)
    return {"window_s": span, "master_ticks": m1 - m0, "clk_tck": CLK_TCK,
            "master_cpu_pct": 100 * (m1 - m0) / CLK_TCK / span,
            "master_cpu_pct_schedstat": (100 * (ns1 - ns0) / 1e9 / span
                                         if ns0 is not None and ns1 is not None else None),
            "workers_cpu_pct_total": 100 * workers_ticks / CLK_TCK / span,
            "workers_sampled": len(kids),
            # A single-threaded loop sleeps only in select(): voluntary context switches
            # are its wake-ups (plus the odd blocking read). A saturated loop finds events
            # waiting and never sleeps, so read this with the CPU figure.
            "master_wakes_per_s": (sw1 - sw0) / span if sw0 is not None and sw1 is not None
            else None,
            "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])}


def phase_scrape(p: Pool) -> dict[str, Any]:
    """SCRAPES sequential GET /metrics, 0.2 s apart, each timed from connect to last byte."""
    ms: list[float] = []
    size = 0
    body = b""
    for _ in range(SCRAPES):
        t = time.monotonic()
        status, body = h.http_get(p.mport, "/metrics", timeout=30)
        ms.append((time.monotonic() - t) * 1000)
        if status != 200:
            raise Timeout(f"scrape: status {status}")
        size = len(body)
        time.sleep(0.2)
    return {"ms": ms, "median_ms": statistics.median(ms), "max_ms": max(ms), "bytes": size,
            "http_requests_total": metric_sum(body, "hello_cluster_http_requests_total"),
            "workers_ready_gauge": metric_sum(body, "hello_cluster_workers_ready")}


def phase_reload(p: Pool, timeout: float) -> dict[str, Any]:
    """SIGHUP to READY=1 again (= every slot's new worker ready), then old ones gone."""
    old = children(p.proc.pid)
    p.log.mark()
    t = time.monotonic()
    os.kill(p.proc.pid, signal.SIGHUP)

    def done() -> float | None:
        if "reload failed" in p.log.since_mark():
            raise Timeout("reload: the master logged `reload failed`")
        return p.notify.first("READY=1", after=t)

    ready = wait_until("reload to READY=1", timeout, done)
    out: dict[str, Any] = {"ready_s": ready - t,
                           "log_complete": "reload complete" in p.log.since_mark()}
    wait_until("reload: old workers gone", timeout,
               lambda: not (old & children(p.proc.pid)), interval=0.02)
    out["old_gone_s"] = time.monotonic() - t
    new = children(p.proc.pid)
    out["new_workers"] = len(new - old)
    _, body = h.http_get(p.mport, "/metrics", timeout=30)
    out["reloads_total"] = metric_sum(body, "hello_cluster_reloads_total")
    out["workers_ready_gauge"] = metric_sum(body, "hello_cluster_workers_ready")
    return out


def phase_respawn(p: Pool, timeout: float) -> dict[str, Any]:
    """SIGKILL one worker (up to RESPAWN_KILLS times, each on another slot).

    Other slots, so that each kill is its slot's first failure and respawns at once (a
    second failure of one slot would add backoff): with fewer workers, fewer kills.

    Time from the kill until the master's log names a new pid ready *and* /readyz reports
    N/N again (polled every 5 ms); the log's own "ready in X ms" is spawn to ready.
    """
    samples: list[dict[str, Any]] = []
    killed: set[int] = set()
    for _ in range(min(RESPAWN_KILLS, p.n)):
        before = children(p.proc.pid)
        victim = min(before - killed)
        killed.add(victim)
        p.log.mark()
        t = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def back(before: set[int] = before) -> tuple[float, re.Match[str]] | None:
            fresh = [m for m in READY_LINE.finditer(p.log.since_mark())
                     if int(m.group(2)) not in before]
            if not fresh:
                return None
            got = readyz(p.mport)
            if got is None or got[0] != p.n:
                return None
            return time.monotonic(), fresh[0]

        when, line = wait_until("respawn to N/N ready", timeout, back, interval=0.005)
        failure = FAILURE.search(p.log.since_mark())
        samples.append({"victim": victim, "ms": (when - t) * 1000,
                        "failure_in_a_row": int(failure.group(1)) if failure else None,
                        "backoff_s": float(failure.group(2)) if failure else None,
                        "slot": int(line.group(1)), "new_pid": int(line.group(2)),
                        "master_log_ready_ms": int(line.group(3))})
        time.sleep(0.5)
    return {"samples": samples, "median_ms": statistics.median(s["ms"] for s in samples),
            "master_log_median_ms": statistics.median(s["master_log_ready_ms"]
                                                      for s in samples)}


def phase_resources(p: Pool) -> dict[str, Any]:
    kids = children(p.proc.pid)
    workers_kib = [status_kib(k, "VmRSS") or 0 for k in kids]
    return {"master_rss_mib": (status_kib(p.proc.pid, "VmRSS") or 0) / 1024,
            "master_hwm_mib": (status_kib(p.proc.pid, "VmHWM") or 0) / 1024,
            "master_fds": fd_count(p.proc.pid),
            "workers": len(kids),
            "workers_rss_total_mib": sum(workers_kib) / 1024,
            "worker_rss_median_mib": statistics.median(workers_kib) / 1024 if kids else None}


def phase_stop(p: Pool, timeout: float) -> dict[str, Any]:
    """SIGTERM the master; it must exit 0 and leave nothing in its process group."""
    t = time.monotonic()
    os.kill(p.proc.pid, signal.SIGTERM)
    try:
        wait_until("stop", timeout, lambda: p.proc.popen.poll() is not None
                   and not h._group_alive(p.proc.pid), interval=0.02)
    except Timeout:
        left = h._group_alive(p.proc.pid)
        p.proc.stop(grace=0.5)  # SIGKILL the group
        return {"s": None, "timeout": True, "left_behind_before_kill": left,
                "exit_code": p.proc.popen.returncode}
    return {"s": time.monotonic() - t, "timeout": False, "exit_code": p.proc.popen.returncode,
            "left_behind": h._group_alive(p.proc.pid)}


def measure(hc: str, n: int, tag: str, idle_window: float) -> dict[str, Any]:
    """One pool's life; each phase's result or its error, in order."""
    rec: dict[str, Any] = {"workers": n, "loadavg_before": os.getloadavg(),
                           "mem_available_mib_before": mem_available_mib(), "errors": []}
    need = 500 + WORKER_MIB_ESTIMATE * n
    if rec["mem_available_mib_before"] < need:
        rec["errors"].append(f"skipped: {rec['mem_available_mib_before']} MiB available, "
                             f"about {need} MiB needed")
        return rec
    scale = 1 + n / 32  # generous bounds that grow with the pool
    p = Pool(hc, n, tag)
    rec["argv"] = p.argv
    try:
        phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("start", lambda: phase_start(p, 30 * scale)),
            ("traffic", lambda: traffic(p.port, children(p.proc.pid), 60 * scale)),
            ("idle", lambda: phase_idle(p, settle=1.5, window=idle_window)),
            ("scrape", lambda: phase_scrape(p)),
            ("reload", lambda: phase_reload(p, 30 * scale)),
            ("respawn", lambda: phase_respawn(p, 10 * scale)),
            ("resources", lambda: phase_resources(p)),
        ]
        for name, run in phases:
            try:
                rec[name] = run()
            except (Timeout, OSError, http.client.HTTPException) as err:
                rec["errors"].append(f"{name}: {type(err).__name__}: {err}")
                print(f"    ! {n} workers, {name}: {err}", flush=True)
                if name == "start" or not p.proc.alive():
                    break
            print(f"    {n:4} workers {name:9} {brief(name, rec.get(name))}", flush=True)
        rec["stop"] = phase_stop(p, 30 * scale)
        print(f"    {n:4} workers {'stop':9} {brief('stop', rec['stop'])}", flush=True)
    finally:
        p.close()
        rec["loadavg_after"] = os.getloadavg()
    return rec


def brief(name: str, r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    keys = {"start": ("notify_s", "readyz_s"), "traffic": ("requests_ok", "workers_served", "s"),
            "idle": ("master_cpu_pct", "master_wakes_per_s", "workers_cpu_pct_total",
                     "machine_busy_pct"),
            "scrape": ("median_ms", "max_ms", "bytes"), "reload": ("ready_s", "old_gone_s"),
            "respawn": ("median_ms", "master_log_median_ms"),
            "resources": ("master_rss_mib", "master_fds", "workers_rss_total_mib"),
            "stop": ("s", "exit_code", "timeout")}[name]
    return "  ".join(f"{k}={fmt(r.get(k))}" for k in keys)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


# ---- report --------------------------------------------------------------------------------

def row(rec: dict[str, Any]) -> dict[str, Any]:
    """The table's figures for one run of one pool size (None where the phase failed)."""
    def get(phase: str, key: str) -> Any:
        return (rec.get(phase) or {}).get(key)
    return {"workers": rec["workers"], "ready_s": get("start", "notify_s"),
            "readyz_s": get("start", "readyz_s"), "idle_cpu_pct": get("idle", "master_cpu_pct"),
            "scrape_ms": get("scrape", "median_ms"), "scrape_max_ms": get("scrape", "max_ms"),
            "scrape_kib": (get("scrape", "bytes") or 0) / 1024 or None,
            "reload_s": get("reload", "ready_s"), "respawn_ms": get("respawn", "median_ms"),
            "rss_mib": get("resources", "master_rss_mib"),
            "fds": get("resources", "master_fds"), "stop_s": get("stop", "s"),
            "wakes_per_s": get("idle", "master_wakes_per_s"), "rep": rec.get("rep", 1)}


def median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pool size: each figure the median over the repetitions that have it."""
    out = []
    for n in dict.fromkeys(r["workers"] for r in runs):
        reps = [row(r) for r in runs if r["workers"] == n]
        merged: dict[str, Any] = {"workers": n, "reps": len(reps)}
        for key in reps[0]:
            if key in ("workers", "rep"):
                continue
            xs = [r[key] for r in reps if r[key] is not None]
            merged[key] = statistics.median(xs) if xs else None
            merged[f"{key}_all"] = [r[key] for r in reps]
        out.append(merged)
    return out


def others_cpu_pct(rec: dict[str, Any], cores: int) -> float | None:
    """CPU the rest of the machine used during the idle window, in % of one core.

    The whole machine's busy share times the cores, minus this pool's master and workers
    (the bench itself sleeps then). On a shared machine it says how contended a run was:
    a master that wants more CPU than it gets shows less than it would use alone.
    """
    i = rec.get("idle") or {}
    if i.get("machine_busy_pct") is None:
        return None
    return float(i["machine_busy_pct"] * cores - i["master_cpu_pct_schedstat"]
                 - i["workers_cpu_pct_total"])


def verdicts(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    out = []
    for key, what, limit, at in TARGETS:
        r = next((r for r in rows if r["workers"] == at), None)
        v = None if r is None else r[key]
        verdict = "n/a (not measured)" if v is None else "PASS" if v <= limit else "FAIL"
        cmp = "<=" if key == "idle_cpu_pct" else "<"
        out.append((f"{what} at {at} workers {cmp} {limit:g}", "-" if v is None else f"{v:.3g}",
                    verdict))
    return out


def markdown(doc: dict[str, Any]) -> str:
    def c(v: Any, digits: int = 2) -> str:
        return "timeout/failed" if v is None else f"{v:.{digits}f}" if isinstance(v, float) \
            else str(v)
    rows = doc["rows"]
    lines = [f"# Scale sweep `{doc['label']}`, {doc['date']}", "",
             f"Command: `{doc['command']}`  ", f"hello-cluster: `{doc['hc']}` "
             f"({doc['machine']['hello_cluster']}), git `{doc['machine']['git']}`  ",
             f"Machine: {doc['machine']['cores']} cores ({doc['machine']['cpu']}), "
             f"Python {doc['machine']['python']}, kernel {doc['machine']['kernel']}, "
             f"{doc['machine']['mem_total_mib']} MiB RAM; load average "
             f"{doc['loadavg_at_start']:.2f} at start, {doc['loadavg_at_end']:.2f} at end; "
             f"{doc['elapsed_s']} s in all.", "",
             f"Medians of {doc['reps']} repetitions (each pool size once per repetition, "
             "in turn); every repetition is in the second table.", ""]
    head = ("| workers | start to READY=1 s | start to /readyz N/N s | idle master CPU % "
            "| master wakes/s | scrape ms (median / max) | scrape KiB | reload s | respawn ms "
            "| master RSS MiB | master fds | stop s |")
    rule = "| ---: " * 12 + "|"

    def line(r: dict[str, Any], first: str) -> str:
        return (f"| {first} | {c(r['ready_s'])} | {c(r['readyz_s'])} | "
                f"{c(r['idle_cpu_pct'], 1)} | {c(r['wakes_per_s'], 0)} | "
                f"{c(r['scrape_ms'], 1)} / {c(r['scrape_max_ms'], 1)} | "
                f"{c(r['scrape_kib'], 0)} | {c(r['reload_s'])} | {c(r['respawn_ms'], 0)} | "
                f"{c(r['rss_mib'], 1)} | {c(r['fds'], 0)} | {c(r['stop_s'])} |")
    lines += [head, rule, *(line(r, str(r["workers"])) for r in rows)]
    lines += ["", "| target (issue 13), on the medians | measured | verdict |",
              "| --- | ---: | --- |"]
    lines += [f"| {w} | {v} | {x} |" for w, v, x in verdicts(rows)]
    lines += ["", "Every repetition:", "", head.replace("| workers |", "| workers, rep |"),
              rule, *(line(row(r), f"{r['workers']}, {r.get('rep', 1)}")
                      for r in doc["runs"])]
    errors = [f"- {r['workers']} workers, rep {r.get('rep', 1)}: {e}" for r in doc["runs"]
              for e in r["errors"]]
    cores = doc["machine"]["cores"]
    busy = [f"{r['workers']} workers rep {r.get('rep', 1)} ({o:.0f}%)" for r in doc["runs"]
            if (o := others_cpu_pct(r, cores)) is not None and o > 50]
    lines += ["", "Errors and timeouts:", "", *(errors or ["- none"]), "",
              "Contention: other processes on this machine used more than half a core during "
              "the idle window of " + (", ".join(busy) if busy else "no run") + ". Figures from "
              "those runs are less reliable (a starved master shows less CPU and slower "
              "start, reload and respawn); the medians damp them.", "",
              "Per pool size, while it ran (traffic, idle workers' CPU, stop):", ""]
    for r in doc["runs"]:
        t, i, s = r.get("traffic") or {}, r.get("idle") or {}, r.get("stop") or {}
        res = r.get("resources") or {}
        lines.append(
            f"- {r['workers']}, rep {r.get('rep', 1)}: load {r['loadavg_before'][0]:.2f} -> "
            f"{r.get('loadavg_after', [0])[0]:.2f}; {t.get('requests_ok', '-')} requests, "
            f"{t.get('workers_served', '-')}/{r['workers']} workers served, errors "
            f"{t.get('errors', '-')}; idle master {c(i.get('master_cpu_pct_schedstat'))}% by "
            f"schedstat, all workers {c(i.get('workers_cpu_pct_total'), 1)}%, whole machine "
            f"{c(i.get('machine_busy_pct'), 0)}% busy (of all cores), other processes "
            f"{c(others_cpu_pct(r, cores), 0)}% of a core; workers' RSS "
            f"{c(res.get('workers_rss_total_mib'), 0)} MiB in all; stop exit "
            f"{s.get('exit_code', '-')}, left behind: {s.get('left_behind', '-')}")
    lines += ["", "Method: bench/README.md, \"Scale sweep\". Every sample is in the JSON "
              "next to this file.", ""]
    return "\n".join(lines)


def machine(hc: str) -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    version = subprocess.run([hc, "--version"], capture_output=True, text=True, timeout=30)
    git = subprocess.run(["git", "-C", str(peers.ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=30)
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(),
            "mem_total_mib": int(Path("/proc/meminfo").read_text().split()[1]) // 1024,
            "hello_cluster": (version.stdout or version.stderr).strip(),
            "git": git.stdout.strip(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}


def raise_nofile() -> None:
    """Soft fd limit up to the hard one: the bench's clients and the pool inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def chart(jsons: list[Path], png: Path) -> bool:
    """Draw the PNG with bench/.venv's python (matplotlib lives there, not in .venv)."""
    python = peers.ensure_chart_tools()
    done = subprocess.run([str(python), str(peers.BENCH / "scale_chart.py"), "--out", str(png),
                           *map(str, jsons)], timeout=300)
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sweep hello-cluster's pool size; see the docstring.")
    ap.add_argument("--workers", default="1,8,32,128,256", help="comma-separated pool sizes")
    ap.add_argument("--hc", default=str(peers.MAIN_BIN / "hello-cluster"),
                    help="the hello-cluster executable")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--label", default="run", help="names the files: <label>-<date>.*")
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions of the whole sweep; the table shows medians")
    ap.add_argument("--idle-seconds", type=float, default=5.0,
                    help="window over which the idle master's CPU is measured")
    ap.add_argument("--no-chart", action="store_true", help="write the JSON and .md only")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only rewrite the .md next to a result file from its JSON")
    ap.add_argument("--chart", nargs="+", metavar="JSON", type=Path,
                    help="only draw the chart of one or two (before, after) result files")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.chart:
        labels = "-vs-".join(json.loads(p.read_text())["label"] for p in args.chart)
        png = out_dir / f"{labels}.png"
        ok = chart(args.chart, png)
        print(f"bench: wrote {png}" if ok else "bench: drawing the chart failed", flush=True)
        return 0 if ok else 1
    if args.report:
        args.report.with_suffix(".md").write_text(markdown(json.loads(args.report.read_text())))
        print(f"bench: wrote {args.report.with_suffix('.md')}", flush=True)
        return 0
    if not Path(args.hc).exists():
        sys.exit(f"bench: {args.hc} is missing; run `make .venv/bin/hello-cluster`")
    sizes = [int(x) for x in args.workers.split(",")]
    raise_nofile()
    LOGS.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    load_at_start = os.getloadavg()[0]
    print(f"bench: scale sweep {sizes} with {args.hc}; {os.cpu_count()} cores, "
          f"{mem_available_mib()} MiB available, load {load_at_start:.2f}", flush=True)
    runs = []
    for rep in range(1, args.reps + 1):  # pool sizes in turn, so drift hits them alike
        for n in sizes:
            print(f"[rep {rep}/{args.reps}: {n} workers]", flush=True)
            runs.append({"rep": rep, **measure(args.hc, n, args.label, args.idle_seconds)})
            time.sleep(SETTLE_BETWEEN)
    stamp = started.strftime("%Y-%m-%d")
    command = " ".join([".venv/bin/python", "bench/scale.py",
                        *(argv if argv is not None else sys.argv[1:])])
    doc = {"label": args.label, "date": started.isoformat(timespec="seconds"),
           "command": command, "hc": args.hc, "machine": machine(args.hc),
           "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()[0],
           "idle_seconds": args.idle_seconds, "reps": args.reps,
           "elapsed_s": round((dt.datetime.now(dt.UTC) - started).total_seconds()),
           "targets": [{"key": k, "what": w, "limit": lim, "workers": at}
                       for k, w, lim, at in TARGETS],
           "rows": median_rows(runs), "runs": runs}
    base = out_dir / f"{args.label}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    base.with_suffix(".md").write_text(md)
    print(md)
    drawn = "" if args.no_chart else ", .png" if chart(
        [base.with_suffix(".json")], base.with_suffix(".png")) else " (chart failed)"
    print(f"bench: wrote {base}.json, .md{drawn}", flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so every `finally` stops its pool's process group


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; the pool was stopped", file=sys.stderr)
        sys.exit(130)
