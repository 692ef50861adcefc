"""The per-request shortcuts of issue 25 keep their promises: the built-in page names the
process that answers even after a fork, the WSGI view pool grows and reuses threads like
ThreadPoolExecutor, and the view thread waits for room only when the outbox is full."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from hello_cluster.app import app
from hello_cluster.http.wsgi import ViewPool


def _pid_header() -> bytes:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(app({"type": "http", "method": "GET"}, receive, send))
    value: bytes = dict(sent[0]["headers"])[b"x-worker-pid"]
    return value


def test_builtin_page_names_the_child_after_fork() -> None:
    assert _pid_header() == str(os.getpid()).encode()  # the parent's headers are cached
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and exits
        try:
            os.write(write, _pid_header())
        finally:
            os._exit(0)
    os.close(write)
    try:
        got = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = os.read(read, 64)
            if not chunk:
                break
            got += chunk
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert got == str(child).encode()
    assert _pid_header() == str(os.getpid()).encode()


def test_view_pool_grows_to_its_limit_and_reuses_idle_threads() -> None:
    pool = ViewPool(3, name="T")
    release = threading.Event()
    started = threading.Semaphore(0)
    ran: list[str] = []

    def job(tag: str) -> None:
        ran.append(threading.current_thread().name)
        started.release()
        release.wait(10)

    try:
        for i in range(5):  # three run at once, two wait in the queue for a free thread
            pool.submit(job, str(i))
        for _ in range(3):
            assert started.acquire(timeout=10)
        assert len(pool.threads) == 3
        assert not started.acquire(timeout=0.2)  # the limit holds: nothing else runs
        release.set()
        for _ in range(2):
            assert started.acquire(timeout=10)
        deadline = time.monotonic() + 10  # every thread goes back to idle
        while len(pool.idle) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        # at least one token per thread: a thread that took a queued job kept its token
        # (an upper bound, only ever above the thread count once at the limit)
        assert len(pool.idle) >= 3
        done = threading.Event()
        pool.submit(done.set)  # an idle thread takes it: no fourth thread
        assert done.wait(10)
        assert len(pool.threads) == 3
        assert sorted(set(ran)) == ["T_0", "T_1", "T_2"]
    finally:
        release.set()
        pool.shutdown()
        for thread in pool.threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in pool.threads)


def test_view_pool_survives_a_failing_job() -> None:
    pool = ViewPool(1, name="F")
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("a job that fails")

    try:
        pool.submit(boom)
        pool.submit(done.set)
        assert done.wait(10)
        assert len(pool.threads) == 1
    finally:
        pool.shutdown()
        pool.threads[0].join(10)
