"""Property-based fuzzing of the FHIR and CDS Hooks parsers, and of the HTTP endpoints behind them.

Hypothesis builds nested JSON, FHIR-shaped resources with random subjects, charsets and base64 payloads, and
CDS Hooks requests; every generated note is SYNTHETIC. The properties: a parser returns or raises its own
4xx error, never anything else; a prefetched note is scored only about the context patient; the endpoints
never answer 5xx.
"""

import base64
import contextlib
import json
import re
from functools import partial

import anyio.from_thread
import httpx
import pytest
from fastapi import HTTPException
from fhir.resources.R4B.reference import Reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.cds_hooks import PREFETCH_KEY, SERVICE_ID, CdsRequest, notes_of
from app.fhir import CLASSIFY_PATH, FHIR_JSON
from app.fhir_notes import FhirInputError, notes_in, parse_resource, refers_to
from app.main import create_app
from app.middleware import MAX_JSON_DEPTH, json_shape_problem
from app.settings import Settings

EXAMPLES = 200
PATIENT = "123"
FHIR_SERVER = "https://ehr.example.org/fhir"

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
ids = st.sampled_from([PATIENT, "1234", "999", "12", ""]) | st.text(max_size=6)
references = st.one_of(
    st.builds(lambda i: f"Patient/{i}", ids),
    st.builds(lambda i: f"{FHIR_SERVER}/Patient/{i}", ids),
    st.builds(lambda i: f"https://other.example.org/fhir/Patient/{i}", ids),
    st.builds(lambda i, v: f"Patient/{i}/_history/{v}", ids, st.text(max_size=3)),
    st.builds(lambda t, i: f"{t}/{i}", st.sampled_from(["Group", "Practitioner", "patient"]), ids),
    st.text(max_size=30),
)
subjects = st.one_of(
    st.none(),
    st.fixed_dictionaries({"reference": references}, optional={"type": st.sampled_from(["Patient", "Group"])}),
    st.fixed_dictionaries({"identifier": st.fixed_dictionaries({"value": ids})}),
    st.fixed_dictionaries({"display": st.text(max_size=10)}),
    json_values,
)
charsets = st.sampled_from(
    ["utf-8", "UTF-16", "utf-16le", "euc-kr", "cp949", "latin1", "utf-7", "undefined", "unicode_escape", "x\x00", ""]
)
note_texts = st.text(max_size=60) | st.sampled_from(["\u200b\u200d", "CC: chest pain", "3세 남아 CC: seizure"])


@st.composite
def attachments(draw: st.DrawFn) -> dict:
    text = draw(note_texts)
    charset = draw(charsets)
    try:
        data = text.encode(charset)
    except (LookupError, UnicodeError, ValueError):
        data = text.encode("utf-8", "surrogatepass")
    attachment = {
        "contentType": draw(st.sampled_from(["text/plain", "text/html", "", "TEXT/PLAIN "])) + f"; charset={charset}",
        "data": base64.b64encode(data).decode(),
    }
    return draw(st.sampled_from([attachment, {**attachment, "data": draw(st.text(max_size=12))}, {"url": "x"}]))


@st.composite
def documents(draw: st.DrawFn) -> dict:
    resource = {
        "resourceType": "DocumentReference",
        "status": draw(st.sampled_from(["current", "superseded", "bogus"])),
        "content": [{"attachment": draw(attachments())}],
    }
    if (subject := draw(subjects)) is not None:
        resource["subject"] = subject
    if draw(st.booleans()):
        resource["extra"] = draw(json_values)  # unknown element
    return resource


@st.composite
def resources(draw: st.DrawFn) -> object:
    single = documents()
    bundle = st.builds(
        lambda kind, entries: {"resourceType": "Bundle", "type": kind, "entry": [{"resource": e} for e in entries]},
        st.sampled_from(["collection", "searchset", "document"]),
        st.lists(single, max_size=3),
    )
    return draw(st.one_of(single, bundle, json_values))


def cds_request(prefetched: object, patient: str = PATIENT) -> dict:
    return {
        "hook": "patient-view",
        "hookInstance": "h-1",
        "fhirServer": FHIR_SERVER,
        "context": {"patientId": patient},
        "prefetch": {PREFETCH_KEY: prefetched},
    }


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode()))
def test_json_shape_check_never_fails_and_what_it_lets_through_parses(body):
    if json_shape_problem(body) is None:
        # Malformed JSON (ValueError) is answered 400/422; what must not happen is a RecursionError, or an
        # integer conversion past Python's limit (also a ValueError, but only with more than 4,300 digits).
        with contextlib.suppress(ValueError):
            json.loads(body)


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(st.integers(MAX_JSON_DEPTH + 1, 20_000), st.sampled_from(["[", '{"a":']))
def test_json_nested_past_the_limit_is_always_caught(depth, opener):
    closer = "]" if opener == "[" else "}"
    assert json_shape_problem((opener * depth + "1" + closer * depth).encode()) is not None


@settings(max_examples=EXAMPLES, deadline=None)
@given(resources())
def test_the_fhir_parser_returns_notes_or_a_4xx_error(resource):
    try:
        notes = notes_in(parse_resource(json.dumps(resource).encode()))
    except FhirInputError as error:
        assert 400 <= error.status_code < 500 and error.issue_code
        return
    for note in notes:
        assert note.text.strip()


@settings(max_examples=EXAMPLES, deadline=None)
@given(resources(), ids)
def test_the_cds_parser_scores_only_notes_provably_about_the_context_patient(resource, patient):
    try:
        body = CdsRequest.model_validate(cds_request(resource, patient))
        notes = notes_of(body, {})
    except (ValidationError, HTTPException):  # FhirInputError is an HTTPException
        return
    for note in notes:
        assert refers_to(note.subject, f"Patient/{patient}", FHIR_SERVER)
        reference = note.subject.reference.removeprefix(f"{FHIR_SERVER}/")
        assert reference.split("/_history/")[0] == f"Patient/{patient}"


@settings(max_examples=EXAMPLES, deadline=None)
@given(references, st.sampled_from([None, "Patient", "Group"]))
def test_refers_to_accepts_only_the_patient_itself(reference, kind):
    try:
        parsed = Reference(reference=reference, type=kind)
    except ValidationError:
        return  # not a FHIR string (e.g. empty): no resource would hold it
    accepted = refers_to(parsed, f"Patient/{PATIENT}", FHIR_SERVER)
    relative = reference.removeprefix(f"{FHIR_SERVER}/")
    versioned = re.fullmatch(rf"Patient/{PATIENT}(/_history/[A-Za-z0-9.-]{{1,64}})?", relative)
    assert accepted == (kind in (None, "Patient") and versioned is not None)


@pytest.fixture(scope="module")
def post(tiny_bundle_dir):
    """`post(path, **options)`: a request to the real app (lifespan run once), from synchronous Hypothesis tests."""
    app = create_app(Settings(bundle=tiny_bundle_dir))
    lifespan = app.router.lifespan_context(app)
    with anyio.from_thread.start_blocking_portal() as portal:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        portal.call(lifespan.__aenter__)
        try:
            yield lambda path, **options: portal.call(partial(client.post, path, **options))
        finally:
            portal.call(lifespan.__aexit__, None, None, None)
            portal.call(client.aclose)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(resources(), st.sampled_from(["", "?subject=Patient/123", "?encounter=x", "?subject=Patient/9"]))
def test_the_fhir_endpoint_never_answers_5xx(post, resource, query):
    response = post(CLASSIFY_PATH + query, json=resource, headers={"Content-Type": FHIR_JSON})
    assert response.status_code < 500 and response.headers["content-type"] == FHIR_JSON


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(resources() | st.none(), ids, st.dictionaries(st.sampled_from(["triageNoteText", "encounterId"]), note_texts))
def test_the_cds_endpoint_never_answers_5xx(post, resource, patient, context):
    request = cds_request(resource, patient)
    request["context"].update(context)
    response = post(f"/cds-services/{SERVICE_ID}", json=request)
    assert response.status_code < 500
    if response.status_code == 200:
        assert isinstance(response.json()["cards"], list)
