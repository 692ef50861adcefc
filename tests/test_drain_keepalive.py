"""A drain loses no request on keep-alive connections, even mid-response.

A response's head says whether the connection stays open. When a worker starts draining
after the head went out without `connection: close`, the client will send its next request
on that connection as soon as the body is in; the worker must treat the connection like
any idle keep-alive one (a short grace, one more request answered with `connection: close`)
instead of closing it under that request.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time

from conftest import Cluster, wait_for

CLIENTS = 8
SECONDS = 6.0


class KeepAliveClients:
    """CLIENTS threads, each one persistent connection sending requests back to back.

    http.client reconnects by itself after a response that says `connection: close`; any
    other end of a connection is a failure, recorded with its error.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        deadline = time.monotonic() + SECONDS + 30
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException) as err:
                    with self.lock:
                        self.failures.append(f"{type(err).__name__}: {err}")
                    conn.close()
                    continue
                with self.lock:
                    if status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"HTTP {status}")
        finally:
            conn.close()

    def __enter__(self) -> KeepAliveClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def test_reload_mid_response_loses_no_keep_alive_request(cluster) -> None:
    c: Cluster = cluster("--workers", "2", "--app", "hc_streamed:app", workers=2)
    reloads = 3
    with KeepAliveClients(c.port) as clients:
        for n in range(1, reloads + 1):
            time.sleep(SECONDS / (reloads + 1))
            old = set(c.workers())
            c.signal(signal.SIGHUP)
            wait_for(lambda o=old: not set(c.workers()) & o and len(c.workers()) == 2,
                     30, what=f"reload {n} to replace every worker")
        served = clients.ok  # the clients go on against the new generation
        wait_for(lambda: clients.ok >= served + 2 * CLIENTS, 10,
                 what="requests after the last reload")
    assert clients.ok > 100, clients.ok
    assert clients.failures == [], (len(clients.failures), clients.failures[:5])
