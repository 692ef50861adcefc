"""`--http fast`: an HTTP/1.1 protocol of our own on httptools (llhttp stays the parser).

uvicorn's HttpToolsProtocol spends most of a small request outside the parser: a
RequestResponseCycle and an asyncio.Event per request, a scope dict filled key by key, two
regex searches and a lower() per response header, two transport writes per response (head,
then body: two send() syscalls), a keep-alive timer armed and cancelled per request, and
request metrics as an ASGI middleware (one more coroutine frame and closure). This module
keeps uvicorn's behaviour (the same scope, the same framing rules, the same errors, the
same websocket hand-over, graceful shutdown through `server_state`) and changes only how it
is done:

- one write per response when the app sends `http.response.start` and then its body in the
  same step: the head waits for the first body message (or for the end of the task's step,
  via one call_soon, so a streaming response's head is never held back);
- response header lines validated once and cached by (name, value), plus the date and
  default headers encoded once per second;
- the request Event is replaced by a future made only when the app really waits for body;
- one timer per connection for both the keep-alive and the request-head deadline, armed
  when the connection first goes idle and re-armed when it fires early, instead of a timer
  armed and cancelled on every request;
- request metrics counted here (the same RequestMetrics counters and names) instead of in
  a middleware.

It also keeps what policy.py decides for both protocols: the lossless drain (an idle
connection gets IDLE_GRACE to bring one last request, answered with `connection: close`),
the request-head limits (MAX_HEAD_BYTES counted on the head's own bytes, 431; HEAD_TIMEOUT
from the head's first byte, 408), the RFC refusals (check_request), trailers bounded like a
head and never merged into the headers, errors that wait for the responses owed before
them, room at --limit-concurrency (make_room closes idle connections, oldest first, before
any 503) and a bounded pipeline (reading stays paused while pipelined requests wait). What
the app sends is checked by appcheck.py before it is written.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import urllib.parse
from collections import deque
from typing import Any

import httptools
from mypy_extensions import mypyc_attr
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
from uvicorn.protocols.utils import is_ssl
from uvicorn.server import ServerState

from hello_cluster.http.appcheck import (
    BODILESS,
    CHUNKED,
    LENGTH,
    LINES,
    frame,
    header_line,
    status_line,
    unframed,
)
from hello_cluster.http.policy import (
    ACCEPTED,
    GOOD_HOSTS,
    HEAD_TIMEOUT,
    IDLE_GRACE,
    INVALID_REQUEST,
    LENIENCIES,
    MAX_DISCARD_BYTES,
    MAX_HEAD_BYTES,
    MAX_TRAILER_BYTES,
    RESPONSE_400,
    RESPONSE_408,
    RESPONSE_431,
    RESPONSE_HTTP09,
    check_request,
    http09,
    make_room,
    parser_refusal,
    trailer_refusal,
)
from hello_cluster.http.running import end_request, finish_request, requests_running, run_request

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE_LINE = b"connection: close\r\n"
_CHUNKED_LINE = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


EAGER = "hello_cluster_eager"  # an ASGI app with this attribute True is started eagerly
_defaults: list[Any] = [None, b""]  # the server's default_headers list and its encoding


def _default_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's server replaces default_headers (with the date) once a second: encode once."""
    if _defaults[0] is not headers:
        _defaults[1] = b"".join(b"".join((n.lower(), b": ", v, b"\r\n")) for n, v in headers)
        _defaults[0] = headers
    encoded: bytes = _defaults[1]
    return encoded


class Block:
    """A response start's checked header lines and what they say (see `_header_block`),
    with the whole head made from them for the server's current default headers."""

    __slots__ = ("status_line", "lines", "framing", "length", "has_close", "defaults", "head")

    def __init__(self, status_line: bytes, lines: bytes, framing: bool | None, length: int,
                 has_close: bool) -> None:
        self.status_line = status_line
        self.lines = lines
        self.framing = framing  # True: chunked, False: a content-length, None: neither
        self.length = length
        self.has_close = has_close
        self.defaults: Any = None  # the default_headers list `head` was made with
        self.head = b""  # status line, default lines, the app's lines (no final CRLF)

    def head_for(self, defaults: list[tuple[bytes, bytes]]) -> bytes:
        """The head up to its last line: joined once per block and per default_headers
        list (uvicorn replaces that list, with the date, once a second)."""
        if self.defaults is not defaults:
            self.head = b"".join((self.status_line, _default_lines(defaults), self.lines))
            self.defaults = defaults
        return self.head


_BLOCKS: dict[tuple[int, tuple[Any, ...]], Block] = {}
BLOCK_CACHE_MAX = 256  # distinct (status, headers) starts remembered, then forgotten at once


def _header_block(status: int, headers: Any) -> Block:
    """The app's status and header lines for a response start, checked (appcheck).

    Raises AppError if the start cannot be sent. An app answers most requests with the
    same status and headers (the built-in page always does), so the whole block is
    remembered by (status, header pairs), which are bytes and so immutable; pairs that are
    not hashable (lists, bytearrays) are checked every time.
    """
    if type(status) is not int:  # 200.0 == 200 would find the int's block
        status_line(status)  # raises AppError
    items = tuple(headers)
    key = (status, items)
    try:
        hit = _BLOCKS.get(key)
    except TypeError:
        return _check_block(status, items)
    if hit is None:
        hit = _check_block(status, items)
        if len(_BLOCKS) >= BLOCK_CACHE_MAX:
            _BLOCKS.clear()  # per-request values (cookies, ids) must not grow it
        _BLOCKS[key] = hit
    return hit


def _check_block(status: int, headers: tuple[Any, ...]) -> Block:
    head_line = status_line(status)
    lines: list[bytes] = []
    framing: bool | None = None
    length = 0
    has_close = False
    lines_get = LINES.get
    for name, value in headers:
        try:
            hit = lines_get((name, value))
        except TypeError:  # unhashable: header_line handles it
            hit = None
        line, what, size = hit if hit is not None else header_line(name, value)
        if what:
            if what in (LENGTH, CHUNKED):
                if unframed(status, what):
                    continue  # framing a body that cannot be there: not sent
                if framing is not None:  # a second one: the same length is sent once,
                    frame(framing, length, what, size)  # else refused
                    continue
                framing, length = what == CHUNKED, size
            else:
                has_close = True
        lines.append(line)
    return Block(head_line, b"".join(lines), framing, length, has_close)


def _address(transport: asyncio.BaseTransport, name: str) -> tuple[str, int] | None:
    """uvicorn's get_local_addr / get_remote_addr, from the address the transport holds.

    uvicorn asks `get_extra_info("socket")` and calls getsockname() / getpeername() on it:
    under uvloop that makes a socket object twice and costs five syscalls per connection
    (uvloop has read both addresses already when the connection was made, and keeps them
    as "sockname" / "peername"). The same result: (host, port) from an IPv4 or IPv6
    address, None for a unix socket's path.
    """
    info = transport.get_extra_info(name)
    if isinstance(info, (list, tuple)) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


_LOGGER = logging.getLogger("uvicorn.error")
_ACCESS_LOGGER = logging.getLogger("uvicorn.access")
_by_config: dict[int, tuple[Any, ...]] = {}


def _settings(config: Config) -> tuple[Any, ...]:
    """What a connection takes from uvicorn's Config, worked out once per Config."""
    found = _by_config.get(id(config))
    if found is None or found[0] is not config:
        if not config.loaded:
            config.load()
        if len(_by_config) > 64:  # tests make many configs; a worker has one
            _by_config.clear()
        found = _by_config[id(config)] = (
            config, config.loaded_app, config.ws_protocol_class, config.root_path,
            config.root_path.encode("ascii"),
            {"version": config.asgi_version, "spec_version": "2.3"},
            config.limit_concurrency, config.timeout_keep_alive,
            _ACCESS_LOGGER.hasHandlers(),  # as uvicorn decides it
            getattr(config.loaded_app, EAGER, False) is True)
    return found


@mypyc_attr(allow_interpreted_subclasses=True)  # with_metrics subclasses it
class FastProtocol(asyncio.Protocol):
    """One connection. Same constructor as uvicorn's protocols, so uvicorn.Config(http=...)
    and uvicorn's own protocol tests instantiate it unchanged."""

    metrics: Any = None  # a RequestMetrics, set on a subclass by `with_metrics`
    first_bound = 0.0  # its first bucket's bound (most requests land there)
    logger = _LOGGER
    access_logger = _ACCESS_LOGGER

    @classmethod
    def with_metrics(cls, metrics: Any) -> type[FastProtocol]:
        # The run (RequestMetrics.run_count) is only for bulk-added buckets: else never.
        first_bound = (metrics._bounds[0] if metrics is not None  # noqa: SLF001
                       and metrics._bulk else -1.0)  # noqa: SLF001
        # Under the names below, not as `metrics` itself: compiled (mypyc), `self.metrics`
        # reads the instance's own slot and never sees a subclass's class attribute, so
        # __init__ copies these in.
        return type(cls.__name__, (cls,), {"_class_metrics": metrics,
                                           "_class_first_bound": first_bound})

    # Per-connection state starts from these class-level defaults: a new connection (one
    # per request with `Connection: close`) sets only what it must.
    transport: asyncio.Transport = None  # type: ignore[assignment]
    server: tuple[str, int | None] | None = None
    client: tuple[str, int] | None = None
    scheme = "http"
    cycle: Cycle | None = None
    read_paused = False
    write_paused = False
    drained: asyncio.Future[None] | None = None
    draining = False
    # One timer for the keep-alive and head deadlines (see _check_deadline).
    timeout_keep_alive_task: asyncio.TimerHandle | None = None
    armed_for = (0.0, 0.0)  # (since, limit): the timer firing means that deadline passed
    since = 0.0  # start of the current wait for a head (connect, last response, first byte)
    head_started = False  # bytes of the next head have arrived
    served = False  # a response was sent: the wait for the next head is keep-alive
    # Per request, filled by the parser callbacks.
    url = b""
    headers: list[tuple[bytes, bytes]] = []  # replaced (never appended to) per message
    head_bytes = 0  # the open head's url and header lines, as parsed
    head_open = False  # between on_message_begin and on_headers_complete
    head_new = False  # the open head began in the read being parsed
    head_raw = 0  # bytes of later reads that all belong to the open head
    refused = False  # a request was refused: the parser is dead, answer no more
    owed = b""  # that refusal's answer, written once the responses before it are out
    eof = False  # the client half-closed: answer what it sent, then close
    hosts = 0  # Host lines in the open head (policy.check_request), the last in `host`
    host = b""
    te: bytes | None = None  # its Transfer-Encoding value
    body_open = False  # the request's body is still being read (head done, message not)
    completed = 0  # messages parsed whole on this connection
    discarded = 0  # body bytes read and dropped after its response was complete
    chunk_open = False  # between on_chunk_header and on_chunk_complete (data or trailers)
    chunk_data = False  # that chunk had data: not the last chunk, so no trailers
    trailer_bytes = 0  # the open trailer section's bytes so far
    trailer_since = 0.0
    expect_100 = False
    upgrading = False  # this message is a websocket upgrade we hand over (as uvicorn does)
    scope: dict[str, Any] = {}  # replaced per request
    starting: Cycle | None = None  # an eager app's request, run once the read is parsed
    # The loop the requests' coroutines run on, asked once per connection (running_loop):
    # on Python 3.11 every asyncio.get_running_loop() is a getpid() syscall (it checks for a
    # fork), about 0.18 us, once per response for the head's flush before. Not self.loop:
    # uvicorn's protocol tests construct protocols with a stand-in loop and run the
    # coroutines on the real one.
    _running: asyncio.AbstractEventLoop | None = None

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        (self.config, self.app, self.ws_protocol_class, self.root_path, self.root_path_bytes,
         self.asgi, self.limit_concurrency, self.timeout_keep_alive,
         self.access_log, self.eager) = _settings(config)
        if _loop is None:  # as uvicorn's server makes it: the loop that will run its tasks
            self.loop = self._running = asyncio.get_event_loop()
        else:  # a stand-in given by a test
            self.loop = _loop
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(**LENIENCIES)
        self.app_state = app_state
        self.server_state = server_state
        self.connections: set[Any] = server_state.connections
        self.tasks = server_state.tasks
        self.pipeline: deque[tuple[Cycle, Any]] = deque()
        metrics = getattr(type(self), "_class_metrics", None)
        if metrics is not None:
            self.metrics = metrics
            self.first_bound = getattr(type(self), "_class_first_bound")  # noqa: B009
            if metrics.count_in_flight is None:
                metrics.count_in_flight = functools.partial(requests_running, self.tasks)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        ACCEPTED[0] += 1
        self.server = _address(transport, "sockname")
        self.client = _address(transport, "peername")
        self.scheme = "https" if is_ssl(self.transport) else "http"
        self.since = time.monotonic()  # a silent new connection counts from here
        self._arm(HEAD_TIMEOUT, HEAD_TIMEOUT)
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:
            make_room(self.connections, self, limit, self.since)

    @property
    def idle(self) -> bool:
        """No request in flight or queued: protocol.make_room may close it at the limit."""
        cycle = self.cycle
        return (cycle is None or cycle.response_complete) and not self.pipeline \
            and not self.transport.is_closing()

    @property
    def head_since(self) -> float:
        return self.since  # make_room closes the longest-idle first

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.wake()
        for cycle, _ in self.pipeline:
            cycle.disconnected = True
        self.resume_writing()
        if exc is None:
            self.transport.close()
        self._disarm()
        # The parser holds this protocol's bound methods and the cycle holds the protocol:
        # both reference cycles. Broken here, a closed connection's objects (protocol,
        # transport, cycle, task: 17 per connection) are freed by reference count instead of
        # waiting for the cyclic collector, which took 9.5% of a worker's CPU under
        # `Connection: close` (perf: gc_collect_main, visit_decref). A request still running
        # keeps its cycle through its task; nothing reads self.cycle once the connection is
        # lost (no more reads, timers or drain calls reach it).
        self.parser = None  # type: ignore[assignment]
        self.cycle = None
        self.pipeline.clear()

    def eof_received(self) -> bool | None:
        """The client half-closed (shutdown(SHUT_WR)): a request it sent whole is still
        answered (RFC 9112 9.6 lets a client close its side once done), then the connection
        closes. Returning True keeps the transport open for that answer."""
        self.eof = True
        cycle = self.cycle
        if self.body_open or self.head_open:
            return None  # an unfinished request: nothing to answer
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return True
        return None

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # the parser is dead; the answer owed is written after what precedes it
        cycle = self.cycle
        if not self.head_started and not self.body_open \
                and (cycle is None or cycle.response_complete):
            self.head_started = True  # the first bytes of the next head: its deadline starts
            if self.served:  # (on a new connection it runs from the accept)
                self.since = time.monotonic()
        at_start = not self.head_open and not self.body_open
        in_trailers = self.chunk_open and not self.chunk_data
        completed = self.completed
        try:
            self.parser.feed_data(data)
            if self.head_open:  # a head still incomplete after this read
                if self.head_new:  # this read may also hold a body or earlier requests
                    self.head_new = False
                else:  # httptools holds a header being read: bound it here
                    self.head_raw += len(data)
                    if self.head_raw > MAX_HEAD_BYTES:
                        self._refuse_head()
                if http09(self.parser.get_http_version(), data):
                    self._refuse_after(RESPONSE_HTTP09)
            elif self.body_open:
                if in_trailers and self.chunk_open and not self.chunk_data:
                    self._bound_trailers(len(data))
                elif cycle is not None and cycle.response_complete:
                    self.discarded += len(data)  # answered before its body was read: the
                    if self.discarded > MAX_DISCARD_BYTES:  # rest is dropped, up to a bound
                        self.transport.close()
        except httptools.HttpParserUpgrade:
            if self._upgrade() == b"websocket" and self.ws_protocol_class is not None:
                self.handle_websocket_upgrade()
            else:
                self.logger.warning("Unsupported upgrade request.")
                if self.ws_protocol_class is None:
                    self.logger.warning(
                        "No supported WebSocket library detected. Please use \"pip install "
                        "'uvicorn[standard]'\", or install 'websockets' or 'wsproto' manually.")
        except httptools.HttpParserError as err:
            if self.head_open and self.head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()
            elif self.body_open:  # its body or trailers: the app reading it sees a disconnect
                self.logger.warning(INVALID_REQUEST)
                self._refuse_body(RESPONSE_431 if self.trailer_bytes > MAX_TRAILER_BYTES
                                  else RESPONSE_400)
            else:
                self.logger.warning(INVALID_REQUEST)
                fresh = at_start and self.completed == completed  # the line is data[0:]
                self._refuse_after(parser_refusal(err, data, fresh))
        starting = self.starting
        if starting is not None:
            self.starting = None
            self._run_eager(starting)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        if not self.head_open:  # a message's first callback (no on_message_begin: one
            self.url = url      # Python call less per request)
            self.headers = []
            self.head_bytes = len(url)
            self.head_raw = 0
            self.head_open = self.head_new = True
            self.head_started = True
            self.expect_100 = False
            self.hosts = self.trailer_bytes = 0
            self.trailer_since = 0.0
            self.te = None
        else:  # the target continues in a later read
            self.url += url
            self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise ValueError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_open:  # a trailer field: bounded like a head, never merged into
            self.trailer_bytes += len(name) + len(value) + 4  # the headers (RFC 9110 6.5.1;
            if self.trailer_bytes > MAX_TRAILER_BYTES:  # ASGI has no request trailers)
                raise ValueError("trailer section too large")
            return
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp strips leading OWS only (RFC 9112 5.1: both)
        if name == b"host":
            self.hosts += 1
            self.host = value
        elif name == b"expect":
            if value.lower() == b"100-continue":
                self.expect_100 = True
        elif name == b"transfer-encoding":
            self.te = value
        self.headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        self.head_open = False
        parser = self.parser
        method = parser.get_method().decode("ascii")
        url = self.url
        http_version = parser.get_http_version()
        if not (http_version == "1.1" and self.hosts == 1 and self.te is None
                and url[:1] == b"/" and self.host in GOOD_HOSTS):  # else the usual request
            http_version, refusal = check_request(http_version, method, url, self.hosts,
                                                  self.host, self.te)
            if refusal is not None:
                raise refusal
        self.body_open = True
        self.discarded = 0
        # find(), not `b"#" in url`: bytes.__contains__ first tries its argument as an int
        # and raises and clears a TypeError for a bytes one (about 2% of a hello request's
        # instructions, bench/instr.py).
        if url[:1] == b"/" and url.find(b"#") < 0:
            raw_path, _, query = url.partition(b"?")
        else:
            # Any: httptools' stub types URL.query as bytes, but it is None when absent,
            # and compiled (mypyc) a value against its static type is checked at run time.
            parsed: Any = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        self.scope = scope = {
            "type": "http",
            "asgi": self.asgi.copy(),
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method,
            "root_path": self.root_path,
            "path": self.root_path + path,
            "raw_path": self.root_path_bytes + raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        self.upgrading = parser.should_upgrade() and self._upgrade() == b"websocket" \
            and self.ws_protocol_class is not None
        if self.upgrading:
            return  # handed over when feed_data raises HttpParserUpgrade
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:
            make_room(self.connections, self, limit, time.monotonic())
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        keep_alive = http_version != "1.0" and parser.should_keep_alive() and not self.draining
        previous = self.cycle
        cycle = self.cycle = Cycle(self, scope, keep_alive, self.expect_100)
        self.head_started = False
        if not self.served:  # the new connection's head deadline is met; from now on the
            self._disarm()   # timer is armed when a response completes (once, then re-armed)
        if previous is None or previous.response_complete:
            self._start(cycle, app)
        else:  # pipelined: queued until the previous response is complete
            self._pause_reading()
            self.pipeline.appendleft((cycle, app))

    def on_body(self, body: bytes) -> None:
        self.chunk_data = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.upgrading:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self._pause_reading()
        cycle.wake()

    def on_chunk_header(self) -> None:
        self.chunk_open = True
        self.chunk_data = False

    def on_chunk_complete(self) -> None:
        self.chunk_open = False

    def on_message_complete(self) -> None:
        self.body_open = False
        self.completed += 1
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.upgrading:
            return
        cycle.more_body = False
        cycle.wake()

    # requests and responses

    def _start(self, cycle: Cycle, app: Any) -> None:
        if self.eager and app is self.app:
            self.starting = cycle  # data_received runs it once the parser has returned
            return
        self._start_task(cycle, app)

    def _start_task(self, cycle: Cycle, app: Any) -> None:
        # The task leaves `tasks` (what uvicorn's shutdown waits for, and what counts
        # against --limit-concurrency) at the end of running.run_request, not from a done callback,
        # which would cost one more loop callback per request. (Only a task cancelled
        # before its first step skips that; uvicorn cancels tasks only as it exits.)
        task = cycle.task = self.loop.create_task(run_request(cycle, app))
        self.tasks.add(task)

    def _run_eager(self, cycle: Cycle) -> None:
        """Run the request's first step now, in a copy of the context as a Task would, and
        make a Task only if it waits on something (see `running.resumed`).

        For an app that declares `hello_cluster_eager = True` (the built-in page): a Task
        per request is about 1.2 us of a 9 us request here (bench/micro_protocol.py), and
        an app that never waits pays it for nothing. The price is what such an app
        promises: asyncio.current_task() is None during its first step (anyio's cancel
        scopes and asyncio.timeout() need a task, so a framework app must not declare it).
        It runs after the parser returned, never inside its callbacks; a request read
        behind it (pipelined) is started as a Task, so a long pipeline never recurses."""
        # The app's coroutine is stepped here with no coroutine of ours around it (in
        # running.py, interpreted): run_request's checks after a normal end are the two
        # tests below, and anything else (a raise, a return value, a response left
        # unfinished, a wait) goes to a Task of running.py's, which answers as
        # run_request would and keeps its frames for the hang dump.
        context = contextvars.copy_context()
        cycle.eager = True
        try:
            coro = context.run(self.app, cycle.scope, cycle.receive, cycle.send)
            yielded = context.run(coro.send, None)
        except StopIteration as stop:
            if stop.value is None and cycle.response_complete:
                return  # the usual end: answered, counted, nothing to wait for
            cycle.eager = False
            self._finish_in_task(cycle, end_request(cycle, None, stop.value), context)
            return
        except BaseException as exc:  # noqa: BLE001 - the app's, answered as run_request does
            cycle.eager = False
            self._finish_in_task(cycle, end_request(cycle, exc, None), context)
            return
        cycle.eager = False
        self._finish_in_task(cycle, finish_request(cycle, coro, yielded), context)
        if cycle.head:  # a head held for its body, which has not come in this step
            cycle.head_flush = self.loop.call_soon(cycle.flush_head)

    def _finish_in_task(self, cycle: Cycle, coro: Any, context: contextvars.Context) -> None:
        task = cycle.task = self.loop.create_task(coro, context=context)
        self.tasks.add(task)

    def on_response_complete(self, cycle: Cycle) -> None:
        self.server_state.total_requests += 1
        now = time.monotonic()
        metrics = self.metrics
        if metrics is not None:
            # Timed with the clock readings this protocol takes anyway (the request's first
            # byte, this moment). A request like the one before (same method and status,
            # done within the first bucket) adds to the run: two additions, no tuple, no
            # dict, which halved what the metrics cost per request (bench/micro_protocol.py).
            cycle.counted = True
            elapsed = now - cycle.started
            if cycle.status == metrics.run_status and elapsed <= self.first_bound \
                    and cycle.scope["method"] == metrics.run_method:
                metrics.run_count += 1
                metrics.run_sum += elapsed
            else:
                metrics.observe(cycle.scope["method"], cycle.status, elapsed)
        if self.transport.is_closing():
            return
        self.since = now
        self.served = True
        if self.pipeline:  # reading stays paused: the queue is bounded by what was read
            next_cycle, app = self.pipeline.pop()
            self._start_task(next_cycle, app)
            return
        if self.owed or self.eof:  # a refusal waited for this response, or the client
            self._refuse(self.owed)  # half-closed: nothing more will come
            return
        if self.read_paused and not self.refused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.draining:
            self._disarm()
            self.timeout_keep_alive_task = self.loop.call_later(IDLE_GRACE, self._close_if_idle)
        elif self.timeout_keep_alive_task is None:
            self._arm(self.timeout_keep_alive, self.timeout_keep_alive)

    def _pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _upgrade(self) -> bytes | None:
        connection: list[bytes] = []
        upgrade = None
        for name, value in self.headers:
            if name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
            elif name == b"upgrade":
                upgrade = value.lower()
        return upgrade if b"upgrade" in connection else None

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to uvicorn's websocket protocol, replaying the head to it."""
        self.connections.discard(self)
        self._disarm()
        output = [self.scope["method"].encode(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.scope["headers"]:
            output += [name, b": ", value, b"\r\n"]
        output.append(b"\r\n")
        protocol = self.ws_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.app_state)
        protocol.connection_made(self.transport)
        protocol.data_received(b"".join(output))
        self.transport.set_protocol(protocol)

    def _refuse_head(self) -> None:
        self._refuse_after(RESPONSE_431)

    def _refuse_after(self, response: bytes) -> None:
        """Refuse the request being read: `response`, then close. Behind requests still
        being answered (a pipeline, a streaming response) it waits until they are out, so
        it never lands inside them, and nothing more is read (the parser is dead)."""
        self.refused = True
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.pipeline:
            self._refuse(response)
        elif not self.transport.is_closing():
            self.owed = response
            self._pause_reading()

    def _refuse_body(self, response: bytes) -> None:
        """Refuse the request whose body (or trailers) is being read: its app sees the
        client leave; the client gets `response` if no response began, else the close."""
        cycle = self.cycle
        if cycle is not None and self.pipeline and self.pipeline[0][0] is cycle:
            self.pipeline.popleft()  # queued, never started: refused in its turn
            self._refuse_after(response)
            return
        self.refused = True
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.wake()
            if cycle.response_started:
                self.transport.close()
                return
        self._refuse(response)

    def _bound_trailers(self, size: int) -> None:
        """A read that continued a trailer section: httptools holds the field being read,
        so the section is bounded here, in bytes and in time, like a head."""
        now = time.monotonic()
        if not self.trailer_since:
            self.trailer_since = now
        self.trailer_bytes += size
        refusal = trailer_refusal(self.trailer_bytes, self.trailer_since, now)
        if refusal is not None:
            self._refuse_body(refusal)

    def _refuse(self, response: bytes) -> None:
        if not self.transport.is_closing():
            if response:
                self.transport.write(response)
            self.transport.close()

    # deadlines and drain

    def _arm(self, delay: float, limit: float) -> None:
        self.armed_for = (self.since, limit)
        self.timeout_keep_alive_task = self.loop.call_later(delay, self._check_deadline)

    def _disarm(self) -> None:
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def _check_deadline(self) -> None:
        """The connection's one timer fired: act if a deadline passed, else re-arm.

        Waiting for a head: HEAD_TIMEOUT once its first byte came (408), the keep-alive
        timeout while silent after a response, HEAD_TIMEOUT while silent after connecting.
        Busy with a request: nothing; the timer is armed again when the response completes.
        If nothing happened since it was armed, its firing is the deadline (the loop's clock
        decides, not a comparison with ours).
        """
        self.timeout_keep_alive_task = None
        cycle = self.cycle
        if self.transport.is_closing() or not (cycle is None or cycle.response_complete) \
                or self.pipeline:
            return
        waiting_head = self.head_started or not self.served
        limit = HEAD_TIMEOUT if waiting_head else self.timeout_keep_alive
        if self.armed_for != (self.since, limit):
            left = self.since + limit - time.monotonic()
            if left > 0:
                self._arm(left, limit)
                return
        if self.head_started and not self.body_open:
            self._refuse(RESPONSE_408)
        else:
            self.transport.close()

    def shutdown(self) -> None:
        """Called by uvicorn's server when the worker drains (see protocol.py: lossless)."""
        self.draining = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._disarm()
            self.timeout_keep_alive_task = self.loop.call_later(IDLE_GRACE, self._close_if_idle)
        elif not cycle.response_started:
            # The last request parsed (queued ones are answered first): its head, still to
            # come, says `connection: close`.
            cycle.keep_alive = False
        # Otherwise its head already promised keep-alive and the client will send its next
        # request as soon as the body is in: on_response_complete grants the idle grace.

    def _close_if_idle(self) -> None:
        self.timeout_keep_alive_task = None
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop running this connection's requests (see `_running`)."""
        loop = self._running
        if loop is None:
            loop = self._running = asyncio.get_running_loop()
        return loop

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's name for closing an idle connection; kept for callers that use it."""
        if not self.transport.is_closing():
            self.transport.close()


class Cycle:
    """One request and its response: the ASGI `receive` and `send` of that request."""

    # Class-level defaults: a new Cycle sets only what differs per request (the rest is
    # written when it changes), which costs less than filling every slot.
    body = b""
    more_body = True
    delivered_last = False
    waiter: asyncio.Future[None] | None = None
    disconnected = False
    response_started = False
    response_complete = False
    chunked = False
    length = 0
    head = b""  # the response head, until it goes out with the first body bytes
    status = 500
    head_flush: asyncio.Handle | None = None
    task: asyncio.Task[None] | None = None
    counted = False  # in the request metrics (when its response completed)
    eager = False  # in an eager first step: the head's flush is left to _run_eager

    def __init__(self, proto: FastProtocol, scope: dict[str, Any], keep_alive: bool,
                 expect_100: bool) -> None:
        self.proto = proto
        self.scope = scope
        self.transport = proto.transport
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100
        self.started = proto.since  # the request's first byte (or the accept, or for a
        # request read with the one before it, that one's first byte): metrics time from here

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def send_500_response(self) -> None:
        await self.send({"type": "http.response.start", "status": 500, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
            (b"connection", b"close")]})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    def log_access(self, status: int) -> None:
        scope = self.scope
        client = scope["client"]
        path = urllib.parse.quote(scope["path"])
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode("ascii")
        self.proto.access_logger.info('%s - "%s %s HTTP/%s" %d',
                                      f"{client[0]}:{client[1]}" if client else "", scope["method"],
                                      path, scope["http_version"], status)

    def flush_head(self) -> None:
        """Write a response head still held back for its body (see the module docstring)."""
        self.head_flush = None
        if self.head:
            head, self.head = self.head, b""
            if not self.disconnected:
                self.transport.write(head)

    async def send(self, message: Any) -> None:
        proto = self.proto
        if proto.write_paused and not self.disconnected:
            drained = proto.drained
            if drained is None:
                drained = proto.drained = proto.running_loop().create_future()
            await drained
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            # The start is checked whole before anything of it is kept: if it fails, the
            # request's coroutine (running.py) answers 500 and the worker serves on.
            status = message["status"]
            block = _header_block(status, message.get("headers", ()))
            framing = block.framing
            self.length = block.length
            head = block.head_for(proto.server_state.default_headers)
            if block.has_close:
                self.keep_alive = False
            elif not self.keep_alive:
                head += _CLOSE_LINE
            if framing is None and self.scope["method"] != "HEAD" and status not in BODILESS:
                framing = True
                head += _CHUNKED_LINE
            self.chunked = framing is True
            if status in BODILESS:
                self.length = 0  # a 304's content-length describes what it has no body of
            self.response_started = True
            self.waiting_for_100_continue = False
            self.status = status
            if proto.access_log:
                self.log_access(status)
            self.head = head + b"\r\n"
            if not self.eager:
                self.head_flush = (proto._running or proto.running_loop()).call_soon(  # noqa: SLF001
                    self.flush_head)
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.body', but got '{kind}'.")
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            if self.scope["method"] == "HEAD":
                out = b""
                self.length = 0
            elif self.chunked:
                out = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
                if not more_body:
                    out += _LAST_CHUNK
            else:
                if len(body) > self.length:
                    raise RuntimeError("Response content longer than Content-Length")
                self.length -= len(body)
                out = body
            if self.head:
                out = self.head + out
                self.head = b""
            if out:
                self.transport.write(out)
            if not more_body:
                if self.length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.wake()
                if not self.keep_alive:
                    self.transport.close()
                proto.on_response_complete(self)
        else:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}' sent, after response already completed.")

    async def receive(self) -> dict[str, Any]:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(_CONTINUE)
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete \
                and (self.delivered_last or (self.more_body and not self.body)):
            proto = self.proto
            if proto.read_paused and proto.cycle is self and not proto.refused:
                proto.read_paused = False
                self.transport.resume_reading()
            waiter = self.waiter = proto.running_loop().create_future()
            await waiter
        if self.disconnected or self.response_complete or self.delivered_last:
            return {"type": "http.disconnect"}
        body, self.body = self.body, b""
        if not self.more_body:
            self.delivered_last = True
        proto = self.proto
        if proto.read_paused and proto.cycle is self and not proto.pipeline \
                and not proto.refused:
            proto.read_paused = False
            self.transport.resume_reading()
        return {"type": "http.request", "body": body, "more_body": self.more_body}
