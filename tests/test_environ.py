"""http/environ.py against a2wsgi's build_environ, on generated scopes: every key and value
the same, except the documented fixes (wsgi.errors, SCRIPT_NAME, a latin-1 QUERY_STRING),
with one builder kept across examples so its per-connection base and its key table are
reused, remade and outgrown as a worker's are."""

from __future__ import annotations

import os
import sys
from typing import Any
from unittest import mock

from a2wsgi.wsgi import build_environ
from hypothesis import given, settings
from hypothesis import strategies as st

from hello_cluster.http import environ as environ_mod
from hello_cluster.http.environ import MAX_BASES, MAX_KEYS, EnvironBuilder

TOKEN = "abcxyzABCXYZ019-_!#$%&'*+.^`|~"
names = st.text(TOKEN, min_size=1, max_size=12).map(str.encode) | st.sampled_from(
    [b"content-length", b"content-type", b"Content-Length", b"host", b"x-forwarded-for",
     b"x_forwarded_for", b"cookie"])
values = st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b)
segments = st.text("abz%-._~!$&'()*+,;=:@\u00e9\u4e2d", max_size=6)
paths = st.lists(segments, max_size=4).map(lambda parts: "/" + "/".join(parts))
addresses = st.none() | st.tuples(st.sampled_from(["127.0.0.1", "::1", "10.0.0.7"]),
                                  st.integers(0, 65535))
scopes = st.fixed_dictionaries({
    "type": st.just("http"),
    "http_version": st.sampled_from(["1.0", "1.1"]),
    "method": st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PROPFIND"]),
    "scheme": st.sampled_from(["http", "https"]),
    "server": addresses,
    "client": addresses,
    "root_path": st.sampled_from(["", "/api", "/a\u00e9"]),
    "path": paths,
    "query_string": st.binary(max_size=16),
    "headers": st.lists(st.tuples(names, values), max_size=8),
})

BUILDERS = {script: EnvironBuilder(script) for script in ("", "/api", "/mount")}


def reference(scope: dict[str, Any], body: Any, script: str) -> dict[str, Any]:
    """a2wsgi's environ with the fixes environ.py documents, done the slow way."""
    scope = dict(scope, query_string=b"")  # a2wsgi decodes it as ascii: set below
    with mock.patch.dict(os.environ, {"SCRIPT_NAME": script}):
        env: dict[str, Any] = dict(build_environ(scope, body))
    env["wsgi.errors"] = sys.stderr
    path = env["PATH_INFO"]
    if script and (path == script or path.startswith(script + "/")):
        env["PATH_INFO"] = path[len(script):]
    return env


@settings(max_examples=400, deadline=None)
@given(scope=scopes, script=st.sampled_from(sorted(BUILDERS)))
def test_environ_is_a2wsgis_with_the_fixes(scope: dict[str, Any], script: str) -> None:
    scope["path"] = scope["root_path"] + scope["path"]  # as both protocols build it
    body = object()
    ours = BUILDERS[script].build(scope, body)
    theirs = reference(scope, body, script)
    theirs["QUERY_STRING"] = scope["query_string"].decode("latin1")
    theirs["asgi.scope"] = scope
    assert ours == theirs
    assert ours["wsgi.input"] is body and ours["wsgi.errors"] is sys.stderr


def test_the_base_is_per_connection_and_never_shared() -> None:
    """Two connections taking turns get their own addresses; an app writing into its
    environ does not reach the next request's."""
    builder = EnvironBuilder("")
    first = {"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "path": "/",
             "root_path": "", "query_string": b"", "headers": []}
    second = dict(first, client=("::1", 6000), scheme="https")
    a = builder.build(first, None)
    a["REMOTE_ADDR"] = "scribbled"
    a["wsgi.run_once"] = True
    b = builder.build(second, None)
    c = builder.build(first, None)
    assert (b["REMOTE_ADDR"], b["REMOTE_PORT"], b["wsgi.url_scheme"]) == ("::1", "6000", "https")
    assert (c["REMOTE_ADDR"], c["REMOTE_PORT"], c["wsgi.url_scheme"]) == (
        "127.0.0.1", "5000", "http")
    assert c["wsgi.run_once"] is False
    for port in range(MAX_BASES + 10):  # a connection per request: bounded, oldest out
        builder.build(dict(first, client=("127.0.0.1", port)), None)
    assert len(builder.bases) == MAX_BASES
    assert ("127.0.0.1", MAX_BASES + 9) in {key[1] for key in builder.bases}
    assert ("127.0.0.1", 0) not in {key[1] for key in builder.bases}


def test_the_key_table_is_bounded() -> None:
    """Clients choose header names: past MAX_KEYS the keys are worked out, not kept."""
    builder = EnvironBuilder("")
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
             "server": None, "client": None, "path": "/", "root_path": "",
             "query_string": b"", "headers": [(f"x-{i}".encode(), b"v") for i in range(600)]}
    env = builder.build(scope, None)
    assert len(builder.keys) == MAX_KEYS
    assert all(env[f"HTTP_X_{i}"] == "v" for i in range(600))
    assert environ_mod.header_key(b"content-type") == "CONTENT_TYPE"


def test_script_name_is_read_from_the_environment_once() -> None:
    with mock.patch.dict(os.environ, {"SCRIPT_NAME": "/prefix"}):
        builder = EnvironBuilder()
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http",
             "server": None, "client": None, "path": "/prefix/page", "root_path": "",
             "query_string": b"", "headers": []}
    env = builder.build(scope, None)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/prefix", "/page")
    assert builder.build(dict(scope, path="/prefixes"), None)["PATH_INFO"] == "/prefixes"
