"""/status from a snapshot of plain values: the document is a function of it (no master)."""

from __future__ import annotations

from hello_cluster.observe.status_page import (
    PoolSnapshot,
    SlotView,
    WorkerView,
    document,
    worker_state,
)
from hello_cluster.system.procstat import SlotCpu


def snapshot(**over: object) -> PoolSnapshot:
    values: dict[str, object] = dict(
        pid=1, state="running", started_at=100.0, desired=3, ready=1, reloads=2, restarts=4,
        crash_loop=False, request_metrics=True, multiproc_dir=None,
        workers=(WorkerView(2**22 + 11, 0, 1, 150.0, "ready", True),
                 WorkerView(2**22 + 12, 1, 0, 120.0, "draining", False)),
        slots=(SlotView(0, 0.0), SlotView(3, 0.0), SlotView(1, 205.5)),
        slot_cpu=SlotCpu())
    values.update(over)
    return PoolSnapshot(**values)


def test_rows_for_workers_and_backoff_slots_in_slot_order() -> None:
    doc = document(snapshot(), now=200.0)
    assert doc["master"] == {"pid": 1, "state": "running", "uptime_seconds": 100.0,
                             "version": doc["master"]["version"],
                             "workers": {"desired": 3, "ready": 1, "running": 2},
                             "reloads": 2, "restarts": 4, "crash_loop": False}
    rows = [(r["slot"], r["state"], r.get("respawn_in_seconds")) for r in doc["workers"]]
    # Slot 2's worker is draining (not staying): the slot shows as backoff beside it.
    assert rows == [(1, "ready", None), (2, "backoff", 0.0), (2, "draining", None),
                    (3, "backoff", 5.5)]
    assert doc["workers"][0]["uptime_seconds"] == 50.0 and doc["workers"][2]["restarts"] == 3


def test_no_backoff_rows_while_stopping() -> None:
    doc = document(snapshot(state="stopping", workers=()), now=200.0)
    assert doc["workers"] == []


def test_worker_state_precedence() -> None:
    assert worker_state(hung=True, retiring=True, ready=True, stalled=True) == "hung"
    assert worker_state(hung=False, retiring=True, ready=False, stalled=True) == "draining"
    assert worker_state(hung=False, retiring=False, ready=False, stalled=True) == "starting"
    assert worker_state(hung=False, retiring=False, ready=True, stalled=True) == "stalled"
    assert worker_state(hung=False, retiring=False, ready=True, stalled=False) == "ready"
