"""The restart policy as a pure function (supervisor/decisions.py): one test per row of the
table in docs/how-it-works.md ("Restart policy"), and properties over any death."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from hello_cluster.supervisor.backoff import Breaker, Policy
from hello_cluster.supervisor.decisions import Death, Verdict, judge_death

POLICY = Policy(initial=0.1, factor=2.0, cap=30.0, reset_after=10.0, crash_loop_limit=3)
FIRST = Death(planned=False, stopping=False, scaled_away=False, start_error=False,
              ever_ready=True, ready_for=60.0, new_in_reload=False, old_serving=False,
              slot_alive=False, failures=0)


def test_a_first_death_respawns_at_once() -> None:
    """Row 1: a slot's worker dies for the first time: respawn, failure 1 (no delay)."""
    judged = judge_death(FIRST, Breaker(3), POLICY)
    assert judged.verdict is Verdict.RESPAWN and judged.failures == 1 and judged.counted


def test_ready_past_reset_after_counts_as_a_first_death_again() -> None:
    """Row 1, the second half: ready for --backoff-reset-after proves the slot healthy."""
    judged = judge_death(replace(FIRST, failures=7, ready_for=10.0), Breaker(3), POLICY)
    assert judged.failures == 1


def test_the_same_slot_failing_again_backs_off() -> None:
    """Row 2: the count grows, so the backoff ceiling grows (backoff.delay takes it)."""
    judged = judge_death(replace(FIRST, failures=2, ready_for=1.0), Breaker(3), POLICY)
    assert judged.verdict is Verdict.RESPAWN and judged.failures == 3


def test_boot_deaths_in_a_row_trip_the_crash_loop() -> None:
    """Row 3: --crash-loop-limit workers in a row die before ever becoming ready: stop."""
    breaker, verdicts = Breaker(3), []
    for _ in range(3):
        judged = judge_death(replace(FIRST, ready_for=None), breaker, POLICY)
        breaker = judged.breaker
        verdicts.append(judged.verdict)
    assert verdicts == [Verdict.RESPAWN, Verdict.RESPAWN, Verdict.CRASH_LOOP]


def test_a_ready_death_does_not_feed_the_crash_loop() -> None:
    judged = judge_death(FIRST, Breaker(3, boot_deaths=2), POLICY)
    assert judged.verdict is Verdict.RESPAWN and judged.breaker.boot_deaths == 2


def test_an_app_that_cannot_start_stops_the_start() -> None:
    """Row 4 (and 5, --user): a start error before any worker was ready: no retries."""
    judged = judge_death(replace(FIRST, start_error=True, ever_ready=False, ready_for=None),
                         Breaker(3), POLICY)
    assert judged.verdict is Verdict.STOP_START and not judged.counted


def test_a_start_error_after_the_pool_was_ready_is_an_ordinary_death() -> None:
    judged = judge_death(replace(FIRST, start_error=True, ready_for=None), Breaker(3), POLICY)
    assert judged.verdict is Verdict.RESPAWN


def test_a_reloads_new_workers_dying_keep_the_old_generation() -> None:
    """Row 6: a reload's new worker dies unready while old ones serve: abort the reload."""
    judged = judge_death(replace(FIRST, new_in_reload=True, old_serving=True, ready_for=None),
                         Breaker(3), POLICY)
    assert judged.verdict is Verdict.ABORT_RELOAD and not judged.counted
    alone = judge_death(replace(FIRST, new_in_reload=True, ready_for=None), Breaker(3), POLICY)
    assert alone.verdict is Verdict.RESPAWN  # nothing old to keep: an ordinary death


def test_planned_ends_are_never_failures() -> None:
    """Row 7: reload, scale-down, recycling and shutdown are not counted."""
    judged = judge_death(replace(FIRST, planned=True, failures=4, ready_for=None),
                         Breaker(3, boot_deaths=2), POLICY)
    assert judged.verdict is Verdict.PLANNED and judged.failures == 4
    assert judged.breaker.boot_deaths == 2 and not judged.counted


def test_stopping_or_scaled_away_is_not_respawned() -> None:
    for death in (replace(FIRST, stopping=True), replace(FIRST, scaled_away=True)):
        assert judge_death(death, Breaker(3), POLICY).verdict is Verdict.NOT_RESPAWNED


def test_a_replacement_already_running_is_not_doubled() -> None:
    judged = judge_death(replace(FIRST, slot_alive=True), Breaker(3), POLICY)
    assert judged.verdict is Verdict.REPLACEMENT_RUNNING and judged.counted


deaths = st.builds(Death, planned=st.booleans(), stopping=st.booleans(),
                   scaled_away=st.booleans(), start_error=st.booleans(),
                   ever_ready=st.booleans(),
                   ready_for=st.none() | st.floats(0, 1e6, allow_nan=False),
                   new_in_reload=st.booleans(), old_serving=st.booleans(),
                   slot_alive=st.booleans(), failures=st.integers(0, 10**6))


@given(deaths, st.integers(0, 20))
def test_only_counted_deaths_change_the_counters(death: Death, boot_deaths: int) -> None:
    breaker = Breaker(10, boot_deaths)
    judged = judge_death(death, breaker, POLICY)
    counted = judged.verdict in (Verdict.CRASH_LOOP, Verdict.REPLACEMENT_RUNNING,
                                 Verdict.RESPAWN)
    assert judged.counted is counted
    if not counted:
        assert judged.breaker == breaker and judged.failures == death.failures
    else:
        assert 1 <= judged.failures <= death.failures + 1
    if death.planned:
        assert judged.verdict is Verdict.PLANNED
