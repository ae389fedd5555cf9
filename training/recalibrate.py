"""Recalibrate a model bundle for a new site, without retraining: `python -m training recalibrate`.

Prevalence and practice differ between hospitals (and between adult and pediatric EDs), so a model's
probabilities and its threshold seldom carry over as they are. From a site's own labelled notes this:

1. scores every note with the bundle through the service's own path (`app.inference.NoteClassifier` on the
   fp32 variant, CPU): the logit margins, before any calibration;
2. splits the notes, stratified and seeded, into a fit part (60% by default) and a check part;
3. on the fit part, fits the calibration (`training.calibration`: temperature or Platt, chosen by
   cross-validation, or the one asked for) and then the threshold policy on the calibrated probabilities;
4. on the check part, measures before (the bundle's own calibration and threshold) and after (the new ones):
   AUROC, sensitivity, specificity, ECE (beside its chance level), Brier, calibration slope and
   calibration-in-the-large, each with a bootstrap CI;
5. writes a new bundle: the same ONNX and tokenizer files (copied byte for byte, so their sha256 in the
   manifest still hold), a manifest with a new version, the new `calibration` and `decision`, and
   `recalibration` (the site data's name, sha256 and size, the split, the before/after metrics), and the model
   card with a *Site recalibration* section. The service serves it unchanged.

The bundle is built in a temporary sibling directory, loaded back as the service loads it, and only then
renamed into place.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from app.bundle import CPU, MANIFEST_FILE, load_bundle, sha256_file
from app.inference import NoteClassifier, calibrated_probability
from app.manifest import Calibration, Decision, Manifest, Recalibration
from training.calibration import calibration_dict, choose_calibration
from training.config import CalibrationMethod, DataArguments, ThresholdPolicy
from training.data.examples import Examples
from training.data.ktas import BUNDLED_KTAS
from training.data.loading import load_examples
from training.evaluate import THRESHOLD_POLICIES, choose_threshold, evaluate
from training.model_card import recalibrated_card

log = logging.getLogger(__name__)

MODEL_CARD_FILE = "MODEL_CARD.md"
FIT_FRACTION = 0.6
# Below this many notes of a class, neither the fit nor the check part would say anything reliable.
MIN_PER_CLASS = 20
SUMMARY_METRICS = (
    "auroc",
    "sensitivity",
    "specificity",
    "precision",
    "ece",
    "brier",
    "calibration_slope",
    "calibration_in_the_large",
    "mean_minus_prevalence",
)
BEFORE = "bundle"


class RecalibrationError(RuntimeError):
    """Recalibration cannot go on; the message says why."""


@dataclass(frozen=True)
class RecalibrationOptions:
    threshold_policy: ThresholdPolicy = "target-sensitivity"
    target_sensitivity: float = 0.95
    calibration: CalibrationMethod = "auto"
    fit_fraction: float = FIT_FRACTION
    seed: int = 0
    bootstrap: int = 1000
    min_per_class: int = MIN_PER_CLASS

    def __post_init__(self) -> None:
        if not 0 < self.fit_fraction < 1:
            raise RecalibrationError(f"--fit-fraction must be in (0, 1), got {self.fit_fraction}")
        if not 0 < self.target_sensitivity <= 1:
            raise RecalibrationError(f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}")
        if self.bootstrap < 2:
            raise RecalibrationError(f"--bootstrap must be at least 2, got {self.bootstrap}")


def recalibrate_bundle(
    bundle_dir: str | Path,
    data: DataArguments,
    out_dir: str | Path,
    options: RecalibrationOptions | None = None,
    version: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the bundle at `bundle_dir` recalibrated on the labelled notes of `data` to `out_dir`; returns it."""
    options = options or RecalibrationOptions()
    source, out_dir = Path(bundle_dir), Path(out_dir)
    if out_dir.resolve() == source.resolve():
        raise RecalibrationError(f"{out_dir}: is the source bundle; write the recalibrated bundle elsewhere")
    if out_dir.exists() and not overwrite:
        raise RecalibrationError(f"{out_dir}: already exists; remove it, choose another --out, or pass --overwrite")
    bundle = load_bundle(source, variant="fp32", providers=[CPU])  # verifies every listed file's sha256
    data_file = Path(BUNDLED_KTAS) if data.data == "ktas" else Path(data.data)
    examples = load_examples(data)
    _check_counts(examples, options.min_per_class)

    classifier = NoteClassifier.from_bundle(bundle)
    margins = classifier.predict_margins(examples.texts).astype(np.float64)
    fit_rows, check_rows = train_test_split(
        np.arange(len(examples)),
        train_size=options.fit_fraction,
        stratify=examples.labels,
        random_state=options.seed,
    )
    fit_rows, check_rows = np.sort(fit_rows), np.sort(check_rows)
    labels = examples.labels
    log.info(
        "site data: %d notes (%.1f%% emergency); fitting on %d, checking on %d",
        len(examples),
        100 * labels.mean(),
        fit_rows.size,
        check_rows.size,
    )

    old = bundle.manifest
    calibration, selection = choose_calibration(
        margins[fit_rows], labels[fit_rows], options.calibration, fitted_on=f"site data {data_file.name} (fit part)"
    )
    fit_prob = calibrated_probability(margins[fit_rows], calibration)
    thresholds = {
        policy: choose_threshold(
            policy,
            train_labels=labels[fit_rows],
            valid_labels=labels[fit_rows],
            valid_prob=fit_prob,
            target_sensitivity=options.target_sensitivity,
        )
        for policy in THRESHOLD_POLICIES
    }
    decision = Decision(
        threshold=thresholds[options.threshold_policy],
        policy=options.threshold_policy,
        target_sensitivity=options.target_sensitivity if options.threshold_policy == "target-sensitivity" else None,
    )

    check_labels = labels[check_rows]
    before_report = evaluate(
        check_labels,
        calibrated_probability(margins[check_rows], old.calibration),
        {BEFORE: old.decision.threshold},
        options.bootstrap,
        options.seed,
    )
    after_report = evaluate(
        check_labels,
        calibrated_probability(margins[check_rows], calibration),
        thresholds,
        options.bootstrap,
        options.seed,
    )
    before = _summary(before_report, BEFORE, old.calibration, old.decision.policy)
    after = _summary(after_report, options.threshold_policy, calibration, options.threshold_policy)
    data_sha256 = sha256_file(data_file)
    recalibration = Recalibration(
        source_version=old.version,
        data_file=data_file.name,
        data_sha256=data_sha256,
        notes=len(examples),
        fit_notes=int(fit_rows.size),
        check_notes=int(check_rows.size),
        prevalence=float(labels.mean()),
        split_seed=options.seed,
        calibration_selection=selection,
        before=before,
        after=after,
    )
    separator = "." if "+" in old.version else "+"
    manifest = Manifest.model_validate(
        {
            **old.model_dump(mode="json"),
            "version": version or f"{old.version}{separator}site.{data_sha256[:8]}",
            "created_at": datetime.now(UTC),
            "calibration": calibration_dict(calibration),
            "decision": decision.model_dump(mode="json"),
            "recalibration": recalibration.model_dump(mode="json"),
        }
    )
    _write(source, out_dir, manifest, overwrite, check_texts=[examples.texts[i] for i in check_rows[:16]])
    _log_summary(before, after)
    return out_dir


def _check_counts(examples: Examples, min_per_class: int) -> None:
    emergencies = int(examples.labels.sum())
    counts = {"emergency": emergencies, "non-emergency": len(examples) - emergencies}
    short = {name: count for name, count in counts.items() if count < min_per_class}
    if short:
        raise RecalibrationError(
            f"{examples.source}: too few labelled notes to recalibrate on: "
            + ", ".join(f"{count} {name}" for name, count in short.items())
            + f"; at least {min_per_class} of each class are needed (a part is fitted on, the rest checks it)"
        )


def _summary(report: dict, threshold_name: str, calibration: Calibration, policy: str) -> dict[str, Any]:
    """The check-part figures kept in the manifest: metrics with CIs at the threshold, ECE's chance level."""
    at_threshold = report["thresholds"][threshold_name]
    metrics = {**report["threshold_free"], **at_threshold["metrics"]}
    summary: dict[str, Any] = {
        "calibration": calibration_dict(calibration),
        "policy": policy,
        "threshold": at_threshold["threshold"],
        "metrics": {name: metrics[name] for name in SUMMARY_METRICS},
        "confusion_matrix": at_threshold["confusion_matrix"],
        "ece_if_calibrated": report["reliability"]["ece_if_calibrated"],
        "counts": report["counts"],
        "bootstrap": {k: report["bootstrap"][k] for k in ("method", "n_resamples", "seed", "level")},
    }
    if threshold_name != BEFORE:
        summary["policies"] = {
            name: {
                "threshold": policy_report["threshold"],
                "sensitivity": policy_report["metrics"]["sensitivity"],
                "specificity": policy_report["metrics"]["specificity"],
            }
            for name, policy_report in report["thresholds"].items()
        }
    return summary


def _write(source: Path, out_dir: Path, manifest: Manifest, overwrite: bool, check_texts: list[str]) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        files = [v.file for v in manifest.variants.values() if v.kept] + list(manifest.tokenizer_files)
        for name in files:
            shutil.copy2(source / name, staging / name)
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        card = source / MODEL_CARD_FILE
        old_card = card.read_text(encoding="utf-8") if card.is_file() else f"# {manifest.name}\n"
        (staging / MODEL_CARD_FILE).write_text(recalibrated_card(old_card, manifest), encoding="utf-8")
        _verify(staging, manifest, check_texts)
        staging.chmod(0o755)  # mkdtemp makes it private; the service may run as another user
        if out_dir.exists():
            if not overwrite:  # appeared meanwhile
                raise RecalibrationError(f"{out_dir}: already exists")
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundle %s %s written to %s", manifest.name, manifest.version, out_dir)


def _verify(staging: Path, manifest: Manifest, texts: list[str]) -> None:
    """The new bundle loads as the service loads it and serves the new calibration."""
    loaded = load_bundle(staging, variant="fp32", providers=[CPU])
    if loaded.manifest != manifest:
        raise RecalibrationError("the written manifest does not read back as written")
    classifier = NoteClassifier.from_bundle(loaded)
    expected = calibrated_probability(classifier.predict_margins(texts), manifest.calibration)
    if not np.allclose(classifier.predict_proba(texts), expected, atol=1e-6):
        raise RecalibrationError("the recalibrated bundle does not apply its calibration")


def _log_summary(before: dict[str, Any], after: dict[str, Any]) -> None:
    for name in SUMMARY_METRICS:
        b, a = before["metrics"][name], after["metrics"][name]
        log.info("check part %-26s before %s  after %s", name, _fmt(b), _fmt(a))


def _fmt(metric: dict[str, Any]) -> str:
    def number(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    return f"{number(metric['value'])} [{number(metric['low'])}, {number(metric['high'])}]"
