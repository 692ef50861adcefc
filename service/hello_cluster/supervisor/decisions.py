"""What a worker's death means: the restart policy as one pure function.

The master (master.py) gathers the facts of a death into a `Death`, asks `judge_death`, and
applies the verdict: it logs, stops, aborts a reload or schedules the respawn. Nothing here
touches a process, a clock or a log, so every row of the restart-policy table
(docs/how-it-works.md, "Restart policy") is a test of milliseconds
(tests/test_decisions.py). The order of the checks is the policy: the first that holds wins.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from hello_cluster.supervisor import backoff


class Verdict(enum.Enum):
    PLANNED = "planned"  # a reload, scale-down, recycle or shutdown ended it: not a failure
    NOT_RESPAWNED = "not-respawned"  # the master is stopping, or the slot was scaled away
    STOP_START = "stop-start"  # the app cannot start at all: every worker would fail alike
    ABORT_RELOAD = "abort-reload"  # the new generation cannot start: keep the old one
    CRASH_LOOP = "crash-loop"  # too many workers in a row died before becoming ready
    REPLACEMENT_RUNNING = "replacement-running"  # its successor is already starting
    RESPAWN = "respawn"  # after the slot's backoff delay


@dataclass(frozen=True)
class Death:
    """The facts of one death, as the master saw them when it reaped the worker."""

    planned: bool  # the master was retiring it
    stopping: bool  # the master is stopping (an exit code is set)
    scaled_away: bool  # its slot is beyond the desired pool (SIGTTOU)
    start_error: bool  # it said why it cannot start and exited EXIT_APP or EXIT_RESOURCE
    ever_ready: bool  # any worker of this master has ever been ready
    ready_for: float | None  # how long it had been ready (None: it never was)
    new_in_reload: bool  # it belonged to the generation a reload is starting, unready
    old_serving: bool  # workers of the previous generation still serve
    slot_alive: bool  # another worker already holds its slot
    failures: int  # the slot's consecutive failures before this death


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    breaker: backoff.Breaker  # the pool's boot-death breaker after this death
    failures: int  # the slot's consecutive failures after this death
    counted: bool  # an unplanned death: counted in the restarts (metrics and /status)


def judge_death(death: Death, breaker: backoff.Breaker, policy: backoff.Policy) -> Judgement:
    """The verdict on one death, and the counters it leaves behind."""
    unchanged = Judgement(Verdict.PLANNED, breaker, death.failures, counted=False)
    if death.planned:
        return unchanged
    if death.stopping or death.scaled_away:
        return replace(unchanged, verdict=Verdict.NOT_RESPAWNED)
    if death.start_error and not death.ever_ready:
        return replace(unchanged, verdict=Verdict.STOP_START)
    if death.new_in_reload and death.old_serving:
        return replace(unchanged, verdict=Verdict.ABORT_RELOAD)
    breaker = breaker.worker_died(death.ready_for is not None, planned=False)
    failures = backoff.failures_after_death(policy, death.failures, death.ready_for,
                                            planned=False)
    if breaker.tripped:
        verdict = Verdict.CRASH_LOOP
    elif death.slot_alive:
        verdict = Verdict.REPLACEMENT_RUNNING
    else:
        verdict = Verdict.RESPAWN
    return Judgement(verdict, breaker, failures, counted=True)
