"""The master's /metrics, /livez and /readyz against the real program: numbers that move when
workers are killed, scaled and reloaded; request counts that survive the workers that served
them; HTTP semantics of the endpoint; and an endpoint that keeps answering (and supervision
that keeps going) when every worker is down or clients misbehave.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from conftest import Cluster, http_get, wait_for

Samples = list[Sample]
REASONS = ("exit", "signal", "timeout", "oom")


def scrape(c: Cluster) -> Samples:
    try:
        status, _, body = c.metrics_get("/metrics", timeout=5)
    except (OSError, http.client.HTTPException):
        # A dying master closes the socket a moment before it exits.
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(timeout=0.5)
        if c.proc.poll() is not None:
            raise AssertionError(f"hello-cluster exited {c.proc.returncode} during a scrape:"
                                 f"\n{c.log[-6000:]}") from None
        raise
    assert status == 200, body
    return [s for family in text_string_to_metric_families(body.decode())
            for s in family.samples]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`; KeyError if none."""
    found = [s.value for s in samples if s.name == name
             and all(s.labels.get(k) == v for k, v in labels.items())]
    if not found:
        raise KeyError(f"{name}{labels or ''} not in the scrape")
    return float(sum(found))


def wait_served(c: Cluster, count: int, timeout: float = 10.0) -> None:
    """Until the workers' flushes (every 0.1 s) have put `count` requests in the files."""
    wait_for(lambda: value(scrape(c), "hello_cluster_http_requests_total") >= count, timeout,
             what=f"{count} requests counted")


def pool(samples: Samples) -> dict[str, float]:
    """The master's own numbers, by short name (restarts by reason)."""
    out = {k: value(samples, f"hello_cluster_{k}") for k in (
        "workers_desired", "workers_running", "workers_ready", "worker_spawns_total",
        "worker_backoff_seconds", "crash_loop", "reloads_total")}
    for reason in REASONS:
        out[f"restarts_{reason}"] = value(samples, "hello_cluster_worker_restarts_total",
                                          reason=reason)
    return out


def wait_pool(c: Cluster, timeout: float, what: str, **expected: float) -> dict[str, float]:
    """Poll until the pool numbers named in `expected` all match; the last scrape on failure."""
    last: dict[str, float] = {}

    def check() -> bool:
        nonlocal last
        last = pool(scrape(c))
        return all(last[k] == v for k, v in expected.items())

    try:
        wait_for(check, timeout, interval=0.05, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}: wanted {expected}, last scrape {last}\n{c.log}") from None
    return last


def raw_request(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Everything the server sends back before it closes (the endpoint always closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


# ---- pool numbers move with what happens to workers ---------------------------------------


def test_five_worker_kills_count_five_signal_restarts(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "3", workers=3)
    base = wait_pool(c, 10, "a settled pool", workers_ready=3, workers_running=3)
    assert base["worker_spawns_total"] == 3
    for i in range(1, 6):
        before = set(c.workers())
        assert len(before) == 3, before
        victim = min(before)  # the oldest pids first: the kills rotate over the slots
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda v=victim: v not in c.workers(), 5, what=f"pid {victim} to die")
        wait_pool(c, 15, f"recovery after kill {i}", workers_ready=3, workers_running=3,
                  worker_spawns_total=base["worker_spawns_total"] + i)
    after = pool(scrape(c))
    assert after["restarts_signal"] == base["restarts_signal"] + 5
    for reason in ("exit", "timeout", "oom"):
        assert after[f"restarts_{reason}"] == base[f"restarts_{reason}"], reason
    assert after["worker_spawns_total"] == base["worker_spawns_total"] + 5
    assert after["workers_desired"] == 3
    assert after["reloads_total"] == 0
    assert after["crash_loop"] == 0
    assert after["worker_backoff_seconds"] == 0


def test_scaling_moves_the_pool_gauges(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "3", workers=3)
    base = pool(scrape(c))
    c.signal(signal.SIGTTIN)
    wait_pool(c, 15, "scale up to 4", workers_desired=4, workers_ready=4, workers_running=4,
              worker_spawns_total=base["worker_spawns_total"] + 1)
    # One signal at a time: identical pending signals would coalesce in the kernel.
    c.signal(signal.SIGTTOU)
    wait_pool(c, 15, "desired 3", workers_desired=3)
    c.signal(signal.SIGTTOU)
    after = wait_pool(c, 15, "scale down to 2", workers_desired=2, workers_ready=2,
                      workers_running=2)
    wait_for(lambda: len(c.workers()) == 2, 10, what="two worker processes")
    # Planned ends are neither restarts nor reasons to spawn.
    assert after["worker_spawns_total"] == base["worker_spawns_total"] + 1
    assert sum(after[f"restarts_{r}"] for r in REASONS) == 0
    assert after["reloads_total"] == 0


def test_reload_counts_once_and_respawns_every_worker(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "3", workers=3)
    old = set(c.workers())
    base = pool(scrape(c))
    c.signal(signal.SIGHUP)
    after = wait_pool(c, 20, "a completed reload", reloads_total=base["reloads_total"] + 1,
                      worker_spawns_total=base["worker_spawns_total"] + 3, workers_ready=3,
                      workers_running=3)
    wait_for(lambda: not old & set(c.workers()), 10, what="the old generation to exit")
    assert len(c.workers()) == 3
    assert sum(after[f"restarts_{r}"] for r in REASONS) == 0
    assert after["workers_desired"] == 3


# ---- request metrics: aggregated over workers, alive or dead -----------------------------


def test_request_counts_add_up_including_dead_workers(cluster: Callable[..., Cluster]) -> None:
    """Three workers serve; two die (SIGKILL, SIGTERM); every request they served still counts."""
    c = cluster("--workers", "3", "--app", "hc_testapp:app", workers=3)
    base = pool(scrape(c))
    # Pin one request on each worker: a /block request stops its worker's loop, so the next
    # connection can only be accepted by a worker that is still free.
    results: list[tuple[int, dict[str, str], bytes]] = []
    threads = []

    def stalls() -> float:
        return value(scrape(c), "hello_cluster_worker_stalls_total")

    before = stalls()
    try:
        for n in range(1, 4):
            t = threading.Thread(target=lambda: results.append(c.get("/block?s=2", timeout=15)))
            t.start()
            threads.append(t)
            # The blocked worker cannot flush its counts (its loop is stopped), but it stops
            # beating: once the master counts the stall it steers new connections away.
            wait_for(lambda n=n: stalls() >= before + n, 5, what=f"blocked worker {n}")
    finally:
        for t in threads:
            t.join(timeout=20)
    assert [r[0] for r in results] == [200, 200, 200]
    served_by = {r[1]["x-worker-pid"] for r in results}
    assert len(served_by) == 3, f"the blocked requests were not spread: {served_by}"
    sent = 3
    for _ in range(27):  # each on a fresh connection: the kernel hands them to any worker
        status, headers, _ = c.get("/")
        assert status == 200
        served_by.add(headers["x-worker-pid"])
        sent += 1
    wait_for(lambda: value(scrape(c), "hello_cluster_http_requests_total") == sent, 5,
             what="all requests counted before the kills")

    killed, termed = sorted(int(p) for p in served_by)[:2]
    os.kill(killed, signal.SIGKILL)
    os.kill(termed, signal.SIGTERM)
    wait_for(lambda: not {killed, termed} & set(c.workers()), 35, what="both workers gone")
    after = wait_pool(c, 15, "respawn of both", workers_ready=3, workers_running=3,
                      worker_spawns_total=base["worker_spawns_total"] + 2)
    assert after["restarts_signal"] == base["restarts_signal"] + 1
    assert after["restarts_exit"] == base["restarts_exit"] + 1

    samples = scrape(c)
    assert value(samples, "hello_cluster_http_requests_total") == sent
    assert value(samples, "hello_cluster_http_requests_total", method="GET", status="200") == sent
    assert value(samples, "hello_cluster_http_request_duration_seconds_count") == sent
    assert value(samples, "hello_cluster_http_request_duration_seconds_bucket", le="+Inf") == sent
    # Three requests slept 2 s each: the histogram sum saw them.
    assert value(samples, "hello_cluster_http_request_duration_seconds_sum") >= 6.0
    assert value(samples, "hello_cluster_http_requests_in_progress") == 0


def test_in_progress_forgets_a_worker_killed_mid_request(
        cluster: Callable[..., Cluster]) -> None:
    """The in-progress gauge counts live workers only: a SIGKILL mid-request leaves no ghost."""
    c = cluster("--workers", "1", "--app", "hc_testapp:app", workers=1)
    (victim,) = c.workers()
    errors: list[BaseException] = []

    def blocked_request() -> None:
        try:
            c.get("/slow?s=10", timeout=15)
        except Exception as err:  # the worker dies under it: a reset is the expected end
            errors.append(err)

    t = threading.Thread(target=blocked_request)
    t.start()
    try:
        wait_for(lambda: value(scrape(c), "hello_cluster_http_requests_in_progress") == 1, 10,
                 what="the request in progress")
        os.kill(victim, signal.SIGKILL)
    finally:
        t.join(timeout=20)
    assert errors, "the request completed although its worker was killed"
    wait_pool(c, 15, "a respawned worker", workers_ready=1, worker_spawns_total=2)
    samples = scrape(c)
    assert value(samples, "hello_cluster_http_requests_in_progress") == 0
    # It never completed, so it is not a served request.
    try:
        served = value(samples, "hello_cluster_http_requests_total")
    except KeyError:
        served = 0.0
    assert served == 0


def test_no_request_metrics_flag_removes_request_metrics(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "2", "--no-request-metrics", workers=2)
    for _ in range(5):
        assert c.get("/")[0] == 200
    samples = scrape(c)
    http_names = sorted({s.name for s in samples if s.name.startswith("hello_cluster_http_")})
    assert http_names == []
    assert value(samples, "hello_cluster_workers_ready") == 2


# ---- the endpoint's HTTP semantics --------------------------------------------------------


def test_metrics_format_negotiation(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "1", workers=1)
    assert c.get("/")[0] == 200
    wait_served(c, 1)

    status, headers, body = c.metrics_get(
        "/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    names = {s.name for f in parse_openmetrics(body.decode()) for s in f.samples}
    assert {"hello_cluster_workers_ready", "hello_cluster_http_requests_total"} <= names

    for accept in ({"Accept": "text/plain"}, {}):
        status, headers, body = c.metrics_get("/metrics", headers=accept)
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
        assert b"# EOF" not in body
        assert b"\nhello_cluster_workers_ready 1.0\n" in body
    assert headers["cache-control"] == "no-store"


def test_endpoint_http_semantics(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "1", workers=1)
    port = c.metrics_port
    assert port is not None

    head = raw_request(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head_lines, _, head_body = head.partition(b"\r\n\r\n")
    assert head_lines.startswith(b"HTTP/1.1 200"), head
    assert head_body == b"", f"HEAD sent a body of {len(head_body)} bytes"
    assert b"content-length: " in head_lines.lower()
    assert int(head_lines.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) > 0

    status, headers, body = c.metrics_get("/metrics", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert c.metrics_get("/livez", method="DELETE")[0] == 405
    assert c.metrics_get("/nope")[0] == 404
    assert c.metrics_get("/metrics/extra")[0] == 404
    assert c.metrics_get("/metrics?name[]=x")[0] == 200

    status, _, body = c.metrics_get("/livez")
    assert status == 200
    status, _, body = c.metrics_get("/readyz")
    assert status == 200, body
    assert body.startswith(b"ready")

    # Garbage is answered (400), not a reason to hang or die.
    bad = raw_request(port, b"\x00\x01 nonsense\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400"), bad
    assert c.metrics_get("/livez")[0] == 200


def test_readyz_503_during_shutdown_delay(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "2", "--shutdown-delay", "2s", workers=2)
    assert c.metrics_get("/readyz")[0] == 200
    c.signal(signal.SIGTERM)

    seen: list[tuple[int, bytes]] = []

    def not_ready() -> bool:
        status, _, body = c.metrics_get("/readyz", timeout=1)
        seen.append((status, body))
        return status == 503

    wait_for(not_ready, 1.5, what="/readyz to go 503 within the 2 s shutdown delay")
    assert b"stopping" in seen[-1][1], seen[-1]
    # Still inside the delay: the master is alive, live and scrapable.
    assert c.proc.poll() is None
    assert c.metrics_get("/livez")[0] == 200
    assert c.metrics_get("/metrics")[0] == 200
    assert c.wait_exit(40) == 0, c.log


def test_endpoints_answer_while_every_worker_is_down(cluster: Callable[..., Cluster]) -> None:
    """Workers crash on boot and back off: the master still answers all three paths."""
    c = cluster("--workers", "2", "--app", "hc_bootcrash:app", "--crash-loop-limit", "100000",
                "--backoff-initial", "5s", "--backoff-max", "5s", ready=False)
    last: dict[str, float] = {}

    def all_down_after_crashes() -> bool:
        nonlocal last
        if c.proc.poll() is not None:
            raise AssertionError(f"hello-cluster exited {c.proc.returncode}:\n{c.log}")
        last = pool(scrape(c))
        return (last["restarts_exit"] >= 2 and last["workers_running"] == 0
                and last["workers_ready"] == 0)

    try:
        wait_for(all_down_after_crashes, 20, interval=0.05, what="every worker down")
    except AssertionError as err:
        raise AssertionError(f"{err}; last scrape {last}; readyz "
                             f"{c.metrics_get('/readyz')[:3:2]}\n{c.log}") from None
    assert last["crash_loop"] == 0
    assert last["workers_desired"] == 2
    status, _, body = c.metrics_get("/readyz")
    assert status == 503, body
    assert b"no worker ready" in body
    assert c.metrics_get("/livez")[0] == 200
    assert value(scrape(c), "hello_cluster_workers_ready") == 0


# ---- slow and idle clients cannot stall supervision ---------------------------------------


def test_slow_clients_do_not_stall_respawn(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "2", workers=2)
    port = c.metrics_port
    assert port is not None
    idle: list[socket.socket] = []
    stop, dripping = threading.Event(), threading.Event()
    trickle = socket.create_connection(("127.0.0.1", port), timeout=5)

    def drip() -> None:
        """One byte a second of a request that never ends, until told to stop or cut off."""
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        for byte in request:
            if stop.wait(1.0):
                return
            try:
                trickle.send(bytes([byte]))
            except OSError:
                return
            dripping.set()

    dripper = threading.Thread(target=drip, daemon=True)
    try:
        for _ in range(50):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        dripper.start()
        # The drip has started: the master now holds 51 unfinished requests.
        assert dripping.wait(5), "the drip did not start"
        before = set(c.workers())
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # Respawning the first death of a slot is immediate; 1 s is the bound of the brief, far
        # below the 5 s the endpoint gives an unfinished request.
        wait_for(lambda: len(set(c.workers()) - before) == 1, 1.0,
                 what="a new worker pid among the master's children")
        status, _, body = http_get(port, "/livez", timeout=2)
        assert status == 200, body
        after = wait_pool(c, 10, "the pool back to 2 ready", workers_ready=2, workers_running=2)
        assert after["restarts_signal"] == 1

        # The master frees every slot a client never finishes: idle ones and the dripper.
        def closed(s: socket.socket) -> bool:
            s.settimeout(10)
            try:
                return s.recv(1) == b""
            except ConnectionResetError:
                return True

        assert all(closed(s) for s in idle), "an idle connection outlived its deadline"
        assert closed(trickle), "the one-byte-a-second client outlived its deadline"
        assert http_get(port, "/livez", timeout=2)[0] == 200
    finally:
        stop.set()
        if dripper.is_alive():
            dripper.join(timeout=5)
        for s in idle:
            s.close()
        trickle.close()


# ---- the multiprocess directory -----------------------------------------------------------


def test_multiprocess_dir_is_private_and_removed_at_stop(
        cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    a = cluster("--workers", "2", "--runtime-dir", str(runtime), workers=2)
    b = cluster("--workers", "1", "--runtime-dir", str(runtime), workers=1)
    dir_a, dir_b = runtime / f"metrics-{a.pid}", runtime / f"metrics-{b.pid}"
    for d in (dir_a, dir_b):
        assert d.is_dir()
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for _ in range(3):
        assert a.get("/")[0] == 200
    wait_served(a, 3)
    assert list(dir_a.glob("*.db")), "workers write their metric files in the instance's dir"
    # Two instances sharing a runtime dir do not see each other's requests.
    assert value(scrape(a), "hello_cluster_http_requests_total") == 3
    try:
        b_requests = value(scrape(b), "hello_cluster_http_requests_total")
    except KeyError:
        b_requests = 0.0
    assert b_requests == 0

    a.signal(signal.SIGTERM)
    assert a.wait_exit(40) == 0, a.log
    assert not dir_a.exists(), f"left behind: {sorted(p.name for p in dir_a.iterdir())}"
    assert runtime.is_dir(), "the runtime dir was given to us: not ours to remove"
    assert dir_b.is_dir(), "stopping one instance must not touch another's files"


def test_scrape_survives_an_empty_worker_metric_file(
        cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """prometheus-client creates a worker's .db file first and sizes it after, so a scrape can
    find it empty (a worker SIGKILLed in that window leaves it empty for good). Such a file
    must cost at most that worker's numbers: never the scrape, and never the master."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    c = cluster("--workers", "2", "--runtime-dir", str(runtime), workers=2)
    victim = min(c.workers())
    os.kill(victim, signal.SIGKILL)
    wait_pool(c, 15, "the respawn", workers_ready=2, worker_spawns_total=3)
    # The victim served nothing, so it had no counter file yet (request counters are created
    # at a worker's first request); this is what it leaves when killed while creating one.
    planted = runtime / f"metrics-{c.pid}" / f"counter_{victim}.db"
    assert not planted.exists()
    planted.touch()
    for _ in range(3):
        assert c.get("/")[0] == 200
    wait_served(c, 3)

    samples = scrape(c)
    assert value(samples, "hello_cluster_workers_ready") == 2
    assert value(samples, "hello_cluster_http_requests_total") == 3
    assert c.metrics_get("/livez")[0] == 200


def test_dead_workers_files_fold_into_one_archive(
        cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """Every dead worker's counters and histograms are summed into one archive file per
    kind, so the files a scrape reads stay as many as the live workers, and nothing that
    was counted is lost."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    c = cluster("--workers", "2", "--runtime-dir", str(runtime), "--backoff-max", "200ms",
                workers=2)
    directory = runtime / f"metrics-{c.pid}"
    sent, spawns = 0, 2
    for _ in range(3):
        for _ in range(10):
            assert c.get("/")[0] == 200
            sent += 1
        wait_for(lambda n=sent: value(scrape(c), "hello_cluster_http_requests_total") == n,
                 5, what="the requests counted")
        for pid in c.workers():
            os.kill(pid, signal.SIGKILL)
        spawns += 2
        wait_pool(c, 15, "the respawns", workers_ready=2, worker_spawns_total=spawns)
    live = set(c.workers())
    for kind in ("counter", "histogram"):
        owners = {p.name[len(kind) + 1:-3] for p in directory.glob(f"{kind}_*.db")}
        assert owners <= {"archive", *map(str, live)}, owners
        assert "archive" in owners
    samples = scrape(c)
    assert value(samples, "hello_cluster_http_requests_total") == sent
    assert value(samples, "hello_cluster_http_request_duration_seconds_count") == sent
    assert value(samples, "hello_cluster_http_request_duration_seconds_bucket", le="+Inf") == sent
