"""Service settings: environment variables `TRIAGE_<NAME>`, or the matching `python -m app serve --<name>` flags."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.cds_auth import ASYMMETRIC_ALGORITHMS, static_key
from app.tracing import Exporter, missing_modules

ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]+)?")


class TrustedIssuer(BaseModel):
    """An EHR whose signed JWTs the CDS Hooks routes accept (`app.cds_auth`): keys from its JWK Set URL, or static."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iss: str = Field(min_length=1, description="The `iss` of its tokens, compared exactly.")
    jwks_url: str | None = Field(
        None,
        pattern=r"^https://\S+$",
        description="Its JWK Set URL: keys fetched by `kid`, cached 5 minutes; a token's `jku`, if any, must be it.",
    )
    keys: list[str | dict[str, Any]] = Field(
        default_factory=list,
        description="Or its public keys, for a hospital without access to a JWK Set URL: each a PEM text or a JWK.",
    )

    @model_validator(mode="after")
    def _check_keys(self) -> TrustedIssuer:
        if (self.jwks_url is None) == (not self.keys):
            raise ValueError(f"issuer {self.iss}: give either jwks_url or keys")
        for position, key in enumerate(self.keys):
            try:
                static_key(key)
            except ValueError as error:
                raise ValueError(f"issuer {self.iss}, keys[{position}]: {error}") from None
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIAGE_", frozen=True, extra="forbid")

    bundle: Path = Field(description="Model bundle directory written by `python -m training export`.")
    variant: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto", description="ONNX variant: auto picks fp16 on CUDA, else int8, falling back to fp32."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 inside a container).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    max_batch_size: int = Field(32, gt=0, description="Most notes the model runs at once.")
    max_batch_tokens: int = Field(
        8192, gt=0, description="Most padded tokens (notes x longest note) the model runs at once."
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="How long the batcher waits for more notes after the first one before running; "
        "only while requests arrive concurrently (a lone request runs at once).",
    )
    queue_capacity: int = Field(
        1024, gt=0, description="Notes that may wait for the model; a request that does not fit gets 429."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="A request still waiting for the model after this long gets 503."
    )
    max_notes_per_request: int = Field(64, gt=0, description="Most notes in one request (413 beyond).")
    max_note_chars: int = Field(
        20_000, gt=0, description="Most characters in one note (413 beyond, whatever the truncation)."
    )
    max_note_tokens: int | None = Field(
        None, gt=0, description="Most tokens in one note (default: the bundle's max_input_tokens)."
    )
    explain_top_k: int = Field(
        5, gt=0, description="Words per note in an explanation (explain: true): those that moved P(emergency) most."
    )
    explain_max_words: int = Field(
        128,
        ge=0,
        description="Most words a request with explain: true may have, over all its notes (413 beyond): each "
        "word costs one more model run.",
    )
    truncation: Literal["head-tail", "head", "refuse"] = Field(
        "head-tail",
        description="A note over max_note_tokens: head-tail keeps its first quarter and its last three quarters of "
        "the tokens, head keeps its start (either way the answer says truncated: true); refuse answers 413.",
    )
    intra_op_threads: int | None = Field(
        None, gt=0, description="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)."
    )
    require_accelerator: bool = Field(
        False,
        description="Serve on the GPU or not at all: ask for ONNX Runtime's CUDA provider whatever the variant, and "
        "stay not ready (/readyz 503, saying why) when the model runs without it: the `cpu` extra installed, a CUDA "
        "or cuDNN library that fails to load, no GPU visible. Off: such a service runs on the CPU, with a warning.",
    )
    device_id: int = Field(
        0,
        ge=0,
        description="The GPU the CUDA provider runs on, as numbered inside the process (in a container given one "
        "GPU, 0). Run one service per GPU.",
    )
    warm_up_s: float = Field(
        10.0,
        ge=0,
        description="Most seconds spent at start running the batch shapes the batcher will form (largest first), "
        "so that first requests do not pay for memory and kernels; shapes left when it is spent run on first use "
        "(on a CPU a large batch takes seconds).",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Bearer tokens accepted by /classify, /v1/model and /metrics; none set = no auth. "
        "Environment: comma-separated.",
    )
    public_url: str | None = Field(
        None,
        pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$",
        description="This service's base URL as EHRs and browsers reach it, e.g. https://triage.example.org: the "
        "audience of EHR-signed JWTs is {public_url}/cds-services/triage-note, and CDS Hooks cards link to "
        "{public_url}/model-card. Default: the URL each request came to (set it behind a proxy).",
    )
    jwt_issuers: Annotated[list[TrustedIssuer], NoDecode] = Field(
        default_factory=list,
        description="EHRs whose signed JWTs (CDS Hooks 2.0) the CDS Hooks service and feedback accept, besides "
        'api_keys: a JSON list of {"iss": ..., "jwks_url": ...} or {"iss": ..., "keys": [PEM or JWK, ...]}. '
        "Needs public_url.",
    )
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "RS384", "ES256", "ES384"],
        min_length=1,
        description="Signature algorithms accepted in EHR-signed JWTs: asymmetric only (never none or HS*, which "
        "CDS Hooks forbids; api_keys are the shared-secret option). Environment: comma-separated.",
    )
    jwt_leeway_s: float = Field(
        30.0, ge=0, le=300, description="Clock skew allowed when checking an EHR-signed JWT's exp and iat."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to call the service (CORS), e.g. https://sandbox.cds-hooks.org, or * "
        "for any; none set = no CORS. Environment: comma-separated.",
    )
    cds_explain: bool = Field(
        True,
        description="CDS Hooks cards list the explain_top_k words the model's output is most sensitive to (one more "
        "model run per word of the note); not for notes over explain_max_words words, whose cards go without.",
    )
    max_body_bytes: int = Field(
        1_048_576, gt=0, description="Largest request body in bytes, after gzip decompression too (413 beyond)."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection whose request headers are not complete this long after they began "
        "is answered 408 and closed (slow clients).",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request whose body has not arrived this long after its headers gets 408."
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this.")
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Largest request head (request line and all headers) in bytes (431 beyond)."
    )
    max_headers: int = Field(100, gt=0, description="Most header fields in one request (431 beyond).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    model_name: str | None = Field(None, description="Model name reported in responses (default: the bundle's).")
    audit_file: Path | None = Field(
        None,
        description="Append-only JSON-lines audit file, one record per answered recommendation (created 0600); "
        "a record that cannot be written fails its request with 503. Default: the log stream only.",
    )
    audit_max_bytes: int = Field(
        100 * 2**20, ge=0, description="Audit file size at which it is rotated (renamed FILE.1, ...); 0: never."
    )
    audit_backups: int = Field(
        20, gt=0, description="Rotated audit files kept; the oldest beyond them is deleted (archive them first)."
    )
    audit_log_stream: bool = Field(
        True, description="Also write each audit record to the log stream (logger triage.audit)."
    )
    otel_enabled: bool = Field(
        False,
        description="OpenTelemetry tracing (needs the `tracing` extra): a span per request, continuing an incoming "
        "W3C traceparent, and one for its model inference; counts and durations only, never note text. Health "
        "probes and /metrics are not traced.",
    )
    otel_exporter: Exporter = Field(
        "otlp",
        description="Where spans go: otlp (OTLP/HTTP; endpoint, headers and the rest from the standard "
        "OTEL_EXPORTER_OTLP_* variables, default http://localhost:4318), console (stdout), or none (trace ids "
        "still continued into the access log).",
    )

    @field_validator("api_keys", "jwt_algorithms", "cors_origins", mode="before")
    @classmethod
    def _split_comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("jwt_issuers", mode="before")
    @classmethod
    def _parse_json(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"not JSON: {error.msg} at character {error.pos}") from None
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _check_asymmetric(cls, algorithms: list[str]) -> list[str]:
        refused = [algorithm for algorithm in algorithms if algorithm not in ASYMMETRIC_ALGORITHMS]
        if refused:
            raise ValueError(
                f"{', '.join(refused)} not accepted: use {', '.join(ASYMMETRIC_ALGORITHMS)} (CDS Hooks forbids none "
                "and shared-secret HS* JWTs; api_keys are the shared-secret option)"
            )
        return algorithms

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], without path or trailing slash")
        return origins

    @field_validator("public_url")
    @classmethod
    def _strip_trailing_slash(cls, url: str | None) -> str | None:
        return None if url is None else url.rstrip("/")

    @model_validator(mode="after")
    def _check_jwt_audience(self) -> Settings:
        if self.jwt_issuers and self.public_url is None:
            raise ValueError(
                "jwt_issuers are set but public_url is not: EHR-signed JWTs are checked for the audience "
                "{public_url}/cds-services/triage-note"
            )
        return self

    @model_validator(mode="after")
    def _check_limits_fit(self) -> Settings:
        if self.max_notes_per_request > self.queue_capacity:
            raise ValueError(
                f"max_notes_per_request ({self.max_notes_per_request}) exceeds queue_capacity "
                f"({self.queue_capacity}): a full request could never be queued"
            )
        if self.max_notes_per_request + self.explain_max_words > self.queue_capacity:
            raise ValueError(
                f"max_notes_per_request ({self.max_notes_per_request}) + explain_max_words "
                f"({self.explain_max_words}) exceeds queue_capacity ({self.queue_capacity}): a full explained "
                "request could never be queued"
            )
        if self.max_note_tokens is not None and self.max_note_tokens > self.max_batch_tokens:
            raise ValueError(
                f"max_note_tokens ({self.max_note_tokens}) exceeds max_batch_tokens "
                f"({self.max_batch_tokens}): a longest note would fit in no batch"
            )
        return self

    @model_validator(mode="after")
    def _check_audit_has_a_sink(self) -> Settings:
        if self.audit_file is None and not self.audit_log_stream:
            raise ValueError("audit_log_stream is off and no audit_file is set: the audit trail would go nowhere")
        return self

    @model_validator(mode="after")
    def _check_tracing_installed(self) -> Settings:
        missing = missing_modules(self.otel_exporter) if self.otel_enabled else []
        if missing:
            raise ValueError(
                f"otel_enabled needs {', '.join(missing)}, which is not installed: install the service with its "
                "`tracing` extra (pip install 'dsgkd-triage[tracing]'), or turn tracing off"
            )
        return self
