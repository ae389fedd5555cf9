"""Reading tables and turning them into examples; every bad input gets an error naming what is wrong."""

import json

import numpy as np
import pandas as pd
import pytest

from training.data import DataError, build_examples, parse_label_map, read_table

ROWS = [{"note": "CC: chest pain", "label": "1"}, {"note": "CC: wart", "label": "0"}, {"note": "fever", "label": "1"}]


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_csv_delimiter_is_sniffed(tmp_path, sep):
    text = f"note{sep}label\n" + "".join(f"{r['note'].replace(',', ' ')}{sep}{r['label']}\n" for r in ROWS)
    frame = read_table(write(tmp_path, "notes.csv", text))
    assert list(frame.columns) == ["note", "label"]
    assert frame["label"].tolist() == ["1", "0", "1"]


def test_tsv_jsonl_parquet_read_the_same(tmp_path):
    tsv = write(tmp_path, "n.tsv", "note\tlabel\n" + "".join(f"{r['note']}\t{r['label']}\n" for r in ROWS))
    jsonl = write(tmp_path, "n.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    parquet = tmp_path / "n.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    for path in (tsv, jsonl, parquet):
        examples = build_examples(read_table(path), ["note"], "label", None, str(path))
        assert examples.texts == [r["note"] for r in ROWS]
        assert examples.labels.tolist() == [1, 0, 1]


def test_several_text_columns_are_joined(tmp_path):
    frame = pd.DataFrame({"cc": ["pain", "rash"], "hx": ["since today", ""], "y": ["1", "0"]})
    examples = build_examples(frame, ["cc", "hx"], "y", None, "mem")
    assert examples.texts == ["pain\nsince today", "rash"]


def test_label_map_with_names_and_numbers():
    frame = pd.DataFrame({"t": ["a", "b", "c"], "level": ["2", "5", "3"]})
    mapping = parse_label_map("1=1,2=emergency,3=1,4=0,5=non-emergency")
    assert build_examples(frame, ["t"], "level", mapping, "mem").labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "empty"),
        ("header.csv", "note,label\n", "no rows"),
        ("latin1.csv", "note,label\nfine,1\ncaf\xe9,0\n".encode("latin-1"), "line 3 is not valid UTF-8"),
        ("notes.xlsx", "x", "unsupported file type"),
        ("bad.jsonl", '{"note": "a", "label": 1}\n{not json\n', "not valid JSON Lines"),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as err:
        read_table(path)
    assert str(path) in str(err.value)


# SYNTHETIC Korean notes (made up for this test, not patient data), saved in the encodings Korean EMRs export.
KOREAN_ROWS = [
    ("복통 호소하여 내원함, NRS 5점", "1"),
    ("어지럼증으로 도보 내원", "0"),
    ("흉통 및 호흡곤란, 119 구급차", "1"),
]


@pytest.mark.parametrize("encoding", ["cp949", "euc-kr"])
@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_korean_cp949_and_euc_kr_files_are_detected(tmp_path, encoding, suffix):
    sep = "\t" if suffix == ".tsv" else ","
    text = f"note{sep}label\n" + "".join(f"{note.replace(',', ' ')}{sep}{label}\n" for note, label in KOREAN_ROWS)
    path = write(tmp_path, f"notes{suffix}", text.encode(encoding))
    for given in (None, encoding):
        frame = read_table(path, encoding=given)
        assert frame["note"].tolist() == [note.replace(",", " ") for note, _ in KOREAN_ROWS]


def test_a_short_euc_kr_file_is_read_and_a_wrong_encoding_is_named(tmp_path):
    path = write(tmp_path, "one.csv", "note;label\n두통;1\n외상;0\n".encode("euc-kr"))
    assert read_table(path)["note"].tolist() == ["두통", "외상"]
    with pytest.raises(DataError, match=r"one.csv: line 2 is not valid utf-8.*check --encoding"):
        read_table(path, encoding="utf-8")


def test_other_encodings_need_encoding_given(tmp_path):
    path = write(tmp_path, "latin.csv", "note,label\nfine,1\ncaf\xe9 au lait,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: line 3 is not valid UTF-8 .*--encoding"):
        read_table(path)
    assert read_table(path, encoding="latin-1")["note"].tolist() == ["fine", "caf\xe9 au lait"]


def test_ktas_file_in_cp949_is_read_with_encoding(tmp_path):
    """The real KTAS file has no Hangul left to detect (its few non-ASCII signs are ambiguous): --encoding says."""
    from training.config import DataArguments
    from training.data.ktas import BUNDLED_KTAS
    from training.data.loading import load_examples

    path = write(tmp_path, "ktas.csv", BUNDLED_KTAS.read_text().encode("cp949"))
    args = DataArguments(data=str(path), data_format="ktas", encoding="cp949")
    assert load_examples(args).texts == load_examples(DataArguments(data="ktas")).texts


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "nope.csv")


def test_missing_column_names_the_columns():
    frame = pd.DataFrame({"text": ["a"], "y": ["1"]})
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\].*\['text', 'y'\]"):
        build_examples(frame, ["text"], "label", None, "f.csv")


def test_unknown_label_names_row_and_value():
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": ["1", "0", "maybe"]})
    with pytest.raises(DataError, match=r"first at data row 2 \(0-based\): \['maybe'\]"):
        build_examples(frame, ["text"], "label", None, "f.csv")


def test_single_class_is_refused():
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["1", "1"]})
    with pytest.raises(DataError, match="only one class"):
        build_examples(frame, ["text"], "label", None, "f.csv")


def test_empty_texts_fail_unless_dropped_with_a_logged_count(caplog):
    frame = pd.DataFrame({"text": ["a", "  ", "c", "d"], "label": ["1", "0", "0", "1"]})
    with pytest.raises(DataError, match=r"1 empty text\(s\).*data rows \[1\]"):
        build_examples(frame, ["text"], "label", None, "f.csv")
    examples = build_examples(frame, ["text"], "label", None, "f.csv", drop_empty=True)
    assert examples.texts == ["a", "c", "d"]
    assert examples.row_ids.tolist() == [0, 2, 3]
    assert "dropped 1 rows with empty text" in caplog.text


def test_bad_label_map_target():
    with pytest.raises(DataError, match="must be 0, 1"):
        parse_label_map("1=urgent")


def test_fingerprint_changes_with_data():
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["1", "0"]})
    first = build_examples(frame, ["text"], "label", None, "f")
    frame.loc[0, "text"] = "changed"
    assert first.fingerprint() != build_examples(frame, ["text"], "label", None, "f").fingerprint()
    assert np.array_equal(first.row_ids, [0, 1])


def test_single_column_file_needs_no_delimiter(tmp_path):
    frame = read_table(write(tmp_path, "corpus.csv", "text\nfever since yesterday\ncough\n"))
    assert frame["text"].tolist() == ["fever since yesterday", "cough"]
