"""The WSGI environ of a request: a2wsgi's, built with what stays the same per connection
made once, and with the two fixes a server owes its WSGI app.

a2wsgi's `build_environ` fills all of an environ from the scope on every request: the
`wsgi.*` constants, the server's and the client's address (two `str()` calls), a lookup of
`SCRIPT_NAME` in os.environ, and for each header a decode, an upper-casing and a replace.
On a view that does little that was about a fifth of the server's own cost of a request
dispatched on the loop, in-process (4.3 of 24 us, bench/micro_wsgi.py). Here the parts
that depend only on the connection are a base dict, made at its first request and copied
(one C call) per request; a header's environ key is looked up in a table filled as names
are seen; `SCRIPT_NAME` is read from the environment once. Every key and value is
a2wsgi's (tests/test_environ.py checks them against `build_environ` on generated scopes),
except for the fixes:

- `wsgi.errors` is the process's stderr (PEP 3333: "the error output stream"); a2wsgi
  hands out stdout.
- `SCRIPT_NAME` from the environment (as gunicorn reads it) is also stripped from the
  front of `PATH_INFO`, at a path segment's boundary: a proxy forwards `/prefix/page`, the
  app sees `/page` under `/prefix` and builds its URLs with the prefix.
- `QUERY_STRING` is decoded as latin-1, as every other environ string is (PEP 3333's
  "native strings"). a2wsgi's ascii would raise on a byte above 127; the parser answers
  400 to those in a request target today, so this only keeps a parser that let one
  through from turning it into a 500.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from a2wsgi.wsgi import unicode_to_wsgi

# Header names seen so far and their environ keys; bounded, since clients choose names.
MAX_KEYS = 512
# Connections' bases kept, the oldest made dropped first: enough for the connections a
# worker keeps busy at once behind a proxy; a closed connection's base just ages out, and
# under a connection per request every base is made once and goes (bounded memory).
MAX_BASES = 128
_FIXED_KEYS = {b"content-length": "CONTENT_LENGTH", b"content-type": "CONTENT_TYPE"}


def header_key(name: bytes) -> str:
    """The environ key of a (lower-case) header name, as a2wsgi spells it."""
    fixed = _FIXED_KEYS.get(name)
    if fixed is not None:
        return fixed
    return f"HTTP_{name.decode('latin1')}".upper().replace("-", "_")


class EnvironBuilder:
    """Builds the environ of each request a WSGIMiddleware serves (one per worker)."""

    def __init__(self, script_name: str | None = None) -> None:
        if script_name is None:
            script_name = os.environ.get("SCRIPT_NAME", "")
        self.script = unicode_to_wsgi(script_name) if script_name else ""  # type: ignore[no-untyped-call]
        self.keys: dict[bytes, str] = dict(_FIXED_KEYS)
        # Per connection: (server, client, scheme, HTTP version) -> the environ's base. A
        # worker's connections take turns, so one remembered base would be remade nearly
        # every request under load.
        self.bases: dict[tuple[Any, ...], dict[str, Any]] = {}

    def _base(self, key: tuple[Any, ...]) -> dict[str, Any]:
        server, client, scheme, version = key
        server_addr, server_port = server or ("localhost", 80)
        base: dict[str, Any] = {
            "SERVER_PROTOCOL": f"HTTP/{version}",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scheme,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "SERVER_NAME": server_addr,
            "SERVER_PORT": str(server_port or 0),
        }
        if client is not None:
            base["REMOTE_ADDR"] = client[0]
            base["REMOTE_PORT"] = str(client[1])
        bases = self.bases
        if len(bases) >= MAX_BASES:
            del bases[next(iter(bases))]  # the oldest made (dicts keep their order)
        bases[key] = base
        return base

    def build(self, scope: Any, body: Any) -> dict[str, Any]:
        key = (scope.get("server"), scope.get("client"), scope.get("scheme", "http"),
               scope["http_version"])
        base = self.bases.get(key)
        environ = (base if base is not None else self._base(key)).copy()
        path = scope["path"].encode("utf8").decode("latin1")
        root = scope.get("root_path", "")
        if root:
            root = root.encode("utf8").decode("latin1")
            if path.startswith(root):
                path = path[len(root):]
        script = self.script
        if script:
            if path == script or path.startswith(script + "/"):
                path = path[len(script):]
            root = script
        environ["asgi.scope"] = scope
        environ["REQUEST_METHOD"] = scope["method"]
        environ["SCRIPT_NAME"] = root
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = scope["query_string"].decode("latin1")
        environ["wsgi.input"] = body
        keys = self.keys
        for name, value in scope.get("headers", ()):
            environ_key = keys.get(name)
            if environ_key is None:
                environ_key = header_key(name)
                if len(keys) < MAX_KEYS:
                    keys[name] = environ_key
            text = value.decode("latin1")
            if environ_key in environ:
                text = environ[environ_key] + "," + text
            environ[environ_key] = text
        return environ
