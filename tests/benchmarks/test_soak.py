"""The soak summary: exactly-once accounting of note ids and the memory slope."""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import pytest

from benchmarks.soak import Tally, slope_mb_per_min, summary_lines

ARGS = argparse.Namespace(rate=10.0, duration=3.0, sample_seconds=10.0)


def flat_samples() -> np.ndarray:
    return np.array([[0.0, 100.0], [10.0, 100.0], [20.0, 100.0], [30.0, 100.0]])


def test_all_answered_once_is_reported_as_such() -> None:
    tally = Tally(
        sent=3, answered=Counter({"soak-0": 1, "soak-1": 1, "soak-2": 1}), latencies_ms=[5.0, 6.0, 7.0], seconds=3.0
    )
    summary = "\n".join(summary_lines(tally, flat_samples(), ARGS))
    assert "every request answered exactly once: yes" in summary
    assert "memory flat (second-half slope below 0.5 MB/min): yes" in summary


def test_duplicates_missing_unsent_ids_and_errors_are_counted() -> None:
    tally = Tally(
        sent=4,
        answered=Counter({"soak-0": 2, "soak-1": 1, "other-9": 1}),
        errors=Counter({"503": 1}),
        latencies_ms=[5.0, 5.0, 6.0, 7.0],
        seconds=4.0,
    )
    summary = "\n".join(summary_lines(tally, flat_samples(), ARGS))
    assert "twice or more 1, never 2, not sent 1; errors 1 (503: 1)" in summary
    assert "every request answered exactly once: NO" in summary


def test_slope_is_in_mb_per_minute() -> None:
    seconds = np.arange(0, 600, 10.0)
    samples = np.column_stack([seconds, 200 + 0.05 * seconds])  # 0.05 MB/s = 3 MB/min
    assert slope_mb_per_min(samples) == pytest.approx(3.0)
    summary = "\n".join(summary_lines(Tally(sent=0, seconds=1.0), samples, ARGS))
    assert "memory flat (second-half slope below 0.5 MB/min): NO" in summary
