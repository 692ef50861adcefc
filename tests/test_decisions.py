"""The restart policy as a pure function (supervisor/decisions.py): one test per row of the
table in docs/how-it-works.md ("Restart policy"), and properties over any death."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from hello_cluster.supervisor.backoff import Breaker, Policy
from hello_cluster.supervisor.decisions import (
    Abandon,
    Death,
    TemplateDeath,
    TemplateVerdict,
    Verdict,
    abandon_reload,
    judge_death,
    judge_template_death,
)

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


# ---- a --preload template's death (decisions.judge_template_death) --------------------------

SERVING = TemplateDeath(imported=True, current=True, reloading=False, old_serving=False,
                        ever_ready=True, stopping=False, failures=0)


def test_a_template_that_cannot_import_at_start_stops_the_start() -> None:
    judged = judge_template_death(replace(SERVING, imported=False, ever_ready=False))
    assert judged.verdict is TemplateVerdict.STOP_START and judged.failures == 0


def test_a_reloads_template_that_cannot_import_keeps_the_old_generation() -> None:
    death = replace(SERVING, imported=False, reloading=True, old_serving=True)
    assert judge_template_death(death).verdict is TemplateVerdict.ABORT_RELOAD
    # an older generation's template is never a reason to abandon the current reload
    old = judge_template_death(replace(death, current=False))
    assert old.verdict is TemplateVerdict.FORGET


def test_a_serving_template_that_dies_is_replaced_with_backoff() -> None:
    first = judge_template_death(SERVING)
    again = judge_template_death(replace(SERVING, failures=first.failures))
    assert (first.verdict, first.failures) == (TemplateVerdict.REPLACE, 1)
    assert (again.verdict, again.failures) == (TemplateVerdict.REPLACE, 2)


def test_an_import_failing_after_the_pool_served_backs_off_too() -> None:
    """Not a new template every turn: the replacement waits like a crashing worker."""
    judged = judge_template_death(replace(SERVING, imported=False, failures=3))
    assert (judged.verdict, judged.failures) == (TemplateVerdict.REPLACE, 4)


def test_a_template_of_a_stopping_master_or_an_old_generation_is_forgotten() -> None:
    for death in (replace(SERVING, stopping=True), replace(SERVING, current=False),
                  replace(SERVING, imported=False, stopping=True)):
        judged = judge_template_death(death)
        assert (judged.verdict, judged.failures) == (TemplateVerdict.FORGET, 0)


templates = st.builds(TemplateDeath, imported=st.booleans(), current=st.booleans(),
                      reloading=st.booleans(), old_serving=st.booleans(),
                      ever_ready=st.booleans(), stopping=st.booleans(),
                      failures=st.integers(0, 10**6))


@given(templates)
def test_only_a_replacement_counts_a_template_failure(death: TemplateDeath) -> None:
    judged = judge_template_death(death)
    grew = judged.failures == death.failures + 1
    assert grew is (judged.verdict is TemplateVerdict.REPLACE)
    assert judged.failures in (death.failures, death.failures + 1)
    if death.stopping:
        assert judged.verdict is TemplateVerdict.FORGET
    if judged.verdict is not TemplateVerdict.FORGET:
        assert death.current or judged.verdict is TemplateVerdict.STOP_START


# ---- a reload's failure (decisions.abandon_reload) ---------------------------------------

def test_a_failed_reload_keeps_the_newest_older_generation() -> None:
    """Row 6: the old workers serve on; the failed generation ends."""
    abandon = abandon_reload([3, 2, 2, 3, 1], failed=3)
    assert abandon == Abandon(keep=2, kept=3, retire=3)


def test_a_failed_reload_with_nothing_old_left_is_not_abandoned() -> None:
    assert abandon_reload([4, 4], failed=4) is None
    assert abandon_reload([], failed=1) is None


@given(st.lists(st.integers(0, 50)), st.integers(1, 50))
def test_what_is_kept_is_always_older_than_what_failed(serving: list[int], failed: int
                                                       ) -> None:
    abandon = abandon_reload(serving, failed)
    older = [g for g in serving if g < failed]
    assert (abandon is None) is (not older)
    if abandon is not None:
        assert abandon.keep < failed == abandon.retire and abandon.kept == len(older)
