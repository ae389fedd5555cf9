"""What the routers share besides the service core: the ready service of a request, and its access-log fields."""

from __future__ import annotations

from http import HTTPStatus

from starlette.requests import Request

from app.service import LogFields, Service, ServiceError


def ready_service(request: Request) -> Service:
    """The loaded service (a FastAPI dependency); 503 while the model loads or the service shuts down, and for
    good when a start-up check failed (`app.readiness`: the reason, without Retry-After)."""
    service: Service | None = request.app.state.service
    if service is None:
        not_ready: str | None = request.app.state.not_ready
        if not_ready is not None:
            raise ServiceError(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {not_ready}")
        raise ServiceError(
            HTTPStatus.SERVICE_UNAVAILABLE, "model not loaded (starting up or shutting down)", retry=True
        )
    return service


def log_fields(request: Request) -> LogFields:
    """The request's access-log fields, which routes and the core add counts to (never note text or ids)."""
    fields: LogFields = request.scope.setdefault("state", {}).setdefault("log_fields", {})
    return fields
