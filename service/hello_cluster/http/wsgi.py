"""a2wsgi's WSGI-to-ASGI adapter, with a view thread that never waits for the loop to send.

a2wsgi (see loader.wsgi_to_asgi for why it is the adapter) hands each response message from
the view's thread to the loop with `run_coroutine_threadsafe(queue.put(message)).result()`:
the thread stops until the loop has run the put, three times per response (the head, the
body, the end), and the loop then needs a task of its own to take the messages out. On a
small page those round trips, not the view, set the throughput: hello-cluster served Flask
at 0.87-1.14x gunicorn gthread with it (bench/results/wsgi/).

Here the thread puts a message on a deque and wakes the loop only if no wake-up is pending,
so the head, the body and the end of a small response usually reach the loop in one wake;
the request's own coroutine sends them (no second task) and learns that the view returned
from the same deque (no executor future to wait for). The environ is a2wsgi's, built with
less work per request (environ.py). Everything else is a2wsgi's: the streamed
`wsgi.input`, `start_response`, the iteration of the body.

Streaming and backpressure are kept: each message is handed over as soon as the view makes
it, and the thread blocks once `send_queue_size` messages are waiting for the loop (instead
of the bounded asyncio.Queue), so a view that yields faster than the client reads does not
grow memory. The thread takes a lock only when it has to wait: a `threading.Semaphore` (a
Condition and a lock in Python, three acquires and three releases a response) cost more
than the small view it guarded.

The views run in ViewPool, ThreadPoolExecutor's rule (a thread per view up to the limit,
an idle thread reused first) without what a pool that returns results needs: no Future
(with its Condition) and no work item per view, since the view's outcome comes back on the
deque anyway.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from a2wsgi import WSGIMiddleware as _A2wsgiMiddleware
from a2wsgi.wsgi import Body, WSGIResponder

from hello_cluster.http.deadline import CURRENT
from hello_cluster.http.environ import EnvironBuilder

_DONE = object()  # the view returned (or raised): no more messages for this response
_LOG = logging.getLogger("hello_cluster.wsgi")


def _has_body(scope: Any) -> bool:
    """The request may bring a body (a length other than 0, or any transfer coding)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" 0")):
            return True
    return False


class ViewPool:
    """Threads that run views: up to `threads`, started as needed, idle ones reused first.

    ThreadPoolExecutor's growth rule (a new thread only when none is idle, never more than
    the limit; further views wait in the queue) with a deque of idle tokens instead of its
    semaphore and nothing per call but one queue entry. Threads are daemons: a worker ends
    with os._exit, after its graceful drain has waited for the views it was serving.
    The idle tokens are an upper bound, as that semaphore's count is: a thread that finds a
    queued job takes it without its token being taken. An extra token can only make a later
    view wait for the next free thread instead of starting one more below the limit, which
    ThreadPoolExecutor accepts the same way; the limit itself always holds.
    """

    def __init__(self, threads: int, name: str = "WSGI") -> None:
        self.limit = max(1, threads)
        self.name = name
        self.jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self.idle: deque[None] = deque()  # one token per thread about to wait for a job
        self.threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.jobs.put((fn, args))
        try:
            self.idle.pop()  # an idle thread will take it (deque ops are atomic)
        except IndexError:
            if len(self.threads) < self.limit:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self.name}_{len(self.threads)}")
                self.threads.append(thread)
                thread.start()

    def shutdown(self) -> None:
        """Let every thread end once the jobs queued before this are done."""
        for _ in self.threads:
            self.jobs.put(None)

    def _work(self) -> None:
        get, idle = self.jobs.get, self.idle
        while True:
            job = get()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001  (a view's errors are handled inside fn)
                _LOG.exception("a WSGI pool job failed")
            del job, fn, args  # nothing of the request outlives it while the thread idles
            idle.append(None)


class Responder(WSGIResponder):
    """One request: the view runs in the pool, its messages are sent by this coroutine."""

    inline = False  # the view is running on the loop's thread (see _run_inline)

    def __init__(self, app: Any, pool: ViewPool, send_queue_size: int,
                 on_loop: bool, environ: EnvironBuilder) -> None:
        # Not WSGIResponder.__init__: it builds the asyncio.Queue this class does not use.
        self.app = app
        self.pool = pool
        self.environ = environ
        self.on_loop = on_loop
        self.loop = asyncio.get_running_loop()
        self.response_started = False
        self.exc_info: Any = None
        self.outbox: deque[Any] = deque()
        self.limit = send_queue_size  # messages waiting for the loop before the view waits
        self.space: threading.Condition | None = None  # made when the view first waits
        self.blocked = False  # the view waits for room in the outbox
        self.wake_pending = False
        self.waiter: asyncio.Future[None] | None = None
        self.failed: BaseException | None = None  # what the view raised
        self.broken = False  # sending failed: later messages are dropped, not queued

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = Body(self.loop, receive)
        environ = self.environ.build(scope, body)
        context = contextvars.copy_context()
        if self.on_loop and not _has_body(scope) and CURRENT.get() is None:
            body._has_more = False  # noqa: SLF001  (nothing to read: never asks the loop)
            self.inline = True
            context.run(self._run_inline, environ)
        else:
            self.pool.submit(context.run, self._run_view, environ)
        try:
            error = await self._send_all(send)
        except asyncio.CancelledError:
            # Nobody will take the view's messages now: unblock its thread and make its
            # next send raise, so the view ends instead of holding a pool thread forever.
            self.broken = True
            self._make_room()
            raise
        if error is not None:
            raise error
        if self.failed is not None:
            raise self.failed
        if self.exc_info is not None:
            raise self.exc_info[0].with_traceback(self.exc_info[1], self.exc_info[2])

    async def _send_all(self, send: Any) -> BaseException | None:
        """Send what the view hands over until it returns; what sending raised, if it did."""
        outbox = self.outbox
        error: BaseException | None = None
        while True:
            if not outbox:
                self.waiter = self.loop.create_future()
                if not outbox:  # the thread may have filled it between the two checks
                    await self.waiter
                self.waiter = None
                continue
            message = outbox.popleft()
            if message is _DONE:
                break
            if outbox and outbox[0] is not _DONE and message.get("more_body") \
                    and outbox[0].get("type") == "http.response.body" \
                    and not outbox[0].get("body") and not outbox[0].get("more_body"):
                # The last chunk followed by the empty end: one message that ends the body.
                outbox.popleft()
                message = {"type": "http.response.body", "body": message["body"]}
            if self.blocked:
                self._make_room()
            try:
                if error is None:
                    await send(message)
            except Exception as exc:  # noqa: BLE001  (raised once the view is done)
                error = exc
                self.broken = True
                self._make_room()
        return error

    def _make_room(self) -> None:
        """Wake the view if it waits for room in the outbox (or for the response to end)."""
        space = self.space
        if space is not None:
            with space:
                space.notify()

    # The view's thread.

    def _run_view(self, environ: Any) -> None:
        request = CURRENT.get()  # under --request-timeout: say which thread runs the view
        if request is not None:
            request.view_thread = threading.get_ident()
        try:
            self.wsgi(environ, self.start_response)
        except BaseException as exc:  # noqa: BLE001  (handed to the loop, raised there)
            self.failed = exc
        finally:
            if request is not None:
                request.view_thread = None
            self._hand_over(_DONE)

    def _run_inline(self, environ: Any) -> None:
        """--wsgi-dispatch loop: the view runs here, on the loop's thread, as a gunicorn sync
        worker runs it; its body is iterated here too until `send_queue_size` messages wait
        (a large or slow stream), and the rest of the iteration moves to a pool thread, which
        then waits for the client as a threaded view does. Nothing here may block on the
        loop, so the request has no body to read and send() never waits (see __call__)."""
        iterable: Any = None
        try:
            iterable = self.wsgi_app(environ)
            iterator = iter(iterable)
            for chunk in iterator:
                self._hand_over({"type": "http.response.body", "body": chunk,
                                 "more_body": True})
                if len(self.outbox) >= self.limit:
                    self.inline = False
                    self.pool.submit(contextvars.copy_context().run, self._finish,
                                     iterable, iterator)
                    return
        except BaseException as exc:  # noqa: BLE001  (handed to the loop, raised there)
            self.failed = exc
            self._end(iterable)
            return
        self._finish(iterable, iterator)  # the iterator is spent: the end, close, done

    def _finish(self, iterable: Any, iterator: Any) -> None:
        """The rest of a body begun on the loop: in a pool thread, or on the loop once the
        body is all out (see _run_inline)."""
        try:
            for chunk in iterator:
                self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.send({"type": "http.response.body", "body": b""})
        except BaseException as exc:  # noqa: BLE001
            self.failed = exc
        self._end(iterable)

    def _end(self, iterable: Any) -> None:
        """Close the view's iterable (PEP 3333), then tell the loop the view is done."""
        close = getattr(iterable, "close", None)
        if close is not None:
            try:
                close()
            except BaseException as exc:  # noqa: BLE001
                if self.failed is None:
                    self.failed = exc
        self._hand_over(_DONE)

    def wsgi_app(self, environ: Any) -> Any:
        return self.app(environ, self.start_response)

    def send(self, message: Any) -> None:
        """Called by a2wsgi's `start_response` and `wsgi` for each message, in the thread
        (or on the loop for a view it runs, which never waits here: see _run_inline)."""
        if self.inline:
            self._hand_over(message)
            return
        if len(self.outbox) >= self.limit and not self.broken:
            self._wait_for_room()
        if self.broken:  # the response is gone: end the view (its iterable is closed)
            raise ConnectionError("the response can no longer be sent")
        self._hand_over(message)

    def _wait_for_room(self) -> None:
        """Block the view's thread until the loop has taken messages out (backpressure).

        `blocked` is set before the outbox is looked at again and the loop looks at
        `blocked` after taking a message out, so one of the two always sees the other: the
        view never sleeps through the message that made room. The wait is re-checked every
        second anyway.
        """
        if self.space is None:
            self.space = threading.Condition(threading.Lock())
        with self.space:
            self.blocked = True
            try:
                while len(self.outbox) >= self.limit and not self.broken:
                    self.space.wait(1.0)
            finally:
                self.blocked = False

    def _hand_over(self, message: Any) -> None:
        self.outbox.append(message)
        if not self.wake_pending and not self.inline:  # inline: _send_all runs next
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self._wake)

    # The loop.

    def _wake(self) -> None:
        # Cleared before the waiter runs: a message appended after this point either is
        # seen by the coroutine's next look at the deque or schedules a new wake.
        self.wake_pending = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class WSGIMiddleware(_A2wsgiMiddleware):
    """a2wsgi's middleware (lifespan, websocket refusal) with Responder and ViewPool."""

    def __init__(self, app: Any, workers: int = 10, send_queue_size: int = 10) -> None:
        # Not a2wsgi's __init__: it starts the ThreadPoolExecutor this class does not use.
        self.app = app
        self.send_queue_size = send_queue_size
        self.pool = ViewPool(workers)
        self.on_loop = False  # --wsgi-dispatch loop (set by the worker)
        self.environ = EnvironBuilder()

    @property
    def hello_cluster_eager(self) -> bool:
        """Under --wsgi-dispatch loop the fast protocol starts each request without a Task
        (fastproto.FastProtocol._run_eager): a view run inline is done in that first step,
        and one handed to the pool gets its Task when it first waits, as before. Nothing of
        a WSGI view looks for the current Task. With threads every request waits for its
        view and would make its Task at that first wait anyway: an in-process A/B of
        eager threads showed no gain, so they keep their Task from the start."""
        return self.on_loop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await Responder(self.app, self.pool, self.send_queue_size,
                            self.on_loop, self.environ)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


