import json

import numpy as np
import pytest

from training.evaluate import (
    THRESHOLD_FREE_METRICS,
    THRESHOLD_METRICS,
    _resample_indices,
    bootstrap_ci,
    choose_threshold,
    compute_metrics,
    evaluate,
    expected_calibration_error,
    resample_indices,
    resampled_metrics,
)

# Six notes, no probability on a bin edge. Sorted by probability:
#   0.12 (0)  0.18 (0)  0.32 (1)  0.62 (0)  0.68 (1)  0.92 (1)
LABELS = [0, 0, 0, 1, 1, 1]
PROBS = [0.12, 0.18, 0.62, 0.32, 0.68, 0.92]


@pytest.fixture(scope="module")
def scored() -> tuple[np.ndarray, np.ndarray]:
    """200 noisy but informative predictions, with emergencies scored higher on average."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 200)
    return labels, np.clip(0.35 * labels + rng.uniform(0, 0.65, 200), 0, 1)


def test_metrics_match_hand_computation():
    metrics = compute_metrics(LABELS, PROBS, threshold=0.5)

    # At 0.5 the predictions are [0, 0, 1, 0, 1, 1]: TN = 2, FP = 1 (0.62), FN = 1 (0.32), TP = 2.
    assert metrics["sensitivity"] == pytest.approx(2 / 3)  # TP / (TP + FN)
    assert metrics["specificity"] == pytest.approx(2 / 3)  # TN / (TN + FP)
    assert metrics["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP)
    assert metrics["f1"] == pytest.approx(2 / 3)  # harmonic mean of 2/3 and 2/3
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # Positive-negative pairs ranked right: 0.32 beats 2 negatives, 0.68 and 0.92 beat all 3 -> 8 of 9.
    assert metrics["auroc"] == pytest.approx(8 / 9)
    # Positives at ranks 1, 2, 4 -> precisions 1/1, 2/2, 3/4, averaged over the 3 positives.
    assert metrics["auprc"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    # Squared errors: negatives 0.12², 0.18², 0.62²; positives 0.68², 0.32², 0.08².
    assert metrics["brier"] == pytest.approx((0.0144 + 0.0324 + 0.3844 + 0.4624 + 0.1024 + 0.0064) / 6)
    # Bins (0.1, 0.2]: {0.12, 0.18} all negative, |0 - 0.15| = 0.15;  (0.3, 0.4]: {0.32} positive, 0.68;
    # (0.6, 0.7]: {0.62, 0.68} half positive, |0.5 - 0.65| = 0.15;  (0.9, 1]: {0.92} positive, 0.08.
    assert metrics["ece"] == pytest.approx((2 * 0.15 + 0.68 + 2 * 0.15 + 0.08) / 6)
    assert metrics["n"] == 6
    assert metrics["prevalence"] == 0.5


def test_probability_equal_to_threshold_counts_as_emergency():
    assert compute_metrics([0, 1], [0.2, 0.7], threshold=0.7)["sensitivity"] == 1.0


def test_ece_of_perfectly_calibrated_bins_is_zero():
    # In bin (0.2, 0.3] a quarter of the notes at 0.25 are emergencies; in (0.7, 0.8] three quarters at 0.75.
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    assert expected_calibration_error(labels, [0.25] * 4 + [0.75] * 4) == pytest.approx(0.0)


def test_no_predicted_emergency_gives_zero_precision_not_an_error():
    metrics = compute_metrics(LABELS, PROBS, threshold=1.0)
    assert metrics["precision"] == 0.0
    assert metrics["sensitivity"] == 0.0
    assert metrics["specificity"] == 1.0


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_one_class_is_a_clear_error(labels):
    with pytest.raises(ValueError, match="only class"):
        compute_metrics(labels, [0.2, 0.5, 0.9], threshold=0.5)
    with pytest.raises(ValueError, match="only class"):
        bootstrap_ci(labels, [0.2, 0.5, 0.9], threshold=0.5, n_resamples=10)


@pytest.mark.parametrize(
    ("labels", "probs", "threshold", "message"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], 0.5, "only 0"),
        ([0, 1, 1], [0.1, 1.2, 0.3], 0.5, r"\[0, 1\]"),
        ([0, 1, 1], [0.1, np.nan, 0.3], 0.5, "finite"),
        ([0, 1, 1], [0.1, 0.2], 0.5, "one per label"),
        ([0, 1, 1], [0.1, 0.2, 0.3], 1.5, "threshold"),
    ],
)
def test_bad_input_is_named(labels, probs, threshold, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(labels, probs, threshold)


def test_prevalence_policy_is_the_training_fraction_of_emergencies():
    assert choose_threshold("prevalence", train_labels=[1, 0, 0, 0]) == 0.25


def test_fixed_policy():
    assert choose_threshold("fixed-0.5") == 0.5


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (0.95, 0.32),  # all 3 emergencies needed: down to the lowest-scored one
        (0.6, 0.68),  # 2 of 3 suffice
        (2 / 3, 0.68),  # exactly reached counts
        (0.3, 0.92),  # 1 of 3
    ],
)
def test_target_sensitivity_policy_is_the_highest_threshold_reaching_the_target(target, expected):
    threshold = choose_threshold("target-sensitivity", valid_labels=LABELS, valid_prob=PROBS, target_sensitivity=target)
    assert threshold == expected
    assert compute_metrics(LABELS, PROBS, threshold)["sensitivity"] >= target
    assert compute_metrics(LABELS, PROBS, threshold + 1e-9)["sensitivity"] < target


def test_target_sensitivity_keeps_collinear_roc_points():
    # The three emergencies score highest, so their ROC points are collinear and
    # roc_curve(drop_intermediate=True) would drop the one at 2 of 3 emergencies (0.8).
    threshold = choose_threshold(
        "target-sensitivity",
        valid_labels=[1, 1, 1, 0, 0, 0],
        valid_prob=[0.9, 0.8, 0.7, 0.3, 0.2, 0.1],
        target_sensitivity=0.6,
    )
    assert threshold == 0.8


def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"prevalence, fixed-0\.5, target-sensitivity"):
        choose_threshold("youden")


@pytest.mark.parametrize(
    ("policy", "kwargs"),
    [("prevalence", {}), ("target-sensitivity", {"valid_labels": LABELS}), ("prevalence", {"train_labels": [0, 0]})],
)
def test_policy_without_its_inputs_is_an_error(policy, kwargs):
    with pytest.raises(ValueError, match=r"train_labels|valid_prob"):
        choose_threshold(policy, **kwargs)


def test_bootstrap_is_deterministic_for_a_seed(scored):
    labels, probs = scored
    first = bootstrap_ci(labels, probs, 0.5, n_resamples=200, seed=3)
    assert bootstrap_ci(labels, probs, 0.5, n_resamples=200, seed=3) == first
    assert bootstrap_ci(labels, probs, 0.5, n_resamples=200, seed=4) != first


def test_bootstrap_intervals_contain_the_point_estimates(scored):
    labels, probs = scored
    intervals = bootstrap_ci(labels, probs, 0.5, n_resamples=300)
    point = compute_metrics(labels, probs, 0.5)

    assert set(intervals) == set(THRESHOLD_FREE_METRICS + THRESHOLD_METRICS)
    for name, interval in intervals.items():
        assert interval["value"] == point[name]
        assert interval["low"] <= interval["value"] <= interval["high"], name
        assert interval["low"] < interval["high"], name


def test_wider_level_gives_wider_intervals(scored):
    labels, probs = scored
    narrow = bootstrap_ci(labels, probs, 0.5, n_resamples=200, level=0.5)
    wide = bootstrap_ci(labels, probs, 0.5, n_resamples=200, level=0.95)
    for name in narrow:
        assert wide[name]["low"] <= narrow[name]["low"] and narrow[name]["high"] <= wide[name]["high"], name


def test_resampled_metrics_equal_metrics_of_each_resample(scored):
    labels, probs = scored
    indices = resample_indices(labels, 5, seed=0)
    assert (indices == resample_indices(labels, 5, seed=0)).all()
    resampled = resampled_metrics(labels, probs, 0.5, indices)
    assert set(resampled) == set(THRESHOLD_FREE_METRICS + THRESHOLD_METRICS)
    for c, rows in enumerate(indices):
        expected = compute_metrics(labels[rows], probs[rows], 0.5)
        for name, values in resampled.items():
            assert values[c] == pytest.approx(expected[name]), name


def test_single_class_resamples_are_redrawn_and_counted():
    labels = np.array([1, 0, 0])  # a resample misses the emergency with probability (2/3)^3
    indices, redrawn = _resample_indices(labels, 200, np.random.default_rng(0))
    positives = labels[indices].sum(axis=1)
    assert ((positives > 0) & (positives < 3)).all()
    assert redrawn > 0
    report = evaluate(labels, [0.8, 0.3, 0.1], {"fixed-0.5": 0.5}, n_resamples=200)
    assert report["bootstrap"]["one_class_resamples_redrawn"] > 0


def test_evaluate_reports_every_policy_with_counts(scored):
    labels, probs = scored
    thresholds = {"prevalence": 0.45, "fixed-0.5": 0.5}
    report = evaluate(labels, probs, thresholds, n_resamples=100)

    assert report["counts"] == {
        "n": 200,
        "n_emergency": int(labels.sum()),
        "n_non_emergency": int(200 - labels.sum()),
        "prevalence": labels.mean(),
    }
    assert set(report["threshold_free"]) == set(THRESHOLD_FREE_METRICS)
    for name, threshold in thresholds.items():
        policy = report["thresholds"][name]
        point = compute_metrics(labels, probs, threshold)
        assert policy["threshold"] == threshold
        assert {m: policy["metrics"][m]["value"] for m in THRESHOLD_METRICS} == {m: point[m] for m in THRESHOLD_METRICS}
        cm = policy["confusion_matrix"]
        assert cm["tp"] + cm["fn"] == labels.sum() and cm["tn"] + cm["fp"] == 200 - labels.sum()
        assert cm["tp"] / (cm["tp"] + cm["fn"]) == pytest.approx(point["sensitivity"])
    bins = report["reliability"]["bins"]
    assert sum(b["count"] for b in bins) == 200
    assert all(b["low"] < b["mean_predicted"] <= b["high"] for b in bins)


def test_report_round_trips_through_json(scored):
    labels, probs = scored
    report = evaluate(labels, probs, {"fixed-0.5": 0.5}, n_resamples=50)
    assert json.loads(json.dumps(report)) == report
