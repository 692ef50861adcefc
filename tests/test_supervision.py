"""Respawn policy in the real master: backoff, crash-loop breaker, hung workers, scaling."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

from conftest import Load, run_cli, v1_cgroup, wait_for


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_crash_loop_backs_off_then_gives_up(tmp_path) -> None:
    """Workers that die on boot: growing, capped delays, bounded forks, then exit code 5."""
    started = time.monotonic()
    proc = run_cli("--app", "hc_bootcrash:app", "--workers", "2", "--bind", "127.0.0.1:0",
                   "--metrics-bind", "off", "--crash-loop-limit", "12",
                   "--backoff-initial", "50ms", "--backoff-max", "400ms", timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 5, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "crash loop: 12 workers in a row died before becoming ready" in proc.stderr
    ceilings = [float(x) for x in re.findall(r"backoff ceiling ([0-9.]+)s", proc.stderr)]
    assert ceilings, proc.stderr
    assert max(ceilings) <= 0.4
    assert 0.4 in ceilings  # the cap was reached: the delays grew
    per_slot = {}
    for slot, ceiling in re.findall(r"worker (\d) died: .*?backoff ceiling ([0-9.]+)s",
                                    proc.stderr):
        per_slot.setdefault(slot, []).append(float(ceiling))
    for values in per_slot.values():
        assert values == sorted(values)  # each slot's ceiling only grows
    # The app's reason is said once, not once per death.
    assert proc.stderr.count("cannot start: the app's lifespan startup failed: boot crash") == 1
    assert len(re.findall(r"died: pid \d+", proc.stderr)) <= 12  # forks bounded by the limit
    assert elapsed < 30


def test_crash_loop_master_stays_idle(cluster) -> None:
    """While backing off, the master sleeps: its CPU time stays far below the wall time."""
    c = cluster("--app", "hc_bootcrash:app", "--workers", "2", "--crash-loop-limit", "1000",
                "--backoff-initial", "100ms", "--backoff-max", "1s", ready=False)
    # Into the loop: several deaths in, the backoff is growing.
    wait_for(lambda: c.metric("hello_cluster_worker_spawns_total") >= 6, 10,
             what="the crash loop to get going")
    before, t0 = cpu_seconds(c.pid), time.monotonic()
    time.sleep(3.0)
    used = cpu_seconds(c.pid) - before
    assert used < 0.3 * (time.monotonic() - t0), f"master used {used:.2f}s CPU in 3s"
    assert c.proc.poll() is None
    assert c.metrics_get("/livez")[0] == 200
    assert c.metrics_get("/readyz")[0] == 503
    assert c.metric("hello_cluster_worker_backoff_seconds") <= 1.0


def test_random_kills_under_load(cluster) -> None:
    """SIGKILL a random worker every 200 ms for 10 s under load: the pool heals fully."""
    c = cluster("--workers", "3", "--backoff-max", "500ms", workers=3)
    kills = 0
    rng = random.Random(7)
    with Load(c.port, max_seconds=30) as load:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            workers = c.workers()
            if workers:
                try:
                    os.kill(rng.choice(workers), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        last_kill = time.monotonic()
        wait_for(lambda: len(c.workers()) == 3
                 and c.metric("hello_cluster_workers_ready") == 3, 5, what="full pool")
        recovered = time.monotonic() - last_kill
    assert c.proc.poll() is None
    assert recovered < 1.5, f"pool full again {recovered:.2f}s after the last kill"
    assert c.metric("hello_cluster_worker_backoff_seconds") == 0
    deaths = len(re.findall(r"signal, killed by SIGKILL", c.log))
    assert deaths == kills
    assert c.metric('hello_cluster_worker_restarts_total{reason="signal"}') == kills
    assert load.ok > 100
    # Every failed request is a connection a killed worker had accepted: at most one or a
    # few per kill, never a refused connection (the master's listener stays open).
    assert not any("Refused" in f for f in load.failures), load.failures[:5]
    assert len(load.failures) <= 3 * kills


def test_hung_worker_is_killed_and_async_sleep_is_not(cluster) -> None:
    c = cluster("--workers", "2", "--app", "hc_testapp:app", "--worker-timeout", "2s",
                workers=2)
    # A slow async request keeps the loop turning: never mistaken for a hang.
    assert c.get("/slow?s=4", timeout=10)[0] == 200
    assert c.metric('hello_cluster_worker_restarts_total{reason="timeout"}') == 0

    def blocked() -> None:
        try:
            c.get("/block?s=30", timeout=20)
        except OSError:
            pass

    t = threading.Thread(target=blocked, daemon=True)
    t.start()
    wait_for(lambda: c.metric('hello_cluster_worker_restarts_total{reason="timeout"}') == 1,
             10, what="the hung worker to be killed")
    assert "silent for" in c.log and "(--worker-timeout)" in c.log
    wait_for(lambda: c.metric("hello_cluster_workers_ready") == 2, 5, what="pool back")
    t.join(timeout=15)


def test_ttin_ttou_without_failed_requests(cluster) -> None:
    c = cluster("--workers", "2", workers=2)
    with Load(c.port, max_seconds=30) as load:
        c.signal(signal.SIGTTIN)
        wait_for(lambda: c.metric("hello_cluster_workers_ready") == 3
                 and len(c.workers()) == 3, 5, what="3 workers")
        for expected in (2, 1):  # one at a time: the kernel merges a pending duplicate
            c.signal(signal.SIGTTOU)
            wait_for(lambda n=expected: c.metric("hello_cluster_workers_desired") == n, 5,
                     what=f"{expected} desired")
        wait_for(lambda: len(c.workers()) == 1
                 and c.metric("hello_cluster_workers_desired") == 1, 10, what="1 worker")
        c.signal(signal.SIGTTOU)  # never below one
        wait_for(lambda: "scale: staying at 1 workers" in c.log, 5, what="the refusal")
        assert c.metric("hello_cluster_workers_desired") == 1
        load.wait_more(20)
    assert load.failures == []
    assert load.ok > 50
    assert "scale-down" in c.log


def test_max_requests_recycles_without_failed_requests(cluster) -> None:
    c = cluster("--workers", "2", "--max-requests", "200", "--max-requests-jitter", "50",
                workers=2)
    first = set(c.workers())
    with Load(c.port, max_seconds=30) as load:
        wait_for(lambda: c.log.count("(max-requests)") >= 2, 20, what="two recyclings")
    assert load.failures == []
    wait_for(lambda: c.metric("hello_cluster_workers_ready") == 2, 5, what="pool back")
    assert not first & set(c.workers()) or c.log.count("(max-requests)") >= 2
    assert c.metric('hello_cluster_worker_restarts_total{reason="exit"}') == 0
    # Planned replacements are recycles, never restarts.
    assert c.metric('hello_cluster_worker_recycles_total{reason="max_requests"}') >= 2


def test_oom_kill_is_classified(cluster) -> None:
    """A worker the kernel's OOM killer ends is counted as `oom`, not a plain signal."""
    limit = {"memory.limit_in_bytes": str(256 * 1024 * 1024)}
    with v1_cgroup("memory", limit) as enter:
        c = cluster("--workers", "1", "--app", "hc_testapp:app", preexec_fn=enter, workers=1)
        try:
            c.get("/hog?mb=400", timeout=10)
        except OSError:
            pass  # the worker died under the request
        wait_for(lambda: c.metric('hello_cluster_worker_restarts_total{reason="oom"}') == 1,
                 10, what="an oom restart")
        assert c.metric('hello_cluster_worker_restarts_total{reason="signal"}') == 0
        assert re.search(r"pid \d+ oom, killed by SIGKILL", c.log)
        wait_for(lambda: c.metric("hello_cluster_workers_ready") == 1, 5, what="respawn")
        c.kill_all()


def test_a_slow_import_is_not_a_hang(cluster) -> None:
    """Before READY a worker has no event loop to beat from: --worker-timeout (1 s here)
    does not apply to a 2 s import; --startup-timeout does."""
    c = cluster("--workers", "2", "--app", "hc_slowimport:app", "--worker-timeout", "1s",
                workers=2)
    assert "killing it" not in c.log
    assert c.metric('hello_cluster_worker_restarts_total{reason="timeout"}') == 0


def test_a_start_past_the_startup_timeout_is_killed_and_said(cluster) -> None:
    c = cluster("--workers", "1", "--app", "hc_slowimport:app", "--startup-timeout", "1s",
                "--crash-loop-limit", "2", env={"HC_SLOW_IMPORT_SECONDS": "30"}, ready=False)
    assert c.wait_exit(30) == 5
    assert "not ready after 1." in c.log and "(--startup-timeout)" in c.log
