"""In-process checks of fastproto.FastProtocol for cases uvicorn's own suite leaves out."""

from __future__ import annotations

import asyncio
import logging
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


@pytest.mark.parametrize("served", ["asgi", "asgi eager", "wsgi threads", "wsgi loop"])
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
    if served == "asgi eager":
        app = eager(reads_body)
    elif served != "asgi":
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


# The eager start (FastProtocol._run_eager): an app that declares `hello_cluster_eager`
# has its first step run without a Task, and a Task only if it waits on something.

def eager(inner: Any) -> Any:
    """`inner` as an app that declares `hello_cluster_eager = True`."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await inner(scope, receive, send)

    app.hello_cluster_eager = True  # type: ignore[attr-defined]
    return app


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def connected(app: Any) -> tuple[FastProtocol, Transport]:
    config = uvicorn.Config(app, lifespan="off", log_config=None, proxy_headers=False)
    proto = FastProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    proto.connection_made(transport)
    return proto, transport


async def settle(proto: FastProtocol) -> None:
    await asyncio.wait_for(asyncio.gather(*proto.tasks), 5)


def test_an_eager_app_that_never_waits_is_answered_without_a_task() -> None:
    """The built-in page declares itself eager: its response is written within
    data_received, with no Task and no callback left for the loop."""
    from hello_cluster.app import BODY
    from hello_cluster.app import app as builtin

    async def main() -> None:
        proto, transport = connected(builtin)
        assert proto.eager
        for n in range(1, 4):
            proto.data_received(GET)
            assert not proto.tasks  # answered already, on this call's stack
            assert transport.out.count(b"HTTP/1.1 200 OK") == n and transport.out.endswith(BODY)
        proto.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert b"HTTP/1.1 405 Method Not Allowed" in transport.out and not proto.tasks
        proto.connection_lost(None)

    asyncio.run(main())
    plain, _ = asyncio.run(_plain_protocol())
    assert not plain.eager  # an app that does not declare it gets a Task per request


async def _plain_protocol() -> tuple[FastProtocol, Transport]:
    return connected(hello)


def test_an_eager_app_that_waits_continues_in_a_task() -> None:
    """An eager app that waits after its response start: its head goes out at the end of
    that first step (a streaming head is never held back for the body), the rest runs in a
    Task that asyncio.current_task() names, that is in `tasks` (what shutdown waits for)
    and counted in flight, and the response completes."""
    from hello_cluster.http.running import requests_running as _requests_running
    from hello_cluster.system import stackdump

    seen: dict[str, Any] = {}
    release = asyncio.Event()

    async def streams(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["first step task"] = asyncio.current_task()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"4")]})
        await release.wait()
        seen["rest task"] = asyncio.current_task()
        await send({"type": "http.response.body", "body": b"late"})

    async def main() -> None:
        proto, transport = connected(eager(streams))
        # As the loop calls it in a worker: from a callback, with no task running.
        asyncio.get_running_loop().call_soon(proto.data_received, GET)
        await asyncio.sleep(0)
        assert len(proto.tasks) == 1 and _requests_running(proto.tasks) == 1
        assert transport.out == b""  # the head waits for the end of the step...
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert transport.out.startswith(b"HTTP/1.1 200 OK") and b"late" not in transport.out
        (task,) = proto.tasks  # the hang dump sees where the app waits, as for any Task
        assert "streams" in [f.function for f in stackdump.coroutine_frames(task.get_coro())]
        release.set()
        await settle(proto)
        assert transport.out.endswith(b"\r\n\r\nlate") and not proto.tasks
        assert seen["rest task"] is not None and seen["rest task"].done()
        proto.connection_lost(None)

    asyncio.run(main())
    assert seen["first step task"] is None  # what the app promised not to need


def test_cancelling_an_eager_request_cancels_what_it_waits_on() -> None:
    """uvicorn cancels the requests still running when a worker's graceful timeout ends:
    cancelling the Task of an eager request raises CancelledError where the app waits,
    the app's own cleanup runs, and the client gets the 500 a Task-run app's would."""
    seen: list[str] = []

    async def waits(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    async def main() -> None:
        proto, transport = connected(eager(waits))
        proto.data_received(GET)
        (task,) = proto.tasks
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait_for(task, 5)  # Cycle.run answers for it, as for a Task-run app
        assert not proto.tasks
        assert transport.out.startswith(b"HTTP/1.1 500 Internal Server Error")
        proto.connection_lost(None)

    asyncio.run(main())
    assert seen == ["cancelled", "cleaned up"]


def test_an_eager_app_fails_only_its_own_request_and_keeps_its_context() -> None:
    """An eager app that raises in its first step gets the 500 a Task-run app gets; a
    context variable it sets stays in its request's context, as in a Task's copy."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    async def flaky(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(var.get())
        var.set("set by a request")
        if scope["path"] == "/boom":
            raise ValueError("the app's typo")
        await hello(scope, receive, send)

    async def main() -> bytes:
        proto, transport = connected(eager(flaky))
        proto.data_received(GET)
        proto.data_received(GET)
        proto.data_received(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle(proto)
        proto.connection_lost(None)
        return transport.out

    out = asyncio.run(main())
    assert seen == ["unset", "unset", "unset"]
    assert var.get() == "unset"
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert out.endswith(b"HTTP/1.1 500 Internal Server Error\r\n" + out.split(
        b"HTTP/1.1 500 Internal Server Error\r\n", 1)[1]) and b"Internal Server Error" in out


def test_a_long_pipeline_to_an_eager_app_is_answered_in_order() -> None:
    """3,000 pipelined requests in one read to an eager app: the first is run eagerly, the
    rest in turn as Tasks (the first's completion starts the next), so the stack never
    grows with the pipeline, and every answer goes out in order."""
    async def numbered(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = scope["path"][1:].encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    count = 3000

    async def main() -> bytes:
        proto, transport = connected(eager(numbered))
        proto.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                                     for i in range(count)))
        for _ in range(count * 2):  # bounded: one request per loop turn or so
            if not proto.tasks and not proto.pipeline:
                break
            await asyncio.sleep(0)
        proto.connection_lost(None)
        return transport.out

    out = asyncio.run(main())
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in out.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [str(i).encode() for i in range(count)]


def test_header_blocks_are_checked_once_and_never_cached_wrong() -> None:
    """A response start's header block is remembered per (status, headers): a bad start
    is refused every time it comes (a 500, never remembered as good), pairs that cannot be
    remembered (lists, a bytearray) are still checked and sent, the same length twice is
    sent once, and distinct starts (a length per body) do not grow the cache past its
    bound."""
    from hello_cluster.http import fastproto

    starts: list[Any] = [
        [(b"content-length", b"2"), (b"content-length", b"3")],  # refused: 500
        [[b"content-length", b"2"], [b"x-list", b"pair"]],  # lists: not hashable
        [(b"content-length", b"2"), (b"x-bytearray", bytearray(b"v"))],
        [(b"content-length", b"2"), (b"content-length", b"2")],  # the same length twice
    ]

    async def answers(scope: dict[str, Any], receive: Any, send: Any) -> None:
        index = int(scope["path"][1:])
        if index < len(starts):
            headers, body = starts[index], b"ok"
        else:  # a distinct length per request
            body = b"x" * index
            headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def main() -> list[bytes]:
        out = []
        for path in [0, 1, 2, 3, 0, 1, 2, 3, *range(4, 4 + 2 * fastproto.BLOCK_CACHE_MAX)]:
            proto, transport = connected(answers)
            proto.data_received(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            await settle(proto)
            proto.connection_lost(None)
            out.append(transport.out)
            assert len(fastproto._BLOCKS) <= fastproto.BLOCK_CACHE_MAX
        return out

    out = asyncio.run(main())
    for first, again in ((out[0], out[4]), (out[1], out[5]), (out[2], out[6]),
                         (out[3], out[7])):
        assert first.split(b"\r\n")[0] == again.split(b"\r\n")[0]
    assert out[0].startswith(b"HTTP/1.1 500") and out[4].startswith(b"HTTP/1.1 500")
    assert b"x-list: pair\r\n" in out[1] and out[1].endswith(b"\r\n\r\nok")
    assert b"x-bytearray: v\r\n" in out[2] and out[2].endswith(b"\r\n\r\nok")
    assert out[3].count(b"content-length: 2\r\n") == 1 and out[3].endswith(b"ok")
    assert all(o.startswith(b"HTTP/1.1 200 OK") for o in out[8:])


# The eager start against the Task start, as a differential: the same app behaviour, as a
# script of steps, must put the same bytes on the wire either way and leave the connection
# in the same state. Hypothesis writes the scripts.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

STEPS = st.lists(st.sampled_from(
    ["yield", "wait", "receive", "start", "start-chunked", "body", "last", "raise",
     "return"]), max_size=8)
REQUESTS = st.sampled_from([
    GET,
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    GET + GET,  # pipelined: the second runs as a Task behind the first either way
    b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
])


def scripted(steps: list[str]) -> Any:
    """An app that does `steps` in order: waits (a bare yield, a timer), reads, starts a
    response (with a length or chunked), sends body parts, raises or returns early."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        for step in steps:
            if step == "yield":
                await asyncio.sleep(0)
            elif step == "wait":
                await asyncio.sleep(0.001)
            elif step == "receive":
                await receive()
            elif step == "start":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", b"4")]})
            elif step == "start-chunked":
                await send({"type": "http.response.start", "status": 200, "headers": []})
            elif step == "body":
                await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            elif step == "last":
                await send({"type": "http.response.body", "body": b"cd"})
            elif step == "raise":
                raise ValueError("scripted")
            else:
                return
    return app


def serve_script(app: Any, request: bytes) -> tuple[bytes, bool]:
    async def main() -> tuple[bytes, bool]:
        proto, transport = connected(app)
        asyncio.get_running_loop().call_soon(proto.data_received, request)
        await asyncio.sleep(0)
        for _ in range(100):  # bounded: a script that waits ends within a few loop turns
            if not proto.tasks and not proto.pipeline:
                break
            await asyncio.sleep(0.001)
        closed_by_server = transport.closed
        proto.connection_lost(None)  # the client leaves: an app waiting on receive() wakes
        await asyncio.wait_for(asyncio.gather(*proto.tasks), 5)
        return transport.out, closed_by_server

    return asyncio.run(main())


@settings(max_examples=120, deadline=10_000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, request=REQUESTS)
def test_an_eager_start_answers_as_a_task_start(steps: list[str], request: bytes) -> None:
    """Whatever the app does (wait before or after its start, read, stream, fail, return
    early, misbehave), started eagerly it gets exactly the bytes and the close it gets
    when started in a Task."""
    logging.disable(logging.ERROR)  # the scripts' errors are logged by design
    try:
        as_task = serve_script(scripted(steps), request)
        as_eager = serve_script(eager(scripted(steps)), request)
    finally:
        logging.disable(logging.NOTSET)
    assert as_eager == as_task
