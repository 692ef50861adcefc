"""An app's bad response status costs only its own request (issue 22, item 1).

`"status": "200"` (a str) used to kill the worker a second later, at the metrics flush,
cutting every download on it; 99, 600 and 1000 closed the connection with no answer. Now:
`--http fast` answers 500, `--http uvicorn` answers 500 or closes, every byte written parses
with h11 as a strict client, a download streaming on the same worker finishes intact, and
the worker (same pid) serves on."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any
from urllib.parse import quote

import h11
import pytest

BAD = ["200", 99, 100, 101, 199, 600, 1000, 200.5, True, None, [200]]


def exchange(port: int, target: str, timeout: float = 10.0) -> list[Any]:
    """One request; the events h11 (a strict client) reads from what the server wrote."""
    conn = h11.Connection(h11.CLIENT)
    events: list[Any] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        request = h11.Request(method="GET", target=target, headers=[("Host", "t")])
        sock.sendall(conn.send(request) + conn.send(h11.EndOfMessage()))
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as err:
                raise AssertionError(f"malformed bytes on the wire for {target}: {err}") from None
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    return events  # closed with no answer
                continue
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return events
            events.append(event)
            if isinstance(event, h11.EndOfMessage):
                return events


@pytest.mark.parametrize("http", ["fast", "uvicorn"])
def test_a_bad_status_costs_only_its_request(cluster: Any, http: str) -> None:
    c = cluster("--workers", "1", "--app", "hc_badstatus:app", "--http", http, workers=1)
    (pid,) = c.workers()
    download: dict[str, Any] = {}

    def stream() -> None:
        download["events"] = exchange(c.port, "/stream", timeout=30)

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        for value in BAD:
            events = exchange(c.port, "/status?v=" + quote(json.dumps(value)))
            statuses = [e.status_code for e in events if isinstance(e, h11.Response)]
            if http == "fast":
                assert statuses == [500], (value, events)
            else:
                assert statuses in ([], [500]), (value, events)
    finally:
        streaming.join(timeout=40)
    body = b"".join(bytes(e.data) for e in download["events"] if isinstance(e, h11.Data))
    assert len(body) == 128 * 65536, "the download on the same worker was cut"
    time.sleep(1.5)  # past the worker's metrics flush, where the str status used to raise
    assert c.workers() == [pid], "a bad status cost the worker"
    assert c.get("/")[2] == str(pid).encode()
