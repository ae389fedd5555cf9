import pytest

from training.pretrained import MODELS_DIR_ENV


@pytest.fixture(autouse=True)
def models_dir(tmp_path, monkeypatch):
    """A models directory of the test's own: teacher caches (default `<models dir>/teacher-cache`) go there,
    never into the repository's, and no test reuses another's."""
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
    return tmp_path / "models"
