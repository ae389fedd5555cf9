"""NoteClassifier against the bundle's own end-to-end prediction. All notes are SYNTHETIC."""

import numpy as np
import pytest

from app.bundle import load_bundle
from app.inference import NoteClassifier

NOTES = ["CC: seizure", "3세 남아 보호자 동반 내원 CC: chest pain. BT 38.4, HR 140", "CC: wart", "x"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    return load_bundle(tiny_bundle_dir)


def test_batches_of_pre_tokenized_notes_match_the_bundles_prediction(bundle):
    classifier = NoteClassifier(bundle, bundle.manifest.max_input_tokens)
    encoded = classifier.encode(NOTES)
    assert [len(note.ids) for note in encoded] == bundle.count_tokens(NOTES)
    assert not any(note.truncated for note in encoded)
    np.testing.assert_allclose(
        classifier.predict([note.ids for note in encoded]), bundle.predict_proba(NOTES), atol=1e-5
    )


def test_notes_over_max_note_tokens_are_cut_and_marked(bundle):
    classifier = NoteClassifier(bundle, max_note_tokens=6)
    short, long = classifier.encode(["CC: wart", " ".join(["chest pain"] * 10)])
    assert not short.truncated and long.truncated and len(long.ids) == 6


def test_max_note_tokens_cannot_exceed_the_models_input_size(bundle):
    with pytest.raises(ValueError, match="max_input_tokens"):
        NoteClassifier(bundle, bundle.manifest.max_input_tokens + 1)
