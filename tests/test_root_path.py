"""`--root-path` (issue 24, item 5): an app mounted under a prefix behind a proxy that strips
it sees ASGI `root_path` (uvicorn's meaning: `path` carries the prefix) and, for WSGI,
`SCRIPT_NAME` with `PATH_INFO` below it, on both protocols."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from hello_cluster.config import parse_root_path
from hello_cluster.errors import ConfigError

APPS = textwrap.dedent('''
    import json

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        body = json.dumps({"root_path": scope["root_path"], "path": scope["path"],
                           "raw_path": scope["raw_path"].decode()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    def wsgi(environ, start_response):
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps({"SCRIPT_NAME": environ["SCRIPT_NAME"],
                            "PATH_INFO": environ["PATH_INFO"]}).encode()]
''')


@pytest.mark.parametrize("http", ["fast", "uvicorn"])
def test_asgi_and_wsgi_see_the_prefix(cluster: Any, tmp_path: Path, http: str) -> None:
    (tmp_path / "mounted.py").write_text(APPS)
    common = ["--workers", "1", "--root-path", "/api", "--app-dir", str(tmp_path),
              "--http", http]
    asgi = cluster(*common, "--app", "mounted:asgi", workers=1)
    seen = json.loads(asgi.get("/users?x=1")[2])
    assert seen == {"root_path": "/api", "path": "/api/users", "raw_path": "/api/users"}
    wsgi = cluster(*common, "--app", "mounted:wsgi", workers=1)
    assert json.loads(wsgi.get("/users")[2]) == {"SCRIPT_NAME": "/api", "PATH_INFO": "/users"}
    # The prefix is taken off once: a path that starts with it again keeps it (the code
    # before http/environ.py stripped it a second time, answering /x here).
    assert json.loads(wsgi.get("/api/x")[2]) == {"SCRIPT_NAME": "/api", "PATH_INFO": "/api/x"}


@pytest.mark.parametrize(("text", "value"), [("", ""), ("/", ""), ("/api", "/api"),
                                             (" /a/b-c ", "/a/b-c")])
def test_prefixes(text: str, value: str) -> None:
    assert parse_root_path(text) == value


@pytest.mark.parametrize("text", ["api", "/api/", "/a b", "/a\r\nX: y", "/é", "//"])
def test_bad_prefixes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="URL path prefix"):
        parse_root_path(text)
