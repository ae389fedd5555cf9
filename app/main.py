"""The app factory: `create_app(settings)`; its lifespan loads and warms up the bundle and runs the batcher."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware

from app import cds_hooks, fhir, open_inference, tracing
from app.audit import AuditTrail
from app.auth import Authenticator, protected_routes
from app.batching import DynamicBatcher
from app.bundle import CPU, CUDA, load_bundle
from app.dependencies import log_fields
from app.inference import NoteClassifier, Truncation
from app.metrics import Metrics
from app.middleware import AccessLogMiddleware, BearerAuthMiddleware, RequestBodyMiddleware
from app.readiness import readiness_fault
from app.routes import router
from app.service import Service, ServiceError
from app.settings import Settings
from app.warmup import warm_up, warm_up_shapes

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    tracer_provider = tracing.tracer_provider(settings)
    app = FastAPIOffline(
        title="ED triage classifier",
        lifespan=_lifespan,
        description="Classifies emergency-department triage notes as emergency or non-emergency.",
        telemetry=tracing.fastapi_telemetry(settings, tracer_provider),
    )
    app.state.settings = settings
    app.state.tracer_provider = tracer_provider
    app.state.metrics = Metrics()
    app.state.service = None
    app.state.not_ready = None  # why the service will never be ready (app.readiness), once known
    app.state.authenticator = Authenticator(settings.api_keys, cds_hooks.ehr_tokens(settings))
    app.state.issued_cards = cds_hooks.IssuedCards()
    routers = (router, fhir.router, cds_hooks.router, open_inference.router)
    for included in routers:
        app.include_router(included)
    routes = [route for included in routers for route in included.routes if isinstance(route, APIRoute)]
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(ServiceError)(_service_error)
    # Added innermost first: the access log sees every request, the token is checked before the body is read.
    app.add_middleware(
        RequestBodyMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        # tritonclient sends no Content-Type: the v2 routes parse any body as JSON, and answer 400 when it is not.
        json_routes=[
            route for route in routes if "POST" in (route.methods or ()) and route not in open_inference.router.routes
        ],
        error_response=_body_error,
    )
    app.add_middleware(open_inference.BinaryTensorRefusal)
    app.add_middleware(
        BearerAuthMiddleware,
        authenticator=app.state.authenticator,
        routes=protected_routes(routes),
        error_response=_body_error,
    )
    if settings.cors_origins:
        # Around the token check: a browser's preflight (OPTIONS, without Authorization) is answered here, and a
        # 401 carries the CORS headers that let the page read it.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Content-Encoding", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "WWW-Authenticate"],
            max_age=600,
        )
    app.add_middleware(
        AccessLogMiddleware,
        metrics=app.state.metrics,
        route_paths={route.path for route in routes},
    )
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    started = time.perf_counter()
    providers = [CUDA, CPU] if settings.require_accelerator else None
    bundle = load_bundle(settings.bundle, settings.variant, settings.intra_op_threads, providers, settings.device_id)
    app.state.not_ready = readiness_fault(settings, bundle)
    if app.state.not_ready is not None:
        yield  # alive, never ready: /readyz and the model routes answer 503 with the reason
        return
    cut: Truncation = "head" if settings.truncation == "head" else "head-tail"  # refused notes are never run
    classifier = NoteClassifier.from_bundle(bundle, settings.max_note_tokens, cut)
    shapes = warm_up_shapes(settings.max_batch_size, settings.max_batch_tokens, classifier.max_note_tokens)
    warm_up(classifier, shapes, settings.warm_up_s)
    # The audit trail is closed last, after the batcher has finished queued notes (whose requests write records).
    async with (
        AuditTrail(settings, metrics) as app.state.audit,
        DynamicBatcher(
            classifier.predict,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_ms=settings.max_wait_ms,
            queue_capacity=settings.queue_capacity,
            on_batch=metrics.observe_batch,
        ) as batcher,
    ):
        metrics.track_queue_depth(lambda: batcher.queue_depth)
        app.state.service = Service(
            settings, bundle, classifier, batcher, metrics, app.state.tracer_provider.get_tracer("app.service")
        )
        metrics.describe_model(app.state.service.description)
        logger.info(
            "model ready",
            extra={
                "fields": {
                    "model": app.state.service.model.name,
                    "version": bundle.manifest.version,
                    "variant": bundle.variant,
                    "providers": bundle.providers,
                    "load_s": round(time.perf_counter() - started, 3),
                }
            },
        )
        try:
            yield
        finally:
            app.state.service = None  # readyz answers 503 while queued work drains
            logger.info("shutting down: finishing queued notes", extra={"fields": {"queued": batcher.queue_depth}})


def _body_error(path: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """The errors answered before routing, in the protocol of the path asked."""
    if open_inference.speaks_oip(path):
        return open_inference.error_response(status, message, headers)
    return fhir.body_error(path, status, message, headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 keeping each error's type, location and message: its `input` (a note, perhaps) is
    not sent back, so it cannot end up in a proxy's or client's logs either."""
    errors = [{key: entry[key] for key in ("type", "loc", "msg")} for entry in error.errors()]
    log_fields(request)["validation_errors"] = sorted({entry["type"] for entry in errors})
    return JSONResponse({"detail": errors}, status_code=422)


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    """The service core's errors, worded as this API's JSON error (the FHIR router words them itself)."""
    return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)
