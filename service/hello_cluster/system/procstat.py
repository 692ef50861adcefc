"""A worker's memory, CPU time and start time, as the kernel reports them in /proc.

The master reads these at scrape (or /status) time, so the workers do no work for them.
One read of `/proc/PID/stat` per worker gives all three: its `rss` field is the same
resident-page count as `/proc/PID/statm`'s second field (both are the kernel's
get_mm_rss), so reading statm too would only double the syscalls at 128 workers.

A slot's CPU time must survive respawns to be a counter: `SlotCpu` keeps the CPU time
of every reaped worker per slot, from the rusage `wait4` hands back, and adds the live
workers' time read here.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    cpu_seconds: float  # user + system time of the process itself (not its children)
    rss_bytes: int
    start_ticks: int  # clock ticks after boot


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/PID/stat. The command name (field 2) may hold spaces and parentheses,
    so the fields are counted from the last ')'."""
    head, sep, rest = text.rpartition(")")
    if not sep or "(" not in head:
        raise ValueError("not a /proc/PID/stat line")
    fields = rest.split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, starttime 22, rss 24.
    utime, stime = int(fields[11]), int(fields[12])
    return ProcStat(cpu_seconds=(utime + stime) / CLOCK_TICKS,
                    rss_bytes=int(fields[21]) * PAGE_SIZE, start_ticks=int(fields[19]))


def parse_boot_time(text: str) -> float:
    """The `btime` line of /proc/stat: the boot time in seconds since the epoch."""
    for line in text.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime line in /proc/stat")


def read_stat(pid: int, proc: str = "/proc") -> ProcStat | None:
    """The process's numbers, or None when it is gone (a worker may die at any moment)."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as f:
            return parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


_boot_time: float | None = None


def boot_time(proc: str = "/proc") -> float:
    """Read once: the boot time does not change while we run."""
    global _boot_time
    if _boot_time is None:
        with open(f"{proc}/stat", encoding="ascii") as f:
            _boot_time = parse_boot_time(f.read())
    return _boot_time


def start_time(stat: ProcStat) -> float:
    """Seconds since the epoch, as prometheus-client's process_start_time_seconds does it."""
    return boot_time() + stat.start_ticks / CLOCK_TICKS


def rusage_cpu(usage: resource.struct_rusage) -> float:
    return float(usage.ru_utime + usage.ru_stime)


@dataclass
class SlotCpu:
    """CPU seconds of each slot's dead workers, so a slot's total never goes back."""

    dead: dict[int, float] = field(default_factory=dict)

    def worker_reaped(self, slot: int, usage: resource.struct_rusage) -> None:
        self.dead[slot] = self.dead.get(slot, 0.0) + rusage_cpu(usage)

    def total(self, slot: int, live: float) -> float:
        return self.dead.get(slot, 0.0) + live


def pinned_cpu(pid: int, own_cpus: int) -> int | None:
    """The one CPU a worker is pinned to now (`--cpu-affinity`), or None: free to move
    (its mask is wider than one CPU, or no wider than the master's own, `own_cpus` CPUs:
    read once per /status document by the caller), or gone."""
    try:
        cpus = os.sched_getaffinity(pid)
    except OSError:
        return None
    if len(cpus) != 1 or own_cpus < 2:
        return None
    return next(iter(cpus))
