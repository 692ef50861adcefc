"""Configuration: every option is a flag and a `HELLO_CLUSTER_<NAME>` env var; the flag wins.

The parsers here are pure functions that raise only `ConfigError`, so hypothesis can hammer
them and the CLI can turn any mistake into one line and exit code 2 before anything starts.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from hello_cluster import __version__
from hello_cluster.errors import EXIT_CODES, ConfigError

ENV_PREFIX = "HELLO_CLUSTER_"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
MAX_WORKERS = 512
DEFAULT_APP = "hello_cluster.app:app"
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


def parse_duration(text: str) -> float:
    """Seconds from `30`, `30s`, `1.5s`, `500ms`, `2m` or `1h`; at most a week."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a duration; use e.g. 30, 30s, 500ms or 2m")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ConfigError(f"{text!r} is longer than a week")
    return seconds


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


@dataclass(frozen=True)
class Config:
    """Everything the master and workers need, built once and passed down."""

    binds: tuple[BindAddress, ...] = (BindAddress(ALL_INTERFACES, 8085),)
    workers: int | None = None
    reuse_port: str = "auto"
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
    limit_concurrency: int = 1000
    runtime_dir: str | None = None
    user: str | None = None
    group: str | None = None
    demo_exit_after: float | None = None
    http: str = "fast"  # the workers' protocol: fastproto.py, or uvicorn's httptools one


@dataclass(frozen=True)
class Option:
    """One option: its flag, parser, default and help. The env name derives from the flag."""

    name: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    metavar: str = "VALUE"
    repeat: bool = False

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
           "(env: comma-separated); ignored under socket activation", "ADDR", repeat=True),
    Option("workers", parse_workers, "auto",
           "worker processes: a count, or auto = usable CPUs after affinity and cgroup quota",
           "N|auto"),
    Option("reuse-port", parse_choice("auto", "on", "off"), "auto",
           "auto/on: a TCP --bind becomes one SO_REUSEPORT socket per worker, steered to the "
           "ready workers (auto falls back to a shared socket if the kernel refuses); off: "
           "one socket shared by all workers", "auto|on|off"),
    Option("app", parse_app, DEFAULT_APP, "the ASGI application to serve", "MODULE:ATTR"),
    Option("graceful-timeout", parse_duration, "30s",
           "how long a stopping worker may finish in-flight requests before it is killed",
           "DURATION"),
    Option("shutdown-delay", parse_duration, "0s",
           "after SIGTERM, keep serving this long with /readyz at 503 (for load balancers)",
           "DURATION"),
    Option("log-level", parse_choice("debug", "info", "warning", "error"), "info",
           "debug, info, warning or error", "LEVEL"),
    Option("log-format", parse_choice("text", "json"), "text", "text or json (one object a line)",
           "FORMAT"),
    Option("metrics-bind", parse_metrics_bind, "0.0.0.0:9464",
           "the master's /metrics, /livez and /readyz listener, or off", "ADDR|off"),
    Option("request-metrics", parse_bool, "true",
           "per-request HTTP metrics in workers (--no-request-metrics turns them off)", "BOOL"),
    Option("worker-timeout", parse_duration, "30s",
           "a worker whose event loop is silent this long is killed and respawned", "DURATION"),
    Option("backoff-initial", parse_duration, "100ms",
           "delay before the second consecutive respawn of a failing worker slot", "DURATION"),
    Option("backoff-factor", parse_float(1.0, 100.0), "2", "growth of the respawn delay", "X"),
    Option("backoff-max", parse_duration, "30s", "cap on the respawn delay", "DURATION"),
    Option("backoff-reset-after", parse_duration, "10s",
           "a worker ready this long makes its slot healthy again", "DURATION"),
    Option("crash-loop-limit", parse_int(1, 100000), "10",
           "consecutive boot deaths (never ready) after which the master gives up", "N"),
    Option("max-requests", parse_int(0, 10**9), "0",
           "recycle a worker after this many requests (0 = never)", "N"),
    Option("max-requests-jitter", parse_int(0, 10**9), "0",
           "add up to this many requests at random to --max-requests per worker", "N"),
    Option("keep-alive-timeout", parse_duration, "5s",
           "close idle keep-alive connections after this long", "DURATION"),
    Option("forwarded-allow-ips", parse_forwarded, "none",
           "proxies trusted to set X-Forwarded-For/-Proto (the app then sees the client's "
           "address and scheme): none, *, or IPs/CIDRs, comma-separated", "IPS|*|none"),
    Option("limit-concurrency", parse_int(1, 1_000_000), "1000",
           "connections per worker (at most the open-file limit minus 64); at the limit idle "
           "ones are closed, oldest first, and a request gets 503 only when all are busy", "N"),
    Option("runtime-dir", parse_path, None,
           "where runtime files go (default: $RUNTIME_DIRECTORY, else a private temp dir)",
           "DIR"),
    Option("user", parse_name, None, "when started as root, workers run as this user", "USER"),
    Option("group", parse_name, None, "when started as root, workers run as this group",
           "GROUP"),
    Option("demo-exit-after", parse_duration, None,
           "demo: each worker exits with status 1 this long after serving a request",
           "DURATION"),
    Option("http", parse_choice("fast", "uvicorn"), "fast",
           "the workers' HTTP/1.1 protocol: fast (ours, on httptools) or uvicorn "
           "(uvicorn's httptools protocol)", "fast|uvicorn"),
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes on one line, exit code 2, like every other config error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see hello-cluster --help")


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    parser = _Parser(
        prog="hello-cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A lean master forks ASGI workers that share one listening socket, "
        "respawns them with backoff, talks to systemd and serves /metrics, /livez, /readyz.",
        epilog="Every option can also be set by its env var; the flag wins.\n\n"
        "signals: TERM/INT graceful stop, QUIT immediate stop, HUP rolling reload,\n"
        "         TTIN one worker more, TTOU one worker fewer\n\nexit codes:\n" + codes,
    )
    parser.add_argument("--version", action="version", version=f"hello-cluster {__version__}")
    for opt in OPTIONS:
        shown = f"(env {opt.env}; default {opt.default or 'unset'})"
        if opt.parse is parse_bool:
            parser.add_argument(opt.flag, dest=opt.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{opt.help} {shown}")
        elif opt.repeat:
            parser.add_argument(opt.flag, dest=opt.dest, action="append", metavar=opt.metavar,
                                help=f"{opt.help} {shown}")
        else:
            parser.add_argument(opt.flag, dest=opt.dest, metavar=opt.metavar,
                                help=f"{opt.help} {shown}")
    return parser


def _resolve(opt: Option, flag_value: Any, env: Mapping[str, str]) -> Any:
    """Flag, else env, else default; parse it and name the source in any error."""
    if opt.env in env and flag_value is not None:
        _resolve(opt, None, env)  # a bad env value is an error even where a flag overrides it
    if flag_value is not None:
        source, raw = opt.flag, flag_value
    elif opt.env in env:
        source, raw = opt.env, env[opt.env]
        if opt.repeat:
            raw = [part for part in raw.split(",")]
    else:
        source, raw = f"{opt.flag} default", opt.default
        if raw is None:
            return None
        if opt.repeat:
            raw = [raw]
    if isinstance(raw, bool):
        return raw
    try:
        if opt.repeat:
            return tuple(opt.parse(item) for item in raw)
        return opt.parse(raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def check_env_names(env: Mapping[str, str]) -> None:
    """A misspelt HELLO_CLUSTER_ variable would be silently ignored: refuse it instead."""
    known = {opt.env for opt in OPTIONS}
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see hello-cluster --help"
            raise ConfigError(f"unknown environment variable {name}{hint}")


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from argv and env, or raise ConfigError with a one-line message."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    check_env_names(env)
    values = {opt.dest: _resolve(opt, getattr(args, opt.dest), env) for opt in OPTIONS}
    binds = values.pop("bind")
    if len(set(binds)) != len(binds):
        raise ConfigError("--bind: the same address is given twice")
    if values["metrics_bind"] is not None and values["metrics_bind"] in binds:
        raise ConfigError("--metrics-bind: the metrics listener must differ from --bind")
    if values["backoff_initial"] > values["backoff_max"]:
        raise ConfigError("--backoff-initial is larger than --backoff-max")
    if values["worker_timeout"] < 1.0:
        raise ConfigError("--worker-timeout: use at least 1s")
    if values["max_requests_jitter"] and not values["max_requests"]:
        raise ConfigError("--max-requests-jitter needs --max-requests")
    return Config(binds=binds, **values)
