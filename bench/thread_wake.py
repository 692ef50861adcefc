"""What a wake-up between two Python threads costs here, on two CPUs and on one.

A threaded WSGI worker makes two per request (the loop hands the view to a pool thread,
the thread hands the response back): this is the figure behind `--cpu-affinity auto`
(worker/affinity.py). Two threads pass a token through a pair of `queue.SimpleQueue`s
(what ViewPool waits on), N round trips, in a child process per placement so that the
pinning of one cannot leak into the other; CPU time of the process (both threads) and
wall time per round trip, medians of RUNS runs.

    .venv/bin/python bench/thread_wake.py [--n 5000] [--runs 5]   # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time


def round_trips(n: int) -> tuple[float, float]:
    """(CPU us, wall us) per round trip between this thread and an echoing one."""
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    thread = threading.Thread(target=echo)
    thread.start()
    for i in range(200):  # warm up
        there.put(i)
        back.get()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        there.put(i)
        back.get()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    there.put(None)
    thread.join()
    return cpu / n * 1e6, wall / n * 1e6


def child(n: int, runs: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before the echo thread starts: it inherits it
    results = [round_trips(n) for _ in range(runs)]
    print(json.dumps({"cpu_us": statistics.median(r[0] for r in results),
                      "wall_us": statistics.median(r[1] for r in results),
                      "ran_on": sorted(os.sched_getaffinity(0))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="round trips per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.n, args.runs, None if args.child == "free" else int(args.child))
        return
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, object] = {"cpus": cpus, "n": args.n, "runs": args.runs}
    for name, placement in (("free", "free"), ("one_cpu", str(cpus[0]))):
        done = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--runs",
                               str(args.runs), "--child", placement],
                              capture_output=True, text=True, check=True, timeout=300)
        out[name] = json.loads(done.stdout)
    out["loadavg"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
