"""Triage notes out of FHIR R4 resources: a DocumentReference, a Communication, or a Bundle of them; and the
input of the `$classify` operation, which is one of those or a Parameters resource.

Resources are parsed and validated with `fhir.resources.R4B`: FHIR R4B changed none of the resources
used here (DocumentReference, Communication, Bundle, RiskAssessment, OperationOutcome) from R4, so
R4 clients and servers read and write them unchanged.

Every fault is a `FhirInputError` carrying an OperationOutcome issue code and a message that names
the element at fault, never its content: a note's text must not come back in an error.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar, cast

from fastapi import HTTPException
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.attachment import Attachment
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.parameters import Parameters, ParametersParameter
from fhir.resources.R4B.reference import Reference
from pydantic import ValidationError

from app.text import BLANK, text_problem

AcceptedResource = DocumentReference | Communication | Bundle
NOTE_RESOURCES: dict[str, type[DocumentReference] | type[Communication]] = {
    "DocumentReference": DocumentReference,
    "Communication": Communication,
}
ACCEPTED_RESOURCES: dict[str, type[AcceptedResource]] = {**NOTE_RESOURCES, "Bundle": Bundle}
# The body of $classify: a note resource as above, or a Parameters resource (the standard way to call an operation).
OperationBody = AcceptedResource | Parameters
OPERATION_BODIES: dict[str, type[OperationBody]] = {**ACCEPTED_RESOURCES, "Parameters": Parameters}
PARAMETER_NAMES = ("resource", "note", "subject", "encounter", "explain")
REFERENCE = r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9.-]{1,64}$"  # a relative literal reference, e.g. Patient/123
BUNDLE_TYPES = ("collection", "batch", "transaction", "searchset")
# Searchset entries that are not search results: resources included alongside them, and OperationOutcomes.
NOT_SEARCH_MATCHES = ("include", "outcome")
NOTE_MEDIA_TYPE = "text/plain"
DEFAULT_CHARSET = "utf-8"
# Text charsets a note may come in: Unicode, ASCII and Latin-1 family, and the Korean EMRs' EUC-KR / CP949.
TEXT_CHARSETS = ("utf-8", "utf-16", "utf-16le", "utf-16be", "us-ascii", "iso-8859-1", "windows-1252", "euc-kr", "cp949")
_ALLOWED_CODECS = frozenset(codecs.lookup(charset).name for charset in TEXT_CHARSETS)
_RESOURCE_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")


class FhirInputError(HTTPException):
    """A request the FHIR endpoints cannot classify; `issue_code` is the OperationOutcome issue type."""

    def __init__(self, status: HTTPStatus, issue_code: str, diagnostics: str) -> None:
        super().__init__(status, diagnostics)
        self.issue_code = issue_code


@dataclass(frozen=True)
class FhirNote:
    text: str
    source: Reference  # the resource the note came from, for RiskAssessment.basis
    subject: Reference | None
    encounter: Reference | None


@dataclass(frozen=True)
class ClassifyInput:
    """What a $classify request asks for: its notes in request order, the relative references (e.g. Patient/123)
    of the patient and encounter they must be about, if given, whether the answer is a Bundle, and whether each
    assessment is explained."""

    notes: list[FhirNote]
    subject: str | None
    encounter: str | None
    bundled: bool
    explain: bool


def parse_resource(body: bytes) -> OperationBody:
    """The request body of $classify as a validated DocumentReference, Communication, Bundle or Parameters."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as error:
        raise FhirInputError(
            HTTPStatus.BAD_REQUEST, "structure", f"body is not JSON (line {error.lineno}, column {error.colno})"
        ) from None
    return _validated(data, "body", OPERATION_BODIES)


def validate_resource(data: object, where: str) -> AcceptedResource:
    """`data` (a parsed JSON value found at `where`) as a validated DocumentReference, Communication or Bundle."""
    return _validated(data, where, ACCEPTED_RESOURCES)


_Accepted = TypeVar("_Accepted", bound=OperationBody)


def _validated(data: object, where: str, accepted: Mapping[str, type[_Accepted]]) -> _Accepted:
    resource_type = data.get("resourceType") if isinstance(data, dict) else None
    if not isinstance(resource_type, str):
        raise FhirInputError(HTTPStatus.BAD_REQUEST, "structure", f"{where} is not a FHIR resource (no resourceType)")
    if resource_type not in accepted:
        shown = repr(resource_type) if _RESOURCE_TYPE_NAME.fullmatch(resource_type) else "given"
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "not-supported",
            f"{where}: resourceType {shown} is not accepted; send one of {', '.join(accepted)}",
        )
    if _names_an_unknown_type(data):
        raise FhirInputError(
            HTTPStatus.BAD_REQUEST, "structure", f"{where}: a resource inside it has an unknown resourceType"
        )
    try:
        # mypy types model_validate of a type[_Accepted] as the bound, not as _Accepted.
        return cast(_Accepted, accepted[resource_type].model_validate(data))
    except ValidationError as error:
        # Location and message only: pydantic's `input` would be the note itself.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or resource_type}: {e['msg']}" for e in error.errors())
        raise FhirInputError(
            HTTPStatus.BAD_REQUEST, "structure", f"{where}: invalid {resource_type}: {problems}"
        ) from None


def _names_an_unknown_type(value: object) -> bool:
    """Whether a resource nested in `value` (a parsed JSON value) has a resourceType that names no FHIR type:
    fhir.resources raises KeyError or TypeError on one, not a ValidationError."""
    if isinstance(value, list):
        return any(_names_an_unknown_type(item) for item in value)
    if not isinstance(value, dict):
        return False
    resource_type = value.get("resourceType")
    if resource_type is not None and not (isinstance(resource_type, str) and _is_fhir_type(resource_type)):
        return True
    return any(_names_an_unknown_type(item) for item in value.values())


def _is_fhir_type(name: str) -> bool:
    try:
        get_fhir_model_class(name)
    except ValueError:
        return False
    return True


def classify_input(
    body: OperationBody, subject: str | None, encounter: str | None, explain: bool | None
) -> ClassifyInput:
    """The notes of a $classify body, the patient and encounter they must be about, and whether to explain:
    `subject`, `encounter` and `explain` are the URL's query parameters, or the Parameters' parameters of those
    names (not both).

    A Parameters body holds `resource` parameters (a DocumentReference, Communication or Bundle) and `note`
    parameters (plain text in valueString, about `subject`), read in order. The answer is a Bundle when a
    Bundle was sent or there is more than one note."""
    if not isinstance(body, Parameters):
        return ClassifyInput(notes_in(body), subject, encounter, isinstance(body, Bundle), bool(explain))
    given = body.parameter or []
    unknown = [position for position, parameter in enumerate(given) if parameter.name not in PARAMETER_NAMES]
    if unknown:
        raise FhirInputError(
            HTTPStatus.BAD_REQUEST,
            "not-supported",
            f"Parameters.parameter at positions {unknown}: not a parameter of $classify (those are "
            f"{', '.join(PARAMETER_NAMES)})",
        )
    subject = _reference_parameter(given, "subject", subject)
    encounter = _reference_parameter(given, "encounter", encounter)
    explain = _explain_parameter(given, explain)
    notes: list[FhirNote] = []
    for position, parameter in enumerate(given):
        where = f"Parameters.parameter[{position}]"
        if parameter.name == "resource":
            if not isinstance(parameter.resource, DocumentReference | Communication | Bundle):
                raise FhirInputError(
                    HTTPStatus.UNPROCESSABLE_ENTITY,
                    "not-supported",
                    f"{where}: a resource parameter must hold a DocumentReference, a Communication or a Bundle of them",
                )
            notes += notes_in(parameter.resource, f"{where}.resource")
        elif parameter.name == "note":
            notes.append(_text_note(parameter.valueString, where, subject, encounter))
    bundled = len(notes) > 1 or any(isinstance(parameter.resource, Bundle) for parameter in given)
    return ClassifyInput(notes, subject, encounter, bundled, explain)


def _position_of(given: list[ParametersParameter], name: str, in_url: bool) -> int | None:
    """The position of the parameter `name`, if given: at most once, and not also in the URL."""
    found = [position for position, parameter in enumerate(given) if parameter.name == name]
    if len(found) > 1 or (found and in_url):
        raise FhirInputError(
            HTTPStatus.BAD_REQUEST, "invalid", f"{name} is given more than once (as a parameter or in the URL)"
        )
    return found[0] if found else None


def _reference_parameter(given: list[ParametersParameter], name: str, in_url: str | None) -> str | None:
    """The relative reference (e.g. Patient/123) in the valueReference of the parameter `name`, else `in_url`."""
    position = _position_of(given, name, in_url is not None)
    if position is None:
        return in_url
    value = given[position].valueReference
    if value is None or value.reference is None or not re.fullmatch(REFERENCE, value.reference):
        raise FhirInputError(
            HTTPStatus.BAD_REQUEST,
            "invalid",
            f"Parameters.parameter[{position}] ({name}): needs a valueReference whose reference is relative, "
            f"e.g. Patient/123",
        )
    return value.reference


def _explain_parameter(given: list[ParametersParameter], in_url: bool | None) -> bool:
    """The valueBoolean of the parameter `explain`, else `in_url`; false when neither is given."""
    position = _position_of(given, "explain", in_url is not None)
    if position is None:
        return bool(in_url)
    value = given[position].valueBoolean
    if value is None:
        raise FhirInputError(
            HTTPStatus.BAD_REQUEST, "invalid", f"Parameters.parameter[{position}] (explain): needs a valueBoolean"
        )
    return value


def _text_note(text: str | None, where: str, subject: str | None, encounter: str | None) -> FhirNote:
    if text is None:
        raise FhirInputError(HTTPStatus.BAD_REQUEST, "invalid", f"{where}: a note parameter needs a valueString")
    if subject is None:
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "required",
            f"{where}: a note given as text needs the subject parameter (RiskAssessment.subject is required)",
        )
    return FhirNote(
        _checked(text, where),
        Reference(display=f"{where} of the request (note text)"),
        Reference(reference=subject),
        Reference(reference=encounter) if encounter is not None else None,
    )


def notes_in(resource: AcceptedResource, where: str | None = None) -> list[FhirNote]:
    """The notes of a DocumentReference or Communication (one), or of a Bundle of them (in entry order; none
    when it has no entries, or only a searchset's included resources). `where`: the resource's place in the
    request, for error messages (default: its type)."""
    where = where or resource.get_resource_type()
    if not isinstance(resource, Bundle):
        return [_note_of(resource, where, full_url=None)]
    if resource.type not in BUNDLE_TYPES:
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY, "not-supported", f"Bundle.type must be one of {', '.join(BUNDLE_TYPES)}"
        )
    notes = []
    for position, entry in enumerate(resource.entry or []):
        if entry.search is not None and entry.search.mode in NOT_SEARCH_MATCHES:
            continue
        entry_where = f"{where}.entry[{position}].resource"
        if not isinstance(entry.resource, DocumentReference | Communication):
            raise FhirInputError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "not-supported",
                f"{entry_where}: a Bundle entry must be a DocumentReference or a Communication",
            )
        notes.append(_note_of(entry.resource, entry_where, entry.fullUrl))
    return notes


def _note_of(resource: DocumentReference | Communication, where: str, full_url: str | None) -> FhirNote:
    if isinstance(resource, DocumentReference):
        text = _document_text(resource, where)
        encounters = resource.context.encounter if resource.context is not None else None
        encounter = encounters[0] if encounters else None
    else:
        text = _communication_text(resource, where)
        encounter = resource.encounter
    return FhirNote(_checked(text, where), _reference_to(resource, where, full_url), resource.subject, encounter)


def _checked(text: str, where: str) -> str:
    """`text`, refused (422) when it is blank or holds a lone surrogate."""
    problem = text_problem(text)
    if problem is not None:
        issue_code = "required" if problem == BLANK else "invalid"
        raise FhirInputError(HTTPStatus.UNPROCESSABLE_ENTITY, issue_code, f"{where}: the note text {problem}")
    return text


def _document_text(document: DocumentReference, where: str) -> str:
    """The note in the first `text/plain` attachment: DocumentReference.content entries are renditions of
    one document, so a PDF beside the plain text is simply not used."""
    attachments = [content.attachment for content in document.content or []]
    if not attachments:
        raise FhirInputError(HTTPStatus.UNPROCESSABLE_ENTITY, "required", f"{where}: has no content[].attachment")
    for position, attachment in enumerate(attachments):
        if _media_type(attachment)[0] == NOTE_MEDIA_TYPE:
            return attachment_text(attachment, f"{where}.content[{position}].attachment")
    raise FhirInputError(
        HTTPStatus.UNPROCESSABLE_ENTITY,
        "not-supported",
        f"{where}: no content[].attachment has contentType {NOTE_MEDIA_TYPE} (found: "
        f"{', '.join(_media_type(attachment)[0] or 'none' for attachment in attachments)})",
    )


def _communication_text(communication: Communication, where: str) -> str:
    """The text parts of the message (contentString, text/plain contentAttachment), joined by blank lines;
    other parts (images, references) are not used."""
    parts = []
    for position, payload in enumerate(communication.payload or []):
        if payload.contentString is not None:
            parts.append(payload.contentString)
        elif payload.contentAttachment is not None and _media_type(payload.contentAttachment)[0] == NOTE_MEDIA_TYPE:
            parts.append(attachment_text(payload.contentAttachment, f"{where}.payload[{position}].contentAttachment"))
    if not parts:
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "required",
            f"{where}: no payload holds contentString or a {NOTE_MEDIA_TYPE} contentAttachment",
        )
    return "\n\n".join(parts)


def attachment_text(attachment: Attachment, where: str) -> str:
    """A text/plain attachment's inline `data` (base64, already decoded by fhir.resources) in its charset."""
    if attachment.data is None:
        # Fetching `url` would let a caller make this service request any address; notes must come inline.
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "not-supported",
            f"{where}: has no inline data (attachment.url is not fetched); send the note "
            f"base64-encoded in attachment.data",
        )
    codec = text_codec(_media_type(attachment)[1])
    if codec is None:
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "not-supported",
            f"{where}: the charset in contentType is not one of {', '.join(TEXT_CHARSETS)}",
        )
    try:
        return attachment.data.decode(codec)
    except UnicodeDecodeError as error:
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY, "invalid", f"{where}: data is not valid {codec} (byte {error.start})"
        ) from None


def text_codec(charset: str) -> str | None:
    """Python's codec for an allowed text charset (by any of its names), or None: a charset off the list
    (`undefined` raises on every byte, `utf-7` and `unicode_escape` decode to lone surrogates and escapes)."""
    try:
        codec = codecs.lookup(charset).name
    except (LookupError, ValueError):  # ValueError: a name with a NUL character
        return None
    return codec if codec in _ALLOWED_CODECS else None


def _media_type(attachment: Attachment) -> tuple[str | None, str]:
    """(media type in lower case, or None when contentType is missing; charset, default UTF-8).

    Parsed by hand: `email.message.Message` would read a malformed type as text/plain, as RFC 2045 says
    mail readers should.
    """
    if not attachment.contentType:
        return None, DEFAULT_CHARSET
    media_type, *parameters = attachment.contentType.split(";")
    charset = DEFAULT_CHARSET
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"')
    return media_type.strip().lower(), charset


def _reference_to(resource: DocumentReference | Communication, where: str, full_url: str | None) -> Reference:
    """A reference to the note's resource: by id, else by Bundle fullUrl, else by its first identifier."""
    resource_type = resource.get_resource_type()
    if resource.id:
        return Reference(reference=f"{resource_type}/{resource.id}")
    if full_url:
        return Reference(reference=full_url, type=resource_type)
    if resource.identifier:
        return Reference(type=resource_type, identifier=resource.identifier[0])
    return Reference(type=resource_type, display=f"{where} of the request (no id or identifier)")


_VERSION_SUFFIX = re.compile(r"/_history/[A-Za-z0-9.-]{1,64}$")


def refers_to(reference: Reference | None, target: str, fhir_server: str | None = None) -> bool:
    """Whether `reference` provably points at `target` (e.g. `Patient/123`): as the relative reference, maybe
    versioned (`Patient/123/_history/2`), or as the absolute one on `fhir_server`. A reference by identifier or
    display only, or to another server, proves nothing."""
    if reference is None or reference.reference is None:
        return False
    if reference.type is not None and reference.type != target.split("/", 1)[0]:
        return False
    literal = reference.reference
    if fhir_server is not None and literal.startswith(base := fhir_server.rstrip("/") + "/"):
        literal = literal.removeprefix(base)
    return _VERSION_SUFFIX.sub("", literal) == target
