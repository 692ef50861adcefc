"""Where a FastAPI and a Starlette request's time goes inside one worker, by part.

The request wrk sends is driven in-process on uvloop through both worker protocols
(`--http fast` and `--http uvicorn`, as bench/micro_protocol.py does for the hello page),
with a transport that only counts writes, for each app of bench/peer_frameworks.py and
for the built-in page:

- total: the request through the protocol, the response written, the task done;
- app alone: the app called directly with a no-op send (no protocol, no task);
- app in a Task: the same, each call in a Task of its own, as a server runs it;
- server: total minus app alone (parse, scope, the Task, send, bookkeeping);
- footprint: the hello page through the fast protocol and FastAPI alone, one after the
  other per request, against the sum of the two measured apart: what a larger per-request
  working set (caches, branch predictors) adds to both, the reason the "server" part of a
  FastAPI request is larger than the whole hello request;

For Django's ASGI handler (its view is sync: asgiref runs it in a thread) the whole request
is awaited to its end instead of one loop turn, the CPU time counts every thread, and in
place of the profile (cProfile sees one thread) it gives the same Django stack called
synchronously through its WSGI handler (what the ASGI layer adds is the difference) and
the threads started per request;

each the median of RUNS runs of N requests, CPU time of this process (time.process_time),
interleaved so background load hits all alike. Then the app alone under cProfile, its
own time (tottime) summed by the package the function lives in (fastapi, starlette,
pydantic, json, asyncio, anyio, the app module, ...), each package's share scaled to the
uninstrumented app time: cProfile's per-call overhead inflates small functions, so the
shares are approximate; the totals are not.

    .venv/bin/python bench/micro_frameworks.py [--n 5000] [--runs 5]   # one JSON object
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import micro_protocol as mp  # noqa: E402

SCOPE: dict[str, Any] = {
    "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
    "server": ("127.0.0.1", 8085), "client": ("127.0.0.1", 40000), "scheme": "http",
    "method": "GET", "root_path": "", "path": "/", "raw_path": b"/", "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8085")], "state": {}}


def receive_once() -> Any:
    """A request's `receive` as a server gives it: the (empty) body, then nothing until the
    client leaves. Django listens for that disconnect in a task of its own and refuses a
    second body; the other apps never call receive twice, so they keep the cheaper one."""
    sent = [False]

    async def receive() -> Any:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.get_running_loop().create_future()  # cancelled when the app is done
        return {"type": "http.disconnect"}

    return receive


async def alone_us(app: Any, n: int, fresh_receive: bool = False) -> float:
    """The app called directly, as a server would, with a no-op send."""
    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    t = time.process_time()
    for _ in range(n):
        await app(dict(SCOPE, state={}), receive_once() if fresh_receive else receive, send)
    return (time.process_time() - t) / n * 1e6


async def task_us(app: Any, n: int, fresh_receive: bool = False) -> float:
    """The app called in a Task of its own per request, with a no-op send."""
    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    loop = asyncio.get_running_loop()
    sleep = asyncio.sleep
    tasks = []
    t = time.process_time()
    for _ in range(n):
        tasks.append(loop.create_task(app(dict(SCOPE, state={}),
                                          receive_once() if fresh_receive else receive, send)))
        await sleep(0)
    if fresh_receive:  # an app whose view runs in a thread is not done in one turn
        await asyncio.gather(*tasks)
    elapsed = (time.process_time() - t) / n * 1e6
    t = time.process_time()
    for _ in range(n):
        await sleep(0)
    return elapsed - (time.process_time() - t) / n * 1e6


async def mixed_us(hello: Any, other: Any, n: int) -> float:
    """The hello page through the fast protocol, then `other` alone, per request."""
    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    proto = mp.make_protocol("fast", hello, None)
    sleep = asyncio.sleep
    t = time.process_time()
    for _ in range(n):
        proto.data_received(mp.REQUEST)
        await sleep(0)
        await other(dict(SCOPE, state={}), receive, send)
    elapsed = (time.process_time() - t) / n * 1e6
    t = time.process_time()
    for _ in range(n):
        await sleep(0)
    return elapsed - (time.process_time() - t) / n * 1e6


async def whole_us(kind: str, app: Any, n: int) -> float:
    mp.N = n
    total, _writes = await mp.whole_us(kind, app, None)
    return total


async def whole_awaited_us(kind: str, app: Any, n: int) -> float:
    """Request in, its task awaited to the end (for an app whose view runs in a thread)."""
    proto = mp.make_protocol(kind, app, None)
    transport = proto.transport
    t = time.process_time()
    for _ in range(n):
        proto.data_received(mp.REQUEST)
        await asyncio.gather(*list(proto.tasks))
    elapsed = (time.process_time() - t) / n * 1e6
    assert transport.writes >= n and not transport.closed, transport.writes
    return elapsed


def sync_stack_us(wsgi_app: Any, n: int) -> float:
    """The same Django view through Django's WSGI handler, called synchronously."""
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/",
               "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8085",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1:8085",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
               "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
               "wsgi.run_once": False, "wsgi.version": (1, 0)}

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    t = time.process_time()
    for _ in range(n):
        body = wsgi_app(dict(environ, **{"wsgi.input": io.BytesIO()}), start_response)
        for _chunk in body:
            pass
        body.close()
    return (time.process_time() - t) / n * 1e6


def threads_per_request(app: Any, n: int) -> float:
    """Threads the app starts per request, counted at threading.Thread.start."""
    import threading

    started = [0]
    original = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started[0] += 1
        original(self)

    threading.Thread.start = counting  # type: ignore[method-assign]
    try:
        import uvloop

        uvloop.run(alone_us(app, n, fresh_receive=True))
    finally:
        threading.Thread.start = original  # type: ignore[method-assign]
    return started[0] / n


def package_of(filename: str) -> str:
    """Which part a profiled function belongs to, from its file."""
    if filename.startswith("~") or filename == "<string>":
        return "builtins (C)"
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].split(".")[0]
    name = Path(filename).stem
    if "asyncio" in parts:
        return "asyncio"
    if name in ("peer_frameworks", "micro_frameworks", "app"):
        return "the app module / this harness"
    return name if "python3" not in filename else f"stdlib:{name}"


async def profile(app: Any, n: int) -> dict[str, float]:
    """Share of the app's own time per package (cProfile tottime), fractions summing to 1."""
    prof = cProfile.Profile()
    prof.enable()
    await alone_us(app, n)
    prof.disable()
    stats = pstats.Stats(prof)
    by: dict[str, float] = {}
    for (filename, _line, func), row in stats.stats.items():  # type: ignore[attr-defined]
        part = package_of(filename)
        if part == "builtins (C)":
            part = f"builtins: {func.split(' of ')[0].strip('<>')[:40]}"
        by[part] = by.get(part, 0.0) + row[2]
    total = sum(by.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in by.items()), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000, help="requests per run")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hc-bench-frameworks-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
    try:
        import peer_frameworks
        import uvloop

        from hello_cluster.app import app as hello

        apps = {"hello": hello, "starlette": peer_frameworks.starlette_app,
                "fastapi": peer_frameworks.fastapi_app,
                "django": peer_frameworks.django_asgi}
        threaded = {"django"}  # the view runs in asgiref's thread: awaited, not profiled
        samples: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for name, app in apps.items():
                samples.setdefault((name, "alone"), []).append(
                    uvloop.run(alone_us(app, args.n, name in threaded)))
                samples.setdefault((name, "task"), []).append(
                    uvloop.run(task_us(app, args.n, name in threaded)))
                whole = whole_awaited_us if name in threaded else whole_us
                for kind in ("fast", "uvicorn"):
                    samples.setdefault((name, kind), []).append(
                        uvloop.run(whole(kind, app, args.n)))
            samples.setdefault(("django", "sync"), []).append(
                sync_stack_us(peer_frameworks.django_wsgi, args.n))
            samples.setdefault(("mixed", ""), []).append(
                uvloop.run(mixed_us(hello, apps["fastapi"], args.n)))
        out: dict[str, Any] = {"n": args.n, "runs": args.runs, "apps": {}}
        for name, app in apps.items():
            alone = statistics.median(samples[name, "alone"])
            row: dict[str, Any] = {"app_alone_us": round(alone, 2), "app_in_task_us": round(
                statistics.median(samples[name, "task"]), 2)}
            for kind in ("fast", "uvicorn"):
                total = statistics.median(samples[name, kind])
                row[f"{kind}_total_us"] = round(total, 2)
                row[f"{kind}_server_us"] = round(total - alone, 2)
                row[f"{kind}_range_us"] = [round(min(samples[name, kind]), 2),
                                           round(max(samples[name, kind]), 2)]
            row["fast_saves_us"] = round(row["uvicorn_total_us"] - row["fast_total_us"], 2)
            row["fast_saves_pct"] = round(100 * row["fast_saves_us"] / row["uvicorn_total_us"],
                                          1)
            if name in threaded:
                sync = statistics.median(samples["django", "sync"])
                row["sync_stack_alone_us"] = round(sync, 2)
                row["asgi_layer_us"] = round(alone - sync, 2)
                row["threads_started_per_request"] = round(
                    threads_per_request(app, min(args.n, 500)), 2)
            else:
                shares = uvloop.run(profile(app, args.n))
                row["app_by_part_us"] = {k: round(v * alone, 2) for k, v in shares.items()
                                         if v * alone >= 0.1}
            out["apps"][name] = row
        apart = statistics.median(samples["hello", "fast"]) + statistics.median(
            samples["fastapi", "alone"])
        together = statistics.median(samples["mixed", ""])
        out["footprint"] = {"hello_fast_plus_fastapi_alone_apart_us": round(apart, 2),
                            "the_two_interleaved_us": round(together, 2),
                            "added_us": round(together - apart, 2)}
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
