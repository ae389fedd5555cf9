"""Read a table of notes from CSV / TSV / JSONL / Parquet with errors that name the file and row.

Text files are UTF-8 unless `encoding` says otherwise. A file that is not UTF-8 is detected: Korean files in
CP949 / EUC-KR (EUC-KR is a subset of CP949) are read as CP949; any other guess (charset-normalizer's) is named
in the error, to be confirmed with `--encoding`, since a wrong guess would silently garble the notes
(app/text_files.py, which batch scoring shares).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
from pathlib import Path

import pandas as pd

from app.text_files import decode_korean, not_utf8_message, sniff_delimiter
from training.data.examples import DataError

TEXT_SUFFIXES = {".csv", ".tsv", ".txt"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}

log = logging.getLogger(__name__)


def read_table(path: str | Path, delimiter: str | None = None, encoding: str | None = None) -> pd.DataFrame:
    """Read a table; every cell of a delimited file stays a string (labels such as "01" keep their form).
    `encoding`: of a text file (default: UTF-8, else detected, see the module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _non_empty(path, pd.read_parquet(path))
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    text = _decode(path, raw, encoding)
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


def _decode(path: Path, raw: bytes, encoding: str | None) -> str:
    if encoding is not None:
        name = codecs.lookup(encoding).name
        try:
            return raw.decode("utf-8-sig" if name == "utf-8" else name)
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError(
                f"{path}: line {line} is not valid {encoding} (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                "check --encoding"
            ) from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        korean = decode_korean(raw)
        if korean is not None:
            log.info("%s: not UTF-8; read as CP949 (Korean, detected)", path)
            return korean
        raise DataError(not_utf8_message(path, raw, err)) from err


def _sniff_delimiter(path: Path, text: str) -> str:
    try:
        return sniff_delimiter(text)
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
