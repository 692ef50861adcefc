"""Before / after a code change, end to end: two hello-cluster builds side by side, interleaved.

    git archive <commit> service | tar -x -C /tmp/hc-base     # the code before the change
    .venv/bin/python bench/code_ab.py --base /tmp/hc-base [--app peer_frameworks:fastapi_app]
        [--interface wsgi] [--rounds 6] [--duration 3] [--workers 2] [--close]
        [--args '--wsgi-dispatch loop'] [--new-args '--wsgi-dispatch loop']
        [--new-env UV_USE_IO_URING=0]

Both builds run the same flags and app from the project's venv (`--base DIR` holds DIR/service,
the other is this checkout's service/), on two ports for the whole measurement; wrk
alternates between them, the order reversed every other round, so the machine's other
work hits both alike. Each run records requests/s and the server's CPU per request
(utime + stime of its whole process group over the run / requests served, from /proc),
the steadier figure on a shared machine. Prints one JSON line per round, then the medians
of the per-round ratios new / base with their range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import peers  # noqa: E402


def start(name: str, service: Path, extra: list[str], workers: int,
          own_env: dict[str, str] | None = None) -> tuple[h.Proc, int]:
    """hello-cluster from `service` on a free port, returned once every worker answered."""
    port = h.free_port()
    code = (f"import sys; sys.path.insert(0, {str(service)!r}); "
            "from hello_cluster.cli import main; sys.exit(main())")
    argv = [str(peers.MAIN_BIN / "python"), "-c", code,
            *peers.hello_argv(port, h.free_port(), workers, extra)[1:]]
    env = {**peers.clean_env(), "PYTHONPATH": str(peers.BENCH), **(own_env or {})}
    log = peers.WORK / "logs" / f"code_ab-{name}.log"
    proc = h.Proc(argv, env, log)
    when, _ = h.wait_for_pids(port, workers, time.monotonic() + 30)
    if when is None:
        proc.stop()
        raise SystemExit(f"bench: the {name} build did not start; see {log}")
    return proc, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="directory holding the old service/")
    ap.add_argument("--app", default=None, help="MODULE:ATTR (bench/ is on the path)")
    ap.add_argument("--interface", default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--close", action="store_true", help="Connection: close, not keep-alive")
    ap.add_argument("--args", default="",
                    help="flags for both builds, e.g. '--wsgi-dispatch loop' to compare a "
                    "change on that path")
    ap.add_argument("--new-args", default="",
                    help="flags for the new build only, e.g. '--wsgi-dispatch loop' (with "
                    "--base . the same code with and without a flag)")
    ap.add_argument("--new-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the new build only (repeatable), e.g. "
                    "UV_USE_IO_URING=0 with --base .")
    args = ap.parse_args(argv)
    new_env = dict(item.split("=", 1) for item in args.new_env)
    extra = ["--request-metrics"]
    if args.app:
        extra += ["--app", args.app]
    if args.interface:
        extra += ["--interface", args.interface]
    extra += args.args.split()
    builds = {"base": Path(args.base) / "service", "new": peers.ROOT / "service"}
    procs: dict[str, tuple[h.Proc, int]] = {}
    try:
        for name, service in builds.items():
            own = args.new_args.split() if name == "new" else []
            procs[name] = start(name, service, [*extra, *own], args.workers,
                                new_env if name == "new" else None)
        for _, port in procs.values():
            h.wrk(port, 1, args.close)  # warm-up, discarded
        rows: list[dict[str, float]] = []
        for i in range(args.rounds):
            order = list(procs) if i % 2 == 0 else list(reversed(procs))
            row: dict[str, float] = {}
            for name in order:
                proc, port = procs[name]
                before = h.group_cpu_s(proc.pid)
                r = h.wrk(port, args.duration, args.close)
                cpu = (h.group_cpu_s(proc.pid) - before) * 1e6 / max(r.requests, 1)
                row[f"{name}_rps"], row[f"{name}_cpu_us"] = round(r.rps), round(cpu, 2)
            rows.append(row)
            print(json.dumps({"round": i + 1, "first": order[0], **row}), flush=True)
        summary: dict[str, object] = {"mode": "close" if args.close else "keep-alive",
                                      "app": args.app or "built-in", "rounds": args.rounds,
                                      "duration_s": args.duration, "workers": args.workers,
                                      "args": args.args, "new_args": args.new_args,
                                      "new_env": new_env,
                                      "loadavg": round(os.getloadavg()[0], 2)}
        for key in ("rps", "cpu_us"):
            ratios = [r[f"new_{key}"] / r[f"base_{key}"] for r in rows if r[f"base_{key}"]]
            summary[f"new_over_base_{key}"] = round(statistics.median(ratios), 3)
            summary[f"new_over_base_{key}_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
            for name in builds:
                summary[f"{name}_{key}"] = statistics.median(r[f"{name}_{key}"] for r in rows)
        print(json.dumps(summary), flush=True)
    finally:
        for proc, _ in procs.values():
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
