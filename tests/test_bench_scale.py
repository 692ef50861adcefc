"""The scale sweep (bench/scale.py) still measures what it says, against the real binary.

The sweep is the instrument issue 13's before/after figures come from, and it leans on the
master's contract (READY=1, /readyz text, metric names, the "ready in X ms" log line). A
2-worker sweep with a 1 s idle window takes about 10 s and fails here, not in the middle
of a long benchmark run, when that contract moves.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from conftest import BIN, ROOT, clean_env


def run_sweep(out: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(ROOT / "bench" / "scale.py"), "--workers", "2",
            "--reps", "1", "--idle-seconds", "1", "--no-chart", "--label", "test",
            "--out", str(out), "--hc", str(BIN)]
    proc = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # scale.py stops its pool on SIGTERM
        stdout, _ = proc.communicate(timeout=60)
        raise AssertionError(f"scale.py did not finish in 120 s:\n{stdout}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout)


def test_two_worker_sweep_measures_every_phase(tmp_path: Path) -> None:
    done = run_sweep(tmp_path)
    assert done.returncode == 0, done.stdout
    [result] = tmp_path.glob("test-*.json")
    doc = json.loads(result.read_text())
    [run] = doc["runs"]
    assert run["errors"] == [], run["errors"]
    assert 0 < run["start"]["readyz_s"] < 60 and 0 < run["start"]["notify_s"] < 60
    assert run["start"]["workers_ready_gauge"] == 2
    traffic = run["traffic"]
    assert traffic["workers_served"] == 2 and traffic["errors"] == {}
    assert traffic["requests_ok"] >= 2000
    assert run["idle"]["master_cpu_pct"] >= 0 and run["idle"]["workers_sampled"] == 2
    assert run["idle"]["master_wakes_per_s"] > 0  # 2 workers beat every 0.1 s
    scrape = run["scrape"]
    assert len(scrape["ms"]) == 10 and scrape["bytes"] > 0
    # Every request the client saw answered was counted by the workers and summed by the
    # master (flushed every 0.1 s; the idle window has passed since).
    assert scrape["http_requests_total"] >= traffic["requests_ok"]
    reload = run["reload"]
    assert reload["reloads_total"] == 1 and reload["new_workers"] == 2
    assert reload["log_complete"]
    samples = run["respawn"]["samples"]
    assert len(samples) == 2  # one kill per slot: each a first failure, no backoff
    assert [s["failure_in_a_row"] for s in samples] == [1, 1]
    assert len({s["slot"] for s in samples}) == 2
    assert all(s["new_pid"] != s["victim"] and s["ms"] > 0 for s in samples)
    assert run["resources"]["workers"] == 2 and run["resources"]["master_fds"] > 0
    assert 10 < run["resources"]["master_rss_mib"] < 200
    assert run["stop"] == {**run["stop"], "timeout": False, "exit_code": 0,
                           "left_behind": False}
    md = result.with_suffix(".md").read_text()
    assert "| 2 | " in md and "n/a (not measured)" in md  # no 128-worker row, no verdict
