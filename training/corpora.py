"""Unlabelled text corpora for masked-LM pretraining: one plain-text line per training example.

A corpus spec is either a corpus name (`icd10cm`) or the path of a file of unlabelled notes.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path

from training.data.examples import DataError
from training.data.readers import read_table

ICD10CM = "icd10cm"

# Children of a chapter, section or code whose <note> items name clinical conditions, and the
# phrase that joins them to the parent's title. Free-text <notes>, 7th-character definitions and
# the introduction are coding mechanics, not clinical language, so they are left out.
ICD10CM_RELATIONS = {
    "inclusionTerm": "includes",
    "includes": "includes",
    "excludes1": "excludes",
    "excludes2": "excludes",
    "codeFirst": "code first",
    "useAdditionalCode": "use additional",
    "codeAlso": "code also",
}

# A parenthesised cross-reference that starts with a code, e.g. "(A00-B99)", "(C84.-)", "(K82.A1)",
# "(T36-T50 with fifth or sixth character 5)", or the two unclosed ones of the 2026 list ("(E87.8}");
# it does not match "(G6PD)" or "(HIV)".
_CODE_REFERENCE = re.compile(r"\s*\((?:i\.e\.\s*)?[A-Z](?:\d[0-9A-Z]|[A-Z]\d)(?:\b|[.-])[^()]*?(?:[)}]|$)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:])")

PLAIN_TEXT_SUFFIXES = {".txt", ".text"}  # one note per line, no header


def load_corpus(spec: str, text_column: str = "text") -> list[str]:
    """The lines of corpus `spec`: `icd10cm`, or a notes file (CSV, TSV, JSONL, Parquet: column
    `text_column`; .txt: one note per line)."""
    if spec == ICD10CM:
        return list(icd10cm_lines())
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {spec!r} is neither a named corpus ({ICD10CM}) nor an existing file")
    return note_lines(path, text_column)


def note_lines(path: Path, text_column: str = "text") -> list[str]:
    """Non-empty, whitespace-normalised notes from a file, in file order."""
    if path.suffix.lower() in PLAIN_TEXT_SUFFIXES:
        texts = path.read_text(encoding="utf-8").splitlines()
    else:
        frame = read_table(path)
        if text_column not in frame.columns:
            raise DataError(f"{path}: no column {text_column!r}; the columns are {list(frame.columns)}")
        texts = frame[text_column].dropna().astype(str).tolist()
    lines = [normalised for text in texts if (normalised := " ".join(text.split()))]
    if not lines:
        raise DataError(f"{path}: no non-empty notes to pretrain on")
    return lines


@lru_cache(maxsize=1)
def icd10cm_lines() -> tuple[str, ...]:
    """Clinical sentences from the ICD-10-CM tabular list: every title, and one sentence per title and
    relation (e.g. "Cholera due to Vibrio cholerae 01, biovar cholerae: includes Classical cholera.").
    Deduplicated, in the order of the tabular list."""
    root = ET.parse(icd10cm_tabular_xml()).getroot()
    return tuple(dict.fromkeys(line for line in _icd10cm_sentences(root) if line))


def icd10cm_tabular_xml() -> Path:
    """The ICD-10-CM tabular XML shipped in the simple-icd-10-cm package (US public domain); the newest by
    name if it ships several."""
    data = resources.files("simple_icd_10_cm") / "data"
    found = sorted(entry.name for entry in data.iterdir() if re.fullmatch(r"icd10c.*tabular.*\.xml", entry.name))
    if not found:
        raise FileNotFoundError("the installed simple-icd-10-cm package ships no ICD-10-CM tabular XML")
    return Path(str(data / found[-1]))


def _icd10cm_sentences(root: ET.Element) -> Iterator[str]:
    for entry in root.iter():
        if entry.tag not in ("chapter", "section", "diag"):
            continue
        title = _clean(entry.findtext("desc", default=""))
        yield title
        for child in entry:
            if child.tag in ICD10CM_RELATIONS:
                items = "; ".join(_clean(note.text or "").rstrip(".") for note in child.iter("note"))
                sentence = f"{title}: {ICD10CM_RELATIONS[child.tag]} {items}."
                # Notes such as "code to identify:" introduce the items that follow them.
                yield _clean(sentence.replace(":;", ":"))


def _clean(text: str) -> str:
    """Text without code cross-references and with normalised spacing."""
    text = " ".join(_CODE_REFERENCE.sub("", text).split())
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
