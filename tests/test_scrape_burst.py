"""A burst of scrapes must not starve supervision (issue 12, item 4), and the endpoint's
limits (128 connections, 8 KiB head, 5 s) still hold.

Before the fix, 2000 /metrics requests queued at once were rendered one by one in the
master's loop: /livez took 1.4 s and a respawned worker's readiness 106 ms instead of
5-13 ms. The bounds here compare with the same machine's quiet figures, measured first in
the same test: the suite runs on 2 busy cores, where even a quiet respawn can take 40 ms.

`pytest -s tests/test_scrape_burst.py` prints the figures (the README quotes them).
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import signal
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable

from conftest import Cluster, need, wait_for

BURST = 2000
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
LIVEZ = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need(hard == resource.RLIM_INFINITY or hard >= wanted,
         f"needs an open-file hard limit of {wanted} (ulimit -Hn; run as root)")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def livez_ms(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(LIVEZ)
        reply = b""
        for _ in range(100):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return (time.perf_counter() - start) * 1000


def ready_ms(c: Cluster, pid: int) -> float:
    found = re.search(rf"pid {pid} ready in (\d+) ms", c.log)
    if found is None:
        raise KeyError(pid)
    return float(found.group(1))


def respawn(c: Cluster, victim: int, before: set[int]) -> float:
    """SIGKILL a worker; the master's "ready in" for its replacement, in ms."""
    os.kill(victim, signal.SIGKILL)
    new: list[int] = []

    def replaced() -> bool:
        new[:] = sorted(set(c.workers()) - before)
        return bool(new) and ready_ms(c, new[0]) >= 0

    wait_for(replaced, 10, what="the killed worker's replacement to be ready")
    return ready_ms(c, new[0])


def master_cpu_ms(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def test_a_scrape_burst_does_not_stall_supervision(cluster: Callable[..., Cluster]) -> None:
    raise_fd_limit(BURST + 1000)
    c = cluster("--workers", "2", workers=2)
    port = c.metrics_port
    assert port is not None

    # Quiet figures first, on this machine, now.
    quiet_livez = statistics.median(livez_ms(port) for _ in range(20))
    workers = set(c.workers())
    quiet_ready = respawn(c, min(workers), workers)
    c.wait_ready(2)

    probes: list[float] = []
    errors: list[str] = []
    bursting = threading.Event()
    done = threading.Event()

    def probe() -> None:
        """/livez in a loop while the burst lasts (bounded: 30 s, 5000 probes)."""
        deadline = time.monotonic() + 30
        for _ in range(5000):
            if done.is_set() or time.monotonic() > deadline:
                return
            during = bursting.is_set()
            try:
                ms = livez_ms(port)
            except (OSError, AssertionError) as err:
                errors.append(repr(err))
                continue
            if during:
                probes.append(ms)
            time.sleep(0.002)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    kept: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    replies: dict[socket.socket, bytes] = {}
    workers = set(c.workers())
    victim = min(workers)
    resets = 0
    try:
        cpu_before = master_cpu_ms(c.pid)
        started = time.monotonic()
        bursting.set()
        for i in range(BURST):  # queued at once: connect and send, read later
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 8 == 7:  # reset before sending anything
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                resets += 1
                continue
            s.sendall(REQUEST)
            if i % 4 == 3:  # reset right after sending: nobody to answer
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                resets += 1
                continue
            s.setblocking(False)
            kept.append(s)
            sel.register(s, selectors.EVENT_READ)
            replies[s] = b""
            if i == BURST // 4:
                os.kill(victim, signal.SIGKILL)  # a respawn in the middle of the burst
        sent = time.monotonic() - started
        open_socks = len(kept)
        deadline = time.monotonic() + 30
        while open_socks and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                s = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = s.recv(65536)
                except OSError:
                    chunk = b""
                if chunk:
                    replies[s] += chunk
                    continue
                sel.unregister(s)
                open_socks -= 1
        elapsed = time.monotonic() - started
        bursting.clear()
        cpu = master_cpu_ms(c.pid) - cpu_before
    finally:
        done.set()
        prober.join(timeout=15)
        for s in kept:
            s.close()
        sel.close()

    assert open_socks == 0, f"{open_socks} scrapes neither answered nor closed in 30 s"
    answered = [r for r in replies.values() if r]
    assert all(r.startswith(b"HTTP/1.1 200") for r in answered), \
        {r[:40] for r in answered if not r.startswith(b"HTTP/1.1 200")}
    new = sorted(set(c.workers()) - workers)
    wait_for(lambda: bool(new) and ready_ms(c, new[0]) >= 0, 10,
             what="the worker killed during the burst to be replaced and ready")
    burst_ready = ready_ms(c, new[0])
    print(f"\nscrape burst: {BURST} scrapes ({resets} reset by the client) sent in "
          f"{sent * 1000:.0f} ms, all done in {elapsed * 1000:.0f} ms; {len(answered)}/"
          f"{len(kept)} answered 200; master CPU {cpu:.0f} ms "
          f"({cpu * 1000 / BURST:.0f} us a scrape)\n"
          f"/livez quiet median {quiet_livez:.1f} ms; during the burst n={len(probes)} "
          f"median {statistics.median(probes):.1f} ms, max {max(probes):.1f} ms\n"
          f"respawn ready in: quiet {quiet_ready:.0f} ms, during the burst "
          f"{burst_ready:.0f} ms")
    assert not errors, errors[:5]
    assert len(answered) >= 0.9 * len(kept), "more than 10% of the scrapes were dropped"
    assert len(probes) >= 3, probes
    # Targets of issue 12 (< 50 ms), loosened only as far as this machine is slow today:
    # how long the client took to queue the burst (kernel work, the master's speed does not
    # enter it) says how busy the cores are. Before the fix the median was 4-6 times that.
    assert statistics.median(probes) < max(50.0, 3 * quiet_livez, sent * 1000 / 2), probes
    assert max(probes) < 1000, probes
    # A respawn during the burst: 63 ms before the fix against 7-8 ms quiet. The replacement
    # imports its app on the same two cores the burst and the other xdist tests keep busy, so
    # its startup slows with them: 89 ms against a quiet 23 ms was seen in CI, with /livez at a
    # 68 ms median beside it (passing). The bound therefore grows with the master's own loop
    # latency in the burst, which the probes above already hold to their target; what it still
    # catches is a respawn held back far beyond what the loop latency explains.
    loop_ms = statistics.median(probes)
    assert burst_ready < max(60.0, 3 * quiet_ready, quiet_ready + 2 * loop_ms), \
        (quiet_ready, burst_ready, loop_ms)
    assert c.proc.poll() is None
    c.wait_ready(2)


def test_endpoint_limits_still_hold(cluster: Callable[..., Cluster]) -> None:
    """At most 128 connections wait (the oldest go first), heads over 8 KiB or 100 headers
    get 431, and an unfinished request is cut at 5 s; /livez answers throughout."""
    raise_fd_limit(1024)
    c = cluster("--workers", "1", workers=1)
    port = c.metrics_port
    assert port is not None

    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    opened = time.monotonic()
    try:
        assert livez_ms(port) < 1000

        def eof(s: socket.socket, timeout: float) -> bool:
            s.settimeout(timeout)
            try:
                return s.recv(1) == b""
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False

        # The first 72 (and the /livez probe's slot) made room for the newer ones at once.
        assert all(eof(s, 2) for s in idle[:72])
        assert not any(eof(s, 0.05) for s in idle[-50:])  # the newest still wait
        # The rest are cut at their 5 s deadline, not before, not much after.
        assert all(eof(s, 8) for s in idle[72:])
        assert 4.5 < time.monotonic() - opened < 8
    finally:
        for s in idle:
            s.close()

    def send(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            reply = b""
            for _ in range(100):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    assert send(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 7000
                + b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert send(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000
                + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    assert send(b"GET /livez HTTP/1.1\r\n" + b"a: b\r\n" * 100
                + b"\r\n").startswith(b"HTTP/1.1 200")
    assert send(b"GET /livez HTTP/1.1\r\n" + b"a: b\r\n" * 101
                + b"\r\n").startswith(b"HTTP/1.1 431")  # at most 100 headers
    assert livez_ms(port) < 1000
    assert c.proc.poll() is None


def test_back_to_back_scrapes_share_one_render(cluster: Callable[..., Cluster]) -> None:
    """Within the window and with the pool unchanged, the master renders once: the second
    body is byte for byte the first, process CPU seconds and loop wake-ups included (a
    counter that moves every turn must not defeat the sharing)."""
    c = cluster("--workers", "2", workers=2)
    bodies = []
    for _ in range(20):
        bodies.append(c.metrics_get("/metrics")[2])
        time.sleep(0.02)  # each scrape in a turn of its own, well inside the window
    shared = sum(a == b for a, b in zip(bodies, bodies[1:], strict=False))
    assert shared >= 5, f"only {shared} of 19 scrapes shared the render before them"
