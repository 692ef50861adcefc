"""The memory benchmark (bench/memory.py) still measures what it says, against the real binary.

Issue 17's bench figures (total PSS of a heavy app's pool, hello-cluster plain against
`--preload` and the peers) come from this instrument. A 2-worker run of hello-cluster plain
and `--preload` over the real heavy app (Starlette, 100 MB of objects) takes about 15 s and
fails here, not in the middle of a long run, when the process tree, /proc's figures or the
sharing move.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

from conftest import BIN, ROOT, clean_env, need


def run_bench(out: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(ROOT / "bench" / "memory.py"), "--workers", "2",
            "--only", "hc,hc-preload", "--no-timing", "--no-chart", "--out", str(out),
            "--logs", str(out / "logs"), "--hc", str(BIN)]
    proc = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # memory.py stops its server on SIGTERM
        stdout, _ = proc.communicate(timeout=60)
        raise AssertionError(f"memory.py did not finish in 120 s:\n{stdout}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout)


def test_preload_shares_the_heavy_app_and_every_process_is_measured(tmp_path: Path) -> None:
    need(importlib.util.find_spec("starlette") is not None,
         "needs starlette for bench/heavy_app.py: .venv/bin/pip install -e '.[test]'")
    done = run_bench(tmp_path)
    assert done.returncode == 0, done.stdout
    [result] = tmp_path.glob("*.json")
    doc = json.loads(result.read_text())
    plain, preload = doc["runs"]
    assert (plain["contender"], preload["contender"]) == ("hc", "hc-preload")
    for run in (plain, preload):
        assert run["errors"] == [], run["errors"]
        assert run["traffic"]["errors"] == {} and run["traffic"]["workers_answered"] == 2
        mem = run["memory"]
        assert mem["measured"] == mem["count"] and mem["workers"] == 2
        assert all(p["pss_kib"] > 0 and p["uss_kib"] > 0 and p["rss_kib"] >= p["pss_kib"]
                   for p in mem["processes"]), mem["processes"]
        assert [p["role"] for p in mem["processes"]].count("supervisor") == 1
    roles = {p["role"] + ("/template" if "template" in p["cmdline"] else "")
             for p in preload["memory"]["processes"]}
    assert roles == {"supervisor", "worker", "other/template"}, roles
    assert len(plain["memory"]["processes"]) == 3  # master and 2 workers, nothing else
    # Each plain worker holds its own copy of the app's 100 MB; forked from the template,
    # the workers share it, so the whole tree costs less even with the template counted.
    assert plain["memory"]["worker_uss_median_mib"] > 80, plain["memory"]
    assert preload["memory"]["worker_uss_max_mib"] < plain["memory"]["worker_uss_median_mib"] / 3
    assert preload["memory"]["pss_total_mib"] < plain["memory"]["pss_total_mib"] - 50, (
        preload["memory"]["pss_total_mib"], plain["memory"]["pss_total_mib"])
    # gc.freeze() in the template keeps a full collection in the workers off the shared pages.
    assert preload["gc"]["all"] and plain["gc"]["all"]
    assert preload["memory_after_gc"]["pss_total_mib"] < (
        plain["memory_after_gc"]["pss_total_mib"] - 50), (preload["memory_after_gc"],
                                                          plain["memory_after_gc"])
    md = result.with_suffix(".md").read_text()
    assert "| hello-cluster --preload | " in md and "n/a (not measured)" in md
