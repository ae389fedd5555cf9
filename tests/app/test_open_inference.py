"""The Open Inference Protocol (v2) endpoints: driven by NVIDIA's own client, tritonclient, against the real server
on a loopback port, and each error case over HTTP. All notes are SYNTHETIC."""

import asyncio
import json
import logging

import httpx
import numpy as np
import pytest
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from app.logs import JsonFormatter
from app.open_inference import BINARY_REFUSED
from tests.app.test_routes import NOTES, metric_samples, slow_model  # noqa: F401 (slow_model: a fixture)

pytestmark = pytest.mark.anyio

KEY = "test-key"


def auth() -> dict[str, str]:
    """The bearer header, a new dict each time: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": f"Bearer {KEY}"}


def text_input(notes: list[str], shape: list[int] | None = None, binary_data: bool = False) -> InferInput:
    tensor = InferInput("text", shape or [len(notes)], "BYTES")
    tensor.set_data_from_numpy(np.array(notes, dtype=object).reshape(shape or [len(notes)]), binary_data=binary_data)
    return tensor


def infer_body(data: object, shape: list[int] | None = None, **tensor: object) -> dict:
    shape = shape if shape is not None else [len(data)] if isinstance(data, list) else [1]
    return {"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": data} | tensor]}


# Request bodies that are not inference requests this model takes, each with what its 400 says.
MALFORMED = [
    (infer_body(["CC: chest pain"], datatype="FP32"), "datatype 'FP32'; it must be BYTES"),
    ({"inputs": [{"name": "note", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, "one input, 'text'"),
    (
        {"inputs": [infer_body(["a"])["inputs"][0], infer_body(["b"])["inputs"][0]]},
        "one input, 'text'",
    ),
    ({"inputs": []}, "one input, 'text'"),
    (infer_body(["a", "b"], shape=[3]), "shape [3], 3 notes, but its data holds 2 elements"),
    (infer_body(["a", "b"], shape=[1, 2]), "it must be [N] or [N, 1]"),
    (infer_body(["a"], shape=[1, 1, 1]), "it must be [N] or [N, 1]"),
    (infer_body([], shape=[0]), "it must be [N] or [N, 1]"),
    (infer_body([["a", "b"]], shape=[2, 1]), "shape [2, 1], 2 notes, but its data holds 1 elements"),
    (infer_body(["a", 3, None]), "positions [1, 2] are not strings"),
    (infer_body(["CC: chest pain", " \u200b "]), "the note at position 1 is blank"),
    (infer_body(None, shape=[1]), "has no data"),
    (infer_body(None, shape=[1], parameters={"binary_data_size": 12}), BINARY_REFUSED),
    (infer_body(["a"]) | {"outputs": [{"name": "logits"}]}, "unknown outputs ['logits']"),
    (infer_body(["a"]) | {"outputs": [{"name": "label"}, {"name": "label"}]}, "asked for more than once"),
    (infer_body(["a"], shape=["1"]), "shape.0: Input should be a valid integer"),
    (infer_body(["a"]) | {"explain": True}, "explain: Extra inputs are not permitted"),
    ({"text": "CC: chest pain"}, "inputs: Field required"),
]


def test_tritonclient_gets_the_probabilities_and_labels_of_classify(running_server, settings):
    with running_server(settings(api_keys=[KEY])) as (host, port):
        with httpx.Client(base_url=f"http://{host}:{port}", headers=auth()) as http:
            model = http.get("/v1/model").json()
            classified = http.post("/classify", json={"notes": [{"text": note} for note in NOTES]}).json()["results"]
        client = InferenceServerClient(f"{host}:{port}")
        try:
            live, ready = client.is_server_live(), client.is_server_ready()
            model_ready = client.is_model_ready(model["name"])
            version_ready = client.is_model_ready(model["name"], model_version=model["version"])
            unknown_ready = client.is_model_ready("no-such-model")
            metadata = client.get_model_metadata(model["name"], headers=auth())
            server = client.get_server_metadata(headers=auth())
            answered = client.infer(model["name"], [text_input(NOTES)], request_id="req-7", headers=auth())
            column = client.infer(
                model["name"],
                [text_input(NOTES, shape=[len(NOTES), 1])],
                model_version=model["version"],
                outputs=[InferRequestedOutput("label", binary_data=False)],
                headers=auth(),
            )
            with pytest.raises(InferenceServerException) as binary:
                client.infer(model["name"], [text_input(NOTES, binary_data=True)], headers=auth())
            with pytest.raises(InferenceServerException) as unauthorized:
                client.infer(model["name"], [text_input(NOTES)])
            with pytest.raises(InferenceServerException) as unknown:
                client.get_model_metadata("no-such-model", headers=auth())
        finally:
            client.close()

    assert live and ready and model_ready and version_ready and not unknown_ready
    assert metadata == {
        "name": model["name"],
        "versions": [model["version"]],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    assert server["name"] == "dsgkd-triage" and server["extensions"] == []
    probabilities = answered.as_numpy("probability")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(NOTES),)
    np.testing.assert_allclose(probabilities, [result["probability"] for result in classified], rtol=0, atol=1e-6)
    labels = [result["label"] for result in classified]
    assert list(answered.as_numpy("label")) == labels
    response = answered.get_response()
    assert response["id"] == "req-7" and response["model_name"] == model["name"]
    assert response["model_version"] == model["version"]
    assert [output["name"] for output in column.get_response()["outputs"]] == ["label"]
    assert list(column.as_numpy("label")) == labels
    assert binary.value.status() == "400" and BINARY_REFUSED in binary.value.message()
    assert unauthorized.value.status() == "401"
    assert unknown.value.status() == "404" and "no-such-model" in unknown.value.message()


async def test_malformed_inference_requests_get_400_saying_what_is_wrong(serve, settings):
    async with serve(settings()) as client:
        name = (await client.get("/v1/model")).json()["name"]
        responses = [await client.post(f"/v2/models/{name}/infer", json=body) for body, _ in MALFORMED]
    for (body, message), response in zip(MALFORMED, responses, strict=True):
        assert response.status_code == 400 and message in response.json()["error"], (body, response.json())


async def test_bodies_that_are_not_json_or_binary_tensors_get_400(serve, settings):
    async with serve(settings()) as client:
        name = (await client.get("/v1/model")).json()["name"]
        path = f"/v2/models/{name}/infer"
        header = json.dumps(infer_body(None, shape=[1], parameters={"binary_data_size": 8})).encode()
        binary = await client.post(
            path,
            content=header + b"\x04\x00\x00\x00\xc8\xb1\xff\xfe",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        broken = await client.post(path, content=b'{"inputs": [')
        plain = await client.post(path, content=b"CC: chest pain", headers={"Content-Type": "text/plain"})
        untyped = await client.post(path, content=json.dumps(infer_body(["CC: chest pain"])).encode())
    assert binary.status_code == 400 and binary.json() == {"error": BINARY_REFUSED}
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]
    assert plain.status_code == 400 and "valid dictionary" in plain.json()["error"]
    assert untyped.status_code == 200  # tritonclient sends no Content-Type


async def test_a_column_of_notes_may_be_flat_or_nested(serve, settings):
    async with serve(settings(model_name="triage")) as client:
        flat = await client.post("/v2/models/triage/infer", json=infer_body(NOTES, shape=[3, 1]))
        nested = await client.post("/v2/models/triage/infer", json=infer_body([[note] for note in NOTES], shape=[3, 1]))
    assert flat.status_code == nested.status_code == 200
    assert flat.json() == nested.json()
    assert [output["shape"] for output in flat.json()["outputs"]] == [[3], [3]]


async def test_an_unknown_model_or_version_is_404(serve, settings):
    async with serve(settings(model_name="triage")) as client:
        version = (await client.get("/v1/model")).json()["version"]
        responses = [
            await client.get("/v2/models/other"),
            await client.get("/v2/models/other/ready"),
            await client.post("/v2/models/other/infer", json=infer_body(["CC: chest pain"])),
            await client.get("/v2/models/triage/versions/0.0.0-no"),
            await client.get("/v2/models/triage/versions/0.0.0-no/ready"),
            await client.post("/v2/models/triage/versions/0.0.0-no/infer", json=infer_body(["CC: chest pain"])),
        ]
        served = await client.post(f"/v2/models/triage/versions/{version}/infer", json=infer_body(["CC: chest pain"]))
    assert [response.status_code for response in responses] == [404] * 6
    assert "unknown model 'other'; this server serves 'triage'" in responses[0].json()["error"]
    assert "no version '0.0.0-no'" in responses[3].json()["error"]
    assert served.status_code == 200 and served.json()["model_version"] == version


async def test_keys_guard_metadata_and_inference_but_not_the_probes(serve, settings):
    async with serve(settings(api_keys=[KEY], model_name="triage")) as client:
        open_probes = [
            await client.get(path) for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/triage/ready")
        ]
        guarded = [
            await client.get("/v2"),
            await client.get("/v2/models/triage"),
            await client.post("/v2/models/triage/infer", json=infer_body(["CC: chest pain"])),
            await client.post("/v2/models/triage/infer", content=b"not even json"),
        ]
        let_in = await client.post("/v2/models/triage/infer", json=infer_body(["CC: chest pain"]), headers=auth())
    assert [response.json() for response in open_probes] == [
        {"live": True},
        {"ready": True},
        {"name": "triage", "ready": True},
    ]
    assert [response.status_code for response in guarded] == [401] * 4
    assert all(response.json() == {"error": "missing or invalid bearer token"} for response in guarded)
    assert let_in.status_code == 200


async def test_readiness_is_503_until_the_bundle_is_loaded(serve, settings):
    async with serve(settings(model_name="triage"), lifespan=False) as client:
        live = await client.get("/v2/health/live")
        ready = await client.get("/v2/health/ready")
        model_ready = await client.get("/v2/models/triage/ready")
        infer = await client.post("/v2/models/triage/infer", json=infer_body(["CC: chest pain"]))
    assert live.status_code == 200
    assert [response.status_code for response in (ready, model_ready, infer)] == [503] * 3
    assert all("not loaded" in response.json()["error"] for response in (ready, model_ready, infer))
    assert ready.headers["retry-after"]


async def test_the_limits_of_classify_apply(serve, settings):
    async with serve(settings(model_name="triage", max_notes_per_request=2, max_note_chars=50)) as client:
        many = await client.post("/v2/models/triage/infer", json=infer_body(NOTES))
        long = await client.post("/v2/models/triage/infer", json=infer_body(["CC: chest pain " * 10]))
    assert many.status_code == 413 and many.json() == {"error": "3 notes; at most 2 per request"}
    assert long.status_code == 413 and "exceed 50 characters" in long.json()["error"]
    async with serve(settings(model_name="triage", max_note_tokens=16, truncation="refuse")) as client:
        refused = await client.post("/v2/models/triage/infer", json=infer_body(["CC: chest pain " * 20]))
    assert refused.status_code == 413 and "exceed 16 tokens" in refused.json()["error"]


async def test_a_full_queue_answers_503_with_retry_after(serve, settings, slow_model):  # noqa: F811
    limits = {"queue_capacity": 2, "max_notes_per_request": 2, "explain_max_words": 0, "max_wait_ms": 0}
    async with serve(settings(model_name="triage", **limits)) as client:
        responses = await asyncio.gather(
            *(client.post("/v2/models/triage/infer", json=infer_body([note])) for note in NOTES * 3)
        )
    statuses = {response.status_code for response in responses}
    assert statuses == {200, 503}
    refused = [response for response in responses if response.status_code == 503]
    assert all(r.headers["retry-after"] and r.json() == {"error": "queue full, retry later"} for r in refused)


async def test_inference_is_audited_counted_and_logged_without_its_notes(serve, settings, caplog, capsys):
    marker = "ZQX-OIP-5521"
    caplog.set_level(logging.DEBUG)
    body = infer_body([f"CC: seizure {marker}", "CC: medication refill"]) | {"id": f"id-{marker}"}
    async with serve(settings(model_name="triage")) as client:
        answered = await client.post("/v2/models/triage/infer", json=body, headers={"X-Request-ID": "req-oip"})
        refused = await client.post("/v2/models/triage/infer", json=infer_body([marker, 7]))
        metrics = (await client.get("/metrics")).text
    assert answered.status_code == 200 and refused.status_code == 400
    outputs = {output["name"]: output for output in answered.json()["outputs"]}
    [record] = [record.fields for record in caplog.records if record.name == "triage.audit"]
    assert record["request_id"] == "req-oip" and record["route"] == "/v2/models/triage/infer"
    assert [note["probability"] for note in record["notes"]] == outputs["probability"]["data"]
    assert [note["label"] for note in record["notes"]] == outputs["label"]["data"]
    requests = metric_samples(metrics, "triage_http_requests")
    route = ("route", "/v2/models/{model_name}/infer")
    assert requests[("triage_http_requests_total", (route, ("status", "200")))] == 1
    assert requests[("triage_http_requests_total", (route, ("status", "400")))] == 1
    assert metric_samples(metrics, "triage_notes_classified")[("triage_notes_classified_total", ())] == 2
    formatted = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    captured = capsys.readouterr()
    assert marker not in formatted + caplog.text + captured.out + captured.err
