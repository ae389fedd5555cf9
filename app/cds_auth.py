"""EHR-signed JWTs of CDS Hooks 2.0 (https://cds-hooks.hl7.org/2.0/#trusting-cds-clients): the bearer token an EHR
(the CDS Client) signs with its private key for each call, checked with its public key.

A token is accepted when
- its `iss` is one of the `jwt_issuers` and its `jku` header, if any, is that issuer's `jwks_url` (no other URL is
  ever fetched);
- its `alg` is one of `jwt_algorithms` (asymmetric only: `none` and HMAC are refused, as the specification requires)
  and its signature verifies with the issuer's key: the key of its `kid` in the issuer's JWK Set (fetched off the
  event loop and cached), or one of the issuer's static keys;
- its `aud` is this service's CDS endpoint URL (or that endpoint's feedback URL);
- it has `exp`, `iat` and `jti`, has not expired, was not issued in the future, and lives at most 5 minutes
  (`exp - iat`), within `jwt_leeway_s` of clock skew;
- its `jti` was not seen before from that issuer (the replay cache keeps each until its token has expired).

Otherwise `verify` raises `Unauthorized` naming the check that failed, never a key or the token.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from app.auth import Unauthorized

if TYPE_CHECKING:
    from app.settings import TrustedIssuer

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]
MAX_LIFETIME_S = 300  # exp - iat: CDS Hooks tokens are single-call and short-lived
JWKS_CACHE_S = 300  # a JWK Set is fetched again after this, or for an unknown kid (PyJWT: at most every 30 s)
JWKS_TIMEOUT_S = 5.0
REPLAY_CACHE_SIZE = 100_000  # jtis kept; at the 5-minute lifetime, room for 300 calls a second

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
PUBLIC_KEY_TYPES = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)


@dataclass(frozen=True)
class StaticKey:
    key: PublicKey
    kid: str | None  # a JWK's kid; None for a PEM key, which may have signed a token of any kid


def static_key(value: str | dict[str, Any]) -> StaticKey:
    """A configured public key: a PEM text or a JWK object. ValueError for anything else, private and symmetric
    keys included."""
    if isinstance(value, str):
        try:
            key: object = serialization.load_pem_public_key(value.encode())
        except ValueError:
            raise ValueError("not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
        kid = None
    else:
        if "d" in value or value.get("kty") == "oct":
            raise ValueError("a JWK here must be a public key (no 'd', not kty 'oct')")
        try:
            key = jwt.PyJWK(value).key
        except jwt.PyJWTError:
            raise ValueError("not a usable JWK (kty RSA, EC or OKP with its public parameters)") from None
        kid = value.get("kid")
    if not isinstance(key, PUBLIC_KEY_TYPES):
        raise ValueError("not an RSA, EC, Ed25519 or Ed448 public key")
    return StaticKey(key, kid)


def fits(key: PublicKey, alg: str) -> bool:
    """Whether `alg` verifies with `key`: RS*/PS* with RSA, ESnnn with EC on its curve, EdDSA with Ed25519/Ed448."""
    if alg in EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == EC_CURVES[alg]
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return isinstance(key, rsa.RSAPublicKey)


def refused(code: str, message: str) -> Unauthorized:
    return Unauthorized(message, code=code, invalid_token=True)


class ReplayCache:
    """The (issuer, jti) pairs seen, each kept until its token expires. At most `size`: when full, the pair whose
    token expires first is dropped (only a trusted issuer's signed tokens get here, so only an issuer could flood it).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.expiry: dict[str, float] = {}
        self.by_expiry: list[tuple[float, str]] = []  # a heap of (expires at, key)

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        """Records `key`; False if it was seen before and its token has not expired."""
        while self.by_expiry and self.by_expiry[0][0] <= now:
            del self.expiry[heapq.heappop(self.by_expiry)[1]]
        if key in self.expiry:
            return False
        if len(self.expiry) >= self.size:
            del self.expiry[heapq.heappop(self.by_expiry)[1]]
        self.expiry[key] = expires_at
        heapq.heappush(self.by_expiry, (expires_at, key))
        return True


class IssuerKeys:
    """The public keys of one trusted issuer: its JWK Set URL (PyJWKClient, cached) or its static keys."""

    def __init__(self, issuer: TrustedIssuer) -> None:
        self.iss = issuer.iss
        self.jwks_url = issuer.jwks_url
        self.client = (
            None
            if issuer.jwks_url is None
            else jwt.PyJWKClient(issuer.jwks_url, lifespan=JWKS_CACHE_S, timeout=JWKS_TIMEOUT_S)
        )
        self.static = [static_key(key) for key in issuer.keys]

    async def for_token(self, kid: str | None, alg: str) -> list[PublicKey]:
        """The keys that may have signed a token of this `kid` and `alg`."""
        if self.client is None:
            candidates = [static.key for static in self.static if kid is None or static.kid in (None, kid)]
        elif kid is None:
            raise refused("kid", "kid header missing: it names the key in the issuer's JWK Set")
        else:
            try:
                candidates = [(await asyncio.to_thread(self.client.get_signing_key, kid)).key]
            except jwt.PyJWKClientConnectionError:
                raise Unauthorized(
                    "the issuer's JWK Set could not be fetched; retry later",
                    status=HTTPStatus.SERVICE_UNAVAILABLE,
                    code="jwks-unreachable",
                ) from None
            except (jwt.PyJWKClientError, jwt.PyJWKSetError):
                raise refused("kid", "the issuer's JWK Set has no signing key of this kid") from None
        return [key for key in candidates if fits(key, alg)]


class EhrTokens:
    """Verifies the EHR-signed JWTs of the CDS Hooks routes (see the module docstring)."""

    def __init__(
        self, issuers: list[TrustedIssuer], algorithms: list[str], audiences: list[str], leeway_s: float
    ) -> None:
        self.issuers = {issuer.iss: IssuerKeys(issuer) for issuer in issuers}
        self.algorithms = algorithms
        self.audiences = audiences
        self.leeway_s = leeway_s
        self.seen = ReplayCache(REPLAY_CACHE_SIZE)

    async def verify(self, token: str) -> None:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise refused("malformed", "not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise refused("algorithm", f"alg must be one of {', '.join(self.algorithms)}")
        iss = unverified.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise refused("issuer", "iss is not a trusted issuer")
        if "jku" in header and header["jku"] != issuer.jwks_url:
            raise refused("jku", "jku is not the JWK Set URL configured for this issuer")
        claims = self._claims(token, await issuer.for_token(header.get("kid"), alg), alg, issuer.iss)
        if claims["exp"] - claims["iat"] > MAX_LIFETIME_S:
            raise refused("lifetime", f"token lives longer than {MAX_LIFETIME_S} s (exp - iat)")
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise refused("claims", "jti must be a non-empty string")
        if not self.seen.first_use(f"{issuer.iss}\n{claims['jti']}", claims["exp"] + self.leeway_s, time.time()):
            raise refused("replayed", "token already used (its jti was seen before)")

    def _claims(self, token: str, keys: list[PublicKey], alg: str, iss: str) -> dict[str, Any]:
        """The token's claims, checked, from the first key its signature verifies with."""
        if not keys:
            raise refused("signature", "the issuer has no key of this kid for this alg")
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self.audiences,
                    issuer=iss,
                    leeway=self.leeway_s,
                    options={"require": REQUIRED_CLAIMS},
                )
                return claims
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise refused("expired", "token expired (exp)") from None
            except jwt.ImmatureSignatureError:
                raise refused("not-yet-valid", "token issued in the future (iat) or not yet valid (nbf)") from None
            except jwt.InvalidAudienceError:
                raise refused("audience", f"aud must be this service's CDS endpoint, {self.audiences[0]}") from None
            except jwt.MissingRequiredClaimError as error:
                raise refused(
                    "claims", f"claim {error.claim} missing (required: {', '.join(REQUIRED_CLAIMS)})"
                ) from None
            except jwt.PyJWTError:
                raise refused("claims", f"malformed claims ({', '.join(REQUIRED_CLAIMS)})") from None
        raise refused("signature", "signature does not verify with the issuer's keys")
