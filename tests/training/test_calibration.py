"""Calibration fitting and the calibration metrics, on SYNTHETIC margins and labels (no model, no notes)."""

import numpy as np
import pytest

from app.inference import calibrated_probability
from app.manifest import Calibration
from training.calibration import choose_calibration, cross_validated_nll, cv_folds, fit_calibration
from training.evaluate import ece_if_calibrated, evaluate, logistic_recalibration


def synthetic(n: int, scale: float, bias: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC margins whose true P(emergency) is sigmoid(scale * margin + bias)."""
    rng = np.random.default_rng(seed)
    margins = rng.normal(0, 3, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(scale * margins + bias)))).astype(int)
    return margins, labels


def test_temperature_recovers_a_known_temperature():
    margins, labels = synthetic(20_000, scale=0.5, bias=0.0)  # an over-confident model, T = 2
    calibration = fit_calibration(margins, labels, "temperature", fitted_on="synthetic")
    assert calibration.method == "temperature" and calibration.bias == 0.0
    assert calibration.scale == pytest.approx(0.5, abs=0.02)
    assert (calibration.fitted_on, calibration.notes) == ("synthetic", 20_000)


def test_platt_recovers_a_known_scale_and_bias():
    margins, labels = synthetic(20_000, scale=0.7, bias=-1.2)
    calibration = fit_calibration(margins, labels, "platt")
    assert calibration.scale == pytest.approx(0.7, abs=0.03)
    assert calibration.bias == pytest.approx(-1.2, abs=0.06)


def test_platt_is_the_maximum_likelihood_logistic_fit():
    from sklearn.linear_model import LogisticRegression

    margins, labels = synthetic(3_000, scale=1.3, bias=0.4, seed=1)
    calibration = fit_calibration(margins, labels, "platt")
    # Platt's targets shrink the labels by at most 1 / (N + 2): the fit is the plain one up to that.
    plain = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(margins[:, None], labels)
    assert calibration.scale == pytest.approx(plain.coef_[0, 0], rel=0.02)
    assert calibration.bias == pytest.approx(plain.intercept_[0], abs=0.02)


def test_separable_margins_give_a_finite_calibration():
    margins = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    for method in ("temperature", "platt"):
        calibration = fit_calibration(margins, labels, method)
        assert np.isfinite(calibration.scale) and 0 < calibration.scale < 100


def test_none_is_the_identity():
    assert fit_calibration([0.1, -0.2], [1, 0], "none") == Calibration()


@pytest.mark.parametrize(
    ("scale", "bias", "chosen"),
    [(0.4, 0.0, "temperature"), (2.0, 0.0, "temperature"), (1.0, -1.5, "platt"), (0.6, 1.0, "platt")],
)
def test_auto_chooses_temperature_for_a_temperature_distortion_and_platt_for_a_shift(scale, bias, chosen):
    margins, labels = synthetic(1_500, scale, bias, seed=2)
    calibration, selection = choose_calibration(margins, labels, "auto", fitted_on="validation split")
    assert calibration.method == chosen and selection["chosen"] == chosen
    assert set(selection["cv_nll"]) == {"temperature", "platt"} and selection["folds"] == 5


def test_an_explicit_choice_is_kept():
    margins, labels = synthetic(500, 1.0, -1.5, seed=3)
    assert choose_calibration(margins, labels, "temperature")[0].method == "temperature"
    assert choose_calibration(margins, labels, "none")[0] == Calibration()


def test_cross_validation_scores_every_note_out_of_fold():
    margins, labels = synthetic(300, 1.0, 0.0, seed=4)
    nll = cross_validated_nll(margins, labels)
    assert all(values.shape == (300,) and (values > 0).all() for values in nll.values())
    # Fewer notes of a class than folds: as many folds as that class has notes.
    assert choose_calibration(margins[:12], np.array([1, 0] * 3 + [0] * 6), "auto")[1]["folds"] == 3


def test_renderings_of_one_record_stay_in_one_fold():
    margins, labels = synthetic(120, 1.0, 0.0, seed=5)
    records = np.arange(120)
    labels, records = np.tile(labels, 3), np.tile(records, 3)  # each record rendered in three styles
    folds = list(cv_folds(labels, 5, seed=0, groups=records))
    assert len(folds) == 5
    for fit_rows, held_rows in folds:
        assert not set(records[fit_rows]) & set(records[held_rows])
    nll = cross_validated_nll(np.tile(margins, 3), labels, groups=records)
    assert all(values.shape == (360,) for values in nll.values())


def test_calibration_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        fit_calibration([0.1, 0.2], [1, 1], "temperature")


def test_calibration_improves_a_distorted_model_on_fresh_notes():
    fit_margins, fit_labels = synthetic(2_000, 0.5, -0.8, seed=5)
    test_margins, test_labels = synthetic(2_000, 0.5, -0.8, seed=6)
    calibration, _ = choose_calibration(fit_margins, fit_labels, "auto")
    before = evaluate(test_labels, calibrated_probability(test_margins, Calibration()), {}, n_resamples=50)
    after = evaluate(test_labels, calibrated_probability(test_margins, calibration), {}, n_resamples=50)
    assert after["threshold_free"]["ece"]["value"] < before["threshold_free"]["ece"]["value"]
    assert after["threshold_free"]["calibration_slope"]["value"] == pytest.approx(1, abs=0.1)
    assert before["threshold_free"]["calibration_slope"]["value"] == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------- slope, CITL, ECE's chance level


def test_slope_and_citl_recover_a_known_miscalibration():
    # SYNTHETIC: the true logit is 0.3 + 0.6 * (the model's logit).
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 2, 50_000)
    labels = (rng.random(logits.size) < 1 / (1 + np.exp(-(0.3 + 0.6 * logits)))).astype(int)
    slope, citl = logistic_recalibration(labels, 1 / (1 + np.exp(-logits)))
    assert slope[0] == pytest.approx(0.6, abs=0.02)
    # CITL: the intercept with the logit as an offset, found here by a one-dimensional search.
    from scipy.optimize import minimize_scalar

    def nll(a):
        return -np.sum(labels * (a + logits) - np.logaddexp(0, a + logits))

    assert citl[0] == pytest.approx(minimize_scalar(nll).x, abs=1e-6)


def test_a_calibrated_model_has_slope_one_and_citl_zero():
    rng = np.random.default_rng(9)
    probabilities = rng.uniform(0.02, 0.98, 50_000)
    labels = (rng.random(probabilities.size) < probabilities).astype(int)
    slope, citl = logistic_recalibration(labels, probabilities)
    assert slope[0] == pytest.approx(1, abs=0.03) and citl[0] == pytest.approx(0, abs=0.03)


def test_slope_is_undefined_when_the_logits_separate_the_labels():
    slope, citl = logistic_recalibration([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert np.isnan(slope[0]) and np.isfinite(citl[0])
    report = evaluate([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], {}, n_resamples=20)
    assert report["threshold_free"]["calibration_slope"]["value"] is None  # JSON null, not NaN


def test_ece_chance_level_is_the_ece_of_a_perfectly_calibrated_model():
    # The figure: about 0.06 at n = 191 with 10 bins for typical probabilities.
    probabilities = np.random.default_rng(10).uniform(0, 1, 191)
    chance = ece_if_calibrated(probabilities, draws=1000, seed=0)
    assert 0.04 < chance["mean"] < 0.08 and chance["low"] < chance["mean"] < chance["high"]
    # It shrinks as 1 / sqrt(n).
    larger = ece_if_calibrated(np.tile(probabilities, 16), draws=200)
    assert larger["mean"] == pytest.approx(chance["mean"] / 4, rel=0.25)
    # Constant probabilities: one bin, ECE = |fraction drawn - p|, its mean known in closed form (binomial).
    from scipy.stats import binom

    n, p = 100, 0.3
    k = np.arange(n + 1)
    expected = float(np.sum(binom.pmf(k, n, p) * np.abs(k / n - p)))
    assert ece_if_calibrated(np.full(n, p), draws=20_000)["mean"] == pytest.approx(expected, rel=0.03)


def test_the_report_has_every_calibration_metric_with_a_ci():
    margins, labels = synthetic(400, 1.0, 0.0, seed=11)
    report = evaluate(labels, 1 / (1 + np.exp(-margins)), {"fixed-0.5": 0.5}, n_resamples=200)
    for name in ("brier", "ece", "calibration_slope", "calibration_in_the_large", "mean_minus_prevalence"):
        interval = report["threshold_free"][name]
        assert interval["low"] <= interval["value"] <= interval["high"], name
    assert report["threshold_free"]["mean_minus_prevalence"]["value"] == pytest.approx(
        np.mean(1 / (1 + np.exp(-margins))) - labels.mean()
    )
    assert {"mean", "low", "high", "draws", "seed"} <= set(report["reliability"]["ece_if_calibrated"])
