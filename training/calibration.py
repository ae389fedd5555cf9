"""Post-hoc calibration of the logit margin: temperature scaling or Platt scaling, chosen on held-out notes.

Both map the model's logit margin m = logit[emergency] - logit[non-emergency] to
P(emergency) = sigmoid(scale * m + bias) (`app.manifest.Calibration`, applied by `app.inference`):

- temperature scaling (Guo et al., ICML 2017): one parameter, scale = 1/T, bias 0; it sharpens or softens the
  model's confidence but keeps P = 0.5 at margin 0;
- Platt scaling (Platt, 1999): scale and bias, a logistic regression of the label on the margin; it also
  moves the probabilities up or down as a whole (a prevalence shift), at the price of a second parameter.

Each is fitted by minimising the negative log-likelihood (exactly: L-BFGS-B with analytic gradients on a
convex problem) with Platt's targets, (N+ + 1) / (N+ + 2) for emergencies and 1 / (N- + 2) for the others,
instead of 1 and 0: on notes the model separates perfectly the plain likelihood has no finite optimum, these
targets always do, and on a few hundred notes they change the fit very little.

`auto` chooses between the two by stratified k-fold cross-validation on the notes it is given (the
validation split): every note's NLL out of fold under each method; Platt is chosen only when its mean NLL is
lower than temperature's by more than one standard error of the paired per-note differences (the one-standard-
error rule: the simpler model unless the richer one is clearly better, as Platt's free intercept can overfit a
small split).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from app.manifest import Calibration
from training.config import CalibrationMethod

log = logging.getLogger(__name__)

FITTED = ("temperature", "platt")
FOLDS = 5
# Bounds of the fit, far beyond any sensible calibration: they only keep a degenerate input finite.
SCALE_BOUNDS = (1e-4, 1e3)
BIAS_BOUNDS = (-50.0, 50.0)


def margins_of(logits: np.ndarray) -> np.ndarray:
    """logit[emergency] - logit[non-emergency] of `[notes, 2]` logits."""
    logits = np.asarray(logits, dtype=np.float64)
    margins: np.ndarray = logits[:, 1] - logits[:, 0]
    return margins


def _sigmoid(z: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(z))
    result: np.ndarray = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    return result


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log(sigmoid(z)), without overflow."""
    result: np.ndarray = -np.logaddexp(0.0, -z)
    return result


def _checked(margins: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(margins, dtype=np.float64)
    y = np.asarray(labels)
    if m.ndim != 1 or m.shape != y.shape or m.size == 0:
        raise ValueError(f"margins and labels must be 1-D arrays of the same length, got {m.shape} and {y.shape}")
    if not np.isfinite(m).all():
        raise ValueError("margins must be finite")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must hold only 0 (non-emergency) and 1 (emergency)")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ValueError(f"calibration needs both emergencies and non-emergencies, got only class {y[0]}")
    return m, y


def platt_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's (1999) targets: (N+ + 1) / (N+ + 2) for an emergency, 1 / (N- + 2) for a non-emergency."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    targets: np.ndarray = np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    return targets


def negative_log_likelihood(margins: np.ndarray, targets: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """Per-note NLL of (soft) targets under P = sigmoid(scale * margin + bias)."""
    z = scale * margins + bias
    nll: np.ndarray = -(targets * _log_sigmoid(z) + (1 - targets) * _log_sigmoid(-z))
    return nll


def _fit(margins: np.ndarray, labels: np.ndarray, method: str) -> tuple[float, float]:
    targets = platt_targets(labels)
    with_bias = method == "platt"

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        scale, bias = params[0], params[1] if with_bias else 0.0
        z = scale * margins + bias
        residual = _sigmoid(z) - targets  # d NLL / d z
        value = float(np.mean(-(targets * _log_sigmoid(z) + (1 - targets) * _log_sigmoid(-z))))
        gradient = [np.mean(residual * margins)] + ([np.mean(residual)] if with_bias else [])
        return value, np.asarray(gradient)

    start = [1.0, 0.0] if with_bias else [1.0]
    bounds = [SCALE_BOUNDS, BIAS_BOUNDS] if with_bias else [SCALE_BOUNDS]
    result = minimize(
        objective, np.asarray(start), jac=True, method="L-BFGS-B", bounds=bounds, options={"gtol": 1e-10, "ftol": 0}
    )
    scale = float(result.x[0])
    bias = float(result.x[1]) if with_bias else 0.0
    return scale, bias


def fit_calibration(
    margins: Any, labels: Any, method: Literal["none", "temperature", "platt"], fitted_on: str | None = None
) -> Calibration:
    """The calibration of `method` fitted on (margin, label) pairs; `none` is the identity (plain softmax)."""
    m, y = _checked(margins, labels)
    if method == "none":
        return Calibration(method="none", fitted_on=None, notes=None)
    if method not in FITTED:
        raise ValueError(f"unknown calibration method {method!r}; choose none, temperature or platt")
    scale, bias = _fit(m, y, method)
    return Calibration(method=method, scale=scale, bias=bias, fitted_on=fitted_on, notes=int(m.size))


def cross_validated_nll(
    margins: Any, labels: Any, folds: int = FOLDS, seed: int = 0, groups: Any = None
) -> dict[str, np.ndarray]:
    """Every note's out-of-fold NLL (true 0/1 labels) under each fitted method, from stratified k-fold CV;
    `folds` shrinks to the size of the smaller class when that is smaller (at least 2). Notes sharing a group
    (renderings of one record) stay in one fold, so no fold is scored on a record it was fitted on."""
    m, y = _checked(margins, labels)
    k = max(2, min(folds, int(y.sum()), int(y.size - y.sum())))
    result = {method: np.zeros(m.size) for method in FITTED}
    for fit_rows, held_rows in cv_folds(y, k, seed, groups):
        if y[fit_rows].min() == y[fit_rows].max():  # only possible with a class of one note
            raise ValueError("calibration needs at least two notes of each class")
        for method in FITTED:
            scale, bias = _fit(m[fit_rows], y[fit_rows], method)
            result[method][held_rows] = negative_log_likelihood(m[held_rows], y[held_rows], scale, bias)
    return result


def cv_folds(labels: np.ndarray, k: int, seed: int, groups: Any = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(fitting rows, held-out rows) of stratified k-fold CV, keeping each group's notes in one fold."""
    if groups is None:
        return StratifiedKFold(k, shuffle=True, random_state=seed).split(labels, labels)
    return StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(labels, labels, groups)


def choose_calibration(
    margins: Any,
    labels: Any,
    choice: CalibrationMethod = "auto",
    fitted_on: str | None = None,
    folds: int = FOLDS,
    seed: int = 0,
    groups: Any = None,
) -> tuple[Calibration, dict[str, Any]]:
    """The calibration of `choice` fitted on all the notes given; `auto` picks temperature or Platt by
    cross-validation (see the module's docstring; `groups`: see `cross_validated_nll`). Returns (calibration,
    how it was chosen)."""
    m, y = _checked(margins, labels)
    selection: dict[str, Any] = {"asked": choice}
    if choice == "auto":
        nll = cross_validated_nll(m, y, folds, seed, groups)
        difference = nll["temperature"] - nll["platt"]  # > 0: Platt better on that note
        standard_error = float(difference.std(ddof=1) / np.sqrt(difference.size))
        improvement = float(difference.mean())
        method: Literal["none", "temperature", "platt"] = "platt" if improvement > standard_error else "temperature"
        selection |= {
            "chosen": method,
            "rule": "stratified k-fold cross-validated NLL on the fitting notes; Platt only when its mean NLL is "
            "lower than temperature's by more than one standard error of the paired per-note differences",
            "folds": max(2, min(folds, int(y.sum()), int(y.size - y.sum()))),
            "seed": seed,
            "cv_nll": {name: float(values.mean()) for name, values in nll.items()},
            "platt_improvement": improvement,
            "standard_error": standard_error,
        }
    else:
        method = choice
        selection["chosen"] = method
    calibration = fit_calibration(m, y, method, fitted_on)
    log.info(
        "calibration: %s (scale %.4f, bias %+.4f) on %d notes", method, calibration.scale, calibration.bias, m.size
    )
    return calibration, selection


def calibration_dict(calibration: Calibration) -> dict[str, Any]:
    """The calibration as stored in eval/metrics.json (`calibration`) and the manifest."""
    return calibration.model_dump(mode="json")
