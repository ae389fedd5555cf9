"""Corpora for masked-LM pretraining: ICD-10-CM, WHO ICD-10 and files of (SYNTHETIC) notes."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from training.corpora import corpus_sources, icd10cm_lines, load_corpus
from training.data.examples import DataError


def corpus_texts(spec: str) -> list[str]:
    return [line.text for line in load_corpus(spec)]


def test_icd10cm_is_large_deduplicated_and_clinical():
    lines = corpus_texts("icd10cm")
    assert len(lines) > 50_000
    assert len(set(lines)) == len(lines) and all(line.strip() == line and line for line in lines)
    assert "Cholera" in lines
    assert "Cholera due to Vibrio cholerae 01, biovar cholerae: includes Classical cholera." in lines
    assert any(line.startswith("Typhoid fever with heart involvement: includes Typhoid endocarditis") for line in lines)
    assert any("excludes" in line for line in lines) and any("use additional code" in line for line in lines)


def test_icd10cm_drops_code_cross_references_but_keeps_acronyms():
    lines = corpus_texts("icd10cm")
    assert not any(re.search(r"\([A-Z]\d\d", line) for line in lines)
    assert any("(G6PD)" in line for line in lines)
    assert "Certain infectious and parasitic diseases" in lines  # chapter title without "(A00-B99)"


def test_icd10cm_is_deterministic():
    first = load_corpus("icd10cm")
    icd10cm_lines.cache_clear()
    assert load_corpus("icd10cm") == first


def test_icd10cm_lines_belong_to_their_code():
    documents = {line.text: line.document for line in load_corpus("icd10cm")}
    assert documents["Cholera due to Vibrio cholerae 01, biovar cholerae"] == "A00.0"
    assert documents["Cholera due to Vibrio cholerae 01, biovar cholerae: includes Classical cholera."] == "A00.0"
    assert documents["Intestinal infectious diseases"] == "A00-A09"
    assert documents["Certain infectious and parasitic diseases"] == "1"


def test_icd10who_is_the_who_titles_deduplicated():
    lines = load_corpus("icd10who")
    assert len(lines) > 12_000 and len({line.text for line in lines}) == len(lines)
    documents = {line.text: line.document for line in lines}
    assert documents["Cholera due to Vibrio cholerae 01, biovar cholerae"] == "A00.0"
    assert documents["Intestinal infectious diseases"] == "A00-A09"
    assert "Concussion and oedema of cervical spinal cord" in documents  # WHO's British spelling
    assert "Poisoning: Carbonic-anhydrase inhibitors, benzothiadiazides and other diuretics" in documents
    assert not any(" :" in text or text.strip() != text for text in documents)


def test_joined_corpora_keep_each_line_once_where_it_first_occurs():
    icd10cm, icd10who = load_corpus("icd10cm"), load_corpus("icd10who")
    joined = load_corpus("icd10cm+icd10who")
    assert joined[: len(icd10cm)] == icd10cm
    in_icd10cm = {line.text for line in icd10cm}
    assert joined[len(icd10cm) :] == [line for line in icd10who if line.text not in in_icd10cm]
    assert len(joined) > len(icd10cm) + 5_000


def test_corpus_sources_name_package_version_and_licence(tmp_path):
    sources = corpus_sources("icd10cm+icd10who")
    assert list(sources) == ["icd10cm", "icd10who"]
    assert re.fullmatch(r"simple-icd-10-cm==\S+", sources["icd10cm"]["package"])
    assert "public domain" in sources["icd10cm"]["licence"]
    assert re.fullmatch(r"simple-icd-10==\S+", sources["icd10who"]["package"])
    assert "World Health Organization" in sources["icd10who"]["licence"]
    notes = tmp_path / "notes.txt"
    assert corpus_sources(str(notes)) == {str(notes): {"file": str(notes.resolve())}}


def test_notes_from_csv_jsonl_and_text(tmp_path, notes):
    texts = [text for text, _ in notes[:5]]
    pd.DataFrame({"id": range(5), "note": texts}).to_csv(tmp_path / "notes.csv", sep=";", index=False)
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"note": text}) + "\n" for text in texts))
    (tmp_path / "notes.txt").write_text("\n".join(texts) + "\n\n")
    assert load_corpus(str(tmp_path / "notes.csv"), text_column="note") == [(text, text) for text in texts]
    assert load_corpus(str(tmp_path / "notes.jsonl"), text_column="note") == [(text, text) for text in texts]
    assert load_corpus(str(tmp_path / "notes.txt")) == [(text, text) for text in texts]  # each note its own document


def test_notes_are_whitespace_normalised_and_blank_ones_dropped(tmp_path):
    frame = pd.DataFrame({"id": [1, 2, 3], "text": ["  CC:\tfever  \n BT 38.5", "   ", "CC: cough"]})
    frame.to_csv(tmp_path / "notes.csv", index=False)
    assert corpus_texts(str(tmp_path / "notes.csv")) == ["CC: fever BT 38.5", "CC: cough"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a named corpus"):
        load_corpus(str(tmp_path / "absent.csv"))
    with pytest.raises(FileNotFoundError, match=r"neither a named corpus \(icd10cm, icd10who"):
        load_corpus("icd10cm+icd11")


def test_missing_column_names_the_columns(tmp_path):
    pd.DataFrame({"id": [1], "note": ["CC: fever"]}).to_csv(tmp_path / "notes.csv", index=False)
    with pytest.raises(DataError, match=r"no column 'text'.*\['id', 'note'\]"):
        load_corpus(str(tmp_path / "notes.csv"))


def test_corpus_without_text_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no non-empty notes"):
        load_corpus(str(tmp_path / "notes.txt"))
