from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_settings_come_from_triage_environment_variables(monkeypatch):
    monkeypatch.setenv("TRIAGE_BUNDLE", "models/tiny")
    monkeypatch.setenv("TRIAGE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TRIAGE_TRUNCATION", "refuse")
    monkeypatch.setenv("TRIAGE_API_KEYS", "k1, k2,")
    settings = Settings()
    assert settings.bundle == Path("models/tiny")
    assert settings.max_batch_size == 7 and settings.truncation == "refuse"
    assert settings.api_keys == ["k1", "k2"]
    assert "k1" not in repr(settings)


def test_arguments_override_the_environment(monkeypatch):
    monkeypatch.setenv("TRIAGE_MAX_WAIT_MS", "50")
    assert Settings(bundle="b", max_wait_ms=2).max_wait_ms == 2


@pytest.mark.parametrize(
    "options, fault",
    [
        ({"max_notes_per_request": 10, "queue_capacity": 5}, "exceeds queue_capacity"),
        ({"max_notes_per_request": 10, "explain_max_words": 100, "queue_capacity": 100}, "explained request"),
        ({"max_note_tokens": 9000, "max_batch_tokens": 8192}, "exceeds max_batch_tokens"),
        ({"max_batch_size": 0}, "greater than 0"),
        ({"variant": "int4"}, "variant"),
    ],
)
def test_inconsistent_settings_are_refused(options, fault):
    with pytest.raises(ValidationError, match=fault):
        Settings(bundle="b", **options)
