"""What a worker refuses from a client, and how long it waits: the HTTP policy of both protocols.

`--http fast` (fastproto) and `--http uvicorn` (uvicornproto) parse with the same llhttp and
must answer the same bytes the same way, so everything they decide about a request lives
here, once: the limits and deadlines, the RFC 9112/9110 refusals llhttp leaves to its user,
the canned error responses, and room at `--limit-concurrency`. Each protocol only wires
these into its own callbacks. What an *app* may send back is the other half, appcheck.py.

The refusals, each with its section (docs/limits-and-security.md has the table):

- a version other than HTTP/1.0 and 1.1: 505 (RFC 9110 15.6.6); HTTP/1.2 and later 1.x are
  served as 1.1 (RFC 9112 2.3: a higher minor version is processed as the highest known);
- HTTP/1.1 without Host, any request with two Host lines or an invalid Host: 400 (9112 3.2);
- the asterisk-form target for a method other than OPTIONS: 400 (9112 3.2.4);
- a transfer coding other than a lone `chunked`: 501 (9112 6.1, "SHOULD respond with 501");
  Transfer-Encoding on an HTTP/1.0 request: 400 (9112 6.1, "MUST treat ... as faulty");
- an HTTP/0.9 request line (`GET /`): 505 at once, not a wait for headers;
- CONNECT, and a method token llhttp does not know: 501 (9110 9.1, 15.6.2); a request line
  that is not `token SP target SP version`: 400.
"""

from __future__ import annotations

import fcntl
import http
import logging
import re
import resource
import sys
import termios
from operator import attrgetter
from typing import Any

import httptools

log = logging.getLogger("hello_cluster.worker")

IDLE_GRACE = 0.5  # seconds an idle connection may still bring one last request when draining
MAX_HEAD_BYTES = 64 * 1024  # request target plus header lines (names, values, ": ", CRLF)
# Seconds for a request head to complete, counted from its first byte, or from the accept
# on a new connection (a silent client is held no longer than a slow one). The same bound
# applies to a TLS handshake (tls.HANDSHAKE_TIMEOUT) and to a chunked body's trailers.
HEAD_TIMEOUT = 10.0
MAX_TRAILER_BYTES = MAX_HEAD_BYTES  # a chunked body's trailer section, bounded like a head
MAX_DISCARD_BYTES = 1024 * 1024  # unread request body read and dropped after an early answer
FD_RESERVE = 64  # descriptors a worker keeps for everything but client connections
ROOM_LOG_EVERY = 60.0  # seconds between log lines about closing idle connections
# Connections this process has accepted, counted by both protocols: with the requests served
# it tells keep-alive traffic from a connection per request (worker/affinity.py).
ACCEPTED = [0]

# llhttp's leniencies this policy turns on, and why. Every other leniency stays off.
LENIENCIES = {
    # answer the first request of a pipeline even when a later one is malformed
    "lenient_data_after_close": True,
    # `5 ;ext=v`: BWS before a chunk extension is legal (RFC 9112 7.1.1); llhttp refuses it
    "lenient_spaces_after_chunk_size": True,
    # HTTP/1.2 and the like reach on_headers_complete, where check_request decides (505 or 1.1)
    "lenient_version": True,
}


def error_response(status: int, reason: str = "") -> bytes:
    """A complete error response that closes the connection; `reason` is its text body."""
    body = reason.encode("ascii")
    phrase = http.HTTPStatus(status).phrase.encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, phrase, len(body), body))


RESPONSE_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
RESPONSE_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                b"connection: close\r\n\r\n")
INVALID_REQUEST = "Invalid HTTP request received."
RESPONSE_400 = error_response(400, INVALID_REQUEST)
RESPONSE_HTTP09 = error_response(505, "HTTP/0.9 is not supported")


class Refusal(Exception):
    """Raised from a parser callback: the request gets `response` (after the responses
    already owed on the connection) and the connection closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.response = error_response(status, reason)


_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# a request line whose method is a token: what 501 (not 400) answers when llhttp has no
# name for the method
_REQUEST_LINE = re.compile(rb"\r?\n?[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/\d\.\d\r?\n")


GOOD_HOSTS: set[bytes] = set()  # Host values already found valid: a set lookup, not a regex
GOOD_HOSTS_MAX = 1024


def check_request(version: str, method: str, url: bytes, hosts: int, host: bytes,
                  te: bytes | None) -> tuple[str, Refusal | None]:
    """(the version to put in the scope, why the request is refused or None).

    Called for every request once its head is parsed; `hosts` counts its Host lines (`host`
    the last), `te` is its Transfer-Encoding value or None. The usual request (HTTP/1.1,
    one valid Host, no Transfer-Encoding, an origin-form target) costs a few comparisons.
    """
    if version != "1.1" and version != "1.0":
        if version[:2] == "1." and version[2:].isdigit():
            version = "1.1"
        else:
            return version, Refusal(505, f"HTTP/{version} is not supported: use HTTP/1.1")
    if hosts != 1:
        if hosts > 1:
            return version, Refusal(400, "more than one Host header")
        if version == "1.1":
            return version, Refusal(400, "an HTTP/1.1 request needs a Host header")
    elif host not in GOOD_HOSTS:
        if not _HOST.match(host):
            return version, Refusal(400, "invalid Host header")
        if len(GOOD_HOSTS) < GOOD_HOSTS_MAX:  # a server sees few distinct hosts; a client
            GOOD_HOSTS.add(host)  # inventing them only loses the shortcut
    if url[:1] != b"/":
        if url == b"*" and method != "OPTIONS":
            return version, Refusal(400, "the * target is only for OPTIONS")
        if method == "CONNECT":
            return version, Refusal(501, "CONNECT is not supported: this is no proxy")
    if te is not None:
        if version == "1.0":
            return version, Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te.lower().strip() != b"chunked":  # llhttp refused every other framing already
            return version, Refusal(501, "only the chunked transfer coding is supported")
    return version, None


_HTTP09_LINE = re.compile(rb"(?:^|\n)[^ \r\n]+ [^ \r\n]+\r?\n")


def http09(version: str, data: bytes) -> bool:
    """`GET /` and a line end: an HTTP/0.9 request line, which llhttp takes and then waits
    for headers that will never come. Called only while a head is still open after a
    read; the version llhttp reports stays 0.0 until a version is parsed."""
    return version == "0.0" and _HTTP09_LINE.search(data) is not None


def parser_refusal(error: BaseException, data: bytes, at_start: bool) -> bytes:
    """The answer to a request llhttp refused (`error`, raised while parsing `data`).

    A Refusal from our own callbacks carries its answer. An unknown method whose request
    line is well formed is 501 (RFC 9110 15.6.2: a method the server does not recognize),
    which needs the line itself: `at_start` says this read began a new request, so the
    line is at the start of `data` (a method llhttp refused later in a pipelined read is
    answered 400). Anything else is 400.
    """
    context = error.__context__
    if isinstance(context, Refusal):
        return context.response
    if isinstance(error, httptools.HttpParserInvalidMethodError) and at_start \
            and _REQUEST_LINE.match(data):
        return error_response(501, "unknown method")
    return RESPONSE_400


def trailer_refusal(total: int, since: float, now: float) -> bytes | None:
    """The answer to a trailer section of `total` bytes begun at `since`, if it is past
    its bounds (MAX_TRAILER_BYTES, HEAD_TIMEOUT): both protocols count a read that
    continues one (httptools holds the field being read, so it is bounded by its reads)."""
    if total > MAX_TRAILER_BYTES:
        return RESPONSE_431
    if now - since > HEAD_TIMEOUT:
        return RESPONSE_408
    return None


def valid_token(name: bytes) -> bool:
    return _TOKEN.match(name) is not None


def connection_limit(configured: int, nofile: int | None = None) -> int:
    """--limit-concurrency, lowered to what the worker's open-file limit can hold.

    Past the fd limit accept() fails, and a connection that is never accepted can neither
    be served nor make an idle one give way: the limit must bite first.
    """
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile - FD_RESERVE >= configured:
        return configured
    lowered = max(1, nofile - FD_RESERVE)
    log.warning("--limit-concurrency %d lowered to %d: the open-file limit is %d; raise "
                "LimitNOFILE= / ulimit -n to allow more", configured, lowered, nofile)
    return lowered


def unread_bytes(conn: Any) -> int:
    """Bytes the kernel holds for this connection that the loop has not read yet."""
    sock = conn.transport.get_extra_info("socket")
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, AttributeError):
        return 0
    return int.from_bytes(raw, sys.byteorder)


_room_logged = [-ROOM_LOG_EVERY]


def make_room(connections: set[Any], keep: Any, limit: int, now: float) -> int:
    """Close idle connections, oldest first, until the worker is below `limit` again.

    uvicorn answers 503 to every request once a worker holds `--limit-concurrency`
    connections, however many of them are idle: a few thousand silent connections would
    lock real clients out. A little more than needed is closed (1/64 of the limit): under a
    flood of new connections the sweep then runs once per batch instead of once per
    connection. A connection whose next request already waits in the kernel is not idle,
    only not read yet: it is skipped (one FIONREAD per candidate, only at the limit).
    Closed connections leave the set at once, so the limit check that follows sees the room.
    """
    excess = len(connections) - limit + 1 + limit // 64
    idle = sorted((c for c in connections
                   if c is not keep and getattr(c, "idle", False)),  # ours, either --http
                  key=attrgetter("head_since"))
    closed = 0
    for conn in idle:
        if closed >= excess:
            break
        if unread_bytes(conn):
            continue
        conn.transport.close()
        connections.discard(conn)
        closed += 1
    if closed and now - _room_logged[0] >= ROOM_LOG_EVERY:
        _room_logged[0] = now
        log.warning("connection limit (%d, --limit-concurrency) reached: closed %d idle "
                    "connections, oldest first (logged once a minute)", limit, closed)
    return closed
