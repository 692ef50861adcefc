"""Was that SIGKILL the kernel's OOM killer? The cgroup's `oom_kill` counter says.

A worker killed for memory looks like any SIGKILL from its exit status; the memory
controller counts OOM kills in `memory.events` (v2) or `memory.oom_control` (v1). Where
neither is readable we cannot tell, and say `signal`.
"""

from __future__ import annotations

import os
from pathlib import Path

from hello_cluster.config import is_decimal
from hello_cluster.system.cpus import parse_mountinfo, parse_proc_cgroup


def parse_oom_kills(text: str) -> int | None:
    """The `oom_kill N` line of memory.events or memory.oom_control."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "oom_kill" and is_decimal(parts[1]):
            return int(parts[1])
    return None


def oom_events_file(root: Path = Path("/")) -> Path | None:
    try:
        paths = parse_proc_cgroup((root / "proc/self/cgroup").read_text())
        mounts = parse_mountinfo((root / "proc/self/mountinfo").read_text())
    except OSError:
        return None
    for mount in mounts:
        if mount.fstype == "cgroup2" and "" in paths:
            name, path = "memory.events", paths[""]
        elif mount.fstype == "cgroup" and "memory" in mount.options and "memory" in paths:
            name, path = "memory.oom_control", paths["memory"]
        else:
            continue
        if mount.root != "/" and path.startswith(mount.root):
            path = path[len(mount.root):] or "/"
        candidate = root / mount.mount_point.lstrip("/") / path.lstrip("/") / name
        if candidate.is_file() and os.access(candidate, os.R_OK):
            return candidate
    return None


class OomWatch:
    def __init__(self, root: Path = Path("/")) -> None:
        self.path = oom_events_file(root)
        self.last = self._read()

    def _read(self) -> int | None:
        if self.path is None:
            return None
        try:
            return parse_oom_kills(self.path.read_text())
        except OSError:
            return None

    def rose(self) -> bool:
        now = self._read()
        rose = now is not None and self.last is not None and now > self.last
        if now is not None:
            self.last = now
        return rose
