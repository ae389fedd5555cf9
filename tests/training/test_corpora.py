"""Corpora for masked-LM pretraining: the ICD-10-CM tabular list and files of (SYNTHETIC) notes."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from training.corpora import icd10cm_lines, load_corpus
from training.data.examples import DataError


def test_icd10cm_is_large_deduplicated_and_clinical():
    lines = load_corpus("icd10cm")
    assert len(lines) > 50_000
    assert len(set(lines)) == len(lines) and all(line.strip() == line and line for line in lines)
    assert "Cholera" in lines
    assert "Cholera due to Vibrio cholerae 01, biovar cholerae: includes Classical cholera." in lines
    assert any(line.startswith("Typhoid fever with heart involvement: includes Typhoid endocarditis") for line in lines)
    assert any("excludes" in line for line in lines) and any("use additional code" in line for line in lines)


def test_icd10cm_drops_code_cross_references_but_keeps_acronyms():
    lines = load_corpus("icd10cm")
    assert not any(re.search(r"\([A-Z]\d\d", line) for line in lines)
    assert any("(G6PD)" in line for line in lines)
    assert "Certain infectious and parasitic diseases" in lines  # chapter title without "(A00-B99)"


def test_icd10cm_is_deterministic():
    first = load_corpus("icd10cm")
    icd10cm_lines.cache_clear()
    assert load_corpus("icd10cm") == first


def test_notes_from_csv_jsonl_and_text(tmp_path, notes):
    texts = [text for text, _ in notes[:5]]
    pd.DataFrame({"id": range(5), "note": texts}).to_csv(tmp_path / "notes.csv", sep=";", index=False)
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"note": text}) + "\n" for text in texts))
    (tmp_path / "notes.txt").write_text("\n".join(texts) + "\n\n")
    assert load_corpus(str(tmp_path / "notes.csv"), text_column="note") == texts
    assert load_corpus(str(tmp_path / "notes.jsonl"), text_column="note") == texts
    assert load_corpus(str(tmp_path / "notes.txt")) == texts


def test_notes_are_whitespace_normalised_and_blank_ones_dropped(tmp_path):
    frame = pd.DataFrame({"id": [1, 2, 3], "text": ["  CC:\tfever  \n BT 38.5", "   ", "CC: cough"]})
    frame.to_csv(tmp_path / "notes.csv", index=False)
    assert load_corpus(str(tmp_path / "notes.csv")) == ["CC: fever BT 38.5", "CC: cough"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a named corpus"):
        load_corpus(str(tmp_path / "absent.csv"))


def test_missing_column_names_the_columns(tmp_path):
    pd.DataFrame({"id": [1], "note": ["CC: fever"]}).to_csv(tmp_path / "notes.csv", index=False)
    with pytest.raises(DataError, match=r"no column 'text'.*\['id', 'note'\]"):
        load_corpus(str(tmp_path / "notes.csv"))


def test_corpus_without_text_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no non-empty notes"):
        load_corpus(str(tmp_path / "notes.txt"))
