"""--hooks hooks: each worker opens its own database pool after the fork, closes it at exit."""

from __future__ import annotations

import os
from typing import Any

import pool

DATABASE = os.environ.get("DATABASE", "example.db")


def _note(info: Any, event: str) -> None:
    with pool.connection() as conn:
        conn.execute("INSERT INTO pool_events VALUES (?, ?, ?, ?, ?)",
                     (info.pid, info.slot, info.generation, event, pool.size()))


def post_fork(info: Any) -> None:
    """Before the app is imported (or, under --preload, right after the fork)."""
    pool.open_pool(DATABASE, int(os.environ.get("POOL_SIZE", "4")))
    _note(info, "opened")


def worker_exit(info: Any) -> None:
    """After the drain: no view holds a connection any more."""
    _note(info, "closed")
    pool.close_pool()
