"""Unfinished TLS handshakes are cut at the head deadline, not held for asyncio's 60 s
(issue 22, item 5): a flood of silent connections to the TLS port goes away as fast as
the same flood on the plain port, and real clients are served throughout."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import pytest
from tls_pki import Pki, client_context, https_get

from hello_cluster.http import tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def closed_by_peer(sock: socket.socket, deadline: float) -> float | None:
    """Seconds until the server closed `sock`, or None if it was still open at `deadline`."""
    start = time.monotonic()
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            return None
    return None


def test_handshakes_that_never_finish_are_cut_at_the_deadline(cluster: Any, pki: Pki) -> None:
    cert, key = pki.cert("server", 0x2001)
    c = cluster("--workers", "1", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                workers=1)
    workers = set(c.workers())
    started = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", c.port), timeout=5) for _ in range(100)]
    half = socket.create_connection(("127.0.0.1", c.port), timeout=5)
    half.sendall(bytes.fromhex("16030100a5010000a10303") + os.urandom(16))  # half a hello
    try:
        # Real clients are served while the flood waits.
        assert https_get(c.port, client_context(pki), timeout=5)[0] == 200
        deadline = started + tls.HANDSHAKE_TIMEOUT + 5.0  # well before asyncio's 60 s
        for sock in [half, *silent]:
            took = closed_by_peer(sock, deadline)
            assert took is not None, "an unfinished handshake was still held past the deadline"
        assert time.monotonic() - started >= tls.HANDSHAKE_TIMEOUT - 1.0, "cut too early"
        assert https_get(c.port, client_context(pki), timeout=5)[0] == 200
    finally:
        for sock in [half, *silent]:
            with contextlib.suppress(OSError):
                sock.close()
    assert set(c.workers()) == workers, "the flood cost a worker"
    assert "Traceback" not in c.log
