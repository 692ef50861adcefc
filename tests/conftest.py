"""Shared fixtures: start the real `hello-cluster` on loopback, watch it, always clean up."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # harness: the free ports, shared with the bench
import harness  # noqa: E402

BIN = Path(sys.executable).parent / "hello-cluster"
TEST_APPS = Path(__file__).resolve().parent / "apps"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip with a reason that says how to get the prerequisite; under CI, fail instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI (must not skip): {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (run the suite as root, as CI does)")


def need_command(name: str, package: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"needs {name}: apt-get install {package} (.ci/run does)")
    assert path is not None
    return path


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our env minus anything systemd-ish the test runner may have, plus the test apps."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                        "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = str(TEST_APPS)
    env.update(extra or {})
    return env


def free_port() -> int:
    """A port that is free now and that nothing else in this run will be handed: below the
    kernel's ephemeral range (bench/harness.py free_port says why not bind(0)), and under
    pytest-xdist in a slice of that range of each worker's own (gw0, gw1, ...), so two
    workers can never hand out the same port."""
    low = max(1024, min(harness.ephemeral_low(), 32768) - 12000)
    span = 11000
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        span //= count
        low += int(worker[2:]) % count * span
    return harness.free_port(low, span)


def http_get(port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 5.0,
             method: str = "GET", headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.05,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, KeyError):  # not answering yet, or the metric not there yet
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cpus_allowed(status: Path) -> frozenset[int]:
    """The Cpus_allowed_list ("0-1,3") of a /proc/PID/status or /proc/PID/task/TID/status."""
    for line in status.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cpus: set[int] = set()
            for part in line.split(":", 1)[1].strip().split(","):
                low, _, high = part.partition("-")
                cpus.update(range(int(low), int(high or low) + 1))
            return frozenset(cpus)
    raise AssertionError(f"no Cpus_allowed_list in {status}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Cluster:
    """One running hello-cluster with its ports, log file and process group."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str] | None = None,
                 metrics: bool = True, **popen: object) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        self.log_path = tmp / f"hello-cluster-{self.port}.log"
        argv = [str(BIN), "--bind", f"127.0.0.1:{self.port}"]
        if metrics:
            argv += ["--metrics-bind", f"127.0.0.1:{self.metrics_port}"]
        else:
            argv += ["--metrics-bind", "off"]
        full_env = clean_env(env)
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv + args, env=full_env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     **popen)
        self.pid = self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return [p for p in children(self.pid) if alive(p)]

    def get(self, path: str = "/", **kw: object) -> tuple[int, dict[str, str], bytes]:
        return http_get(self.port, path, **kw)

    def metrics_get(self, path: str, **kw: object) -> tuple[int, dict[str, str], bytes]:
        assert self.metrics_port is not None
        return http_get(self.metrics_port, path, **kw)

    def metric(self, name: str) -> float:
        """One sample's value from /metrics, e.g. 'hello_cluster_workers_ready' or with labels."""
        _, _, body = self.metrics_get("/metrics")
        total = None
        for line in body.decode().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == name:
                total = float(value)
        if total is None:
            raise KeyError(name)
        return total

    def wait_ready(self, workers: int | None = None, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"hello-cluster exited {self.proc.returncode}:\n{self.log}")
            if self.metrics_port is not None:
                status, _, _ = self.metrics_get("/readyz", timeout=1)
                if status != 200:
                    return False
                if workers is not None:
                    return self.metric("hello_cluster_workers_ready") == workers
                return True
            return self.get("/", timeout=1)[0] == 200

        wait_for(ready, timeout, what="hello-cluster to become ready")

    def wait_in_flight(self, count: int = 1, timeout: float = 10.0) -> None:
        """Until `count` requests are inside workers: the in-progress gauge, which a worker
        whose loop turns flushes every 0.1 s (a sleep would guess how long that takes)."""
        wait_for(lambda: self.metric("hello_cluster_http_requests_in_progress") >= count,
                 timeout, what=f"{count} request(s) in flight")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_all(self) -> None:
        """SIGKILL the whole session (master, workers, anything they started)."""
        pids = [self.pid, *children(self.pid)]
        with_suppress(lambda: os.killpg(self.pid, signal.SIGKILL))
        for pid in pids:
            with_suppress(lambda p=pid: os.kill(p, signal.SIGKILL))
        with_suppress(lambda: self.proc.wait(timeout=5))
        self.log_file.close()


def with_suppress(fn: Callable[[], object]) -> None:
    try:
        fn()
    except (OSError, subprocess.TimeoutExpired):
        pass


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    started: list[Cluster] = []

    def start(*args: str, env: dict[str, str] | None = None, metrics: bool = True,
              ready: bool = True, workers: int | None = None, **popen: object) -> Cluster:
        c = Cluster(tmp_path, list(args), env, metrics, **popen)
        started.append(c)
        if ready:
            c.wait_ready(workers)
        return c

    yield start
    for c in started:
        c.kill_all()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0,
            wrapper: list[str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run hello-cluster to completion (for start-up errors); never leaves a process."""
    full_env = clean_env(env)
    proc = subprocess.Popen([*(wrapper or []), str(BIN), *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with_suppress(lambda: os.killpg(proc.pid, signal.SIGKILL))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Load:
    """A steady request loop in a thread, on fresh connections, bounded in time and count.

    Records every failure with its error so a test can explain (or forbid) each one.
    """

    def __init__(self, port: int, path: str = "/", max_seconds: float = 60.0,
                 max_requests: int = 200_000) -> None:
        import threading

        self.port, self.path = port, path
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def wait_more(self, count: int = 20, timeout: float = 10.0) -> None:
        """Until `count` more requests have succeeded: the load went on after a change (a
        reload, a recycle), counted in requests rather than guessed in seconds."""
        start = self.ok
        wait_for(lambda: self.ok >= start + count, timeout,
                 what=f"{count} more requests to succeed")

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                status, headers, _ = http_get(self.port, self.path, timeout=10)
            except (OSError, http.client.HTTPException) as err:
                self.failures.append(f"{type(err).__name__}: {err}")
                continue
            if status == 200:
                self.ok += 1
                self.pids.add(int(headers.get("x-worker-pid", "0")))
            else:
                self.failures.append(f"HTTP {status}")


@contextlib.contextmanager
def v1_cgroup(controller: str, settings: dict[str, str]) -> Iterator[Callable[[], None]]:
    """A fresh cgroup v1 group with `settings`; yields a preexec_fn that enters it.

    Entering in the child before exec means the limit applies from the first instruction.
    The group is removed afterwards, once its processes are gone (bounded wait).
    """
    need_root()
    base = Path(f"/sys/fs/cgroup/{controller}")
    need(base.is_dir() and os.access(base, os.W_OK),
         f"needs a writable cgroup v1 {controller} hierarchy at {base}")
    group = base / f"hello-cluster-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        for name, value in settings.items():
            (group / name).write_text(value)
        procs = group / "cgroup.procs"
        yield lambda: procs.write_text(str(os.getpid()))
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.fixture(params=["uvicorn", "fast"])
def each_http_protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per worker protocol (--http): clusters inherit HELLO_CLUSTER_HTTP.

    Use it in a module with `pytestmark = pytest.mark.usefixtures("each_http_protocol")`.
    """
    monkeypatch.setenv("HELLO_CLUSTER_HTTP", request.param)
    return str(request.param)


def manual() -> str:
    """The README and every page of docs/: where options, exit codes and limits are written."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text() for page in pages)

