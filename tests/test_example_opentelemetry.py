"""examples/opentelemetry: OpenTelemetry's post-fork set-up as --hooks, under --preload.

The real opentelemetry-sdk with its console exporters (one JSON object a line in the log):
each request's span and count is exported by the worker that answered it, under its slot,
and worker_exit flushes the last batch when the master stops.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import Any

from conftest import ROOT

EXAMPLE = ROOT / "examples" / "opentelemetry"


def exported(log: str) -> list[dict[str, Any]]:
    """The JSON lines the console exporters wrote (everything else is the service log)."""
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def test_each_worker_exports_its_own_spans_and_counts(cluster) -> None:
    c = cluster("--workers", "2", "--preload", "--app", "app:app", "--hooks", "hooks",
                "--app-dir", str(EXAMPLE), env={"OTEL_SERVICE_NAME": "hc-test"}, workers=2)
    answered: Counter[int] = Counter()
    for _ in range(200):  # until both workers answered a few (the kernel picks the worker)
        status, headers, _ = c.get("/orders")
        assert status == 200
        answered[int(headers["x-worker-pid"])] += 1
        if len(answered) == 2 and min(answered.values()) >= 3:
            break
    assert len(answered) == 2, answered
    c.signal(signal.SIGTERM)
    assert c.wait_exit(20) == 0
    items = exported(c.log)
    spans = [i for i in items if "context" in i]
    by_pid = Counter(s["resource"]["attributes"]["worker.pid"] for s in spans
                     if s["name"] == "GET /orders")
    assert by_pid == answered, (by_pid, answered)  # nothing lost, nothing counted twice
    slots = {s["resource"]["attributes"]["worker.pid"]: s["resource"]["attributes"]["worker"]
             for s in spans}
    assert sorted(slots.values()) == [0, 1]
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"hc-test"}
    # Metrics: the last export of each worker (its shutdown in worker_exit) holds its count.
    counted: dict[int, float] = {}
    for item in items:
        for rm in item.get("resource_metrics", []):
            pid = rm["resource"]["attributes"]["worker.pid"]
            for sm in rm["scope_metrics"]:
                for metric in sm["metrics"]:
                    if metric["name"] == "app.requests":
                        counted[pid] = sum(p["value"] for p in metric["data"]["data_points"])
    assert counted == dict(answered), (counted, answered)
