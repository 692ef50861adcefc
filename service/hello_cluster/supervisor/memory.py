"""How much memory a worker costs, as the kernel counts it, read by the master from /proc.

"Memory" for `--max-worker-memory` is the worker's USS (unique set size): its private
pages, clean and dirty (`Private_Clean + Private_Dirty` in `/proc/PID/smaps_rollup`).
That is what the machine gets back when the worker is replaced, and what a leak grows.

- RSS would count every page a worker shares with its siblings, copy-on-write from the
  master or from the `--preload` template, once in every worker: a preloaded 500 MB app
  would put every worker "over" a 300 MB limit on its first breath.
- PSS divides shared pages among their sharers, so a worker's figure moves when a sibling
  is born or dies: a worker could cross the limit because another one was recycled.
- USS moves only with the worker's own allocations.

`smaps_rollup` makes the kernel walk the process's page tables (tens of microseconds);
the RSS in `/proc/PID/stat` is a counter read. Since USS <= RSS, a worker whose RSS is under
the limit cannot be over it, so the master reads `stat` for every worker and `smaps_rollup`
only for the ones whose RSS is over the limit: the cost stays near zero until memory is
actually high.
"""

from __future__ import annotations

from hello_cluster.system import procstat


def parse_smaps_rollup_uss(text: str) -> int:
    """Private_Clean + Private_Dirty from /proc/PID/smaps_rollup, in bytes."""
    total = 0
    found = False
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Private_Clean", "Private_Dirty"):
            value, _, unit = rest.strip().partition(" ")
            if unit.strip() != "kB":
                raise ValueError(f"unexpected unit in smaps_rollup: {line!r}")
            total += int(value) * 1024
            found = True
    if not found:
        raise ValueError("no Private_* lines in smaps_rollup")
    return total


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None  # the worker died a moment ago: the reaper will tell


def rss_bytes(pid: int) -> int | None:
    """Resident bytes, from the one /proc/PID/stat read /status and the metrics use too."""
    stat = procstat.read_stat(pid)
    return None if stat is None else stat.rss_bytes


def uss_bytes(pid: int) -> int | None:
    text = _read(f"/proc/{pid}/smaps_rollup")
    try:
        return None if text is None else parse_smaps_rollup_uss(text)
    except ValueError:
        return None


def worker_memory(pid: int, limit: int) -> int | None:
    """The worker's USS when it might be over `limit`, else its RSS (a bound from above
    that already says "under"); None when the process is gone."""
    rss = rss_bytes(pid)
    if rss is None or rss <= limit:
        return rss
    return uss_bytes(pid)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
