"""Bad input, one row per case, against the real command: a documented exit code and one
line naming the problem and the fix; never a traceback, never a worker started in vain."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, clean_env, manual, run_cli

BASE = ("--bind", "127.0.0.1:0", "--metrics-bind", "off")

OPTION_CASES = [
    # (args, env, exit code, words the message must contain)
    (("--workers", ""), {}, 2, "--workers"),
    (("--workers", "-1"), {}, 2, "not a worker count"),
    (("--workers", "0"), {}, 2, "out of range"),
    (("--workers", "99999999999"), {}, 2, "out of range"),
    (("--workers", "two"), {}, 2, "not a worker count"),
    (("--graceful-timeout", "-5"), {}, 2, "not a duration"),
    (("--graceful-timeout", "10years"), {}, 2, "not a duration"),
    (("--graceful-timeout", "999999h"), {}, 2, "longer than a week"),
    (("--worker-timeout", "0"), {}, 2, "at least 1s"),
    (("--log-level", "loud"), {}, 2, "not one of debug, info, warning, error"),
    (("--log-format", "xml"), {}, 2, "not one of text, json"),
    (("--gc", "fast"), {}, 2, "not a collector setting"),
    (("--gc", "700,10"), {}, 2, "three thresholds"),
    ((), {"HELLO_CLUSTER_GC": "1,2,99999999999"}, 2, "never collects"),
    (("--backoff-factor", "nan"), {}, 2, "out of range"),
    (("--backoff-initial", "5s", "--backoff-max", "1s"), {}, 2, "larger than --backoff-max"),
    (("--crash-loop-limit", "0"), {}, 2, "out of range"),
    (("--max-requests-jitter", "5"), {}, 2, "needs --max-requests"),
    (("--limit-concurrency", "1e9"), {}, 2, "not a whole number"),
    (("--bind", ":99999"), {}, 2, "above 65535"),
    (("--bind", "host:"), {}, 2, "no port"),
    (("--bind", "[::1]"), {}, 2, "no port"),
    (("--bind", "unix:"), {}, 2, "no path"),
    (("--bind", "unix:/tmp/" + "x" * 120), {}, 2, "longer than the kernel"),
    (("--bind", "127.0.0.1:9", "--bind", "127.0.0.1:9"), {}, 2, "given twice"),
    (("--metrics-bind", "nowhere"), {}, 2, "no port"),
    (("--no-such-flag",), {}, 2, "unrecognized arguments"),
    (("--app", "a:b:c"), {}, 2, "module:attr"),
    ((), {"HELLO_CLUSTER_WORKERS": ""}, 2, "HELLO_CLUSTER_WORKERS"),
    ((), {"HELLO_CLUSTER_WORKERS": "-3"}, 2, "HELLO_CLUSTER_WORKERS"),
    ((), {"HELLO_CLUSTER_REQUEST_METRICS": "perhaps"}, 2, "not a boolean"),
    ((), {"HELLO_CLUSTER_WORKER": "2"}, 2, "did you mean HELLO_CLUSTER_WORKERS"),
    # A flag overrides the env, but a broken env value is still reported.
    (("--workers", "2"), {"HELLO_CLUSTER_WORKERS": "lots"}, 2, "HELLO_CLUSTER_WORKERS"),
    (("--user", "no such user!"), {}, 2, "not a user or group name"),
]


@pytest.mark.parametrize("args, env, code, words", OPTION_CASES,
                         ids=[" ".join(c[0]) or next(iter(c[1])) for c in OPTION_CASES])
def test_bad_option(args: tuple[str, ...], env: dict[str, str], code: int, words: str) -> None:
    # BASE first so a case's own --bind/--metrics-bind is the one that counts (append).
    argv = [*args] if any(a.startswith("--bind") or a.startswith("--metrics") for a in args) \
        else [*BASE, *args]
    proc = run_cli(*argv, env=env)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hello-cluster: error: ")
    assert words in lines[0], lines[0]


def run_with_fd3(make_fd3: str, env: dict[str, str],
                 *args: str) -> subprocess.CompletedProcess[str]:
    """exec hello-cluster with fd 3 prepared by a snippet and LISTEN_* naming that pid."""
    listen = ";".join(f"os.environ[{k!r}]={v!r}" for k, v in env.items())
    script = (
        "import os, socket\n"
        f"{make_fd3}\n"
        "if os.path.exists('/proc/self/fd/3'): os.set_inheritable(3, True)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        f"{listen}\n"
        f"os.execv({str(BIN)!r}, [{str(BIN)!r}, '--metrics-bind', 'off'])\n"
    )
    return subprocess.run([sys.executable, "-c", script], env=clean_env(), capture_output=True,
                          text=True, timeout=20)


LISTEN_SOCKET = ("s = socket.create_server(('127.0.0.1', 0)); os.dup2(s.fileno(), 3)")
ACTIVATION_CASES = [
    ("LISTEN_FDS=abc", LISTEN_SOCKET, {"LISTEN_FDS": "abc"}, "is not a count"),
    ("LISTEN_FDS=-1", LISTEN_SOCKET, {"LISTEN_FDS": "-1"}, "is not a count"),
    ("more fds than open", LISTEN_SOCKET, {"LISTEN_FDS": "3"}, "is not open"),
    ("fd 3 closed", "os.closerange(3, 100)", {"LISTEN_FDS": "1"}, "is not open"),
    ("regular file", "f = os.open('/etc/hostname', os.O_RDONLY); os.dup2(f, 3)",
     {"LISTEN_FDS": "1"}, "is not a socket"),
    ("udp socket", "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
     "u.bind(('127.0.0.1', 0)); os.dup2(u.fileno(), 3)", {"LISTEN_FDS": "1"},
     "not a stream socket"),
    ("tcp not listening", "t = socket.socket(); t.bind(('127.0.0.1', 0)); "
     "os.dup2(t.fileno(), 3)", {"LISTEN_FDS": "1"}, "is not listening"),
    ("names mismatch", LISTEN_SOCKET, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http:metrics"},
     "LISTEN_FDNAMES has 2 names"),
    ("only metrics", LISTEN_SOCKET, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "metrics"},
     "only a 'metrics' socket"),
]


@pytest.mark.parametrize("name, make_fd3, env, words", ACTIVATION_CASES,
                         ids=[c[0] for c in ACTIVATION_CASES])
def test_bad_socket_activation(name: str, make_fd3: str, env: dict[str, str],
                               words: str) -> None:
    proc = run_with_fd3(make_fd3, env)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and words in errors[0], proc.stderr


def test_listen_pid_of_another_process_is_not_ours(cluster) -> None:
    c = cluster("--workers", "1", env={"LISTEN_PID": "1", "LISTEN_FDS": "1"}, workers=1)
    assert c.get("/")[0] == 200
    assert "socket activation" not in c.log


def test_metrics_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("--bind", "127.0.0.1:0", "--metrics-bind", f"127.0.0.1:{port}")
    assert proc.returncode == 3
    assert "--metrics-bind" in proc.stderr and "address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["missing", "file"])
def test_runtime_dir_not_writable(tmp_path: Path, where: str) -> None:
    path = tmp_path / "no-such-parent" / "nope"
    if where == "file":
        path = tmp_path / "nope"
        path.write_text("not a dir")
    proc = run_cli(*BASE[:2], "--runtime-dir", str(path))
    assert proc.returncode == 6, proc.stderr
    assert "--runtime-dir" in proc.stderr and "not a writable directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runtime_dir_is_created_when_missing(cluster, tmp_path: Path) -> None:
    c = cluster("--workers", "1", "--runtime-dir", str(tmp_path / "rt"), workers=1)
    assert (tmp_path / "rt" / f"metrics-{c.pid}").is_dir()


def test_fd_limit_too_low_for_workers() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = run_cli(*BASE, "--workers", "100", preexec_fn=low_limit)
    assert proc.returncode == 6, proc.stderr
    assert "open-file limit (128) is too low for 100 workers" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exit_codes_are_documented() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for code in range(7):
        assert f"\n  {code}  " in proc.stdout
    for opt in ("HELLO_CLUSTER_WORKERS", "HELLO_CLUSTER_BIND", "default auto"):
        assert opt in proc.stdout
    readme = manual()
    for code in range(7):
        assert f"| {code} |" in readme
