"""Differential tests on the app port: the same raw bytes to hello-cluster and to plain uvicorn.

Both serve `tests/apps/hc_echo.py`, which answers with what it received (method, path,
query, body length and sha256), so comparing status and body per response compares what
each server made of the bytes: how it framed the body, where it split a pipeline, what it
refused. They must agree, except where the README ("Limits") says hello-cluster is
stricter; `test_documented_differences` pins those down.

The hello-cluster side is parametrized by extra command-line arguments (`HC_VARIANTS`): a
second HTTP implementation selected by a flag gets the whole battery by adding one entry.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, Cluster, clean_env, free_port, wait_for, with_suppress

# name -> extra hello-cluster arguments; the same battery runs against each.
HC_VARIANTS: dict[str, list[str]] = {
    "hc": ["--workers", "2", "--http", "uvicorn"],
    "hc-fast": ["--workers", "2", "--http", "fast"],
    "hc-eager": ["--workers", "2", "--http", "fast", "--app", "hc_echo:eager_app"],
}
APP = "hc_echo:app"
# Sent after every payload: a final request that asks the server to close, so a reply
# ends at EOF instead of at a keep-alive timeout. If the payload swallowed it (an
# unterminated body), both servers keep the connection and the quiet timeout ends it.
SENTINEL = b"GET /end HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
QUIET = 1.5  # seconds of silence that end a reply when the server keeps the connection
DEADLINE = 60.0  # seconds for one exchange, whatever happens


@dataclass(frozen=True)
class Peer:
    name: str
    port: int


@dataclass(frozen=True)
class Peers:
    hc: Peer
    uv: Peer


def start_uvicorn(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port),
         "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level",
         "warning"],
        env=clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return proc, port


@pytest.fixture(scope="module", params=sorted(HC_VARIANTS))
def peers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Peers]:
    tmp = tmp_path_factory.mktemp("differential")
    uv_proc, uv_port = start_uvicorn(tmp / "uvicorn.log")
    hc = None
    try:
        hc = Cluster(tmp, ["--app", APP, *HC_VARIANTS[request.param]])
        hc.wait_ready()

        def uvicorn_up() -> bool:
            if uv_proc.poll() is not None:
                log = (tmp / "uvicorn.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"uvicorn exited {uv_proc.returncode}: {log}")
            with socket.create_connection(("127.0.0.1", uv_port), timeout=1):
                return True

        wait_for(uvicorn_up, 15, what="uvicorn to listen")
        yield Peers(Peer(request.param, hc.port), Peer("uvicorn", uv_port))
    finally:
        if hc is not None:
            hc.kill_all()
        with_suppress(lambda: os.killpg(uv_proc.pid, 9))
        with_suppress(lambda: uv_proc.wait(timeout=5))


def exchange(port: int, payload: bytes, sentinel: bool = True) -> bytes:
    """Send `payload` (plus the sentinel) on one connection while reading everything back,
    until EOF, QUIET seconds of silence, or DEADLINE."""
    data = payload + (SENTINEL if sentinel else b"")
    with socket.create_connection(("127.0.0.1", port), timeout=QUIET) as s:
        def send() -> None:
            try:
                s.sendall(data)
            except OSError:  # the server answered and closed before reading it all
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks: list[bytes] = []
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                if not sender.is_alive():
                    break  # all sent and the server has been quiet for QUIET seconds
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        sender.join(timeout=5)
        return b"".join(chunks)


class _Unclosable(io.BytesIO):
    """http.client closes its file after each response; ours holds the next ones too."""

    def close(self) -> None:
        pass


class _Stream:
    def __init__(self, data: bytes) -> None:
        self.file = _Unclosable(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self.file


def parse(raw: bytes, method: str = "GET") -> list[tuple[int, bytes]]:
    """The responses in `raw` as (status, body), interim 100s included; an unparsable
    tail becomes (-1, tail) so it shows in a comparison instead of passing silently."""
    stream = _Stream(raw)
    out: list[tuple[int, bytes]] = []
    while stream.file.tell() < len(raw):
        start = stream.file.tell()
        if raw.startswith(b"HTTP/1.1 100 ", start):
            out.append((100, b""))
        response = http.client.HTTPResponse(stream, method=method)
        try:
            response.begin()
            body = response.read()
        except (http.client.HTTPException, ValueError):
            out.append((-1, raw[start:start + 200]))
            break
        out.append((response.status, body))
    return out


def _h11_judge() -> Any:
    spec = importlib.util.spec_from_file_location("radamsa_harness", ROOT / "bench" / "radamsa.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("radamsa_harness", module)
    spec.loader.exec_module(module)
    return module.judge


JUDGE = _h11_judge()  # h11 as a strict client over everything hello-cluster writes


def both(peers: Peers, payload: bytes, sentinel: bool = True
         ) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    with ThreadPoolExecutor(2) as pool:
        hc = pool.submit(exchange, peers.hc.port, payload, sentinel)
        uv = pool.submit(exchange, peers.uv.port, payload, sentinel)
        hc_raw = hc.result()
        _, ended = JUDGE(hc_raw)
        assert not ended.startswith("malformed"), (ended, payload[:200], hc_raw[:300])
        return parse(hc_raw), parse(uv.result())


def same(peers: Peers, payload: bytes, sentinel: bool = True, refuses: int | None = None
         ) -> list[tuple[int, bytes]]:
    """Assert both servers answer `payload` alike; return the answers.

    `refuses`: where hello-cluster refuses what uvicorn serves (the RFC refusals in
    docs/limits-and-security.md), it answers what uvicorn answers up to the refused
    request, then that status, then nothing (the connection closes)."""
    hc, uv = both(peers, payload, sentinel)
    if refuses is None:
        assert summary(hc) == summary(uv), f"payload {payload[:120]!r}"
    else:
        assert hc and hc[-1][0] == refuses, (payload[:120], summary(hc))
        assert summary(hc[:-1]) == summary(uv[:len(hc) - 1]), f"payload {payload[:120]!r}"
    return hc


REFUSALS = (400, 501, 505)  # what policy.check_request answers


def agree(peers: Peers, payload: bytes) -> None:
    """For generated payloads: the same answers, or the same up to a request hello-cluster
    refuses by policy while uvicorn serves it. Which refusal is right for each shape is
    pinned by test_rfc.py and the SMUGGLING table here."""
    hc, uv = both(peers, payload)
    if summary(hc) == summary(uv):
        return
    if hc and uv and hc[-1][0] == uv[-1][0] == 400 and len(hc) > len(uv) \
            and summary(uv[:-1]) == summary(hc[:len(uv) - 1]):
        return  # uvicorn writes the 400 at once, losing the answers owed before it
    assert hc and hc[-1][0] in REFUSALS, (payload[:200], summary(hc), summary(uv))
    assert summary(hc[:-1]) == summary(uv[:len(hc) - 1]), (payload[:200], summary(hc))


def summary(responses: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Bodies shortened so a failing comparison prints readably (the hash stays)."""
    return [(status, body if len(body) <= 200 else body[:100] + b"..." + body[-100:])
            for status, body in responses]


def echo(method: str, path: str, body: bytes, query: str = "-") -> bytes:
    return (f"{method} {path} {query} {len(body)} ".encode()
            + hashlib.sha256(body).hexdigest().encode() + b"\n")


def chunked(body: bytes, size: int = 16384) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
             for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


BLOB = random.Random(12).randbytes(10 * 1024 * 1024)
UPLOAD_SIZES = [0, 1, 65_535, 65_537, 200_000, 1 << 20, 10 * 1024 * 1024]


@pytest.mark.parametrize("size", UPLOAD_SIZES)
def test_upload_with_content_length(peers: Peers, size: int) -> None:
    body = BLOB[:size]
    head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
    assert same(peers, head + body) == [(200, echo("POST", "/upload", body)),
                                        (200, echo("GET", "/end", b""))]


@pytest.mark.parametrize("size", [0, 1, 100_000, 10 * 1024 * 1024])
def test_upload_chunked(peers: Peers, size: int) -> None:
    body = BLOB[:size]
    head = b"PUT /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert same(peers, head + chunked(body)) == [(200, echo("PUT", "/upload", body)),
                                                 (200, echo("GET", "/end", b""))]


def test_expect_100_continue(peers: Peers) -> None:
    body = BLOB[:300_000]
    head = (b"POST /upload HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    assert same(peers, head + body) == [(100, b""), (200, echo("POST", "/upload", body)),
                                        (200, echo("GET", "/end", b""))]
    # An app that answers without reading: no 100 Continue, the body is skipped.
    early = head.replace(b"/upload", b"/early")
    assert same(peers, early + body) == [(405, b"not reading that\n"),
                                         (200, echo("GET", "/end", b""))]


@pytest.mark.parametrize("count", [1, 2, 50, 3000])
def test_pipeline_answered_in_order(peers: Peers, count: int) -> None:
    payload = b"".join(b"GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(count))
    answers = same(peers, payload)
    assert answers == [(200, echo("GET", f"/p{i}", b"")) for i in range(count)] + [
        (200, echo("GET", "/end", b""))]


@pytest.mark.parametrize("size", [0, 10, 100_000, 1 << 20])
def test_early_answer_to_unread_body(peers: Peers, size: int) -> None:
    """405 without reading the upload; the body is skipped, the connection goes on (no
    second, unsolicited answer), and a pipelined request after it is served."""
    body = BLOB[:size]
    payload = (b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
               + body + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    assert same(peers, payload) == [(405, b"not reading that\n"),
                                    (200, echo("GET", "/after", b"")),
                                    (200, echo("GET", "/end", b""))]


SMUGGLING = {
    "cl-and-te": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "te-and-cl": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 30\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "te-xchunked": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n"
                   b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "te-chunked-identity": b"POST /a HTTP/1.1\r\nHost: t\r\n"
                           b"Transfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-identity-chunked": b"POST /a HTTP/1.1\r\nHost: t\r\n"
                           b"Transfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-twice": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n"
                             b"\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-tab-value": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\tchunked\r\n"
                    b"\r\n3\r\nabc\r\n0\r\n\r\n",
    "cl-duplicate-same": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                         b"Content-Length: 3\r\n\r\nabc",
    "cl-duplicate-different": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                              b"Content-Length: 5\r\n\r\nabcde",
    "cl-list": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
    "cl-plus-sign": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
    "cl-negative": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\nabc",
    "cl-hex": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 0x3\r\n\r\nabc",
    "lf-only": b"POST /a HTTP/1.1\nHost: t\nContent-Length: 3\n\nabc",
    "lf-only-chunked": b"POST /a HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\n"
                       b"3\nabc\n0\n\n",
    "bare-cr": b"GET /a HTTP/1.1\rHost: t\r\n\r\n",
    "obs-fold": b"GET /a HTTP/1.1\r\nHost: t\r\nX-Folded: one\r\n two\r\n\r\n",
    "obs-fold-te": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n"
                   b" chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\nFFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n",
    "chunk-extension": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\n3;ext=1\r\nabc\r\n0\r\n\r\n",
    "chunk-lf-only-data": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                          b"\r\n3\r\nabc\n0\r\n\r\n",
    "chunked-http10": b"POST /a HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n0\r\n\r\n",
    "space-in-header-name": b"GET /a HTTP/1.1\r\nHost: t\r\nX Bad: 1\r\n\r\n",
    "no-host": b"GET /a HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "absolute-form": b"GET http://t/a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n",
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
    "leading-crlf": b"\r\n\r\nGET /a HTTP/1.1\r\nHost: t\r\n\r\n",
    "http09": b"GET /a\r\n\r\n",
    "lowercase-method": b"get /a HTTP/1.1\r\nHost: t\r\n\r\n",
    "nul-in-value": b"GET /a HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
    "cl-huge": b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999\r\n\r\nab",
    "te-uppercase": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: CHUNKED\r\n\r\n"
                    b"3\r\nabc\r\n0\r\n\r\n",
    "chunked-trailers": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n",
    "chunk-size-space": b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3 \r\nabc\r\n0\r\n\r\n",
    "websocket-upgrade-no-key": b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                                b"Upgrade: websocket\r\n\r\n",
    "h2c-upgrade": b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    "websocket-handshake": b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                           b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "expect-http10": b"POST /a HTTP/1.0\r\nHost: t\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 3\r\n\r\nabc",
    "expect-unknown": b"POST /a HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\n"
                      b"Content-Length: 3\r\n\r\nabc",
}


# shape -> what hello-cluster answers where plain uvicorn serves the request (RFC 9112/9110:
# docs/limits-and-security.md, "Refusals")
HC_REFUSES = {
    "te-identity-chunked": 501,  # a coding other than chunked (9112 6.1; identity is gone)
    "chunked-http10": 400,  # Transfer-Encoding in HTTP/1.0 is faulty framing (9112 6.1)
    "no-host": 400,  # 9112 3.2
    "two-hosts": 400,
    "http09": 505,
    "lowercase-method": 501,  # methods are case-sensitive: `get` is a method we do not know
}
# shape -> what hello-cluster answers where plain uvicorn refuses the request
HC_SERVES = {
    # BWS before a chunk extension is legal (9112 7.1.1); llhttp's leniency for it also
    # takes spaces with no extension after them
    "chunk-size-space": [(200, echo("POST", "/a", b"abc")), (200, echo("GET", "/end", b""))],
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shapes(peers: Peers, shape: str) -> None:
    if shape in HC_SERVES:
        hc, uv = both(peers, SMUGGLING[shape])
        assert hc == HC_SERVES[shape] and uv[0][0] == 400, (summary(hc), summary(uv))
        return
    answers = same(peers, SMUGGLING[shape], refuses=HC_REFUSES.get(shape))
    assert all(body != echo("GET", "/smuggled", b"") for _, body in answers)


# Request shapes for hypothesis: framings, line ends, headers known to be parsed in
# interesting ways, a little pipelining. Bodies are small; every example costs two
# exchanges, usually a few milliseconds each.
_HEADERS = [b"Host: t", b"Connection: close", b"Connection: keep-alive", b"Expect: 100-continue",
            b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity",
            b"Transfer-Encoding: gzip, chunked", b"Content-Length: 0", b"Content-Length: 3",
            b"Content-Length: 03", b"Content-Length:", b"X-Fold: a\r\n b", b"X: \x01",
            b"X-Empty:", b":no-name", b"Upgrade: h2c", b"Cookie: a=b"]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
    path = draw(st.sampled_from([b"/", b"/a", b"/early", b"/q?x=1&y", b"/%41b", b"//x"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    headers = draw(st.lists(st.sampled_from(_HEADERS), max_size=4))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["none", "length", "chunked", "chunked-raw", "short"]))
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        body = chunked(body, 7)
    elif framing == "chunked-raw":  # claims chunked, sends whatever
        headers.append(b"Transfer-Encoding: chunked")
    elif framing == "short":  # a length shorter than the body: the rest is the next request
        headers.append(b"Content-Length: %d" % (len(body) // 2))
    head = method + b" " + path + b" " + version + eol
    return head + b"".join(h + eol for h in headers) + eol + body


@given(st.lists(requests(), min_size=1, max_size=3))
@settings(max_examples=100, deadline=20_000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_generated_request_shapes(peers: Peers, batch: list[bytes]) -> None:
    agree(peers, b"".join(batch))


def test_documented_differences(peers: Peers) -> None:
    """Where the README says hello-cluster is stricter than uvicorn, and why: a request head
    over 64 KiB gets 431 (uvicorn has no limit), and a head that does not complete within
    10 s gets 408 (uvicorn waits forever; tests/test_hardening.py covers the timing)."""
    big = b"GET /a HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    hc, uv = both(peers, big)
    assert [s for s, _ in hc] == [431]  # and the connection closes
    assert uv == [(200, echo("GET", "/a", b"")), (200, echo("GET", "/end", b""))]
    # Just under the limit both serve it.
    fits = b"GET /a HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"
    same(peers, fits)
