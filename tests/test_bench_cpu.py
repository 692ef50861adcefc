"""The bench's CPU-per-request figure and the apps suite's verdicts (bench/harness.py,
bench/report.py), on a real process tree: a reading that cannot see a busy child, or a
target that passes on one lucky round, would make the tables say what did not happen."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, need_command

BENCH = ROOT / "bench"
BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(BENCH))
    return BENCH


def test_group_cpu_counts_every_process_of_the_tree(bench: Path) -> None:
    import harness

    # A parent that forks a child; both burn 0.3 s of CPU, in one session (one group).
    code = ("import os, time\n" + BURN.format(s=0.3) +
            "pid = os.fork()\n"
            "if pid == 0:\n" + "".join("    " + line + "\n" for line in
                                       BURN.format(s=0.3).splitlines()) +
            "    os._exit(0)\n"
            "os.waitpid(pid, 0)\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        spent = 0.0
        while time.monotonic() < deadline:
            spent = harness.group_cpu_s(proc.pid)
            if spent >= 0.55:
                break
            time.sleep(0.05)
        # the reaped child's 0.3 s counts through the parent's cutime + cstime
        assert 0.55 <= spent < 2.0
        assert harness.group_cpu_s(proc.pid + 10_000_000) == 0.0  # no such group
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _records(pairs: list[tuple[float, float]], key: str = "rps") -> dict[str, Any]:
    return {name: {"ka": [{"round": i, key: pair[j]} for i, pair in enumerate(pairs)],
                   "close": []}
            for j, name in enumerate(("hc/fastapi", "uvicorn/fastapi"))}


def test_apps_targets_need_every_round(bench: Path) -> None:
    import report

    def verdict(pairs: list[tuple[float, float]]) -> dict[str, Any]:
        found: list[dict[str, Any]] = [t for t in report.apps_targets(_records(pairs))
                                       if t["key"] == "fastapi_vs_uvicorn"]
        return found[0]

    steady = verdict([(120.0, 100.0), (115.0, 100.0), (112.0, 100.0)])
    assert steady["pass"] is True and steady["range"] == pytest.approx([1.12, 1.2])
    lucky = verdict([(150.0, 100.0), (130.0, 100.0), (100.0, 100.0)])  # median 1.3, worst 1.0
    assert lucky["value"] == pytest.approx(1.3) and lucky["pass"] is False
    missing = [t for t in report.apps_targets(_records([(1.0, 1.0)]))
               if t["key"] == "hello_vs_nginx"][0]
    assert missing["pass"] is None and missing["value"] is None


def test_thread_wake_measures_both_placements_in_their_own_process() -> None:
    """bench/thread_wake.py, the figure behind --cpu-affinity: each placement measured, the
    pinned one really on one CPU (its child reports it), this process left as it was."""
    import json
    import os

    before = os.sched_getaffinity(0)
    done = subprocess.run([sys.executable, str(BENCH / "thread_wake.py"), "--n", "300",
                           "--runs", "1"], capture_output=True, text=True, timeout=60,
                          check=True)
    out = json.loads(done.stdout)
    assert out["cpus"] == sorted(before) and os.sched_getaffinity(0) == before
    for placement in ("free", "one_cpu"):
        assert out[placement]["cpu_us"] > 0 and out[placement]["wall_us"] > 0
    assert out["free"]["ran_on"] == sorted(before) and out["one_cpu"]["ran_on"] == [min(before)]


def test_view_clock_counts_the_view_threads_cpu_not_its_sleep(bench: Path, tmp_path: Path) -> None:
    """bench/view_cpu.py's split of a WSGI request: the view's own CPU (a burn counts, a
    sleep does not), totals a reader can take at any moment, and the server's share as what
    is left of the tree's CPU per request."""
    import view_cpu

    def view(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        if environ["PATH_INFO"] == "/burn":
            end = time.thread_time() + 0.02
            while time.thread_time() < end:
                pass
        else:
            time.sleep(0.02)
        return [b"a", b"b"]

    clock = view_cpu.ViewClock(view, str(tmp_path), every=2)
    calls: list[str] = []
    assert clock({"PATH_INFO": "/burn"}, lambda *a: calls.append(a[0])) == [b"ab"]
    assert view_cpu.read_totals(tmp_path) == (0, 0.0)  # not yet written: every 2 requests
    clock({"PATH_INFO": "/sleep"}, lambda *a: calls.append(a[0]))
    (tmp_path / ".tmp-half").write_text("9")  # a half-written file is never read
    count, seconds = view_cpu.read_totals(tmp_path)
    assert count == 2 and calls == ["200 OK", "200 OK"]
    assert 0.02 <= seconds < 0.035  # the burn's 20 ms, not the sleep's
    split = view_cpu.split_us(0.003, 10, (0, 0.0), (10, 0.001))
    assert split == pytest.approx({"cpu_us": 300.0, "view_us": 100.0, "around_us": 200.0})
    assert view_cpu.split_us(0.003, 10, (4, 0.1), (4, 0.1))["around_us"] is None
    rows = [{"app": "flask", "server": "s", "mode": "close", "rps": r, "cpu_us": c,
             "view_us": 1.0, "around_us": None} for r, c in ((10, 3.0), (30, 1.0), (20, 2.0))]
    assert view_cpu.summarize(rows) == [{"app": "flask", "server": "s", "mode": "close",
                                         "rps": 20.0, "cpu_us": 2.0, "view_us": 1.0,
                                         "around_us": None}]


def test_view_cpu_serves_a_plain_view_wrapped_in_its_clock(
        bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--apps plain`: `view_cpu:plain_app` is a real WSGI app, clocked like the others."""
    import view_cpu

    monkeypatch.setenv(view_cpu.ENV_DIR, str(tmp_path))
    app = view_cpu.plain_app
    assert isinstance(app, view_cpu.ViewClock)
    heads: list[tuple[str, list[tuple[str, str]]]] = []
    body = app({}, lambda status, headers: heads.append((status, headers)))
    assert body == [view_cpu.PLAIN_BODY] and heads[0][0] == "200 OK"
    assert ("content-length", str(len(view_cpu.PLAIN_BODY))) in heads[0][1]
    with pytest.raises(AttributeError):
        view_cpu.no_such_app  # noqa: B018


def test_micro_wsgi_serves_every_request_both_ways(bench: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/micro_wsgi.py: every request of a run gets its response (the harness asserts
    it) under both dispatches, so its per-request figure divides real work."""
    import micro_wsgi
    import uvloop

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for on_loop in (False, True):
        assert uvloop.run(micro_wsgi.per_request_us(on_loop, 4 * micro_wsgi.CONNECTIONS)) > 0


def test_instr_drives_every_case_to_its_responses(bench: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/instr.py: each case's driver gets a response for every request it sends (it
    asserts so), so an instruction count per request divides real requests."""
    import instr
    import uvloop

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for case in (*instr.CASES, "idle"):
        uvloop.run(instr.drive(case, 5))


def test_instr_counts_the_same_twice_and_a_request_costs_instructions(bench: Path) -> None:
    """The point of bench/instr.py is a figure that does not move with the machine's load:
    the same child counted twice agrees to a few instructions a request, and a request
    costs more than the driver's idle loop."""
    need_command("valgrind", "valgrind")
    import instr

    service = ROOT / "service"
    n = 40
    first = instr.count(service, "hello", 3 * n)
    assert abs(instr.count(service, "hello", 3 * n) - first) < 10 * n
    per_request = (first - instr.count(service, "hello", n)) / (2 * n)
    idle = (instr.count(service, "idle", 3 * n) - instr.count(service, "idle", n)) / (2 * n)
    assert per_request - idle > 10_000, (per_request, idle)
