"""The operator's view: /status, `hello-cluster status`, per-slot /proc metrics and the
event-loop lag histogram, against the real program; and the pure parsers and formatters
they stand on, fuzzed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BIN, Cluster, clean_env, free_port, run_cli, wait_for
from hello_cluster.observe import status_command as statuscmd
from hello_cluster.system import procstat
from hello_cluster.worker import looplag

STATES = {"starting", "ready", "stalled", "draining", "hung", "backoff"}


def status_doc(c: Cluster) -> dict[str, Any]:
    code, headers, body = c.metrics_get("/status")
    assert code == 200, body
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def samples(c: Cluster, name: str) -> dict[str, float]:
    """label-string -> value for every sample of `name` (e.g. 'slot="1"')."""
    _, _, body = c.metrics_get("/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):].strip("{}")] = float(value)
    return out


# ---- the real program ------------------------------------------------------------------------


def test_killed_worker_is_one_restart_on_its_slot(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "2", workers=2)
    doc = status_doc(c)
    master = doc["master"]
    assert master["pid"] == c.pid and master["state"] == "running"
    assert master["workers"] == {"desired": 2, "ready": 2, "running": 2}
    assert master["version"] and master["uptime_seconds"] >= 0
    rows = doc["workers"]
    assert [r["slot"] for r in rows] == [1, 2]
    assert sorted(r["pid"] for r in rows) == sorted(c.workers())
    for r in rows:
        assert r["state"] == "ready" and r["restarts"] == 0 and r["generation"] == 0
        assert r["rss_bytes"] > 1_000_000 and r["cpu_seconds"] >= 0
        assert r["requests"] == 0 and r["in_flight"] == 0
    for _ in range(4):
        assert c.get("/")[0] == 200
    wait_for(lambda: sum(r["requests"] for r in status_doc(c)["workers"]) == 4, 10,
             what="4 requests in /status")
    cpu_before = samples(c, "hello_cluster_worker_cpu_seconds_total")
    assert set(cpu_before) == {'slot="1"', 'slot="2"'}

    victim = next(r for r in rows if r["slot"] == 2)
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        now = {r["slot"]: r for r in status_doc(c)["workers"]}
        return (now[2]["pid"] not in (None, victim["pid"]) and now[2]["state"] == "ready")

    wait_for(replaced, 15, what="slot 2's replacement to be ready")
    doc = status_doc(c)
    by_slot = {r["slot"]: r for r in doc["workers"]}
    assert by_slot[2]["restarts"] == 1 and by_slot[1]["restarts"] == 0
    assert doc["master"]["restarts"] == 1
    # The slot's CPU counter kept the dead worker's time; labels are slots, never pids.
    cpu_after = samples(c, "hello_cluster_worker_cpu_seconds_total")
    assert set(cpu_after) == {'slot="1"', 'slot="2"'}
    assert cpu_after['slot="2"'] >= cpu_before['slot="2"']
    rss = samples(c, "hello_cluster_worker_resident_memory_bytes")
    assert set(rss) == {'slot="1"', 'slot="2"'} and min(rss.values()) > 1_000_000
    start = samples(c, "hello_cluster_worker_start_time_seconds")
    assert abs(start['slot="2"'] - time.time()) < 60
    assert start['slot="2"'] > start['slot="1"']  # the respawned one is younger

    code, headers, body = c.metrics_get("/status", method="HEAD")
    assert code == 200 and body == b"" and headers["connection"] == "close"


def test_blocked_loop_lands_in_the_one_second_buckets(cluster: Callable[..., Cluster]) -> None:
    """A loop blocked 1.2 s runs its next tick 1.1 to 1.2 s late: above the 1 s bucket."""
    c = cluster("--workers", "1", "--app", "hc_testapp:app", workers=1)
    name = looplag.LAG_METRIC + "_bucket"

    def over_one_second() -> float:
        buckets = samples(c, name)
        return buckets.get('le="+Inf"', 0.0) - buckets.get('le="1.0"', 0.0)

    wait_for(lambda: samples(c, name).get('le="+Inf"', 0) > 3, 10, what="ticks recorded")
    assert over_one_second() == 0
    assert c.get("/block?s=1.2", timeout=10)[0] == 200
    wait_for(lambda: over_one_second() >= 1, 10, what="a tick in the >= 1 s buckets")
    row = status_doc(c)["workers"][0]
    assert row["loop_lag"]["sum_seconds"] >= 1.0 and row["loop_lag"]["ticks"] > 3


def test_slot_in_backoff_has_a_row_and_degrades_the_exit_code(
        cluster: Callable[..., Cluster]) -> None:
    """The seed experiment with one worker: each serves a request and exits 1; from the
    second death on the slot waits up to 30 s (full jitter; a draw under 5 s is waited
    out), and meanwhile the slot is a `backoff` row with no pid, and `hello-cluster
    status` exits 1."""
    c = cluster("--workers", "1", "--demo-exit-after", "0.1s", "--backoff-initial", "30s",
                "--backoff-max", "30s", workers=1)
    served: set[int] = set()
    row: dict[str, Any] = {}

    def in_backoff() -> bool:
        nonlocal row
        row = status_doc(c)["workers"][0]
        if row["state"] == "backoff":  # long enough to look at (a short draw: wait it out)
            return bool(row["respawn_in_seconds"] > 5)
        if row["state"] == "ready" and row["pid"] not in served:
            served.add(row["pid"])
            c.get("/", timeout=5)
        return False

    wait_for(in_backoff, 60, interval=0.02, what="slot 1 waiting in backoff")
    assert row["pid"] is None and row["slot"] == 1 and row["restarts"] >= 2
    assert row["respawn_in_seconds"] <= 30
    result = run_status("--metrics-url", f"http://127.0.0.1:{c.metrics_port}",
                        "--interval", "0.1")
    table = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert table[1].startswith("workers 0/1 ready")
    assert table[3].split()[:3] == ["1", "-", "backoff"] and " in " in table[3]


def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("status", *args, env=env, timeout=30)


def test_status_table_json_and_exit_codes(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "2", "--shutdown-delay", "20s", workers=2)
    url = f"http://127.0.0.1:{c.metrics_port}"
    result = run_status("--metrics-url", url, "--interval", "0.3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), result.stdout
    assert "\x1b" not in result.stdout  # a pipe gets no colour codes
    assert lines[1].startswith("workers 2/2 ready")
    assert lines[2].split() == ["slot", "pid", "state", "uptime", "restarts", "cpu",
                                "memory", "requests", "loop", "lag"]
    rows = [line.split() for line in lines[3:5]]
    assert [r[0] for r in rows] == ["1", "2"]
    assert sorted(int(r[1]) for r in rows) == sorted(c.workers())
    assert all(r[2] == "ready" and r[4] == "0" and r[5].endswith("%") for r in rows)
    assert all(r[6].endswith("M") for r in rows)
    assert "over the last" in lines[5]

    # The default URL comes from HELLO_CLUSTER_METRICS_BIND, all interfaces -> loopback.
    env_only = run_status("--json", env={"HELLO_CLUSTER_METRICS_BIND":
                                         f"0.0.0.0:{c.metrics_port}"})
    assert env_only.returncode == 0, env_only.stderr
    doc = json.loads(env_only.stdout)
    assert doc["master"]["pid"] == c.pid and len(doc["workers"]) == 2

    # Stopping (SIGTERM, serving through --shutdown-delay): degraded, exit 1.
    c.signal(signal.SIGTERM)
    wait_for(lambda: status_doc(c)["master"]["state"] == "stopping", 10, what="stopping")
    degraded = run_status("--metrics-url", url, "--json")
    assert degraded.returncode == 1, degraded.stderr
    assert json.loads(degraded.stdout)["master"]["state"] == "stopping"


def test_status_unreachable_and_bad_arguments() -> None:
    port = free_port()  # nothing listens there
    result = run_status("--metrics-url", f"http://127.0.0.1:{port}")
    assert result.returncode == 3
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    for args in (["--metrics-url", "ftp://host"], ["--interval", "0"], ["--bogus"]):
        bad = run_status(*args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    off = run_status(env={"HELLO_CLUSTER_METRICS_BIND": "off"})
    assert off.returncode == 2 and "--metrics-url" in off.stderr
    assert "hello-cluster status" in run_cli("--help").stdout
    usage = run_status("--help")
    assert usage.returncode == 0 and "--metrics-url" in usage.stdout


def test_status_watch_redraws_until_interrupted(cluster: Callable[..., Cluster]) -> None:
    c = cluster("--workers", "1", workers=1)
    proc = subprocess.Popen([str(BIN), "status", "--watch", "--interval", "0.2",
                             "--metrics-url", f"http://127.0.0.1:{c.metrics_port}"],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            # A test runner started in the background (`cmd &`, as CI may
                            # be) has SIGINT ignored, and an ignored signal stays ignored
                            # across exec: Python then installs no KeyboardInterrupt handler
                            # and the SIGINT below did nothing (the flaky timeout).
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        # Read in a thread: a bare readline() blocks past any deadline when the child is slow
        # to start under load (the loop's deadline was never checked then, and the run hung).
        import queue
        import threading
        lines: queue.Queue[str] = queue.Queue()
        stdout = proc.stdout
        threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()
        frames = 0
        deadline = time.monotonic() + 60
        while frames < 3 and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith("hello-cluster "):
                frames += 1
        assert frames == 3, f"saw {frames} frames in 60 s"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


# ---- pure parts ------------------------------------------------------------------------------

STAT = ("4242 (hello-cluster: w) 1) S 1 4242 4242 0 -1 4194368 2741 0 0 0 150 25 0 0 20 0 1 "
        "0 8123 30000000 7000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0")


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    stat = procstat.parse_stat(STAT)
    assert stat.cpu_seconds == pytest.approx(175 / procstat.CLOCK_TICKS)
    assert stat.rss_bytes == 7000 * procstat.PAGE_SIZE
    assert stat.start_ticks == 8123


def test_read_stat_of_ourselves_and_of_nobody() -> None:
    me = procstat.read_stat(os.getpid())
    assert me is not None and me.rss_bytes > 0
    assert abs(procstat.start_time(me) - time.time()) < 24 * 3600
    assert procstat.read_stat(2**22 + 1) is None  # above pid_max's ceiling: never a process


@given(st.text(max_size=40).filter(lambda s: "\n" not in s))
def test_parse_stat_any_command_name(comm: str) -> None:
    stat = procstat.parse_stat(STAT.replace("hello-cluster: w) 1", comm))
    assert stat.start_ticks == 8123 and stat.rss_bytes == 7000 * procstat.PAGE_SIZE


@given(st.text(max_size=300))
def test_parse_stat_garbage_raises_value_error_only(text: str) -> None:
    try:
        procstat.parse_stat(text)
    except (ValueError, IndexError):
        pass


def test_boot_time_and_slot_cpu() -> None:
    assert procstat.parse_boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 9\n") == 1.7e9
    with pytest.raises(ValueError):
        procstat.parse_boot_time("cpu 1 2 3\n")
    ledger = procstat.SlotCpu()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ledger.worker_reaped(0, usage)
    ledger.worker_reaped(0, usage)
    assert ledger.total(0, 1.0) == pytest.approx(1.0 + 2 * procstat.rusage_cpu(usage))
    assert ledger.total(1, 0.5) == 0.5


@given(st.floats(0, 1e6), st.floats(0, 100), st.floats(0.01, 1))
def test_lag_is_lateness_never_negative(previous: float, gap: float, period: float) -> None:
    value = looplag.lag(previous, previous + gap, period)
    assert value >= 0
    assert value == pytest.approx(max(0.0, gap - period), abs=1e-6)


def test_default_target_from_environment() -> None:
    assert str(statuscmd.default_target({})) == "http://127.0.0.1:9464/status"
    assert str(statuscmd.default_target({"HELLO_CLUSTER_METRICS_BIND": "0.0.0.0:9500"})) \
        == "http://127.0.0.1:9500/status"
    assert str(statuscmd.default_target({"HELLO_CLUSTER_METRICS_BIND": "[::]:9500"})) \
        == "http://[::1]:9500/status"
    assert str(statuscmd.default_target({"HELLO_CLUSTER_METRICS_BIND": "10.1.2.3:1"})) \
        == "http://10.1.2.3:1/status"
    assert statuscmd.default_target(
        {"HELLO_CLUSTER_METRICS_BIND": "unix:/run/m.sock"}).unix == "/run/m.sock"
    for bad in ("off", "nonsense", "1.2.3.4:99999"):
        with pytest.raises(statuscmd.UsageError):
            statuscmd.default_target({"HELLO_CLUSTER_METRICS_BIND": bad})
    assert statuscmd.target_from_url("http://h:1/metrics").path == "/status"
    assert statuscmd.target_from_url("http://h:1/x/").path == "/x/status"


@given(st.text(max_size=60))
def test_target_from_any_url_is_a_target_or_a_usage_error(url: str) -> None:
    try:
        target = statuscmd.target_from_url(url)
    except statuscmd.UsageError:
        return
    assert target.path.endswith("/status") and 0 <= target.port <= 65535


counts = st.one_of(st.none(), st.integers(0, 10**15))
worker_rows = st.fixed_dictionaries({
    "slot": st.integers(1, 1024), "pid": st.integers(1, 2**22), "generation": st.integers(0, 99),
    "state": st.sampled_from(sorted(STATES - {"backoff"})),
    "uptime_seconds": st.floats(0, 1e9), "restarts": st.integers(0, 10**6),
    "rss_bytes": counts, "cpu_seconds": st.one_of(st.none(), st.floats(0, 1e9)),
    "requests": counts, "in_flight": counts,
    "loop_lag": st.fixed_dictionaries({"sum_seconds": st.floats(0, 1e6),
                                       "ticks": st.integers(0, 10**9)})})
backoff_rows = st.fixed_dictionaries({
    "slot": st.integers(1, 1024), "pid": st.none(), "state": st.just("backoff"),
    "restarts": st.integers(0, 10**6), "respawn_in_seconds": st.floats(0, 1e5)})


def document(rows: list[dict[str, Any]], desired: int, ready: int, state: str) -> dict[str, Any]:
    return {"master": {"pid": 1, "state": state, "uptime_seconds": 100.0, "version": "0.1.0",
                       "workers": {"desired": desired, "ready": ready, "running": len(rows)},
                       "reloads": 3, "restarts": 7, "crash_loop": False},
            "workers": rows}


@settings(max_examples=200)
@given(st.lists(st.one_of(worker_rows, backoff_rows), max_size=8), st.booleans())
def test_table_fits_80_columns(rows: list[dict[str, Any]], colour: bool) -> None:
    doc = document(rows, 128, 64, "running")
    before = json.loads(json.dumps(doc))
    before["master"]["uptime_seconds"] = 99.0
    text = statuscmd.render(doc, before, colour=colour)
    for line in text.splitlines():
        visible = line
        for code in statuscmd.COLOURS.values():
            visible = visible.replace(f"\x1b[{code}m", "")
        visible = visible.replace("\x1b[0m", "")
        assert len(visible) <= 80, line
    assert ("\x1b[" in text) == (colour and bool(rows) and any(
        r["state"] in statuscmd.COLOURS for r in rows))


def test_rates_come_from_two_samples() -> None:
    row = {"slot": 1, "pid": 9, "generation": 0, "state": "ready", "uptime_seconds": 1.0,
           "restarts": 0, "rss_bytes": 50 * 2**20, "cpu_seconds": 1.0, "requests": 1500,
           "in_flight": 0, "loop_lag": {"sum_seconds": 0.01, "ticks": 10}}
    later = dict(row, cpu_seconds=1.25, loop_lag={"sum_seconds": 0.51, "ticks": 15})
    before, after = document([row], 1, 1, "running"), document([later], 1, 1, "running")
    after["master"]["uptime_seconds"] = 100.5
    cpu, lag = statuscmd.rates(after, before)[9]
    assert cpu == pytest.approx(50.0) and lag == pytest.approx(0.1)
    line = statuscmd.render(after, before).splitlines()[3].split()
    assert line[5:] == ["50.0%", "50.0M", "1.5k", "100.0ms"]


def test_exit_code_and_human_units() -> None:
    assert statuscmd.exit_code(document([], 2, 2, "running")) == 0
    assert statuscmd.exit_code(document([], 2, 2, "reloading")) == 0
    assert statuscmd.exit_code(document([], 2, 1, "running")) == 1
    assert statuscmd.exit_code(document([], 2, 0, "starting")) == 1
    assert statuscmd.exit_code(document([], 2, 2, "stopping")) == 1
    assert [statuscmd.human_duration(s) for s in (5, 65, 3 * 3600 + 60, 3 * 86400)] == [
        "5s", "1m05s", "3h01m", "3d00h"]
    assert [statuscmd.human_bytes(n) for n in (512, 1536, 30 * 2**20)] == [
        "512B", "1.5K", "30.0M"]
    assert [statuscmd.human_count(n) for n in (999, 12_345, 4_500_000)] == [
        "999", "12.3k", "4.5M"]
    assert statuscmd.human_seconds(0.0004) == "0.4ms" and statuscmd.human_seconds(1.5) == "1.50s"
    assert math.isclose(looplag.LAG_BUCKETS[0], 0.001) and looplag.LAG_BUCKETS[-1] == 5.0


def test_key_prefixes_match_prometheus_client_keys() -> None:
    """/status sums a worker's values by key prefix (no json.loads per key); a change in
    prometheus-client's key format must fail here, not silently zero the counts."""
    from prometheus_client.mmap_dict import mmap_key

    from hello_cluster.observe import status_page as status

    cases = [(status.REQUESTS_KEY, "hello_cluster_http_requests",
              "hello_cluster_http_requests_total", ["method", "status"], ["GET", "200"]),
             (status.IN_FLIGHT_KEY, status.IN_FLIGHT, status.IN_FLIGHT, [], []),
             (status.LAG_SUM_KEY, looplag.LAG_METRIC, looplag.LAG_METRIC + "_sum", [], []),
             (status.LAG_BUCKET_KEY, looplag.LAG_METRIC, looplag.LAG_METRIC + "_bucket",
              ["le"], ["0.1"])]
    for prefix, metric, sample, names, values in cases:
        assert mmap_key(metric, sample, names, values, "help").startswith(prefix)
    assert not mmap_key(looplag.LAG_METRIC, looplag.LAG_METRIC + "_sum", [], [], "h"
                        ).startswith(status.LAG_BUCKET_KEY)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
lag_values = st.dictionaries(st.sampled_from(["sum_seconds", "ticks"]), json_values)
json_rows = st.one_of(worker_rows, backoff_rows, st.dictionaries(
    st.sampled_from(["slot", "pid", "state", "uptime_seconds", "restarts", "rss_bytes",
                     "cpu_seconds", "requests", "loop_lag", "respawn_in_seconds"]),
    st.one_of(json_values, lag_values), max_size=10))


@settings(max_examples=300)
@given(st.one_of(json_values, st.builds(document, st.lists(json_rows, max_size=4),
                                        st.integers(0, 4), st.integers(0, 4),
                                        st.sampled_from(["running", "stopping"]))),
       st.one_of(st.none(), st.builds(document, st.lists(json_rows, max_size=4),
                                      st.just(1), st.just(1), st.just("running"))))
def test_any_document_is_rejected_or_rendered(doc: Any, before: Any) -> None:
    """What the command does with whatever a server answers: ValueError (-> one line,
    exit 3), or a table and an exit status. Never another exception."""
    try:
        checked = statuscmd.validate(doc)
    except ValueError:
        return
    statuscmd.render(checked)
    # The same rows a second earlier (every rate computed) and another document's rows.
    earlier = json.loads(json.dumps(checked))
    earlier["master"]["uptime_seconds"] -= 1
    for row in earlier["workers"]:
        if isinstance(row.get("loop_lag"), dict) and isinstance(
                row["loop_lag"].get("ticks"), int):
            row["loop_lag"]["ticks"] -= 1
    statuscmd.render(checked, earlier)
    if before is not None:
        try:
            statuscmd.render(checked, statuscmd.validate(before))
        except ValueError:
            pass
    assert statuscmd.exit_code(checked) in (0, 1)
