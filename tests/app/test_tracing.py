"""OpenTelemetry tracing (TRIAGE_OTEL_ENABLED): the caller's traceparent continued, a span for the inference, no note
text; without the `tracing` extra the service starts when tracing is off and refuses to start when it is on."""

from __future__ import annotations

import logging
import subprocess
import sys

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from app import tracing
from app.bundle import load_bundle
from app.inference import NoteClassifier
from app.main import create_app

pytestmark = pytest.mark.anyio

MARKER = "ZQX-TRACE-6120"
NOTES = [f"CC: seizure {MARKER}. BT 39.1, HR 150", "CC: medication refill. BT 36.5"]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


async def test_a_request_continues_the_callers_trace_with_a_span_for_its_inference(
    settings, tiny_bundle_dir, monkeypatch, caplog
):
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "span_exporter", lambda kind: exporter)
    caplog.set_level(logging.INFO, logger="app.access")
    app = create_app(settings(otel_enabled=True))
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
        app.router.lifespan_context(app),
    ):
        traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
        response = await client.post(
            "/classify",
            json={"notes": [{"id": f"{MARKER}-{i}", "text": text} for i, text in enumerate(NOTES)]},
            headers={"traceparent": traceparent},
        )
        assert (await client.get("/readyz")).status_code == 200  # a probe: not traced
    assert response.status_code == 200
    app.state.tracer_provider.force_flush()
    spans = exporter.get_finished_spans()

    [server] = [span for span in spans if span.kind == SpanKind.SERVER]
    assert format_trace_id(server.context.trace_id) == TRACE_ID
    assert server.parent is not None and format_span_id(server.parent.span_id) == PARENT_SPAN_ID
    assert server.name == "POST /classify"
    assert server.attributes["http.route"] == "/classify" and server.attributes["http.response.status_code"] == 200

    [inference] = [span for span in spans if span.name == "triage.inference"]
    assert inference.context.trace_id == server.context.trace_id
    parents = {span.context.span_id: span.parent.span_id for span in spans if span.parent is not None}
    ancestor = inference.parent.span_id
    while ancestor != server.context.span_id:  # the inference span is the server span's child, or a grandchild
        ancestor = parents[ancestor]
    encoded = NoteClassifier.from_bundle(load_bundle(tiny_bundle_dir)).encode(NOTES)
    assert inference.attributes["triage.batch.size"] == 2
    assert inference.attributes["triage.batch.tokens"] == sum(len(note.ids) for note in encoded)

    assert MARKER not in "".join(span.to_json() for span in spans)
    [access] = [r for r in caplog.records if r.name == "app.access" and r.fields["route"] == "/classify"]
    assert access.fields["trace_id"] == TRACE_ID


async def test_tracing_off_makes_no_spans_and_logs_no_trace_id(serve, settings, monkeypatch, caplog):
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "span_exporter", lambda kind: exporter)
    caplog.set_level(logging.INFO, logger="app.access")
    async with serve(settings()) as client:
        traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
        response = await client.post("/classify", json={"text": NOTES[1]}, headers={"traceparent": traceparent})
    assert response.status_code == 200
    assert exporter.get_finished_spans() == ()
    assert all("trace_id" not in record.fields for record in caplog.records if record.name == "app.access")


# `serve` in a fresh interpreter where the `tracing` extra's modules cannot be imported, its server replaced by a
# stand-in that reports whether the app was built with tracing.
WITHOUT_THE_EXTRA = """
import sys
import uvicorn
sys.modules["opentelemetry.sdk"] = None
sys.modules["opentelemetry.exporter.otlp.proto.http"] = None
uvicorn.run = lambda app, **options: print("serving, tracing", app.state.settings.otel_enabled)
from app.cli import cli
cli(["serve", "--bundle", sys.argv[1], *sys.argv[2:]])
"""


def serve_without_the_extra(tiny_bundle_dir, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA, str(tiny_bundle_dir), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_the_extra_the_service_starts_with_tracing_off(tiny_bundle_dir):
    result = serve_without_the_extra(tiny_bundle_dir)
    assert result.returncode == 0, result.stderr
    assert "serving, tracing False" in result.stdout


@pytest.mark.parametrize("exporter", ["otlp", "console"])
def test_without_the_extra_tracing_on_is_refused_at_start_naming_the_extra(tiny_bundle_dir, exporter):
    result = serve_without_the_extra(tiny_bundle_dir, "--otel-enabled", "--otel-exporter", exporter)
    assert result.returncode == 2
    assert "serving" not in result.stdout
    assert "opentelemetry.sdk" in result.stderr and "pip install 'dsgkd-triage[tracing]'" in result.stderr
