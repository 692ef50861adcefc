"""The shipped units under a real systemd: activation, READY=1, reload, restarts, stop, CPUQuota.

systemd boots as PID 1 of fresh pid/mount/uts/ipc/net namespaces: a container without an image,
seeing the host's files with its own /run, /tmp, /var/tmp, processes and loopback, in a cgroup
subtree of its own, and loading only the units the test puts in its /run/systemd/system.
The tests drive it with `nsenter ... systemctl`/`journalctl` and speak HTTP to it from threads
that joined its network namespace (still 127.0.0.1). SIGKILL to that PID 1 ends every
process in the namespace.

The tests are steps of one story on one systemd (booted once per module) and run in file order;
each asserts its own starting state rather than trusting the previous step.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    BIN,
    ROOT,
    TEST_APPS,
    cpus_allowed,
    http_get,
    need,
    need_command,
    need_root,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("systemd")]

UNITS = ROOT / "deploy" / "systemd"
SERVICE = "hello-cluster.service"
APP_SOCKET = "hello-cluster.socket"
METRICS_SOCKET = "hello-cluster-metrics.socket"
APP_PORT = 8085
METRICS_PORT = 9464
HELLO = b"<h1>Hello Python!</h1><p>Hello Cluster!</p>"
WORKERS = 3
TARGET = "hc-e2e.target"
APP_DIR = "/run/hc-e2e"  # inside the namespace; the host reaches it through /proc/PID/root
HOLD_FILE = f"{APP_DIR}/hold-startup"
HOME_DIRS = ("/root", "/home", "/run/user")
CLONE_NEWNET = 0x40000000

# Only what is listed under /run/systemd/system exists for this systemd (SYSTEMD_UNIT_PATH):
# the host's units are not loaded, so nothing of a real boot (sysinit.target's tmpfiles,
# journal flush, utmp, /dev/log, ...) runs against the host's /, /var or /dev. sysinit,
# basic and sockets targets are empty stand-ins for the services' default dependencies;
# the journal stays in the private /run.
BOOT_SCRIPT = """set -e
for procs in {cgroup_procs}; do {{ echo 0 > "$procs"; }} 2>/dev/null || true; done
mount -t proc proc /proc
mount -t tmpfs tmpfs /run
{keep_before}
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/tmp
{keep_after}
mkdir -p /run/systemd/system /run/systemd/journald.conf.d
cd /run/systemd/system
printf '[Unit]\\nDescription=hello-cluster e2e\\nWants=systemd-journald.socket\\n' > {target}
for stub in sysinit.target basic.target sockets.target; do
    printf '[Unit]\\nDescription=%s (empty in this test systemd)\\n' $stub > $stub
done
cp {units}/systemd-journald.service {units}/systemd-journald.socket .
printf '[Journal]\\nStorage=volatile\\nReadKMsg=no\\n' > /run/systemd/journald.conf.d/e2e.conf
cd /
ip link set lo up
exec env container=hello-cluster-e2e SYSTEMD_UNIT_PATH=/run/systemd/system \\
    {systemd} --system --unit={target}
"""

# Workers import the app; this one can hold that open so start-up is slow enough to watch.
E2E_APP = f'''"""Test-only: tests/apps/hc_testapp; start-up held open while {HOLD_FILE} exists."""
import os
import time

if os.path.exists("{HOLD_FILE}"):
    time.sleep(2.0)

from hc_testapp import app  # noqa: E402,F401
'''


# ---- systemd in its namespaces ---------------------------------------------------------------

class NsSystemd:
    """A systemd that is PID 1 of its own namespaces, driven from the host."""

    def __init__(self, proc: subprocess.Popen[bytes], pid: int, log_path: Path) -> None:
        self.proc = proc
        self.pid = pid
        self.log_path = log_path
        self.nsenter = shutil.which("nsenter") or "nsenter"

    @property
    def root(self) -> Path:
        """Its filesystem as it sees it (private /run), seen from the host."""
        return Path(f"/proc/{self.pid}/root")

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.nsenter, "-t", str(self.pid), "-a", *argv],
                                capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}\n{self.journal(lines=40)}")
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name)[name]

    def main_pid(self) -> int:
        return int(self.prop(SERVICE, "MainPID"))

    def cursor(self) -> str:
        def read() -> subprocess.CompletedProcess[str]:
            return self.run("journalctl", "--lines=0", "--show-cursor", "--quiet", check=False)

        result = read()
        if result.returncode != 0:
            # A systemd that nothing has logged to yet has no journal file (journald is
            # socket-activated): log a line, then read the cursor. Only then: a line that
            # journald takes in later than what the test then does would move the cursor
            # past it.
            self.run("systemd-cat", "--identifier=hc-e2e", "echo", "cursor mark", check=False)
            deadline = time.monotonic() + 10
            while result.returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
                result = read()
        if result.returncode != 0:  # say what journald is doing, not just "exited 1"
            state = self.run("systemctl", "--no-pager", "status", "systemd-journald.service",
                             "systemd-journald.socket", check=False)
            header = self.run("journalctl", "--header", check=False)
            raise AssertionError(f"journalctl --show-cursor exited {result.returncode}: "
                                 f"{result.stderr}\n{state.stdout}\n{header.stdout[-3000:]}"
                                 f"{header.stderr}")
        out = result.stdout
        match = re.search(r"-- cursor: (\S+)", out)
        assert match, out
        return match.group(1)

    def journal(self, *matches: str, after: str | None = None, lines: int | None = None
                ) -> str:
        argv = ["journalctl", "--no-pager", "--output=cat", *matches]
        if after is not None:
            argv.append(f"--after-cursor={after}")
        if lines is not None:
            argv.append(f"--lines={lines}")
        result = subprocess.run([self.nsenter, "-t", str(self.pid), "-a", *argv],
                                capture_output=True, text=True, timeout=30,
                                stdin=subprocess.DEVNULL)
        return result.stdout

    def wait_journal(self, text: str, *matches: str, after: str | None = None,
                     timeout: float = 15.0) -> str:
        """journald takes log lines from streams asynchronously: wait for one to land."""
        found = ""

        def landed() -> bool:
            nonlocal found
            found = self.journal(*matches, after=after)
            return text in found

        wait_for(landed, timeout, interval=0.1, what=f"{text!r} in the journal")
        return found

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def remove(self, path: str) -> None:
        (self.root / path.lstrip("/")).unlink(missing_ok=True)

    def _stat_state(self, pid: int) -> str | None:
        try:
            stat = (self.root / f"proc/{pid}/stat").read_text()
        except OSError:
            return None
        return stat.rsplit(")", 1)[1].split()[0]

    def workers(self) -> list[int]:
        """Live children of the service's main process (pids as the namespace numbers them)."""
        main = self.main_pid()
        if main == 0:
            return []
        try:
            text = (self.root / f"proc/{main}/task/{main}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split() if self._stat_state(int(p)) not in (None, "Z")]

    def processes_named(self, needle: str) -> list[str]:
        found = []
        for entry in (self.root / "proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline and self._stat_state(int(entry.name)) not in (None, "Z"):
                found.append(f"{entry.name}: {cmdline}")
        return found

    def kill(self) -> None:
        with suppress(OSError, subprocess.TimeoutExpired):
            os.kill(self.pid, signal.SIGKILL)
        with suppress(OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        with suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)


def _join_netns(pid: int) -> None:
    """Thread initializer: setns(2) affects only the calling thread, the rest stay on the host."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(net of {pid}): {os.strerror(err)}")
    finally:
        os.close(fd)
    assert os.readlink("/proc/thread-self/ns/net") == os.readlink(f"/proc/{pid}/ns/net")


class NetnsClient:
    """HTTP over the namespace's loopback, from threads that joined its network namespace."""

    def __init__(self, pid: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="netns",
                                       initializer=_join_netns, initargs=(pid,))

    def submit(self, fn: Any, *args: Any, **kw: Any) -> Future[Any]:
        return self.pool.submit(fn, *args, **kw)

    def get(self, port: int, path: str = "/", timeout: float = 5.0
            ) -> tuple[int, dict[str, str], bytes]:
        result: tuple[int, dict[str, str], bytes] = self.submit(
            http_get, port, path, timeout=timeout).result(timeout + 5)
        return result

    def metric(self, name: str) -> float:
        _, _, body = self.get(METRICS_PORT, "/metrics")
        return metric_value(body.decode(), name)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if not line.startswith("#") and key == name:
            return float(value)
    raise KeyError(name)


@dataclass
class LoopResult:
    ok: int = 0
    pids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: int = 0


def request_loop(res: LoopResult, stop: threading.Event, max_requests: int = 5000,
                 max_seconds: float = 40.0) -> LoopResult:
    """Sequential GETs, a new connection each, until told to stop (bounded in count and time)."""
    deadline = time.monotonic() + max_seconds
    for _ in range(max_requests):
        if stop.is_set() or time.monotonic() > deadline:
            break
        try:
            status, headers, body = http_get(APP_PORT, "/", timeout=15)
        except ConnectionRefusedError as err:
            res.refused += 1
            res.errors.append(repr(err))
            continue
        except (OSError, http.client.HTTPException) as err:
            res.errors.append(repr(err))
            continue
        if status == 200 and body == HELLO:
            res.pids.append(int(headers["x-worker-pid"]))
            res.ok += 1
        else:
            res.errors.append(f"status {status}: {body[:100]!r}")
    return res


class Loop:
    """A request loop in a netns thread, always stopped and joined (use as a context manager)."""

    def __init__(self, net: NetnsClient) -> None:
        self.res = LoopResult()
        self.stop = threading.Event()
        self.future = net.submit(request_loop, self.res, self.stop)

    def wait_more(self, count: int, timeout: float = 20.0) -> None:
        mark = self.res.ok
        wait_for(lambda: self.res.ok >= mark + count or self.future.done(), timeout,
                 what=f"{count} more answered requests")
        assert not self.future.done(), f"request loop ended early: {self.future.result()}"

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.future.result(timeout=30)


# ---- the test drop-in ------------------------------------------------------------------------

def _under_home(path: str) -> bool:
    return any(path == h or path.startswith(h + "/") for h in HOME_DIRS)


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _kept_paths() -> list[str]:
    """Needed paths that the namespace's fresh /tmp and /var/tmp would hide."""
    return [p for p in _needed_paths() if _under(p, ("/tmp", "/var/tmp"))]


def keep_snippets() -> tuple[str, str]:
    """Shell that stashes kept paths in the private /run, then binds them back over tmpfs."""
    before, after = [], []
    for i, path in enumerate(_kept_paths()):
        stash = f"/run/hc-e2e-keep/{i}"
        before.append(f"mkdir -p {stash} && mount --bind {shlex.quote(path)} {stash}")
        after.append(f"mkdir -p {shlex.quote(path)} && mount --bind {stash} "
                     f"{shlex.quote(path)}")
    return "\n".join(before), "\n".join(after)


def _needed_paths() -> list[str]:
    """What the DynamicUser must read: the interpreter install, the venv, the checkout."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
             os.path.realpath(ROOT)}
    return sorted(paths)


def _check_world_readable(path: str) -> None:
    """DynamicUser= runs as a fresh uid: every directory down to the code needs o+x."""
    current = Path(path)
    for directory in [current, *current.parents]:
        mode = directory.stat().st_mode
        need(bool(mode & 0o001), f"{directory} is not searchable by other users (mode "
             f"{mode & 0o777:o}); the service's DynamicUser could not reach {path}: "
             f"chmod o+x it or keep the checkout and venv elsewhere")


def make_dropin() -> str:
    lines = [
        "# Test only: run the hello-cluster under test instead of /usr/local/bin/hello-cluster,",
        "# with a fixed pool (auto would depend on this machine's CPUs) and the test apps.",
        "[Service]",
        "ExecStart=",
        f"ExecStart={BIN} --workers {WORKERS}",
        f"Environment=PYTHONPATH={APP_DIR}:{TEST_APPS} HELLO_CLUSTER_APP=hc_e2e_app:app",
    ]
    for path in _needed_paths():
        need(not _under(path, ("/run",)),
             f"{path} is under /run, which the test's systemd replaces with an empty one: "
             "keep the checkout and venv elsewhere")
    kept = _kept_paths()
    if kept:
        lines += [
            "# Test only: the checkout or venv lives under /tmp or /var/tmp (a CI clone, say).",
            "# The test's systemd re-binds it into its own /tmp; PrivateTmp= would hide it",
            "# again from the service, so show exactly these paths, read-only, on top.",
            "BindReadOnlyPaths=" + " ".join(kept),
        ]
    home = [p for p in _needed_paths() if _under_home(p)]
    for path in _needed_paths():
        if not _under_home(path):
            _check_world_readable(path)
    if home:
        lines += [
            "# Test only: this interpreter/venv/checkout lives under a home directory (pyenv in",
            "# /root, 0700). ProtectHome=yes hides it and 0700 keeps the DynamicUser out, so",
            "# exec fails with status 203/EXEC (Permission denied). An install to /usr/local has",
            "# neither problem. tmpfs still hides every home; only these paths show, read-only.",
            "ProtectHome=tmpfs",
            "BindReadOnlyPaths=" + " ".join(home),
        ]
    return "\n".join(lines) + "\n"


def cgroup_mounts() -> list[Path]:
    """Every cgroup (v1) and cgroup2 mount point of this host."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] in (["cgroup"], ["cgroup2"]):
            mounts.append(Path(left.split()[4]))
    return mounts


def own_cgroups(name: str) -> list[Path]:
    """A cgroup of our own in every hierarchy, for the nested systemd to take as its root.

    There is no cgroup namespace: systemd takes the cgroup it starts in as the root of its
    tree. Started in a group of its own it manages that subtree only, not the host's root
    (which other test runs or another nested systemd may be using); removed afterwards.
    """
    made = []
    for mount in cgroup_mounts():
        with suppress(OSError):
            (mount / name).mkdir(exist_ok=True)
            made.append(mount / name)
    return made


def remove_cgroups(groups: list[Path], timeout: float = 10.0) -> None:
    """rmdir every group below ours, deepest first. The kernel lets go of a group a moment
    after its last process was reaped (EBUSY until then): retry, bounded."""
    deadline = time.monotonic() + timeout
    while groups and time.monotonic() < deadline:
        for group in groups:
            for dirpath, _, _ in sorted(os.walk(group), key=lambda w: -len(w[0])):
                with suppress(OSError):
                    os.rmdir(dirpath)
        groups = [g for g in groups if g.exists()]
        if groups:
            time.sleep(0.1)


# Session-scoped: xdist (--dist loadgroup) may run other modules' tests between this
# module's on the same worker, and a module-scoped systemd would then be torn down and
# booted again mid-story (seen as g2 meeting a systemd 0.3 s old, with no journal yet).
@pytest.fixture(scope="session")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsSystemd]:
    need_root()
    unshare = need_command("unshare", "util-linux")
    need_command("nsenter", "util-linux")
    need_command("ip", "iproute2")
    need_command("systemctl", "systemd")
    need_command("journalctl", "systemd")
    systemd = next((p for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")
                    if os.access(p, os.X_OK)), None)
    need(systemd is not None, "needs systemd: apt-get install systemd")
    units = next((d for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
                  if os.path.exists(f"{d}/systemd-journald.socket")), None)
    need(units is not None, "needs systemd-journald's units: apt-get install systemd")
    need(not Path("/run/systemd/system").exists(),
         "the host itself runs systemd: a nested one without a cgroup namespace would share "
         "its cgroup tree; run this in a VM or container without systemd (as CI does)")
    dropin = make_dropin()
    log_path = tmp_path_factory.mktemp("systemd") / "systemd.log"
    groups = own_cgroups(f"hello-cluster-e2e-{os.getpid()}")
    keep_before, keep_after = keep_snippets()
    script = BOOT_SCRIPT.format(target=TARGET, systemd=systemd, units=units,
                                keep_before=keep_before, keep_after=keep_after,
                                cgroup_procs=" ".join(f"{g}/cgroup.procs" for g in groups))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [unshare, "--pid", "--fork", "--mount", "--uts", "--ipc", "--net",
             "--propagation", "private", "sh", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    pid = 0
    sd: NsSystemd | None = None
    try:
        def forked() -> bool:
            nonlocal pid
            assert proc.poll() is None, f"unshare exited {proc.returncode}: " \
                                        f"{log_path.read_text(errors='replace')}"
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            pid = int(kids[0]) if kids else 0
            return pid != 0

        wait_for(forked, 10, what="unshare to fork the namespace's PID 1")
        sd = NsSystemd(proc, pid, log_path)

        def booted() -> bool:
            assert proc.poll() is None, f"systemd exited: {log_path.read_text(errors='replace')}"
            state = sd.run("systemctl", "is-system-running", check=False, timeout=10)
            return state.stdout.strip() in ("running", "degraded")

        wait_for(booted, 30, interval=0.2, what="systemd in the namespace to boot")
        tree = Path(f"/proc/{pid}/cgroup").read_text()
        assert f"/hello-cluster-e2e-{os.getpid()}/" in tree, \
            f"systemd is not in its own cgroup subtree:\n{tree}"
        for unit in (SERVICE, APP_SOCKET, METRICS_SOCKET):
            sd.write(f"/run/systemd/system/{unit}", (UNITS / unit).read_text())
        sd.write(f"/run/systemd/system/{SERVICE}.d/00-e2e.conf", dropin)
        sd.write(f"{APP_DIR}/hc_e2e_app.py", E2E_APP)
        sd.systemctl("daemon-reload")
        yield sd
    finally:
        if sd is not None:
            sd.kill()
        else:
            with suppress(OSError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
            with suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        remove_cgroups(groups)


@pytest.fixture(scope="session")
def net(sd: NsSystemd) -> Iterator[NetnsClient]:
    client = NetnsClient(sd.pid)
    yield client
    client.close()


def wait_active(sd: NsSystemd, timeout: float = 30.0) -> dict[str, str]:
    state: dict[str, str] = {}

    def active() -> bool:
        nonlocal state
        state = sd.show(SERVICE, "ActiveState", "SubState", "StatusText", "NRestarts",
                        "MainPID", "Result")
        assert state["ActiveState"] != "failed", f"{state}\n{sd.journal('-u', SERVICE)}"
        return state["ActiveState"] == "active" and state["SubState"] == "running"

    wait_for(active, timeout, interval=0.1, what=f"{SERVICE} active (running)")
    return state


def wait_pool(sd: NsSystemd, net: NetnsClient, workers: int = WORKERS,
              timeout: float = 20.0) -> list[int]:
    pids: list[int] = []

    def full() -> bool:
        nonlocal pids
        pids = sd.workers()
        return len(pids) == workers and \
            net.metric("hello_cluster_workers_ready") == workers

    wait_for(full, timeout, interval=0.1, what=f"{workers} ready workers")
    return pids


@contextmanager
def dropped_in(sd: NsSystemd, name: str, text: str) -> Iterator[None]:
    """The service's drop-in `name` in place (and loaded) for the block; after it, even on
    a failure, removed again, the service stopped and systemd reloaded."""
    dropin = f"/run/systemd/system/{SERVICE}.d/{name}"
    sd.write(dropin, text)
    try:
        sd.systemctl("daemon-reload")
        yield
    finally:
        sd.remove(dropin)
        sd.systemctl("stop", SERVICE, check=False)
        sd.systemctl("daemon-reload", check=False)


def ensure_running(sd: NsSystemd, net: NetnsClient) -> None:
    if sd.prop(SERVICE, "ActiveState") != "active":
        sd.systemctl("reset-failed", SERVICE, check=False)
        sd.systemctl("start", SERVICE)
    wait_active(sd)
    wait_pool(sd, net)


# ---- the story -------------------------------------------------------------------------------

def test_a_first_request_activates_and_active_means_ready(sd: NsSystemd,
                                                          net: NetnsClient) -> None:
    assert sd.prop(SERVICE, "ActiveState") == "inactive"
    sd.systemctl("start", APP_SOCKET)
    assert sd.show(APP_SOCKET, "ActiveState", "SubState") == \
        {"ActiveState": "active", "SubState": "listening"}
    assert sd.prop(SERVICE, "ActiveState") == "inactive", "started before any connection"

    sd.write(HOLD_FILE, "")  # every worker's app import now takes 2 s
    try:
        first = net.submit(http_get, APP_PORT, "/", timeout=30)
        seen: list[dict[str, str]] = []

        def master_up_no_worker_ready() -> bool:
            # /readyz 503 before and after the look at systemd: no worker was ready during it,
            # so READY=1 ("all workers ready") cannot have been sent yet.
            if net.get(METRICS_PORT, "/readyz", timeout=2)[0] != 503:
                return False
            state = sd.show(SERVICE, "ActiveState", "SubState", "StatusText")
            if net.get(METRICS_PORT, "/readyz", timeout=2)[0] != 503:
                return False
            seen.append(state)
            return True

        wait_for(master_up_no_worker_ready, 20, interval=0.05,
                 what="the master serving /readyz before any worker is ready")
    finally:
        sd.remove(HOLD_FILE)
    before_ready = seen[-1]
    assert before_ready["ActiveState"] == "activating", before_ready
    assert before_ready["SubState"] == "start", before_ready
    assert "ready" not in before_ready["StatusText"], before_ready

    status, headers, body = first.result(timeout=40)
    assert (status, body) == (200, HELLO), "the connection that activated it was served"
    state = wait_active(sd)
    assert re.fullmatch(rf"{WORKERS}/{WORKERS} workers ready, 0 restarts",
                        state["StatusText"]), state
    assert sd.prop(METRICS_SOCKET, "ActiveState") == "active", "pulled in by Requires="
    invocation = sd.prop(SERVICE, "InvocationID")
    this_run = f"_SYSTEMD_INVOCATION_ID={invocation}"
    sd.wait_journal(f"master ready to fork {WORKERS} workers", this_run)
    assert "(socket activation)" in sd.journal(this_run)


def test_b_several_workers_serve_and_metrics_answer(sd: NsSystemd, net: NetnsClient) -> None:
    ensure_running(sd, net)
    workers = set(sd.workers())
    seen: set[int] = set()
    for _ in range(300):
        status, headers, body = net.get(APP_PORT, "/")
        assert (status, body) == (200, HELLO)
        seen.add(int(headers["x-worker-pid"]))
        if len(seen) >= 2:
            break
    assert len(seen) >= 2, f"one worker served 300 requests in a row: {seen}"
    assert seen <= workers, f"served by {seen}, not the unit's workers {workers}"

    # Workers move request counts into the metric files every 0.1 s.
    wait_for(lambda: net.metric('hello_cluster_http_requests_total{method="GET",status="200"}')
             >= 2, 10, what="the requests counted")
    status, headers, body = net.get(METRICS_PORT, "/metrics")
    assert status == 200
    text = body.decode()
    assert metric_value(text, "hello_cluster_workers_ready") == WORKERS
    assert metric_value(text, 'hello_cluster_http_requests_total{method="GET",status="200"}') >= 2
    assert "process_resident_memory_bytes" in text, "process_* metrics need /proc/stat"
    assert net.get(METRICS_PORT, "/readyz")[0] == 200


def test_c_reload_under_load_loses_nothing(sd: NsSystemd, net: NetnsClient) -> None:
    ensure_running(sd, net)
    main = sd.main_pid()
    old = set(sd.workers())
    reloads = net.metric("hello_cluster_reloads_total")
    with Loop(net) as loop:
        loop.wait_more(20)
        # ExecReload= sends SIGHUP. systemd 252 may end the reload job when kill(1) exits;
        # the master's RELOADING=1 then holds the unit in "reloading" until its READY=1.
        # (Type=notify-reload in systemd 253+ makes `systemctl reload` itself wait.)
        sd.systemctl("reload", SERVICE)
        wait_active(sd)

        new: set[int] = set()

        def replaced() -> bool:
            nonlocal new
            new = set(sd.workers())
            return len(new) == WORKERS and not new & old

        wait_for(replaced, 20, interval=0.1, what="every old worker gone, a full new pool")
        seen_before = len(loop.res.pids)
        loop.wait_more(30)
    res = loop.res
    assert res.errors == [], f"{len(res.errors)} failed requests during reload: {res.errors[:5]}"
    assert set(res.pids[seen_before:]) <= new, "after the reload only new workers answer"
    assert sd.main_pid() == main, "a reload keeps the master"
    assert net.metric("hello_cluster_reloads_total") == reloads + 1
    assert re.fullmatch(rf"{WORKERS}/{WORKERS} workers ready, \d+ restarts",
                        sd.prop(SERVICE, "StatusText"))


def test_d1_worker_killed_is_replaced_by_the_master(sd: NsSystemd, net: NetnsClient) -> None:
    ensure_running(sd, net)
    restarts = int(sd.prop(SERVICE, "NRestarts"))
    main = sd.main_pid()
    victim = sd.workers()[0]
    signal_restarts = net.metric('hello_cluster_worker_restarts_total{reason="signal"}')
    sd.run("kill", "-KILL", str(victim))

    def recovered() -> bool:
        pids = sd.workers()
        return victim not in pids and len(pids) == WORKERS and \
            net.metric("hello_cluster_workers_ready") == WORKERS

    wait_for(recovered, 20, interval=0.1, what="the pool back to full after a worker SIGKILL")
    assert int(sd.prop(SERVICE, "NRestarts")) == restarts, "systemd restarted the unit"
    assert sd.main_pid() == main
    assert net.metric('hello_cluster_worker_restarts_total{reason="signal"}') == \
        signal_restarts + 1
    assert net.get(APP_PORT, "/")[0] == 200


def test_d2_master_killed_systemd_restarts_on_the_same_socket(sd: NsSystemd,
                                                               net: NetnsClient) -> None:
    ensure_running(sd, net)
    restarts = int(sd.prop(SERVICE, "NRestarts"))
    main = sd.main_pid()
    cursor = sd.cursor()
    with Loop(net) as loop:
        loop.wait_more(20)
        sd.systemctl("kill", "--signal=SIGKILL", "--kill-whom=main", SERVICE)

        def restarted() -> bool:
            state = sd.show(SERVICE, "NRestarts", "ActiveState", "SubState", "MainPID")
            return int(state["NRestarts"]) == restarts + 1 and state["SubState"] == "running" \
                and int(state["MainPID"]) not in (0, main)

        wait_for(restarted, 30, interval=0.1, what="systemd to restart the unit")
        loop.wait_more(30)
    res = loop.res
    # systemd holds the listening socket through the restart: connections wait in its backlog.
    assert res.refused == 0, f"connections refused during the restart: {res.errors[:5]}"
    # A sequential client has at most one request in flight when the worker serving it dies.
    assert len(res.errors) <= 1, res.errors[:5]
    log = sd.wait_journal("Scheduled restart job", "-u", SERVICE, after=cursor)
    assert "status=9/KILL" in log
    wait_pool(sd, net)


def test_e_stop_drains_and_leaves_nothing(sd: NsSystemd, net: NetnsClient) -> None:
    ensure_running(sd, net)
    cursor = sd.cursor()
    slow = net.submit(http_get, APP_PORT, "/slow?s=2", timeout=30)
    wait_for(lambda: net.metric("hello_cluster_http_requests_in_progress") >= 1, 10,
             what="the slow request inside a worker")
    sd.systemctl("stop", SERVICE)  # returns once the unit is stopped
    status, _, body = slow.result(timeout=30)
    assert status == 200, "the in-flight request was cut instead of drained"
    state = sd.show(SERVICE, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert sd.processes_named("hello-cluster") == []
    log = sd.wait_journal("Stopped hello-cluster.service", "-u", SERVICE, after=cursor)
    for line in ("Stopping hello-cluster.service", "stopping (SIGTERM received)",
                 "draining (shutdown)", "master exiting with code 0"):
        assert line in log, f"{line!r} missing from the journal:\n{log}"
    # The sockets stay with systemd: the next connection would start the service again.
    assert sd.prop(APP_SOCKET, "SubState") == "listening"


def test_f_cpu_quota_gives_one_worker_under_auto(sd: NsSystemd, net: NetnsClient) -> None:
    # Stopping the sockets stops the service too (Requires=); starting the service by name
    # then brings both sockets back first (Requires= + After=).
    sd.systemctl("stop", APP_SOCKET, METRICS_SOCKET)
    for unit in (SERVICE, APP_SOCKET, METRICS_SOCKET):
        assert sd.prop(unit, "ActiveState") == "inactive", unit
    with dropped_in(sd, "50-cpu-quota.conf", "[Service]\nCPUQuota=50%\nExecStart=\n"
                    f"ExecStart={BIN} --workers auto\n"):
        sd.systemctl("start", SERVICE)
        wait_active(sd)
        for unit in (APP_SOCKET, METRICS_SOCKET):
            # "running": its service runs on it (it shows "listening" while none does)
            assert sd.prop(unit, "SubState") == "running", unit
        invocation = sd.prop(SERVICE, "InvocationID")
        log = sd.wait_journal("workers: ", f"_SYSTEMD_INVOCATION_ID={invocation}")
        match = re.search(r"workers: (\d+) \(auto: (.*)\)", log)
        assert match, log
        assert match.group(1) == "1", match.group(0)
        assert "cgroup CPU quota 0.5 CPUs" in match.group(2), match.group(0)
        assert wait_pool(sd, net, workers=1)
        assert sd.prop(SERVICE, "StatusText").startswith("1/1 workers ready")


def allowed_cpus(sd: NsSystemd, pid: int) -> frozenset[int]:
    """A process's CPUs, read through the namespace."""
    return cpus_allowed(sd.root / f"proc/{pid}/status")


def start_pool_and_plan(sd: NsSystemd, net: NetnsClient,
                        n: int) -> tuple[list[int], str, str]:
    """Start the service, wait for `n` ready workers: their pids, the invocation, and the
    journal once the master's `cpu affinity:` plan is in it."""
    sd.systemctl("start", SERVICE)
    wait_active(sd)
    pids = wait_pool(sd, net, workers=n)
    invocation = sd.prop(SERVICE, "InvocationID")
    return pids, invocation, sd.wait_journal("cpu affinity: ",
                                             f"_SYSTEMD_INVOCATION_ID={invocation}")


def test_f2_the_hardened_unit_lets_workers_pin_themselves(sd: NsSystemd,
                                                          net: NetnsClient) -> None:
    """--cpu-affinity under the shipped unit: its SystemCallFilter denies @resources, which
    holds sched_setaffinity, so the unit gives that one call back (without it every worker
    would warn at each start and run unpinned)."""
    sd.systemctl("stop", SERVICE)
    main_cpus = allowed_cpus(sd, 1)  # what the service inherits from the namespace's init
    n = len(main_cpus)
    with dropped_in(sd, "50-affinity.conf", "[Service]\nExecStart=\n"
                    f"ExecStart={BIN} --workers {n} --cpu-affinity always\n"):
        pids, invocation, log = start_pool_and_plan(sd, net, n)
        if n == 1:
            assert "cpu affinity: none (1 usable CPU" in log, log
            return
        assert "cpu affinity: every worker pinned" in log, log
        assert sorted((allowed_cpus(sd, pid) for pid in pids), key=min) == [
            frozenset({cpu}) for cpu in sorted(main_cpus)]
        assert "could not set the CPU affinity" not in sd.journal(
            f"_SYSTEMD_INVOCATION_ID={invocation}")


def test_f3_a_cpu_quota_below_the_cpus_pins_no_worker(sd: NsSystemd,
                                                       net: NetnsClient) -> None:
    """Under a quota the CPUs are shared with others: even `always` plans no pinning."""
    sd.systemctl("stop", SERVICE)
    n = len(allowed_cpus(sd, 1))
    need(n >= 2, "needs 2 or more CPUs (a quota below them is what is tested)")
    with dropped_in(sd, "50-affinity-quota.conf", f"[Service]\nCPUQuota={n * 100 - 50}%\n"
                    f"ExecStart=\nExecStart={BIN} --workers {n} --cpu-affinity always\n"):
        pids, _, log = start_pool_and_plan(sd, net, n)
        assert f"cpu affinity: none (the cgroup CPU quota ({n - 0.5:g} CPUs" in log, log
        assert all(len(allowed_cpus(sd, pid)) == n for pid in pids)


def test_g_config_error_is_not_restarted(sd: NsSystemd) -> None:
    """RestartPreventExitStatus=2: a bad flag fails once instead of restarting in a loop."""
    if sd.prop(SERVICE, "ActiveState") != "inactive":
        sd.systemctl("stop", SERVICE)
    dropin = f"/run/systemd/system/{SERVICE}.d/50-bad-flag.conf"
    sd.write(dropin, f"[Service]\nExecStart=\nExecStart={BIN} --workers many\n")
    try:
        sd.systemctl("daemon-reload")
        assert sd.run("systemctl", "start", SERVICE, check=False).returncode != 0
        # A restart would be pending now ("activating", SubState "auto-restart").
        state = sd.show(SERVICE, "ActiveState", "SubState", "Result", "ExecMainStatus",
                        "NRestarts")
        assert state["ActiveState"] == "failed", state
        assert state["ExecMainStatus"] == "2", state
        # A start by hand resets the count (a restart the test before left, say after a
        # watchdog kill under load, showed here as 1 -> 0): any automatic restart is >= 1.
        assert int(state["NRestarts"]) == 0, state
        invocation = sd.prop(SERVICE, "InvocationID")
        sd.wait_journal("--workers", f"_SYSTEMD_INVOCATION_ID={invocation}")
    finally:
        sd.remove(dropin)
        sd.systemctl("reset-failed", SERVICE, check=False)
        sd.systemctl("daemon-reload", check=False)


def test_g2_a_failing_activation_is_bounded_and_recoverable(sd: NsSystemd,
                                                             net: NetnsClient) -> None:
    """A waiting connection re-triggers a start that fails (exit 2) until systemd's start
    limit: StartLimitBurst=3 bounds it (systemd's default is 5 in 10 s), and the documented
    reset-failed + start brings the sockets back."""
    if sd.prop(SERVICE, "ActiveState") not in ("inactive", "failed"):
        sd.systemctl("stop", SERVICE)
    sd.systemctl("reset-failed", SERVICE, check=False)
    sd.systemctl("start", APP_SOCKET, METRICS_SOCKET)
    dropin = f"/run/systemd/system/{SERVICE}.d/50-bad-flag.conf"
    sd.write(dropin, f"[Service]\nExecStart=\nExecStart={BIN} --workers many\n")
    cursor = sd.cursor()
    try:
        sd.systemctl("daemon-reload")
        waiting = net.submit(http_get, APP_PORT, "/", timeout=20)
        wait_for(lambda: sd.prop(APP_SOCKET, "ActiveState") == "failed", 30, interval=0.2,
                 what=f"{APP_SOCKET} failed after the start limit")
        with suppress(Exception):
            waiting.result(25)  # refused or reset once the socket closed: either is fine
        assert sd.prop(APP_SOCKET, "Result") == "service-start-limit-hit", sd.journal(lines=30)
        starts = sd.journal("-u", SERVICE, after=cursor).count("status=2/INVALIDARGUMENT")
        assert 1 <= starts <= 3, sd.journal("-u", SERVICE, after=cursor)
    finally:
        sd.remove(dropin)
        sd.systemctl("daemon-reload", check=False)
    # The recovery the unit file and docs/systemd.md give, word for word.
    sd.systemctl("reset-failed", SERVICE, APP_SOCKET, METRICS_SOCKET)
    sd.systemctl("start", APP_SOCKET, METRICS_SOCKET)
    status, _, body = net.get(APP_PORT, "/", timeout=30)
    assert status == 200 and HELLO in body
    ensure_running(sd, net)


def test_h_tls_key_from_load_credential(sd: NsSystemd, net: NetnsClient,
                                        tmp_path: Path) -> None:
    """The README's TLS recipe: the DynamicUser cannot read a root-only key, LoadCredential=
    hands it a copy; TLS on the socket-activated port, the metrics port stays plain HTTP."""
    from tls_pki import Pki, client_context, https_get

    if sd.prop(SERVICE, "ActiveState") != "inactive":
        sd.systemctl("stop", SERVICE)
    sd.systemctl("reset-failed", SERVICE, check=False)
    pki = Pki(tmp_path / "pki")
    first, second = pki.cert("e2e-first", 0x6001), pki.cert("e2e-second", 0x6002)
    secrets = "/run/hc-e2e-tls"  # the namespace's private /run: root-only, like /etc/ssl/private
    (sd.root / secrets.lstrip("/")).mkdir(mode=0o700, exist_ok=True)

    def install(cert: tuple[Path, Path]) -> None:
        for src, name in zip(cert, ("server.pem", "server.key"), strict=True):
            sd.write(f"{secrets}/{name}", src.read_text())
            (sd.root / secrets.lstrip("/") / name).chmod(0o600)

    install(first)
    # systemd prepares credentials in a mount namespace of its own and mounts them onto
    # /run/credentials/UNIT, which reaches the service only through shared propagation. A
    # booting systemd makes / shared itself, but not when told it runs in a container
    # (container= in BOOT_SCRIPT), which leaves the service an empty credentials directory.
    sd.run("mount", "--make-rshared", "/")
    dropin = f"/run/systemd/system/{SERVICE}.d/50-tls.conf"
    try:
        # Pointed at the root-only files, the dynamic user cannot read them: exit 2, once.
        sd.write(dropin, "[Service]\n"
                         f"Environment=HELLO_CLUSTER_SSL_CERTFILE={secrets}/server.pem\n"
                         f"Environment=HELLO_CLUSTER_SSL_KEYFILE={secrets}/server.key\n")
        sd.systemctl("daemon-reload")
        assert sd.run("systemctl", "start", SERVICE, check=False).returncode != 0
        state = sd.show(SERVICE, "ActiveState", "ExecMainStatus")
        assert state == {"ActiveState": "failed", "ExecMainStatus": "2"}, state
        invocation = sd.prop(SERVICE, "InvocationID")
        log = sd.wait_journal("cannot read it", f"_SYSTEMD_INVOCATION_ID={invocation}")
        assert f"{secrets}/server.pem: cannot read it (Permission denied)" in log, log
        sd.systemctl("reset-failed", SERVICE)

        # The README's drop-in: systemd reads the files as root and hands the service a
        # private copy in $CREDENTIALS_DIRECTORY (%d), readable by the dynamic user only.
        sd.write(dropin, "[Service]\n"
                         f"LoadCredential=tls.crt:{secrets}/server.pem\n"
                         f"LoadCredential=tls.key:{secrets}/server.key\n"
                         "Environment=HELLO_CLUSTER_SSL_CERTFILE=%d/tls.crt\n"
                         "Environment=HELLO_CLUSTER_SSL_KEYFILE=%d/tls.key\n")
        sd.systemctl("daemon-reload")
        sd.systemctl("start", SERVICE)
        wait_active(sd)
        wait_pool(sd, net)
        ctx = client_context(pki)
        status, body, serial = net.submit(https_get, APP_PORT, ctx).result(30)
        assert (status, body, serial) == (200, HELLO, 0x6001)
        assert net.get(METRICS_PORT, "/readyz")[0] == 200  # plain HTTP

        # Rotation: systemd copies credentials when the service starts, so a reload's new
        # workers still read the old copy; a restart takes the new files (the sockets stay
        # with systemd meanwhile, so connections wait instead of being refused).
        install(second)
        main, old = sd.main_pid(), set(sd.workers())
        sd.systemctl("reload", SERVICE)
        wait_for(lambda: len(set(sd.workers()) - old) == WORKERS and
                 not old & set(sd.workers()), 30, interval=0.1, what="a new pool")
        wait_active(sd)
        assert net.submit(https_get, APP_PORT, ctx).result(30)[2] == 0x6001
        assert sd.main_pid() == main
        sd.systemctl("restart", SERVICE)
        wait_active(sd)
        wait_pool(sd, net)
        assert net.submit(https_get, APP_PORT, ctx).result(30)[2] == 0x6002
    finally:
        sd.remove(dropin)
        sd.systemctl("stop", SERVICE, check=False)
        sd.systemctl("reset-failed", SERVICE, check=False)
        sd.systemctl("daemon-reload", check=False)
