"""How much of a WSGI request's CPU is the view's and how much the server's, per server.

    .venv/bin/python bench/view_cpu.py [--rounds 3] [--duration 3] [--workers 2]
        [--apps flask,flask-sleep]

The bench's CPU per request (bench/run.py) is the whole server tree's; on Flask it mixes
the framework's work with the server's, and the two move together on this shared machine.
Here every server runs the same Flask app of bench/peer_frameworks.py wrapped in
`ViewClock`, which adds up the CPU time of the thread running each view (the call, the
iteration of its body and its close: time.thread_time, so a view's sleep is not counted)
and leaves the totals in a file per process. Per wrk run: the server tree's CPU per
request (utime + stime from /proc, over the requests wrk saw), the view's own CPU per
request (the change in those totals), and the difference, what the server spent around the
view: accept, parsing, the hand-off to a thread and back, the GIL's passes between them,
writing, closing. Contenders: hello-cluster with its threads and with `--wsgi-dispatch
loop`, and granian with as many blocking threads; keep-alive and `Connection: close`,
interleaved, the order reversed every other round. One JSON line per run, then the medians.
`--apps plain` serves a WSGI view that does next to nothing (no Flask), which leaves the
server's own cost per request and per connection.
`ViewClock` itself costs two thread_time() calls per request, the same under every server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ENV_DIR = "HC_BENCH_VIEW_CPU_DIR"  # where ViewClock leaves its totals, one file per pid
EVERY = 200  # requests between two writes of a process's totals

APPS = {"flask": "flask_app", "flask-sleep": "flask_sleep_app", "plain": "plain_app"}
PLAIN_BODY = b'{"message":"Hello Cluster!"}\n'  # Flask's JSON, without Flask


def plain_view(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """`--apps plain`: a WSGI view that does next to nothing, so what is left is the server."""
    start_response("200 OK", [("content-type", "application/json"),
                              ("content-length", str(len(PLAIN_BODY))),
                              ("x-worker-pid", str(os.getpid()))])
    return [PLAIN_BODY]


class ViewClock:
    """A WSGI middleware that adds up the CPU time of its views' threads, per process.

    The totals go to `<dir>/<pid>` as `count seconds`, rewritten whole (write, then
    rename) every `every` requests: a reader sees the last complete pair, never half of
    one, and works from the change between two readings, not from wrk's count.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], directory: str,
                 every: int = EVERY) -> None:
        self.app = app
        self.directory = directory
        self.every = every
        self.count = 0
        self.seconds = 0.0

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> list[bytes]:
        started = time.thread_time()
        result = self.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        # A view runs in one thread from its call to its close, under every server here.
        spent = time.thread_time() - started
        self.count += 1  # the GIL makes these two adds safe enough for a tally
        self.seconds += spent
        if self.count % self.every == 0:
            self.save()
        return [body]

    def save(self) -> None:
        path = Path(self.directory) / str(os.getpid())
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        with os.fdopen(fd, "w") as out:
            out.write(f"{self.count} {self.seconds!r}\n")
        os.replace(tmp, path)


def read_totals(directory: str | Path) -> tuple[int, float]:
    """The views counted and their CPU seconds, summed over every process's file."""
    count, seconds = 0, 0.0
    for path in Path(directory).iterdir():
        if path.name.startswith("."):
            continue
        fields = path.read_text().split()
        if len(fields) == 2:
            count += int(fields[0])
            seconds += float(fields[1])
    return count, seconds


def split_us(server_cpu_s: float, requests: int, before: tuple[int, float],
             after: tuple[int, float]) -> dict[str, float | None]:
    """The server's CPU per request, the view's, and what is left: the server's own."""
    total = server_cpu_s * 1e6 / requests if requests else None
    views = after[0] - before[0]
    view = (after[1] - before[1]) * 1e6 / views if views > 0 else None
    around = total - view if total is not None and view is not None else None
    return {"cpu_us": total, "view_us": view, "around_us": around}


def __getattr__(name: str) -> Any:
    """`view_cpu:flask_app` and the like: the peer app of that name, wrapped in ViewClock."""
    if name == APPS["plain"]:
        return ViewClock(plain_view, os.environ[ENV_DIR])
    if name in APPS.values():
        import peer_frameworks

        return ViewClock(getattr(peer_frameworks, name), os.environ[ENV_DIR])
    raise AttributeError(name)


def _contenders(app: str, workers: int, threads: int) -> list[tuple[str, int, list[str]]]:
    """(name, port, argv) of each server of `app`, each on a free port of its own."""
    import harness as h
    import peers

    target = f"view_cpu:{APPS[app]}"
    ours = ["--app", target, "--interface", "wsgi", "--wsgi-threads", str(threads),
            "--request-metrics"]
    out = []
    for name, extra in (("hello-cluster", ours),
                        ("hello-cluster --wsgi-dispatch loop",
                         [*ours, "--wsgi-dispatch", "loop"])):
        port = h.free_port()
        out.append((name, port, peers.hello_argv(port, h.free_port(), workers, extra)))
    if (peers.BENCH_BIN / "granian").exists():
        port = h.free_port()
        out.append((f"granian --blocking-threads {threads}", port,
                    peers.granian_wsgi_argv(port, str(workers), str(threads), target)))
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness as h
    import peers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--apps", default="flask,flask-sleep")
    args = ap.parse_args(argv)
    peers.ensure_peers(quiet=True)
    peers.ensure_module("flask", peers.FRAMEWORK_PACKAGES, quiet=True)  # granian's venv
    results: list[dict[str, Any]] = []
    for app in args.apps.split(","):
        with tempfile.TemporaryDirectory(prefix="hc-view-cpu-") as tmp:
            running: list[tuple[str, int, h.Proc, Path]] = []
            try:
                for name, port, cmd in _contenders(app, args.workers, args.threads):
                    own = Path(tmp) / f"{len(running)}"
                    own.mkdir()
                    env = {**peers.clean_env(), **peers.flask_env(), ENV_DIR: str(own)}
                    log = peers.WORK / "logs" / f"view_cpu-{len(running)}.log"
                    proc = h.Proc(cmd, env, log)
                    running.append((name, port, proc, own))  # stopped below even if it fails
                    when, _ = h.wait_for_pids(port, args.workers, time.monotonic() + 30)
                    if when is None:
                        raise SystemExit(f"bench: {name} did not start; see {log}")
                    h.wrk(port, 1)  # warm-up, discarded
                for rnd in range(args.rounds):
                    order = running if rnd % 2 == 0 else running[::-1]
                    for close in (False, True):
                        for name, port, proc, own in order:
                            before, cpu0 = read_totals(own), h.group_cpu_s(proc.pid)
                            r = h.wrk(port, args.duration, close=close)
                            spent = h.group_cpu_s(proc.pid) - cpu0
                            time.sleep(0.2)  # the last views' totals reach their files
                            row = {"app": app, "server": name, "round": rnd + 1,
                                   "mode": "close" if close else "keep-alive",
                                   "rps": round(r.rps),
                                   **{k: None if v is None else round(v, 1) for k, v in
                                      split_us(spent, r.requests, before,
                                               read_totals(own)).items()}}
                            results.append(row)
                            print(json.dumps(row), flush=True)
            finally:
                for _, _, proc, _ in running:
                    proc.stop()
    print(json.dumps({"medians": summarize(results), "rounds": args.rounds,
                      "duration_s": args.duration, "workers": args.workers,
                      "loadavg": os.getloadavg()[0]}))
    return 0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the rounds, per app, server and mode, in the order first seen."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["app"], row["server"], row["mode"]), []).append(row)
    out = []
    for (app, server, mode), runs in groups.items():
        med: dict[str, Any] = {"app": app, "server": server, "mode": mode}
        for key in ("rps", "cpu_us", "view_us", "around_us"):
            values = [run[key] for run in runs if run[key] is not None]
            med[key] = round(statistics.median(values), 1) if values else None
        out.append(med)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
