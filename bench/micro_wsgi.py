"""In-process cost of a WSGI request through the fast protocol, threads and loop dispatch,
and the same for an older build side by side.

    .venv/bin/python bench/micro_wsgi.py [--base /tmp/hc-base] [--rounds 8] [--n 3200]
    .venv/bin/python bench/micro_wsgi.py --environ

The server's own WSGI path (environ, responder, hand-off, response) is a few tens of
microseconds, which the shared machine's swings hide end to end (bench/code_ab.py's rounds
of Flask vary by 20% and more). Here bench/view_cpu.py's plain view is served by
`FastProtocol` on uvloop, through transports that only count writes (as
bench/micro_protocol.py does), on CONNECTIONS connections at once: one request on each,
then every response awaited, which is the shape of wrk's load (a worker's connections take
turns, and with threads several views are in flight). CPU time of the process
(time.process_time, so both the loop's and the view threads') per request; each child
process prints the median and the minimum of RUNS runs for `threads` (the default
dispatch, 32 threads) and `loop` (`--wsgi-dispatch loop`).

With `--base DIR` (DIR/service holding the code before a change: `git archive <commit>
service | tar -x -C DIR`), children of the old and the new code alternate, the order
reversed every other round, and the summary gives each side's median over the children of
their minimums and of their medians: a process's speed here shifts by up to 2x from one
start to the next (memory layout, neighbours), so the figure is taken over many processes,
not many runs of one. The threads figures vary more (each view is a wake-up of a thread).
`--environ` times the WSGI environ alone: a2wsgi's `build_environ` against http/environ.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess  # nosec B404
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import micro_protocol as mp  # noqa: E402
from view_cpu import plain_view  # noqa: E402  (a view that does next to nothing)

CONNECTIONS = 32
RUNS = 7


class Transport(mp.CountingTransport):
    """Counts writes, tells the driver when one came, has a peer address of its own."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.written: asyncio.Future[None] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8085), "peername": ("127.0.0.1", self.port)}.get(
            name, default)

    def write(self, data: Any) -> None:
        self.writes += 1
        written = self.written
        if written is not None and not written.done():
            written.set_result(None)


async def per_request_us(on_loop: bool, n: int) -> float:
    import uvicorn
    from uvicorn.server import ServerState

    from hello_cluster.http.fastproto import FastProtocol
    from hello_cluster.worker import loader

    app = loader.wsgi_to_asgi(plain_view, 32)
    app.on_loop = on_loop
    config = uvicorn.Config(app, http=FastProtocol, lifespan="off", log_config=None,
                            access_log=False, server_header=False, proxy_headers=False)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Wed, 25 Nov 2026 10:00:00 GMT")]
    conns = []
    for i in range(CONNECTIONS):
        proto = FastProtocol(config=config, server_state=state, app_state={})
        transport = Transport(40000 + i)
        proto.connection_made(transport)
        conns.append((proto, transport))
    loop = asyncio.get_running_loop()
    batches = max(1, n // CONNECTIONS)
    t = time.process_time()
    for _ in range(batches):
        waiting = []
        for proto, transport in conns:
            transport.written = loop.create_future()
            waiting.append(transport.written)
            proto.data_received(mp.REQUEST)
        for written in waiting:
            await written
        await asyncio.sleep(0)  # the requests' tasks end
    elapsed = time.process_time() - t
    assert all(transport.writes == batches for _, transport in conns), "a response is missing"
    app.pool.shutdown()
    return elapsed / (batches * CONNECTIONS) * 1e6


def environ_us(n: int = 200_000) -> dict[str, float]:
    """`--environ`: a2wsgi's build_environ against http/environ.py alone, on a connection
    already seen and on a new one per request (3 headers, as wrk sends)."""
    from a2wsgi.wsgi import build_environ

    from hello_cluster.http.environ import EnvironBuilder

    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"),
               (b"connection", b"keep-alive")]
    scopes = [{"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
               "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 10000 + i % 50000),
               "path": "/", "root_path": "", "query_string": b"", "headers": headers}
              for i in range(n)]
    builder = EnvironBuilder("")
    out = {}
    for name, build in (("a2wsgi", build_environ), ("ours", builder.build)):
        for connections, batch in (("seen", [scopes[0]] * n), ("new", scopes)):
            t = time.process_time()
            for scope in batch:
                build(scope, None)  # type: ignore[operator]
            out[f"{name}_{connections}_us"] = round((time.process_time() - t) / n * 1e6, 2)
    return out


def child(n: int) -> dict[str, Any]:
    import uvloop

    out: dict[str, Any] = {}
    for name, on_loop in (("threads", False), ("loop", True)):
        runs = [uvloop.run(per_request_us(on_loop, n)) for _ in range(RUNS)]
        out[name] = {"median_us": round(statistics.median(runs), 2),
                     "min_us": round(min(runs), 2)}
    return out


def run_child(service: Path, n: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(service))
    done = subprocess.run([sys.executable, __file__, "--child", "--n", str(n)],  # nosec B603
                          env=env, capture_output=True, text=True, check=True, timeout=600)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="directory holding the old service/")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=3200)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--environ", action="store_true",
                    help="time the environ alone, a2wsgi's against ours (this checkout)")
    args = ap.parse_args()
    if args.environ:
        print(json.dumps(environ_us()))
        return
    if args.child:
        with tempfile.TemporaryDirectory(prefix="hc-bench-wsgi-") as metrics_dir:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            print(json.dumps(child(args.n)))
        return
    sides = {"new": Path(__file__).resolve().parent.parent / "service"}
    if args.base:
        sides["old"] = Path(args.base) / "service"
    seen: dict[tuple[str, str, str], list[float]] = {}
    for i in range(args.rounds):
        order = sorted(sides, reverse=bool(i % 2))
        for side in order:
            result = run_child(sides[side], args.n)
            print(json.dumps({"round": i + 1, "side": side, **result}), flush=True)
            for dispatch, figures in result.items():
                for figure, value in figures.items():
                    seen.setdefault((side, dispatch, figure), []).append(value)
    summary: dict[str, Any] = {"rounds": args.rounds, "n": args.n, "connections": CONNECTIONS}
    for dispatch in ("threads", "loop"):
        for figure in ("min_us", "median_us"):
            row = {side: round(statistics.median(seen[side, dispatch, figure]), 2)
                   for side in sides}
            if "old" in row:
                row["new_over_old"] = round(row["new"] / row["old"], 3)
            summary[f"{dispatch}_{figure}"] = row
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
