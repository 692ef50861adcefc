"""What an app may put on the wire: its response start checked before a byte of it goes out.

An ASGI app hands the server a status and header pairs, and nothing in ASGI stops it from
handing over `"200"`, `b"x-\\xc3\\xa9"`, `content-length: +5` or two different lengths.
Python's int() takes `+5`, `1_0` and `٥`; a client, a proxy or a cache downstream takes
them differently or not at all (h11, a strict client, refuses each). So the server checks:
the status is an int from 200 to 599 (a 1xx is no final answer, and 101 is only ours to
send for a websocket), header names are tokens (RFC 9110 5.1), values hold no CR, LF, NUL
or other control bytes but HTAB (5.5), Content-Length is 1*DIGIT and stated once (8.6),
Transfer-Encoding is `chunked` alone and never beside a Content-Length (RFC 9112 6.1). A
start that fails is an AppError before anything is written: the request gets a 500, the
app's mistake is logged with the rest of its exception, and the worker serves on.

fastproto calls header_line() for each header (its result is cached per distinct line)
and frame() when a second framing header turns up; `--http uvicorn` gets the same checks
through checked_response(), a wrapper around the app's `send`.
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterable
from typing import Any

from hello_cluster.http.policy import valid_token


class AppError(RuntimeError):
    """The app's response cannot be sent as it is: its request gets a 500 (or, once the
    head is out, its connection closes)."""


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}
FINAL_LINE = {status: STATUS_LINE[status] for status in range(200, 600)}
# Statuses whose response has no body (RFC 9110 15.3.5, 15.4.5): a transfer-encoding the app
# sets with one is dropped, not refused (a 204 never carries content-length either, 8.6);
# a 304's content-length describes the representation and goes out as it is.
BODILESS = (204, 304)
HEADER_CACHE_MAX = 4096  # distinct response header lines remembered (then forgotten at once)

_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# What a response header line means for framing, found once per distinct (name, value).
PLAIN, LENGTH, CHUNKED, CLOSE = 0, 1, 2, 3
LINES: dict[tuple[bytes, bytes], tuple[bytes, int, int]] = {}


def unframed(status: int, kind: int) -> bool:
    """A framing header (LENGTH or CHUNKED) that is dropped, not sent, for this status."""
    return status in BODILESS and (kind == CHUNKED or status == 204)


def status_line(status: Any) -> bytes:
    line = FINAL_LINE.get(status) if type(status) is int else None
    if line is None:
        raise AppError(f"the app's response status {status!r} is not an int from 200 to 599")
    return line


def header_line(name: Any, value: Any) -> tuple[bytes, int, int]:
    """(encoded line, framing kind, content length) for one response header, or AppError."""
    pair = (name, value)
    key: tuple[bytes, bytes] | None = pair
    try:
        hit = LINES.get(pair)
    except TypeError:  # a bytearray (ASGI allows bytes only; uvicorn takes it): not cached
        key, hit = None, None
    if hit is not None:
        return hit
    if not isinstance(name, (bytes, bytearray)) or not isinstance(value, (bytes, bytearray)):
        raise AppError(f"the app's response header {name!r}: {value!r} is not a pair of bytes")
    name, value = bytes(name), bytes(value)
    if not valid_token(name):
        raise AppError(f"the app's response header name {name!r} is not an HTTP token")
    if _BAD_VALUE.search(value):
        raise AppError(f"the app's response header {name.decode()} has a control byte "
                       f"(CR, LF or NUL) in its value {value!r}")
    name = name.lower()
    kind, length = PLAIN, 0
    if name == b"content-length":
        if not value.isdigit():  # ASCII digits only, unlike int()
            raise AppError(f"the app's content-length {value!r} is not a number of bytes")
        kind, length = LENGTH, int(value)
    elif name == b"transfer-encoding":
        if value.lower() != b"chunked":
            raise AppError(f"the app's transfer-encoding {value!r}: only chunked is allowed "
                           "(the server frames the body; compress with content-encoding)")
        kind = CHUNKED
    elif name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
        kind = CLOSE
    hit = (b"".join((name, b": ", value, b"\r\n")), kind, length)
    if key is None:
        return hit
    if len(LINES) >= HEADER_CACHE_MAX:
        LINES.clear()  # unique values (cookies, etags) must not grow it without bound
    LINES[key] = hit
    return hit


def frame(chunked: bool | None, length: int, kind: int, new_length: int) -> None:
    """A second framing header (`kind`) after one already seen: refuse what cannot agree.

    `chunked` says what the first one was (True: transfer-encoding, False: a length).
    The same Content-Length twice is allowed (RFC 9110 8.6) and sent once.
    """
    if kind == CHUNKED or chunked:
        raise AppError("the app's response has both content-length and transfer-encoding")
    if new_length != length:
        raise AppError(f"the app's response has two content-lengths ({length}, {new_length})")


def check_start(message: dict[str, Any]) -> None:
    """The checks fastproto makes while it encodes a response start, for `--http uvicorn`."""
    status: Any = message.get("status")
    status_line(status)
    chunked: bool | None = None
    length = 0
    headers: Iterable[Any] = message.get("headers", ())
    for pair in headers:
        name, value = pair
        _, kind, new_length = header_line(name, value)
        if kind in (LENGTH, CHUNKED) and not unframed(status, kind):
            if chunked is not None:
                frame(chunked, length, kind, new_length)
            else:
                chunked, length = kind == CHUNKED, new_length


def checked_response(app: Any) -> Any:
    """uvicorn's protocol writes what the app sends (a str status raises after the head
    began, 101 goes out as an upgrade nobody asked for, `content-length: +5` as is): check
    the response start before uvicorn sees it, so its cycle answers 500 and the worker
    serves on, as --http fast does. (Two equal lengths go out twice here, once with
    fastproto: RFC 9110 8.6 allows both, and h11 reads them as one.)"""

    async def checked(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_checked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                check_start(message)
            await send(message)

        await app(scope, receive, send_checked)

    return checked
