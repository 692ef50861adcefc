"""`--http fast` counts a request's (method, status) itself and leaves its duration to
RequestMetrics.fold_seconds at flush time; the counts, buckets and sum must be exactly what
observe() makes of the same requests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from hello_cluster.metrics import DURATION_BUCKETS, RequestMetrics

# In-memory values (no multiprocess dir in the test process), in a registry of its own.
METRICS = RequestMetrics(None, registry=CollectorRegistry())
SECONDS = st.one_of(st.sampled_from([0.0, *DURATION_BUCKETS, 11.0]),
                    st.floats(min_value=0.0, max_value=20.0, allow_nan=False))
RECORDS = st.lists(st.tuples(st.sampled_from(["GET", "POST", "BREW"]),
                             st.sampled_from([200, 404, 500, 999]), SECONDS), max_size=300)


def _reset() -> None:
    METRICS._counts, METRICS._sum, METRICS._pending, METRICS.seconds = {}, 0.0, [], []
    METRICS._buckets = [0] * len(METRICS._buckets)


@settings(max_examples=200, deadline=None)
@given(RECORDS)
def test_fold_seconds_counts_like_observe(records: list[tuple[str, int, float]]) -> None:
    _reset()
    for method, status, seconds in records:
        METRICS.observe(method, status, seconds)
    expected = (dict(METRICS._counts), list(METRICS._buckets), METRICS._sum)
    _reset()
    for method, status, seconds in records:  # what fastproto's Cycle.run does
        METRICS.seconds.append(seconds)
        METRICS._counts[method, status] = METRICS._counts.get((method, status), 0) + 1
    METRICS.fold_seconds()
    assert (METRICS._counts, METRICS._buckets) == expected[:2]
    assert abs(METRICS._sum - expected[2]) <= 1e-9 * max(1.0, expected[2])
    assert METRICS.seconds == []
