"""The KTAS adapter on the real bundled data (Moon et al., PLOS ONE 2019, CC BY 4.0)."""

import pandas as pd
import pytest

from training.data import DataError
from training.data.ktas import BUNDLED_KTAS, TRIAGE_COLUMNS, ktas_examples, ktas_note, load_ktas
from training.data.readers import read_table

POST_TRIAGE = [
    "KTAS_RN",
    "Diagnosis in ED",
    "Disposition",
    "Error_group",
    "Length of stay_min",
    "KTAS duration_min",
    "mistriage",
]


@pytest.fixture(scope="module")
def ktas():
    return load_ktas()


def test_bundled_file_counts_match_its_readme(ktas):
    assert len(ktas) == 1267
    assert int(ktas.labels.sum()) == 733  # KTAS_expert 1-3


def test_first_note_reads_like_a_triage_note(ktas):
    assert ktas.texts[0] == (
        "CC: right ocular pain. 71M, private vehicle, injury, alert, NRS 2, BP 160/100, HR 84, RR 18, BT 36.6, SpO2 100"
    )


def test_missing_values_are_omitted_not_invented():
    note = ktas_note(
        {
            "Sex": "1",
            "Age": "40",
            "Arrival mode": "1",
            "Injury": "1",
            "Chief_complain": "dizziness",
            "Mental": "1",
            "Pain": "0",
            "NRS_pain": "",
            "SBP": "120",
            "DBP": "",
            "HR": "",
            "RR": "",
            "BT": "36.8",
            "Saturation": "",
        }
    )
    assert note == "CC: dizziness. 40F, walk-in, no injury, alert, no pain, SBP 120, BT 36.8"


def test_lost_korean_complaints_are_left_out():
    row = dict.fromkeys(TRIAGE_COLUMNS, "") | {"Chief_complain": " ? ? ", "Age": "30", "Sex": "2"}
    assert ktas_note(row) == "30M"


def test_post_triage_fields_never_enter_the_note():
    frame = read_table(BUNDLED_KTAS, delimiter=";")
    marked = frame.copy()
    for i, column in enumerate(POST_TRIAGE):
        marked[column] = f"LEAK{i}"
    texts = ktas_examples(marked, "marked").texts
    assert texts == ktas_examples(frame, "original").texts
    assert not any("LEAK" in t for t in texts)


def test_label_is_expert_level_not_nurse_level():
    frame = read_table(BUNDLED_KTAS, delimiter=";").head(4).copy()
    frame["KTAS_expert"] = ["1", "3", "4", "5"]
    frame["KTAS_RN"] = ["5", "5", "1", "1"]
    assert ktas_examples(frame, "f").labels.tolist() == [1, 1, 0, 0]


def test_bad_level_and_missing_columns_are_named():
    frame = read_table(BUNDLED_KTAS, delimiter=";").head(3).copy()
    frame.loc[2, "KTAS_expert"] = "7"
    with pytest.raises(DataError, match=r"KTAS_expert must be 1-5, got '7' at data row 2"):
        ktas_examples(frame, "f")
    with pytest.raises(DataError, match="missing column"):
        ktas_examples(pd.DataFrame({"Age": ["3"]}), "f")
