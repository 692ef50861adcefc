"""What a death or a failed reload means: the master's decisions as pure functions.

The master (master.py) gathers the facts of a worker's death into a `Death`, asks
`judge_death`, and applies the verdict: it logs, stops, aborts a reload or schedules the
respawn. A --preload template's death is `judge_template_death`, and what is kept when a
reload fails is `abandon_reload`. Nothing here touches a process, a clock or a log, so
every row of the restart-policy table (docs/how-it-works.md, "Restart policy") is a test
of milliseconds (tests/test_decisions.py; tests/test_master.py drives the master itself
over a fake process table). The order of the checks is the policy: the first that holds wins.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Callable, Iterable
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


def death_reason(hung: bool, status: int, oom_rose: Callable[[], bool]) -> str:
    """The `reason` label of an unplanned death (hello_cluster_worker_restarts_total): killed
    after --worker-timeout, by the kernel's OOM killer (a SIGKILL while the cgroup's oom_kill
    count rose; `oom_rose` is asked only then), by another signal, or its own exit."""
    if hung:
        return "timeout"
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) == signal.SIGKILL and oom_rose():
            return "oom"
        return "signal"
    return "exit"


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


# ---- a --preload template's death -----------------------------------------------------------

class TemplateVerdict(enum.Enum):
    ABORT_RELOAD = "abort-reload"  # a reload's template could not import the new code
    STOP_START = "stop-start"  # the app cannot be imported at start: exit 4, said once
    FORGET = "forget"  # the master is stopping, or the template's generation no longer serves
    REPLACE = "replace"  # a new template for the current generation, after a backoff


@dataclass(frozen=True)
class TemplateDeath:
    """The facts of one template's death (supervisor/template.py), as the master reaped it."""

    imported: bool  # it had said READY: the app was imported, workers could be forked
    current: bool  # it was the current generation's template
    reloading: bool  # a reload (SIGHUP) is under way
    old_serving: bool  # workers of an older generation still serve
    ever_ready: bool  # any worker of this master has ever been ready
    stopping: bool  # the master is stopping (an exit code is set)
    failures: int  # the template's consecutive failures before this death


@dataclass(frozen=True)
class TemplateJudgement:
    verdict: TemplateVerdict
    failures: int  # consecutive template failures after this death (the backoff's n)


def judge_template_death(death: TemplateDeath) -> TemplateJudgement:
    """What a template's death means; the first rule that holds wins.

    A template that could not import the app fails the start (nothing was ever served, and
    every template would fail alike) or, in a reload, abandons it while old workers serve.
    Any other death of the current generation's template is replaced with the backoff of
    backoff.delay, counted across the master's life: an import that fails again after the
    pool served (the files changed under a template that died) waits like a crashing worker
    instead of forking a new template at once after each failed import.
    """
    same = TemplateJudgement(TemplateVerdict.FORGET, death.failures)
    if death.stopping:
        return same
    if not death.imported:
        if death.reloading and death.current and death.old_serving:
            return replace(same, verdict=TemplateVerdict.ABORT_RELOAD)
        if not death.ever_ready:
            return replace(same, verdict=TemplateVerdict.STOP_START)
    if not death.current:
        return same
    return TemplateJudgement(TemplateVerdict.REPLACE, death.failures + 1)


# ---- a reload's failure -------------------------------------------------------------------

@dataclass(frozen=True)
class Abandon:
    """A reload abandoned: the generation that serves on, and the one that ends."""

    keep: int  # the newest generation among the workers that still serve
    kept: int  # how many workers of older generations serve on
    retire: int  # the failed generation: its workers drain, its template is stopped


def abandon_reload(serving: Iterable[int], failed: int) -> Abandon | None:
    """What a reload's failure means, given the generations of the workers not being retired.

    With workers of an older generation still serving, the reload is abandoned: they serve
    on, the new generation's workers drain (siblings of a worker that could not start fail
    the same way), and a SIGHUP that came during the reload is dropped, since it would load
    the same code. With none left (they died meanwhile) there is nothing to keep: None, and
    the death is judged as any other (judge_death), so the new generation gets its retries.
    """
    old = [g for g in serving if g < failed]
    if not old:
        return None
    return Abandon(keep=max(old), kept=len(old), retire=failed)
