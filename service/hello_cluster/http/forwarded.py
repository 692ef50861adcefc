"""RFC 7239 `Forwarded` beside X-Forwarded-For/-Proto, believed from trusted proxies only.

uvicorn's ProxyHeadersMiddleware reads X-Forwarded-For and X-Forwarded-Proto; the standard
header, `Forwarded: for=192.0.2.60;proto=https, for="[2001:db8::1]:4711"`, is what newer
proxies (and Envoy, nginx with a map, Caddy when asked) send. This wrapper sits outside
uvicorn's, so it sees the real peer: when that peer is in --forwarded-allow-ips and the
request has a Forwarded header, the client is the rightmost `for` that is not itself a
trusted proxy (the same walk uvicorn does for X-Forwarded-For: a client can put anything
on the left), with that element's `proto`. The rewritten client is then no trusted proxy,
so X-Forwarded-For is not believed on top of it. Obfuscated (`_hidden`) and `unknown`
identifiers keep the peer's address; a header that does not parse is ignored (logged once).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from hello_cluster.http.proxyproto import trusts

log = logging.getLogger("hello_cluster.worker")

_PAIR = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)=("(?:[^"\\]|\\.)*"|[^;,"\s]*)\s*')
_logged = [False]


def elements(value: str) -> list[dict[str, str]] | None:
    """The forwarded-elements of one or more Forwarded values, or None if they do not parse."""
    found: list[dict[str, str]] = []
    current: dict[str, str] = {}
    position = 0
    while position < len(value):
        match = _PAIR.match(value, position)
        if match is None:
            return None
        name, raw = match.group(1).lower(), match.group(2)
        current[name] = raw[1:-1].replace("\\", "") if raw.startswith('"') else raw
        position = match.end()
        if position < len(value):
            if value[position] == ";":
                position += 1
            elif value[position] == ",":
                found.append(current)
                current = {}
                position += 1
            else:
                return None
    if current:
        found.append(current)
    return found


def node(value: str) -> tuple[str, int] | None:
    """`192.0.2.60`, `192.0.2.60:8080`, `[2001:db8::1]:4711` -> (host, port); None for
    `unknown`, `_obfuscated` and anything else."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([0-9.]+)(?::(\d{1,5}))?", value)
    if match is None:
        return None
    host = match.group(1) or match.group(3)
    port = match.group(2) or match.group(4)
    return host, int(port) if port else 0


class Forwarded:
    """ASGI wrapper: the RFC 7239 header from trusted proxies sets client and scheme."""

    def __init__(self, app: Any, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"forwarded"]
            client = scope.get("client")  # the header first: most requests have none
            if values and client is not None and trusts(self.allowed, client[0]):
                self.apply(scope, ", ".join(values))
        await self.app(scope, receive, send)

    def apply(self, scope: dict[str, Any], value: str) -> None:
        parsed = elements(value)
        if parsed is None:
            if not _logged[0]:
                _logged[0] = True
                log.warning("ignored a Forwarded header that does not parse (RFC 7239): %r "
                            "(logged once)", value[:200])
            return
        for element in reversed(parsed):
            address = node(element.get("for", ""))
            if address is None:
                return  # unknown or obfuscated: keep the peer's address
            proto = element.get("proto", "").lower()
            if proto in ("http", "https"):
                secure = proto == "https"
                scope["scheme"] = ("wss" if secure else "ws") if scope["type"] == "websocket" \
                    else proto
            scope["client"] = address
            if not trusts(self.allowed, address[0]):
                return  # the rightmost address that is no trusted proxy: the client
