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
PEER_PACKAGES = ["gunicorn", "uvicorn[standard]", "uvicorn-worker", "granian", "py-spy", "flask"]
# The apps suite's frameworks (bench/peer_frameworks.py), the project's test extra's versions
# where it has them.
FRAMEWORK_PACKAGES = ["fastapi", "starlette", "django", "flask"]
BASELINE = "uvicorn"


@dataclass(frozen=True)
class Suite:
    """What one run compares: ratios are against `baseline`, measured in the same run."""

    name: str
    baseline: str
    metrics_on: str  # hello-cluster with request metrics (the default)
    metrics_off: str  # the same with --no-request-metrics
    ceiling: str | None  # a no-framework ceiling, if the suite has one


# hello-cluster as shipped: --http fast is the default since issue 18 ("hc" is --http uvicorn).
ASGI = Suite("asgi", BASELINE, "hc-fast", "hc-fast-nometrics", "ceiling")
# A Flask hello page: hello-cluster's WSGI support against the WSGI servers people run.
# gunicorn gthread is the baseline: threads per worker, like hello-cluster's WSGI workers.
WSGI = Suite("wsgi", "gunicorn-gthread", "hc-flask", "hc-flask-nometrics", None)


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
    needed = [BENCH_BIN / n for n in ("gunicorn", "uvicorn", "granian", "py-spy", "flask")]
    if all(p.exists() for p in needed):
        return
    if not (BENCH_BIN / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [str(BENCH_BIN / "pip"), "install", "-q", "--disable-pip-version-check"]
    print("bench: installing peers into bench/.venv:", " ".join(PEER_PACKAGES), flush=True)
    subprocess.run([*pip, *PEER_PACKAGES], check=True,
                   stdout=subprocess.DEVNULL if quiet else None)


def flask_env() -> dict[str, str]:
    """bench/ on the path for peer_flask; hello_cluster for its BODY (installed or service/)."""
    return {"PYTHONPATH": f"{BENCH}{os.pathsep}{ROOT / 'service'}"}


def peer_env() -> dict[str, str]:
    return {"PYTHONPATH": f"{ROOT / 'service'}{os.pathsep}{BENCH}"}


def hello_argv(port: int, metrics_port: int, workers: int, extra: list[str]) -> list[str]:
    """hello-cluster on loopback as every bench script starts it."""
    return [str(MAIN_BIN / "hello-cluster"), "--bind", f"127.0.0.1:{port}",
            "--workers", str(workers), "--metrics-bind", f"127.0.0.1:{metrics_port}",
            "--log-level", "warning", *extra]


def granian_wsgi_argv(port: int, workers: str, threads: str, target: str) -> list[str]:
    """granian serving the WSGI app `target` on loopback, as every WSGI bench runs it."""
    return [str(BENCH_BIN / "granian"), "--interface", "wsgi", "--host", "127.0.0.1",
            "--port", str(port), "--workers", workers, "--blocking-threads", threads,
            "--respawn-failed-workers", "--log-level", "warning", "--no-access-log", target]


def clean_env() -> dict[str, str]:
    """Our environment without what would change how a contender starts or where it logs."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("HELLO_CLUSTER_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_",
                                 "PROMETHEUS_MULTIPROC_DIR", "VIRTUAL_ENV", "PYTHONPATH"))}


def contenders(workers: int, port_of: dict[str, int], metrics_port_of: dict[str, int],
               include_sync: bool = True) -> list[Contender]:
    """All contenders, in report order; ports are chosen by the caller (free ports)."""
    n = str(workers)
    py = str(BENCH_BIN / "python")
    out: list[Contender] = []

    def hello(name: str, label: str, extra: list[str]) -> Contender:
        return Contender(
            name, label, hello_argv(port_of[name], metrics_port_of[name], workers, extra),
            kind="subject", notify=True, reload_signal=True)

    out.append(hello("hc", "hello-cluster --http uvicorn (request metrics on)",
                     ["--http", "uvicorn", "--request-metrics"]))
    out.append(hello("hc-nometrics", "hello-cluster --http uvicorn --no-request-metrics",
                     ["--http", "uvicorn", "--no-request-metrics"]))
    out.append(hello("hc-fast", "hello-cluster --http fast (request metrics on)",
                     ["--http", "fast", "--request-metrics"]))
    out.append(hello("hc-fast-nometrics", "hello-cluster --http fast --no-request-metrics",
                     ["--http", "fast", "--no-request-metrics"]))
    # The default steers each connection to a ready worker's own socket (balance.py); this
    # is the other way to share the port, for the trade-off in the README.
    out.append(hello("hc-shared", "hello-cluster --reuse-port off (one shared socket)",
                     ["--http", "fast", "--reuse-port", "off"]))
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
    nginx = nginx_contender(workers, port_of["nginx"])
    if nginx is not None:
        out.append(nginx)
    return out


NAMES = ["hc", "hc-nometrics", "hc-fast", "hc-fast-nometrics", "hc-shared", "uvicorn",
         "gunicorn-uvicorn", "granian", "node", "gunicorn-sync", "ceiling", "nginx"]


def wsgi_contenders(workers: int, threads: int, port_of: dict[str, int],
                    metrics_port_of: dict[str, int]) -> list[Contender]:
    """The Flask page (bench/peer_flask.py) under each WSGI server, `threads` per worker.

    Every threaded contender gets the same thread count per worker (hello-cluster's
    --wsgi-threads, gunicorn's --threads, granian's --blocking-threads); gunicorn's sync
    worker is one request at a time by design.
    """
    n, t = str(workers), str(threads)
    gunicorn = str(BENCH_BIN / "gunicorn")
    out: list[Contender] = []

    def hello(name: str, label: str, extra: list[str]) -> Contender:
        return Contender(
            name, label,
            hello_argv(port_of[name], metrics_port_of[name], workers,
                       ["--app", "peer_flask:app", "--interface", "wsgi", "--wsgi-threads", t,
                        *extra]),
            env=flask_env(), kind="subject", notify=True, reload_signal=True)

    out.append(hello("hc-flask", f"hello-cluster --interface wsgi --wsgi-threads {t}",
                     ["--request-metrics"]))
    out.append(hello("hc-flask-nometrics", "hello-cluster (WSGI) --no-request-metrics",
                     ["--no-request-metrics"]))
    out.append(Contender(
        "gunicorn-gthread", f"gunicorn -k gthread --threads {t}",
        [gunicorn, "-k", "gthread", "--threads", t, "-w", n,
         "-b", f"127.0.0.1:{port_of['gunicorn-gthread']}", "--log-level", "warning",
         "peer_flask:app"],
        env=flask_env(), reload_signal=True))
    out.append(Contender(
        "gunicorn-sync", "gunicorn (sync worker)",
        [gunicorn, "-w", n, "-b", f"127.0.0.1:{port_of['gunicorn-sync']}",
         "--log-level", "warning", "peer_flask:app"],
        env=flask_env(), reload_signal=True))
    out.append(Contender(
        "granian-wsgi", f"granian --interface wsgi --blocking-threads {t}",
        granian_wsgi_argv(port_of["granian-wsgi"], n, t, "peer_flask:app"),
        env=flask_env(), reload_signal=True))
    return out


WSGI_NAMES = ["hc-flask", "hc-flask-nometrics", "gunicorn-gthread", "gunicorn-sync",
              "granian-wsgi"]


CHART_PACKAGES = ["matplotlib"]


def ensure_chart_tools(quiet: bool = False) -> Path:
    """matplotlib in bench/.venv (created if missing), for bench/scale.py's chart.

    The chart is drawn by bench/.venv's python, so the project's own venv (and what the
    service depends on) never gains a plotting library. Returns that python.
    """
    return ensure_module("matplotlib", CHART_PACKAGES, quiet)


def ensure_module(module: str, packages: list[str], quiet: bool = False) -> Path:
    """`packages` into bench/.venv (created if missing) unless `module` imports there already.

    Returns bench/.venv's python.
    """
    python = BENCH_BIN / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
    if probe.returncode != 0:
        print("bench: installing into bench/.venv:", " ".join(packages), flush=True)
        subprocess.run([str(BENCH_BIN / "pip"), "install", "-q", "--disable-pip-version-check",
                        *packages], check=True,
                       stdout=subprocess.DEVNULL if quiet else None)
    return python


# ---- the machine's limit: nginx --------------------------------------------------------

NGINX_CONF = """\
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            add_header x-worker-pid $pid;
            default_type text/html;
            return 200 "<h1>Hello Python!</h1><p>Hello Cluster!</p>";
        }}
    }}
}}
"""


def nginx_contender(workers: int, port: int) -> Contender | None:
    """nginx, `workers` worker processes answering `return 200` with the hello page.

    Not a peer: no Python, no framework, a C event loop writing a fixed answer. It is
    what this machine can serve with wrk on the same cores, the row the others are read
    against. None when nginx is not installed (`apt-get install nginx-light`).
    """
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if binary is None:
        return None
    prefix = WORK / f"nginx-{port}"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, prefix=prefix, port=port))
    return Contender("nginx", f"nginx, {workers} workers, `return 200` (the machine's limit)",
                     [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                     kind="ceiling", respawns=True)


# ---- the apps suite: real frameworks under every server --------------------------------

APPS = Suite("apps", "uvicorn/fastapi", "hc/fastapi", "hc/fastapi", "nginx")
ASGI_APPS = {"fastapi": "fastapi_app", "starlette": "starlette_app", "django-asgi": "django_asgi"}
WSGI_APPS = {"flask": "flask_app", "flask-sleep": "flask_sleep_app",
             "django-wsgi": "django_wsgi"}
# hello-cluster --wsgi-dispatch loop as well: the Flask view, and the sleeping one that shows
# what the loop costs a view that waits.
LOOP_APPS = ("flask", "flask-sleep")
# And --cpu-affinity always (each worker and its view threads on one CPU from the start;
# the default auto pins only while the traffic is keep-alive) for the same two:
# where the thread hand-off, which pinning makes cheaper, is in every request.
PINNED_APPS = ("flask", "flask-sleep")


def frameworks_env() -> dict[str, str]:
    return {"PYTHONPATH": f"{BENCH}{os.pathsep}{ROOT / 'service'}"}


def apps_contenders(workers: int, threads: int, port_of: dict[str, int],
                    metrics_port_of: dict[str, int]) -> list[Contender]:
    """Every app of peer_frameworks.py under hello-cluster and each installed peer.

    ASGI apps: hello-cluster (its defaults: --http fast, request metrics on), uvicorn,
    granian and gunicorn with uvicorn workers. WSGI apps: hello-cluster --interface wsgi,
    granian --interface wsgi and gunicorn gthread, `threads` per worker each. Then the
    built-in page under hello-cluster and Node's cluster, and nginx as the limit.
    """
    n, t = str(workers), str(threads)
    env = frameworks_env()
    out: list[Contender] = []

    def have(tool: str) -> bool:
        return (BENCH_BIN / tool).exists()

    for app, attr in ASGI_APPS.items():
        target = f"peer_frameworks:{attr}"
        name = f"hc/{app}"
        out.append(Contender(name, f"hello-cluster, {app}",
                             hello_argv(port_of[name], metrics_port_of[name], workers,
                                        ["--app", target, "--request-metrics"]),
                             env=env, kind="subject", notify=True, reload_signal=True))
        if have("uvicorn"):
            name = f"uvicorn/{app}"
            out.append(Contender(name, f"uvicorn --workers {n}, {app}", [
                str(BENCH_BIN / "uvicorn"), target, "--host", "127.0.0.1",
                "--port", str(port_of[name]), "--workers", n, "--loop", "uvloop",
                "--http", "httptools", "--no-access-log", "--no-server-header",
                "--log-level", "warning"], env=env, reload_signal=True))
        if have("granian"):
            name = f"granian/{app}"
            out.append(Contender(name, f"granian --interface asgi, {app}", [
                str(BENCH_BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(port_of[name]), "--workers", n, "--loop", "uvloop", "--no-ws",
                "--respawn-failed-workers", "--log-level", "warning", "--no-access-log",
                target], env=env, reload_signal=True))
        if have("gunicorn"):
            name = f"gunicorn/{app}"
            out.append(Contender(name, f"gunicorn -k uvicorn_worker.UvicornWorker, {app}", [
                str(BENCH_BIN / "gunicorn"), "-k", "uvicorn_worker.UvicornWorker", "-w", n,
                "-b", f"127.0.0.1:{port_of[name]}", "--log-level", "warning", target],
                env=env, reload_signal=True))
    for app, attr in WSGI_APPS.items():
        target = f"peer_frameworks:{attr}"
        ours = ["--app", target, "--interface", "wsgi", "--wsgi-threads", t,
                "--request-metrics"]
        variants = [("hc", "hello-cluster --interface wsgi", ours)]
        if app in LOOP_APPS:
            variants.append(("hc-loop", "hello-cluster --wsgi-dispatch loop",
                             [*ours, "--wsgi-dispatch", "loop"]))
        if app in PINNED_APPS:
            variants.append(("hc-pinned", "hello-cluster --cpu-affinity always",
                             [*ours, "--cpu-affinity", "always"]))
        for server, label, extra in variants:
            name = f"{server}/{app}"
            out.append(Contender(name, f"{label}, {app}",
                                 hello_argv(port_of[name], metrics_port_of[name], workers,
                                            extra),
                                 env=env, kind="subject", notify=True, reload_signal=True))
        if have("granian"):
            name = f"granian/{app}"
            out.append(Contender(name, f"granian --interface wsgi --blocking-threads {t}, {app}",
                                 granian_wsgi_argv(port_of[name], n, t, target), env=env,
                                 reload_signal=True))
        if have("gunicorn"):
            name = f"gunicorn/{app}"
            out.append(Contender(name, f"gunicorn -k gthread --threads {t}, {app}", [
                str(BENCH_BIN / "gunicorn"), "-k", "gthread", "--threads", t, "-w", n,
                "-b", f"127.0.0.1:{port_of[name]}", "--log-level", "warning", target],
                env=env, reload_signal=True))
    name = "hc/hello"
    out.append(Contender(name, "hello-cluster, the built-in page",
                         hello_argv(port_of[name], metrics_port_of[name], workers,
                                    ["--request-metrics"]),
                         kind="subject", notify=True, reload_signal=True))
    node = shutil.which("node")
    if node:
        out.append(Contender("node/hello", "node cluster, the same page",
                             [node, str(BENCH / "node_cluster.js")],
                             env={"WORKERS": n, "PORT": str(port_of["node/hello"]),
                                  "HOST": "127.0.0.1"}))
    nginx = nginx_contender(workers, port_of["nginx"])
    if nginx is not None:
        out.append(nginx)
    return out


APP_NAMES = [f"{server}/{app}" for app in ASGI_APPS
             for server in ("hc", "uvicorn", "granian", "gunicorn")] + \
    [f"{server}/{app}" for app in WSGI_APPS for server in ("hc", "granian", "gunicorn")] + \
    [f"hc-loop/{app}" for app in LOOP_APPS] + [f"hc-pinned/{app}" for app in PINNED_APPS] + \
    ["hc/hello", "node/hello", "nginx"]
