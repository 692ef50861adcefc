"""`hello-cluster status`: the pool at a glance, in the manner of `pm2 ls`.

It reads the master's /status document over HTTP (the same listener as /metrics), so it
works wherever the metrics port is reachable: a shell on the host, `systemctl`'s world,
`kubectl exec`. CPU % and loop lag are rates, so the table is drawn from two documents
taken `--interval` apart (CPU seconds and lag sums per pid, divided by the master's
clock between them); `--json` prints one document as it is.

Exit status: 0 every desired worker ready, 1 degraded (fewer ready, starting, stopping,
crash loop), 2 bad arguments, 3 the master cannot be reached (one line on stderr).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from hello_cluster.config import ALL_INTERFACES, parse_metrics_bind
from hello_cluster.errors import ConfigError

EXIT_READY, EXIT_DEGRADED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_URL = "http://127.0.0.1:9464"
TIMEOUT = 5.0
COLOURS = {"ready": "32", "starting": "33", "stalled": "33", "draining": "36",
           "hung": "31", "backoff": "31"}


class Unreachable(Exception):
    """The master did not answer /status with a document."""


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    """Where /status is: a TCP host and port, or a unix socket (a unix --metrics-bind)."""

    host: str = ""
    port: int = 0
    unix: str | None = None
    path: str = "/status"

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"


def target_from_url(url: str) -> Target:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"--metrics-url {url!r}: use http://HOST:PORT (the master's "
                         "--metrics-bind; plain HTTP)")
    try:
        port = parts.port or 80
    except ValueError:
        raise UsageError(f"--metrics-url {url!r}: the port is not a number") from None
    path = parts.path.rstrip("/")
    for known in ("/metrics", "/livez", "/readyz"):
        if path.endswith(known):
            path = path[: -len(known)]
    if not path.endswith("/status"):
        path += "/status"
    return Target(parts.hostname, port, path=path)


def default_target(env: Mapping[str, str]) -> Target:
    """HELLO_CLUSTER_METRICS_BIND as the server reads it; all-interfaces means loopback."""
    spec = env.get("HELLO_CLUSTER_METRICS_BIND")
    if spec is None:
        return target_from_url(DEFAULT_URL)
    try:
        bind = parse_metrics_bind(spec)
    except ConfigError as err:
        raise UsageError(f"HELLO_CLUSTER_METRICS_BIND: {err}") from None
    if bind is None:
        raise UsageError("HELLO_CLUSTER_METRICS_BIND=off: the master serves no /status; "
                         "pass --metrics-url URL of one that does")
    if bind.path is not None:
        return Target(unix=bind.path)
    host = {ALL_INTERFACES: "127.0.0.1", "::": "::1"}.get(bind.host, bind.host)
    return Target(host, bind.port)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def fetch(target: Target, timeout: float = TIMEOUT) -> dict[str, Any]:
    conn = (_UnixConnection(target.unix, timeout) if target.unix is not None
            else http.client.HTTPConnection(target.host, target.port, timeout=timeout))
    try:
        conn.request("GET", target.path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read(4 * 1024 * 1024)
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise Unreachable(f"cannot reach {target}: {reason}; is hello-cluster running "
                          "with its metrics listener there? (--metrics-url URL)") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise Unreachable(f"{target} answered HTTP {resp.status}, not a status document; "
                          "is it a hello-cluster master of this version?")
    try:
        return validate(json.loads(body))
    except ValueError as err:
        raise Unreachable(f"{target} answered something that is not a status document "
                          f"({err})") from None


_NUMBER = (int, float)
_MASTER = {"pid": int, "state": str, "uptime_seconds": _NUMBER, "version": str,
           "reloads": int, "restarts": int}
_ROW = {"slot": int, "state": str}
_ROW_OPTIONAL = {"pid": int, "uptime_seconds": _NUMBER, "restarts": int,
                 "rss_bytes": _NUMBER, "cpu_seconds": _NUMBER, "requests": _NUMBER,
                 "respawn_in_seconds": _NUMBER, "pinned_cpu": int}


def _check(obj: Any, required: Mapping[str, Any], optional: Mapping[str, Any],
           where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not an object")
    for name, kind in [*required.items(), *optional.items()]:
        value = obj.get(name)
        if value is None and name in optional:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}.{name} is missing or of the wrong type")
        if isinstance(value, _NUMBER) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}.{name} is not a finite number >= 0")


def validate(doc: Any) -> dict[str, Any]:
    """The fields the table and the exit status use, with their types; ValueError if not.

    The document comes over the network: whatever it holds, the command prints one line
    and exits 3 rather than showing a traceback.
    """
    _check(doc, {"master": dict, "workers": list}, {}, "document")
    _check(doc["master"], _MASTER, {}, "master")
    _check(doc["master"]["workers"], {"desired": int, "ready": int}, {}, "master.workers")
    for i, row in enumerate(doc["workers"]):
        _check(row, _ROW, _ROW_OPTIONAL, f"workers[{i}]")
        lag = row.get("loop_lag")
        if lag is not None:
            _check(lag, {}, {"sum_seconds": _NUMBER, "ticks": int}, f"workers[{i}].loop_lag")
    return dict(doc)


def exit_code(doc: Mapping[str, Any]) -> int:
    master = doc["master"]
    workers = master["workers"]
    healthy = (master["state"] in ("running", "reloading") and not master.get("crash_loop")
               and workers["ready"] >= workers["desired"])
    return EXIT_READY if healthy else EXIT_DEGRADED


# ---- human units ---------------------------------------------------------------------------


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    if n < 1000:
        return str(int(n))
    for unit, size in (("k", 1e3), ("M", 1e6), ("G", 1e9)):
        if n < size * 1000 or unit == "G":
            return f"{n / size:.1f}{unit}"
    raise AssertionError("unreachable")


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1.0:
        return f"{s * 1000:.1f}ms"
    return f"{s:.2f}s"


# ---- the table -----------------------------------------------------------------------------

COLUMNS = (("slot", 4), ("pid", 8), ("state", 8), ("uptime", 7), ("restarts", 8),
           ("cpu", 6), ("memory", 7), ("requests", 8), ("loop lag", 8))


def rates(doc: Mapping[str, Any], before: Mapping[str, Any] | None
          ) -> dict[int, tuple[float | None, float | None]]:
    """CPU % and mean loop lag per pid between two documents (None: not in both)."""
    out: dict[int, tuple[float | None, float | None]] = {}
    if before is None:
        return out
    elapsed = doc["master"]["uptime_seconds"] - before["master"]["uptime_seconds"]
    old = {w["pid"]: w for w in before["workers"] if w.get("pid")}
    for w in doc["workers"]:
        prev = old.get(w.get("pid"))
        if prev is None or elapsed <= 0:
            continue
        cpu = None
        if w.get("cpu_seconds") is not None and prev.get("cpu_seconds") is not None:
            cpu = max(0.0, (w["cpu_seconds"] - prev["cpu_seconds"]) / elapsed * 100)
        lag = None
        now_lag, old_lag = _lag(w), _lag(prev)
        if now_lag is not None and old_lag is not None and now_lag[1] > old_lag[1]:
            lag = max(0.0, (now_lag[0] - old_lag[0]) / (now_lag[1] - old_lag[1]))
        out[w["pid"]] = (cpu, lag)
    return out


def _lag(row: Mapping[str, Any]) -> tuple[float, int] | None:
    """(sum of lateness, ticks) of a row, if it has both."""
    lag = row.get("loop_lag") or {}
    if lag.get("sum_seconds") is None or lag.get("ticks") is None:
        return None
    return float(lag["sum_seconds"]), int(lag["ticks"])


def render(doc: Mapping[str, Any], before: Mapping[str, Any] | None = None,
           colour: bool = False) -> str:
    """The table, at most 80 columns wide; colour only for a terminal."""
    m = doc["master"]
    per_pid = rates(doc, before)
    lines = [f"hello-cluster {m['version']}  master pid {m['pid']}  {m['state']}  "
             f"up {human_duration(m['uptime_seconds'])}"
             + ("  CRASH LOOP" if m.get("crash_loop") else ""),
             f"workers {m['workers']['ready']}/{m['workers']['desired']} ready  "
             f"restarts {m['restarts']}  reloads {m['reloads']}"]
    lines.append(" ".join(name.rjust(width) if name not in ("state",) else name.ljust(width)
                          for name, width in COLUMNS).rstrip())
    for w in doc["workers"]:
        cpu, lag = per_pid.get(w.get("pid") or 0, (None, None))
        uptime = w.get("uptime_seconds")
        if w["state"] == "backoff":
            uptime_cell = f"in {human_duration(w.get('respawn_in_seconds'))}"
        else:
            uptime_cell = human_duration(uptime)
        cells = [str(w["slot"]), str(w.get("pid") or "-"), w["state"], uptime_cell,
                 str(w.get("restarts", 0)), "-" if cpu is None else f"{cpu:.1f}%",
                 human_bytes(w.get("rss_bytes")), human_count(w.get("requests")),
                 human_seconds(lag)]
        row = []
        for (name, width), cell in zip(COLUMNS, cells, strict=True):
            if name == "state":
                text = cell.ljust(width)
                if colour and cell in COLOURS:
                    text = f"\x1b[{COLOURS[cell]}m{text}\x1b[0m"
                row.append(text)
            else:
                row.append(cell.rjust(width))
        lines.append(" ".join(row).rstrip())
    if before is not None:
        elapsed = m["uptime_seconds"] - before["master"]["uptime_seconds"]
        lines.append(f"cpu and loop lag: over the last {elapsed:.1f}s "
                     "(loop lag: mean lateness of the 0.1 s tick)")
    return "\n".join(lines) + "\n"


# ---- the command ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"hello-cluster status: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hello-cluster status",
                description="Show the workers of a running hello-cluster (like pm2 ls).",
                epilog="Exit status: 0 every desired worker ready, 1 degraded, 3 the master "
                       "cannot be reached.")
    p.add_argument("--metrics-url", metavar="URL",
                   help="the master's metrics listener (default: from "
                        f"HELLO_CLUSTER_METRICS_BIND, else {DEFAULT_URL})")
    p.add_argument("--json", action="store_true", help="print the /status document")
    p.add_argument("--watch", action="store_true", help="redraw every --interval until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="between the two samples CPU %% and loop lag come from, and between "
                        "redraws (default 1)")
    return p


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(argv))
    if not 0.1 <= args.interval <= 3600:
        print("hello-cluster status: error: --interval must be between 0.1 and 3600 seconds",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        target = (target_from_url(args.metrics_url) if args.metrics_url
                  else default_target(env))
    except UsageError as err:
        print(f"hello-cluster status: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    colour = sys.stdout.isatty() and "NO_COLOR" not in env
    doc: dict[str, Any] | None = None
    try:
        doc = fetch(target)
        if args.json and not args.watch:
            print(json.dumps(doc, indent=2))
            return exit_code(doc)
        while True:
            time.sleep(args.interval)
            before, doc = doc, fetch(target)
            if args.json:
                out = json.dumps(doc) + "\n"
            else:
                out = render(doc, before, colour)
                if args.watch:  # a terminal is redrawn; a pipe gets one frame after another
                    out = "\x1b[H\x1b[2J" + out if colour else out + "\n"
            sys.stdout.write(out)
            sys.stdout.flush()
            if not args.watch:
                return exit_code(doc)
    except Unreachable as err:
        print(f"hello-cluster status: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return exit_code(doc) if doc is not None else 130
    except BrokenPipeError:  # `| head`: the reader has seen enough; say nothing at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return exit_code(doc) if doc is not None else EXIT_UNREACHABLE
