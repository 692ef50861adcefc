"""The compiled protocol (http/fastproto.py built with mypyc, setup.py) is what runs, is
current, and answers exactly as its pure-Python source does.

Compiled, mypyc checks every value against its static type at run time, so a value the
types do not admit (an app's str body, a None that a library's stub calls bytes) raises
a TypeError where the interpreter would have gone on: the same source can behave
differently. The differential here drives both builds with the same client bytes and the
same app behaviour, including the ill-typed messages an app can send, and requires the same
bytes on the wire, the same close, and the same count of responses.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fastproto_unit import REQUESTS, STEPS, Transport, scripted
from test_rfc import REQUIREMENTS
from uvicorn.server import ServerState

from conftest import IN_CI, need
from hello_cluster.http import fastproto

SOURCE = Path(fastproto.__file__).with_name("fastproto.py")


def pure_module() -> ModuleType:
    """fastproto.py run by the interpreter, as a module of its own beside the compiled one."""
    from micro_ab import load  # bench/ (on the path from conftest)

    name = "hello_cluster.http.fastproto_pure"
    return sys.modules[name] if name in sys.modules else load(SOURCE, name)


def compiled() -> bool:
    return not fastproto.__file__.endswith(".py")


def test_the_protocol_is_compiled_and_current() -> None:
    """What CI tests is what ships: the extension, built from the source beside it (a
    stale one would shadow an edit of the .py; `make` rebuilds it)."""
    need(compiled(), "the protocol is not compiled: build it with `make` (mypyc, setup.py); "
         "HELLO_CLUSTER_PURE=1 builds it pure on purpose")
    # The code is in fastproto__mypyc*.so; the fastproto*.so beside it is a shim that
    # setuptools leaves as it was when it did not change.
    libraries = list(SOURCE.parent.glob("fastproto__mypyc*.so"))
    assert libraries, "no fastproto__mypyc*.so beside the compiled shim: run make"
    built = max(library.stat().st_mtime for library in libraries)
    from hello_cluster.config import protocol_build

    assert protocol_build() == "HTTP protocol compiled with mypyc"  # what --version says
    assert built >= SOURCE.stat().st_mtime, (
        f"{libraries[0].name} is older than {SOURCE.name}: run make to recompile it")


def test_pure_python_is_what_HELLO_CLUSTER_PURE_gives() -> None:
    """Without a compiler (HELLO_CLUSTER_PURE=1) the same package runs from source: the
    module imports and serves as the pure build the differential below compares against."""
    module = pure_module()
    assert module.__file__ == str(SOURCE)
    assert module.FastProtocol is not fastproto.FastProtocol


# What an app can hand `send`, typed right and wrong: each must fare the same compiled.
MESSAGES: list[Any] = [
    {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]},
    {"type": "http.response.start", "status": 200, "headers": []},
    {"type": "http.response.start", "status": 404},
    {"type": "http.response.start", "status": "200", "headers": []},
    {"type": "http.response.start", "status": 200.0, "headers": []},
    {"type": "http.response.start", "status": True, "headers": []},
    {"type": "http.response.start", "status": 200, "headers": [("content-length", "2")]},
    {"type": "http.response.start", "status": 200, "headers": [[b"x-list", b"pair"]]},
    {"type": "http.response.start", "status": 200, "headers": [(b"x", bytearray(b"v"))]},
    {"type": "http.response.start", "status": 200, "headers": None},
    {"type": "http.response.start", "status": 304, "headers": [(b"content-length", b"9")]},
    {"type": "http.response.body", "body": b"ok"},
    {"type": "http.response.body", "body": b"a", "more_body": True},
    {"type": "http.response.body", "body": bytearray(b"ok")},
    {"type": "http.response.body", "body": memoryview(b"ok")},
    {"type": "http.response.body", "body": "ok"},
    {"type": "http.response.body", "body": None},
    {"type": "http.response.body", "body": b"ok", "more_body": 1},
    {"type": "http.response.body", "body": b"ok", "more_body": None},
    {"type": "http.response.body"},
    {"type": "nonsense"},
    {},
    "not a dict",
]


def sending(messages: list[Any]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)
    return app


def serve(cls: Any, app: Any, request: bytes) -> tuple[bytes, bool, int]:
    async def main() -> tuple[bytes, bool, int]:
        config = uvicorn.Config(app, lifespan="off", log_config=None, proxy_headers=False)
        proto = cls(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        proto.connection_made(transport)
        asyncio.get_running_loop().call_soon(proto.data_received, request)
        await asyncio.sleep(0)
        for _ in range(100):  # bounded: what waits ends within a few loop turns
            if not proto.tasks and not proto.pipeline:
                break
            await asyncio.sleep(0.001)
        closed = transport.closed
        proto.connection_lost(None)
        await asyncio.wait_for(asyncio.gather(*proto.tasks, return_exceptions=True), 5)
        return transport.out, closed, proto.server_state.total_requests

    return asyncio.run(main())


CLIENT_BYTES = st.one_of(
    REQUESTS,
    st.sampled_from([req.request + req.then for req in REQUIREMENTS.values()]),
    st.binary(max_size=120).map(lambda junk: b"GET / HTTP/1.1\r\nHost: x\r\n" + junk),
)


@pytest.fixture(scope="module")
def builds() -> tuple[Any, Any]:
    need(compiled() or not IN_CI, "the protocol is not compiled: build it with `make`")
    if not compiled():
        pytest.skip("the protocol is not compiled here (make builds it): nothing to compare")
    return pure_module().FastProtocol, fastproto.FastProtocol


@settings(max_examples=int(os.environ.get("HC_COMPILED_EXAMPLES", "300")), deadline=10_000,
          derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.sampled_from(MESSAGES), max_size=4), request=CLIENT_BYTES)
def test_compiled_answers_as_pure_to_what_an_app_sends(builds: tuple[Any, Any],
                                                       messages: list[Any],
                                                       request: bytes) -> None:
    pure, native = builds
    app = sending(messages)
    assert serve(native, app, request) == serve(pure, app, request)


@settings(max_examples=120, deadline=10_000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=STEPS, request=CLIENT_BYTES)
def test_compiled_answers_as_pure_to_how_an_app_runs(builds: tuple[Any, Any],
                                                     steps: list[str], request: bytes) -> None:
    """The same app scripts as the eager-against-Task differential: waits, reads, raises."""
    pure, native = builds
    app = scripted(steps)
    assert serve(native, app, request) == serve(pure, app, request)
