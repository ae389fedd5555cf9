"""`python -m app score`: batch scoring of a notes file, locally and on a real local Ray cluster.

All notes here are SYNTHETIC (tests/conftest.py `synthetic_notes`), never patient data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import app.note_files
from app.bundle import load_bundle
from app.cli import cli
from app.inference import NoteClassifier
from app.note_files import NotesFile
from benchmarks.local_ray import LocalRayCluster, local_ray_cluster

FORMATS = {  # file name -> how it is written
    "notes.csv": "utf-8",
    "notes.tsv": "cp949",  # a Korean EMR export, detected
    "notes.jsonl": "euc-kr",
    "notes.parquet": None,
}


def write_notes(path: Path, frame: pd.DataFrame, encoding: str | None = None) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".jsonl":
        path.write_bytes(frame.to_json(orient="records", lines=True, force_ascii=False).encode(encoding or "utf-8"))
    else:
        frame.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False, encoding=encoding)
    return path


def score(*args: object):
    return CliRunner().invoke(cli, ["score", *map(str, args)])


@pytest.fixture(scope="module")
def frame(notes) -> pd.DataFrame:
    return pd.DataFrame({"note_id": [f"a{i:03d}" for i in range(len(notes))], "text": [text for text, _ in notes]})


@pytest.fixture(scope="module")
def expected(tiny_bundle_dir, frame) -> tuple[np.ndarray, list[str], list[bool]]:
    """P(emergency), labels and truncation of the notes scored by NoteClassifier directly, as the service loads it."""
    bundle = load_bundle(tiny_bundle_dir)
    classifier = NoteClassifier.from_bundle(bundle)
    texts = frame["text"].tolist()
    probabilities = classifier.predict_proba(texts)
    labels = [bundle.manifest.decision.label(float(p)) for p in probabilities]
    return probabilities, labels, [note.truncated for note in classifier.encode(texts)]


@pytest.mark.parametrize(("name", "encoding"), FORMATS.items())
def test_every_format_scores_as_the_note_classifier(tmp_path, tiny_bundle_dir, frame, expected, name, encoding):
    source = write_notes(tmp_path / name, frame, encoding)
    output = tmp_path / "scores.parquet"
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", output, "--id-column", "note_id")
    assert result.exit_code == 0, result.output
    scores = pq.read_table(output)
    assert scores.column_names == ["note_id", "p_emergency", "label", "truncated", "status"]
    probabilities, labels, truncated = expected
    assert scores["note_id"].to_pylist() == frame["note_id"].tolist()
    np.testing.assert_allclose(scores["p_emergency"].to_numpy(), probabilities, rtol=0, atol=1e-6)
    assert scores["label"].to_pylist() == labels
    assert scores["truncated"].to_pylist() == truncated
    assert set(scores["status"].to_pylist()) == {"ok"}
    assert f"{len(frame)} rows" in result.output and "ok 200" in result.output
    assert oct(output.stat().st_mode & 0o777) == "0o600"  # it holds row ids
    assert not output.with_name("scores.parquet.partial").exists()


def test_without_an_id_column_the_row_number_is_the_id_and_text_is_copied_only_if_asked(
    tmp_path, tiny_bundle_dir, frame
):
    source = write_notes(tmp_path / "notes.csv", frame)
    for flags, columns in (([], ["row", "p_emergency", "label", "truncated", "status"]), (["--include-text"], None)):
        output = tmp_path / "scores.parquet"
        assert score("--bundle", tiny_bundle_dir, "--input", source, "--output", output, *flags).exit_code == 0
        scores = pq.read_table(output)
        assert scores["row"].to_pylist() == list(range(len(frame)))
        if columns:
            assert scores.column_names == columns
        else:
            assert scores["text"].to_pylist() == frame["text"].tolist()


@pytest.mark.parametrize("name", FORMATS)
def test_chunks_have_the_asked_number_of_rows_however_the_file_is_parsed(tmp_path, monkeypatch, frame, name):
    """Bounded memory by construction: whatever the parse blocks (here 1 KiB, many per chunk and chunks across
    blocks), each chunk holds `rows_per_chunk` rows (the last fewer), and every row is in one, in order."""
    monkeypatch.setattr(app.note_files, "BLOCK_BYTES", 1024)
    path = write_notes(tmp_path / name, frame, FORMATS[name])
    if path.suffix == ".parquet":
        frame.to_parquet(path, row_group_size=7)
    chunks = list(NotesFile.open(path, "text", "note_id").chunks(rows_per_chunk=16))
    assert [chunk.num_rows for chunk in chunks] == [16] * 12 + [8]
    rows = pa.Table.from_batches(chunks)
    assert rows["row"].to_pylist() == list(range(len(frame)))
    assert rows["id"].to_pylist() == frame["note_id"].tolist()
    assert rows["text"].to_pylist() == frame["text"].tolist()


def test_the_model_never_sees_more_notes_at_once_than_a_chunk(tmp_path, monkeypatch, tiny_bundle_dir, frame):
    seen: list[int] = []
    encode = NoteClassifier.encode
    monkeypatch.setattr(NoteClassifier, "encode", lambda self, texts: seen.append(len(texts)) or encode(self, texts))
    source = write_notes(tmp_path / "notes.csv", frame)
    output = tmp_path / "scores.parquet"
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", output, "--chunk-rows", 64)
    assert result.exit_code == 0, result.output
    assert seen == [64, 64, 64, 8]
    assert pq.read_table(output).num_rows == len(frame)


def test_rows_that_cannot_be_scored_are_kept_with_a_status(tmp_path, tiny_bundle_dir, frame, caplog):
    """Bad rows are never dropped: each keeps its place with null scores and a status; the rest are scored."""
    rows = [
        {"note_id": "ok", "text": frame["text"][0]},
        {"note_id": "null", "text": None},
        {"note_id": "no text field"},
        {"note_id": "empty", "text": ""},
        {"note_id": "blank", "text": " \u200b\t"},
        {"note_id": "too long", "text": "x" * 301},
        {"note_id": "too many tokens", "text": " ".join(["fever"] * 40)},
    ]
    source = tmp_path / "notes.jsonl"
    source.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    output = tmp_path / "scores.parquet"
    args = ["--bundle", tiny_bundle_dir, "--input", source, "--output", output, "--id-column", "note_id"]
    result = score(*args, "--max-note-chars", 300, "--max-note-tokens", 32, "--truncation", "refuse")
    assert result.exit_code == 0, result.output
    scores = pq.read_table(output).to_pylist()
    assert [row["status"] for row in scores] == [
        "ok",
        "missing",
        "missing",
        "blank",
        "blank",
        "too_long",
        "too_many_tokens",
    ]
    assert scores[0]["p_emergency"] is not None and scores[0]["label"] is not None
    assert all(row["p_emergency"] is None and row["label"] is None for row in scores[1:])
    assert "2 rows not scored, status missing" in result.output
    assert "x" * 20 not in result.output + caplog.text and frame["text"][0] not in result.output + caplog.text

    # The same long note under head-tail truncation is scored, and says it was cut.
    result = score(*args, "--max-note-chars", 300, "--max-note-tokens", 32)
    assert result.exit_code == 0, result.output
    last = pq.read_table(output).to_pylist()[-1]
    assert last["status"] == "ok" and last["truncated"] is True


def test_a_missing_column_names_the_columns_found(tmp_path, tiny_bundle_dir, frame):
    source = write_notes(tmp_path / "notes.csv", frame.rename(columns={"text": "note"}))
    output = tmp_path / "scores.parquet"
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", output)
    assert result.exit_code == 2
    assert "no text column 'text'; columns found: note_id, note" in result.output
    columns = ("--text-column", "note", "--id-column", "mrn")
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", output, *columns)
    assert result.exit_code == 2 and "no id column 'mrn'; columns found: note_id, note" in result.output
    assert not output.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("ragged.tsv", b"id\ttext\n1\tfine\n2\tsecret\twords\n", "a row at line 3 has 3 fields where the header has 2"),
        ("number.jsonl", b'{"text": "fine"}\n{"text": 3}\n', "changed from string to number"),
        ("latin.csv", "text\nfine\ncaf\xe9 secret\n".encode("latin-1"), "line 3 is not valid UTF-8"),
        ("notes.xlsx", b"text\nfine\n", "unsupported file type '.xlsx'"),
        ("empty.csv", b"", "the file is empty"),
    ],
)
def test_unreadable_files_are_refused_without_quoting_a_note(tmp_path, tiny_bundle_dir, name, content, message):
    source = tmp_path / name
    source.write_bytes(content)
    output = tmp_path / "scores.parquet"
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", output, "--chunk-rows", 1)
    assert result.exit_code == 2
    assert message in result.output and str(source) in result.output
    assert "secret" not in result.output
    assert not output.exists() and not output.with_name("scores.parquet.partial").exists()


def test_a_text_column_that_is_not_text_is_refused(tmp_path, tiny_bundle_dir):
    source = tmp_path / "notes.parquet"
    pd.DataFrame({"text": [1, 2]}).to_parquet(source)
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", tmp_path / "scores.parquet")
    assert result.exit_code == 2 and "column 'text' holds int64 values, not text" in result.output


def test_an_id_column_named_like_an_output_column_is_refused(tmp_path, tiny_bundle_dir, frame):
    source = write_notes(tmp_path / "notes.csv", frame.rename(columns={"note_id": "label"}))
    result = score(
        "--bundle", tiny_bundle_dir, "--input", source, "--output", tmp_path / "s.parquet", "--id-column", "label"
    )
    assert result.exit_code == 2 and "the id column 'label' has the name of an output column" in result.output


def test_an_id_column_may_be_called_text_when_the_notes_are_in_another(tmp_path, tiny_bundle_dir, frame):
    source = write_notes(tmp_path / "notes.csv", frame.rename(columns={"text": "note", "note_id": "text"}))
    output = tmp_path / "scores.parquet"
    columns = ("--text-column", "note", "--id-column", "text")
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", output, *columns)
    assert result.exit_code == 0, result.output
    assert pq.read_table(output)["text"].to_pylist() == frame["note_id"].tolist()


def test_the_output_must_be_parquet_and_not_the_input(tmp_path, tiny_bundle_dir, frame):
    source = write_notes(tmp_path / "notes.parquet", frame)
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", tmp_path / "scores.csv")
    assert result.exit_code == 2 and "written as Parquet" in result.output
    result = score("--bundle", tiny_bundle_dir, "--input", source, "--output", source)
    assert result.exit_code == 2 and "--output is the input file" in result.output


# ------------------------------------------------------------------------------------------- a real Ray cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A head and a worker node of one CPU each, started as separate processes on this machine."""
    with local_ray_cluster(workers=1, cpus_per_node=1) as cluster:
        yield cluster


def test_scoring_on_a_ray_cluster_gives_the_local_results(tmp_path, tiny_bundle_dir, frame, ray_cluster):
    """Two actors, one on each node, score 7 chunks; the file is the local run's, row for row."""
    source = write_notes(tmp_path / "notes.tsv", frame, "cp949")
    args = ["--bundle", tiny_bundle_dir, "--input", source, "--id-column", "note_id", "--include-text"]
    args += ["--chunk-rows", "32"]
    assert score(*args, "--output", tmp_path / "local.parquet").exit_code == 0
    command = [sys.executable, "-m", "app", "score", *map(str, args), "--output", str(tmp_path / "ray.parquet")]
    command += ["--ray", ray_cluster.address, "--ray-actors", "2"]
    finished = subprocess.run(command, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "200 rows" in finished.stderr

    local, on_ray = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert on_ray.schema == local.schema
    for name in ("note_id", "label", "truncated", "status", "text"):
        assert on_ray[name].to_pylist() == local[name].to_pylist(), name
    np.testing.assert_allclose(on_ray["p_emergency"].to_numpy(), local["p_emergency"].to_numpy(), rtol=0, atol=1e-6)
