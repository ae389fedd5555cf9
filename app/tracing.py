"""OpenTelemetry tracing, off unless `otel_enabled` (and then the `tracing` extra must be installed).

FastAPI's own instrumentation makes each request's server span, continuing the trace of an incoming W3C
`traceparent` header; `app.service.classify_texts` adds a child span for the model inference of the request's
notes. Spans hold routes, statuses, counts and durations, never note text: FastAPI records no bodies and no
exception messages on spans, and its OpenTelemetry logs and metrics are left off (the logs would quote exception
messages; the metrics are Prometheus's, app/metrics.py).

The app has its own tracer provider rather than OpenTelemetry's global one, as it has its own metrics registry.
Standard variables configure it: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
OTEL_EXPORTER_OTLP_HEADERS... (the OTLP/HTTP exporter), OTEL_TRACES_SAMPLER (default: follow the caller's sampling
decision, sample every new trace), OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
"""

from __future__ import annotations

import importlib.util
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from app.settings import Settings

Exporter = Literal["otlp", "console", "none"]
SERVICE_NAME = "dsgkd-triage"
# Probes and scrapes, every few seconds from every prober: traced, they would bury the requests.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
SDK_MODULE = "opentelemetry.sdk"
OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http"


def missing_modules(exporter: Exporter) -> list[str]:
    """The modules of the `tracing` extra that tracing with `exporter` needs and that are not installed."""
    needed = [SDK_MODULE, OTLP_MODULE] if exporter == "otlp" else [SDK_MODULE]
    return [module for module in needed if not _installed(module)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def tracer_provider(settings: Settings) -> trace.TracerProvider:
    """The app's tracer provider: the SDK's, exporting to `settings.otel_exporter`, when tracing is on; else one
    that makes no spans."""
    if not settings.otel_enabled:
        return trace.NoOpTracerProvider()
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Our service name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES give one.
    resource = Resource.create({"service.name": SERVICE_NAME}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    exporter = span_exporter(settings.otel_exporter)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def span_exporter(exporter: Exporter) -> SpanExporter | None:
    """Where finished spans go; None: nowhere (the trace context is still continued and passed on)."""
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    return None


def fastapi_telemetry(settings: Settings, provider: trace.TracerProvider) -> TelemetryConfig:
    """FastAPI's native OpenTelemetry: server spans from `provider` when tracing is on, nothing else."""
    return {
        "tracing": settings.otel_enabled,
        "tracer_provider": provider,
        "metrics": False,
        "logs": False,
        "auto_configure": False,
        "exclude": _untraced,
    }


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS
