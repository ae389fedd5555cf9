"""The probe notes every bundle carries (`Manifest.probes`): SYNTHETIC triage notes, written for this check and
describing no patient, that the service scores at every start to check the variant it serves, on the provider
in use, against fp32's margins at export (`app.readiness`).

Short and long, English and Korean-English, emergencies and routine visits; the last is long enough to be cut
to the model's input size, so that its head-and-tail truncation and the longest shape are checked too.
"""

from __future__ import annotations

LONG_NOTE_REPEATS = 15
# One at a time: the long note would pad a batch of all of them to the model's limit, a start-up cost to no purpose.
PROBE_BATCH_SIZE = 1

PROBE_NOTES = (
    "CC: chest pain radiating to the left arm for 30 minutes, sweating. BT 36.8, HR 118, BP 92/60, RR 24, SpO2 91%.",
    "CC: medication refill, no complaints today. BT 36.5, HR 72, BP 124/78, RR 16, SpO2 99%.",
    "3세 남아 보호자 동반 내원. 어제부터 발열, 구토 2회. CC: seizure lasting 3 minutes at home. BT 39.4, HR 162.",
    "CC: minor abrasion of the right knee after a fall from a bicycle, walks unaided. BT 36.6, HR 80.",
    "Found unresponsive by family, GCS 7, pupils unequal. BT 37.9, HR 48, BP 188/104, RR 8.",
    "CC: sore throat for 2 days, mild cough, eating and drinking well. BT 37.4, HR 88.",
    "CC: shortness of breath. "
    + (
        "Reassessed: still short of breath at rest, speaks in words, wheeze on both sides, SpO2 88% on room air, "
        "nebuliser given. "
    )
    * LONG_NOTE_REPEATS,
)
