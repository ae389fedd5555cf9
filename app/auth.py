"""Optional bearer-token auth: on when `api_keys` is set, for the routes that depend on `require_api_key`
(/classify, /v1/model, /metrics, FHIR and the CDS Hooks service).

/healthz, /readyz and CDS Hooks discovery stay open so that orchestrators and EHRs can probe without a key.
`app.middleware.ApiKeyMiddleware` checks the token of those routes before the body is read; the dependency
checks it again where the route runs.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

UNAUTHORIZED = "missing or invalid bearer token"
bearer = HTTPBearer(auto_error=False, description="One of the service's api_keys, when any are set.")


def valid_api_key(offered: str | None, keys: list[str]) -> bool:
    """Whether `offered` is one of `keys` (always, when there are no keys)."""
    if not keys:
        return True
    token = (offered or "").encode()
    # Compare against every key, in constant time each, so that timing reveals nothing about a key.
    matches = [hmac.compare_digest(token, key.encode()) for key in keys]
    return any(matches)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive), or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    if not valid_api_key(credentials.credentials if credentials else None, request.app.state.settings.api_keys):
        raise HTTPException(HTTPStatus.UNAUTHORIZED, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


def protected_routes(routes: Iterable[APIRoute]) -> list[APIRoute]:
    """The routes that depend on `require_api_key`."""
    return [route for route in routes if any(need.call is require_api_key for need in route.dependant.dependencies)]
