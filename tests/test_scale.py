"""The master's cost follows the pool linearly: beats are read from shared memory on the
master's own schedule, so an idle master wakes about ten times a second however many
workers beat. Guarded by counting wake-ups, not by timing."""

from __future__ import annotations

import os
import time

from hello_cluster.system.beats import SCAN, Beater, BeatTable


def test_cells_are_handed_out_once_and_reused_after_release() -> None:
    table = BeatTable(3)
    cells = [table.allocate(1.0) for _ in range(3)]
    assert sorted(c for c in cells if c is not None) == [0, 1, 2]
    assert table.allocate(2.0) is None  # full: that worker beats through its pipe
    table.release(cells[1])
    assert table.allocate(3.0) == cells[1]
    assert table.last_beat(cells[1]) == 3.0  # a new owner starts as just beaten
    table.release(None)  # a worker without a cell: nothing to give back
    assert table.in_use == 3


def test_a_forked_worker_stamps_what_the_master_reads() -> None:
    """The mapping is shared across fork(): the child's store is the parent's read."""
    table = BeatTable(4)
    cell = table.allocate(0.0)
    assert cell is not None
    before = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            Beater(table.view, cell).beat()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert before <= table.last_beat(cell) <= time.monotonic()


def wakeups_per_second(c, seconds: float = 2.0) -> float:
    first = c.metric("hello_cluster_master_wakeups_total")
    time.sleep(seconds)
    # The scrape itself wakes the master once or twice: included, and small.
    return (c.metric("hello_cluster_master_wakeups_total") - first) / seconds


def test_idle_master_wakeups_do_not_grow_with_the_pool(cluster) -> None:
    """With one pipe byte per beat, 24 workers woke the master ~240 times a second; read
    from the table, 2 or 24 workers cost the same ~1/SCAN wake-ups."""
    rates = {}
    for n in (2, 24):
        c = cluster("--workers", str(n), ready=False)
        c.wait_ready(workers=n, timeout=60)
        for _ in range(2 * n):
            assert c.get()[0] == 200  # every worker has served and beaten for a while
        time.sleep(0.5)
        rates[n] = wakeups_per_second(c)
        c.kill_all()
    bound = 2 / SCAN  # twice the scan rate: room for scrapes and a late timer
    assert all(rate <= bound for rate in rates.values()), rates
    assert rates[24] <= rates[2] * 1.5 + 2, rates


def test_the_first_workers_are_forked_at_once(cluster) -> None:
    """The loop's first turn forks: no one-second timer stands between start and the
    workers (a regression the bench caught twice). The log's clock, with a wide margin."""
    c = cluster("--workers", "2", "--log-level", "debug", workers=2)
    stamps = {}
    for line in c.log.splitlines():
        for mark in ("master ready to fork", "spawned worker"):
            if mark in line and mark not in stamps:
                clock = line.split()[1]  # HH:MM:SS,mmm
                h, m, rest = clock.split(":")
                stamps[mark] = int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))
    assert stamps["spawned worker"] - stamps["master ready to fork"] < 0.7, stamps
