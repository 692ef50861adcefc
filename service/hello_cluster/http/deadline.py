"""--request-timeout: a bound on one HTTP request, without killing its worker.

An ASGI wrapper around the app (worker/process.py applies it innermost, so the metrics and
the access log see its 504). Each HTTP request's app coroutine runs as a task of its own;
the request's coroutine waits for it with a timer. At the deadline:

- It notes where the app's coroutine waits (its chain of awaits; for a WSGI view, the
  view thread's stack), then cancels the task: CancelledError is raised at that await, so
  the app's `finally` blocks and context managers run.
- No response begun: the client gets 504 (with `connection: close`: the app may have left
  the request body half read). Begun: RequestTimedOut is raised to the protocol, and both
  protocols (fast and uvicorn) close the connection after a response that has begun; the
  protocol's own traceback line for it is filtered out, the one line below says it all.
- One log line (method, path, where it waited, what the client got) and
  hello_cluster_request_timeouts_total.
- An app that catches the CancelledError and goes on is given CANCEL_GRACE to end; then it
  is logged as such, the connection is closed (504 with `connection: close` if nothing was
  sent) and the task is left to finish: every send it makes from then on raises.

A WSGI view runs in a thread, which Python cannot interrupt: the client gets its 504 at the
deadline, the adapter stops taking the view's output (wsgi.py: its next write raises, its
iterable is closed), and the thread runs on until the view returns; the timeout is counted
like any other. WebSocket and lifespan scopes pass through untouched.

Off by default; with it, a request costs one task and one timer more (docs/observability.md
has the figure).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
from typing import Any

from hello_cluster.http.accesslog import escape
from hello_cluster.observe.metrics import TIMEOUT_METRIC
from hello_cluster.system import stackdump

log = logging.getLogger("hello_cluster.worker")

CANCEL_GRACE = 1.0  # how long a cancelled app may take to unwind before it counts as going on
_BODY = b"504 Gateway Timeout: the request took too long\n"
_HEAD = {"type": "http.response.start", "status": 504, "headers": [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(_BODY)).encode()), (b"connection", b"close")]}


class RequestTimedOut(Exception):
    """Raised to the protocol after the response began: it closes the connection."""


class _Request:
    """One request's state, shared with the app's task (and a WSGI view's thread)."""

    __slots__ = ("downstream", "started", "expired", "view_thread")

    def __init__(self, downstream: Any) -> None:
        self.downstream = downstream
        self.started = False
        self.expired = False
        self.view_thread: int | None = None  # set by wsgi.py while a view runs

    async def send(self, message: dict[str, Any]) -> None:
        if self.expired:
            raise RequestTimedOut("the request ran past --request-timeout")
        if message["type"] == "http.response.start":
            self.started = True
        await self.downstream(message)


# The running request, for a WSGI view's thread to say which thread it is (wsgi.py).
CURRENT: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "hello_cluster_request", default=None)


class _OwnExceptions(logging.Filter):
    """The protocols log what the app raised with a traceback: not ours, already said."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, RequestTimedOut)


def _forget(task: asyncio.Task[Any]) -> None:
    """An app left running past its deadline: whatever it ends with was already said."""
    if not task.cancelled():
        task.exception()


async def _ended(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any],
                 timeout: float) -> bool:
    """Wait up to `timeout` for the task; True if it ended. Cancelled ourselves (the server
    is stopping), the app's task is cancelled with us."""
    waiter: asyncio.Future[bool] = loop.create_future()

    def done(_: object) -> None:
        if not waiter.done():
            waiter.set_result(True)

    def late() -> None:
        if not waiter.done():
            waiter.set_result(False)

    task.add_done_callback(done)
    timer = loop.call_later(timeout, late)
    try:
        return await waiter
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        timer.cancel()
        task.remove_done_callback(done)


class RequestTimeout:
    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self.counter: Any = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import Counter

            self.counter = Counter(TIMEOUT_METRIC,
                                   "HTTP requests still running at --request-timeout.",
                                   registry=None)
        logging.getLogger("uvicorn.error").addFilter(_OwnExceptions())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        request = _Request(send)
        token = CURRENT.set(request)
        try:
            task = loop.create_task(self.app(scope, receive, request.send))
        finally:
            CURRENT.reset(token)
        if await _ended(loop, task, self.seconds):
            task.result()  # the app's own outcome, its exception included
            return
        await self.expire(scope, send, task, request, loop)

    async def expire(self, scope: dict[str, Any], send: Any, task: asyncio.Task[Any],
                     request: _Request, loop: asyncio.AbstractEventLoop) -> None:
        if task.done():  # it ended in the same loop turn as the timer fired
            task.result()
            return
        wsgi = request.view_thread is not None
        if wsgi:
            frames = stackdump.frames_of(
                sys._current_frames().get(request.view_thread or 0))  # noqa: SLF001
        else:
            frames = stackdump.coroutine_frames(task.get_coro())
        blamed = stackdump.innermost_app(frames)
        request.expired = True
        task.cancel()
        ended = await _ended(loop, task, CANCEL_GRACE)
        went_on = not (ended and task.cancelled())
        raised = None
        if ended:
            raised = None if task.cancelled() else task.exception()
        else:
            task.add_done_callback(_forget)
        if self.counter is not None:
            self.counter.inc()
        answer = "connection closed (the response had begun)" if request.started \
            else "answered 504"
        if raised is not None:
            outcome = f"cancelled; it raised {type(raised).__name__} while unwinding; {answer}"
        elif went_on and not wsgi:
            outcome = f"the app caught the CancelledError and went on; {answer}"
        elif wsgi:
            outcome = (f"{answer}; a WSGI view cannot be cancelled: it runs on in its thread "
                       "and its output is discarded")
        else:
            outcome = f"cancelled; {answer}"
        where = blamed.short() if blamed is not None else "(no Python frame)"
        log.warning("request timeout: %s %s still running after %gs (--request-timeout), "
                    "%s in %s; %s", scope.get("method", ""), escape(scope.get("path", "")),
                    self.seconds, "the view was" if wsgi else "waiting", where, outcome,
                    extra={"fields": {"method": scope.get("method", ""),
                                      "path": scope.get("path", ""),
                                      "frame": stackdump.frame_json(blamed) if blamed else None,
                                      "response_started": request.started}})
        if request.started:
            raise RequestTimedOut("the request ran past --request-timeout")
        await send(_HEAD)
        await send({"type": "http.response.body", "body": _BODY})
