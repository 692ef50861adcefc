"""The restart policy, as pure functions the master applies to real processes.

Node's cluster respawns a dead worker at once, forever, so a worker that dies on boot turns
into a fork storm. Here a slot's first unplanned death respawns at once (one-off crashes heal
immediately), consecutive ones wait with exponential backoff and full jitter, and a pool
whose workers keep dying before they ever become ready trips a breaker so that systemd or
Kubernetes, which can see the whole picture, takes over.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    initial: float = 0.1
    factor: float = 2.0
    cap: float = 30.0
    reset_after: float = 10.0
    crash_loop_limit: int = 10


def ceiling(policy: Policy, failures: int) -> float:
    """The largest delay before respawning after the `failures`-th consecutive failure.

    The first failure respawns at once; the n-th (n >= 2) waits up to
    `initial * factor ** (n - 2)`, capped. Computed in log space so huge n cannot overflow.
    """
    if failures <= 1 or policy.cap <= 0:
        return 0.0
    if policy.initial <= 0:
        return 0.0
    exponent = failures - 2
    limit = math.log(policy.cap / policy.initial)
    if policy.factor > 1 and exponent * math.log(policy.factor) >= limit:
        return policy.cap
    return min(policy.cap, policy.initial * policy.factor**exponent)


def delay(policy: Policy, failures: int, rand: Callable[[], float] = random.random) -> float:
    """Full jitter (uniform over [0, ceiling]): spreads respawns so slots don't move in step."""
    return min(ceiling(policy, failures), max(0.0, rand()) * ceiling(policy, failures))


def failures_after_death(
    policy: Policy, failures: int, ready_for: float | None, planned: bool
) -> int:
    """A slot's consecutive-failure count after its worker ended.

    `ready_for` is how long the worker had been ready (None if it never was). Planned ends
    (reload, scale-down, recycling, shutdown) are not failures. A worker that stayed ready for
    `reset_after` proves the slot healthy, so the death that ends it counts as the first.
    """
    if planned:
        return failures
    if ready_for is not None and ready_for >= policy.reset_after:
        return 1
    return failures + 1


@dataclass(frozen=True)
class Breaker:
    """Consecutive boot deaths across the pool; any worker becoming ready clears it."""

    limit: int
    boot_deaths: int = 0

    def worker_ready(self) -> Breaker:
        return Breaker(self.limit, 0)

    def worker_died(self, became_ready: bool, planned: bool) -> Breaker:
        if planned or became_ready:
            return self
        return Breaker(self.limit, self.boot_deaths + 1)

    @property
    def tripped(self) -> bool:
        return self.boot_deaths >= self.limit
