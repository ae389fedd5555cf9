"""Report files: metrics.json, report.md and the three plots."""

import json

import numpy as np
import pytest

from training.evaluate import evaluate
from training.report import write_report


@pytest.fixture(scope="module")
def scored() -> tuple[np.ndarray, np.ndarray]:
    """200 noisy but informative SYNTHETIC predictions, with emergencies scored higher on average."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 200)
    return labels, np.clip(0.35 * labels + rng.uniform(0, 0.65, 200), 0, 1)


def test_write_report_writes_every_file(scored, tmp_path):
    labels, probs = scored
    report = evaluate(labels, probs, {"prevalence": 0.45, "target-sensitivity": 0.3}, n_resamples=50)
    write_report(report, labels, probs, tmp_path / "eval", title="Synthetic test split")

    out = tmp_path / "eval"
    assert json.loads((out / "metrics.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Synthetic test split")
    for expected in ("| AUROC |", "95% CI", "`prevalence`", "`target-sensitivity`", "training labels", "true positive"):
        assert expected in markdown
    for figure in ("roc.png", "pr.png", "reliability.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / figure).stat().st_size > 10_000


def test_write_report_rejects_other_data(scored, tmp_path):
    labels, probs = scored
    report = evaluate(labels, probs, {"fixed-0.5": 0.5}, n_resamples=50)
    with pytest.raises(ValueError, match="200 rows"):
        write_report(report, labels[:100], probs[:100], tmp_path, title="wrong rows")
