"""One regression test per finding of the hardening review (hostile and broken requests), through the real app.

All notes are SYNTHETIC. The slow-client and raw-HTTP tests run the real server (uvicorn with
`app.server`'s protocol) on a loopback port.
"""

import base64
import gzip
import json
import logging
import shutil
import socket
import statistics
import time

import httpx
import pytest

from app.bundle import BundleError, load_bundle
from app.cds_hooks import PREFETCH_KEY, SERVICE_ID
from app.fhir import CLASSIFY_PATH, FHIR_JSON
from app.logs import JsonFormatter

pytestmark = pytest.mark.anyio

NOTE = "CC: chest pain. BT 38.9, HR 150"
CDS_PATH = f"/cds-services/{SERVICE_ID}"
FHIR_SERVER = "https://ehr.example.org/fhir"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def document(text: str = NOTE, subject: dict | None = None, content_type: str = "text/plain", **fields) -> dict:
    data = base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()
    resource = {
        "resourceType": "DocumentReference",
        "id": "doc-1",
        "status": "current",
        "content": [{"attachment": {"contentType": content_type, "data": data}}],
        **fields,
    }
    if subject is not None:
        resource["subject"] = subject
    return resource


def hook(prefetched: dict, patient: str = "123", **fields) -> dict:
    return {
        "hook": "patient-view",
        "hookInstance": "h-1",
        "fhirServer": FHIR_SERVER,
        "context": {"userId": "Practitioner/1", "patientId": patient},
        "prefetch": {PREFETCH_KEY: prefetched},
        **fields,
    }


def nested(depth: int) -> bytes:
    return b'{"resourceType": "DocumentReference", "x": ' + b"[" * depth + b"]" * depth + b"}"


# 1. The wrong-patient guard.


@pytest.mark.parametrize(
    "subject",
    [
        {"identifier": {"system": "urn:mrn", "value": "MRN-ZQX-4711"}},
        {"display": "Someone"},
        {"reference": "https://other.example.org/fhir/Patient/123"},
        {"reference": "Patient/1234"},
        {"reference": "Group/123"},
        {"reference": "Patient/123", "type": "Group"},
        None,
    ],
    ids=["identifier", "display", "other-server", "other-id", "not-a-patient", "contradicting-type", "no-subject"],
)
async def test_a_prefetched_note_not_provably_about_the_context_patient_is_refused(serve, settings, subject, caplog):
    caplog.set_level(logging.INFO, logger="app.access")
    async with serve(settings()) as client:
        response = await client.post(CDS_PATH, json=hook(document(subject=subject)))
    assert response.status_code == 400 and "not provably about context.patientId" in response.json()["detail"]
    [line] = [JsonFormatter().format(r) for r in caplog.records if r.name == "app.access"]
    entry = json.loads(line)
    assert entry["refused"] == "subject-not-context-patient" and entry["refused_notes"] == 1
    # Markers no request id or timestamp can contain by chance (a short number could: ids are random hex).
    assert "ZQX" not in line and "Someone" not in line and "other.example" not in line


@pytest.mark.parametrize(
    "reference", ["Patient/123", "Patient/123/_history/2", f"{FHIR_SERVER}/Patient/123", f"{FHIR_SERVER}/Patient/123/"]
)
async def test_a_note_about_the_context_patient_relative_or_on_the_ehrs_server_is_scored(serve, settings, reference):
    async with serve(settings()) as client:
        response = await client.post(CDS_PATH, json=hook(document(subject={"reference": reference})))
    if reference.endswith("/"):  # `Patient/123/` names no resource
        assert response.status_code == 400
    else:
        assert response.status_code == 200 and len(response.json()["cards"]) == 1


async def test_fhir_classify_with_a_subject_or_encounter_scores_only_notes_provably_about_them(serve, settings):
    note = document(subject={"reference": "Patient/123"}, context={"encounter": [{"reference": "Encounter/9"}]})
    headers = {"Content-Type": FHIR_JSON}
    async with serve(settings()) as client:
        matching = await client.post(
            f"{CLASSIFY_PATH}?subject=Patient/123&encounter=Encounter/9", json=note, headers=headers
        )
        other_patient = await client.post(f"{CLASSIFY_PATH}?subject=Patient/999", json=note, headers=headers)
        other_encounter = await client.post(f"{CLASSIFY_PATH}?encounter=Encounter/1", json=note, headers=headers)
        malformed = await client.post(f"{CLASSIFY_PATH}?subject=123", json=note, headers=headers)
    assert matching.status_code == 200
    for refused in (other_patient, other_encounter):
        assert refused.status_code == 422 and refused.json()["issue"][0]["code"] == "business-rule"
    assert malformed.status_code == 400 and malformed.headers["content-type"] == FHIR_JSON
    assert malformed.json()["resourceType"] == "OperationOutcome"


# 2. Client errors that were answered 500.


@pytest.mark.parametrize(
    ("path", "content_type"),
    [(CLASSIFY_PATH, FHIR_JSON), (CDS_PATH, "application/json"), ("/classify", "application/json")],
)
async def test_deep_nesting_and_huge_numbers_are_400_in_the_protocols_format(serve, settings, path, content_type):
    async with serve(settings()) as client:
        deep = await client.post(path, content=nested(10_000), headers={"Content-Type": content_type})
        huge = await client.post(
            path, content=b'{"resourceType": "X", "x": ' + b"9" * 5000 + b"}", headers={"Content-Type": content_type}
        )
        fine = await client.post(path, content=nested(30), headers={"Content-Type": content_type})
    assert deep.status_code == 400 and "nested deeper than 64" in deep.text
    assert huge.status_code == 400 and "more than 64 digits" in huge.text
    assert fine.status_code in (400, 422)  # reaches the endpoint, which refuses the resource itself
    if path == CLASSIFY_PATH:
        assert deep.json()["resourceType"] == huge.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(("charset", "text"), [("undefined", NOTE), ("utf-7", "+2D8-"), ("unicode_escape", "\\ud800")])
async def test_charsets_off_the_list_are_422_in_fhir_and_cds(serve, settings, charset, text):
    note = document(text, {"reference": "Patient/123"}, f"text/plain; charset={charset}")
    async with serve(settings()) as client:
        fhir = await client.post(CLASSIFY_PATH, json=note, headers={"Content-Type": FHIR_JSON})
        cds = await client.post(CDS_PATH, json=hook(note))
    assert fhir.status_code == 422 and fhir.json()["issue"][0]["code"] == "not-supported"
    assert cds.status_code == 422 and "charset" in cds.json()["detail"]


async def test_korean_charsets_are_read(serve, settings):
    korean = "3세 남아 CC: seizure"
    note = document(subject={"reference": "Patient/123"}, content_type="text/plain; charset=ks_c_5601-1987")
    note["content"][0]["attachment"]["data"] = base64.b64encode(korean.encode("cp949")).decode()
    async with serve(settings()) as client:
        response = await client.post(CLASSIFY_PATH, json=note, headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 200


async def test_lone_surrogates_are_refused_on_every_path(serve, settings):
    surrogate_note = b'{"text": "CC: \\ud800 pain"}'
    in_context = json.dumps({**hook(None), "context": {"patientId": "123", "triageNoteText": "\ud800"}}).encode()
    utf16 = document(subject={"reference": "Patient/123"}, content_type="text/plain; charset=utf-16-le")
    utf16["content"][0]["attachment"]["data"] = base64.b64encode(b"\x00\xd8").decode()  # a lone high surrogate
    async with serve(settings()) as client:
        classify = await client.post("/classify", content=surrogate_note, headers={"Content-Type": "application/json"})
        cds = await client.post(CDS_PATH, content=in_context, headers={"Content-Type": "application/json"})
        fhir = await client.post(CLASSIFY_PATH, json=utf16, headers={"Content-Type": FHIR_JSON})
    assert classify.status_code == 422 and cds.status_code == 400 and fhir.status_code == 422


# 4. Authentication before the body is read.


async def test_without_a_token_a_malformed_body_is_401_not_a_parse_error(serve, settings):
    async with serve(settings(api_keys=[KEY])) as client:
        classify = await client.post("/classify", content=b"{not json", headers={"Content-Type": "application/json"})
        cds = await client.post(CDS_PATH, content=b"{not json", headers={"Content-Type": "application/json"})
        fhir = await client.post(CLASSIFY_PATH, content=b"{not json", headers={"Content-Type": FHIR_JSON})
        wrong_scheme = await client.post("/classify", json={"text": NOTE}, headers={"Authorization": f"Basic {KEY}"})
        authorized = await client.post("/classify", json={"text": NOTE}, headers=AUTH)
        discovery = await client.get("/cds-services")
    for refused in (classify, cds, fhir, wrong_scheme):
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert fhir.json()["issue"][0]["code"] == "login"
    assert authorized.status_code == 200 and discovery.status_code == 200


# 5. A note of invisible characters is blank.


@pytest.mark.parametrize("text", ["\u200b\u200b\u200d", "\ufeff \u2060\u00ad", "\x00\x1f", "\U000e0020\U000e0041"])
async def test_a_note_of_only_invisible_characters_is_blank_on_every_path(serve, settings, text):
    async with serve(settings()) as client:
        classify = await client.post("/classify", json={"text": text})
        cds = await client.post(CDS_PATH, json={**hook(None), "context": {"patientId": "1", "triageNoteText": text}})
        fhir = await client.post(
            CLASSIFY_PATH, json=document(text, {"reference": "Patient/1"}), headers={"Content-Type": FHIR_JSON}
        )
    assert classify.status_code == 422 and "blank" in classify.text
    assert cds.status_code == 400
    assert fhir.status_code == 422 and fhir.json()["issue"][0]["code"] == "required"


# 6. Content types and encodings.


async def test_a_body_that_is_not_declared_json_is_415(serve, settings):
    body = json.dumps({"text": NOTE}).encode()
    async with serve(settings()) as client:
        untyped = await client.post("/classify", content=body)
        plain = await client.post("/classify", content=body, headers={"Content-Type": "text/plain"})
        fhir = await client.post(CLASSIFY_PATH, content=body, headers={"Content-Type": "text/plain"})
    assert untyped.status_code == plain.status_code == fhir.status_code == 415
    assert fhir.json()["issue"][0]["code"] == "not-supported"


async def test_gzip_bodies_are_decompressed_within_the_size_limit_other_encodings_refused(serve, settings):
    body = json.dumps({"text": NOTE}).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    bomb = gzip.compress(b'{"text": "' + b"a" * 2_000_000 + b'"}')  # ~2 KB that inflates to 2 MB
    async with serve(settings()) as client:
        plain = await client.post("/classify", content=body, headers={"Content-Type": "application/json"})
        gzipped = await client.post("/classify", content=gzip.compress(body), headers=headers)
        mislabelled = await client.post("/classify", content=body, headers=headers)
        truncated = await client.post("/classify", content=gzip.compress(body)[:-8], headers=headers)
        inflated = await client.post("/classify", content=bomb, headers=headers)
        brotli = await client.post("/classify", content=body, headers={**headers, "Content-Encoding": "br"})
    assert gzipped.status_code == 200 and gzipped.json()["results"] == plain.json()["results"]
    assert mislabelled.status_code == truncated.status_code == 400
    assert len(bomb) < 10_000 and inflated.status_code == 413 and "decompressed" in inflated.text
    assert brotli.status_code == 415


# 7. Docs without a CDN; every variant's checksum checked at load.


async def test_the_docs_pages_load_their_scripts_from_the_service(serve, settings):
    async with serve(settings(), lifespan=False) as client:
        docs = await client.get("/docs")
        redoc = await client.get("/redoc")
        script = await client.get("/static-offline-docs/swagger-ui-bundle.js")
    assert docs.status_code == redoc.status_code == script.status_code == 200
    for page in (docs.text, redoc.text):
        assert "cdn" not in page and "http://" not in page and "https://" not in page
    assert len(script.content) > 100_000


def test_a_damaged_variant_is_refused_at_load_even_when_another_is_served(tiny_bundle_dir, tmp_path):
    bundle = shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    with (bundle / "model.fp16.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"model\.fp16\.onnx: sha256 .* does not match"):
        load_bundle(bundle, variant="int8", providers=["CPUExecutionProvider"])


# 3. Slow clients and huge heads, and statuses the server sends itself: the real server on a loopback port.


def raw_answer(address: tuple[str, int], request: bytes, wait_s: float = 5) -> tuple[bytes, float]:
    """The status line the server sends for `request`, and the seconds until the connection was closed."""
    started = time.monotonic()
    with socket.create_connection(address, timeout=wait_s) as connection:
        answer = b""
        try:
            connection.sendall(request)
            while chunk := connection.recv(65536):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the status line, if sent, was read before
    return answer.split(b"\r\n", 1)[0], time.monotonic() - started


@pytest.fixture
def server_settings(settings):
    return settings(header_timeout_s=1.0, body_timeout_s=1.0, max_header_bytes=8192, max_headers=50)


def test_slow_clients_are_cut_off_within_the_timeout_while_others_are_served_fast(running_server, server_settings):
    slow_count = 20
    with running_server(server_settings) as address:
        slow = []
        for number in range(slow_count):
            connection = socket.create_connection(address, timeout=10)
            if number % 2:  # a head that never ends (slowloris)
                connection.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:  # a body shorter than its Content-Length
                connection.sendall(
                    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100\r\n\r\n{"text": "'
                )
            slow.append((connection, time.monotonic()))
        latencies = []
        with httpx.Client(base_url=f"http://{address[0]}:{address[1]}") as client:
            client.post("/classify", json={"text": NOTE})  # connect and warm up
            ended = time.monotonic() + 2.0
            while time.monotonic() < ended:
                started = time.perf_counter()
                assert client.post("/classify", json={"text": NOTE}).status_code == 200
                latencies.append(time.perf_counter() - started)
        cut_off = []
        for connection, opened in slow:
            with connection:
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
                cut_off.append((answer.split(b"\r\n", 1)[0], time.monotonic() - opened))
    assert all(status == b"HTTP/1.1 408 Request Timeout" for status, _ in cut_off), cut_off
    # Closed within the 1 s timeout (plus the time the normal requests kept this thread from reading).
    assert max(seconds for _, seconds in cut_off) < 1.0 + 2.5
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert len(latencies) > 50 and p99 < 0.100, f"p99 {p99 * 1000:.1f} ms over {len(latencies)} requests"


def test_a_silent_connection_is_closed_after_the_head_timeout(running_server, server_settings):
    with running_server(server_settings) as address:
        status, seconds = raw_answer(address, b"")
    assert status == b"" and 0.8 < seconds < 3


def test_huge_heads_get_431_and_a_closed_connection(running_server, server_settings):
    with running_server(server_settings) as address:
        one_big = raw_answer(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
        many = raw_answer(
            address,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + b"\r\n",
        )
        fine = raw_answer(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert one_big[0] == many[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert fine[0] == b"HTTP/1.1 200 OK"


def test_a_body_arriving_in_the_same_read_as_a_long_head_is_not_taken_for_the_head(running_server, server_settings):
    body = json.dumps({"text": NOTE + " " * 15_000}).encode()  # larger than max_header_bytes
    request = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with running_server(server_settings) as address:
        status, _ = raw_answer(address, request)
    assert status == b"HTTP/1.1 200 OK"


def test_a_malformed_chunked_body_is_logged_with_the_400_the_server_sent(running_server, server_settings, caplog):
    caplog.set_level(logging.INFO, logger="app.access")
    request = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n{}\r\n0\r\n\r\n"
    )
    with running_server(server_settings) as address:
        status, _ = raw_answer(address, request)
    assert status == b"HTTP/1.1 400 Bad Request"
    [entry] = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "app.access"]
    assert entry["status"] == 400 and entry["route"] == "/classify"
