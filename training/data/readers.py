"""Read a table of notes from CSV / TSV / JSONL / Parquet with errors that name the file and row."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from training.data.examples import DataError

TEXT_SUFFIXES = {".csv", ".tsv", ".txt"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
SNIFF_DELIMITERS = ",;\t|"


def read_table(path: str | Path, delimiter: str | None = None) -> pd.DataFrame:
    """Read a table; every cell of a delimited file stays a string (labels such as "01" keep their form)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _non_empty(path, pd.read_parquet(path))
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    text = _decode_utf8(path, raw)
    if suffix in JSONL_SUFFIXES:
        return _non_empty(path, _read_jsonl(path, text))
    if suffix in TEXT_SUFFIXES:
        sep = delimiter or ("\t" if suffix == ".tsv" else _sniff_delimiter(path, text))
        try:
            frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
        except pd.errors.ParserError as err:
            raise DataError(f"{path}: not a valid delimited table ({err})") from err
        return _non_empty(path, frame)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl or .parquet)")


def _decode_utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-save the file as UTF-8"
        ) from err


def _sniff_delimiter(path: Path, text: str) -> str:
    header = text.split("\n", 1)[0]
    if not any(d in header for d in SNIFF_DELIMITERS):
        return ","  # a single column: nothing to sniff
    try:
        return csv.Sniffer().sniff(text[:65536], delimiters=SNIFF_DELIMITERS).delimiter
    except csv.Error as err:
        raise DataError(f"{path}: could not detect the delimiter; pass it explicitly (--delimiter)") from err


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    try:
        return pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON Lines ({err})") from err


def _non_empty(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows")
    return frame
