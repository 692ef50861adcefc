"""The restart policy's promises, checked by hypothesis over many failure histories."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hello_cluster.supervisor.backoff import Breaker, Policy, ceiling, delay, failures_after_death

policies = st.builds(
    Policy,
    initial=st.floats(0.001, 5.0),
    factor=st.floats(1.0, 10.0),
    cap=st.floats(0.01, 300.0),
    reset_after=st.floats(0.1, 100.0),
    crash_loop_limit=st.integers(1, 50),
)


@given(policies, st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_delay_within_zero_and_cap(policy: Policy, failures: int, r: float) -> None:
    d = delay(policy, failures, lambda: r)
    assert 0.0 <= d <= policy.cap
    assert d <= ceiling(policy, failures)


@given(policies)
def test_first_failure_is_immediate(policy: Policy) -> None:
    assert delay(policy, 1, lambda: 1.0) == 0.0


@given(policies, st.integers(2, 200))
def test_ceiling_grows_and_is_capped(policy: Policy, n: int) -> None:
    assert ceiling(policy, n) <= ceiling(policy, n + 1) <= policy.cap


def test_ceiling_schedule() -> None:
    p = Policy(initial=0.1, factor=2.0, cap=1.0)
    assert [ceiling(p, n) for n in range(1, 8)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


@given(policies, st.integers(0, 100), st.floats(0.0, 1000.0))
def test_reset_after_healthy_run(policy: Policy, failures: int, ready_for: float) -> None:
    after = failures_after_death(policy, failures, ready_for, planned=False)
    if ready_for >= policy.reset_after:
        assert after == 1  # counts as a first failure: respawned at once
    else:
        assert after == failures + 1


@given(policies, st.integers(0, 100), st.one_of(st.none(), st.floats(0, 100)))
def test_planned_ends_are_not_failures(policy: Policy, failures: int,
                                       ready_for: float | None) -> None:
    assert failures_after_death(policy, failures, ready_for, planned=True) == failures


@given(st.lists(st.integers(0, 3), max_size=50))
def test_slots_are_independent(deaths: list[int]) -> None:
    """Deaths in one slot never change another slot's count."""
    p = Policy()
    counts = [0, 0, 0, 0]
    for slot in deaths:
        before = counts.copy()
        counts[slot] = failures_after_death(p, counts[slot], None, planned=False)
        assert all(counts[i] == before[i] for i in range(4) if i != slot)


@given(st.integers(1, 30), st.lists(st.sampled_from(["boot", "served", "planned", "ready"]),
                                    max_size=100))
def test_breaker_trips_exactly_at_limit(limit: int, events: list[str]) -> None:
    b = Breaker(limit)
    run = 0
    for event in events:
        if event == "boot":
            b = b.worker_died(became_ready=False, planned=False)
            run += 1
        elif event == "served":
            b = b.worker_died(became_ready=True, planned=False)
        elif event == "planned":
            b = b.worker_died(became_ready=False, planned=True)
        else:
            b = b.worker_ready()
            run = 0
        assert b.tripped == (run >= limit)
