"""Benchmark hello-cluster against its peers, in one run, on this machine.

    .venv/bin/python bench/run.py [--quick] [--workers 2] [--reps 3] [--duration 5]
    .venv/bin/python bench/run.py --suite wsgi   # Flask: hello-cluster, gunicorn, granian

Starts every contender in turn (all on 127.0.0.1, same worker count, same hello page),
measures throughput/latency (keep-alive and Connection: close), start-up, respawn,
requests lost to a SIGKILLed worker and to a graceful reload, and supervisor RSS; reports
medians over repetitions and ratios against `uvicorn --workers` from the same run, and
writes bench/results/<date>.json and .md. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import peers  # noqa: E402
import profiling  # noqa: E402
import report  # noqa: E402

RESULTS = peers.BENCH / "results"
LOGS = peers.WORK / "logs"
STARTUP_TIMEOUT = 30.0
RESPAWN_TIMEOUT = 15.0


def ensure_tools() -> None:
    """wrk and nginx (the machine's limit row) from apt if missing; the peers into
    bench/.venv; hello-cluster's own venv."""
    missing = [package for package, binary in (("wrk", "wrk"), ("nginx-light", "nginx"))
               if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists()]
    if missing:
        print(f"bench: installing {' '.join(missing)} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)
    if not (peers.MAIN_BIN / "hello-cluster").exists():
        sys.exit("bench: .venv/bin/hello-cluster is missing; run `make .venv/bin/hello-cluster`")
    if shutil.which("node") is None:
        print("bench: no `node` on PATH; the Node cluster contender is skipped", flush=True)
    peers.ensure_peers()


def base_env() -> dict[str, str]:
    return peers.clean_env()


class Session:
    """One contender from start to stop: start-up is measured on the way in."""

    def __init__(self, c: peers.Contender, port: int, workers: int, log_name: str) -> None:
        self.c, self.port, self.workers = c, port, workers
        self.notify = h.NotifySocket(peers.WORK) if c.notify else None
        env = {**base_env(), **c.env}
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.path
        self.t0 = time.monotonic()
        self.proc = h.Proc(c.argv, env, LOGS / log_name.replace("/", "-"))
        self.startup_pids_ms: float | None = None
        self.startup_ready_ms: float | None = None
        self.pids: set[int] = set()
        self.seen: set[int] = set()

    def wait_started(self) -> bool:
        deadline = self.t0 + STARTUP_TIMEOUT
        when, pids = h.wait_for_pids(self.port, self.workers, deadline)
        self.pids = set(pids)
        self.seen |= self.pids
        if when is None:
            print(f"    ! {self.c.name}: only {len(pids)}/{self.workers} workers answered "
                  f"within {STARTUP_TIMEOUT:.0f}s (alive={self.proc.alive()})", flush=True)
            return False
        self.startup_pids_ms = (when - self.t0) * 1000
        if self.notify is not None:
            while time.monotonic() < deadline:
                ready = self.notify.first("READY=1")
                if ready is not None:
                    self.startup_ready_ms = (ready - self.t0) * 1000
                    break
                time.sleep(0.005)
        return True

    def stop(self) -> None:
        try:
            self.proc.stop()
        finally:
            if self.notify is not None:
                self.notify.close()


def kill_pid(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def measure_respawn(s: Session, pid: int) -> float | None:
    """SIGKILL one worker; ms until a pid never seen before answers a fresh connection."""
    t = time.monotonic()
    if not kill_pid(pid):
        return None
    when, fresh = h.wait_for_pids(s.port, 1, t + RESPAWN_TIMEOUT, seen=s.seen, new_only=True)
    s.seen |= fresh
    return None if when is None else (when - t) * 1000


def measured_wrk(port: int, pgid: int, duration: float, close: bool) -> tuple[h.WrkResult,
                                                                              float | None]:
    """One wrk run and the server tree's CPU per request served during it, in us."""
    before = h.group_cpu_s(pgid)
    r = h.wrk(port, duration, close=close)
    spent = h.group_cpu_s(pgid) - before
    return r, (spent * 1e6 / r.requests if r.requests else None)


def round_order(live: list[peers.Contender], rnd: int) -> list[peers.Contender]:
    """The contenders in report order, reversed every other round.

    Whatever drifts during a round (other work on a shared machine, thermal state) then
    favours the front of the list in one round and the back in the next.
    """
    return list(live) if rnd % 2 == 0 else list(reversed(live))


def throughput_phase(field: list[peers.Contender], ports: dict[str, int],
                     args: argparse.Namespace, records: dict[str, dict[str, Any]]) -> None:
    """All contenders up at once (idle ones cost no CPU); wrk visits them in turn.

    Each round measures every contender back to back, the order reversed every other
    round, so background load on a shared machine hits a round's contenders alike;
    ratios are taken per round and the median reported. Each wrk run also records the
    server's CPU per request: utime + stime of its whole process group over the run,
    divided by the requests wrk counted. After the last round: one /metrics scrape
    (hello-cluster) and the supervisor's RSS after load.
    """
    sessions: dict[str, Session] = {}
    try:
        for c in field:
            s = Session(c, ports[c.name], args.workers, f"{c.name}-throughput.log")
            sessions[c.name] = s
            if not s.wait_started():
                records[c.name]["errors"].append("throughput phase: start-up failed")
        live = [c for c in field if sessions[c.name].startup_pids_ms is not None]
        for c in live:
            h.wrk(ports[c.name], 1, close=False)  # warm-up, discarded
        for rnd in range(args.reps):
            print(f"[throughput round {rnd + 1}/{args.reps}]", flush=True)
            for c in round_order(live, rnd):
                for mode, close in (("ka", False), ("close", True)):
                    r, cpu = measured_wrk(ports[c.name], sessions[c.name].proc.pid,
                                          args.duration, close)
                    records[c.name][mode].append({**summary(r), "round": rnd, "cpu_us": cpu})
                    print(f"    {c.name:18} {mode:5} {r.rps:9.0f} req/s  cpu {fmt(cpu)} us/req"
                          f"  p50 {fmt(r.p50_ms)} ms  p99 {fmt(r.p99_ms)} ms"
                          f"  failed {r.failed}", flush=True)
        for c in live:
            if c.kind == "subject":
                scrape(c)
            records[c.name]["rss_mb"].append(h.rss_mb(sessions[c.name].proc.pid))
    finally:
        for s in sessions.values():
            s.stop()


def started(s: Session, rec: dict[str, Any], error: str) -> bool:
    """Wait for the contender's start-up and record its times; False (noted) if it failed."""
    if not s.wait_started():
        rec["errors"].append(error)
        return False
    rec["startup_ms"].append(s.startup_pids_ms)
    if s.startup_ready_ms is not None:
        rec["startup_ready_ms"].append(s.startup_ready_ms)
    return True


def session_a(c: peers.Contender, port: int, args: argparse.Namespace, rec: dict[str, Any],
              tag: str) -> None:
    """Start-up, idle RSS, and respawn after SIGKILL of each original worker."""
    s = Session(c, port, args.workers, f"{c.name}-{tag}-a.log")
    try:
        if not started(s, rec, f"{tag}: start-up failed"):
            return
        time.sleep(0.2)
        rec["rss_idle_mb"].append(h.rss_mb(s.proc.pid))
        if c.respawns:
            for pid in sorted(s.pids)[: args.workers]:
                ms = measure_respawn(s, pid)
                rec["respawn_ms"].append(ms)
                print(f"    respawn {fmt(ms)} ms", flush=True)
    finally:
        s.stop()


def session_b(c: peers.Contender, port: int, args: argparse.Namespace, rec: dict[str, Any],
              tag: str) -> None:
    """Requests failed while a worker is SIGKILLed under load, then while reloading (HUP)."""
    s = Session(c, port, args.workers, f"{c.name}-{tag}-b.log")
    try:
        if not started(s, rec, f"{tag}: start-up (session b) failed"):
            return
        victim = min(s.pids)
        with h.wrk_background(port, args.duration) as box:
            time.sleep(args.duration * 0.3)
            kill_pid(victim)
        rec["kill_failed"].append(box[0].failed)
        rec["kill_detail"].append(summary(box[0]))
        print(f"    SIGKILL under load: {box[0].failed} failed of {box[0].requests}", flush=True)
        h.wait_for_pids(port, 1, time.monotonic() + RESPAWN_TIMEOUT, seen=s.seen, new_only=True)
        if not c.reload_signal:
            return
        for mode, close in (("ka", False), ("close", True)):
            before = set(s.seen)
            with h.wrk_background(port, args.duration, close=close) as box:
                time.sleep(args.duration * 0.3)
                t = time.monotonic()
                os.kill(s.proc.pid, signal.SIGHUP)
            r = box[0]
            rec[f"reload_failed_{mode}"].append(r.failed)
            rec[f"reload_detail_{mode}"].append(summary(r))
            if s.notify is not None:
                done = s.notify.first("READY=1", after=t)
                if done is not None:
                    rec["reload_ms"].append((done - t) * 1000)
            # Let the reload settle: every worker slot answered by a new pid (bounded).
            deadline = time.monotonic() + 20
            fresh: set[int] = set()
            while len(fresh) < args.workers and time.monotonic() < deadline:
                _, got = h.wait_for_pids(port, 1, min(deadline, time.monotonic() + 2),
                                         seen=before | fresh, new_only=True)
                fresh |= got
            s.seen |= fresh
            print(f"    SIGHUP under load ({mode}): {r.failed} failed of {r.requests}",
                  flush=True)
    finally:
        s.stop()


def scrape(c: peers.Contender) -> None:
    """One Prometheus scrape of hello-cluster's master, as production would have."""
    port = c.argv[c.argv.index("--metrics-bind") + 1].rsplit(":", 1)[1]
    with contextlib.suppress(OSError), urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        resp.read()


def summary(r: h.WrkResult) -> dict[str, Any]:
    d = asdict(r)
    d.pop("raw")
    d["failed"] = r.failed
    return d


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.0f}"


def new_record() -> dict[str, Any]:
    keys = ["startup_ms", "startup_ready_ms", "rss_idle_mb", "rss_mb", "ka", "close",
            "respawn_ms", "kill_failed", "kill_detail", "reload_failed_ka", "reload_failed_close",
            "reload_detail_ka", "reload_detail_close", "reload_ms", "errors"]
    return {k: [] for k in keys}


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
            else "?"

    def packages(pip: Path, wanted: set[str]) -> dict[str, str]:
        pkgs = subprocess.run([str(pip), "list", "--format=json", "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=60)
        return {p["name"].lower(): p["version"] for p in json.loads(pkgs.stdout or "[]")
                if p["name"].lower() in wanted}

    versions = packages(peers.BENCH_BIN / "pip", {"gunicorn", "uvicorn", "uvicorn-worker",
                                                  "granian", "uvloop", "httptools", "flask",
                                                  "fastapi", "starlette", "django"})
    return {
        "loadavg_at_end": os.getloadavg()[0],
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": version(["node", "--version"]) if shutil.which("node") else None,
        "wrk": version(["wrk", "--version"]),
        "peers": versions,
        "hello_cluster_deps": packages(peers.MAIN_BIN / "pip", {"uvicorn", "a2wsgi", "flask",
                                                               "fastapi", "starlette", "django",
                                                               "uvloop", "httptools"}),
        "nginx": version(["nginx", "-v"]) if shutil.which("nginx") else None,
        "hello_cluster": version([str(peers.MAIN_BIN / "hello-cluster"), "--version"]),
    }


def micro_metrics() -> dict[str, Any] | None:
    """RequestMetrics' in-process cost per request (noise-free complement to the load test)."""
    try:
        out = subprocess.run([str(peers.MAIN_BIN / "python"),
                              str(peers.BENCH / "micro_metrics.py")],
                             env={**base_env(), "PYTHONPATH": str(peers.ROOT / "service")},
                             capture_output=True, text=True, timeout=120)
        return dict(json.loads(out.stdout))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def micro_protocol() -> dict[str, Any] | None:
    """Per-request cost by part for both worker protocols (bench/micro_protocol.py)."""
    try:
        out = subprocess.run([str(peers.MAIN_BIN / "python"),
                              str(peers.BENCH / "micro_protocol.py")],
                             env={**base_env(), "PYTHONPATH": str(peers.ROOT / "service")},
                             capture_output=True, text=True, timeout=300)
        return dict(json.loads(out.stdout))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark hello-cluster against its peers.")
    ap.add_argument("--quick", action="store_true",
                    help="1 repetition of 2 s runs: a smoke test, not a result")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--suite", choices=["asgi", "wsgi", "apps"], default="asgi",
                    help="asgi: the hello page (default); wsgi: a Flask page against gunicorn "
                         "(sync, gthread) and granian --interface wsgi; apps: FastAPI, "
                         "Starlette, Django and Flask under every server, throughput and "
                         "CPU per request only, nginx as the limit")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only the throughput phase (no start-up, respawn, SIGKILL or reload "
                         "sessions); implied by --suite apps")
    ap.add_argument("--wsgi-threads", type=int, default=None,
                    help="threads per worker for every threaded WSGI contender (wsgi suite; "
                         "default: hello-cluster's own --wsgi-threads default)")
    ap.add_argument("--only", default="", help="comma-separated contender names "
                    f"({','.join(peers.NAMES)}; wsgi suite: {','.join(peers.WSGI_NAMES)}); "
                    "the suite's baseline is always included")
    ap.add_argument("--no-sync", action="store_true", help="skip the gunicorn sync reference")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="py-spy a hello-cluster worker under load (auto: when it is slower "
                         "than uvicorn or far below the ceiling)")
    ap.add_argument("--out", default=None,
                    help="results directory (default bench/results, or bench/results/wsgi)")
    args = ap.parse_args(argv)
    suite = {"wsgi": peers.WSGI, "apps": peers.APPS}.get(args.suite, peers.ASGI)
    if suite is peers.APPS:
        args.throughput_only = True
    if args.wsgi_threads is None:
        from hello_cluster.config import DEFAULT_WSGI_THREADS  # the project's venv runs this

        args.wsgi_threads = DEFAULT_WSGI_THREADS
    if args.out is None:
        args.out = str(RESULTS / "wsgi" if suite is peers.WSGI
                       else RESULTS / "apps" if suite is peers.APPS else RESULTS)
    if args.quick:
        args.reps, args.duration = 1, 2.0
    ensure_tools()
    if suite is peers.APPS:
        for module in ("fastapi", "django"):
            peers.ensure_module(module, peers.FRAMEWORK_PACKAGES)
    LOGS.mkdir(parents=True, exist_ok=True)
    names = {"wsgi": peers.WSGI_NAMES, "apps": peers.APP_NAMES}.get(suite.name, peers.NAMES)
    ports = {n: h.free_port() for n in names}
    metrics_ports = {n: h.free_port() for n in names}
    if suite is peers.WSGI:
        field = peers.wsgi_contenders(args.workers, args.wsgi_threads, ports, metrics_ports)
    elif suite is peers.APPS:
        field = peers.apps_contenders(args.workers, args.wsgi_threads, ports, metrics_ports)
    else:
        field = peers.contenders(args.workers, ports, metrics_ports,
                                 include_sync=not args.no_sync)
    if args.only:
        keep = set(args.only.split(",")) | {suite.baseline}
        field = [c for c in field if c.name in keep]
    records = {c.name: new_record() for c in field}
    started = dt.datetime.now()
    load_at_start = os.getloadavg()[0]
    print(f"bench: {len(field)} contenders x {args.reps} reps, {args.workers} workers, "
          f"{args.duration:g}s wrk runs, {os.cpu_count()} cores", flush=True)
    throughput_phase(field, ports, args, records)
    for rep in range(0 if args.throughput_only else args.reps):
        order = field[rep % len(field):] + field[: rep % len(field)]  # rotate against drift
        for c in order:
            print(f"[rep {rep + 1}/{args.reps}] {c.label}", flush=True)
            rec = records[c.name]
            try:
                session_a(c, ports[c.name], args, rec, f"r{rep + 1}")
                if c.respawns:
                    session_b(c, ports[c.name], args, rec, f"r{rep + 1}")
            except Exception as err:  # one contender's trouble must not sink the run
                rec["errors"].append(f"r{rep + 1}: {type(err).__name__}: {err}")
                print(f"    ! {c.name}: {type(err).__name__}: {err}", flush=True)
    summ = report.summarize(field, records, suite)
    summ["derived"]["micro"] = micro_metrics() if suite is peers.ASGI else None
    summ["derived"]["micro_protocol"] = micro_protocol() if suite is peers.ASGI else None
    summ["derived"]["loadavg_at_start"] = load_at_start
    profile: dict[str, Any] | None = None
    if suite is not peers.APPS and (args.profile == "always" or (
            args.profile == "auto" and report.needs_profile(summ))):
        print("bench: profiling one worker each of hello-cluster and uvicorn under load "
              "with py-spy", flush=True)
        profile = profiling.profile_all(
            [c for c in field if c.kind == "subject" or c.name == suite.baseline], ports, args,
            base_env(), LOGS)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y-%m-%d")
    info = machine()
    command = " ".join([".venv/bin/python", "bench/run.py", *(argv if argv is not None
                                                                else sys.argv[1:])])
    doc = {"date": started.isoformat(timespec="seconds"), "command": command,
           "suite": suite.name, "baseline": suite.baseline,
           "workers": args.workers, "reps": args.reps, "duration_s": args.duration,
           "machine": info, "contenders": {c.name: c.label for c in field},
           "summary": summ, "raw": records, "profile": profile,
           "elapsed_s": round((dt.datetime.now() - started).total_seconds())}
    (out_dir / f"{stamp}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = report.apps_markdown(doc, field) if suite is peers.APPS else report.markdown(doc, field)
    (out_dir / f"{stamp}.md").write_text(md)
    print(md)
    print(f"bench: wrote {out_dir / (stamp + '.json')} and .md", flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so every `finally` stops its contender's process group


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; contenders stopped", file=sys.stderr)
        sys.exit(130)
