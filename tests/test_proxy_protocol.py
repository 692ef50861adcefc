"""`--proxy-protocol` (HAProxy PROXY v1/v2) and RFC 7239 `Forwarded` (issue 24, item 5).

The parsers are pure and fuzzed: any bytes give a header, "need more", or one
ProxyHeaderError, never anything else. Then against real workers on both protocols over
loopback: v1 and v2 headers from a trusted peer set the app's client (and the access log's),
a header from an untrusted peer is never believed, a malformed or missing one from a trusted
peer closes the connection, LOCAL keeps the peer, and `Forwarded` from a trusted proxy sets
client and scheme.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Cluster, run_cli, wait_for
from hello_cluster.http import forwarded, proxyproto
from hello_cluster.http.proxyproto import V2_SIGNATURE, ProxyHeaderError, parse

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def v2_tcp4(src: str, sport: int, dst: str = "10.0.0.1", dport: int = 443) -> bytes:
    return v2(1, 0x11, socket.inet_aton(src) + socket.inet_aton(dst)
              + struct.pack("!HH", sport, dport))


def test_v1_and_v2_parse() -> None:
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n"
    header = parse(line + GET, "v1")
    assert header is not None and header.length == len(line)
    assert header.client == ("203.0.113.7", 51234) and header.server == ("10.0.0.1", 443)
    six = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n", "auto")
    assert six is not None and six.client == ("2001:db8::7", 1)
    unknown = parse(b"PROXY UNKNOWN\r\n", "v1")
    assert unknown is not None and unknown.client is None
    binary = v2_tcp4("198.51.100.9", 40000)
    header = parse(binary + GET, "v2")
    assert header is not None and header.length == len(binary)
    assert header.client == ("198.51.100.9", 40000)
    local = parse(v2(0, 0, b""), "auto")
    assert local is not None and local.client is None
    for cut in range(len(binary)):
        assert parse(binary[:cut], "v2") is None  # need more, however it is split
    for bad, mode in [(b"GET / HTTP/1.1\r\n", "auto"), (line, "v2"), (binary, "v1"),
                      (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n", "v1"),
                      (b"PROXY TCP4 ::1 ::1 1 2\r\n", "v1"), (b"PROXY TCP4 x y 1 2\r\n", "v1"),
                      (b"PROXY " + b"a" * 200, "v1"), (v2(1, 0x11, b"short"), "v2"),
                      (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12, "v2"),
                      (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2")]:
        with pytest.raises(ProxyHeaderError):
            parse(bad, mode)


@given(data=st.binary(max_size=300), mode=st.sampled_from(["v1", "v2", "auto"]))
@settings(max_examples=2000, deadline=None)
def test_any_bytes_give_a_header_more_or_one_error(data: bytes, mode: str) -> None:
    for prefix in (b"", b"PROXY ", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"):
        try:
            header = parse(prefix + data, mode)
        except ProxyHeaderError as err:
            assert "\n" not in str(err)  # one line
            continue
        if header is not None:
            assert 0 < header.length <= len(prefix + data)
            if header.client is not None:
                host, port = header.client
                assert isinstance(host, str) and 0 <= port <= 65535


@given(st.text(max_size=120))
@settings(max_examples=1000, deadline=None)
def test_any_forwarded_value_parses_or_is_ignored(value: str) -> None:
    parsed = forwarded.elements(value)
    assert parsed is None or all(isinstance(e, dict) for e in parsed)
    scope = {"type": "http", "client": ("127.0.0.1", 1), "scheme": "http"}
    forwarded.Forwarded(None, ("127.0.0.1",)).apply(scope, value)
    assert isinstance(scope["client"], tuple) and scope["scheme"] in ("http", "https")


def test_forwarded_elements() -> None:
    value = 'for=192.0.2.60;proto=https;by=203.0.113.43, for="[2001:db8:cafe::17]:4711"'
    assert forwarded.elements(value) == [
        {"for": "192.0.2.60", "proto": "https", "by": "203.0.113.43"},
        {"for": "[2001:db8:cafe::17]:4711"}]
    scope = {"type": "http", "client": ("127.0.0.1", 1), "scheme": "http"}
    forwarded.Forwarded(None, ("127.0.0.1",)).apply(scope, "for=192.0.2.60;proto=https")
    assert scope["client"] == ("192.0.2.60", 0) and scope["scheme"] == "https"
    scope = {"type": "http", "client": ("127.0.0.1", 1), "scheme": "http"}
    forwarded.Forwarded(None, ("127.0.0.1", "10.0.0.0/8")).apply(
        scope, "for=6.6.6.6, for=198.51.100.1, for=10.1.2.3")  # the rightmost untrusted
    assert scope["client"] == ("198.51.100.1", 0)
    scope = {"type": "http", "client": ("127.0.0.1", 1), "scheme": "http"}
    forwarded.Forwarded(None, ("127.0.0.1",)).apply(scope, "for=_hidden")
    assert scope["client"] == ("127.0.0.1", 1)


@pytest.fixture(scope="module", params=["fast", "uvicorn"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("proxy"),
                ["--app", "hc_rfc:app", "--workers", "1", "--http", request.param,
                 "--proxy-protocol", "auto", "--forwarded-allow-ips", "127.0.0.1",
                 "--access-log"])
    try:
        c.wait_ready(1)
        yield c
    finally:
        c.kill_all()


def send(port: int, payload: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source, 0)) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_a_trusted_balancer_names_the_client(server: Cluster) -> None:
    raw = send(server.port, b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n"
               b"GET /who HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    raw = send(server.port, v2_tcp4("198.51.100.9", 40000) + b"GET /v2 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    raw = send(server.port, v2(0, 0, b"") + b"GET /local HTTP/1.1\r\nHost: t\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    wait_for(lambda: "GET /local" in server.log, 10, what="the access log lines")
    log = server.log
    assert any("203.0.113.7:51234" in line for line in log.splitlines() if "GET /who" in line)
    assert any("198.51.100.9:40000" in line for line in log.splitlines() if "GET /v2" in line)
    assert any("127.0.0.1:" in line for line in log.splitlines() if "GET /local" in line)


def test_a_trusted_peer_without_a_header_is_closed(server: Cluster) -> None:
    assert send(server.port, GET) == b""  # missing: closed, never served
    assert send(server.port, b"PROXY TCP4 nonsense\r\n" + GET) == b""
    assert "closed a connection from a trusted proxy" in server.log
    assert server.workers()  # and the worker serves on


def test_an_untrusted_peer_is_never_believed(server: Cluster) -> None:
    # From 127.0.0.2 (not in --forwarded-allow-ips) the header is just bytes: a bad request.
    raw = send(server.port, b"PROXY TCP4 203.0.113.99 10.0.0.1 1 443\r\n" + GET, "127.0.0.2")
    assert raw.startswith(b"HTTP/1.1 400"), raw[:200]
    raw = send(server.port, GET, "127.0.0.2")  # and plain HTTP is served as usual
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert "203.0.113.99" not in server.log


def test_forwarded_sets_the_client_and_scheme(server: Cluster) -> None:
    raw = send(server.port, b"PROXY UNKNOWN\r\nGET /fwd HTTP/1.1\r\nHost: t\r\n"
               b"Forwarded: for=192.0.2.60;proto=https\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    wait_for(lambda: "GET /fwd" in server.log, 10, what="the access log line")
    assert any("192.0.2.60:0" in line for line in server.log.splitlines() if "GET /fwd" in line)


def test_proxy_protocol_needs_trusted_peers_and_a_plain_port() -> None:
    done = run_cli("--proxy-protocol", "v2")
    assert done.returncode == 2 and "--forwarded-allow-ips" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    done = run_cli("--proxy-protocol", "v1", "--forwarded-allow-ips", "127.0.0.1",
                   "--ssl-certfile", "/etc/hostname", "--ssl-keyfile", "/etc/hostname")
    assert done.returncode == 2 and "plain ports" in done.stderr, done.stderr
    done = run_cli("--proxy-protocol", "v3")
    assert done.returncode == 2 and "v3" in done.stderr


def test_module_is_pure() -> None:
    assert proxyproto.trusts(("10.0.0.0/8",), "10.2.3.4")
    assert not proxyproto.trusts(("10.0.0.0/8",), "11.2.3.4")
    assert proxyproto.trusts(("*",), "1.1.1.1") and not proxyproto.trusts((), "1.1.1.1")
