"""Prometheus metrics of one app, in its own registry (so that several apps in a process stay apart)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "triage_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "triage_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.notes = Counter("triage_notes_classified", "Notes classified.", registry=self.registry)
        self.notes_truncated = Counter(
            "triage_notes_truncated",
            "Notes longer than max_note_tokens, classified after truncation.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "triage_batch_size", "Notes per model run.", buckets=BATCH_SIZE_BUCKETS, registry=self.registry
        )
        self.batch_tokens = Histogram(
            "triage_batch_padded_tokens",
            "Padded tokens (notes x longest) per model run.",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "triage_inference_duration_seconds",
            "Time of one model run.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("triage_queue_depth", "Notes waiting for the model.", registry=self.registry)
        self.audit_errors = Counter(
            "triage_audit_errors",
            "Audit records that could not be written to the audit file (each request was refused with 503).",
            registry=self.registry,
        )
        self.cds_feedback = Counter(
            "triage_cds_feedback",
            "CDS Hooks card feedback by service, outcome and override reason (a code of the service, none or other).",
            ["service", "outcome", "reason"],
            registry=self.registry,
        )
        self.cds_feedback_unknown_cards = Counter(
            "triage_cds_feedback_unknown_card",
            "CDS Hooks feedback on a card this process did not issue (before a restart, by another replica, unknown).",
            ["service"],
            registry=self.registry,
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.padded_tokens)
        self.inference_seconds.observe(stats.seconds)
        self.notes.inc(stats.size)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
