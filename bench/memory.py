"""Memory benchmark: what a pool of a heavy app costs, with and without sharing (issue 17).

    .venv/bin/python bench/memory.py [--workers 2,8,16] [--only hc,hc-preload,...]
                                     [--app-mb 100] [--timing-workers 8] [--reps 3]
                                     [--no-timing] [--no-chart] [--out DIR] [--logs DIR]
    .venv/bin/python bench/memory.py --report result.json   # rewrite its .md (and .png)

Every contender serves the same file, bench/heavy_app.py (a Starlette app over ~100 MB of
Python objects built at import by bench/heavy_data.py). For each pool size and contender one
server is started, every worker answers requests (so each touched the framework's and the
app's code paths), and then the memory of the whole process tree is read from the kernel:
the sum of `Pss:` in /proc/PID/smaps_rollup over the supervisor and every descendant
(master, template, workers, helpers), plus each worker's USS (Private_Clean + Private_Dirty)
and RSS for context. PSS divides each shared page among the processes that map it, so its
sum is what the pool really costs the machine; RSS counts a shared page once per process.
The same is read again after `GET /gc` (a full `gc.collect()`) in every worker: without
`gc.freeze()` before the fork, the collector's writes to every object's header un-share a
preloading parent's pages. Then, for hello-cluster plain and `--preload` at
`--timing-workers`, SIGKILLed workers' respawn times and SIGHUP reload times (medians of
`--reps`). Writes <out>/<date>.json (every process's figures), .md (the tables, the command,
the machine's load) and .png (bench/memory_chart.py in bench/.venv). The target
(hello-cluster --preload at 8 workers <= 0.5x uvicorn's total PSS) is printed as PASS/FAIL,
never asserted. See bench/README.md, "Memory".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import peers  # noqa: E402
import scale  # noqa: E402
from run import base_env  # noqa: E402

RESULTS = peers.BENCH / "results" / "memory"
LOGS = peers.WORK / "logs" / "memory"
APP = "heavy_app:app"
SETTLE = 2.0  # s after the traffic: freed memory and lazy writes settle before reading
TARGET_WORKERS = 8
TARGET_RATIO = 0.5
ORDER = ["hc", "hc-preload", "uvicorn", "gunicorn-uvicorn", "gunicorn-uvicorn-preload"]
MiB = 1024 * 1024
GC_REQUEST = b"GET /gc HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    hello_cluster: bool = False


def contender(name: str, n: int, port: int, mport: int, hc: str) -> Contender:
    """How each contender is started; all serve heavy_app:app from bench/ on 127.0.0.1."""
    env = {"PYTHONPATH": str(peers.BENCH)}
    if name in ("hc", "hc-preload"):
        preload = ["--preload"] if name == "hc-preload" else []
        return Contender(name, f"hello-cluster{' --preload' if preload else ''}",
                         [hc, "--app", APP, "--workers", str(n),
                          "--bind", f"127.0.0.1:{port}", "--metrics-bind", f"127.0.0.1:{mport}",
                          "--log-level", "info", *preload], env, hello_cluster=True)
    if name == "uvicorn":
        return Contender(name, f"uvicorn --workers {n}",
                         [str(peers.BENCH_BIN / "uvicorn"), APP, "--host", "127.0.0.1",
                          "--port", str(port), "--workers", str(n), "--loop", "uvloop",
                          "--http", "httptools", "--no-access-log", "--log-level", "warning"],
                         env)
    if name in ("gunicorn-uvicorn", "gunicorn-uvicorn-preload"):
        preload = ["--preload"] if name.endswith("-preload") else []
        return Contender(name, " ".join(["gunicorn -k uvicorn_worker.UvicornWorker", *preload]),
                         [str(peers.BENCH_BIN / "gunicorn"), "-k", "uvicorn_worker.UvicornWorker",
                          "-w", str(n), "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                          *preload, APP], env)
    raise ValueError(f"unknown contender {name!r}; choose from {', '.join(ORDER)}")


# ---- the kernel's figures ------------------------------------------------------------------

def smaps_rollup(pid: int) -> dict[str, int] | None:
    """Every `Name: N kB` line of /proc/PID/smaps_rollup, in kB (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0])
    return out


def descendants(root: int) -> list[int]:
    """root and every live process below it (the template's workers are adopted by the
    hello-cluster master, a child subreaper, so they are its children too)."""
    kids: dict[int, list[int]] = {}
    for child, parent, _ in h.live_processes():
        kids.setdefault(parent, []).append(child)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def tree_memory(root: int, workers: set[int]) -> dict[str, Any]:
    """PSS, USS and RSS of every process in the tree, and their sums."""
    procs = []
    for pid in descendants(root):
        roll = smaps_rollup(pid)
        role = "supervisor" if pid == root else "worker" if pid in workers else "other"
        procs.append({"pid": pid, "role": role, "cmdline": cmdline(pid),
                      "pss_kib": None if roll is None else roll.get("Pss"),
                      "uss_kib": None if roll is None else
                      roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0),
                      "rss_kib": None if roll is None else roll.get("Rss")})
    measured = [p for p in procs if p["pss_kib"] is not None]
    worker_uss = [p["uss_kib"] for p in measured if p["role"] == "worker"]
    worker_pss = [p["pss_kib"] for p in measured if p["role"] == "worker"]
    return {"processes": procs, "measured": len(measured), "count": len(procs),
            "workers": sum(p["role"] == "worker" for p in procs),
            "pss_total_mib": sum(p["pss_kib"] for p in measured) / 1024,
            "rss_total_mib": sum(p["rss_kib"] for p in measured) / 1024,
            "uss_total_mib": sum(p["uss_kib"] for p in measured) / 1024,
            "workers_pss_mib": sum(worker_pss) / 1024,
            "others_pss_mib": sum(p["pss_kib"] for p in measured if p["role"] != "worker")
            / 1024,
            "worker_uss_median_mib": statistics.median(worker_uss) / 1024 if worker_uss
            else None,
            "worker_uss_max_mib": max(worker_uss) / 1024 if worker_uss else None,
            "worker_rss_median_mib": statistics.median(
                p["rss_kib"] for p in measured if p["role"] == "worker") / 1024
            if worker_uss else None}


# ---- one server ----------------------------------------------------------------------------

class Server:
    """One contender's running pool: its process group, ports, log and notify socket."""

    def __init__(self, c: Contender, n: int, port: int, mport: int, app_mb: int,
                 logs: Path) -> None:
        self.c, self.n, self.port, self.mport = c, n, port, mport
        self.notify = h.NotifySocket(peers.WORK)
        env = {**base_env(), **c.env, "HEAVY_APP_MB": str(app_mb),
               "NOTIFY_SOCKET": self.notify.path}
        self.log_path = logs / f"{c.name}-{n}.log"
        self.log_path.unlink(missing_ok=True)
        self.t0 = time.monotonic()
        self.proc = h.Proc(c.argv, env, self.log_path)
        self.log = scale.LogTail(self.log_path)

    def close(self) -> None:
        try:
            self.proc.stop()
        finally:
            self.notify.close()


def serve_traffic(port: int, n: int, deadline: float) -> dict[str, Any]:
    """Keep-alive and fresh connections, then fresh ones until every worker has answered."""
    seen: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    t = time.monotonic()
    with contextlib.suppress(TimeoutError):
        asyncio.run(asyncio.wait_for(
            scale._traffic(port, 2 * n, 10, 20 * n, seen, errors),
            max(1.0, deadline - time.monotonic())))
    when, pids = h.wait_for_pids(port, n, deadline)
    return {"requests_ok": sum(seen.values()), "errors": dict(errors),
            "workers_answered": len(pids | set(seen)), "pids": sorted(pids | set(seen)),
            "all_answered": when is not None, "s": round(time.monotonic() - t, 3)}


def collect_everywhere(port: int, workers: set[int], deadline: float) -> dict[str, Any]:
    """`GET /gc` on fresh connections until every worker ran a full collection (bounded).

    A long-running worker collects its oldest generation by itself sooner or later; this
    makes it happen now, so the second reading shows what the pool costs once the collector
    has visited the app's objects (and written to their headers, where they were not frozen).
    """
    done: set[int] = set()
    asked = 0
    t = time.monotonic()
    while not workers <= done and time.monotonic() < deadline:
        done |= set(h.probe(port, k=4, timeout=10.0, request=GC_REQUEST))
        asked += 4
    return {"workers_collected": len(workers & done), "requests": asked,
            "all": workers <= done, "s": round(time.monotonic() - t, 3)}


def hc_workers(s: Server) -> set[int]:
    """The master's worker children (not the --preload template)."""
    return {p for p in scale.children(s.proc.pid) if "template" not in cmdline(p)}


def respawns(s: Server, kills: int, timeout: float) -> dict[str, Any]:
    """SIGKILL a worker of another slot each time (a first failure: no backoff); the time
    until the log names a new pid `ready in X ms` and /readyz reports N/N again."""
    samples: list[dict[str, Any]] = []
    originals = sorted(hc_workers(s))
    for victim in originals[:kills]:
        before = scale.children(s.proc.pid)
        s.log.mark()
        t = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def back(before: set[int] = before) -> tuple[float, re.Match[str]] | None:
            fresh = [m for m in scale.READY_LINE.finditer(s.log.since_mark())
                     if int(m.group(2)) not in before]
            got = scale.readyz(s.mport) if fresh else None
            return (time.monotonic(), fresh[0]) if got and got[0] == s.n else None

        when, line = scale.wait_until("respawn to N/N ready", timeout, back, interval=0.005)
        samples.append({"victim": victim, "ms": (when - t) * 1000,
                        "new_pid": int(line.group(2)),
                        "master_log_ready_ms": int(line.group(3))})
        time.sleep(0.5)
    return {"samples": samples, "median_ms": statistics.median(x["ms"] for x in samples),
            "master_log_median_ms": statistics.median(x["master_log_ready_ms"]
                                                      for x in samples)}


def reloads(s: Server, count: int, timeout: float) -> dict[str, Any]:
    """SIGHUP `count` times: to READY=1 again (every slot's new worker ready), then until
    every old process (workers and, with --preload, the old template) has exited."""
    samples = []
    for _ in range(count):
        samples.append(scale.phase_reload(s, timeout))  # type: ignore[arg-type]
        time.sleep(0.5)
    return {"samples": samples,
            "median_ready_s": statistics.median(x["ready_s"] for x in samples),
            "median_old_gone_s": statistics.median(x["old_gone_s"] for x in samples)}


def measure(name: str, n: int, hc: str, app_mb: int, timing: int | None,
            logs: Path) -> dict[str, Any]:
    """Start one contender with n workers, make every worker serve, read the tree's memory;
    for hello-cluster with `timing` repetitions, respawns and reloads too."""
    port, mport = h.free_port(), h.free_port()
    c = contender(name, n, port, mport, hc)
    rec: dict[str, Any] = {"contender": name, "label": c.label, "workers": n, "argv": c.argv,
                           "loadavg_before": os.getloadavg(),
                           "mem_available_mib_before": scale.mem_available_mib(), "errors": []}
    need = 400 + (app_mb + 120) * (n + 1)
    if rec["mem_available_mib_before"] < need:
        rec["errors"].append(f"skipped: {rec['mem_available_mib_before']} MiB available, "
                             f"about {need} MiB needed")
        return rec
    s = Server(c, n, port, mport, app_mb, logs)
    bound = 1 + n / 4  # generous: n imports of a big app on a shared 2-core machine
    try:
        when, pids = h.wait_for_pids(port, n, s.t0 + 60 * bound, alive=s.proc.alive)
        if when is None:
            code = s.proc.popen.poll()
            raise scale.Timeout(f"start: {len(pids)}/{n} workers answered in "
                                f"{time.monotonic() - s.t0:.0f}s" + (
                                    "" if code is None else f"; the server exited with {code}"
                                    f", see {s.log_path}"))
        rec["start_s"] = when - s.t0
        rec["traffic"] = serve_traffic(port, n, time.monotonic() + 30 * bound)
        time.sleep(SETTLE)
        workers = set(rec["traffic"]["pids"])
        rec["memory"] = tree_memory(s.proc.pid, workers)
        report_memory(name, n, rec["memory"], f"start {rec['start_s']:.1f}s")
        rec["gc"] = collect_everywhere(port, workers, time.monotonic() + 30 * bound)
        if not rec["gc"]["all"]:
            rec["errors"].append(f"gc: only {rec['gc']['workers_collected']}/{n} workers "
                                 "answered GET /gc in time")
        time.sleep(SETTLE)
        rec["memory_after_gc"] = tree_memory(s.proc.pid, workers)
        report_memory(name, n, rec["memory_after_gc"],
                      f"after gc.collect() in {rec['gc']['workers_collected']} workers")
        if timing and c.hello_cluster:
            rec["respawn"] = respawns(s, min(timing, n), 20 * bound)
            print(f"    {name:26} {n:3} workers: respawn median "
                  f"{rec['respawn']['median_ms']:.0f} ms", flush=True)
            rec["reload"] = reloads(s, timing, 60 * bound)
            print(f"    {name:26} {n:3} workers: reload median "
                  f"{rec['reload']['median_ready_s']:.2f} s to READY, "
                  f"{rec['reload']['median_old_gone_s']:.2f} s to old gone", flush=True)
    except (scale.Timeout, OSError, http.client.HTTPException) as err:
        rec["errors"].append(f"{type(err).__name__}: {err}")
        print(f"    ! {name} {n} workers: {err}", flush=True)
    finally:
        s.close()
        rec["loadavg_after"] = os.getloadavg()
    return rec


def report_memory(name: str, n: int, mem: dict[str, Any], note: str) -> None:
    print(f"    {name:26} {n:3} workers: total PSS {mem['pss_total_mib']:7.0f} MiB, worker USS "
          f"{fmt(mem['worker_uss_median_mib'])} MiB, RSS {mem['rss_total_mib']:.0f} MiB; {note}",
          flush=True)


# ---- report --------------------------------------------------------------------------------

def fmt(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def pss(runs: list[dict[str, Any]], name: str, n: int, key: str = "memory") -> float | None:
    r = next((r for r in runs if r["contender"] == name and r["workers"] == n), None)
    return None if r is None or key not in r else float(r[key]["pss_total_mib"])


def verdict(runs: list[dict[str, Any]]) -> tuple[str, float | None]:
    """hello-cluster --preload's total PSS over uvicorn's, at TARGET_WORKERS workers."""
    ours, theirs = pss(runs, "hc-preload", TARGET_WORKERS), pss(runs, "uvicorn", TARGET_WORKERS)
    if ours is None or theirs is None:
        return "n/a (not measured)", None
    ratio = ours / theirs
    return ("PASS" if ratio <= TARGET_RATIO else "FAIL"), ratio


def pivot(runs: list[dict[str, Any]], names: list[str], labels: dict[str, str],
          sizes: list[int], key: str) -> list[str]:
    """Total PSS, one row per contender, one column per pool size, ratio to uvicorn."""
    lines = ["| contender | " + " | ".join(f"{n} workers" for n in sizes) + " |",
             "| --- |" + " ---: |" * len(sizes)]
    for name in names:
        cells = []
        for n in sizes:
            v, base = pss(runs, name, n, key), pss(runs, "uvicorn", n, key)
            cells.append("failed" if v is None else f"{v:.0f}" + (
                f" ({v / base:.2f}x)" if base else ""))
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    runs, m = doc["runs"], doc["machine"]
    sizes = sorted({r["workers"] for r in runs})
    names = [n for n in ORDER if any(r["contender"] == n for r in runs)]
    labels = {r["contender"]: r["label"].replace(f" {r['workers']}", " N") for r in runs}
    lines = [f"# Memory benchmark, {doc['date']}", "",
             f"Command: `{doc['command']}`  ",
             f"App: `{APP}` (bench/heavy_app.py: Starlette {doc['starlette']}, "
             f"{doc['app_mb']} MB of objects built at import by bench/heavy_data.py)  ",
             f"hello-cluster: {m['hello_cluster']}, git `{m['git']}`  ",
             f"Machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}, kernel "
             f"{m['kernel']}, {m['mem_total_mib']} MiB RAM. Shared with other developers "
             f"running tests: load average {doc['loadavg_at_start']:.2f} at start, "
             f"{doc['loadavg_at_end']:.2f} at end ({doc['elapsed_s']} s in all). Memory "
             "figures do not depend on the load; the times below do.", "",
             "## Total PSS of the whole process tree, MiB", "",
             "Sum of `Pss:` in /proc/PID/smaps_rollup over the supervisor and every "
             "descendant, after every worker served requests; the ratio is against "
             "`uvicorn --workers N` at the same N.", ""]
    lines += pivot(runs, names, labels, sizes, "memory")
    lines += ["", "The same after `GET /gc` (a full `gc.collect()`) in every worker, as a "
              "long-running worker does by itself sooner or later:", ""]
    lines += pivot(runs, names, labels, sizes, "memory_after_gc")
    result, ratio = verdict(runs)
    lines += ["", "| target (issue 17) | measured | verdict |", "| --- | ---: | --- |",
              f"| hello-cluster --preload at {TARGET_WORKERS} workers <= {TARGET_RATIO}x "
              f"uvicorn's total PSS | {fmt(ratio, 2)}x | {result} |", "",
              "## Every run", "",
              "| contender | workers | total PSS MiB | workers' PSS | others' PSS "
              "| USS per worker (median / max) | RSS per worker (median) | total RSS MiB "
              "| processes | total PSS / USS per worker after gc | start to all answered s "
              "| requests | load before |",
              "| --- |" + " ---: |" * 12]
    for r in runs:
        mem = r.get("memory") or {}
        t = r.get("traffic") or {}
        after = r.get("memory_after_gc") or {}
        lines.append(
            f"| {labels[r['contender']]} | {r['workers']} | {fmt(mem.get('pss_total_mib'))} | "
            f"{fmt(mem.get('workers_pss_mib'))} | {fmt(mem.get('others_pss_mib'))} | "
            f"{fmt(mem.get('worker_uss_median_mib'), 1)} / {fmt(mem.get('worker_uss_max_mib'), 1)}"
            f" | {fmt(mem.get('worker_rss_median_mib'), 1)} | {fmt(mem.get('rss_total_mib'))} | "
            f"{mem.get('measured', '-')}/{mem.get('count', '-')} ({mem.get('workers', '-')} "
            f"workers) | {fmt(after.get('pss_total_mib'))} / "
            f"{fmt(after.get('worker_uss_median_mib'), 1)} | {fmt(r.get('start_s'), 1)} | "
            f"{t.get('requests_ok', '-')} | "
            f"{r['loadavg_before'][0]:.1f} |")
    timed = [r for r in runs if "respawn" in r or "reload" in r]
    if timed:
        lines += ["", f"## Respawn and reload (medians of {doc['reps']})", "",
                  "Respawn: SIGKILL one worker (another slot each time, so no backoff) until "
                  "the master logs a new pid `ready in X ms` and /readyz reports N/N. Reload: "
                  "SIGHUP until READY=1 again (every slot's new worker ready), and until every "
                  "old process (workers, and the old template with --preload) has exited.", "",
                  "| contender | workers | respawn ms (kill to N/N) | respawn ms (master log, "
                  "spawn to ready) | reload s (to READY=1) | reload s (old ones gone) "
                  "| every respawn ms | every reload s |",
                  "| --- |" + " ---: |" * 7]
        for r in timed:
            sp, rl = r.get("respawn") or {}, r.get("reload") or {}
            each_sp = ", ".join(f"{x['ms']:.0f}" for x in sp.get("samples", []))
            each_rl = ", ".join(f"{x['ready_s']:.2f}" for x in rl.get("samples", []))
            lines.append(
                f"| {labels[r['contender']]} | {r['workers']} | {fmt(sp.get('median_ms'))} | "
                f"{fmt(sp.get('master_log_median_ms'))} | {fmt(rl.get('median_ready_s'), 2)} | "
                f"{fmt(rl.get('median_old_gone_s'), 2)} | "
                f"{each_sp} | {each_rl} |")
    errors = [f"- {r['contender']} {r['workers']}: {e}" for r in runs for e in r["errors"]]
    lines += ["", "Errors and timeouts:", "", *(errors or ["- none"]), "",
              "Method: bench/README.md, \"Memory\". Every process's PSS, USS and RSS is in "
              "the JSON next to this file.", ""]
    return "\n".join(lines)


def chart(json_path: Path, png: Path) -> bool:
    """Draw the PNG with bench/.venv's python (matplotlib lives there, not in .venv)."""
    python = peers.ensure_chart_tools()
    done = subprocess.run([str(python), str(peers.BENCH / "memory_chart.py"), "--out", str(png),
                           str(json_path)], timeout=300)
    return done.returncode == 0


def ensure_tools(names: list[str], hc: str) -> str:
    """The peers (and Starlette, the version hello-cluster's venv has) in bench/.venv."""
    if not Path(hc).exists():
        sys.exit(f"bench: {hc} is missing; run `make .venv/bin/hello-cluster`")
    try:
        version = importlib.metadata.version("starlette")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("bench: starlette is missing in .venv; run `.venv/bin/pip install -e '.[test]'`")
    if any(not n.startswith("hc") for n in names):
        peers.ensure_peers()
        peers.ensure_module("starlette", [f"starlette=={version}"])
    return version


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Memory of a heavy app's pool; see the docstring.")
    ap.add_argument("--workers", default="2,8,16", help="comma-separated pool sizes")
    ap.add_argument("--only", default=",".join(ORDER), help="comma-separated contenders")
    ap.add_argument("--hc", default=str(peers.MAIN_BIN / "hello-cluster"),
                    help="the hello-cluster executable")
    ap.add_argument("--app-mb", type=int, default=100, help="MB of objects the app builds")
    ap.add_argument("--timing-workers", type=int, default=TARGET_WORKERS,
                    help="pool size at which hello-cluster's respawn and reload are timed")
    ap.add_argument("--reps", type=int, default=3, help="respawns and reloads to time")
    ap.add_argument("--no-timing", action="store_true", help="memory only")
    ap.add_argument("--no-chart", action="store_true", help="write the JSON and .md only")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--logs", default=str(LOGS), help="the servers' logs go here")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only rewrite the .md (and .png) next to a result file from its JSON")
    args = ap.parse_args(argv)
    if args.report:
        args.report.with_suffix(".md").write_text(markdown(json.loads(args.report.read_text())))
        drawn = "" if args.no_chart else ", .png" if chart(
            args.report, args.report.with_suffix(".png")) else " (chart failed)"
        print(f"bench: wrote {args.report.with_suffix('.md')}{drawn}", flush=True)
        return 0
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in ORDER:
            ap.error(f"unknown contender {n!r}; choose from {', '.join(ORDER)}")
    sizes = [int(x) for x in args.workers.split(",")]
    starlette_version = ensure_tools(names, args.hc)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    scale.raise_nofile()
    started = dt.datetime.now(dt.UTC)
    load_at_start = os.getloadavg()[0]
    print(f"bench: memory of {APP} ({args.app_mb} MB) at {sizes} workers: {', '.join(names)}; "
          f"{os.cpu_count()} cores, {scale.mem_available_mib()} MiB available, "
          f"load {load_at_start:.2f}", flush=True)
    runs: list[dict[str, Any]] = []
    for n in sizes:
        print(f"[{n} workers]", flush=True)
        for name in names:
            if runs:  # the previous server's exits and freed memory settle first
                time.sleep(scale.SETTLE_BETWEEN)
            timing = None if args.no_timing or n != args.timing_workers else args.reps
            runs.append(measure(name, n, args.hc, args.app_mb, timing, logs))
    command = " ".join([".venv/bin/python", "bench/memory.py",
                        *(argv if argv is not None else sys.argv[1:])])
    doc = {"date": started.isoformat(timespec="seconds"), "command": command,
           "app": APP, "app_mb": args.app_mb, "starlette": starlette_version,
           "hc": args.hc, "machine": scale.machine(args.hc), "reps": args.reps,
           "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()[0],
           "elapsed_s": round((dt.datetime.now(dt.UTC) - started).total_seconds()),
           "target": {"workers": TARGET_WORKERS, "ratio": TARGET_RATIO,
                      "verdict": verdict(runs)[0], "measured": verdict(runs)[1]},
           "runs": runs}
    base = out_dir / started.strftime("%Y-%m-%d")
    base.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    base.with_suffix(".md").write_text(md)
    print(md)
    drawn = "" if args.no_chart else ", .png" if chart(
        base.with_suffix(".json"), base.with_suffix(".png")) else " (chart failed)"
    print(f"bench: wrote {base}.json, .md{drawn}", flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so every `finally` stops its server's process group


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; the server was stopped", file=sys.stderr)
        sys.exit(130)
