"""The access log (accesslog.py): one line per request from the worker that served it."""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from conftest import wait_for
from hello_cluster.http.accesslog import client, escape, target

TEXT_LINE = re.compile(
    r'hello-cluster\[(\d+)\] worker (\d+) INFO (\S+) "(\S+) (\S+) HTTP/([\d.]+)" '
    r"(\d{3}) (\d+) ([\d.]+)ms$")


def access_lines(log: str) -> list[re.Match[str]]:
    return [m for m in map(TEXT_LINE.search, log.splitlines()) if m]


def test_text_lines_one_per_request(cluster) -> None:
    c = cluster("--workers", "2", "--access-log", "--app", "hc_testapp:app",
                "--log-level", "warning", workers=2)  # the operator asked: shown anyway
    status, headers, body = c.get("/status?x=1&y=%20z")
    assert status == 418
    assert c.get("/", method="HEAD")[0] == 200
    wait_for(lambda: len(access_lines(c.log)) >= 2, 10, what="two access lines")
    # Two workers flush their lines each tick: the two lines can come in either order.
    first, second = sorted(access_lines(c.log)[:2], key=lambda m: m.group(4) != "GET")
    pid, slot, who, method, path, version, code, sent, ms = first.groups()
    assert int(pid) == int(headers["x-worker-pid"]) and 1 <= int(slot) <= 2
    assert re.fullmatch(r"127\.0\.0\.1:\d+", who)
    assert (method, path, version, code, sent) == ("GET", "/status?x=1&y=%20z", "1.1", "418",
                                                   str(len(body)))
    assert 0 < float(ms) < 10_000
    assert second.group(4, 5, 7, 8) == ("HEAD", "/", "200", "0")
    assert len(access_lines(c.log)) == 2


def test_json_lines_and_the_client_behind_a_trusted_proxy(cluster) -> None:
    c = cluster("--workers", "1", "--access-log", "--log-format", "json",
                "--forwarded-allow-ips", "127.0.0.1", "--app", "hc_testapp:app", workers=1)
    c.get("/client?who=1", headers={"X-Forwarded-For": "203.0.113.7, 127.0.0.1"})
    c.get("/x")  # no header: the direct peer

    def entries() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for line in c.log.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == "access":
                    found.append(entry)
        return found

    wait_for(lambda: len(entries()) >= 2, 10, what="two JSON access entries")
    proxied, direct = entries()
    assert proxied["client"].startswith("203.0.113.7:")
    assert direct["client"].startswith("127.0.0.1:")
    for entry, path in ((proxied, "/client?who=1"), (direct, "/x")):
        assert entry["method"] == "GET" and entry["path"] == path
        assert entry["http_version"] == "1.1" and entry["status"] == 200
        assert entry["slot"] == 1 and entry["role"] == "worker 1" and entry["level"] == "info"
        assert isinstance(entry["bytes"], int) and entry["bytes"] > 0
        assert isinstance(entry["duration_ms"], float)


def test_off_by_default_and_hostile_targets_stay_on_one_line(cluster) -> None:
    c = cluster("--workers", "1", workers=1)
    assert c.get("/")[0] == 200
    on = cluster("--workers", "1", "--access-log", workers=1)
    # Quotes and backslashes get through httptools (control bytes and 0xff get a 400 before
    # any app runs); escaped, they cannot end the quoted request early or fake a line.
    with socket.create_connection(("127.0.0.1", on.port), timeout=5) as sock:
        sock.sendall(b'GET /a"b\\c?q=" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        while sock.recv(4096):
            pass
    wait_for(lambda: "/a" in on.log, 10, what="the hostile request's line")
    line = next(x for x in on.log.splitlines() if "/a" in x)
    assert '"GET /a\\x22b\\x5cc?q=\\x22 HTTP/1.1" 200' in line and line.count('"') == 2, line
    assert access_lines(c.log) == [] and "INFO 127.0.0.1" not in c.log


@given(st.text(), st.binary(), st.binary())
def test_escaped_fields_are_one_printable_line(path: str, raw: bytes, query: bytes) -> None:
    scope = {"path": path, "raw_path": raw or None, "query_string": query,
             "client": (path, 1)}
    for text in (target(scope), client(scope), escape(path)):
        assert "\n" not in text and "\r" not in text and '"' not in text
        assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def test_lines_have_the_shape_of_the_rest_of_the_log() -> None:
    """Written without `logging` (for speed), a line must still look like logs.py's."""
    import asyncio
    import logging
    import os

    from hello_cluster import logs
    from hello_cluster.http.accesslog import AccessLog

    record = logging.LogRecord("hello_cluster.worker", logging.INFO, __file__, 1, "served",
                               None, None)
    record.role = "worker 3"
    scope = {"type": "http", "method": "GET", "path": "/p", "raw_path": b"/p",
             "query_string": b"q=1", "http_version": "1.1", "client": ("::1", 5)}

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    async def serve(log: AccessLog) -> None:
        await log(scope, None, None)

    for style, formatter in (("json", logs.JsonFormatter()),
                             ("journal", logs.JournalFormatter("%(role)s pid %(process)d: "
                                                               "%(message)s")),
                             ("text", logging.Formatter("%(asctime)s hello-cluster"
                                                        "[%(process)d] %(role)s "
                                                        "%(levelname)s %(message)s"))):
        log = AccessLog(app, 3, style)
        asyncio.run(serve(log))
        (line,) = log.lines
        ours, theirs = line.rstrip("\n"), formatter.format(record)
        if style == "json":
            entry, reference = json.loads(ours), json.loads(theirs)
            assert set(reference) <= set(entry)
            assert {k: entry[k] for k in ("level", "pid", "role")} == {
                "level": "info", "pid": os.getpid(), "role": "worker 3"}
            assert len(entry["time"]) == len(reference["time"])
            assert entry["message"] == '[::1]:5 "GET /p?q=1 HTTP/1.1" 500 0 ' + \
                f'{entry["duration_ms"]:.1f}ms'
        else:
            prefix = theirs[: -len("served")]
            head = ours[: len(prefix)]
            if style == "journal":
                assert head == prefix, (ours, theirs)
            else:  # same shape, a different millisecond
                assert re.sub(r"\d", "0", head) == re.sub(r"\d", "0", prefix), (ours, theirs)
            assert ours[len(prefix):].startswith('[::1]:5 "GET /p?q=1 HTTP/1.1" 500 0 ')
