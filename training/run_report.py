"""Evaluate a run's best checkpoint on its test set: thresholds, metrics with bootstrap CIs, report and plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from app.inference import calibrated_probability
from training.calibration import calibration_dict, choose_calibration, margins_of
from training.config import THRESHOLD_POLICIES, DataArguments, EvalArguments, RenderStyle, SelectMetric
from training.data.examples import Examples
from training.data.loading import load_examples, load_parts
from training.data.render import calibration_examples
from training.evaluate import choose_threshold, evaluate
from training.modeling import load_student, load_tokenizer, to_device
from training.predict import predict_proba
from training.report import write_report
from training.run_dir import RunDirectory

log = logging.getLogger(__name__)


def evaluate_run(
    run: RunDirectory,
    eval_args: EvalArguments,
    parts: dict[str, Examples] | None = None,
    metric: SelectMetric = "auroc",
    device: torch.device | str = "cpu",
    external: DataArguments | None = None,
    render: RenderStyle | None = None,
) -> dict[str, Any]:
    """Thresholds come from the run's own train/valid data; the test set is the run's test split, or every
    row of `external`. Writes `<run>/eval/` (or `eval-external/`), with `predictions.csv` (row id, label,
    P(emergency); no text). For the run's own test split the report records the decision threshold
    (`decision`, see `RunDirectory.decision`). With `render` (KTAS runs), the run's own split is rendered in that
    style (a fixed seeded draw) and the report goes to `eval-render-STYLE/`, without a decision. Returns the report."""
    config = run.read_config()
    if render:
        parts = load_parts(run.data_arguments(render=render))
    elif parts is None:
        parts = load_parts(run.data_arguments())
    test = load_examples(external) if external else parts["test"]
    max_length = run.model_arguments().max_length
    checkpoint = run.checkpoint(metric)
    model = to_device(load_student(str(checkpoint)), device)
    tokenizer = load_tokenizer(str(checkpoint))
    valid = calibration_examples(parts["valid"])
    _, valid_logits = predict_proba(model, tokenizer, valid.texts, 64, max_length, device)
    raw_test_prob, test_logits = predict_proba(model, tokenizer, test.texts, 64, max_length, device)
    # Calibration is fitted on the validation split, then applied to validation and test as the service applies it
    # (app.inference); thresholds are chosen on the calibrated validation probabilities.
    valid_margins, test_margins = margins_of(valid_logits), margins_of(test_logits)
    calibration, selection = choose_calibration(
        valid_margins,
        valid.labels,
        eval_args.calibration,
        fitted_on="validation split" if valid is parts["valid"] else "validation split, every record in every style",
        groups=valid.row_ids,
    )
    valid_prob = calibrated_probability(valid_margins, calibration)
    test_prob = calibrated_probability(test_margins, calibration)

    thresholds: dict[str, float] = {
        policy: choose_threshold(
            policy,
            train_labels=parts["train"].labels,
            valid_labels=valid.labels,
            valid_prob=valid_prob,
            target_sensitivity=eval_args.target_sensitivity,
        )
        for policy in THRESHOLD_POLICIES
    }
    report = evaluate(test.labels, test_prob, thresholds, eval_args.bootstrap, eval_args.bootstrap_seed)
    report["checkpoint"] = {"metric": metric, "path": run.relative(checkpoint)}
    # The model's own softmax on the same test notes and bootstrap resamples: calibration before and after.
    uncalibrated = evaluate(test.labels, raw_test_prob, {}, eval_args.bootstrap, eval_args.bootstrap_seed)
    report["uncalibrated"] = {
        "threshold_free": uncalibrated["threshold_free"],
        "reliability": uncalibrated["reliability"],
    }
    report["calibration"] = calibration_dict(calibration)  # read by the export into the manifest
    report["calibration_selection"] = selection
    if render:
        report["render"] = {"style": render, "seed": run.data_arguments().render_seed}
    if not external and not render:
        report["decision"] = {
            "policy": eval_args.threshold_policy,
            "threshold": thresholds[eval_args.threshold_policy],
            "target_sensitivity": eval_args.target_sensitivity,
        }
    title = f"{config['training']['method']} - {Path(config['model']['student']).name} - "
    title += f"external: {Path(test.source).name}" if external else "test split"
    title += f", rendered {render}" if render else ""
    out = run.eval_dir(external=external is not None, render=render)
    write_report(report, test.labels, test_prob, out, title)
    # Row ids, not text: lets runs be compared paired on the same notes (see experiments/).
    pd.DataFrame({"row_id": test.row_ids, "label": test.labels, "p_emergency": test_prob}).to_csv(
        run.predictions_file(external=external is not None, render=render), index=False
    )
    log.info("test report written to %s", out)
    return report
