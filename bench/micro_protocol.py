"""Per-request cost of a hello-page request inside one worker, by part, for both protocols.

`--http uvicorn` (protocol.WorkerProtocol, uvicorn's HttpToolsProtocol underneath) and
`--http fast` (fastproto.FastProtocol) are driven in-process on uvloop with the request wrk
sends, through a transport that only counts writes, so the figures are the Python cost
of the protocol, without the kernel. Parts, each the median of 7 runs of N requests:

- parse: httptools alone, feeding the request to callbacks that do nothing;
- scope: the protocol's own parser callbacks (scope, headers, cycle) minus parse;
- app: the hello app called directly with a no-op send (as bench/micro_metrics.py);
- task: creating and running an asyncio Task for a coroutine that returns at once;
- send and the rest: the whole request through the protocol minus the parts above
  (send, response head, response complete, keep-alive bookkeeping);
- metrics: the whole request with request metrics on, minus off;
- connection: a connection made and lost (what `Connection: close` adds per request).

Times are CPU time of this process (time.process_time), not wall time: the machine is
shared, and time spent descheduled is not the protocol's cost.

Each write is a send() syscall in a real worker; `write_us` is one 150-byte send() on a
loopback TCP connection, measured here too. Run with hello-cluster's venv:
`.venv/bin/python bench/micro_protocol.py` (prints one JSON object).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from typing import Any

N = 20_000
RUNS = 7
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8085\r\n\r\n"


class CountingTransport(asyncio.Transport):
    """Enough of a transport for the protocols: writes are counted, not sent."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8085), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        pass


def median_us(fn: Any) -> float:
    return statistics.median(fn() for _ in range(RUNS))


def parse_us() -> float:
    import httptools

    class Nothing:
        def on_url(self, url: bytes) -> None:
            pass

        def on_header(self, name: bytes, value: bytes) -> None:
            pass

        def on_headers_complete(self) -> None:
            pass

    def run() -> float:
        parser = httptools.HttpRequestParser(Nothing())
        t = time.process_time()
        for _ in range(N):
            parser.feed_data(REQUEST)
        return (time.process_time() - t) / N * 1e6

    return median_us(run)


def make_protocol(kind: str, app: Any, metrics: Any) -> Any:
    import uvicorn
    from uvicorn.server import ServerState

    from hello_cluster.http.fastproto import FastProtocol
    from hello_cluster.http.uvicornproto import WorkerProtocol

    if kind == "fast":
        cls: Any = FastProtocol.with_metrics(metrics)
    else:
        cls = WorkerProtocol
        if metrics is not None:
            app = metrics  # the RequestMetrics middleware, wrapping the app
    config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None,
                            access_log=False, server_header=False,
                            proxy_headers=False)  # as the workers run it (worker.py)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Wed, 25 Nov 2026 10:00:00 GMT")]
    proto = cls(config=config, server_state=state, app_state={})
    proto.connection_made(CountingTransport())
    return proto


async def head_us(kind: str, app: Any) -> float:
    """The parser callbacks of the protocol, with the app's task not started."""
    proto = make_protocol(kind, app, None)
    if kind == "fast":
        proto._start = lambda cycle, app: None
    else:
        proto._start_asgi_task = lambda cycle, app: None
    t = time.process_time()
    for _ in range(N):
        proto.data_received(REQUEST)
        proto.cycle = None
    return (time.process_time() - t) / N * 1e6


async def whole_us(kind: str, app: Any, metrics: Any) -> tuple[float, float]:
    """Request in, response written, the task done: (us per request, writes per request)."""
    proto = make_protocol(kind, app, metrics)
    transport = proto.transport
    sleep = asyncio.sleep
    t = time.process_time()
    for _ in range(N):
        proto.data_received(REQUEST)
        await sleep(0)  # the task runs in this turn of the loop, the write with it
    elapsed = (time.process_time() - t) / N * 1e6
    baseline = time.process_time()
    for _ in range(N):
        await sleep(0)
    elapsed -= (time.process_time() - baseline) / N * 1e6  # the benchmark's own turn
    assert not transport.closed
    return elapsed, transport.writes / N


async def connection_us(kind: str, app: Any) -> float:
    """A connection made and lost, no request: what `Connection: close` adds per request."""
    proto = make_protocol(kind, app, None)
    cls, config, state = type(proto), proto.config, proto.server_state
    t = time.process_time()
    for _ in range(N):
        conn = cls(config=config, server_state=state, app_state={})
        conn.connection_made(CountingTransport())
        conn.connection_lost(None)
    return (time.process_time() - t) / N * 1e6


async def task_us() -> float:
    async def nothing() -> None:
        return None

    loop = asyncio.get_running_loop()
    t = time.process_time()
    for _ in range(N):
        loop.create_task(nothing())
        await asyncio.sleep(0)
    elapsed = (time.process_time() - t) / N * 1e6
    baseline = time.process_time()
    for _ in range(N):
        await asyncio.sleep(0)
    return elapsed - (time.process_time() - baseline) / N * 1e6


async def app_us(app: Any) -> float:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}

    async def send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request"}

    t = time.process_time()
    for _ in range(N):
        await app(scope, receive, send)
    return (time.process_time() - t) / N * 1e6


def write_us() -> float:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * 150
        try:
            def run() -> float:
                spent = 0.0
                for _ in range(N // 100):
                    t = time.process_time()
                    for _ in range(100):
                        client.send(payload)
                    spent += time.process_time() - t
                    got = 0
                    while got < 100 * len(payload):
                        got += len(peer.recv(1 << 20))
                return spent / N * 1e6
            return median_us(run)
        finally:
            client.close()
            peer.close()


def run_loop(coro_fn: Any) -> float:
    import uvloop

    return median_us(lambda: uvloop.run(coro_fn()))


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="hc-bench-proto-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp  # before prometheus_client is imported
    try:
        import uvloop

        from hello_cluster.app import app
        from hello_cluster.observe.metrics import RequestMetrics

        metrics = RequestMetrics(app)
        out: dict[str, Any] = {"n": N, "runs": RUNS, "parse_us": round(parse_us(), 2),
                               "app_us": round(run_loop(lambda: app_us(app)), 2),
                               "task_us": round(run_loop(task_us), 2),
                               "write_us": round(write_us(), 2)}
        # Interleaved (protocol, metrics off/on) runs, so background load hits all alike.
        heads: dict[str, list[float]] = {"uvicorn": [], "fast": []}
        conns: dict[str, list[float]] = {"uvicorn": [], "fast": []}
        totals: dict[tuple[str, bool], list[float]] = {}
        writes: dict[str, float] = {}
        for _ in range(RUNS):
            for kind in ("uvicorn", "fast"):
                heads[kind].append(uvloop.run(head_us(kind, app)))
                conns[kind].append(uvloop.run(connection_us(kind, app)))
                for metered in (False, True):
                    total, writes[kind] = uvloop.run(
                        whole_us(kind, app, metrics if metered else None))
                    totals.setdefault((kind, metered), []).append(total)
        for kind in ("uvicorn", "fast"):
            head = statistics.median(heads[kind])
            total = statistics.median(totals[kind, False])
            with_metrics = statistics.median(totals[kind, True])
            out[kind] = {
                "total_us": round(total, 2),
                "scope_us": round(head - out["parse_us"], 2),
                "send_and_rest_us": round(total - head - out["app_us"] - out["task_us"], 2),
                "metrics_us": round(with_metrics - total, 2),
                "writes_per_request": round(writes[kind], 2),
                "with_writes_us": round(total + writes[kind] * out["write_us"], 2),
                "connection_us": round(statistics.median(conns[kind]), 2),
            }
        print(json.dumps(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
