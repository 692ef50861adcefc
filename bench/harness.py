"""Process, socket and load-generator plumbing the benchmark steps are made of.

Every process is started in its own session (so its process group holds the supervisor
and all its workers) and killed as a group; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
PID_RE = re.compile(rb"\r\nx-worker-pid:\s*(\d+)", re.IGNORECASE)


_GIVEN: set[int] = set()  # ports this process handed out: never twice


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (client connections' local ports)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(low: int | None = None, span: int = 11000) -> int:
    """A loopback port free now, in [low, low + span) below the ephemeral range, never
    handed out twice by this process. (The tests' conftest.free_port slices the range per
    xdist worker and calls this.)

    Not bind(0): that port lies in the ephemeral range, where the kernel may give it to a
    client connection's local end (wrk opens thousands a second with `Connection: close`)
    before the server binds it; nginx lost the apps run of 2026-12-03 12:24 that way
    ("bind() to 127.0.0.1:57929 failed (98: Address already in use)"), a CI run uvicorn.
    """
    if low is None:
        low = max(1024, min(ephemeral_low(), 32768) - 12000)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(low, low + span)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on loopback: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---- processes ---------------------------------------------------------------------------

class Proc:
    """A contender's supervisor in its own process group; `stop()` leaves nothing behind."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "ab")  # noqa: SIM115 -- closed in stop()
        self.started = time.monotonic()
        self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the group, then SIGKILL it; reap; close the log."""
        try:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, sig)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _group_alive(self.pid):
                    self.popen.poll()
                    time.sleep(0.02)
                if not _group_alive(self.pid):
                    break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        finally:
            self.log.close()


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every process that is not a zombie, from /proc/PID/stat.

    The one /proc scan the bench's process-tree helpers share (harness, scale, memory).
    """
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            out.append((int(entry), int(fields[1]), int(fields[2])))
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (utime + stime, all threads) of every process in the group, so far.

    The reaped children's times (cutime + cstime) are included, so a worker that exited
    during a measurement still counts. A contender runs in its own session, so its process
    group is its whole tree: supervisor, workers, their threads. The clock ticks in
    1/CLK_TCK s (10 ms); over a few seconds of load that is well under 1%.
    """
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[2]) == pgid:
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK


def _group_alive(pgid: int) -> bool:
    """True while any process (not a zombie of ours) is still in the group."""
    return any(group == pgid for _, _, group in live_processes())


def rss_mb(pid: int) -> float | None:
    """VmRSS of one process, in MiB (the supervisor alone, not its workers)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---- sd_notify ---------------------------------------------------------------------------

class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's; records (time, message)."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="notify-", dir=parent)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def first(self, field_: str, after: float = 0.0) -> float | None:
        """When a message containing the line `field_` first arrived after `after`."""
        with self._lock:
            for when, text in self.messages:
                if when >= after and field_ in text.splitlines():
                    return when
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


# ---- probing -----------------------------------------------------------------------------

def probe(port: int, k: int = 4, timeout: float = 1.0, request: bytes = REQUEST) -> list[int]:
    """Open k fresh connections at once, GET / (or `request`) on each; the worker pids that
    answered."""
    socks: list[socket.socket] = []
    pids: list[int] = []
    try:
        for _ in range(k):
            s = socket.socket()
            s.settimeout(timeout)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(request)
            except OSError:
                s.close()
                continue
            socks.append(s)
        for s in socks:
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            m = PID_RE.search(data)
            if m and data.startswith(b"HTTP/1.1 200"):
                pids.append(int(m.group(1)))
    finally:
        for s in socks:
            s.close()
    return pids


def wait_for_pids(port: int, count: int, deadline: float, seen: set[int] | None = None,
                  new_only: bool = False, parallel: int = 8, interval: float = 0.002,
                  conn_timeout: float = 2.0,
                  alive: Callable[[], bool] | None = None) -> tuple[float | None, set[int]]:
    """Race fresh connections until `count` distinct pids (or one pid not in `seen`) answered.

    Returns (when, pids): `when` is the monotonic time the deciding response arrived (None
    on timeout). Connections are opened every `interval` s, up to `parallel` in flight, each
    `GET /` with `Connection: close`; a connection that hangs (Node's primary can hand one
    to a worker that just died) only occupies a slot, it never delays detection. `alive`,
    if given, is asked every 0.2 s: when it says the server has exited, the wait ends there.
    """
    seen = set() if seen is None else seen
    pids: set[int] = set()
    sel = selectors.DefaultSelector()
    inflight: dict[socket.socket, list[Any]] = {}  # sock -> [opened_at, buffer, sent]
    next_open = 0.0
    next_alive = 0.0

    def drop(s: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(s)
        inflight.pop(s, None)
        s.close()

    try:
        while (now := time.monotonic()) < deadline:
            if alive is not None and now >= next_alive:
                next_alive = now + 0.2
                if not alive():
                    break
            if len(inflight) < parallel and now >= next_open:
                next_open = now + interval
                s = socket.socket()
                s.setblocking(False)
                if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                    s.close()
                else:
                    inflight[s] = [now, b"", False]
                    sel.register(s, selectors.EVENT_WRITE)
            for key, _ in sel.select(timeout=interval):
                s = key.fileobj  # type: ignore[assignment]
                state = inflight[s]
                if not state[2]:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        drop(s)
                        continue
                    try:
                        s.send(REQUEST)
                    except OSError:
                        drop(s)
                        continue
                    state[2] = True
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                try:
                    chunk = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                state[1] += chunk
                if chunk and b"\r\n\r\n" not in state[1]:
                    continue
                data = state[1]
                drop(s)
                m = PID_RE.search(data)
                if not (m and data.startswith(b"HTTP/1.1 200")):
                    continue
                pid = int(m.group(1))
                pids.add(pid)
                when = time.monotonic()
                if new_only and pid not in seen:
                    return when, {pid}
                if not new_only and len(pids) >= count:
                    return when, pids
            for s, state in list(inflight.items()):
                if now - state[0] > conn_timeout:
                    drop(s)
        return None, (set() if new_only else pids)
    finally:
        for s in list(inflight):
            drop(s)
        sel.close()


# ---- wrk ---------------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    non2xx: int = 0
    raw: str = ""

    @property
    def failed(self) -> int:
        return sum(self.errors.values()) + self.non2xx


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    r = WrkResult(raw=out)
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        r.rps = float(m.group(1))
    if m := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        r.p50_ms = _ms(m.group(1))
    if m := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        r.p99_ms = _ms(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        r.requests = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        r.errors = dict(zip(("connect", "read", "write", "timeout"),
                            map(int, m.groups()), strict=True))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        r.non2xx = int(m.group(1))
    return r


def wrk_argv(port: int, duration: float, close: bool, connections: int = 64) -> list[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, f"http://127.0.0.1:{port}/"]


@contextlib.contextmanager
def wrk_background(port: int, duration: float, close: bool = False) -> Iterator[list[WrkResult]]:
    """Run wrk while the body does something; the result list is filled when it ends."""
    proc = subprocess.Popen(wrk_argv(port, duration, close), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    box: list[WrkResult] = []
    try:
        yield box
        out, _ = proc.communicate(timeout=duration + 15)
        box.append(parse_wrk(out))
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wrk(port: int, duration: float, close: bool = False) -> WrkResult:
    with wrk_background(port, duration, close) as box:
        pass
    return box[0]
