"""Bearer-token auth of the protected routes, checked by `app.middleware.BearerAuthMiddleware` before the body is
read, and again by the route's dependency (`require_api_key`, `require_cds_client`) where the route runs.

- `api_keys`: fixed tokens, set by the operator. When any are set, every protected route needs one (/classify,
  /v1/model, /metrics, FHIR, and the CDS Hooks service and feedback).
- EHR-signed JWTs (`jwt_issuers`, CDS Hooks 2.0, `app.cds_auth`): accepted besides the api_keys on the CDS Hooks
  service and feedback routes (those that depend on `require_cds_client`); when issuers are set, those routes need
  one or the other. Not on the other routes: their callers are systems that hold an api key, and a CDS Hooks token's
  audience is the CDS endpoint.

/healthz, /readyz, /model-card and CDS Hooks discovery stay open so that orchestrators, EHRs and clinicians'
browsers can reach them without a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

if TYPE_CHECKING:
    from app.cds_auth import EhrTokens

UNAUTHORIZED = "missing or invalid bearer token"
# Where in a request's scope state the middleware says how it authenticated the request.
AUTHENTICATED = "authenticated"
bearer = HTTPBearer(
    auto_error=False, description="One of the service's api_keys; on the CDS Hooks routes also an EHR-signed JWT."
)
Method = Literal["open", "api-key", "ehr-jwt"]


class Unauthorized(Exception):
    """A request refused by auth: 401 (503 when an issuer's keys cannot be fetched). `code` names the failed check
    in the access log; `invalid_token` says that a JWT was offered and refused (RFC 6750 error="invalid_token")."""

    def __init__(
        self,
        message: str = UNAUTHORIZED,
        status: int = HTTPStatus.UNAUTHORIZED,
        code: str = "missing-or-invalid",
        invalid_token: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.invalid_token = invalid_token

    @property
    def headers(self) -> dict[str, str]:
        if self.status != HTTPStatus.UNAUTHORIZED:
            return {"Retry-After": "5"}
        if not self.invalid_token:
            return {"WWW-Authenticate": "Bearer"}
        return {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{self.message}"'}


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


class Authenticator:
    """The tokens a route accepts: one of `api_keys`, and on the CDS Hooks routes a JWT that `ehr_tokens` verifies."""

    def __init__(self, api_keys: list[str], ehr_tokens: EhrTokens | None) -> None:
        self.api_keys = api_keys
        self.ehr_tokens = ehr_tokens

    async def authenticate(self, token: str | None, cds_route: bool) -> Method:
        """How a request with this bearer `token` is let in; raises `Unauthorized`."""
        ehr_tokens = self.ehr_tokens if cds_route else None
        if not self.api_keys and ehr_tokens is None:
            return "open"
        if token is not None and self.api_keys and valid_api_key(token, self.api_keys):
            return "api-key"
        if ehr_tokens is None or token is None or token.count(".") != 2:  # not a JWT (header.payload.signature)
            raise Unauthorized()
        await ehr_tokens.verify(token)
        return "ehr-jwt"


async def _check(request: Request, credentials: HTTPAuthorizationCredentials | None, cds_route: bool) -> None:
    state = request.scope.setdefault("state", {})
    if AUTHENTICATED in state:  # the middleware let this request in (a JWT's jti may be used only once)
        return
    authenticator: Authenticator = request.app.state.authenticator
    try:
        state[AUTHENTICATED] = await authenticator.authenticate(
            credentials.credentials if credentials else None, cds_route
        )
    except Unauthorized as error:
        raise HTTPException(error.status, error.message, headers=error.headers) from None


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    await _check(request, credentials, cds_route=False)


async def require_cds_client(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    await _check(request, credentials, cds_route=True)


def protected_routes(routes: Iterable[APIRoute]) -> list[APIRoute]:
    """The routes that depend on `require_api_key` or `require_cds_client`."""
    return [route for route in routes if _requirement(route) is not None]


def accepts_ehr_jwt(route: APIRoute) -> bool:
    """Whether the route depends on `require_cds_client`."""
    return _requirement(route) is require_cds_client


def _requirement(route: APIRoute) -> object | None:
    calls = [need.call for need in route.dependant.dependencies]
    return next((call for call in calls if call in (require_api_key, require_cds_client)), None)
