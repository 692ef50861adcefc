"""HAProxy's PROXY protocol (v1 text, v2 binary) in front of either HTTP protocol.

Behind a TCP load balancer (AWS NLB, HAProxy in `mode tcp`, a Kubernetes Service with
`externalTrafficPolicy: Local` and a proxy in front) every connection comes from the
balancer: without the PROXY header it sends first, the app, the access log and the rate
limits see one address for everybody. `--proxy-protocol v1|v2|auto` reads that header,
but only from a peer in `--forwarded-allow-ips`: anybody else could claim any address.

- From a trusted peer the header is required: a malformed or missing one closes the
  connection (a balancer configured to send it always does; a connection without it is not
  from the balancer and must not be believed either way). It must arrive within
  policy.HEAD_TIMEOUT and is at most MAX_V2 bytes.
- From any other peer nothing is read as a PROXY header: the bytes go to HTTP, where
  `PROXY TCP4 ...` is a malformed request line (400).
- `LOCAL` (v2) and `UNKNOWN` (v1), the balancer's own health checks, keep the peer address.

parse() is a pure function over the bytes received so far; ProxyFront is the asyncio
protocol that waits for the header and then hands the connection to the HTTP protocol
(as the HTTP protocols hand a websocket upgrade over), with the client address it carries.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from hello_cluster.http.policy import HEAD_TIMEOUT

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
MAX_V1 = 107  # the longest v1 line, CRLF included (the spec's own bound)
MAX_V2 = 16 + 1024  # header plus addresses and TLVs we accept (the spec allows 64 KiB)


class ProxyHeaderError(ValueError):
    """The PROXY header is malformed or missing; the connection is closed."""


@dataclass(frozen=True)
class ProxyHeader:
    length: int  # bytes of the header, to strip before HTTP
    client: tuple[str, int] | None  # None: LOCAL / UNKNOWN, keep the peer's address
    server: tuple[str, int] | None = None


def parse(data: bytes, mode: str) -> ProxyHeader | None:
    """The header at the start of `data`, None if more bytes are needed, or ProxyHeaderError.

    `mode` is v1, v2 or auto (either, told apart by their first bytes).
    """
    if mode in ("v2", "auto") and data[:12] == V2_SIGNATURE[:len(data[:12])]:
        if len(data) < 12:
            return None
        return _parse_v2(data)
    if mode in ("v1", "auto") and data[:6] == V1_PREFIX[:len(data[:6])]:
        if len(data) < 6:
            return None
        return _parse_v1(data)
    raise ProxyHeaderError(f"no PROXY {'v1 or v2' if mode == 'auto' else mode} header "
                           f"from a trusted peer (got {data[:16]!r})")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1)
    if end < 0:
        if len(data) >= MAX_V1:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, None)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line {data[:end]!r}")
    family = 4 if parts[1] == b"TCP4" else 6
    src, dst = _address(parts[2], family), _address(parts[3], family)
    return ProxyHeader(end + 2, (src, _port(parts[4])), (dst, _port(parts[5])))


def _address(raw: bytes, family: int) -> str:
    try:
        address = ipaddress.ip_address(raw.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(f"malformed address {raw!r} in a PROXY v1 line") from None
    if address.version != family:
        raise ProxyHeaderError(f"address {raw!r} is not IPv{family}")
    return str(address)


def _port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[:1] == b"0") \
            or int(raw) > 65535:
        raise ProxyHeaderError(f"malformed port {raw!r} in a PROXY v1 line")
    return int(raw)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version_command >> 4}")
    if 16 + length > MAX_V2:
        raise ProxyHeaderError(f"PROXY v2 header of {16 + length} bytes (at most {MAX_V2})")
    if len(data) < 16 + length:
        return None
    command = version_command & 0x0F
    body = data[16:16 + length]
    if command == 0:  # LOCAL: the balancer's own connection
        return ProxyHeader(16 + length, None)
    if command != 1:
        raise ProxyHeaderError(f"PROXY v2 header with command {command}")
    if family not in _V2_TCP:
        return ProxyHeader(16 + length, None)  # UNSPEC, UDP or unix: nothing a scope uses
    af, size, name = _V2_TCP[family]
    if length < 2 * size + 4:
        raise ProxyHeaderError(f"PROXY v2 {name} addresses cut short")
    src, dst, sport, dport = struct.unpack(f"!{size}s{size}sHH", body[:2 * size + 4])
    return ProxyHeader(16 + length, (socket.inet_ntop(af, src), sport),
                       (socket.inet_ntop(af, dst), dport))


# v2 address families carried over TCP: (socket family, address bytes, name)
_V2_TCP = {0x11: (socket.AF_INET, 4, "IPv4"), 0x21: (socket.AF_INET6, 16, "IPv6")}


def trusts(allowed: tuple[str, ...], host: str | None) -> bool:
    """Whether `host` is in --forwarded-allow-ips (`*`, IPs or networks)."""
    if not allowed or host is None:
        return False
    if "*" in allowed:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in _networks(allowed))


@functools.lru_cache(maxsize=8)
def _networks(allowed: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                 ...]:
    """--forwarded-allow-ips parsed once (config.parse_forwarded checked every item), not
    on every connection or request that asks."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in allowed)


class ProxyFront(asyncio.Protocol):
    """Reads the PROXY header from a trusted peer, then hands the connection on."""

    inner_class: Any = None  # the HTTP protocol class, set by behind_proxies()
    mode = "auto"
    allowed: tuple[str, ...] = ()

    def __init__(self, config: Any, server_state: Any, app_state: Any,
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.args = (config, server_state, app_state, _loop)
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None
        if not trusts(self.allowed, host):
            self.hand_over(None, b"")  # an untrusted peer's header is never believed
            return
        self.deadline = self.loop.call_later(HEAD_TIMEOUT, self.expire)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            header = parse(self.buffer, self.mode)
        except ProxyHeaderError as err:
            _log_refusal(err)
            self.close()
            return
        if header is not None:
            self.hand_over(header, self.buffer[header.length:])

    def hand_over(self, header: ProxyHeader | None, rest: bytes) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        config, server_state, app_state, loop = self.args
        inner = self.inner_class(config=config, server_state=server_state,
                                 app_state=app_state, _loop=loop)
        assert self.transport is not None
        self.transport.set_protocol(inner)
        inner.connection_made(self.transport)
        if header is not None and header.client is not None:
            inner.client = header.client  # both protocols build the scope's client from it
            if header.server is not None:
                inner.server = header.server
        if rest:
            inner.data_received(rest)

    def expire(self) -> None:
        _log_refusal(ProxyHeaderError(f"no PROXY header within {HEAD_TIMEOUT:g} s"))
        self.close()

    def close(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()


_logged: set[str] = set()


def _log_refusal(err: ProxyHeaderError) -> None:
    """Once per distinct reason: a misconfigured balancer would otherwise log every
    connection."""
    reason = str(err).split(" (got")[0]
    if reason not in _logged and len(_logged) < 64:
        _logged.add(reason)
        logging.getLogger("hello_cluster.worker").warning(
            "closed a connection from a trusted proxy: %s (--proxy-protocol; logged once)", err)


def behind_proxies(inner_class: Any, mode: str, allowed: tuple[str, ...]) -> type[ProxyFront]:
    """The protocol class for uvicorn.Config(http=...) under --proxy-protocol."""
    return type("ProxyFront", (ProxyFront,), {"inner_class": inner_class, "mode": mode,
                                              "allowed": allowed})
