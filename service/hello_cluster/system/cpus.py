"""How many workers `--workers auto` means: usable CPUs after affinity and the cgroup quota.

A container limited to half a CPU still sees every core in `os.cpu_count()`; forking one
worker per visible core there only buys context switches. Like Go's automaxprocs we read
the kernel's own files (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`)
for this process's cgroup and every ancestor, take the tightest quota, and round up.

The parsers are pure: they take file text and return numbers or None, and `cgroup_cpu_limit`
takes a root directory so tests can hand it fixture trees.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuDecision:
    workers: int
    reason: str


@dataclass(frozen=True)
class Mount:
    root: str  # the cgroup path the mount shows as its top
    mount_point: str
    fstype: str
    options: frozenset[str]


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max`: `QUOTA PERIOD` or `max PERIOD`; CPUs, or None when unlimited."""
    parts = text.split()
    if len(parts) not in (1, 2) or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) == 2 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`; -1 means unlimited."""
    try:
        quota = int(quota_text.strip())
        period = int(period_text.strip())
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """`/proc/self/cgroup` as controller -> path; the v2 unified entry is under ''."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts of `/proc/self/mountinfo` (see proc(5) for the field layout)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype = tail[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail[2].split(","))
        if len(fields) > 5:
            options |= frozenset(fields[5].split(","))
        mounts.append(Mount(root=fields[3], mount_point=fields[4], fstype=fstype, options=options))
    return mounts


def _relative(path: str, mount_root: str) -> str | None:
    """Where a cgroup `path` lies below a mount showing `mount_root`, or None if outside."""
    if mount_root == "/":
        return path
    if path == mount_root or path.startswith(mount_root.rstrip("/") + "/"):
        return path[len(mount_root) :] or "/"
    # In a cgroup namespace /proc/self/cgroup shows paths relative to the namespace root,
    # which is the mount's root: take the path as it stands below the mount point.
    return path


def _read(root: Path, path: str) -> str | None:
    try:
        return (root / path.lstrip("/")).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(mount_point: str, rel: str) -> list[str]:
    """The cgroup directory and each parent up to the mount point, innermost first."""
    parts = [p for p in rel.split("/") if p]
    return [os.path.join(mount_point, *parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = Path("/")) -> tuple[float, str] | None:
    """The tightest CPU quota on this process's cgroup path, with where it was found."""
    cgroup_text = _read(root, "/proc/self/cgroup")
    mountinfo_text = _read(root, "/proc/self/mountinfo")
    if cgroup_text is None or mountinfo_text is None:
        return None
    paths = parse_proc_cgroup(cgroup_text)
    best: tuple[float, str] | None = None
    for mount in parse_mountinfo(mountinfo_text):
        if mount.fstype == "cgroup2" and "" in paths:
            rel = _relative(paths[""], mount.root)
            files: list[tuple[str, ...]] = [("cpu.max",)]
        elif mount.fstype == "cgroup" and "cpu" in mount.options and "cpu" in paths:
            rel = _relative(paths["cpu"], mount.root)
            files = [("cpu.cfs_quota_us", "cpu.cfs_period_us")]
        else:
            continue
        if rel is None:
            continue
        for directory in _ancestors(mount.mount_point, rel):
            for names in files:
                texts = [_read(root, os.path.join(directory, name)) for name in names]
                if any(t is None for t in texts):
                    continue
                cpus = parse_cpu_max(texts[0]) if len(names) == 1 else parse_cfs(*texts)  # type: ignore[arg-type]
                if cpus is not None and (best is None or cpus < best[0]):
                    best = (cpus, os.path.join(directory, names[0]))
    return best


def decide_workers(affinity: int, quota: tuple[float, str] | None) -> CpuDecision:
    """Pure: the worker count for `--workers auto`, with the reason an operator reads."""
    affinity = max(1, affinity)
    if quota is None:
        return CpuDecision(affinity, f"{affinity} CPUs usable by affinity, no cgroup CPU quota")
    cpus, where = quota
    limited = max(1, math.ceil(cpus - 1e-9))
    if limited < affinity:
        return CpuDecision(limited, f"cgroup CPU quota {cpus:g} CPUs ({where}) rounded up to "
                                    f"{limited}, below {affinity} CPUs by affinity")
    return CpuDecision(affinity, f"{affinity} CPUs usable by affinity; cgroup CPU quota "
                                 f"{cpus:g} ({where}) is not tighter")


def auto_workers(root: Path = Path("/")) -> CpuDecision:
    return decide_workers(len(os.sched_getaffinity(0)), cgroup_cpu_limit(root))


@dataclass(frozen=True)
class PinPlan:
    """Which CPU each worker slot is pinned to (`--cpu-affinity auto`), or none."""

    cpus: tuple[int, ...]  # slot i runs on cpus[i % len(cpus)]; empty: nobody is pinned
    reason: str

    def cpu_for(self, slot: int) -> int | None:
        return self.cpus[slot % len(self.cpus)] if self.cpus else None


def plan_pinning(mode: str, usable: Iterable[int], workers: int,
                 quota: tuple[float, str] | None) -> PinPlan:
    """Pure: which CPU each slot may be pinned to (`auto`: when its worker decides to,
    worker/affinity.py; `always`: at start), round-robin, or none.

    Only when every usable CPU gets the same number of workers (else the kernel could not
    even the load out) and no cgroup quota is tighter than the CPUs (then they are shared
    with others, and a pinned worker could not leave a busy one); nginx's
    `worker_cpu_affinity auto` binds workers round-robin the same way.
    """
    cpus = tuple(sorted(set(usable)))
    if mode == "none":
        return PinPlan((), "--cpu-affinity none")
    if len(cpus) < 2:
        return PinPlan((), f"{len(cpus)} usable CPU: nothing to choose")
    if workers < len(cpus) or workers % len(cpus):
        return PinPlan((), f"{workers} workers do not divide evenly over {len(cpus)} CPUs")
    if quota is not None and quota[0] < len(cpus) - 1e-9:
        return PinPlan((), f"the cgroup CPU quota ({quota[0]:g} CPUs, {quota[1]}) is below "
                           f"the {len(cpus)} usable CPUs: they are shared")
    listed = ",".join(map(str, cpus))
    return PinPlan(cpus, f"{workers} workers over CPUs {listed}, round-robin by slot")
