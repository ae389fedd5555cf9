"""Clinical evaluation of an emergency classifier: metrics, bootstrap CIs, threshold policies.

Labels are 1 = emergency, 0 = non-emergency; `prob` is the model's P(emergency). A note is
predicted emergency when `prob >= threshold` (the convention of sklearn's `roc_curve`, so a
threshold chosen on a ROC curve reproduces that curve's sensitivity).

Discrimination and threshold metrics come from scikit-learn. The bootstrap scores all resamples at once by
laying them out as the columns of a multilabel problem, which sklearn's metrics score column by column; the
calibration metrics (Brier, ECE, calibration slope and calibration-in-the-large) are computed here, vectorized
over the same columns.

Calibration metrics, in the logistic recalibration framework (Cox 1958; Van Calster et al., "Calibration:
the Achilles heel of predictive analytics", BMC Medicine 2019), with x = logit(P):
- calibration slope: b of the logistic regression logit P(y = 1) = a + b * x; 1 is ideal, < 1 means the
  probabilities are too extreme (overfitting), > 1 too timid;
- calibration-in-the-large (CITL): a of logit P(y = 1) = a + x (x as an offset, slope fixed at 1); 0 is ideal,
  > 0 means the model under-predicts on average;
- mean P - prevalence: the same question on the probability scale (signed; 0 is ideal);
- ECE beside its chance level: the ECE a perfectly calibrated model would still show on this many notes with
  these probabilities (labels drawn as Bernoulli(P)), since ECE is biased upwards on small test sets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

logger = logging.getLogger(__name__)

THRESHOLD_FREE_METRICS = (
    "auroc",
    "auprc",
    "brier",
    "ece",
    "calibration_slope",
    "calibration_in_the_large",
    "mean_minus_prevalence",
)
CALIBRATION_METRICS = THRESHOLD_FREE_METRICS[2:]
THRESHOLD_METRICS = ("f1", "precision", "sensitivity", "specificity", "accuracy")
ECE_BINS = 10
ECE_CHANCE_DRAWS = 1000
# Probabilities are clipped to [eps, 1 - eps] before taking their logit (a float32 P can round to exactly 1).
LOGIT_EPS = 1e-7
NEWTON_STEPS = 100
NEWTON_TOLERANCE = 1e-10

THRESHOLD_POLICIES = {
    "prevalence": "the fraction of emergencies in the training labels (the original work's rule)",
    "fixed-0.5": "0.5, the usual cut-off for a probability",
    "target-sensitivity": (
        "the highest threshold whose sensitivity on the validation set reaches the target, "
        "so that at most the target's complement of emergencies is missed"
    ),
}

METRIC_LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "brier": "Brier score (lower is better)",
    "ece": f"ECE, {ECE_BINS} equal-width bins (lower is better)",
    "calibration_slope": "Calibration slope (1 is ideal)",
    "calibration_in_the_large": "Calibration-in-the-large, logit scale (0 is ideal)",
    "mean_minus_prevalence": "Mean P(emergency) - prevalence (0 is ideal)",
    "f1": "F1",
    "precision": "Precision (PPV)",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "accuracy": "Accuracy",
}


# ---------------------------------------------------------------- input checks


def _as_labels(y_true, name: str = "y_true") -> np.ndarray:
    labels = np.asarray(y_true)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 (non-emergency) and 1 (emergency), got {np.unique(labels)[:10]}")
    return labels.astype(np.int64)


def _as_probabilities(prob, n: int, name: str = "prob") -> np.ndarray:
    probabilities = np.asarray(prob, dtype=np.float64)
    if probabilities.shape != (n,):
        raise ValueError(f"{name} must be a 1-D array of {n} probabilities (one per label), got {probabilities.shape}")
    if not (np.isfinite(probabilities).all() and (probabilities >= 0).all() and (probabilities <= 1).all()):
        raise ValueError(f"{name} must hold finite probabilities in [0, 1]")
    return probabilities


def _require_both_classes(labels: np.ndarray, name: str = "y_true") -> None:
    if labels.min() == labels.max():
        raise ValueError(
            f"{name} holds only class {labels[0]} ({labels.size} rows): "
            "AUROC, AUPRC, sensitivity and specificity need both emergencies and non-emergencies"
        )


def _check_threshold(threshold: float, name: str = "threshold") -> float:
    if not (np.isfinite(threshold) and 0 <= threshold <= 1):
        raise ValueError(f"{name} must be a probability in [0, 1], got {threshold}")
    return float(threshold)


def checked_inputs(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_labels(y_true)
    _require_both_classes(labels)
    return labels, _as_probabilities(prob, labels.size)


# ---------------------------------------------------------------- point metrics


def reliability_bins(y_true, prob) -> list[dict[str, float]]:
    """The non-empty bins of a reliability diagram with `ECE_BINS` equal-width bins on [0, 1].

    Bins are those of sklearn's `calibration_curve(strategy="uniform")`: right-closed, the first
    one also holding 0 (a probability of exactly 0.1 falls in the first bin).
    """
    labels = _as_labels(y_true)
    probabilities = _as_probabilities(prob, labels.size)
    fraction_positive, mean_predicted = calibration_curve(labels, probabilities, n_bins=ECE_BINS, strategy="uniform")
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    bin_ids = np.searchsorted(edges[1:-1], probabilities)  # the same assignment calibration_curve makes
    counts = np.bincount(bin_ids, minlength=ECE_BINS)
    occupied = np.flatnonzero(counts)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "count": int(counts[b]),
            "mean_predicted": float(predicted),
            "fraction_positive": float(observed),
        }
        for b, predicted, observed in zip(occupied, mean_predicted, fraction_positive, strict=True)
    ]


def expected_calibration_error(y_true, prob) -> float:
    """ECE: |fraction of emergencies - mean probability| per bin, averaged weighted by bin size.

    Uses `ECE_BINS` (10) equal-width bins on [0, 1], binned as in `reliability_bins`.
    """
    bins = reliability_bins(y_true, prob)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["fraction_positive"] - b["mean_predicted"]) for b in bins))


def _logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities, LOGIT_EPS, 1 - LOGIT_EPS)
    logit: np.ndarray = np.log(p) - np.log1p(-p)
    return logit


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    result: np.ndarray = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    return result


def logistic_recalibration(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """(calibration slope, calibration-in-the-large) of each column of `[n, k]` labels and probabilities
    (1-D inputs are one column), by Newton's method on all columns at once.

    The slope is NaN for a column where it has no finite maximum-likelihood value (the logits separate the
    labels perfectly) or Newton's method does not converge.
    """
    y = np.asarray(labels, dtype=np.float64)
    x = _logit(np.asarray(probabilities, dtype=np.float64))
    if y.ndim == 1:
        y, x = y[:, None], x[:, None]
    columns = y.shape[1]
    # Slope: logit P(y) = a + b x, from the perfectly calibrated a = 0, b = 1.
    a, b = np.zeros(columns), np.ones(columns)
    converged = np.zeros(columns, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(NEWTON_STEPS):
            mu = _sigmoid(a + b * x)
            w, r = mu * (1 - mu), y - mu
            g_a, g_b = r.sum(axis=0), (r * x).sum(axis=0)
            h_aa, h_ab, h_bb = w.sum(axis=0), (w * x).sum(axis=0), (w * x * x).sum(axis=0)
            det = h_aa * h_bb - h_ab**2
            step_a, step_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
            active = ~converged & np.isfinite(step_a) & np.isfinite(step_b)
            a, b = np.where(active, a + step_a, a), np.where(active, b + step_b, b)
            converged |= active & (np.maximum(np.abs(step_a), np.abs(step_b)) < NEWTON_TOLERANCE * (1 + np.abs(b)))
            if converged.all():
                break
        slope = np.where(converged & np.isfinite(b), b, np.nan)
        # CITL: logit P(y) = a + x (x an offset): finite whenever both classes are present.
        citl = np.zeros(columns)
        for _ in range(NEWTON_STEPS):
            mu = _sigmoid(citl + x)
            step = (y - mu).sum(axis=0) / np.maximum((mu * (1 - mu)).sum(axis=0), 1e-300)
            step = np.clip(step, -5, 5)  # far-off starts (probabilities of 0 or 1) take several bounded steps
            citl += step
            if (np.abs(step) < NEWTON_TOLERANCE).all():
                break
    return slope, citl


def _bin_ids(probabilities: np.ndarray) -> np.ndarray:
    """The reliability bin of each probability, as `reliability_bins` (and sklearn's calibration_curve) assign."""
    bin_ids: np.ndarray = np.searchsorted(np.linspace(0.0, 1.0, ECE_BINS + 1)[1:-1], probabilities)
    return bin_ids


def _column_ece(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """ECE of each column of `[n, k]` labels and probabilities: sum over bins of |emergencies - sum of P| / n."""
    n, columns = labels.shape
    flat = _bin_ids(probabilities) * columns + np.arange(columns)
    gaps = np.bincount(flat.ravel(), weights=(labels - probabilities).ravel(), minlength=ECE_BINS * columns)
    ece: np.ndarray = np.abs(gaps.reshape(ECE_BINS, columns)).sum(axis=0) / n
    return ece


def _threshold_free(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    slope, citl = logistic_recalibration(labels, probabilities)
    return {
        "auroc": float(roc_auc_score(labels, probabilities)),
        "auprc": float(average_precision_score(labels, probabilities)),
        "brier": float(brier_score_loss(labels, probabilities)),
        "ece": expected_calibration_error(labels, probabilities),
        "calibration_slope": float(slope[0]),
        "calibration_in_the_large": float(citl[0]),
        "mean_minus_prevalence": float(probabilities.mean() - labels.mean()),
    }


def ece_if_calibrated(prob, draws: int = ECE_CHANCE_DRAWS, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """The ECE of a perfectly calibrated model with these probabilities on this many notes: labels drawn as
    Bernoulli(P), `draws` times. Returns {mean, low, high (the central `level` interval), draws, seed}."""
    probabilities = np.asarray(prob, dtype=np.float64)
    _as_probabilities(probabilities, probabilities.size)
    rng = np.random.default_rng(seed)
    labels = (rng.random((probabilities.size, draws)) < probabilities[:, None]).astype(np.float64)
    ece = _column_ece(labels, np.broadcast_to(probabilities[:, None], labels.shape))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(ece, [tail, 100 - tail])
    return {"mean": float(ece.mean()), "low": float(low), "high": float(high), "draws": draws, "seed": seed}


def _at_threshold(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (probabilities >= threshold).astype(np.int64)
    return {
        # zero_division=0: with no predicted emergency, precision and F1 count as 0, not as undefined.
        "f1": float(f1_score(labels, predicted, zero_division=0.0)),
        "precision": float(precision_score(labels, predicted, zero_division=0.0)),
        "sensitivity": float(recall_score(labels, predicted, pos_label=1)),
        "specificity": float(recall_score(labels, predicted, pos_label=0)),
        "accuracy": float(accuracy_score(labels, predicted)),
    }


def compute_metrics(y_true, prob, threshold: float) -> dict[str, float]:
    """All metrics of one set of predictions: the threshold-free ones, those at `threshold`, n, prevalence.

    Raises ValueError when `y_true` holds a single class (AUROC and friends are undefined).
    """
    labels, probabilities = checked_inputs(y_true, prob)
    threshold = _check_threshold(threshold)
    return {
        **_threshold_free(labels, probabilities),
        **_at_threshold(labels, probabilities, threshold),
        "n": float(labels.size),
        "prevalence": float(labels.mean()),
    }


def confusion_counts(y_true, prob, threshold: float) -> dict[str, int]:
    """True/false negatives/positives at `threshold` (positive = emergency)."""
    labels, probabilities = checked_inputs(y_true, prob)
    predicted = (probabilities >= _check_threshold(threshold)).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


# ---------------------------------------------------------------- threshold policies


def choose_threshold(
    policy: str,
    *,
    train_labels=None,
    valid_labels=None,
    valid_prob=None,
    target_sensitivity: float = 0.95,
) -> float:
    """The decision threshold of a policy (see `THRESHOLD_POLICIES`)."""
    if policy not in THRESHOLD_POLICIES:
        raise ValueError(f"unknown threshold policy {policy!r}; valid policies: {', '.join(THRESHOLD_POLICIES)}")
    if policy == "fixed-0.5":
        return 0.5
    if policy == "prevalence":
        if train_labels is None:
            raise ValueError("the 'prevalence' policy needs train_labels")
        labels = _as_labels(train_labels, "train_labels")
        _require_both_classes(labels, "train_labels")
        return float(labels.mean())
    if valid_labels is None or valid_prob is None:
        raise ValueError("the 'target-sensitivity' policy needs valid_labels and valid_prob")
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    labels = _as_labels(valid_labels, "valid_labels")
    _require_both_classes(labels, "valid_labels")
    probabilities = _as_probabilities(valid_prob, labels.size, "valid_prob")
    # Keep every threshold: dropping collinear points could skip the first one that reaches the target.
    _, sensitivity, thresholds = roc_curve(labels, probabilities, drop_intermediate=False)
    # Thresholds decrease as sensitivity rises, so the first one reaching the target is the highest.
    return float(thresholds[np.argmax(sensitivity >= target_sensitivity)])


# ---------------------------------------------------------------- bootstrap


def _resample_indices(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Row indices `[n_resamples, n]` of bootstrap resamples, each holding both classes.

    A resample with a single class has no AUROC; it is redrawn, and the redraws are counted.
    """
    n = labels.size
    indices = rng.integers(0, n, size=(n_resamples, n))
    redrawn = 0
    while True:
        positives = labels[indices].sum(axis=1)
        one_class = (positives == 0) | (positives == n)
        if not one_class.any():
            return indices, redrawn
        redrawn += int(one_class.sum())
        indices[one_class] = rng.integers(0, n, size=(int(one_class.sum()), n))


def _resampled_threshold_free(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold-free metrics of every resample; inputs are `[n, n_resamples]`, one resample per column."""
    slope, citl = logistic_recalibration(labels, probabilities)
    return {
        "auroc": roc_auc_score(labels, probabilities, average=None),
        "auprc": average_precision_score(labels, probabilities, average=None),
        # brier_score_loss and calibration_curve have no multilabel mode: computed here, column by column at once.
        "brier": ((probabilities - labels) ** 2).mean(axis=0),
        "ece": _column_ece(labels, probabilities),
        "calibration_slope": slope,
        "calibration_in_the_large": citl,
        "mean_minus_prevalence": probabilities.mean(axis=0) - labels.mean(axis=0),
    }


def _resampled_at_threshold(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Metrics at `threshold` of every resample; inputs are `[n, n_resamples]`, one resample per column."""
    predicted = (probabilities >= threshold).astype(np.int64)
    return {
        "f1": f1_score(labels, predicted, average=None, zero_division=0.0),
        "precision": precision_score(labels, predicted, average=None, zero_division=0.0),
        "sensitivity": recall_score(labels, predicted, average=None),
        # Multilabel mode ignores pos_label: the specificity is the sensitivity of the flipped labels.
        "specificity": recall_score(1 - labels, 1 - predicted, average=None),
        # accuracy_score of a multilabel problem is the exact-match ratio over all columns, not per column.
        "accuracy": np.array([accuracy_score(labels[:, c], predicted[:, c]) for c in range(labels.shape[1])]),
    }


def resample_indices(y_true, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Row indices `[n_resamples, n]` of seeded bootstrap resamples of `y_true`, each holding both classes:
    draw them once to score several models on the same resamples (paired comparisons)."""
    labels = _as_labels(y_true)
    _require_both_classes(labels)
    _check_bootstrap_options(n_resamples, 0.95)
    return _resample_indices(labels, n_resamples, np.random.default_rng(seed))[0]


def resampled_metrics(y_true, prob, threshold: float, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of `compute_metrics` (but n and prevalence) on each resample of `indices`: arrays of
    length `n_resamples`."""
    labels, probabilities = checked_inputs(y_true, prob)
    threshold = _check_threshold(threshold)
    resampled_labels, resampled_probabilities = labels[indices].T, probabilities[indices].T
    return {
        **_resampled_threshold_free(resampled_labels, resampled_probabilities),
        **_resampled_at_threshold(resampled_labels, resampled_probabilities, threshold),
    }


def _interval(point: float, resampled: np.ndarray, level: float) -> dict[str, Any]:
    """{value, low, high}; a metric undefined on some resamples (the calibration slope of a resample whose logits
    separate the labels) takes its CI from the others and says how many were left out (`undefined`); an
    undefined value or bound is None."""
    tail = 100 * (1 - level) / 2
    defined = resampled[np.isfinite(resampled)]
    low, high = np.percentile(defined, [tail, 100 - tail]) if defined.size else (np.nan, np.nan)
    interval: dict[str, Any] = {
        "value": _finite_or_none(point),
        "low": _finite_or_none(low),
        "high": _finite_or_none(high),
    }
    if defined.size < resampled.size:
        interval["undefined"] = int(resampled.size - defined.size)
    return interval


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _check_bootstrap_options(n_resamples: int, level: float) -> None:
    # Multilabel scoring needs at least two columns; a CI from fewer resamples means nothing anyway.
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be at least 2, got {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _bootstrap(
    labels: np.ndarray,
    probabilities: np.ndarray,
    thresholds: Mapping[str, float],
    n_resamples: int,
    seed: int,
    level: float,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]], int]:
    """Percentile CIs of the threshold-free metrics and of the metrics at each threshold.

    All thresholds are scored on the same resamples. Returns (threshold-free CIs, CIs per
    threshold name, number of one-class resamples redrawn).
    """
    indices, redrawn = _resample_indices(labels, n_resamples, np.random.default_rng(seed))
    resampled_labels, resampled_probabilities = labels[indices].T, probabilities[indices].T

    point = _threshold_free(labels, probabilities)
    resampled = _resampled_threshold_free(resampled_labels, resampled_probabilities)
    threshold_free = {m: _interval(point[m], resampled[m], level) for m in THRESHOLD_FREE_METRICS}

    per_threshold = {}
    for name, threshold in thresholds.items():
        point = _at_threshold(labels, probabilities, threshold)
        resampled = _resampled_at_threshold(resampled_labels, resampled_probabilities, threshold)
        per_threshold[name] = {m: _interval(point[m], resampled[m], level) for m in THRESHOLD_METRICS}
    return threshold_free, per_threshold, redrawn


def bootstrap_ci(
    y_true, prob, threshold: float, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict]:
    """Percentile bootstrap CIs: each metric of `compute_metrics` but n and prevalence -> {value, low, high}.

    The same seed gives the same output. Resamples with a single class are redrawn (logged).
    """
    labels, probabilities = checked_inputs(y_true, prob)
    threshold = _check_threshold(threshold)
    _check_bootstrap_options(n_resamples, level)
    threshold_free, per_threshold, redrawn = _bootstrap(
        labels, probabilities, {"threshold": threshold}, n_resamples, seed, level
    )
    logger.info("bootstrap: %d resamples, %d one-class resamples redrawn", n_resamples, redrawn)
    return {**threshold_free, **per_threshold["threshold"]}


# ---------------------------------------------------------------- the report


def evaluate(
    y_true, prob, thresholds: Mapping[str, float], n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """A JSON-serializable evaluation report.

    `thresholds` maps a threshold policy name (see `THRESHOLD_POLICIES`; other names are allowed)
    to its threshold. The report holds the counts, the threshold-free metrics with CIs, per
    threshold the metrics with CIs and the confusion counts, the reliability-diagram bins, and the
    bootstrap settings.
    """
    labels, probabilities = checked_inputs(y_true, prob)
    thresholds = {name: _check_threshold(t, f"threshold {name!r}") for name, t in thresholds.items()}
    _check_bootstrap_options(n_resamples, level)
    threshold_free, per_threshold, redrawn = _bootstrap(labels, probabilities, thresholds, n_resamples, seed, level)
    return {
        "counts": {
            "n": int(labels.size),
            "n_emergency": int(labels.sum()),
            "n_non_emergency": int(labels.size - labels.sum()),
            "prevalence": float(labels.mean()),
        },
        "threshold_free": threshold_free,
        "thresholds": {
            name: {
                "threshold": threshold,
                "description": THRESHOLD_POLICIES.get(name, "a threshold given by the caller"),
                "metrics": per_threshold[name],
                "confusion_matrix": confusion_counts(labels, probabilities, threshold),
            }
            for name, threshold in thresholds.items()
        },
        "reliability": {
            "n_bins": ECE_BINS,
            "bins": reliability_bins(labels, probabilities),
            # What ECE to expect from a perfectly calibrated model with these probabilities on this many notes.
            "ece_if_calibrated": ece_if_calibrated(probabilities, seed=seed, level=level),
        },
        "bootstrap": {
            "method": "percentile",
            "n_resamples": n_resamples,
            "seed": seed,
            "level": level,
            "one_class_resamples_redrawn": redrawn,
        },
    }
