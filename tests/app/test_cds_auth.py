"""EHR-signed JWTs on the CDS Hooks routes (app.cds_auth), with keys made here and tokens signed with PyJWT.

Most tests call the feedback endpoint, which needs no model (`lifespan=False`); one calls the service itself.
"""

import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from app.cds_auth import ReplayCache
from app.cds_hooks import CONTEXT_NOTE_KEY, FEEDBACK_PATH, SERVICE_PATH
from app.settings import Settings

pytestmark = pytest.mark.anyio

ISS = "https://ehr.example.org"
JWKS_URL = "https://ehr.example.org/.well-known/jwks.json"
PUBLIC_URL = "https://triage.example.org"
AUDIENCE = f"{PUBLIC_URL}{SERVICE_PATH}"
FEEDBACK = {
    "feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2025-01-01T00:00:00Z"}]
}


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key, kid: str) -> dict:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    return jwk | {"kid": kid, "use": "sig"}


def public_pem(private_key) -> str:
    return private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def sign(private_key, alg: str = "ES384", kid: str | None = "k1", headers: dict | None = None, **claims) -> str:
    """A token of `private_key` for the service; a claim given as None is left out."""
    now = int(time.time())
    payload = {"iss": ISS, "aud": AUDIENCE, "iat": now, "exp": now + 60, "jti": str(uuid.uuid4())} | claims
    header = {"kid": kid, **(headers or {})} if kid is not None else headers
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, private_key, alg, headers=header)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jwt_settings(*keys, **overrides) -> Settings:
    issuer = {"iss": ISS, "keys": list(keys)} if keys else {"iss": ISS, "jwks_url": JWKS_URL}
    return Settings(bundle=Path("unused"), public_url=PUBLIC_URL, jwt_issuers=[issuer], **overrides)


async def test_a_token_signed_by_a_trusted_ehr_is_accepted_once(serve, ec_key, rsa_key):
    settings = jwt_settings(public_jwk(ec_key, "k1"), public_pem(rsa_key))
    async with serve(settings, lifespan=False) as client:
        token = sign(ec_key)
        first = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer(token))
        replayed = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer(token))
        pem_signed = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer(sign(rsa_key, "RS384", kid=None)))
        for_feedback = await client.post(
            FEEDBACK_PATH, json=FEEDBACK, headers=bearer(sign(ec_key, aud=f"{PUBLIC_URL}{FEEDBACK_PATH}"))
        )
        missing = await client.post(FEEDBACK_PATH, json=FEEDBACK)
    assert first.status_code == pem_signed.status_code == for_feedback.status_code == 200
    assert replayed.status_code == 401 and "already used" in replayed.json()["detail"]
    assert replayed.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"


SECRET = "a-shared-secret-of-32-bytes-or-more"


@pytest.mark.parametrize(
    ("token_of", "reason"),
    [
        (lambda key: sign(key, exp=int(time.time()) - 120, iat=int(time.time()) - 180), "expired"),
        (lambda key: sign(key, aud="https://elsewhere.example.org/cds-services/triage-note"), f"endpoint, {AUDIENCE}"),
        (lambda key: sign(key, aud=f"{PUBLIC_URL}/classify"), "aud must be"),
        (lambda key: sign(key, jti=None), "claim jti missing"),
        (lambda key: sign(key, iat=None), "claim iat missing"),
        (lambda key: sign(key, exp=int(time.time()) + 600), "longer than 300 s"),
        (lambda key: sign(key, iat=int(time.time()) + 120, exp=int(time.time()) + 180), "issued in the future"),
        (lambda key: sign(key, iss="https://other-ehr.example.org"), "not a trusted issuer"),
        (lambda key: sign(ec.generate_private_key(ec.SECP384R1())), "signature does not verify"),
        (lambda key: sign(ec.generate_private_key(ec.SECP256R1()), alg="ES256"), "no key of this kid for this alg"),
        (lambda key: sign(None, alg="none"), "alg must be one of"),
        (lambda key: sign(SECRET, alg="HS256"), "alg must be one of"),
        (lambda key: sign(key, headers={"jku": "https://attacker.example.org/jwks"}), "jku"),
        (lambda key: "eyJhbGciOiJFUzM4NCJ9.not-json.c2ln", "not a well-formed JWT"),
    ],
    ids=[
        "expired",
        "wrong-audience",
        "audience-of-another-route",
        "no-jti",
        "no-iat",
        "lives-too-long",
        "issued-in-the-future",
        "unknown-issuer",
        "wrong-key",
        "key-of-another-curve",
        "alg-none",
        "hs256",
        "foreign-jku",
        "malformed",
    ],
)
async def test_a_token_failing_a_check_is_refused_with_its_reason(serve, ec_key, token_of, reason):
    token = token_of(ec_key)
    async with serve(jwt_settings(public_jwk(ec_key, "k1")), lifespan=False) as client:
        response = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer(token))
    assert response.status_code == 401
    assert reason in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token", error_description=')
    assert token not in response.text and "BEGIN" not in response.text


async def test_keys_come_from_the_issuers_jwks_url_by_kid(serve, ec_key, monkeypatch):
    fetched: list[str] = []
    jwks = {"keys": [public_jwk(ec_key, "k1")]}

    def fetch_data(client: jwt.PyJWKClient) -> dict:
        fetched.append(client.uri)
        return jwks

    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", fetch_data)
    async with serve(jwt_settings(), lifespan=False) as client:
        signed = await client.post(
            FEEDBACK_PATH, json=FEEDBACK, headers=bearer(sign(ec_key, headers={"jku": JWKS_URL}))
        )
        unknown_kid = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer(sign(ec_key, kid="k2")))
        no_kid = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer(sign(ec_key, kid=None)))
    assert signed.status_code == 200 and fetched and set(fetched) == {JWKS_URL}
    assert unknown_kid.status_code == 401 and "no signing key of this kid" in unknown_kid.json()["detail"]
    assert no_kid.status_code == 401 and "kid header missing" in no_kid.json()["detail"]


async def test_an_unreachable_jwks_url_is_a_503_to_retry(serve, ec_key, monkeypatch):
    def unreachable(client: jwt.PyJWKClient) -> dict:
        raise jwt.PyJWKClientConnectionError("connection refused")

    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", unreachable)
    async with serve(jwt_settings(), lifespan=False) as client:
        down = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer(sign(ec_key)))
    assert down.status_code == 503 and down.headers["retry-after"] == "5"


async def test_api_keys_still_work_and_jwts_are_for_the_cds_routes_only(serve, ec_key):
    settings = jwt_settings(public_jwk(ec_key, "k1"), api_keys=["k1"])
    async with serve(settings, lifespan=False) as client:
        api_key = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer("k1"))
        wrong_api_key = await client.post(FEEDBACK_PATH, json=FEEDBACK, headers=bearer("nope"))
        metrics_by_jwt = await client.get("/metrics", headers=bearer(sign(ec_key)))
        discovery = await client.get("/cds-services")
    assert api_key.status_code == 200 and discovery.status_code == 200
    assert wrong_api_key.status_code == 401 and wrong_api_key.headers["www-authenticate"] == "Bearer"
    assert metrics_by_jwt.status_code == 401


async def test_the_service_takes_a_signed_token(serve, settings, ec_key):
    issuer = {"iss": ISS, "keys": [public_jwk(ec_key, "k1")]}
    async with serve(settings(public_url=PUBLIC_URL, jwt_issuers=[issuer])) as client:
        body = {
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": "p-1", CONTEXT_NOTE_KEY: "CC: chest pain. BT 36.5"},
        }
        unsigned = await client.post(SERVICE_PATH, json=body)
        signed = await client.post(SERVICE_PATH, json=body, headers=bearer(sign(ec_key)))
    assert unsigned.status_code == 401 and signed.status_code == 200 and len(signed.json()["cards"]) == 1


def test_the_replay_cache_forgets_expired_tokens_and_stays_bounded():
    cache = ReplayCache(size=2)
    assert cache.first_use("a", expires_at=10, now=0) and not cache.first_use("a", expires_at=10, now=5)
    assert cache.first_use("a", expires_at=30, now=11)  # expired, so forgotten
    assert cache.first_use("b", expires_at=20, now=11) and cache.first_use("c", expires_at=40, now=12)
    assert len(cache.expiry) == 2 and "b" not in cache.expiry  # full: the soonest to expire went first


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ({"jwt_algorithms": ["RS384", "HS256"]}, "HS256 not accepted"),
        ({"jwt_algorithms": "none"}, "none not accepted"),
        ({"jwt_issuers": [{"iss": ISS, "jwks_url": JWKS_URL}]}, "public_url is not"),
        ({"public_url": PUBLIC_URL, "jwt_issuers": [{"iss": ISS}]}, "either jwks_url or keys"),
        ({"public_url": PUBLIC_URL, "jwt_issuers": [{"iss": ISS, "jwks_url": "http://ehr/jwks"}]}, "https"),
        ({"public_url": PUBLIC_URL, "jwt_issuers": [{"iss": ISS, "keys": ["not a key"]}]}, "keys[0]: not a PEM"),
        ({"public_url": PUBLIC_URL, "jwt_issuers": "[{"}, "not JSON"),
        ({"cors_origins": ["https://sandbox.cds-hooks.org/"]}, "not an origin"),
        ({"public_url": "triage.example.org"}, "public_url"),
    ],
)
def test_jwt_and_cors_settings_are_checked(options, fault):
    with pytest.raises(ValidationError, match=fault.replace("[", r"\[")):
        Settings(bundle="b", **options)


def test_a_private_key_is_no_trusted_key(ec_key):
    private_jwk = jwt.algorithms.ECAlgorithm.to_jwk(ec_key, as_dict=True)
    with pytest.raises(ValidationError, match="must be a public key"):
        Settings(bundle="b", public_url=PUBLIC_URL, jwt_issuers=[{"iss": ISS, "keys": [private_jwk]}])


def test_issuers_come_from_json_in_the_environment(monkeypatch, ec_key):
    monkeypatch.setenv("TRIAGE_PUBLIC_URL", f"{PUBLIC_URL}/")
    monkeypatch.setenv("TRIAGE_JWT_ISSUERS", f'[{{"iss": "{ISS}", "jwks_url": "{JWKS_URL}"}}]')
    monkeypatch.setenv("TRIAGE_JWT_ALGORITHMS", "ES384, RS384")
    settings = Settings(bundle="b")
    assert settings.public_url == PUBLIC_URL and settings.jwt_algorithms == ["ES384", "RS384"]
    assert settings.jwt_issuers[0].jwks_url == JWKS_URL
