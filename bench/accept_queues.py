"""Where `Connection: close` load waits: the accept queues and the idle CPU, steered or shared.

    .venv/bin/python bench/accept_queues.py [--rounds 3] [--workers 2] [--duration 5]

For each round, starts hello-cluster twice on loopback (the default steered SO_REUSEPORT
group, then `--reuse-port off`), runs `wrk -t1 -c64 -H "Connection: close"` against it and
meanwhile samples every 0.2 s the accept queue of each listening socket on the port (the
Recv-Q column of `ss -ltn`: connections the kernel completed that no worker has accepted
yet) and the machine's idle CPU from /proc/stat. Prints one JSON line per run and a summary.

It explains a figure of bench/run.py rather than competing with it: with random steering a
connection waits in one worker's queue even while its sibling is idle, so the queues drift
apart (one long, one empty) and the machine idles; one shared socket is drained by whichever
worker is free. See the README ("Why `Connection: close` trails with the default steering").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
from metrics_ab import start  # noqa: E402

SAMPLE_EVERY = 0.2


def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def queues(port: int) -> list[int]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=5, check=False).stdout
    return sorted((int(line.split()[1]) for line in out.splitlines() if line.strip()),
                  reverse=True)


def one_run(label: str, extra: list[str], workers: int, duration: float) -> dict[str, object]:
    proc, port = start("accept_queues", extra, workers)
    try:
        time.sleep(0.5)
        before = cpu_times()
        samples: list[list[int]] = []
        with h.wrk_background(port, duration, close=True) as box:
            end = time.monotonic() + duration - 0.3
            time.sleep(0.3)
            while time.monotonic() < end:
                samples.append(queues(port))
                time.sleep(SAMPLE_EVERY)
        after = cpu_times()
        spent = [b - a for a, b in zip(before, after, strict=True)]
        idle = 100.0 * (spent[3] + spent[4]) / max(1, sum(spent))  # idle + iowait
        gaps = [s[0] - s[-1] for s in samples if s]
        return {"run": label, "rps": round(box[0].rps) if box else None,
                "idle_cpu_pct": round(idle, 1),
                "queue_gap_median": statistics.median(gaps) if gaps else None,
                "queue_gap_max": max(gaps) if gaps else None,
                "samples": [" / ".join(map(str, s)) for s in samples[:8]]}
    finally:
        proc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args(argv)
    results: list[dict[str, object]] = []
    for _ in range(args.rounds):
        for label, extra in (("steered (default)", []), ("shared (--reuse-port off)",
                                                          ["--reuse-port", "off"])):
            row = one_run(label, extra, args.workers, args.duration)
            print(json.dumps(row), flush=True)
            results.append(row)
    for label in ("steered (default)", "shared (--reuse-port off)"):
        rows = [r for r in results if r["run"] == label]
        rps = [int(str(r["rps"])) for r in rows if r["rps"] is not None]
        print(f"{label}: req/s median {statistics.median(rps) if rps else None}, "
              f"idle CPU {[r['idle_cpu_pct'] for r in rows]}%, longest minus shortest "
              f"accept queue, median per run {[r['queue_gap_median'] for r in rows]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
