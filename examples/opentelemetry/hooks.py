"""OpenTelemetry's post-fork set-up for a prefork server, as `--hooks hooks`.

OpenTelemetry's fork-process-model example (gunicorn's `post_fork` in gunicorn.conf.py)
builds the SDK in each worker after the fork: the BatchSpanProcessor and the metric reader
run a thread each, and a thread does not survive a fork, so a provider built before it
(at import under `--preload`, or in a master) would leave the workers exporting nothing.
The same function here is `post_fork(info)`; `worker_exit(info)` flushes what is still
batched after the drain, which gunicorn's example leaves to the exit handlers.

The exporters print to stdout (the service log), one JSON object a line; for a collector,
swap in `OTLPSpanExporter` / `OTLPMetricExporter` from opentelemetry-exporter-otlp.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_providers: list[Any] = []  # this worker's, shut down (flushed) by worker_exit


def _one_line(item: Any) -> str:
    return str(item.to_json(indent=None)) + os.linesep


def post_fork(info: Any) -> None:
    """Build this worker's providers (hello_cluster.worker.hooks.WorkerInfo: slot, pid, ...)."""
    resource = Resource.create(attributes={
        "service.name": os.environ.get("OTEL_SERVICE_NAME", "hello-otel"),
        # The slot, not only the pid, tells the workers apart with a bounded set of values:
        # a respawned or reloaded worker keeps its slot's series (gunicorn issue 1352).
        "worker": info.slot,
        "worker.pid": info.pid,
        "worker.generation": info.generation,
    })
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=_one_line)))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(
        ConsoleMetricExporter(out=sys.stdout, formatter=_one_line))
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    _providers[:] = [tracer_provider, meter_provider]


def worker_exit(info: Any) -> None:
    """After the drain: export what is still batched, stop the exporter threads."""
    for provider in _providers:
        provider.shutdown()
