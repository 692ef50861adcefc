"""Test app that dies on boot in every worker: its lifespan startup fails."""

from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "boot crash on purpose"})
