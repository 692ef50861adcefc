"""CPU the master's loop spends per connection on its metrics endpoint, in microseconds.

In-process, on real loopback sockets: N clients connect and send one request each, then
the endpoint is driven turn by turn as the master drives it (next_deadline, select,
dispatch, expire) until every connection is answered. The handler is the master's own for
/metrics (choose_format and the shared render), over the master's registry. Two requests:
a scraper's, and the costliest a client can send within the limits (an 8 KiB-bounded head
with 100 headers and 16 Accept ranges of 4 parameters each, all that is read, and a
different Accept each time).

Run with hello-cluster's venv: `.venv/bin/python bench/micro_endpoint.py`.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import time
from collections.abc import Callable

from hello_cluster.observe.endpoint import Endpoint, Response
from hello_cluster.observe.metrics import PoolStats, master_registry
from hello_cluster.observe.scrape import Scrapes, choose_format

N = 2000
def scraper(i: int) -> bytes:
    return (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;"
            b"version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\r\n")


def hostile(i: int) -> bytes:
    """A different Accept each time (no help from choose_format's cache), all of it read."""
    ranges = [f"application/openmetrics-text;version=1.0.{i};a=b;c=d;e=f" for _ in range(16)]
    return (b"GET /metrics HTTP/1.1\r\nAccept: " + ",".join(ranges).encode() + b"\r\n"
            + b"a:b\r\n" * 99 + b"\r\n")


REQUESTS = {"scraper": scraper, "hostile": hostile}


def run(request: Callable[[int], bytes]) -> dict[str, float]:
    stats = PoolStats(desired=2, running=2, ready=2)
    scrapes = Scrapes(master_registry(lambda: stats, None), lambda: stats)

    def handler(method: str, path: str, accept: str) -> Response:
        fmt = choose_format(accept)
        return Response(200, scrapes.body(fmt, time.monotonic()), fmt.content_type)

    listener = socket.create_server(("127.0.0.1", 0), backlog=N + 100)
    selector = selectors.DefaultSelector()
    endpoint = Endpoint(listener, selector, handler)
    clients = []
    for i in range(N):
        c = socket.create_connection(listener.getsockname())
        c.sendall(request(i))
        clients.append(c)
    cpu = time.process_time()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        endpoint.next_deadline()
        events = selector.select(0)
        for key, _ in events:
            key.data()
        endpoint.expire(time.monotonic())
        if not events and not endpoint.conns:
            break
    cpu = time.process_time() - cpu
    answered = 0
    for c in clients:
        c.settimeout(5)
        answered += c.recv(16).startswith(b"HTTP/1.1 200")
        c.close()
    endpoint.close()
    selector.close()
    return {"request_bytes": len(request(N)), "answered": answered,
            "cpu_us_per_request": round(cpu / N * 1e6, 1), "renders": scrapes.renders}


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 3 * N + 100), hard))
    print(json.dumps({name: run(request) for name, request in REQUESTS.items()}, indent=2))


if __name__ == "__main__":
    main()
