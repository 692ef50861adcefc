"""A request's coroutines under `--http fast`: the app's call with its error handling, and
the rest of a request started eagerly.

These stay interpreted when http/fastproto.py is compiled (mypyc, see docs/how-it-works.md):
the Task of a request must hold a real coroutine or generator, because asyncio accepts no
other kind (`create_task` refuses mypyc's generator objects), the hang dump follows
`cr_await` / `gi_yieldfrom` through their frames into the app's, and the in-flight gauge
recognises a request's Task by the code object of its coroutine (`requests_running`).
What runs per request inside them is a few lines; the parser callbacks and `send` around
them are what compiling saves on.
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any


async def run_request(cycle: Any, app: Any) -> None:
    """Call the app for one request; answer 500 or close if it fails or misbehaves.

    `cycle` is a fastproto.Cycle (not imported: fastproto imports this module)."""
    try:
        try:
            result = await app(cycle.scope, cycle.receive, cycle.send)
        except BaseException as exc:
            await answer_failure(cycle, exc)
        else:
            if result is not None or not cycle.response_complete:  # (else nothing to say,
                await answer_return(cycle, result)  # and no coroutine made for it)
    finally:
        settle(cycle)


def finish_request(cycle: Any, coro: Any, yielded: Any) -> Any:
    """The Task of a request started eagerly (FastProtocol._run_eager) whose first step
    waited on something: run_request, with the rest of the app's coroutine as its app."""
    return run_request(cycle, lambda *_: resumed(coro, yielded))


async def end_request(cycle: Any, raised: BaseException | None, result: Any) -> None:
    """The Task of a request started eagerly whose first step raised, returned a value
    or returned without finishing its response: answered as run_request does."""
    try:
        if raised is not None:
            await answer_failure(cycle, raised)
        else:
            await answer_return(cycle, result)
    finally:
        settle(cycle)


async def answer_failure(cycle: Any, exc: BaseException) -> None:
    cycle.proto.logger.error("Exception in ASGI application\n", exc_info=exc)
    if not cycle.response_started:
        await cycle.send_500_response()
    else:
        cycle.flush_head()
        cycle.transport.close()


async def answer_return(cycle: Any, result: Any) -> None:
    logger = cycle.proto.logger
    if result is not None:
        logger.error("ASGI callable should return None, but returned '%s'.", result)
        cycle.flush_head()
        cycle.transport.close()
    elif not cycle.response_started and not cycle.disconnected:
        logger.error("ASGI callable returned without starting response.")
        await cycle.send_500_response()
    elif not cycle.response_complete and not cycle.disconnected:
        logger.error("ASGI callable returned without completing response.")
        cycle.flush_head()
        cycle.transport.close()


def settle(cycle: Any) -> None:
    """A request's end, however it came: out of the tasks, and counted if its response
    never completed (a complete one was counted then), as the middleware would."""
    proto = cycle.proto
    proto.tasks.discard(cycle.task)
    metrics = proto.metrics
    if metrics is not None and not cycle.counted:
        metrics.observe(cycle.scope["method"], cycle.status, time.monotonic() - cycle.started)


@types.coroutine
def resumed(delegated: Any, yielded: Any) -> Any:
    """The rest of a request started eagerly (FastProtocol._run_eager), driven by a Task.

    The coroutine already ran its first step and is suspended on `yielded` (a future, or
    None for a bare yield): that goes to the Task first. Once the Task resumes this, the
    coroutine is delegated to with `yield from`, as if the Task had run it from the start:
    from here on asyncio.current_task() is this Task, cancelling it cancels the future the
    request waits on, and the hang dump (stackdump.coroutine_frames) follows `delegated`
    into the app's frames."""
    while True:
        try:
            yield yielded
        except GeneratorExit:
            delegated.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - thrown in by the Task: handed on
            try:
                yielded = delegated.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        return (yield from delegated)


# A request's Task runs one of these (the eager start's first step runs in none).
_CODES = (run_request.__code__, end_request.__code__)


def requests_running(tasks: set[asyncio.Task[Any]]) -> int:
    """Requests whose app is running now (the in-progress gauge), read at flush time.

    A request started eagerly is in `tasks` only once its first step is over, as the Task
    of finish_request (a run_request) or end_request; one that finished in its first step never ran
    across a flush."""
    return sum(1 for task in tasks if getattr(task.get_coro(), "cr_code", None) in _CODES)
