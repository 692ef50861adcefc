"""Chaos soak: load on the app port while a driver kills, stops, reloads and rescales.

CI runs 30 s; `make soak` runs it for HC_SOAK_SECONDS (300 by default there).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess  # nosec B404
import time
from pathlib import Path

import pytest

from conftest import Load, alive, children, wait_for

SECONDS = float(os.environ.get("HC_SOAK_SECONDS", "30"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def zombies(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            out.append(child)
    return out


@pytest.mark.slow
def test_chaos_soak(cluster) -> None:
    # A worker stopped for good before it was ready is judged by --startup-timeout, not
    # --worker-timeout (ci34: one stopped 20 ms into its start outlived the final wait
    # under the default 60 s): 3 s here, still far above a start under CI load (< 0.1 s).
    c = cluster("--workers", "3", "--worker-timeout", "2s", "--startup-timeout", "3s",
                "--backoff-max", "500ms", "--graceful-timeout", "5s", workers=3)
    for _ in range(50):  # warm up: the first scrapes and requests allocate for good
        c.get("/")
        c.metrics_get("/metrics")
    fds0, rss0 = fd_count(c.pid), rss_kb(c.pid)
    rng = random.Random(2026)
    kills: list[tuple[float, int]] = []  # (when, pid) of every SIGKILL the driver sent
    stopped_for_good: list[tuple[float, int]] = []
    actions = {"kill": 0, "stop-cont": 0, "stop-hang": 0, "hup": 0, "ttin": 0, "ttou": 0}

    def scaled_to(n: int) -> None:
        """The master took the signal in: the next one is not merged with it."""
        wait_for(lambda: c.metric("hello_cluster_workers_desired") == n, 5,
                 what=f"{n} workers desired")

    with Load(c.port, max_seconds=SECONDS + 60) as load:
        end = time.monotonic() + SECONDS
        desired = 3
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.1, 0.4))
            action = rng.choices(list(actions), weights=[6, 2, 1, 1, 1, 1])[0]
            workers = [p for p in c.workers() if alive(p)]
            if action in ("kill", "stop-cont", "stop-hang") and not workers:
                continue
            actions[action] += 1
            if action == "kill":
                victim = rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append((time.monotonic(), victim))
                except ProcessLookupError:
                    actions[action] -= 1
            elif action == "stop-cont":
                victim = rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGSTOP)
                    time.sleep(0.3)  # well under --worker-timeout: must not be killed
                    os.kill(victim, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            elif action == "stop-hang":
                victim = rng.choice(workers)
                try:
                    os.kill(victim, signal.SIGSTOP)  # never continued: a hang
                    stopped_for_good.append((time.monotonic(), victim))
                except ProcessLookupError:
                    pass
            elif action == "hup":
                c.signal(signal.SIGHUP)
            elif action == "ttin" and desired < 5:
                desired += 1
                c.signal(signal.SIGTTIN)
                scaled_to(desired)  # the kernel merges a pending duplicate signal
            elif action == "ttou" and desired > 1:
                desired -= 1
                c.signal(signal.SIGTTOU)
                scaled_to(desired)
        # A worker stopped for good in the last seconds is caught by --worker-timeout (2 s),
        # or --startup-timeout (3 s) if it was not ready yet, plus the stack wait (0.5 s) and
        # the kill grace (2 s): wait for every process the driver hit to be gone.
        hit_pids = [pid for _, pid in kills + stopped_for_good]
        try:
            wait_for(lambda: not any(alive(p) for p in hit_pids), 15,
                     what="every process the driver hit to be reaped")
        except AssertionError:
            left = {p: Path(f"/proc/{p}/stat").read_text() for p in hit_pids if alive(p)}
            master = Path(f"/proc/{c.pid}/stat").read_text()
            spy = shutil.which("py-spy")
            if spy is not None:  # where the master was, if py-spy is installed
                master += subprocess.run([spy, "dump", "--pid", str(c.pid)],  # nosec B603
                                         capture_output=True, text=True, timeout=30).stdout
            raise AssertionError(f"still alive: {left}; master: {master}; stopped: "
                                 f"{stopped_for_good}; log tail: {c.log[-1500:]}") from None
        wait_for(lambda: c.metric("hello_cluster_workers_desired") == desired
                 and c.metric("hello_cluster_workers_ready") == desired
                 and len(c.workers()) == desired, 20, what="the pool to converge")
    assert c.proc.poll() is None, "the master died"
    # A child is a zombie until the master's next turn reaps it: none may stay.
    wait_for(lambda: not zombies(c.pid), 5, what="no zombie children")
    log = c.log
    # Every process the driver hit (SIGKILL, or SIGSTOP for good) shows up exactly once in
    # the master's log: as an unplanned death with its reason, or as a planned end when it
    # was already draining (reload, scale-down). The counters match those lines exactly.
    unplanned = dict(re.findall(r"pid (\d+) (exit|signal|timeout|oom), ", log))
    planned = set(re.findall(r"pid (\d+) ended \(", log))
    aborted = set(re.findall(r"reload failed: new worker pid (\d+) died before", log))
    hit = {str(pid) for _, pid in kills} | {str(pid) for _, pid in stopped_for_good}
    for pid in hit:
        # (a new worker killed before it was ready aborts its reload: said by that line)
        recorded = [pid in unplanned, pid in planned, pid in aborted]
        assert recorded.count(True) == 1, f"pid {pid} recorded twice or never: {recorded}"
    assert set(unplanned) <= hit, "an unplanned death the driver did not cause"
    reasons = list(unplanned.values())
    for reason in ("signal", "timeout", "exit", "oom"):
        assert c.metric(f'hello_cluster_worker_restarts_total{{reason="{reason}"}}') == \
            reasons.count(reason), reason
    assert reasons.count("exit") == 0
    unplanned_kills = [pid for _, pid in kills if str(pid) in unplanned]
    # No leak per respawn: the master's fds and memory return to where they started (a
    # connection or pipe the master is closing this turn is no leak; a leaked fd stays).
    try:
        # each worker beyond the 3 it started with holds 2 of the master's fds (its pipe,
        # its slot's listening socket)
        grown = 2 * max(0, desired - 3)
        wait_for(lambda: fd_count(c.pid) <= fds0 + grown + 2, 5,
                 what="the master's fds to settle")
    except AssertionError:
        fds = Path(f"/proc/{c.pid}/fd")
        raise AssertionError(f"{fd_count(c.pid)} fds, {fds0} at the start: "
                             f"{sorted(os.readlink(fd) for fd in fds.iterdir())}") from None
    assert rss_kb(c.pid) <= rss0 + 8 * 1024, (rss0, rss_kb(c.pid))
    total = load.ok + len(load.failures)
    rate = len(load.failures) / max(1, total)
    print(f"\nchaos: {actions}; requests {total}, failed {len(load.failures)} "
          f"({rate:.3%}); kills {len(kills)} ({len(unplanned_kills)} unplanned), "
          f"hangs {len(stopped_for_good)}")
    # Every failed request is explained by a kill or hang that landed on its worker: a
    # SIGKILL loses what that worker had accepted, a frozen worker's connections time out.
    deaths = len(kills) + len(stopped_for_good)
    assert len(load.failures) <= 3 * deaths, load.failures[:10]
    assert not any("Refused" in f for f in load.failures), load.failures[:10]
