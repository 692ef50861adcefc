"""Instructions per request, counted by valgrind, for the in-process request path.

    .venv/bin/python bench/instr.py [--base /tmp/hc-base] [--cases hello,fastapi] [--n 1000]

This machine's timings swing by 20-45% from one round to the next and up to 2x from one
process start to the next, so a change worth 3-5% of a request cannot be seen in CPU
time at all (bench/code_ab.py, bench/micro_ab.py). An instruction count can: valgrind's
callgrind counts every instruction the process runs, the same count for the same code and
inputs whatever the other core is doing. It is not time (a cache miss costs more than an
add), so it is the tool for a change that removes work, with code_ab.py's end-to-end run
beside it for the claim about speed.

Each case drives the wrk request in-process through `FastProtocol` on uvloop, as
bench/micro_protocol.py does (a transport that counts writes, so no kernel), with request
metrics on as a worker runs them and the collector tuned as `--gc tuned` does:

- hello: the built-in page;
- starlette, fastapi: the apps of bench/peer_frameworks.py;
- flask-loop: bench/peer_frameworks.py's Flask app under `--wsgi-dispatch loop` (the
  threaded dispatch is left out: which thread runs when is not the same twice);
- idle: the driver's loop with no request, subtracted from every figure.

Each case runs in a child under `valgrind --tool=callgrind` twice, with N and 3N requests
after the same warm-up, and the figure is the difference over 2N: the start-up (imports,
the app's set-up) cancels out. The clock the protocol reads is made to tick 1 us a call
(see `child`), so no branch depends on how slow valgrind is: two runs of the same code
agree to a few instructions a request. With `--base DIR` (DIR/service holding the code before a
change: `git archive <commit> service | tar -x -C DIR`) the old tree is counted the same
way and the ratio given. PYTHONHASHSEED is fixed, so dict and set layouts are the same in
every child. Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess  # nosec B404
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import micro_protocol as mp  # noqa: E402

CASES = ("hello", "starlette", "fastapi", "flask-loop")
WARMUP = 300


def case_app(case: str) -> Any:
    import peer_frameworks

    from hello_cluster.app import app
    from hello_cluster.worker import loader

    if case in ("hello", "idle"):
        return app
    if case == "flask-loop":
        wrapped = loader.wsgi_to_asgi(peer_frameworks.flask_app, 32)
        wrapped.on_loop = True
        return wrapped
    return getattr(peer_frameworks, f"{case}_app")


async def drive(case: str, n: int) -> None:
    """WARMUP then n requests through one keep-alive connection, each to its end."""
    from prometheus_client import CollectorRegistry

    from hello_cluster.observe.metrics import RequestMetrics
    from hello_cluster.worker import gctune

    app = case_app(case)
    proto = mp.make_protocol("fast", app, RequestMetrics(app, CollectorRegistry()))
    gctune.tune((7000, 20, 20))
    transport = proto.transport
    sleep = asyncio.sleep
    request = b"" if case == "idle" else mp.REQUEST
    for _ in range(WARMUP + n):
        if request:
            proto.data_received(request)
        for _ in range(3):  # the request's task and anything it scheduled
            await sleep(0)
    assert transport.writes >= (WARMUP + n if request else 0), "a response is missing"
    assert not transport.closed


def child(case: str, n: int) -> None:
    """Under valgrind a request takes 20-50 times as long, so timed branches would go
    the slow way at random (a request "slower" than the first metrics bucket, a deadline
    check): time.monotonic, which the protocol and the metrics read, advances 1 us a call
    instead, as fast as a request natively is and the same in every run."""
    import itertools

    import uvloop

    ticks = itertools.count()
    time.monotonic = lambda: next(ticks) * 1e-6
    with tempfile.TemporaryDirectory(prefix="hc-bench-instr-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvloop.run(drive(case, n))


def count(service: Path, case: str, n: int) -> int:
    """The instructions callgrind counted for one child run."""
    env = dict(os.environ, PYTHONPATH=str(service), PYTHONHASHSEED="0")
    # setarch -R: the same addresses every run (no ASLR), so id()-keyed tables are alike.
    prefix = ["setarch", "-R"] if shutil.which("setarch") else []
    done = subprocess.run(  # nosec B603 B607
        [*prefix, "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--child", case, "--n", str(n)],
        env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"instr.py: the {case} child failed:\n{done.stderr[-2000:]}")
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit("instr.py: valgrind printed no instruction count")
    return int(found.group(1))


def per_request(service: Path, case: str, n: int) -> float:
    """The case's instructions per request, less the driver's own loop ("idle")."""
    def slope(which: str) -> float:
        return (count(service, which, 3 * n) - count(service, which, n)) / (2 * n)

    return slope(case) - slope("idle")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="directory holding the old service/")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n)
        return
    sides = {"new": Path(__file__).resolve().parent.parent / "service"}
    if args.base:
        sides["old"] = Path(args.base) / "service"
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"instr.py: unknown case {case!r}; the cases are {CASES}")
        row: dict[str, Any] = {"case": case, "n": args.n}
        for side, service in sides.items():
            row[f"{side}_instructions"] = round(per_request(service, case, args.n))
        if "old" in row:
            row["new_over_old"] = round(row["new_instructions"] / row["old_instructions"], 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
