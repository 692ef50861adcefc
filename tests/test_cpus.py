"""cgroup CPU quota parsing on fixture trees (v1, v2, nested, max, garbage), and one real cgroup."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from conftest import v1_cgroup
from hello_cluster.system.cpus import (
    cgroup_cpu_limit,
    decide_workers,
    parse_cfs,
    parse_cpu_max,
    parse_mountinfo,
    parse_proc_cgroup,
    plan_pinning,
)

V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTINFO = (
    "25 23 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
    "26 23 0:23 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
)


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_parse_cpu_max() -> None:
    assert parse_cpu_max("50000 100000\n") == 0.5
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("150000") == 1.5
    for garbage in ("", "x y", "-5 100000", "1 2 3", "100 0"):
        assert parse_cpu_max(garbage) is None


def test_parse_cfs() -> None:
    assert parse_cfs("-1", "100000") is None
    assert parse_cfs("250000\n", "100000\n") == 2.5
    assert parse_cfs("garbage", "100000") is None


def test_v2_tree(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "/proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
        "/proc/self/mountinfo": V2_MOUNTINFO,
        "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000\n",  # nested: parent limits
        "/sys/fs/cgroup/kubepods/cpu.max": "max 100000\n",
    })
    cpus, where = cgroup_cpu_limit(root)
    assert cpus == 1.5 and where.endswith("kubepods/pod1/cpu.max")
    assert decide_workers(4, (cpus, where)).workers == 2


def test_v1_tree(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "/proc/self/cgroup": "5:memory:/app\n4:cpu,cpuacct:/app/web\n0::/\n",
        "/proc/self/mountinfo": V1_MOUNTINFO,
        "/sys/fs/cgroup/cpu,cpuacct/app/web/cpu.cfs_quota_us": "50000\n",
        "/sys/fs/cgroup/cpu,cpuacct/app/web/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_limit(root) == (0.5, "/sys/fs/cgroup/cpu,cpuacct/app/web/cpu.cfs_quota_us")
    decision = decide_workers(2, cgroup_cpu_limit(root))
    assert decision.workers == 1 and "quota 0.5" in decision.reason


def test_container_view_with_mount_root(tmp_path: Path) -> None:
    """Inside a container the mount shows the container's cgroup as its root."""
    root = tree(tmp_path, {
        "/proc/self/cgroup": "4:cpu,cpuacct:/libpod_parent/abc\n",
        "/proc/self/mountinfo": "25 23 0:22 /libpod_parent/abc /sys/fs/cgroup/cpu,cpuacct ro "
                                "- cgroup cgroup rw,cpu,cpuacct\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000",
    })
    assert cgroup_cpu_limit(root) is not None
    assert cgroup_cpu_limit(root)[0] == 0.5


def test_no_quota_and_garbage(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "/proc/self/cgroup": "garbage\n\n::\n",
        "/proc/self/mountinfo": "nonsense line\n" + V2_MOUNTINFO,
    })
    assert cgroup_cpu_limit(root) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None
    assert decide_workers(3, None).workers == 3
    assert decide_workers(0, None).workers == 1
    assert decide_workers(2, (8.0, "x")).workers == 2  # quota looser than affinity
    assert decide_workers(8, (0.01, "x")).workers == 1  # never below one


@given(st.text(max_size=200))
def test_parsers_never_raise(text: str) -> None:
    parse_cpu_max(text)
    parse_cfs(text, text)
    parse_proc_cgroup(text)
    parse_mountinfo(text)


def test_real_v1_cpu_cgroup_gives_one_worker(cluster) -> None:
    """A real cgroup v1 CPU quota of half a CPU: `--workers auto` forks one worker."""
    quota = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}
    with v1_cgroup("cpu", quota) as enter:
        c = cluster("--workers", "auto", preexec_fn=enter)
        assert "workers: 1 (auto: cgroup CPU quota 0.5" in c.log
        assert c.metric("hello_cluster_workers_desired") == 1
        assert len(c.workers()) == 1
        c.kill_all()


# --cpu-affinity: the pure plan.

def test_pinning_round_robin_when_the_workers_divide_evenly() -> None:
    plan = plan_pinning("auto", {1, 0}, 2, None)
    assert plan.cpus == (0, 1)
    assert [plan.cpu_for(slot) for slot in range(2)] == [0, 1]
    four = plan_pinning("auto", [3, 1, 1], 4, (2.0, "/sys/fs/cgroup/cpu.max"))
    assert [four.cpu_for(slot) for slot in range(4)] == [1, 3, 1, 3]


def test_no_pinning_where_it_cannot_help_or_would_hurt() -> None:
    cases = {
        ("none", (0, 1), 2, None): "--cpu-affinity none",
        ("auto", (0,), 1, None): "1 usable CPU",
        ("auto", (0, 1), 1, None): "do not divide evenly",
        ("auto", (0, 1), 3, None): "do not divide evenly",
        ("auto", (0, 1, 2, 3), 2, None): "do not divide evenly",
        ("auto", (0, 1), 2, (1.5, "/x/cpu.max")): "quota (1.5 CPUs, /x/cpu.max) is below",
    }
    for (mode, cpus, workers, quota), reason in cases.items():
        plan = plan_pinning(mode, cpus, workers, quota)
        assert plan.cpus == () and plan.cpu_for(0) is None, (mode, cpus, workers, quota)
        assert reason in plan.reason


@given(st.sets(st.integers(0, 63), min_size=0, max_size=8), st.integers(1, 64),
       st.none() | st.floats(0.1, 80))
def test_a_pinned_plan_gives_every_cpu_the_same_share(cpus: set[int], workers: int,
                                                      quota: float | None) -> None:
    plan = plan_pinning("auto", cpus, workers, None if quota is None else (quota, "q"))
    if not plan.cpus:
        return
    assert set(plan.cpus) == cpus and (quota is None or quota >= len(cpus) - 1e-9)
    shares = [plan.cpu_for(slot) for slot in range(workers)]
    assert {shares.count(cpu) for cpu in cpus} == {workers // len(cpus)}
