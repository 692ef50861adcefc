"""Where a hello-cluster worker's time goes under load: py-spy on one worker, summarized.

py-spy samples the worker in --nonblocking mode (no stop-the-world pauses, so the load
run is undisturbed) while wrk keeps it busy; idle samples are dropped by py-spy, so the
percentages are shares of busy time. `metrics_pct` is the share spent in
hello_cluster.metrics.RequestMetrics and prometheus_client themselves, not in the app or
uvicorn code the middleware calls.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import harness as h
import peers

FRAME_RE = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
METRICS_FILES = ("hello_cluster/observe/metrics.py", "prometheus_client/")
TOP = 15


def _frame(raw: str) -> str:
    m = FRAME_RE.match(raw)
    return f"{m.group('fn')} ({m.group('file')})" if m else raw


def parse_raw(text: str) -> tuple[Counter[tuple[str, ...]], int]:
    """Collapsed stacks (`f1;f2;f3 count`) into counts per stack (line numbers dropped)."""
    stacks: Counter[tuple[str, ...]] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(_frame(f) for f in stack.split(";"))
        stacks[frames] += int(count)
        total += int(count)
    return stacks, total


def analyse(stacks: Counter[tuple[str, ...]], total: int) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    metrics = prom = 0
    for frames, n in stacks.items():
        for fn in set(frames):
            inclusive[fn] += n
        own[frames[-1]] += n
        if any("prometheus_client/" in f for f in frames):
            prom += n
        for i, f in enumerate(frames):
            if f.startswith("RequestMetrics.__call__ "):
                rest = frames[i + 1:]
                if all(any(m in r for m in METRICS_FILES) for r in rest):
                    metrics += n
                break
    pct = 100.0 / total if total else 0.0
    return {
        "samples": total,
        "inclusive": [(fn, n * pct) for fn, n in inclusive.most_common()
                      if n * pct < 99.5][:TOP],
        "self": [(fn, n * pct) for fn, n in own.most_common(TOP)],
        "metrics_pct": metrics * pct,
        "prometheus_client_pct": prom * pct,
    }


def profile_one(c: peers.Contender, port: int, args: argparse.Namespace, env: dict[str, str],
                logs: Path) -> dict[str, Any]:
    proc = h.Proc(c.argv, {**env, **c.env}, logs / f"{c.name}-profile.log")
    out = peers.WORK / f"profile-{c.name}.txt"
    try:
        when, pids = h.wait_for_pids(port, args.workers, time.monotonic() + 30)
        if when is None:
            return {"error": "workers did not start"}
        seconds = max(5, round(args.duration * 2))
        with h.wrk_background(port, seconds + 2) as box:
            time.sleep(1)
            spy = subprocess.run(
                [str(peers.BENCH_BIN / "py-spy"), "record", "-p", str(min(pids)), "-d",
                 str(seconds), "-o", str(out), "--format", "raw", "--nonblocking", "--rate", "250"],
                capture_output=True, text=True, timeout=seconds + 30)
        if spy.returncode != 0 or not out.exists():
            return {"error": (spy.stderr or spy.stdout).strip()[-300:]}
        stacks, total = parse_raw(out.read_text())
        result = analyse(stacks, total)
        result["rps"] = box[0].rps
        result["raw_file"] = str(out)
        return result
    finally:
        proc.stop()


def profile_all(subjects: list[peers.Contender], ports: dict[str, int],
                args: argparse.Namespace, env: dict[str, str], logs: Path
                ) -> dict[str, Any]:
    results = {}
    for c in subjects:
        try:
            results[c.label] = profile_one(c, ports[c.name], args, env, logs)
        except Exception as err:  # a failed profile must not lose the benchmark
            results[c.label] = {"error": f"{type(err).__name__}: {err}"}
        r = results[c.label]
        if "metrics_pct" in r:
            print(f"    {c.label}: {r['samples']} samples, RequestMetrics+prometheus_client "
                  f"{r['metrics_pct']:.1f}% of busy time", flush=True)
    return results
