"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from app.text import NoteText

EXAMPLE_NOTE = "3세 남아 보호자 동반 내원. CC: seizure. BT 38.9, HR 150"
EXPLAIN = (
    "Also return each note's explanation: the words whose deletion moves P(emergency) most. Costs one model run "
    "per word; at most explain_max_words words over the request (413 beyond)."
)


class Note(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"id": "a1", "text": EXAMPLE_NOTE}]})

    id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Caller's id for the note, echoed back (default: its position, from 0).",
    )
    text: NoteText = Field(description="The triage note; must hold a visible character.")


class NotesRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"notes": [{"id": "a1", "text": EXAMPLE_NOTE}, {"id": "a2", "text": "CC: medication refill. BT 36.6"}]}
            ]
        },
    )

    notes: list[Note] = Field(
        min_length=1,
        description="Notes to classify; results come back in this order. "
        "Ids must be unique, counting a missing id as the position.",
    )
    explain: bool = Field(False, description=EXPLAIN)

    @model_validator(mode="after")
    def _unique_ids(self) -> NotesRequest:
        ids = result_ids(self.notes)
        if len(set(ids)) < len(ids):
            raise ValueError(
                "note ids must be unique within a request (a note without an id is known by its "
                'position: "0", "1", ...)'
            )
        return self


def result_ids(notes: list[Note]) -> list[str]:
    """Each note's id, or its position when it has none."""
    return [note.id if note.id is not None else str(position) for position, note in enumerate(notes)]


class SingleNoteRequest(Note):
    explain: bool = Field(False, description=EXPLAIN)


def _request_shape(body: Any) -> str:
    return "notes" if isinstance(body, dict) and "notes" in body else "single"


ClassifyRequest = Annotated[
    Annotated[NotesRequest, Tag("notes")] | Annotated[SingleNoteRequest, Tag("single")],
    Discriminator(_request_shape),
]
"""Either `{"notes": [...], "explain"?: ...}` or one note `{"text": ..., "id"?: ..., "explain"?: ...}`."""


def notes_of(request: NotesRequest | Note) -> list[Note]:
    return request.notes if isinstance(request, NotesRequest) else [request]


class ExplainedWord(BaseModel):
    word: str = Field(description="The word as written in the note: text[start:end].")
    start: int = Field(ge=0, description="Index of its first character in the note's text (Unicode code points).")
    end: int = Field(gt=0, description="Index just past its last character.")
    contribution: float = Field(
        ge=-1,
        le=1,
        description="P(emergency) of the note minus P(emergency) of the note with this word deleted: positive "
        "when the word pushed the note towards emergency.",
    )


class NoteResult(BaseModel):
    id: str = Field(description="The note's id, or its position in the request when it had none.")
    label: Literal["emergency", "non-emergency"]
    probability: float = Field(ge=0, le=1, description="Probability of emergency.")
    threshold: float = Field(ge=0, le=1, description="Probability at or above which the label is emergency.")
    truncated: bool = Field(
        description="Whether the note was longer than max_note_tokens and cut (keeping its head and tail, by default)."
    )
    explanation: list[ExplainedWord] | None = Field(
        None,
        description="Only with explain: true: the explain_top_k words whose deletion moves P(emergency) most, "
        "largest |contribution| first ([] for a note without words). How sensitive this model is to each word, "
        "not a clinical cause.",
    )


class ModelRef(BaseModel):
    name: str
    version: str


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {"name": "triage-dsgkd", "version": "1.0.0"},
                    "results": [
                        {"id": "a1", "label": "emergency", "probability": 0.93, "threshold": 0.41, "truncated": False}
                    ],
                }
            ]
        }
    )

    model: ModelRef
    results: list[NoteResult] = Field(description="One result per note, in request order.")


class ErrorResponse(BaseModel):
    detail: Any = Field(description="What was wrong: a message, or a list of validation errors.")


class ModelInfo(BaseModel):
    name: str
    version: str
    variant: str = Field(description="ONNX variant being served: fp32, int8 or fp16.")
    providers: list[str] = Field(description="ONNX Runtime execution providers in use.")
    intended_use: str
    threshold: float
    threshold_policy: str = Field(description="How the threshold was chosen.")
    max_note_tokens: int
    truncation: str = Field(description="What happens to a note over max_note_tokens: head-tail, head or refuse.")
    calibration: dict[str, Any] = Field(description="How P(emergency) is calibrated from the logits.")
    test_metrics: dict[str, Any] = Field(description="Test-set metrics with 95% bootstrap CIs.")
    manifest: dict[str, Any] = Field(description="The bundle's full manifest.")
