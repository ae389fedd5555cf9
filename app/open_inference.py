"""The Open Inference Protocol (KServe and Triton's "v2" REST API): health, server and model metadata, and inference
through the same path as /classify (`app.service.classify_texts`: note limits, truncation, the dynamic batcher, the
bundle's threshold), with the same bearer-token auth and the same audit record.

The model takes one input, `text`: BYTES of shape [N] or [N, 1], the N notes as JSON strings. It gives two
outputs of shape [N]: `probability`, FP32, the calibrated P(emergency) that /classify gives, and `label`, BYTES,
`emergency` or `non-emergency` at the bundle's threshold. Tensors travel as JSON only: a request using the binary
tensor data extension is refused (400) before its body is read; outputs asked for in binary are sent as JSON,
which clients read whatever they asked for (tritonclient does).

Errors are the protocol's `{"error": "..."}`. A full queue answers 503 with Retry-After, as Triton does for it
(/classify answers 429).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from http import HTTPStatus
from importlib.metadata import version
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app import audit
from app.auth import require_api_key
from app.dependencies import log_fields, ready_service
from app.service import Service, ServiceError, classify_texts
from app.text import text_problem

V2 = "/v2"
MODEL_PATH = f"{V2}/models/{{model_name}}"
VERSION_PATH = f"{MODEL_PATH}/versions/{{model_version}}"
SERVER_NAME = "dsgkd-triage"
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX Runtime model
INPUT = "text"
PROBABILITY, LABEL = "probability", "label"
# The binary tensor data extension: the JSON header's length, when binary tensors follow it in the body.
BINARY_HEADER = "inference-header-content-length"
BINARY_REFUSED = (
    "the binary tensor data extension is not supported: send the tensors as JSON "
    "(tritonclient: InferInput.set_data_from_numpy(..., binary_data=False))"
)
# Triton's status for a full queue: 503, which OIP clients and gateways retry.
STATUS_OF = {HTTPStatus.TOO_MANY_REQUESTS: HTTPStatus.SERVICE_UNAVAILABLE}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"`{INPUT}`.")
    shape: list[StrictInt] = Field(description="[N] or [N, 1]: N notes.")
    datatype: str = Field(description="BYTES.")
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(
        None, description="The N notes as JSON strings: flat, or for shape [N, 1] also nested ([[note], ...])."
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"`{PROBABILITY}` or `{LABEL}`.")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data` is answered with JSON.")


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [
                        {
                            "name": INPUT,
                            "shape": [2],
                            "datatype": "BYTES",
                            "data": ["CC: seizure. BT 38.9, HR 150", "CC: medication refill. BT 36.6"],
                        }
                    ],
                }
            ]
        },
    )

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_output` is answered with JSON.")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="The outputs to return (default: both).")


class ResponseOutput(BaseModel):
    name: str
    datatype: Literal["FP32", "BYTES"]
    shape: list[int]
    data: list[float] | list[str]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class ErrorBody(BaseModel):
    error: str


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def speaks_oip(path: str) -> bool:
    return path == V2 or path.startswith(f"{V2}/")


class OpenInferenceRoute(APIRoute):
    """Answers an error raised anywhere in the route, dependencies included, as the protocol's `{"error": ...}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_with_error_body(request: Request) -> Response:
            try:
                return await handle(request)
            except HTTPException as error:
                status, message, headers = error.status_code, str(error.detail), error.headers
            except ServiceError as error:
                status, message, headers = STATUS_OF.get(error.status, error.status), error.message, error.headers
            except RequestValidationError as error:  # messages and places only: an `input` could be a note
                log_fields(request)["validation_errors"] = sorted({entry["type"] for entry in error.errors()})
                status, headers = HTTPStatus.BAD_REQUEST, None
                message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            return error_response(status, message, headers)

        return handle_with_error_body


class BinaryTensorRefusal:
    """ASGI middleware: 400 for a v2 POST using the binary tensor data extension (tritonclient's default), before
    its body is read, whose binary part the JSON body checks would refuse in less helpful words."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and speaks_oip(scope["path"])
            and BINARY_HEADER in Headers(scope=scope)
        ):
            scope.setdefault("state", {}).setdefault("log_fields", {})["refused"] = "binary-tensor-data"
            await error_response(HTTPStatus.BAD_REQUEST, BINARY_REFUSED)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _errors(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": text} for status, text in descriptions.items()}


# tritonclient sends its JSON without a Content-Type, which FastAPI would otherwise not parse (as Triton does, these
# routes parse it). A web page could then make a browser send an inference request unasked, but with api_keys set
# it cannot add the Authorization header without a CORS preflight, and it can never read the answer.
router = APIRouter(route_class=OpenInferenceRoute, tags=["Open Inference Protocol (v2)"], strict_content_type=False)
NOT_LOADED = "Model not loaded yet, or shutting down."
UNKNOWN_MODEL = "No model of that name (or version) is served."


@router.get(f"{V2}/health/live", summary="Liveness: the process is up")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    f"{V2}/health/ready", summary="Readiness: the model is loaded and warmed up", responses=_errors({503: NOT_LOADED})
)
async def ready(service: Annotated[Service, Depends(ready_service)]) -> dict[str, bool]:
    return {"ready": True}


@router.get(
    V2,
    response_model=ServerMetadata,
    dependencies=[Depends(require_api_key)],
    summary="Server metadata",
    responses=_errors({401: "Missing or invalid bearer token."}),
)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=version(SERVER_NAME), extensions=[])


def _served(service: Service, model_name: str, model_version: str | None = None) -> None:
    """404 unless the service serves `model_name` (at `model_version`, when given)."""
    served = service.model
    if model_name != served.name:
        raise ServiceError(HTTPStatus.NOT_FOUND, f"unknown model {model_name!r}; this server serves {served.name!r}")
    if model_version is not None and model_version != served.version:
        raise ServiceError(
            HTTPStatus.NOT_FOUND,
            f"model {model_name!r} has no version {model_version!r}; its served version is {served.version!r}",
        )


_READY_RESPONSES = _errors({404: UNKNOWN_MODEL, 503: NOT_LOADED})


@router.get(f"{MODEL_PATH}/ready", summary="Readiness of the model", responses=_READY_RESPONSES)
async def model_ready(model_name: str, service: Annotated[Service, Depends(ready_service)]) -> dict[str, Any]:
    _served(service, model_name)
    return {"name": model_name, "ready": True}


@router.get(f"{VERSION_PATH}/ready", summary="Readiness of a version of the model", responses=_READY_RESPONSES)
async def model_version_ready(
    model_name: str, model_version: str, service: Annotated[Service, Depends(ready_service)]
) -> dict[str, Any]:
    _served(service, model_name, model_version)
    return {"name": model_name, "ready": True}


def _model_metadata(service: Service) -> ModelMetadata:
    return ModelMetadata(
        name=service.model.name,
        versions=[service.model.version],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name=PROBABILITY, datatype="FP32", shape=[-1]),
            TensorMetadata(name=LABEL, datatype="BYTES", shape=[-1]),
        ],
    )


_METADATA_RESPONSES = _errors({401: "Missing or invalid bearer token.", 404: UNKNOWN_MODEL, 503: NOT_LOADED})


@router.get(
    MODEL_PATH,
    response_model=ModelMetadata,
    dependencies=[Depends(require_api_key)],
    summary="Model metadata: its input and outputs",
    responses=_METADATA_RESPONSES,
)
async def model_metadata(model_name: str, service: Annotated[Service, Depends(ready_service)]) -> ModelMetadata:
    _served(service, model_name)
    return _model_metadata(service)


@router.get(
    VERSION_PATH,
    response_model=ModelMetadata,
    dependencies=[Depends(require_api_key)],
    summary="Metadata of a version of the model",
    responses=_METADATA_RESPONSES,
)
async def model_version_metadata(
    model_name: str, model_version: str, service: Annotated[Service, Depends(ready_service)]
) -> ModelMetadata:
    _served(service, model_name, model_version)
    return _model_metadata(service)


def _invalid(message: str) -> ServiceError:
    return ServiceError(HTTPStatus.BAD_REQUEST, message)


def notes_of(body: InferenceRequest) -> list[str]:
    """The notes in the request's one input, `text`; 400 naming what is wrong (notes by position, never quoted)."""
    names = [tensor.name for tensor in body.inputs]
    if names != [INPUT]:
        raise _invalid(f"the model takes one input, {INPUT!r} (BYTES, shape [N] or [N, 1]); got {names}")
    [tensor] = body.inputs
    if tensor.parameters and "binary_data_size" in tensor.parameters:
        raise _invalid(BINARY_REFUSED)
    if tensor.datatype != "BYTES":
        raise _invalid(f"input {INPUT!r} has datatype {tensor.datatype!r}; it must be BYTES (the notes as strings)")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise _invalid(f"input {INPUT!r} has shape {shape}; it must be [N] or [N, 1], N >= 1 notes")
    if tensor.data is None:
        raise _invalid(f"input {INPUT!r} has no data")
    data = tensor.data
    if len(shape) == 2 and data and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]  # row-major nesting: [[note], [note], ...]
    if len(data) != shape[0]:
        raise _invalid(f"input {INPUT!r} has shape {shape}, {shape[0]} notes, but its data holds {len(data)} elements")
    not_strings = [position for position, element in enumerate(data) if not isinstance(element, str)]
    if not_strings:
        raise _invalid(f"input {INPUT!r}: the elements at positions {not_strings} are not strings (BYTES in JSON)")
    texts: list[str] = data
    for position, text in enumerate(texts):
        problem = text_problem(text)
        if problem is not None:
            raise _invalid(f"input {INPUT!r}: the note at position {position} {problem}")
    return texts


def outputs_of(body: InferenceRequest) -> list[str]:
    """The names of the outputs asked for, in order (both when none are)."""
    if not body.outputs:
        return [PROBABILITY, LABEL]
    names = [output.name for output in body.outputs]
    unknown = [name for name in names if name not in (PROBABILITY, LABEL)]
    if unknown:
        raise _invalid(f"unknown outputs {unknown}; the model's outputs are {PROBABILITY!r} and {LABEL!r}")
    if len(set(names)) < len(names):
        raise _invalid(f"an output is asked for more than once: {names}")
    return names


_INFER_RESPONSES = _errors(
    {
        400: "Not JSON, or not an inference request this model takes (input, datatype, shape, data, outputs); "
        "the binary tensor data extension.",
        401: "Missing or invalid bearer token (when api_keys are set).",
        404: UNKNOWN_MODEL,
        408: "Body not received within body_timeout_s.",
        413: "Body, note count or note length over the limit; note tokens over it with truncation refuse.",
        415: "Content-Encoding other than gzip.",
        500: "The model failed.",
        503: "Queue full (retry after Retry-After seconds), model not loaded, shutting down, or timed out waiting "
        "for the model; or the audit record could not be written.",
    }
)


async def _infer(
    request: Request, service: Service, body: InferenceRequest, model_name: str, model_version: str | None
) -> InferenceResponse:
    _served(service, model_name, model_version)
    texts = notes_of(body)
    names = outputs_of(body)
    classified = await classify_texts(service, texts, log_fields(request))
    await audit.record(request, service, classified)
    tensors = {
        PROBABILITY: ResponseOutput(
            name=PROBABILITY, datatype="FP32", shape=[len(texts)], data=[result.probability for result in classified]
        ),
        LABEL: ResponseOutput(
            name=LABEL, datatype="BYTES", shape=[len(texts)], data=[result.label for result in classified]
        ),
    }
    return InferenceResponse(
        model_name=service.model.name,
        model_version=service.model.version,
        id=body.id,
        outputs=[tensors[name] for name in names],
    )


@router.post(
    f"{MODEL_PATH}/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,  # no id unless the request had one
    dependencies=[Depends(require_api_key)],
    summary="Classify triage notes: P(emergency) and label of each",
    responses=_INFER_RESPONSES,
)
async def infer(
    model_name: str,
    body: Annotated[InferenceRequest, Body()],
    request: Request,
    service: Annotated[Service, Depends(ready_service)],
) -> InferenceResponse:
    return await _infer(request, service, body, model_name, None)


@router.post(
    f"{VERSION_PATH}/infer",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_api_key)],
    summary="Classify triage notes with a version of the model",
    responses=_INFER_RESPONSES,
)
async def infer_version(
    model_name: str,
    model_version: str,
    body: Annotated[InferenceRequest, Body()],
    request: Request,
    service: Annotated[Service, Depends(ready_service)],
) -> InferenceResponse:
    return await _infer(request, service, body, model_name, model_version)
