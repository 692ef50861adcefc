"""The contenders: how to start each one, and what each can be asked to do.

Every contender binds 127.0.0.1, runs the same number of workers and serves the same
43-byte hello page with an `x-worker-pid` header. Python peers run from bench/.venv with
PYTHONPATH=service so they serve hello-cluster's own app module (see peer_app.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BENCH_VENV = BENCH / ".venv"
BENCH_BIN = BENCH_VENV / "bin"
# Scratch space (logs, notify sockets, profiles): inside the git-ignored bench venv, not
# /tmp, which other jobs on a shared machine may clean while a run is in progress.
WORK = BENCH_VENV / "work"
MAIN_BIN = ROOT / ".venv" / "bin"
PEER_PACKAGES = ["gunicorn", "uvicorn[standard]", "uvicorn-worker", "granian", "py-spy"]
BASELINE = "uvicorn"


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "peer"  # "subject" (hello-cluster), "peer", "reference", "ceiling"
    notify: bool = False  # reports READY=1 on NOTIFY_SOCKET
    respawns: bool = True  # replaces a SIGKILLed worker
    reload_signal: bool = False  # SIGHUP is a graceful rolling reload


def ensure_peers(quiet: bool = False) -> None:
    """Create bench/.venv with the peers if it or any peer is missing (idempotent)."""
    needed = [BENCH_BIN / n for n in ("gunicorn", "uvicorn", "granian", "py-spy")]
    if all(p.exists() for p in needed):
        return
    if not (BENCH_BIN / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [str(BENCH_BIN / "pip"), "install", "-q", "--disable-pip-version-check"]
    print("bench: installing peers into bench/.venv:", " ".join(PEER_PACKAGES), flush=True)
    subprocess.run([*pip, *PEER_PACKAGES], check=True,
                   stdout=subprocess.DEVNULL if quiet else None)


def peer_env() -> dict[str, str]:
    return {"PYTHONPATH": f"{ROOT / 'service'}{os.pathsep}{BENCH}"}


def contenders(workers: int, port_of: dict[str, int], metrics_port_of: dict[str, int],
               include_sync: bool = True) -> list[Contender]:
    """All contenders, in report order; ports are chosen by the caller (free ports)."""
    n = str(workers)
    hc = str(MAIN_BIN / "hello-cluster")
    py = str(BENCH_BIN / "python")
    out: list[Contender] = []

    def hello(name: str, label: str, extra: list[str]) -> Contender:
        return Contender(
            name, label,
            [hc, "--bind", f"127.0.0.1:{port_of[name]}", "--workers", n,
             "--metrics-bind", f"127.0.0.1:{metrics_port_of[name]}", "--log-level", "warning",
             *extra],
            kind="subject", notify=True, reload_signal=True)

    out.append(hello("hc", "hello-cluster --http uvicorn (request metrics on)",
                     ["--http", "uvicorn", "--request-metrics"]))
    out.append(hello("hc-nometrics", "hello-cluster --http uvicorn --no-request-metrics",
                     ["--http", "uvicorn", "--no-request-metrics"]))
    out.append(hello("hc-fast", "hello-cluster --http fast (request metrics on)",
                     ["--http", "fast", "--request-metrics"]))
    out.append(hello("hc-fast-nometrics", "hello-cluster --http fast --no-request-metrics",
                     ["--http", "fast", "--no-request-metrics"]))
    out.append(Contender(
        "uvicorn", f"uvicorn --workers {n} (uvloop, httptools)",
        [str(BENCH_BIN / "uvicorn"), "peer_app:app", "--host", "127.0.0.1",
         "--port", str(port_of["uvicorn"]), "--workers", n, "--loop", "uvloop",
         "--http", "httptools", "--no-access-log", "--no-server-header",
         "--log-level", "warning"],
        env=peer_env(), reload_signal=True))
    out.append(Contender(
        "gunicorn-uvicorn", "gunicorn -k uvicorn_worker.UvicornWorker",
        [str(BENCH_BIN / "gunicorn"), "-k", "uvicorn_worker.UvicornWorker", "-w", n,
         "-b", f"127.0.0.1:{port_of['gunicorn-uvicorn']}", "--log-level", "warning",
         "peer_app:app"],
        env=peer_env(), reload_signal=True))
    out.append(Contender(
        "granian", f"granian --interface asgi --workers {n}",
        [str(BENCH_BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1",
         "--port", str(port_of["granian"]), "--workers", n, "--loop", "uvloop",
         "--no-ws", "--respawn-failed-workers",
         "--log-level", "warning", "--no-access-log", "peer_app:app"],
        env=peer_env(), reload_signal=True))
    node = shutil.which("node")
    if node:
        out.append(Contender(
            "node", "node cluster (http, round-robin)",
            [node, str(BENCH / "node_cluster.js")],
            env={"WORKERS": n, "PORT": str(port_of["node"]), "HOST": "127.0.0.1"}))
    if include_sync:
        out.append(Contender(
            "gunicorn-sync", "gunicorn sync (reference)",
            [str(BENCH_BIN / "gunicorn"), "-w", n, "-b", f"127.0.0.1:{port_of['gunicorn-sync']}",
             "--log-level", "warning", "peer_app:wsgi_app"],
            env=peer_env(), kind="reference", reload_signal=True))
    out.append(Contender(
        "ceiling", "Python ceiling: uvloop+httptools raw, no ASGI (not a peer)",
        [py, str(BENCH / "ceiling.py"), "--host", "127.0.0.1", "--port", str(port_of["ceiling"]),
         "--workers", n],
        kind="ceiling", respawns=False))
    return out


NAMES = ["hc", "hc-nometrics", "hc-fast", "hc-fast-nometrics", "uvicorn", "gunicorn-uvicorn",
         "granian", "node", "gunicorn-sync", "ceiling"]
