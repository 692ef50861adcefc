"""Planned replacements for memory and age: the pure policy under hypothesis, the /proc
parsers, bad values, and the real master recycling a leaking worker with no failed request."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Load, run_cli, wait_for
from hello_cluster.config import parse_size
from hello_cluster.errors import ConfigError
from hello_cluster.supervisor import memory
from hello_cluster.supervisor.recycling import MEMORY_SAMPLE, MEMORY_STRIKES, Recycler

MiB = 1024 * 1024


@dataclass
class W:
    pid: int
    slot: int
    spawned_at: float = 0.0


# ---- the policy ---------------------------------------------------------------------------

@given(st.lists(st.lists(st.integers(0, 200), min_size=3, max_size=3), min_size=1,
                max_size=30))
def test_memory_recycles_only_after_strikes_in_a_row_and_never_from_the_start(
        samples: list[list[int]]) -> None:
    """Three workers, one reading each a second (MiB); limit 100 MiB."""
    everyone = [W(pid=10 + i, slot=i) for i in range(3)]
    serving = list(everyone)
    readings: dict[int, int] = {}
    r = Recycler(max_memory=100 * MiB, read_memory=lambda pid, limit: readings[pid] * MiB)
    over_run = {w.pid: 0 for w in everyone}
    for tick, row in enumerate(samples):
        for w, mib in zip(everyone, row, strict=True):
            readings[w.pid] = mib
            over_run[w.pid] = over_run[w.pid] + 1 if mib > 100 else 0
        decision = r.due(serving, tick * MEMORY_SAMPLE, 3, in_flight=False)
        if decision is None:
            continue
        chosen = decision.worker
        assert decision.reason == "memory"
        assert samples[0][everyone.index(chosen)] <= 100  # over from the start: left alone
        assert over_run[chosen.pid] >= MEMORY_STRIKES
        serving.remove(chosen)  # being replaced: no longer a candidate
        r.forget(chosen.pid)


def test_nothing_starts_while_a_recycle_is_in_flight() -> None:
    w = W(pid=1, slot=0)
    r = Recycler(max_memory=10, read_memory=lambda pid, limit: 5)
    r.due([w], 0.0, 1, in_flight=False)  # first sample: under
    r.read_memory = lambda pid, limit: 50
    for t in range(1, 10):
        assert r.due([w], float(t), 1, in_flight=True) is None
    decision = r.due([w], 10.0, 1, in_flight=False)
    assert decision is not None and decision.worker is w  # the strikes were kept


@settings(max_examples=50)
@given(st.integers(1, 64), st.floats(1.0, 1e5))
def test_a_fresh_pool_recycles_one_at_a_time_over_one_lifetime(n: int, lifetime: float) -> None:
    """Everyone started at 0: recycles begin at `lifetime`, at least lifetime/n apart,
    oldest first, each slot once, all within [lifetime, 2 * lifetime)."""
    pool = [W(pid=100 + i, slot=i, spawned_at=i * 1e-6) for i in range(n)]
    r = Recycler(max_lifetime=lifetime)
    times: list[float] = []
    step = lifetime / n / 7
    t = 0.0
    while pool and t < 3 * lifetime:
        decision = r.due(pool, t, n, in_flight=False)
        if decision is not None:
            assert decision.reason == "lifetime" and decision.worker is pool[0]
            pool.pop(0)
            times.append(t)
        t += step
    assert not pool, f"{len(pool)} of {n} never recycled"
    # Each gap is lifetime/n, rounded up to the simulation's step.
    assert times[0] >= lifetime
    assert times[-1] <= lifetime + (n - 1) * (lifetime / n + step) + step
    assert all(b - a >= lifetime / n - 1e-9 for a, b in zip(times, times[1:], strict=False))


def test_off_means_nothing_is_read() -> None:
    def never(pid: int, limit: int) -> int:
        raise AssertionError("memory read while off")

    r = Recycler(read_memory=never)
    assert not r.enabled
    assert r.due([W(1, 0)], 100.0, 1, in_flight=False) is None


# ---- /proc and sizes ----------------------------------------------------------------------

def test_uss_of_this_process_is_private_memory() -> None:
    uss = memory.uss_bytes(os.getpid())
    rss = memory.rss_bytes(os.getpid())
    assert uss is not None and rss is not None and 0 < uss <= rss
    assert memory.worker_memory(os.getpid(), rss + 1) == rss  # under: RSS says enough
    over = memory.worker_memory(os.getpid(), 0)  # over: the USS is read
    assert over is not None and over < rss
    assert memory.uss_bytes(2**22 + 12345) is None  # no such process


@given(st.text(max_size=300))
def test_smaps_parser_raises_only_value_error(text: str) -> None:
    try:
        memory.parse_smaps_rollup_uss(text)
    except ValueError:
        pass


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("300M", 300 * MiB), ("1G", 1024 * MiB), ("1.5g", 1536 * MiB),
    ("512K", 512 * 1024), ("100MiB", 100 * MiB), ("2048", 2048), (" 64 MiB ", 64 * MiB),
    ("300MB", 300_000_000), ("1kB", 1000), ("2Gi", 2048 * MiB), ("1.5GB", 1_500_000_000)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@given(st.text(max_size=20))
def test_size_parser_raises_only_config_error(text: str) -> None:
    try:
        assert parse_size(text) >= 0
    except ConfigError:
        pass


@pytest.mark.parametrize("args", [
    ("--max-worker-memory", "10x"), ("--max-worker-memory", "-1G"),
    ("--max-worker-lifetime", "-1h"), ("--max-worker-lifetime", "soon")])
def test_bad_values_exit_2_with_one_line(args: tuple[str, str]) -> None:
    proc = run_cli(*args, "--metrics-bind", "off")
    assert proc.returncode == 2, proc.stderr
    assert args[0] in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


# ---- the real master ----------------------------------------------------------------------

def recycles(c, reason: str) -> float:
    return c.metric(f'hello_cluster_worker_recycles_total{{reason="{reason}"}}')


def unplanned(c) -> float:
    return sum(c.metric(f'hello_cluster_worker_restarts_total{{reason="{r}"}}')
               for r in ("exit", "signal", "timeout", "oom"))


def test_a_leaking_worker_is_recycled_without_a_failed_request(cluster) -> None:
    c = cluster("--workers", "2", "--app", "hc_testapp:app", "--max-worker-memory", "40M")
    before = set(c.workers())
    with Load(c.port, max_seconds=30) as load:
        _, headers, body = c.get("/leak?mb=64")
        leaker = int(headers["x-worker-pid"])
        wait_for(lambda: leaker not in c.workers() and len(c.workers()) == 2, 15,
                 what="the leaking worker to be replaced and gone")
        c.wait_ready(workers=2)
        load.wait_more(20)  # and on, with the replacement
    assert load.failures == [] and load.ok > 50, (load.failures[:5], load.ok)
    assert recycles(c, "memory") == 1
    assert unplanned(c) == 0
    assert set(c.workers()) & before == before - {leaker}  # the other one untouched
    line = next(ln for ln in c.log.splitlines() if "recycling (memory" in ln)
    assert f"pid {leaker}" in line and re.search(r"[0-9.]+ MiB USS over", line), line


def test_a_worker_over_the_limit_from_the_start_is_said_once_not_recycled(cluster) -> None:
    c = cluster("--workers", "2", "--max-worker-memory", "1M")
    time.sleep(MEMORY_SAMPLE * (MEMORY_STRIKES + 2))
    assert recycles(c, "memory") == 0
    assert c.log.count("just after start, over --max-worker-memory") == 1


def test_lifetimes_recycle_one_at_a_time_without_a_failed_request(cluster) -> None:
    c = cluster("--workers", "2", "--max-worker-lifetime", "2s")
    first = set(c.workers())
    with Load(c.port, max_seconds=30) as load:
        wait_for(lambda: recycles(c, "lifetime") >= 2 and not first & set(c.workers()), 20,
                 what="both first workers recycled for their lifetime")
    assert load.failures == [], load.failures[:5]
    assert unplanned(c) == 0
    # One at a time: each recycle's old worker ended before the next recycle began.
    events = [ln for ln in c.log.splitlines()
              if "recycling (lifetime" in ln or "ended (lifetime" in ln]
    kinds = ["begin" if "recycling" in ln else "end" for ln in events]
    assert kinds[:4] == ["begin", "end", "begin", "end"], events
