"""Planned replacements for memory and age: which worker to recycle, and when.

`--max-worker-memory` and `--max-worker-lifetime` recycle a worker the way `--max-requests`
does: its replacement is forked and ready before it drains, so no request fails. This
module only decides; the master applies the decision. Three rules keep the pool whole:

- One at a time. No memory or lifetime recycle begins while another is in flight (from
  the decision until the old worker has exited), so a leak in every worker, or a pool
  whose workers all reach their lifetime together, never replaces more than one at once.
- Lifetimes are paced. At most one lifetime recycle begins per `lifetime / pool size`
  seconds, oldest first: a pool started together is replaced over one lifetime (between
  `lifetime` and twice that after start), and its ages stay spread from then on, so two
  slots never recycle together.
- No recycle storms for memory. A worker must be over the limit for MEMORY_STRIKES
  samples in a row, one a second, so a spike is not a leak. A worker already over the
  limit at its first sample after becoming ready did not leak: the app needs more than
  the limit, and its replacement would be over it too. It is left alone, and the first
  such worker is logged once (a warning naming the limit), not every one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hello_cluster.supervisor import memory

log = logging.getLogger("hello_cluster.master")

MEMORY_SAMPLE = 1.0  # seconds between two samples of every worker's memory
MEMORY_STRIKES = 3  # consecutive samples over the limit that make a recycle


class Candidate(Protocol):
    """What the policy reads of a worker (master.Worker has it)."""

    @property
    def pid(self) -> int: ...

    @property
    def slot(self) -> int: ...

    @property
    def spawned_at(self) -> float: ...


@dataclass
class Decision:
    worker: Candidate
    reason: str  # "memory" or "lifetime"
    detail: str  # for the log line: what was measured


@dataclass
class Recycler:
    max_memory: int = 0  # bytes; 0 = off
    max_lifetime: float = 0.0  # seconds; 0 = off
    read_memory: Callable[[int, int], int | None] = memory.worker_memory
    next_sample: float = 0.0
    last_lifetime: float = -math.inf  # when the last lifetime recycle began
    strikes: dict[int, int] = field(default_factory=dict)  # pid -> samples over in a row
    sampled: set[int] = field(default_factory=set)  # pids that had their first sample
    exempt: set[int] = field(default_factory=set)  # over the limit from their first sample
    told_exempt: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.max_memory or self.max_lifetime)

    def forget(self, pid: int) -> None:
        """The worker is gone (or going): its samples no longer matter."""
        self.strikes.pop(pid, None)
        self.sampled.discard(pid)
        self.exempt.discard(pid)

    def due(self, serving: Sequence[Candidate], now: float, pool: int,
            in_flight: bool) -> Decision | None:
        """The one worker to recycle now, or None. `serving`: ready workers not already
        being replaced; `in_flight`: a memory or lifetime recycle has not finished."""
        over = self.sample_memory(serving, now) if self.max_memory else []
        if in_flight:
            return None
        if over:
            worst, used = max(over, key=lambda pair: pair[1])
            return Decision(worst, "memory",
                            f"memory {memory.format_bytes(used)} USS over --max-worker-memory "
                            f"{memory.format_bytes(self.max_memory)} for {MEMORY_STRIKES} "
                            "samples")
        if self.max_lifetime:
            return self.oldest_past_lifetime(serving, now, pool)
        return None

    def sample_memory(self, serving: Sequence[Candidate], now: float
                      ) -> list[tuple[Candidate, int]]:
        """Once a MEMORY_SAMPLE: the workers over the limit for MEMORY_STRIKES samples."""
        if now < self.next_sample:
            return []
        self.next_sample = now + MEMORY_SAMPLE
        over: list[tuple[Candidate, int]] = []
        for w in serving:
            used = self.read_memory(w.pid, self.max_memory)
            if used is None:
                continue
            first = w.pid not in self.sampled
            self.sampled.add(w.pid)
            if used <= self.max_memory:
                self.strikes.pop(w.pid, None)
                continue
            if first:
                self.exempt.add(w.pid)
                if not self.told_exempt:
                    self.told_exempt = True
                    log.warning("worker %d pid %d uses %s just after start, over "
                                "--max-worker-memory %s: the app needs more than the limit, "
                                "so workers over it from the start are not recycled; raise "
                                "the limit", w.slot + 1, w.pid, memory.format_bytes(used),
                                memory.format_bytes(self.max_memory))
            if w.pid in self.exempt:
                continue
            self.strikes[w.pid] = self.strikes.get(w.pid, 0) + 1
            if self.strikes[w.pid] >= MEMORY_STRIKES:
                over.append((w, used))
        return over

    def oldest_past_lifetime(self, serving: Sequence[Candidate], now: float,
                             pool: int) -> Decision | None:
        if now - self.last_lifetime < self.max_lifetime / max(1, pool):
            return None
        oldest = min(serving, key=lambda w: w.spawned_at, default=None)
        if oldest is None or now - oldest.spawned_at < self.max_lifetime:
            return None
        self.last_lifetime = now
        return Decision(oldest, "lifetime",
                        f"lifetime: {now - oldest.spawned_at:.1f}s old, --max-worker-lifetime "
                        f"{self.max_lifetime:g}s")
