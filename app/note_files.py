"""Read a file of notes (CSV / TSV / JSONL / Parquet) as Arrow record batches of a bounded number of rows, for batch
scoring: memory holds one chunk of notes and one parse block at a time, whatever the size of the file.

Each chunk has the columns ROW (the 0-based row number in the file), ID (the user's id column, when named) and
TEXT (the notes, as Arrow strings; null where a JSON line has no text). Every data row of the file is in exactly
one chunk, in file order: a row that cannot be parsed stops the read with a `NotesFileError`, never a skip.

Text files are read as training/data/readers.py reads them: every CSV cell a string, UTF-8 unless `encoding`
says otherwise, Korean CP949 / EUC-KR detected (app/text_files.py; from the file's first MiB), the delimiter of a
.csv sniffed. Errors name the file and never quote a note.
"""

from __future__ import annotations

import codecs
import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from app.text_files import decode_korean, not_utf8_message, sniff_delimiter

ROW, ID, TEXT = "row", "id", "text"
FORMATS: dict[str, Literal["csv", "jsonl", "parquet"]] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Bytes of a text file parsed at a time: a note (a CSV field, a JSON line) must fit in one.
BLOCK_BYTES = 8 << 20
SAMPLE_BYTES = 1 << 20  # read to detect a text file's encoding and delimiter
TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.null())

log = logging.getLogger(__name__)


class NotesFileError(ValueError):
    """A notes file that cannot be read as asked; the message names the file and never quotes a note."""


@dataclass(frozen=True)
class NotesFile:
    """A notes file checked for its columns and, if text, its encoding and delimiter: open it with `NotesFile.open`."""

    path: Path
    format: Literal["csv", "jsonl", "parquet"]
    text_column: str
    id_column: str | None
    id_type: pa.DataType | None  # what ID holds: a CSV cell is a string; JSON's is inferred from the first block
    encoding: str  # of a text file (a Python codec name)
    delimiter: str  # of a CSV file
    rows: int | None  # data rows, where the file says (Parquet)

    @classmethod
    def open(
        cls,
        path: str | Path,
        text_column: str,
        id_column: str | None = None,
        encoding: str | None = None,
        delimiter: str | None = None,
    ) -> NotesFile:
        path = Path(path).resolve()
        if not path.is_file():
            raise NotesFileError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            raise NotesFileError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl or .parquet)")
        if id_column == text_column:
            raise NotesFileError(f"the id column and the text column are both {text_column!r}")
        file_format = FORMATS[suffix]
        if file_format == "parquet":
            schema = _parquet_schema(path)
            rows: int | None = pq.ParquetFile(path).metadata.num_rows
            encoding, delimiter = "utf-8", ","
        else:
            sample = _sample(path)
            encoding = _text_encoding(path, sample, encoding)
            if file_format == "csv":
                delimiter = delimiter or ("\t" if suffix == ".tsv" else _delimiter(path, sample, encoding))
            else:
                delimiter = ","
            schema = _first_block_schema(path, file_format, encoding, delimiter)
            rows = None
        found = schema.names
        for role, name in (("text", text_column), ("id", id_column)):
            if name is not None and name not in found:
                raise NotesFileError(f"{path}: no {role} column {name!r}; columns found: {', '.join(found)}")
        text_type = schema.field(text_column).type
        if not any(text_type.equals(t) for t in TEXT_TYPES) and not _is_dictionary_of_text(text_type):
            raise NotesFileError(f"{path}: column {text_column!r} holds {text_type} values, not text")
        id_type = None if id_column is None else schema.field(id_column).type
        if id_type is not None and file_format == "csv":
            id_type = pa.string()
        if id_type is not None and pa.types.is_null(id_type):
            id_type = pa.string()  # JSON: no id in the first block; later ids must be strings
        return cls(path, file_format, text_column, id_column, id_type, encoding, delimiter, rows)

    def chunks(self, rows_per_chunk: int) -> Iterator[pa.RecordBatch]:
        """The file's rows in order, as record batches of `rows_per_chunk` rows (the last one fewer)."""
        if rows_per_chunk < 1:
            raise ValueError("rows_per_chunk must be at least 1")
        first_row = 0
        for chunk in _rechunk(self._batches(rows_per_chunk), rows_per_chunk):
            row = pa.array(np.arange(first_row, first_row + chunk.num_rows, dtype=np.int64))
            columns = [row]
            names = [ROW]
            if self.id_column is not None:
                columns.append(chunk.column(self.id_column))
                names.append(ID)
            columns.append(chunk.column(self.text_column).cast(pa.string()))
            names.append(TEXT)
            first_row += chunk.num_rows
            yield pa.record_batch(columns, names=names)

    def _columns(self) -> list[str]:
        return [self.text_column] if self.id_column is None else [self.id_column, self.text_column]

    def _batches(self, rows_per_chunk: int) -> Iterator[pa.RecordBatch]:
        try:
            if self.format == "parquet":
                yield from pq.ParquetFile(self.path).iter_batches(batch_size=rows_per_chunk, columns=self._columns())
            elif self.format == "csv":
                yield from self._csv_batches()
            else:
                yield from self._jsonl_batches()
        except pa.ArrowInvalid as error:
            raise NotesFileError(f"{self.path}: {error}{self._encoding_hint(error)}") from None

    def _csv_batches(self) -> Iterator[pa.RecordBatch]:
        ragged = _RaggedRows()
        columns = self._columns()
        reader = pacsv.open_csv(
            self.path,
            # One parsing thread: pyarrow knows a ragged row's line number only then (else None); reading is not
            # what limits scoring (hundreds of thousands of notes a second against tens).
            read_options=pacsv.ReadOptions(encoding=self.encoding, block_size=BLOCK_BYTES, use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=self.delimiter, newlines_in_values=True, invalid_row_handler=ragged
            ),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types=dict.fromkeys(columns, pa.string()), strings_can_be_null=False
            ),
        )
        with reader:
            for batch in reader:
                if ragged.found is not None:
                    raise NotesFileError(f"{self.path}: {ragged.found}")
                yield batch

    def _jsonl_batches(self) -> Iterator[pa.RecordBatch]:
        fields = [pa.field(self.text_column, pa.string())]
        if self.id_column is not None and self.id_type is not None:
            fields.insert(0, pa.field(self.id_column, self.id_type))
        reader = pajson.open_json(
            _utf8_stream(self.path, self.encoding),
            read_options=pajson.ReadOptions(block_size=BLOCK_BYTES),
            parse_options=pajson.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore"),
        )
        with reader:
            yield from reader

    def _encoding_hint(self, error: pa.ArrowInvalid) -> str:
        if "UTF8" in str(error) or "utf-8" in str(error).lower():
            return f" (read as {self.encoding}, detected from its first MiB: pass --encoding if it is another)"
        return ""


class _RaggedRows:
    """pyarrow's invalid-row handler: pyarrow's own error quotes the row (a note), so the row is noted here, without
    its text, and skipped; the reader then stops with a `NotesFileError` before the chunk that lost it is used."""

    def __init__(self) -> None:
        self.found: str | None = None

    def __call__(self, row: pacsv.InvalidRow) -> str:
        if self.found is None:
            where = f" at line {row.number}" if row.number is not None else ""
            self.found = (
                f"a row{where} has {row.actual_columns} fields where the header has {row.expected_columns}; "
                "a field holding the delimiter, a quote or a line break must be quoted"
            )
        return "skip"


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """`batches` cut and joined into batches of exactly `rows` rows, the last one fewer."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield _one_batch(table.slice(0, rows))
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield _one_batch(pa.Table.from_batches(pending))


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    assert len(batches) == 1
    return batches[0]


def _sample(path: Path) -> bytes:
    """The file's first SAMPLE_BYTES, cut after its last line break when there is more (no split character)."""
    with path.open("rb") as f:
        sample = f.read(SAMPLE_BYTES + 1)
    if not sample.strip():
        raise NotesFileError(f"{path}: the file is empty")
    if len(sample) > SAMPLE_BYTES:
        sample = sample[: sample.rfind(b"\n", 0, SAMPLE_BYTES) + 1] or sample[:SAMPLE_BYTES]
    return sample


def _text_encoding(path: Path, sample: bytes, given: str | None) -> str:
    if given is not None:
        try:
            return codecs.lookup(given).name
        except LookupError:
            raise NotesFileError(f"unknown encoding {given!r}") from None
    try:
        sample.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as error:
        if decode_korean(sample) is not None:
            log.info("notes file not UTF-8; read as CP949 (Korean, detected)")
            return "cp949"
        raise NotesFileError(not_utf8_message(path, sample, error)) from None


def _delimiter(path: Path, sample: bytes, encoding: str) -> str:
    try:
        return sniff_delimiter(sample.decode(encoding, errors="replace"))
    except csv.Error:
        raise NotesFileError(f"{path}: could not detect the delimiter; pass it explicitly (--delimiter)") from None


def _utf8_stream(path: Path, encoding: str) -> pa.NativeFile:
    stream = pa.input_stream(path)
    return stream if encoding == "utf-8" else pa.transcoding_input_stream(stream, encoding, "utf-8")


def _parquet_schema(path: Path) -> pa.Schema:
    try:
        schema: pa.Schema = pq.read_schema(path)
    except pa.ArrowInvalid as error:
        raise NotesFileError(f"{path}: not a Parquet file ({error})") from None
    return schema


def _first_block_schema(path: Path, file_format: str, encoding: str, delimiter: str) -> pa.Schema:
    """The columns (and, for JSON, their types) of a text file, from its first parse block."""
    try:
        if file_format == "csv":
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(encoding=encoding, block_size=BLOCK_BYTES, use_threads=False),
                parse_options=pacsv.ParseOptions(
                    delimiter=delimiter, newlines_in_values=True, invalid_row_handler=_RaggedRows()
                ),
            )
        else:
            reader = pajson.open_json(
                _utf8_stream(path, encoding), read_options=pajson.ReadOptions(block_size=BLOCK_BYTES)
            )
        with reader:
            return reader.schema
    except pa.ArrowInvalid as error:
        raise NotesFileError(f"{path}: {error}") from None


def _is_dictionary_of_text(data_type: pa.DataType) -> bool:
    return pa.types.is_dictionary(data_type) and any(data_type.value_type.equals(t) for t in TEXT_TYPES)
