"""Optional bearer-token auth: on when `api_keys` is set, for /classify, /v1/model and /metrics.

/healthz and /readyz stay open so that orchestrators can probe without a key.
"""

from __future__ import annotations

import hmac
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="One of the service's api_keys, when any are set.")


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    offered = credentials.credentials.encode() if credentials else b""
    # Compare against every key, in constant time each, so that timing reveals nothing about a key.
    matches = [hmac.compare_digest(offered, key.encode()) for key in keys]
    if not any(matches):
        raise HTTPException(
            HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
