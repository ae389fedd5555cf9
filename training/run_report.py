"""Evaluate a run's best checkpoint on its test set: thresholds, metrics with bootstrap CIs, report and plots."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from training.checkpoints import checkpoint_dir
from training.config import DataArguments, EvalArguments, ModelArguments
from training.data.examples import Examples
from training.data.loading import load_examples, load_parts
from training.evaluate import choose_threshold, evaluate
from training.report import write_report
from training.modeling import load_student, load_tokenizer
from training.predict import predict_proba

log = logging.getLogger(__name__)
THRESHOLD_POLICIES = ("prevalence", "fixed-0.5", "target-sensitivity")
PREDICTIONS_FILE = "predictions.csv"


def load_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no run_config.json)")
    return json.loads(path.read_text())


def evaluate_run(
    run_dir: Path,
    eval_args: EvalArguments,
    parts: dict[str, Examples] | None = None,
    metric: str = "auroc",
    device: torch.device | str = "cpu",
    external: DataArguments | None = None,
) -> dict:
    """Thresholds come from the run's own train/valid data; the test set is the run's test split, or every
    row of `external`. Writes `<run>/eval/` (or `eval-external/`), with `predictions.csv` (row id, label,
    P(emergency); no text), and, for the run's own test split, records the decision threshold in the
    checkpoint. Returns the report."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    if parts is None:
        parts = load_parts(DataArguments(**{**config["data"], "split_file": str(run_dir / "split.json")}))
    test = load_examples(external) if external else parts["test"]
    max_length = ModelArguments(**config["model"]).max_length
    checkpoint = checkpoint_dir(run_dir, metric)
    model = load_student(str(checkpoint)).to(device)
    tokenizer = load_tokenizer(str(checkpoint))
    valid_prob, _ = predict_proba(model, tokenizer, parts["valid"].texts, 64, max_length, device)
    test_prob, _ = predict_proba(model, tokenizer, test.texts, 64, max_length, device)

    thresholds = {
        policy: choose_threshold(
            policy,
            train_labels=parts["train"].labels,
            valid_labels=parts["valid"].labels,
            valid_prob=valid_prob,
            target_sensitivity=eval_args.target_sensitivity,
        )
        for policy in THRESHOLD_POLICIES
    }
    report = evaluate(test.labels, test_prob, thresholds, eval_args.bootstrap, eval_args.bootstrap_seed)
    report["decision"] = {
        "policy": eval_args.threshold_policy,
        "threshold": thresholds[eval_args.threshold_policy],
        "target_sensitivity": eval_args.target_sensitivity,
    }
    report["checkpoint"] = {"metric": metric, "path": str(checkpoint.relative_to(run_dir.resolve()))}
    title = f"{config['training']['method']} - {Path(config['model']['student']).name} - "
    title += f"external: {Path(test.source).name}" if external else "test split"
    out = run_dir / ("eval-external" if external else "eval")
    write_report(report, test.labels, test_prob, out, title)
    # Row ids, not text: lets runs be compared paired on the same notes (see experiments/).
    pd.DataFrame({"row_id": test.row_ids, "label": test.labels, "p_emergency": test_prob}).to_csv(
        out / PREDICTIONS_FILE, index=False
    )
    if external:
        return report

    info_path = checkpoint / "checkpoint.json"
    info = json.loads(info_path.read_text())
    info["decision"] = report["decision"]
    info_path.write_text(json.dumps(info, indent=2))
    log.info("test report written to %s", run_dir / "eval")
    return report


def eval_args_from(config: dict) -> EvalArguments:
    known = {f.name for f in fields(EvalArguments)}
    return EvalArguments(**{k: v for k, v in config.get("evaluation", {}).items() if k in known})
