"""Configuration: every option is a flag and a `HELLO_CLUSTER_<NAME>` env var; the flag wins.

The parsers here are pure functions that raise only `ConfigError`, so hypothesis can hammer
them and the CLI can turn any mistake into one line and exit code 2 before anything starts.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import ipaddress
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from hello_cluster import __version__
from hello_cluster.configfile import FileValue, parse_config, read_config
from hello_cluster.errors import EXIT_CODES, ConfigError

ENV_PREFIX = "HELLO_CLUSTER_"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
MAX_WORKERS = 512
DEFAULT_APP = "hello_cluster.app:app"
# A WSGI view holds a thread for its whole request, so the pool is how many views a worker
# runs at once. 32: a view waiting 10 ms (a database call) got 3x the throughput of a2wsgi's
# 10 and 64 added nothing, while an instant view was the same at 1..64 (bench/wsgi_threads.py);
# FastAPI runs sync views in a pool of 40. Lower it if each thread holds a database connection.
DEFAULT_WSGI_THREADS = 32
# A server listens on all interfaces by default (as the issue and every peer do); operators
# narrow it with --bind / --metrics-bind 127.0.0.1:PORT.
ALL_INTERFACES = "0.0.0.0"  # nosec B104


def is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() then refuses."""
    return re.fullmatch(r"[0-9]+", text) is not None


@dataclass(frozen=True)
class BindAddress:
    """One listener: TCP (`host`, `port`) or a unix socket (`path`)."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def _parse_port(text: str, spec: str) -> int:
    if not is_decimal(text):
        raise ConfigError(f"bind address {spec!r}: port {text!r} is not a number; use HOST:PORT")
    port = int(text)
    if port > 65535:
        raise ConfigError(f"bind address {spec!r}: port {port} is above 65535")
    return port


def parse_bind(spec: str) -> BindAddress:
    """Parse `HOST:PORT`, `[IPv6]:PORT`, `:PORT` (all IPv4 interfaces) or `unix:PATH`."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("bind address is empty; use HOST:PORT, [IPv6]:PORT or unix:PATH")
    if spec.startswith("unix:"):
        path = spec[len("unix:") :]
        if not path:
            raise ConfigError(f"bind address {spec!r} has no path; use unix:/run/app.sock")
        if "\0" in path:
            raise ConfigError(f"bind address {spec!r}: the path contains a NUL byte")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ConfigError(
                f"bind address {spec!r}: the path is longer than the kernel's "
                f"{UNIX_PATH_MAX} bytes; use a shorter path"
            )
        return BindAddress(path=path)
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ConfigError(f"bind address {spec!r}: missing ']'; use [IPv6]:PORT")
        host = spec[1:end]
        rest = spec[end + 1 :]
        if not rest.startswith(":") or len(rest) < 2:
            raise ConfigError(f"bind address {spec!r} has no port; use [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bind address {spec!r}: {host!r} is not an IPv6 address") from None
        return BindAddress(host=host, port=_parse_port(rest[1:], spec))
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        raise ConfigError(f"bind address {spec!r} has no port; use HOST:PORT")
    if not port_text:
        raise ConfigError(f"bind address {spec!r} has no port; use HOST:PORT")
    if ":" in host:
        raise ConfigError(f"bind address {spec!r}: put IPv6 addresses in brackets, [::1]:PORT")
    if host == "":
        host = ALL_INTERFACES
    elif not _is_host(host):
        raise ConfigError(f"bind address {spec!r}: {host!r} is not an IP address or host name")
    return BindAddress(host=host, port=_parse_port(port_text, spec))


def _is_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host)) and not host.replace(".", "").isdigit()


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
MAX_DURATION = 7 * 24 * 3600.0


# --gc tuned: the workers' cyclic collector after the app's start (worker/gctune.py). The
# startup heap is frozen and the young generation collected every 7,000 allocations instead
# of 700: the collector's share of a loaded worker's CPU (perf) went from 5.4% to 1.4% on
# Flask and from 4.0% to 0 on FastAPI (docs/benchmarks.md, "What changed for issue 25").
TUNED_GC = (7000, 20, 20)


def gc_thresholds(setting: str) -> tuple[int, int, int] | None:
    """What a parsed --gc setting asks for: thresholds to set (after a freeze), or None."""
    if setting == "tuned":
        return TUNED_GC
    if setting == "python":
        return None
    g0, g1, g2 = (int(part) for part in setting.split(","))
    return (g0, g1, g2)


def parse_gc(text: str) -> str:
    """`tuned`, `python` (the interpreter's own settings) or G0,G1,G2, kept as words so that
    `hello-cluster config` prints what reads back."""
    word = text.strip().lower()
    if word in ("tuned", "python"):
        return word
    parts = [part.strip() for part in word.split(",")]
    if len(parts) != 3 or not all(part.isdecimal() for part in parts):
        raise ConfigError(f"{text!r} is not a collector setting; use tuned, python or three "
                          "thresholds such as 7000,20,20 (see gc.set_threshold)")
    if max(int(part) for part in parts) > 10**9:
        raise ConfigError(f"{text!r}: a threshold above 1000000000 never collects; use 0 to "
                          "turn the collector off")
    return ",".join(str(int(part)) for part in parts)


def parse_duration(text: str) -> float:
    """Seconds from `30`, `30s`, `1.5s`, `500ms`, `2m` or `1h`; at most a week."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a duration; use e.g. 30, 30s, 500ms or 2m")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ConfigError(f"{text!r} is longer than a week")
    return seconds


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgt])(i?)(b?))?\s*$", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}
MAX_SIZE = 1024**5


def parse_size(text: str) -> int:
    """Bytes from `300M`, `1.5G`, `512K`, `300MiB`, `300MB` or plain bytes; `0` means off.

    A bare letter and the IEC spellings are binary (M = MiB), as systemd's MemoryMax= reads
    them; the SI spellings (kB, MB, GB, TB) are decimal, so `300MB` is 300,000,000 bytes and
    never silently a MiB figure.
    """
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a size; use e.g. 300M (MiB), 300MB (10^6), 1.5G "
                          "or 0 (off)")
    number, letter, iec, byte = match.groups()
    base = 1000 if letter and byte and not iec else 1024
    size = float(number) * base ** _POWER[letter.lower()] if letter else float(number)
    if size > MAX_SIZE:
        raise ConfigError(f"{text!r} is larger than 1 PiB")
    return int(size)


def parse_workers(text: str) -> int | None:
    """`auto` (None: decided from the CPUs) or a count from 1 to MAX_WORKERS."""
    text = text.strip()
    if text.lower() == "auto":
        return None
    if not is_decimal(text):
        raise ConfigError(f"{text!r} is not a worker count; use auto or 1..{MAX_WORKERS}")
    count = int(text)
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(f"{count} workers is out of range; use auto or 1..{MAX_WORKERS}")
    return count


def parse_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        text = text.strip()
        if not is_decimal(text):
            raise ConfigError(f"{text!r} is not a whole number from {low} to {high}")
        value = int(text)
        if not low <= value <= high:
            raise ConfigError(f"{value} is out of range; use {low}..{high}")
        return value

    return parse


def parse_float(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{text!r} is not a number from {low} to {high}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"{text!r} is out of range; use {low}..{high}")
        return value

    return parse


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ConfigError(f"{text!r} is not one of {', '.join(choices)}")
        return text.lower()

    return parse


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{text!r} is not a boolean; use true or false")


def parse_app(text: str) -> str:
    """Check the shape of `module:attr`; importing it is the worker's job."""
    module, sep, attr = text.partition(":")
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    if (
        not sep
        or not re.fullmatch(rf"{ident}(\.{ident})*", module)
        or not re.fullmatch(rf"{ident}(\.{ident})*", attr)
    ):
        raise ConfigError(f"{text!r} is not of the form module:attr (e.g. myapp.main:app)")
    return text


def parse_forwarded(text: str) -> tuple[str, ...]:
    """Who may set X-Forwarded-For/-Proto: none, *, or a comma-separated list of IPs/CIDRs."""
    lowered = text.strip().lower()
    if lowered in ("", "none", "off"):
        return ()
    if lowered == "*":
        return ("*",)
    items = tuple(item.strip() for item in text.split(","))
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{item!r} is not an IP address or network; use e.g. "
                              "127.0.0.1,10.0.0.0/8, * or none") from None
    return items


def parse_metrics_bind(text: str) -> BindAddress | None:
    if text.strip().lower() == "off":
        return None
    return parse_bind(text)


def parse_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", text):
        raise ConfigError(f"{text!r} is not a user or group name")
    return text


def parse_path(text: str) -> str:
    if not text or "\0" in text:
        raise ConfigError(f"{text!r} is not a usable path")
    return text


_ROOT_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")


def parse_root_path(text: str) -> str:
    """A URL path prefix the app is mounted under: empty, or `/a/b` (no trailing slash)."""
    text = text.strip()
    if text in ("", "/"):
        return ""
    if not _ROOT_PATH.fullmatch(text):
        raise ConfigError(f"{text!r} is not a URL path prefix; use e.g. /api (a leading "
                          "slash, no trailing one, no spaces)")
    return text


def parse_module(text: str) -> str:
    """A dotted module name (`hooks`, `myapp.hooks`); importing it is the worker's job."""
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    if text.strip().endswith(".py"):  # `hooks.py` would be a module `py` in a package
        raise ConfigError(f"{text!r} is a file name; give the module: "
                          f"{text.strip()[:-3].replace('/', '.')}")
    if not re.fullmatch(rf"{ident}(\.{ident})*", text.strip()):
        raise ConfigError(f"{text!r} is not a module name; use e.g. hooks or myapp.hooks "
                          "(a file hooks.py in --app-dir, without .py)")
    return text.strip()


def parse_glob(text: str) -> str:
    """A file pattern for --reload (`*.py`, `templates/*.html`, `tests`)."""
    text = text.strip()
    if not text or "\0" in text or text.startswith("/"):
        raise ConfigError(f"{text!r} is not a pattern relative to --app-dir; use e.g. *.py, "
                          "*.html or tests")
    return text


def parse_secret(text: str) -> str:
    """Any non-empty text; the error never echoes it (it may be a password)."""
    if not text or "\0" in text:
        raise ConfigError("the value is empty or contains a NUL byte")
    return text


@dataclass(frozen=True)
class Config:
    """Everything the master and workers need, built once and passed down."""

    binds: tuple[BindAddress, ...] = (BindAddress(ALL_INTERFACES, 8085),)
    workers: int | None = None
    reuse_port: str = "auto"
    defer_accept: bool = True
    app: str = DEFAULT_APP
    graceful_timeout: float = 30.0
    shutdown_delay: float = 0.0
    log_level: str = "info"
    log_format: str = "text"
    metrics_bind: BindAddress | None = BindAddress(ALL_INTERFACES, 9464)
    request_metrics: bool = True
    worker_timeout: float = 30.0
    backoff_initial: float = 0.1
    backoff_factor: float = 2.0
    backoff_max: float = 30.0
    backoff_reset_after: float = 10.0
    crash_loop_limit: int = 10
    max_requests: int = 0
    max_requests_jitter: int = 0
    keep_alive_timeout: float = 5.0
    forwarded_allow_ips: tuple[str, ...] = ()
    proxy_protocol: str = "off"  # off, v1, v2 or auto (http/proxyproto.py)
    limit_concurrency: int = 1000
    runtime_dir: str | None = None
    user: str | None = None
    group: str | None = None
    demo_exit_after: float | None = None
    max_worker_memory: int = 0
    max_worker_lifetime: float | None = None
    preload: bool = False
    app_dir: str | None = None  # made absolute once by load_config (default: the cwd)
    factory: bool = False
    interface: str = "auto"
    wsgi_threads: int = DEFAULT_WSGI_THREADS
    wsgi_dispatch: str = "threads"  # or "loop" (http/wsgi.py Responder._run_inline)
    cpu_affinity: str = "auto"  # always, none (system/cpus.py, worker/affinity.py)
    # TLS and the access log (tls.py, accesslog.py)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = field(default=None, repr=False)  # env only
    ssl_keyfile_password_file: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "none"
    ssl_ciphers: str | None = None
    access_log: bool = False
    startup_timeout: float = 60.0
    http: str = "fast"  # the workers' protocol: fastproto.py, or uvicorn's httptools one
    root_path: str = ""  # ASGI root_path, WSGI SCRIPT_NAME
    stall_report_after: float = 1.0  # 0: off (worker/stalls.py)
    gc: str = "tuned"  # tuned, python or G0,G1,G2 (worker/gctune.py)
    request_timeout: float | None = None  # None or 0: off (http/deadline.py)
    config: str | None = None  # --config FILE, already applied: kept for `hello-cluster config`
    hooks: str | None = None  # --hooks MODULE (worker/hooks.py)
    reload: bool = False  # --reload: the watcher process (supervisor/reloader.py)
    reload_include: tuple[str, ...] = ("*.py",)
    reload_exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Option:
    """One option: its flag, parser, default and help. The env name derives from the flag."""

    name: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    metavar: str = "VALUE"
    repeat: bool = False
    env_only: bool = False  # refused as a flag, so --help does not offer it
    # docs/configuration.md's row is generated from here (tools/gen_config_docs.py, `make
    # docs`), so a default is written once: `doc` is the row's Markdown meaning (else `help`),
    # `doc_default` its default where the raw value needs words (else `default`, or unset).
    doc: str = ""
    doc_default: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("bind", parse_bind, "0.0.0.0:8085",
           "app listener: HOST:PORT, [IPv6]:PORT or unix:PATH; repeat for several "
           "(env: comma-separated); ignored under socket activation", "ADDR", repeat=True,
           doc="app listeners: `HOST:PORT`, `[IPv6]:PORT`, `unix:PATH`; ignored under socket "
           "activation"),
    Option("workers", parse_workers, "auto",
           "worker processes: a count, or auto = usable CPUs after affinity and cgroup quota",
           "N|auto",
           doc="`auto` = CPUs usable by affinity, reduced by a cgroup CPU quota (v1 or v2), "
           "rounded up, at least 1"),
    Option("cpu-affinity", parse_choice("auto", "always", "none"), "auto",
           "auto: a threaded WSGI worker is pinned to one CPU while its traffic is "
           "keep-alive; always: every worker pinned at start; none: the kernel moves "
           "workers (pinning needs the workers to divide evenly over the usable CPUs, with "
           "no cgroup quota sharing them)", "auto|always|none",
           doc="`auto`: a worker serving a WSGI app through its thread pool starts pinned (its "
           "loop and view threads) to its slot's CPU, unpins once its requests no longer "
           "outnumber its new connections 2 to 1 over 0.3 s, and pins again at 4 to 1; "
           "`always`: every worker is pinned at "
           "start, whatever its app and traffic; `none`: the kernel moves workers. Pinning "
           "is planned only when the workers divide evenly over the CPUs usable by affinity "
           "and no cgroup CPU quota is tighter than those CPUs (then they are shared); the "
           "master logs the plan and each worker when it pins or unpins (see [CPU "
           "affinity](how-it-works.md#cpu-affinity))"),
    Option("defer-accept", parse_bool, "true",
           "hand a new TCP connection to a worker with its first bytes (TCP_DEFER_ACCEPT, "
           "after 1 s of silence at the latest)", "BOOL",
           doc="a TCP `--bind` hands a new connection to a worker with its first bytes "
           "(`TCP_DEFER_ACCEPT`, nginx's `deferred`): one wake-up per connection instead of "
           "two, and a connection that sends nothing waits in the kernel, not in a worker, "
           "for up to 1 s; under socket activation the `.socket` unit's `DeferAcceptSec=` "
           "decides (see [Limits](limits-and-security.md#limits))"),
    Option("reuse-port", parse_choice("auto", "on", "off"), "auto",
           "auto/on: a TCP --bind becomes one SO_REUSEPORT socket per worker, steered to the "
           "ready workers (auto falls back to a shared socket if the kernel refuses); off: "
           "one socket shared by all workers", "auto|on|off",
           doc="a TCP `--bind` becomes one `SO_REUSEPORT` socket per worker, steered to the ready "
           "workers (see [How connections reach the "
           "workers](how-it-works.md#how-connections-reach-the-workers)); `auto` falls back to "
           "one shared socket if the kernel refuses, `on` exits 3 instead; `off` always shares "
           "one socket"),
    Option("app", parse_app, DEFAULT_APP, "the ASGI application to serve", "MODULE:ATTR",
           doc="the application, ASGI 3 or WSGI (see `--interface`), imported from `--app-dir` or "
           "`PYTHONPATH`"),
    Option("graceful-timeout", parse_duration, "30s",
           "how long a stopping worker may finish in-flight requests before it is killed",
           "DURATION",
           doc="how long a stopping worker may finish in-flight requests"),
    Option("shutdown-delay", parse_duration, "0s",
           "after SIGTERM, keep serving this long with /readyz at 503 (for load balancers)",
           "DURATION",
           doc="after SIGTERM keep serving this long with `/readyz` at 503 (load balancers)"),
    Option("log-level", parse_choice("debug", "info", "warning", "error"), "info",
           "debug, info, warning or error", "LEVEL",
           doc="`debug`, `info`, `warning`, `error`"),
    Option("log-format", parse_choice("text", "json"), "text", "text or json (one object a line)",
           "FORMAT",
           doc="`text` or `json` (one object a line)"),
    Option("metrics-bind", parse_metrics_bind, "0.0.0.0:9464",
           "the master's /metrics, /livez and /readyz listener, or off", "ADDR|off",
           doc="the master's `/metrics`, `/livez`, `/readyz` listener"),
    Option("request-metrics", parse_bool, "true",
           "per-request HTTP metrics in workers (--no-request-metrics turns them off)", "BOOL",
           doc="per-request metrics in workers"),
    Option("worker-timeout", parse_duration, "30s",
           "a worker whose event loop is silent this long is killed and respawned", "DURATION",
           doc="silence after which a worker counts as hung (at least 1s)"),
    Option("backoff-initial", parse_duration, "100ms",
           "delay before the second consecutive respawn of a failing worker slot", "DURATION",
           doc="first backoff ceiling"),
    Option("backoff-factor", parse_float(1.0, 100.0), "2", "growth of the respawn delay", "X",
           doc="growth of the ceiling"),
    Option("backoff-max", parse_duration, "30s", "cap on the respawn delay", "DURATION",
           doc="cap of the ceiling"),
    Option("backoff-reset-after", parse_duration, "10s",
           "a worker ready this long makes its slot healthy again", "DURATION",
           doc="ready this long = the slot is healthy again"),
    Option("crash-loop-limit", parse_int(1, 100000), "10",
           "consecutive boot deaths (never ready) after which the master gives up", "N",
           doc="boot deaths in a row before giving up"),
    Option("max-requests", parse_int(0, 10**9), "0",
           "recycle a worker after this many requests (0 = never)", "N",
           doc="recycle a worker after N requests (replacement ready first)",
           doc_default="`0` (off)"),
    Option("max-requests-jitter", parse_int(0, 10**9), "0",
           "add up to this many requests at random to --max-requests per worker", "N",
           doc="plus up to N, per worker"),
    Option("keep-alive-timeout", parse_duration, "5s",
           "close idle keep-alive connections after this long", "DURATION",
           doc="idle keep-alive connections close after this"),
    Option("forwarded-allow-ips", parse_forwarded, "none",
           "proxies trusted to set X-Forwarded-For/-Proto (the app then sees the client's "
           "address and scheme): none, *, or IPs/CIDRs, comma-separated", "IPS|*|none",
           doc="proxies (IPs or CIDRs, comma-separated, or `*`) trusted to set `X-Forwarded-For` "
           "/ `X-Forwarded-Proto`; the app then sees the client's address and scheme. Off by "
           "default: which proxy to believe is a deployment decision (uvicorn and gunicorn trust "
           "127.0.0.1 unless told otherwise), and the check costs 0.65 us per request when on "
           "(`bench/micro_metrics.py`)"),
    Option("proxy-protocol", parse_choice("off", "v1", "v2", "auto"), "off",
           "read HAProxy's PROXY header (v1, v2, or auto: either) that a TCP load balancer "
           "sends first, from peers in --forwarded-allow-ips only; the client address it "
           "carries goes to the app and the access log", "off|v1|v2|auto",
           doc="read HAProxy's PROXY header (`v1` text, `v2` binary, `auto` either) that a TCP "
           "load balancer (AWS NLB, HAProxy `mode tcp`) sends first: the address it carries "
           "becomes the app's `client` and the access log's. Read only from peers in "
           "`--forwarded-allow-ips`, and required from them (a malformed or missing header "
           "closes the connection); any other peer's bytes are HTTP. Plain ports only; see "
           "[Behind a TCP load balancer](limits-and-security.md#behind-a-tcp-load-balancer)"),
    Option("limit-concurrency", parse_int(1, 1_000_000), "1000",
           "connections per worker (at most the open-file limit minus 64); at the limit idle "
           "ones are closed, oldest first, and a request gets 503 only when all are busy", "N",
           doc="connections per worker (at most the open-file limit minus 64); at the limit idle "
           "connections are closed, oldest first, and a request gets 503 only when all have one "
           "in flight (see [Limits](limits-and-security.md#limits))"),
    Option("runtime-dir", parse_path, None,
           "where runtime files go (default: $RUNTIME_DIRECTORY, else a private temp dir)",
           "DIR",
           doc="where the metric files go (the only thing written)",
           doc_default="`$RUNTIME_DIRECTORY`, else a private temp dir"),
    Option("user", parse_name, None, "when started as root, workers run as this user", "USER",
           doc="started as root: workers drop to this user after the master bound"),
    Option("group", parse_name, None, "when started as root, workers run as this group",
           "GROUP",
           doc="started as root: workers drop to this group after the master bound"),
    Option("demo-exit-after", parse_duration, None,
           "demo: each worker exits with status 1 this long after serving a request",
           "DURATION"),
    Option("max-worker-memory", parse_size, "0",
           "recycle a worker whose own memory (USS) stays over this, e.g. 300M or 1G; the "
           "replacement is ready first, one at a time (0 = off)", "SIZE",
           doc="recycle a worker whose own memory (USS) stays over this for 3 one-second samples: "
           "`300M`, `1.5G`, `300MiB` (binary, as systemd's `MemoryMax=`) or `300MB` (SI: "
           "300,000,000 bytes); see [Memory](how-it-works.md#memory-recycling-and---preload)",
           doc_default="`0` (off)"),
    Option("max-worker-lifetime", parse_duration, None,
           "recycle a worker after this age, staggered over the pool, e.g. 12h (unset = off)",
           "DURATION",
           doc="recycle a worker after this age (`12h`), paced so that two slots never recycle "
           "together",
           doc_default="unset (off)"),
    Option("preload", parse_bool, "false",
           "import the app once in a template process and fork workers from it, sharing its "
           "memory copy-on-write; a reload starts a new template (new code)", "BOOL",
           doc="import the app once in a template process and fork the workers from it (memory "
           "shared copy-on-write); a reload starts a new template, so new code loads"),
    Option("app-dir", parse_path, None,
           "directory put first on sys.path before the app is imported (default: the working "
           "directory at start)", "DIR",
           doc="put first on `sys.path` before the app is imported (made absolute once, at start)",
           doc_default="the working directory at start"),
    Option("factory", parse_bool, "false",
           "--app names a zero-argument callable that returns the app", "BOOL",
           doc="`--app` names a zero-argument callable that returns the app"),
    Option("interface", parse_choice("auto", "asgi", "wsgi"), "auto",
           "what the app speaks: auto tells ASGI 3 from WSGI by its call signature",
           "auto|asgi|wsgi",
           doc="what the app speaks; `auto` decides from the callable and logs what it chose"),
    Option("wsgi-threads", parse_int(1, 1000), str(DEFAULT_WSGI_THREADS),
           "threads per worker that run WSGI views (the most WSGI requests a worker serves "
           "at once)", "N",
           doc="threads per worker that run WSGI views: the most WSGI requests a worker serves at "
           "once"),
    Option("wsgi-dispatch", parse_choice("threads", "loop"), "threads",
           "where WSGI views run: threads (a view that blocks holds a thread, never the "
           "worker) or loop (views without a request body run on the event loop, as a "
           "gunicorn sync worker runs them: faster for views that never block)",
           "threads|loop",
           doc="where WSGI views run: `threads` (the pool of `--wsgi-threads`; a view that "
           "blocks holds a thread, never the worker's loop); `loop` runs a view without a "
           "request body on the event loop itself, as a gunicorn sync worker would: no thread "
           "hand-off, so faster for views that never block, but a view that waits stops "
           "its worker (requests with a body, and the rest of a long stream, still go to "
           "the threads; `--request-timeout` sends every view to the threads) (see "
           "[WSGI dispatch](benchmarks.md#what-changed-for-issue-25-measured-before-and-after))"),
    # TLS with uvicorn's flag names (tls.py); workers load the files at start, so a SIGHUP
    # reload rotates the certificate.
    Option("ssl-certfile", parse_path, None,
           "serve HTTPS: the PEM certificate (chain) for the app listeners", "PATH",
           doc="serve HTTPS on the app listeners with this PEM certificate (chain); see "
           "[TLS](tls.md#tls)"),
    Option("ssl-keyfile", parse_path, None,
           "its PEM private key (default: in --ssl-certfile)", "PATH",
           doc="its PEM private key",
           doc_default="in the certfile"),
    Option("ssl-keyfile-password", parse_secret, None,
           "the key's password: environment only (a flag shows in ps); or use "
           "--ssl-keyfile-password-file", "PASSWORD", env_only=True,
           doc="the key's password; the flag `--ssl-keyfile-password` is refused (exit 2): argv "
           "is visible to every local user"),
    Option("ssl-keyfile-password-file", parse_path, None,
           "a file holding the key's password (systemd credential, Kubernetes Secret)",
           "PATH",
           doc="read the key's password from this file (a trailing newline is ignored); re-read "
           "by every new worker"),
    Option("ssl-ca-certs", parse_path, None,
           "PEM CA certificates that client certificates must chain to", "PATH"),
    Option("ssl-cert-reqs", parse_choice("none", "optional", "required"), "none",
           "client certificates: none, optional, or required (mTLS; needs --ssl-ca-certs)",
           "none|optional|required",
           doc="client certificates (mTLS); `optional` and `required` need `--ssl-ca-certs`"),
    Option("ssl-ciphers", parse_secret, None,
           "OpenSSL cipher string for TLS 1.2 and below (default: Python's)", "CIPHERS",
           doc="OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are not affected)",
           doc_default="Python's defaults"),
    Option("access-log", parse_bool, "false",
           "one log line per request, written by the worker that served it", "BOOL",
           doc="one log line per request, from the worker that served it; see [Access "
           "log](tls.md#access-log)"),
    Option("startup-timeout", parse_duration, "60s",
           "a worker not ready this long after its fork (app import, lifespan startup) is "
           "killed and counts as a boot failure", "DURATION",
           doc="a worker not ready this long after its fork is killed and counts as a boot "
           "failure (at least 1s). Until READY a worker has no event loop turning to beat from "
           "(it is importing the app, or in its lifespan startup), so `--worker-timeout` applies "
           "only once it serves; with `--preload`, a template that has not imported the app by "
           "then fails the start (exit 4) or the reload"),
    Option("http", parse_choice("fast", "uvicorn"), "fast",
           "the workers' HTTP/1.1 protocol: fast (ours, on httptools) or uvicorn "
           "(uvicorn's httptools protocol)", "fast|uvicorn",
           doc="the workers' HTTP/1.1 protocol: `fast` is ours on httptools "
           "(`http/fastproto.py`), `uvicorn` is uvicorn's httptools protocol; same answers, "
           "limits and drain (see [The fast "
           "protocol](benchmarks.md#the-fast-protocol---http-fast))"),
    Option("root-path", parse_root_path, "",
           "the URL prefix the app is mounted under behind a proxy that strips it (e.g. /api): "
           "ASGI root_path, WSGI SCRIPT_NAME", "PATH",
           doc="the URL prefix the app is mounted under behind a proxy that strips it (`/api`): "
           "ASGI apps see `root_path` (and, as under uvicorn, `path` with the prefix in front), "
           "WSGI apps `SCRIPT_NAME=/api` and `PATH_INFO` below it; both protocols"),
    Option("stall-report-after", parse_duration, "1s",
           "a worker's event loop blocked this long logs the app's line it is blocked in, "
           "and how long the stall lasted when it ends (0 = off)", "DURATION"),
    Option("gc", parse_gc, "tuned",
           "each worker's cyclic garbage collector once the app has started: tuned (freeze "
           "the startup heap, collect the young generation every 7000 allocations), python "
           "(the interpreter's own settings) or G0,G1,G2 thresholds", "tuned|python|G0,G1,G2",
           doc="each worker's cyclic garbage collector once the app has started: `tuned` "
           "freezes the startup heap (`gc.freeze()`) and sets the thresholds to 7000,20,20; "
           "`python` leaves the interpreter's own (700,10,10, nothing frozen); three numbers "
           "freeze and set those thresholds (0 turns the collector off) (see [The cyclic "
           "collector](benchmarks.md#what-changed-for-issue-25-measured-before-and-after))"),
    Option("request-timeout", parse_duration, None,
           "cancel an HTTP request still running after this long: 504 if no response began, "
           "else the connection is closed; WSGI views get the 504 and run on (unset = off)",
           "DURATION"),
    Option("config", parse_path, None,
           "read settings from this TOML file, keys the long option names (workers = 4, "
           "bind = [\"0.0.0.0:8085\"]); flags and env vars override it", "FILE",
           doc="read settings from a TOML file keyed by the long option names (`workers = 4`, "
           "`bind = [\"0.0.0.0:8085\"]`); flags and env vars override it; `hello-cluster config` "
           "prints the effective settings and their sources "
           "([docs/config-file.md](../docs/config-file.md))"),
    Option("hooks", parse_module, None,
           "a module in --app-dir whose post_fork(info), worker_ready(info) and "
           "worker_exit(info) each worker calls (never the master); one that raises fails "
           "the start (exit 4) or the reload", "MODULE",
           doc="a module in `--app-dir` whose `post_fork(info)`, `worker_ready(info)` and "
           "`worker_exit(info)` each worker calls (never the master); one that raises fails the "
           "start (exit 4) or the reload; see [Worker hooks](apps.md#worker-hooks---hooks)"),
    Option("reload", parse_bool, "false",
           "development: a watcher process sends the master SIGHUP (a rolling reload) when a "
           "file under --app-dir matching --reload-include changes", "BOOL",
           doc="development: a watcher process sends the master `SIGHUP` (a rolling reload) when "
           "a watched file under `--app-dir` changes; a syntax error is said once and the "
           "workers serve on; see [Reloading on code "
           "changes](apps.md#reloading-on-code-changes---reload)"),
    Option("reload-include", parse_glob, "*.py",
           "with --reload: the files whose change reloads; repeat for several (env: "
           "comma-separated); giving it replaces the default", "GLOB", repeat=True),
    Option("reload-exclude", parse_glob, None,
           "with --reload: files or directories never watched, e.g. tests or '*_test.py'; "
           "repeat for several", "GLOB", repeat=True),
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes on one line, exit code 2, like every other config error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see hello-cluster --help")


def protocol_build() -> str:
    """Whether `--http fast` runs compiled (setup.py builds http/fastproto.py with mypyc)
    or from source, as `--version` tells it: found, not imported (the wire layer is above
    this one, and uvicorn need not load for --version)."""
    spec = importlib.util.find_spec("hello_cluster.http.fastproto")
    origin = spec.origin if spec is not None else None
    if origin is not None and not origin.endswith(".py"):
        return "HTTP protocol compiled with mypyc"
    return "HTTP protocol in pure Python"


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    parser = _Parser(
        allow_abbrev=False,  # `--v` must not mean --version (nor a later option's prefix)
        prog="hello-cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A lean master forks ASGI workers that share one listening socket, "
        "respawns them with backoff, talks to systemd and serves /metrics, /livez, /readyz.",
        epilog="Every option can also be set by its env var; the flag wins.\n\n"
        "signals: TERM/INT graceful stop, QUIT immediate stop, HUP rolling reload,\n"
        "         TTIN one worker more, TTOU one worker fewer\n\nexit codes:\n" + codes
        + "\n\nhello-cluster status [--json] [--watch]: the workers of a running master "
        "(like pm2 ls)\nhello-cluster dump [--runtime-dir DIR] [--slot N] [--json]: every "
        "live worker's stacks and asyncio tasks",
    )
    parser.add_argument("--version", action="version",
                        version=f"hello-cluster {__version__} ({protocol_build()})")
    for opt in OPTIONS:
        shown = f"(env {opt.env}; default {opt.default or 'unset'})"
        if opt.parse is parse_bool:
            parser.add_argument(opt.flag, dest=opt.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{opt.help} {shown}")
        elif opt.repeat:
            parser.add_argument(opt.flag, dest=opt.dest, action="append", metavar=opt.metavar,
                                help=f"{opt.help} {shown}")
        else:
            # An env-only option is still parsed as a flag, to refuse it with the reason.
            parser.add_argument(opt.flag, dest=opt.dest, metavar=opt.metavar,
                                help=argparse.SUPPRESS if opt.env_only else f"{opt.help} {shown}")
    return parser


def _resolve(opt: Option, flag_value: Any, env: Mapping[str, str],
             file_values: Mapping[str, FileValue] | None = None, file_path: str = ""
             ) -> tuple[Any, str]:
    """Flag, else env, else the config file, else default: the parsed value and where it
    came from, naming that source in any error."""
    file_values = file_values or {}
    if opt.env in env and flag_value is not None:
        _resolve(opt, None, env)  # a bad env value is an error even where a flag overrides it
    if flag_value is not None:
        source, raw = opt.flag, flag_value
    elif opt.env in env:
        source, raw = opt.env, env[opt.env]
        if opt.repeat:
            raw = [part for part in raw.split(",")]
    elif opt.name in file_values:
        source, raw = f"--config {file_path}: {opt.name}", file_values[opt.name]
    else:
        source, raw = f"{opt.flag} default", opt.default
        if raw is None:
            return None, "unset"
        if opt.repeat:
            raw = [raw]
    if isinstance(raw, bool):
        return raw, source
    try:
        if opt.repeat:
            return tuple(opt.parse(item) for item in raw), source
        return opt.parse(raw), source
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _file_values(path: str | None) -> dict[str, FileValue]:
    if path is None:
        return {}
    return parse_config(
        read_config(path), path, [o.name for o in OPTIONS if o.name != "config"],
        frozenset(o.name for o in OPTIONS if o.repeat),
        frozenset(o.name for o in OPTIONS if o.parse is parse_bool),
        {o.name: f"not in a file, which others may read; use {o.env} or its -file option"
         for o in OPTIONS if o.env_only})


def check_env_names(env: Mapping[str, str]) -> None:
    """A misspelt HELLO_CLUSTER_ variable would be silently ignored: refuse it instead."""
    known = {opt.env for opt in OPTIONS}
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see hello-cluster --help"
            raise ConfigError(f"unknown environment variable {name}{hint}")


def resolve_app_dir(app_dir: str | None) -> str:
    """--app-dir made absolute once, in the master: the default is the working directory."""
    try:
        path = os.path.abspath(app_dir or os.getcwd())
    except OSError as err:  # the working directory was removed under us
        raise ConfigError(f"--app-dir: the working directory is gone ({err.strerror}); "
                          "cd to the app's directory or set --app-dir") from None
    if not os.path.isdir(path):
        raise ConfigError(f"--app-dir {app_dir}: not a directory; point it at the directory "
                          "that holds the app's module")
    return path


def resolve_all(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
                ) -> tuple[argparse.Namespace, dict[str, tuple[Any, str]]]:
    """Every option's value and its source (flag, env, config file or default)."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    check_env_names(env)
    config_opt = next(o for o in OPTIONS if o.name == "config")
    config_path, _ = _resolve(config_opt, args.config, env)
    file_values = _file_values(config_path)
    return args, {opt.dest: _resolve(opt, getattr(args, opt.dest), env, file_values,
                                     config_path or "")
                  for opt in OPTIONS}


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from argv, env and --config, or raise ConfigError (one line)."""
    return _load(argv, env)[0]


def _load(argv: Sequence[str] | None, env: Mapping[str, str] | None
          ) -> tuple[Config, dict[str, tuple[Any, str]]]:
    """The Config and every option's (value, source): the file is read once for both."""
    args, resolved = resolve_all(argv, env)
    values = {dest: value for dest, (value, _) in resolved.items()}
    try:
        return _checked(args, values), resolved
    except ConfigError as err:
        # A cross-option check names flags; say so when a named one came from the file.
        named = re.findall(r"--([a-z-]+)", str(err))
        sources = [resolved[n.replace("-", "_")][1] for n in named
                   if n.replace("-", "_") in resolved]
        from_file = next((s for s in sources if s.startswith("--config ")), None)
        if from_file is not None and not str(err).startswith("--config "):
            raise ConfigError(f"{from_file.split(': ')[0]}: {err}") from None
        raise


def _checked(args: argparse.Namespace, values: dict[str, Any]) -> Config:
    """The checks that involve more than one option, on the parsed values."""
    binds = values.pop("bind")
    if len(set(binds)) != len(binds):
        raise ConfigError("--bind: the same address is given twice")
    if values["metrics_bind"] is not None and values["metrics_bind"] in binds:
        raise ConfigError("--metrics-bind: the metrics listener must differ from --bind")
    if values["backoff_initial"] > values["backoff_max"]:
        raise ConfigError("--backoff-initial is larger than --backoff-max")
    if values["worker_timeout"] < 1.0:
        raise ConfigError("--worker-timeout: use at least 1s")
    if values["startup_timeout"] < 1.0:
        raise ConfigError("--startup-timeout: use at least 1s")
    if values["max_requests_jitter"] and not values["max_requests"]:
        raise ConfigError("--max-requests-jitter needs --max-requests")
    values["app_dir"] = resolve_app_dir(values["app_dir"])
    values["reload_exclude"] = values["reload_exclude"] or ()
    if not values["reload"] and (values["reload_exclude"]
                                 or values["reload_include"] != ("*.py",)):
        raise ConfigError("--reload-include/--reload-exclude need --reload")
    if values["reload"] and importlib.util.find_spec("watchfiles") is None:
        raise ConfigError("--reload needs the watchfiles package: pip install watchfiles "
                          "(a dependency of hello-cluster: reinstall it)")
    if values["proxy_protocol"] != "off":
        if not values["forwarded_allow_ips"]:
            raise ConfigError("--proxy-protocol needs --forwarded-allow-ips: the load balancers' "
                              "addresses (only they may say who the client is)")
        if values["ssl_certfile"]:
            raise ConfigError("--proxy-protocol is for plain ports: with TLS here the header "
                              "would come before the handshake; terminate TLS at the balancer "
                              "or drop --proxy-protocol")
    if args.ssl_keyfile_password is not None:
        raise ConfigError("--ssl-keyfile-password: a password on the command line is visible "
                          "to every user (ps, /proc/PID/cmdline); use --ssl-keyfile-password-"
                          "file PATH or HELLO_CLUSTER_SSL_KEYFILE_PASSWORD")
    return Config(binds=binds, **values)


def describe(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """`hello-cluster config`: the effective settings as TOML, each line saying its source.

    Parsed values are shown (durations in seconds, sizes in bytes), so what is printed is
    what the master will use; a secret is only said to be set.
    """
    cfg, resolved = _load(argv, env)  # every check of a start: print nothing that would not run
    if resolved["app_dir"][0] is None:
        resolved["app_dir"] = (cfg.app_dir, "the working directory at start")
    lines = []
    for opt in OPTIONS:
        value, source = resolved[opt.dest]
        if opt.name == "config":  # as a comment: a config file cannot name another
            lines.append(f"# config = {_toml(value) if value else '(none)'}  # {source}")
        elif value is None:
            lines.append(f"# {opt.name} = (unset)")
        elif opt.env_only or opt.parse is parse_secret:
            lines.append(f"# {opt.name} = (set, not shown)  # {source}")
        else:
            lines.append(f"{opt.name} = {_toml(value)}  # {source}")
    return lines


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))

