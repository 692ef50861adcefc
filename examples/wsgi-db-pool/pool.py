"""A per-worker pool of sqlite3 connections, opened by post_fork and closed by worker_exit.

A database connection must not cross a fork: two processes writing through one inherited
connection (or one sqlite3 file handle with its locks) corrupt each other's state. So the
pool is made in each worker, after the fork, by the `post_fork` hook (hooks.py), never at
import: under `--preload` the import happens once, in the template, before any fork.

One connection per WSGI thread (`--wsgi-threads`, set `POOL_SIZE` to the same), handed out
through a queue, so a view never waits for a connection another thread holds.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
from collections.abc import Iterator

_pool: queue.Queue[sqlite3.Connection] | None = None
_all: list[sqlite3.Connection] = []

SCHEMA = """
CREATE TABLE IF NOT EXISTS visits (id INTEGER PRIMARY KEY, pid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pool_events (pid INTEGER NOT NULL, slot INTEGER NOT NULL,
    generation INTEGER NOT NULL, event TEXT NOT NULL, connections INTEGER NOT NULL);
"""


def open_pool(path: str, size: int) -> None:
    """This worker's connections (WAL: readers do not block the other workers' writes)."""
    global _pool
    conns = []
    for _ in range(size):
        conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conns.append(conn)
    with conns[0]:
        conns[0].executescript(SCHEMA)
    _pool = queue.Queue()
    for conn in conns:
        _pool.put(conn)
    _all[:] = conns


@contextlib.contextmanager
def connection() -> Iterator[sqlite3.Connection]:
    """One connection for one transaction (committed, or rolled back if the view raised)."""
    if _pool is None:
        raise RuntimeError("no database pool in this process: serve with --hooks hooks")
    conn = _pool.get(timeout=10)
    try:
        with conn:
            yield conn
    finally:
        _pool.put(conn)


def size() -> int:
    return len(_all)


def close_pool() -> None:
    global _pool
    for conn in _all:
        conn.close()
    _all.clear()
    _pool = None
