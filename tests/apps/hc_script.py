"""An app that misbehaves on request, for tests/test_app_output.py (the h11 oracle).

POST / with a JSON script as the body: `status` (any JSON value), `headers` (a list of
[name, value], each a latin-1 string so any byte can be sent), `body` (a list of
[latin-1 text, more_body]), `raise_at` (raise before message i, or null), `after` (send one
more body message once the response is complete). GET /stream streams 8 MiB, to see that
a download on the same worker survives its neighbours' mistakes.
"""

from __future__ import annotations

import json
from typing import Any


class ScriptedError(Exception):
    """The app's own bug, raised where the script says."""


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % (128 * 65536))]})
        for _ in range(128):
            await send({"type": "http.response.body", "body": b"d" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    script = json.loads(raw)
    messages: list[dict[str, Any]] = [{
        "type": "http.response.start", "status": script["status"],
        "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in script["headers"]]}]
    messages += [{"type": "http.response.body", "body": text.encode("latin-1"),
                  "more_body": more} for text, more in script["body"]]
    if script["after"]:
        messages.append({"type": "http.response.body", "body": b"late"})
    for i, message in enumerate(messages):
        if script["raise_at"] == i:
            raise ScriptedError(f"raised before message {i}")
        await send(message)
