"""In-process checks of fastproto.FastProtocol for cases uvicorn's own suite leaves out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from hello_cluster.http.fastproto import FastProtocol


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8085), "peername": ("127.0.0.1", 40000)}.get(
            name, default)

    def write(self, data: Any) -> None:
        self.out += bytes(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def reads_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
    message = await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok" if not message["more_body"]
                else b"no"})


def test_upgrade_without_websocket_support_is_plain_http() -> None:
    """With no websocket library (ws="none") an upgrade request is served as HTTP, and an
    app that reads the (empty) body gets it instead of waiting forever."""

    async def main() -> bytes:
        config = uvicorn.Config(reads_body, ws="none", lifespan="off", log_config=None,
                                proxy_headers=False)
        proto = FastProtocol(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        proto.connection_made(transport)
        proto.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
                            b"Upgrade: websocket\r\n\r\n")
        await asyncio.wait_for(asyncio.gather(*proto.tasks), 5)
        proto.connection_lost(None)
        return transport.out

    out = asyncio.run(main())
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"ok"), out


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"hi"})


def test_drain_answers_every_pipelined_request() -> None:
    """A worker draining with pipelined requests queued answers them all, and only the
    last answer says `connection: close`."""

    async def main() -> Transport:
        config = uvicorn.Config(hello, lifespan="off", log_config=None, proxy_headers=False)
        proto = FastProtocol(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        proto.connection_made(transport)
        proto.data_received(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        proto.shutdown()
        for _ in range(500):  # bounded: 5 s
            if transport.closed:
                break
            await asyncio.sleep(0.01)
        proto.connection_lost(None)
        return transport

    transport = asyncio.run(main())
    answers = transport.out.split(b"HTTP/1.1 200 OK")[1:]
    assert len(answers) == 3, transport.out
    assert [b"connection: close" in a for a in answers] == [False, False, True]


def test_request_metrics_counted_like_the_middleware() -> None:
    """The protocol's inlined counting matches RequestMetrics.observe: counts by method and
    status, one bucket per request, the sum of durations, in-flight from running tasks."""
    from prometheus_client import CollectorRegistry

    from hello_cluster.observe.metrics import RequestMetrics

    metrics = RequestMetrics(hello, registry=CollectorRegistry())

    async def main() -> None:
        config = uvicorn.Config(hello, lifespan="off", log_config=None, proxy_headers=False)
        cls = FastProtocol.with_metrics(metrics)
        proto = cls(config=config, server_state=ServerState(), app_state={})
        proto.connection_made(Transport())
        for method in (b"GET", b"GET", b"POST", b"GET", b"GET", b"GET"):  # runs and switches
            proto.data_received(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(asyncio.gather(*proto.tasks), 5)
        assert metrics.count_in_flight is not None and metrics.count_in_flight() == 0
        proto.connection_lost(None)

    asyncio.run(main())
    assert metrics.counts() == {("GET", 200): 5, ("POST", 200): 1}
    assert sum(metrics._buckets) == 6 and 0 < metrics._sum < 5
    assert metrics.run_count == 0  # counts() folded the run in: nothing is counted twice
    metrics.flush()
    assert metrics.counts() == {} and sum(metrics._buckets) == 0


def wsgi_ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@pytest.mark.parametrize("served", ["asgi", "wsgi threads", "wsgi loop"])
def test_a_closed_connection_leaves_no_cyclic_garbage(served: str) -> None:
    """Connections served and closed over loopback on uvloop (a request with
    `Connection: close`, a keep-alive one the client drops, one that reads a body) are freed
    by reference count: the collector finds none of their protocols, transports, cycles or
    tasks, nor the WSGI adapter's responders. Each connection left 17 such objects before
    connection_lost broke the protocol's cycles, and collecting them cost a worker 9.5% of
    its CPU under `Connection: close`."""
    import gc

    import uvloop

    from hello_cluster.http.wsgi import Responder
    from hello_cluster.worker.loader import wsgi_to_asgi

    app: Any = reads_body
    if served != "asgi":
        app = wsgi_to_asgi(wsgi_ok, 2)
        app.on_loop = served == "wsgi loop"

    requests = [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"]

    async def main() -> list[Any]:
        config = uvicorn.Config(app, lifespan="off", log_config=None, proxy_headers=False)
        config.load()
        state = ServerState()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: FastProtocol(config=config, server_state=state, app_state={}),
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def one(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            reply = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
            writer.close()
            await writer.wait_closed()
            return reply

        for request in requests:  # warm: the first connection builds caches, not garbage
            await one(request)
        await asyncio.sleep(0.05)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(10):
                for request in requests:
                    assert (await one(request)).startswith(b"HTTP/1.1 200 OK")
            for _ in range(100):  # bounded: the server sees the closes within 1 s
                if not state.connections:
                    break
                await asyncio.sleep(0.01)
            assert not state.connections
            gc.collect()
            found = [o for o in gc.garbage
                     if isinstance(o, (FastProtocol, asyncio.Task, Responder))
                     or type(o).__name__ in ("Cycle", "TCPTransport")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            server.close()
            await server.wait_closed()
        return found

    found = uvloop.run(main())
    assert not found, sorted({type(o).__name__ for o in found})
