"""What request metrics cost end to end: the defaults against --no-request-metrics, interleaved.

    .venv/bin/python bench/metrics_ab.py [--rounds 8] [--duration 5] [--workers 2] [--close]

The full bench (run.py) measures each contender once per round, always in the same order,
so with 3 rounds the metrics on / off ratio moves by several percent with the machine's
other work, more than the effect it is after (about 0.2 us of a 9 us request in-process,
bench/micro_protocol.py). Here both clusters run side by side for the whole measurement
(started once, on two ports) and wrk alternates between them, swapping which goes first
every round, so slow drifts hit both alike; the result is the median of the per-round
ratios. Prints one JSON line per round and a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import peers  # noqa: E402


def start(name: str, extra: list[str], workers: int) -> tuple[h.Proc, int]:
    """hello-cluster on a free port, returned once every worker has answered."""
    port = h.free_port()
    log = peers.WORK / "logs" / f"{name}.log"
    proc = h.Proc(peers.hello_argv(port, h.free_port(), workers, extra), peers.clean_env(), log)
    when, _ = h.wait_for_pids(port, workers, time.monotonic() + 30)
    if when is None:
        proc.stop()
        raise SystemExit(f"bench: hello-cluster {' '.join(extra)} did not start; see {log}")
    return proc, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--close", action="store_true", help="Connection: close instead of keep-alive")
    args = ap.parse_args(argv)
    on, on_port = start("metrics_ab-on", [], args.workers)
    off = None
    try:
        off, off_port = start("metrics_ab-off", ["--no-request-metrics"], args.workers)
        h.wrk(on_port, 1, args.close)  # warm both
        h.wrk(off_port, 1, args.close)
        ratios = []
        for i in range(args.rounds):
            order = [("on", on_port), ("off", off_port)]
            if i % 2:
                order.reverse()
            rps = {name: h.wrk(port, args.duration, args.close).rps for name, port in order}
            ratio = rps["on"] / rps["off"] if rps["off"] else None
            if ratio is not None:
                ratios.append(ratio)
            print(json.dumps({"round": i + 1, "first": order[0][0], **rps,
                              "on_over_off": round(ratio, 3) if ratio else None}), flush=True)
        print(f"metrics on / off ({'Connection: close' if args.close else 'keep-alive'}, "
              f"{args.workers} workers, {len(ratios)} rounds): median "
              f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    finally:
        on.stop()
        if off is not None:
            off.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
