"""Batch scoring (`python -m app score`): a file of notes in, a Parquet file of scores out, in bounded memory.

The notes are read in chunks (app/note_files.py); each chunk is tokenized and cut as the service does
(`NoteClassifier.encode`), run in the batches the service's batcher would make of it (`plan_batches` within
max_batch_size notes and max_batch_tokens padded tokens, through `NoteClassifier.predict_encoded`), calibrated, and
labelled at the bundle's threshold. Locally the chunks run one after another in this process; with `--ray`
(app/ray_scoring.py) the same `ChunkScorer` runs them in actors on a Ray cluster. A chunk's notes share model
runs, so a chunk is always scored whole: its probabilities are then the same wherever it runs.

A row whose note cannot be scored is kept, with P(emergency), label and truncated null and a `status` saying why
(STATUSES); no row is ever dropped. Nothing here logs note text or ids.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from app.bundle import load_bundle
from app.inference import NoteClassifier, Truncation
from app.note_files import ID, ROW, TEXT, NotesFile
from app.settings import Settings
from app.text import BLANK, NOT_UNICODE, text_problem

DEFAULT_CHUNK_ROWS = 1024
SCORED = "ok"
STATUSES = {
    SCORED: "scored",
    "missing": "no text (null, or no text field on the JSON line)",
    "blank": "the text is blank (only whitespace, control or format characters)",
    "not_unicode": "the text holds a lone surrogate code point",
    "too_long": "the text has more than max_note_chars characters (the service answers 413)",
    "too_many_tokens": "the note has more than max_note_tokens tokens and truncation is refuse",
}
_PROBLEM_STATUS = {BLANK: "blank", NOT_UNICODE: "not_unicode"}
PROBABILITY, LABEL, TRUNCATED, STATUS = "p_emergency", "label", "truncated", "status"


def output_schema(id_column: str | None, id_type: pa.DataType | None, include_text: bool) -> pa.Schema:
    """The scores file's columns: the row id (the user's id column, else ROW), P(emergency), label, truncated, status
    and, if asked, the note text (TEXT)."""
    fields = [pa.field(ROW, pa.int64()) if id_column is None else pa.field(id_column, id_type or pa.string())]
    fields += [
        pa.field(PROBABILITY, pa.float32()),
        pa.field(LABEL, pa.string()),
        pa.field(TRUNCATED, pa.bool_()),
        pa.field(STATUS, pa.string()),
    ]
    if include_text:
        fields.append(pa.field(TEXT, pa.string()))
    names = [f.name for f in fields]
    if len(set(names)) < len(names):
        raise ValueError(f"the id column {id_column!r} has the name of an output column ({', '.join(names[1:])})")
    return pa.schema(fields)


class ChunkScorer:
    """The bundle's classifier and decision threshold, loaded as the service loads them, scoring chunks of notes."""

    def __init__(self, settings: Settings, notes: NotesFile, include_text: bool) -> None:
        bundle = load_bundle(settings.bundle, settings.variant, settings.intra_op_threads, device_id=settings.device_id)
        cut: Truncation = "head" if settings.truncation == "head" else "head-tail"  # refuse: see `score`
        self.classifier = NoteClassifier.from_bundle(bundle, settings.max_note_tokens, cut)
        self.decision = bundle.manifest.decision
        self.settings = settings
        self.schema = output_schema(notes.id_column, notes.id_type, include_text)
        self._row_id = ROW if notes.id_column is None else ID
        self._include_text = include_text

    def score(self, chunk: pa.RecordBatch) -> pa.RecordBatch:
        """The scores of a chunk from `NotesFile.chunks`, row for row, in `schema`."""
        texts: list[str | None] = chunk.column(TEXT).to_pylist()
        statuses = [self._status(text) for text in texts]
        candidates = [(p, text) for p, text in enumerate(texts) if text is not None and statuses[p] == SCORED]
        encoded = self.classifier.encode([text for _, text in candidates])
        scored = []
        for (position, _), note in zip(candidates, encoded, strict=True):
            if note.truncated and self.settings.truncation == "refuse":
                statuses[position] = "too_many_tokens"
            else:
                scored.append((position, note))
        probabilities = self.classifier.predict_encoded(
            [note for _, note in scored], self.settings.max_batch_size, self.settings.max_batch_tokens
        )

        size = chunk.num_rows
        probability = np.zeros(size, dtype=np.float32)
        truncated = np.zeros(size, dtype=bool)
        labels: list[str | None] = [None] * size
        for (position, note), p in zip(scored, probabilities, strict=True):
            probability[position], truncated[position] = p, note.truncated
            labels[position] = self.decision.label(float(p))
        not_scored = np.array([status != SCORED for status in statuses], dtype=bool)
        columns = [
            chunk.column(self._row_id),
            pa.array(probability, mask=not_scored),
            pa.array(labels, pa.string()),
            pa.array(truncated, mask=not_scored),
            pa.array(statuses, pa.string()),
        ]
        if self._include_text:
            columns.append(chunk.column(TEXT))
        return pa.record_batch(columns, schema=self.schema)

    def _status(self, text: str | None) -> str:
        if text is None:
            return "missing"
        problem = text_problem(text)
        if problem is not None:
            return _PROBLEM_STATUS[problem]
        if len(text) > self.settings.max_note_chars:
            return "too_long"
        return SCORED


@dataclass
class ScoringSummary:
    rows: int = 0
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        counts = ", ".join(f"{status} {count:,}" for status, count in sorted(self.statuses.items()))
        return f"{self.rows:,} rows in {self.seconds:.1f} s ({rate:,.0f} notes/s): {counts or 'no rows'}"


class ScoresWriter:
    """Writes score batches to a Parquet file as they come (a row group per chunk), with a progress bar.

    The file is written as OUTPUT.partial and renamed to OUTPUT only once complete, so an OUTPUT is never a
    half-written file; on an error the partial file is deleted. It is created readable by its owner only (0600):
    it holds row ids and perhaps notes.
    """

    def __init__(self, output: Path, schema: pa.Schema, total_rows: int | None = None) -> None:
        self.output = output
        self.partial = output.with_name(output.name + ".partial")
        self.schema = schema
        self.summary = ScoringSummary()
        self._total_rows = total_rows

    def __enter__(self) -> ScoresWriter:
        self.partial.unlink(missing_ok=True)
        self._file = os.fdopen(os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        self._writer = pq.ParquetWriter(self._file, self.schema)
        self._progress = tqdm(total=self._total_rows, unit="notes", disable=None, smoothing=0.1)
        self._started = time.perf_counter()
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.summary.rows += batch.num_rows
        for entry in pc.value_counts(batch.column(STATUS)).to_pylist():
            self.summary.statuses[entry["values"]] += entry["counts"]
        self._progress.update(batch.num_rows)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._progress.close()
        self._writer.close()
        self._file.close()
        self.summary.seconds = time.perf_counter() - self._started
        if exc_type is None:
            self.partial.replace(self.output)
        else:
            self.partial.unlink(missing_ok=True)


def write_scores(batches: Iterable[pa.RecordBatch], writer: ScoresWriter) -> ScoringSummary:
    with writer:
        for batch in batches:
            writer.write(batch)
    return writer.summary


def score_file(
    notes: NotesFile, output: Path, settings: Settings, include_text: bool, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> ScoringSummary:
    """Score every note of `notes` in this process and write the scores to `output`."""
    scorer = ChunkScorer(settings, notes, include_text)
    scores = (scorer.score(chunk) for chunk in notes.chunks(chunk_rows))
    return write_scores(scores, ScoresWriter(output, scorer.schema, notes.rows))
