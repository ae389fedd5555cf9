"""KTAS adapter: a triage note per record of the public KTAS data set (Moon et al., PLOS ONE 2019).

The note holds only what is known at triage: chief complaint, age, sex, arrival mode, injury, mental state,
pain and vital signs. Post-triage fields (diagnosis, disposition, KTAS_RN, mistriage, error group, length of
stay) never enter it. Missing values are left out, never invented.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.examples import DataError, Examples
from training.data.readers import read_table
from training.data.render import (
    TRIAGE_COLUMNS,
    Rendering,
    RenderStyle,
    readable_complaint,
    render_examples,
    shorthand_note,
)

log = logging.getLogger(__name__)

BUNDLED_KTAS = Path(__file__).resolve().parents[2] / "data" / "ktas" / "ktas_triage.csv"
LABEL_COLUMN = "KTAS_expert"
EMERGENCY_LEVELS = {"1", "2", "3"}
NON_EMERGENCY_LEVELS = {"4", "5"}
ktas_note = shorthand_note  # the `shorthand` rendering, the project's note since the start


def ktas_examples(
    frame: pd.DataFrame, source: str, render: RenderStyle = "shorthand", render_seed: int = 0
) -> Examples:
    """Emergency = KTAS_expert 1-3, non-emergency = 4-5 (the project's binary task). The notes are rendered in
    `render` (training/data/render.py); the records stay with the examples so they can be rendered again."""
    missing = [c for c in [*TRIAGE_COLUMNS, LABEL_COLUMN] if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: not a KTAS file, missing column(s) {missing}")
    levels = frame[LABEL_COLUMN].astype(str).str.strip()
    unknown = ~levels.isin(EMERGENCY_LEVELS | NON_EMERGENCY_LEVELS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{source}: {LABEL_COLUMN} must be 1-5, got {levels.iloc[row]!r} at data row {row} (0-based)")
    records = frame[TRIAGE_COLUMNS].astype(str).to_dict("records")
    rendering = Rendering(dict(enumerate(records)))
    row_ids = np.arange(len(frame), dtype=np.int64)
    lost = sum(1 for r in records if not readable_complaint(r["Chief_complain"]))
    log.info("KTAS: %d notes from %s; %d without a readable chief complaint", len(records), source, lost)
    labels = levels.isin(EMERGENCY_LEVELS).to_numpy(dtype=np.int64)
    examples = Examples(rendering.texts(row_ids), labels, row_ids, source, rendering)
    return examples if render == "shorthand" else render_examples(examples, render, render_seed)


def load_ktas(path: str | Path = BUNDLED_KTAS, render: RenderStyle = "shorthand", render_seed: int = 0) -> Examples:
    return ktas_examples(read_table(path, delimiter=";"), str(path), render, render_seed)
