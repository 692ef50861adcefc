"""Build the image and run it the way the Deployment runs the pod, under podman for real.

No registry is reachable here, so the base image is made locally: debootstrap a minimal
Debian bookworm with python3 (3.11, like python:3.11-slim) and `podman import` it. The
wheels are built on the host (same CPython 3.11, same architecture) and are the whole build
context; the build runs with --network=none, which shows the image needs no package index.

Both images are cached in podman's store under a tag that hashes their inputs, so only the
first run on a machine pays for debootstrap (~40 s); stale tags of ours are removed.
crun refuses this machine's hybrid cgroups, hence runc with the cgroupfs manager and explicit
ulimits. Podman leaves cgroup directories (libpod_parent) behind: the ones that appeared
during this module are removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ROOT, TEST_APPS, free_port, http_get, need, need_command, need_root, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("podman")]

CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
BASE_REPO = "localhost/hello-cluster-test-base"
IMAGE_REPO = "localhost/hello-cluster-test"
SUITE = "bookworm"
# python3-venv brings ensurepip (pip's own wheel), enough for `pip install --no-index`.
INCLUDE = "python3,python3-venv"
MIRROR = os.environ.get("HELLO_CLUSTER_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
UID = "10001"
RUNTIME_DIR = "/run/hello-cluster"
HELLO_PAGE = b"<h1>Hello Python!</h1><p>Hello Cluster!</p>"
CGROUP_ROOT = Path("/sys/fs/cgroup")

Podman = Callable[..., subprocess.CompletedProcess[str]]


def cgroup_dirs() -> set[Path]:
    """Every directory under podman's cgroupfs parent, in each hierarchy (v1 and v2)."""
    found: set[Path] = set()
    for parent in [*CGROUP_ROOT.glob("libpod_parent"), *CGROUP_ROOT.glob("*/libpod_parent")]:
        found.add(parent)
        found.update(p for p in parent.rglob("*") if p.is_dir())
    return found


def remove_cgroup_dirs(keep: set[Path]) -> None:
    """rmdir, deepest first, what appeared since `keep` was taken (empty cgroups only)."""
    for _ in range(20):
        new = sorted(cgroup_dirs() - keep, key=lambda p: len(p.parts), reverse=True)
        if not new:
            return
        for path in new:
            try:
                path.rmdir()
            except OSError:
                pass  # still has a task (conmon exiting): the next round retries
        time.sleep(0.1)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """`podman ...` with this machine's runtime settings; cleans podman's cgroups after."""
    need_root()
    exe = need_command("podman", "podman")
    runc = need_command("runc", "runc")
    prefix = [exe, "--runtime", runc, "--cgroup-manager=cgroupfs"]

    def run(*args: str, check: bool = True, timeout: float = 120,
            **kw: object) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*prefix, *args], capture_output=True, text=True,
                                timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    before = cgroup_dirs()
    try:
        yield run
    finally:
        remove_cgroup_dirs(before)


def image_exists(podman: Podman, ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def drop_stale_tags(podman: Podman, repo: str, keep: str) -> None:
    """Our cache keeps one tag per repository: remove the tags of older inputs."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repo, check=False)
    for ref in listed.stdout.split():
        if ref.startswith(repo + ":") and ref != keep:
            podman("rmi", "--force", ref, check=False)


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:16]


def base_image(podman: Podman) -> str:
    """A minimal Debian with python3 at /usr/bin/python3, made here (no registry needed)."""
    ref = f"{BASE_REPO}:{digest(b'v1', SUITE.encode(), INCLUDE.encode(), MIRROR.encode())}"
    if image_exists(podman, ref):
        return ref
    debootstrap = need_command("debootstrap", "debootstrap")
    rootfs = Path(tempfile.mkdtemp(prefix="hello-cluster-rootfs-", dir="/var/tmp"))
    try:
        result = subprocess.run([debootstrap, "--variant=minbase", f"--include={INCLUDE}",
                                 SUITE, str(rootfs), MIRROR],
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}" \
                                       f"\n{result.stderr[-3000:]}"
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            podman("import", "-", ref, stdin=tar.stdout, timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    drop_stale_tags(podman, BASE_REPO, ref)
    return ref


def build_wheels(source: Path, out: Path) -> list[Path]:
    """The project and all its dependencies as wheels for this (the image's) CPython.

    The project is built from a copy: setuptools' in-tree build/ would otherwise litter the
    work tree and keep modules that were since deleted from service/.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "service", source / "service", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):  # the readme: pyproject's `readme =`
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                             "--wheel-dir", str(out), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = sorted(out.glob("*.whl"))
    names = {w.name.split("-")[0].lower() for w in wheels}
    missing = {"hello_cluster", "uvicorn", "uvloop", "httptools", "sdnotify",
               "prometheus_client", "setproctitle", "h11"} - names
    assert not missing, f"wheel set lacks {missing}"
    return wheels


def wheel_fingerprint(wheel: Path) -> bytes:
    """A wheel's name and RECORD (a hash of every file in it): its content, not its mtime."""
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        return wheel.name.encode() + archive.read(record)


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built image (cached by Containerfile, base image and wheel contents)."""
    base = base_image(podman)
    base_id = podman("image", "inspect", "--format", "{{.Id}}", base).stdout.strip()
    wheel_dir = tmp_path_factory.mktemp("wheels")
    wheels = build_wheels(tmp_path_factory.mktemp("source"), wheel_dir)
    key = digest(CONTAINERFILE.read_bytes(), base_id.encode(),
                 *[wheel_fingerprint(w) for w in wheels])
    ref = f"{IMAGE_REPO}:{key}"
    if not image_exists(podman, ref):
        podman("build", "--layers=false", "--network=none", *ULIMITS,
               "--build-arg", f"BASE={base}", "--file", str(CONTAINERFILE),
               "--tag", ref, str(wheel_dir), timeout=900)
        drop_stale_tags(podman, IMAGE_REPO, ref)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return ref


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples (unlabelled or over its labels) from /metrics."""
    status, _, body = http_get(port, "/metrics")
    assert status == 200
    values = [float(line.rpartition(" ")[2]) for line in body.decode().splitlines()
              if line.startswith((name + " ", name + "{"))]
    if not values:
        raise KeyError(name)
    return sum(values)


class Container:
    """One detached container: its name, logs and state."""

    def __init__(self, podman: Podman, name: str) -> None:
        self.podman = podman
        self.name = name

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self, field: str) -> str:
        result = self.podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.name)
        return result.stdout.strip()

    def running(self) -> bool:
        if self.state("Running") == "true":
            return True
        raise AssertionError(f"container exited {self.state('ExitCode')}:\n{self.logs()}")

    def python(self, code: str) -> str:
        """Run Python inside the container (as its user, with its capabilities)."""
        return self.podman("exec", self.name, "python3", "-c", code, timeout=60).stdout


@pytest.fixture
def container(podman: Podman) -> Iterator[Callable[..., Container]]:
    started: list[Container] = []

    def run(image: str, *args: str) -> Container:
        c = Container(podman, f"hello-cluster-test-{os.getpid()}-{free_port()}")
        started.append(c)
        podman("run", "--detach", "--name", c.name, *args, image)
        return c

    yield run
    for c in started:
        podman("rm", "--force", "--time", "0", "--volumes", c.name, check=False, timeout=120)


# What the pod sees, read from inside: PID 1, its user and capabilities, the mounts.
INSPECT = r"""
import json, os
status = dict(line.split(":\t", 1) for line in open("/proc/1/status").read().splitlines()
              if ":\t" in line)
mounts = {}
for line in open("/proc/1/mountinfo"):
    left, _, right = line.partition(" - ")
    fields = left.split()
    mounts[fields[4]] = {"options": fields[5].split(","), "fstype": right.split()[0]}
print(json.dumps({
    "cmdline": open("/proc/1/cmdline").read().split("\0"),
    "uid": status["Uid"].split(), "cap_eff": status["CapEff"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(),
    "root": mounts["/"], "runtime": mounts.get(RUNTIME_DIR),
    "runtime_writable": os.access(RUNTIME_DIR, os.W_OK),
}))
""".replace("RUNTIME_DIR", repr(RUNTIME_DIR))

ZOMBIES_AND_SLEEPERS = r"""
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
    if state == "Z" or comm == "sleep":
        print(pid, comm, state, ppid)
"""


def test_image_runs_like_the_deployment(image: str, container: Callable[..., Container]
                                        ) -> None:
    need(len(os.sched_getaffinity(0)) >= 2,
         "needs 2+ CPUs so that a 0.5 CPU quota is tighter than the affinity")
    port, metrics_port = free_port(), free_port()
    c = container(
        image,
        "--network=host",  # the test reaches it on 127.0.0.1
        "--read-only", "--read-only-tmpfs=false",  # readOnlyRootFilesystem, no free /tmp
        "--cap-drop=ALL", "--security-opt=no-new-privileges",
        "--user", f"{UID}:{UID}",  # runAsUser / runAsGroup
        "--cpus=0.5", "--memory=512m", *ULIMITS,  # resources.limits
        # The emptyDir: a tmpfs owned by the container's user (U).
        "--tmpfs", f"{RUNTIME_DIR}:rw,nosuid,nodev,noexec,size=64m,U",
        "--volume", f"{TEST_APPS}:/apps:ro",
        "--env", "PYTHONPATH=/apps", "--env", "HELLO_CLUSTER_APP=hc_testapp:app",
        "--env", f"HELLO_CLUSTER_BIND=127.0.0.1:{port}",
        "--env", f"HELLO_CLUSTER_METRICS_BIND=127.0.0.1:{metrics_port}",
    )

    def ready() -> bool:
        return c.running() and http_get(metrics_port, "/readyz", timeout=1)[0] == 200

    wait_for(ready, 60, interval=0.2, what="the container's /readyz")

    # One worker, chosen from the cgroup CPU quota (os.cpu_count() inside still says 2+).
    logs = c.logs()
    assert re.search(r"workers: 1 \(auto: cgroup CPU quota 0\.5 CPUs \(\S+\) rounded up to 1, "
                     r"below \d+ CPUs by affinity\)", logs), logs
    assert metric(metrics_port, "hello_cluster_workers_desired") == 1
    status, headers, body = http_get(port, "/")
    assert (status, body) == (200, HELLO_PAGE)
    assert headers["x-worker-pid"] != "1", "the page comes from a worker, not PID 1"
    assert http_get(metrics_port, "/livez")[0] == 200
    assert http_get(metrics_port, "/readyz")[0] == 200

    # The pod's security settings hold inside, and hello-cluster itself is PID 1.
    seen = json.loads(c.python(INSPECT))
    assert seen["cmdline"][0].startswith("hello-cluster"), seen  # its setproctitle
    assert seen["uid"] == [UID] * 4, seen
    assert seen["cap_eff"] == "0000000000000000" and seen["no_new_privs"] == "1", seen
    assert "ro" in seen["root"]["options"], seen
    assert seen["runtime"]["fstype"] == "tmpfs" and seen["runtime_writable"], seen

    # As PID 1 the master reaps orphans: no init inside the image is needed.
    assert http_get(port, "/orphan")[0] == 200
    wait_for(lambda: c.python(ZOMBIES_AND_SLEEPERS).strip() == "", 15, interval=0.3,
             what="the orphaned `sleep` to exit and be reaped by PID 1")

    # `podman stop` = SIGTERM to PID 1: an in-flight request completes, the exit code is 0.
    result: dict[str, object] = {}

    def slow() -> None:
        try:
            result["response"] = http_get(port, "/slow?s=3", timeout=30)
            result["done"] = time.monotonic()
        except OSError as err:
            result["error"] = err

    client = threading.Thread(target=slow, daemon=True)
    client.start()
    wait_for(lambda: metric(metrics_port, "hello_cluster_http_requests_in_progress") >= 1, 10,
             what="the slow request to be in flight")
    stop_sent = time.monotonic()
    c.podman("stop", "--time", "20", c.name, timeout=90)
    client.join(timeout=30)
    assert "error" not in result, f"{result.get('error')}\n{c.logs()}"
    status, _, body = result["response"]
    assert (status, body) == (200, b"slow done\n"), c.logs()
    assert result["done"] > stop_sent
    assert c.state("ExitCode") == "0", c.logs()
