"""Prometheus metrics of one app, in its own registry (so that several apps in a process stay apart): requests, the
batcher, the predictions (to watch drift), the served model, and the process's own (CPU, memory, file descriptors,
garbage collection). One process serves (the batcher lives in it), so no multiprocess mode."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from app.batching import BatchStats
from app.manifest import LABELS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# P(emergency): steps of 0.05, finer in the tails, where a calibrated model puts most notes.
PROBABILITY_BUCKETS = (0.01, 0.025, *(round(step * 0.05, 2) for step in range(1, 20)), 0.975, 0.99)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_*: CPU seconds, memory, open fds, start time (Linux)
        PlatformCollector(registry=self.registry)  # python_info: the interpreter's version
        GCCollector(registry=self.registry)  # python_gc_*: collections and objects by generation
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
        self.probability = Histogram(
            "triage_prediction_probability",
            "P(emergency) of each note classified (its distribution drifting is a sign the notes have changed).",
            buckets=PROBABILITY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "triage_predictions",
            "Notes classified, by the label given at the bundle's threshold.",
            ["label"],
            registry=self.registry,
        )
        for label in LABELS:  # both series from 0, so that a rate of either is defined before its first note
            self.predictions.labels(label=label)
        self.model = Info(
            "triage_model",
            "The served model (value 1): bundle name and version, ONNX variant and execution provider, threshold "
            "and how it was chosen, calibration, training method.",
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

    def observe_prediction(self, label: str, probability: float) -> None:
        self.predictions.labels(label=label).inc()
        self.probability.observe(probability)

    def describe_model(self, labels: Mapping[str, str]) -> None:
        self.model.info(dict(labels))

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
