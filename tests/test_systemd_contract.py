"""The systemd contract without a systemd manager: sd_notify messages on a socket we bind,
socket activation through the real `systemd-socket-activate`, and the pure env parser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    BIN,
    TEST_APPS,
    Load,
    free_port,
    http_get,
    need_command,
    wait_for,
)
from hello_cluster.errors import ListenerError
from hello_cluster.system.notify import watchdog_interval
from hello_cluster.system.sockets import parse_listen_env


class _Any(dict):
    def __eq__(self, other: object) -> bool:
        return True


ANY_HEADERS = _Any()


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; collects every message."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def wait(self, field: str, timeout: float = 10.0) -> None:
        wait_for(lambda: any(field in m.split("\n") or field in m for m in self.drain()),
                 timeout, what=f"{field!r} on the notify socket")

    def close(self) -> None:
        self.sock.close()


def test_parse_listen_env() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "http:http:metrics"}
    assert parse_listen_env(env, 42).fds == ((3, "http"), (4, "http"), (5, "metrics"))
    assert parse_listen_env(env, 43) is None  # for another process: not ours
    assert parse_listen_env({}, 42) is None
    assert parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, 42).fds == ((3, "unknown"),)
    for bad in ({"LISTEN_PID": "42", "LISTEN_FDS": "abc"},
                {"LISTEN_PID": "42", "LISTEN_FDS": "-1"},
                {"LISTEN_PID": "x", "LISTEN_FDS": "1"},
                {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}):
        with pytest.raises(ListenerError):
            parse_listen_env(bad, 42)


@given(st.dictionaries(st.sampled_from(["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]),
                       st.text(max_size=12)), st.integers(1, 99999))
def test_parse_listen_env_raises_only_listener_error(env: dict[str, str], pid: int) -> None:
    try:
        parse_listen_env(env, pid)
    except ListenerError:
        pass


def test_watchdog_interval() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, 5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "6"}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, 5) is None
    assert watchdog_interval({}, 5) is None


def test_notify_lifecycle(cluster, tmp_path: Path) -> None:
    """READY=1 only after workers accept; STATUS current; RELOADING/READY on HUP; STOPPING."""
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        c = cluster("--workers", "2", ready=False,
                    env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "1000000"})
        # The fixture drops NOTIFY_SOCKET from the inherited env, not from ours.
        ns.wait("READY=1")
        ready_msg = next(m for m in ns.messages if "READY=1" in m)
        assert "STATUS=2/2 workers ready, 0 restarts" in ready_msg
        assert http_get(c.port, "/")[0] == 200
        ns.wait("WATCHDOG=1", timeout=3)
        os.kill(c.workers()[0], signal.SIGKILL)
        ns.wait("STATUS=2/2 workers ready, 1 restarts")
        ns.messages.clear()
        with Load(c.port, max_seconds=30) as load:
            c.signal(signal.SIGHUP)
            ns.wait("RELOADING=1")
            reloading = next(m for m in ns.messages if "RELOADING=1" in m)
            assert "MONOTONIC_USEC=" in reloading
            ns.wait("READY=1")
            load.wait_more(20)
        assert load.failures == []
        c.signal(signal.SIGTERM)
        ns.wait("STOPPING=1")
        assert any("EXTEND_TIMEOUT_USEC=" in m for m in ns.drain())
        assert c.wait_exit(15) == 0
    finally:
        ns.close()


@pytest.mark.parametrize("value", ["/nonexistent/notify.sock", "@abstract-nobody-listens",
                                   "/etc/hostname", "/" + "x" * 300])
def test_bogus_notify_socket_never_stops_the_service(cluster, value: str) -> None:
    c = cluster("--workers", "1", env={"NOTIFY_SOCKET": value}, workers=1)
    assert c.get("/")[0] == 200
    assert c.log.count("NOTIFY_SOCKET") == 1  # logged once, then silent
    c.signal(signal.SIGTERM)
    assert c.wait_exit(15) == 0


def activate(tmp_path: Path, *listen: str, names: str | None = None,
             args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    tool = need_command("systemd-socket-activate", "systemd")
    argv = [tool, "-E", "PYTHONPATH"]  # it passes no other environment
    for spec in listen:
        argv += ["-l", spec]
    if names:
        argv += [f"--fdname={names}"]
    argv += [str(BIN), *args]
    env = {**os.environ, "PYTHONPATH": str(TEST_APPS)}
    env.pop("NOTIFY_SOCKET", None)
    log = open(tmp_path / "activate.log", "wb")
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait(timeout=5)


def test_socket_activation_with_metrics_fd(tmp_path: Path) -> None:
    """Two fds from systemd-socket-activate: `http` serves the app, `metrics` the master."""
    port, mport = free_port(), free_port()
    proc = activate(tmp_path, f"127.0.0.1:{port}", f"127.0.0.1:{mport}",
                    names="http:metrics", args=("--workers", "2", "--app", "hc_testapp:app"))
    try:
        wait_for(lambda: http_get(mport, "/readyz", timeout=1)[0] == 200, 15,
                 what="activated cluster ready")
        status, headers, body = http_get(port, "/")
        assert status == 200 and b"Hello Cluster" in body
        log = (tmp_path / "activate.log").read_text()
        assert "(socket activation)" in log
        wait_for(lambda: b"hello_cluster_workers_ready 2.0" in http_get(mport, "/metrics")[2],
                 10, what="both workers ready")
        # LISTEN_* are unset before workers start.
        assert http_get(port, "/env") == (200, ANY_HEADERS, b"")
    finally:
        stop(proc)


def test_socket_activation_several_app_sockets(tmp_path: Path) -> None:
    p4, p6 = free_port(), free_port()
    proc = activate(tmp_path, f"127.0.0.1:{p4}", f"[::1]:{p6}", names="http:http",
                    args=("--workers", "1", "--metrics-bind", "off", "--reuse-port", "on"))
    try:
        wait_for(lambda: http_get(p4, "/", timeout=1)[0] == 200, 15, what="IPv4 socket")
        assert http_get(p6, "/", host="::1")[0] == 200
        # systemd's sockets are shared by all workers; asking for more is said, not fatal.
        log = (tmp_path / "activate.log").read_text()
        assert "--reuse-port on: systemd passed the listening sockets" in log
        assert "SO_REUSEPORT" not in log.split("master ready to fork")[1].splitlines()[0]
    finally:
        stop(proc)


def test_activated_fd_that_is_not_listening(tmp_path: Path) -> None:
    """A connected (not listening) TCP socket on fd 3 is a clear start-up error, exit 3."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    script = (f"import os,sys; os.dup2({client.fileno()}, 3); "
              "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
              f"os.execv({str(BIN)!r}, [{str(BIN)!r}, '--metrics-bind', 'off'])")
    env = {**os.environ}
    env.pop("NOTIFY_SOCKET", None)
    try:
        proc = subprocess.run(["python3", "-c", script], env=env, capture_output=True,
                              text=True, timeout=20, pass_fds=(client.fileno(),))
    finally:
        client.close()
        server.close()
    assert proc.returncode == 3, proc.stderr
    assert "not listening" in proc.stderr and "Traceback" not in proc.stderr


def test_shutdown_delay_keeps_serving_with_readyz_503(cluster) -> None:
    c = cluster("--workers", "1", "--shutdown-delay", "1s", workers=1)
    c.signal(signal.SIGTERM)
    t0 = time.monotonic()
    wait_for(lambda: c.metrics_get("/readyz", timeout=1)[0] == 503, 1, what="readyz 503")
    served = 0
    while time.monotonic() - t0 < 0.8:
        assert c.get("/", timeout=2)[0] == 200
        served += 1
        time.sleep(0.05)
    assert served > 5
    assert c.wait_exit(15) == 0
    assert time.monotonic() - t0 >= 1.0


def test_pid1_reaps_orphans(tmp_path: Path) -> None:
    """As PID 1 of a new pid namespace, the master reaps orphaned grandchildren."""
    from conftest import need_root
    need_root()
    unshare = need_command("unshare", "util-linux")
    port, mport = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(TEST_APPS)}
    env.pop("NOTIFY_SOCKET", None)
    log = open(tmp_path / "pid1.log", "wb")
    proc = subprocess.Popen(
        [unshare, "--pid", "--fork", "--mount-proc", str(BIN), "--workers", "1",
         "--app", "hc_testapp:app", "--bind", f"127.0.0.1:{port}",
         "--metrics-bind", f"127.0.0.1:{mport}", "--log-level", "debug"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: http_get(mport, "/readyz", timeout=1)[0] == 200, 15, what="ready")
        for _ in range(3):
            assert http_get(port, "/orphan")[0] == 200
        text = lambda: (tmp_path / "pid1.log").read_text()  # noqa: E731
        wait_for(lambda: text().count("reaped orphan") >= 3, 5, what="orphans reaped")

        def zombies() -> list[str]:
            found = []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        stat = (entry / "stat").read_text()
                    except OSError:
                        continue
                    if stat.rsplit(")", 1)[1].split()[0] == "Z" and "(sleep)" in stat:
                        found.append(stat)
            return found

        wait_for(lambda: not zombies(), 3, what="no zombie sleep left")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
        log.close()


def test_thousand_sighups_coalesce(cluster) -> None:
    c = cluster("--workers", "2", workers=2)
    with Load(c.port, max_seconds=30) as load:
        for _ in range(1000):
            c.signal(signal.SIGHUP)
        wait_for(lambda: "reload complete" in c.log and c.metric(
            "hello_cluster_workers_ready") == 2 and len(c.workers()) == 2, 15,
            what="reloads to settle")
        load.wait_more(50)
    reloads = c.metric("hello_cluster_reloads_total")
    assert 1 <= reloads <= 20, reloads
    assert c.metric("hello_cluster_worker_spawns_total") <= 2 + 2 * reloads
    assert load.failures == []


def test_reload_with_broken_app_keeps_old_workers(cluster, tmp_path: Path) -> None:
    """New code that cannot import: the reload is abandoned, the old generation serves on."""
    module = tmp_path / "hc_flip.py"
    module.write_text("from hello_cluster.app import app\n")
    c = cluster("--workers", "2", "--app", "hc_flip:app",
                env={"PYTHONPATH": f"{tmp_path}:{TEST_APPS}"}, workers=2)
    old = set(c.workers())
    module.write_text("raise RuntimeError('deploy went wrong')\n")
    for cached in tmp_path.glob("__pycache__/*"):
        cached.unlink()
    c.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in c.log, 10, what="reload to fail")
    # The new generation's workers are gone, the old ones stay.
    wait_for(lambda: set(c.workers()) == old, 5, what="only the old workers left")
    assert c.get("/")[0] == 200
    assert c.metric("hello_cluster_workers_ready") == 2
    assert c.log.count("deploy went wrong") == 1  # said once, not once per new worker
    assert c.proc.poll() is None
