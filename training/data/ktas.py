"""KTAS adapter: a triage note per record of the public KTAS data set (Moon et al., PLOS ONE 2019).

The note holds only what is known at triage: chief complaint, age, sex, arrival mode, injury, mental state,
pain and vital signs. Post-triage fields (diagnosis, disposition, KTAS_RN, mistriage, error group, length of
stay) never enter it. Missing values are left out, never invented.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.examples import DataError, Examples
from training.data.readers import read_table

log = logging.getLogger(__name__)

BUNDLED_KTAS = Path(__file__).resolve().parents[2] / "data" / "ktas" / "ktas_triage.csv"
LABEL_COLUMN = "KTAS_expert"
EMERGENCY_LEVELS = {"1", "2", "3"}
NON_EMERGENCY_LEVELS = {"4", "5"}
TRIAGE_COLUMNS = [
    "Sex",
    "Age",
    "Arrival mode",
    "Injury",
    "Chief_complain",
    "Mental",
    "Pain",
    "NRS_pain",
    "SBP",
    "DBP",
    "HR",
    "RR",
    "BT",
    "Saturation",
]

SEX = {"1": "F", "2": "M"}
ARRIVAL = {"1": "walk-in", "2": "public ambulance", "3": "private vehicle", "4": "private ambulance"}
INJURY = {"1": "no injury", "2": "injury"}
MENTAL = {"1": "alert", "2": "responds to voice", "3": "responds to pain", "4": "unresponsive"}
# Korean complaints were lost to "?" in the published file; a complaint with no letter left carries no text.
NO_LETTERS = re.compile(r"^[\W\d_]*$")


def ktas_note(row: dict[str, str]) -> str:
    """`CC: abd pain. 71M, private vehicle, injury, alert, NRS 2, BP 160/100, HR 84, RR 18, BT 36.6, SpO2 100`."""
    get = {k: str(row.get(k, "") or "").strip() for k in TRIAGE_COLUMNS}
    facts = []
    if get["Age"] or get["Sex"]:
        facts.append(f"{get['Age']}{SEX.get(get['Sex'], '')}")
    if get["Arrival mode"]:
        facts.append(ARRIVAL.get(get["Arrival mode"], "other arrival"))
    facts += [table[get[col]] for col, table in (("Injury", INJURY), ("Mental", MENTAL)) if get[col] in table]
    if get["NRS_pain"]:
        facts.append(f"NRS {get['NRS_pain']}")
    elif get["Pain"] == "0":
        facts.append("no pain")
    elif get["Pain"] == "1":
        facts.append("pain")
    if get["SBP"] and get["DBP"]:
        facts.append(f"BP {get['SBP']}/{get['DBP']}")
    elif get["SBP"]:
        facts.append(f"SBP {get['SBP']}")
    facts += [
        f"{name} {get[col]}"
        for name, col in (("HR", "HR"), ("RR", "RR"), ("BT", "BT"), ("SpO2", "Saturation"))
        if get[col]
    ]
    complaint = " ".join(get["Chief_complain"].split())
    head = f"CC: {complaint}. " if not NO_LETTERS.match(complaint) else ""
    return head + ", ".join(facts)


def ktas_examples(frame: pd.DataFrame, source: str) -> Examples:
    """Emergency = KTAS_expert 1-3, non-emergency = 4-5 (the project's binary task)."""
    missing = [c for c in [*TRIAGE_COLUMNS, LABEL_COLUMN] if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: not a KTAS file, missing column(s) {missing}")
    levels = frame[LABEL_COLUMN].astype(str).str.strip()
    unknown = ~levels.isin(EMERGENCY_LEVELS | NON_EMERGENCY_LEVELS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{source}: {LABEL_COLUMN} must be 1-5, got {levels.iloc[row]!r} at data row {row} (0-based)")
    records = frame[TRIAGE_COLUMNS].astype(str).to_dict("records")
    texts = [ktas_note(r) for r in records]
    lost = sum(1 for r in records if NO_LETTERS.match(r["Chief_complain"].strip()))
    log.info("KTAS: %d notes from %s; %d without a readable chief complaint", len(texts), source, lost)
    labels = levels.isin(EMERGENCY_LEVELS).to_numpy(dtype=np.int64)
    return Examples(texts, labels, np.arange(len(frame), dtype=np.int64), source)


def load_ktas(path: str | Path = BUNDLED_KTAS) -> Examples:
    return ktas_examples(read_table(path, delimiter=";"), str(path))
