"""Test app: the hello page plus about 60 MB of objects built at import, as a big app has."""

from __future__ import annotations

from hello_cluster.app import app

DATA = [f"{i:08d}" * 8 for i in range(600_000)]

__all__ = ["app", "DATA"]
