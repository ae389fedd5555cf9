"""The evaluation report as files: metrics.json, report.md, and ROC, PR and reliability PNGs.

When the report holds `uncalibrated` (the model's own softmax on the same notes) and `calibration`, report.md
compares the calibration metrics before and after calibration and reliability.png draws both curves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from training.evaluate import CALIBRATION_METRICS, METRIC_LABELS, checked_inputs
from training.run_dir import METRICS_FILE


def _number(value: float | None, spec: str = ".3f") -> str:
    return "undefined" if value is None else format(value, spec)


def _ci(metric: Mapping) -> str:
    undefined = f" ({metric['undefined']} resamples undefined)" if metric.get("undefined") else ""
    return f"{_number(metric['low'])} – {_number(metric['high'])}{undefined}"  # noqa: RUF001 (an en dash)


def _metric_table(metrics: Mapping[str, Mapping[str, float]], level: float) -> list[str]:
    rows = [f"| metric | value | {level:.0%} CI |", "| --- | ---: | ---: |"]
    rows += [f"| {METRIC_LABELS.get(name, name)} | {_number(m['value'])} | {_ci(m)} |" for name, m in metrics.items()]
    return rows


def _calibration_section(report: Mapping, level: float) -> list[str]:
    """Calibration before and after, with ECE's chance level; empty when the report has no calibration."""
    if "calibration" not in report or "uncalibrated" not in report:
        return []
    calibration = report["calibration"]
    if calibration["method"] == "none":
        fitted = "None: P(emergency) is the model's own softmax."
    else:
        fitted = (
            f"`{calibration['method']}` fitted on the {calibration['fitted_on']} ({calibration['notes']} notes): "
            f"P(emergency) = sigmoid({calibration['scale']:.4f} * (logit[emergency] - logit[non-emergency]) "
            f"{calibration['bias']:+.4f})."
        )
    selection = report.get("calibration_selection", {})
    if "cv_nll" in selection:
        nll = ", ".join(f"{name} {value:.4f}" for name, value in selection["cv_nll"].items())
        fitted += (
            f" Chosen by {selection['folds']}-fold cross-validated NLL on those notes ({nll}): {selection['rule']}."
        )
    before, after = report["uncalibrated"], report
    lines = [
        "",
        "## Calibration",
        "",
        fitted,
        "Thresholds are chosen on the calibrated validation probabilities; every metric above and below the "
        "thresholds is of the calibrated probabilities.",
        "",
        f"| metric | before (softmax) | {level:.0%} CI | after | {level:.0%} CI |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in CALIBRATION_METRICS:
        b, a = before["threshold_free"][name], after["threshold_free"][name]
        lines.append(f"| {METRIC_LABELS[name]} | {_number(b['value'])} | {_ci(b)} | {_number(a['value'])} | {_ci(a)} |")
    chance = after["reliability"].get("ece_if_calibrated")
    if chance:
        lines += [
            "",
            f"ECE of a perfectly calibrated model with these probabilities on these {report['counts']['n']} notes "
            f"(labels drawn as Bernoulli(P), {chance['draws']} draws): {chance['mean']:.3f} on average, "
            f"{chance['low']:.3f} – {chance['high']:.3f} in {level:.0%} of draws; an ECE within that range is what "  # noqa: RUF001
            "chance alone gives at this test size.",
        ]
    return lines


def _policy_summary(report: Mapping) -> list[str]:
    """One row per threshold policy: what it catches and the specificity it costs."""
    shipped = report.get("decision", {}).get("policy")
    lines = [
        "",
        "## Threshold policies",
        "",
        "| policy | threshold | sensitivity | specificity | missed emergencies | false alarms | shipped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, policy in report["thresholds"].items():
        metrics, cm = policy["metrics"], policy["confusion_matrix"]
        lines.append(
            f"| `{name}` | {policy['threshold']:.4f} | {_number(metrics['sensitivity']['value'])} | "
            f"{_number(metrics['specificity']['value'])} | {cm['fn']} | {cm['fp']} | "
            f"{'yes' if name == shipped else ''} |"
        )
    return lines


def _markdown(report: Mapping, title: str) -> str:
    counts, bootstrap = report["counts"], report["bootstrap"]
    level = bootstrap["level"]
    lines = [
        f"# {title}",
        "",
        f"{counts['n']} notes: {counts['n_emergency']} emergency, {counts['n_non_emergency']} non-emergency "
        f"(prevalence {counts['prevalence']:.3f}).",
        f"CIs: {bootstrap['method']} bootstrap, {bootstrap['n_resamples']} resamples, seed {bootstrap['seed']} "
        f"({bootstrap['one_class_resamples_redrawn']} single-class resamples redrawn).",
        "A note is predicted emergency when P(emergency) >= threshold.",
        "",
        "## Threshold-free metrics",
        "",
        *_metric_table(report["threshold_free"], level),
        *_calibration_section(report, level),
        *(_policy_summary(report) if report["thresholds"] else []),
    ]
    for name, policy in report["thresholds"].items():
        cm = policy["confusion_matrix"]
        lines += [
            "",
            f"## Threshold `{name}` = {policy['threshold']:.4f}",
            "",
            f"The threshold is {policy['description']}.",
            "",
            *_metric_table(policy["metrics"], level),
            "",
            "| | predicted non-emergency | predicted emergency |",
            "| --- | ---: | ---: |",
            f"| non-emergency | {cm['tn']} (true negative) | {cm['fp']} (false positive) |",
            f"| emergency | {cm['fn']} (false negative) | {cm['tp']} (true positive) |",
        ]
    lines += ["", "Figures: `roc.png`, `pr.png`, `reliability.png`.", ""]
    return "\n".join(lines)


def _new_figure(**kwargs) -> Figure:
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)  # Agg canvas, no pyplot: nothing global, nothing to close.
    return figure


def _mark_operating_points(ax, report: Mapping, x_metric: str, y_metric: str, x_transform=lambda v: v) -> None:
    for name, policy in report["thresholds"].items():
        metrics = policy["metrics"]
        x, y = x_transform(metrics[x_metric]["value"]), metrics[y_metric]["value"]
        ax.plot(x, y, "o", markersize=8, label=f"{name} (t = {policy['threshold']:.3f})")


def _plot_roc(report: Mapping, labels: np.ndarray, probabilities: np.ndarray, title: str, path: Path) -> None:
    fpr, tpr, _ = roc_curve(labels, probabilities)
    figure = _new_figure(figsize=(6, 6), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"model (AUROC = {report['threshold_free']['auroc']['value']:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    _mark_operating_points(ax, report, "specificity", "sensitivity", x_transform=lambda s: 1 - s)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=f"{title}\nROC curve",
        aspect="equal",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    figure.savefig(path, dpi=120)


def _plot_pr(report: Mapping, labels: np.ndarray, probabilities: np.ndarray, title: str, path: Path) -> None:
    precision, recall, _ = precision_recall_curve(labels, probabilities)
    prevalence = report["counts"]["prevalence"]
    figure = _new_figure(figsize=(6, 6), layout="constrained")
    ax = figure.add_subplot()
    ax.step(
        recall, precision, where="post", lw=2, label=f"model (AUPRC = {report['threshold_free']['auprc']['value']:.3f})"
    )
    ax.axhline(prevalence, ls="--", color="grey", label=f"no skill (prevalence = {prevalence:.3f})")
    _mark_operating_points(ax, report, "sensitivity", "precision")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="sensitivity (recall)",
        ylabel="precision (PPV)",
        title=f"{title}\nPrecision-recall curve",
        aspect="equal",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    figure.savefig(path, dpi=120)


def _plot_reliability(report: Mapping, labels: np.ndarray, probabilities: np.ndarray, title: str, path: Path) -> None:
    bins = report["reliability"]["bins"]
    metrics = report["threshold_free"]
    figure = _new_figure(figsize=(6, 8), layout="constrained")
    curve_ax, histogram_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve_ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    calibrated = "uncalibrated" in report and "calibration" in report
    if calibrated:
        before = report["uncalibrated"]
        before_bins, before_metrics = before["reliability"]["bins"], before["threshold_free"]
        curve_ax.plot(
            [b["mean_predicted"] for b in before_bins],
            [b["fraction_positive"] for b in before_bins],
            "s--",
            color="tab:orange",
            lw=1.5,
            label=f"before: softmax (ECE = {before_metrics['ece']['value']:.3f}, "
            f"Brier = {before_metrics['brier']['value']:.3f})",
        )
    name = f"after: {report['calibration']['method']}" if calibrated else "model"
    curve_ax.plot(
        [b["mean_predicted"] for b in bins],
        [b["fraction_positive"] for b in bins],
        "o-",
        lw=2,
        color="tab:blue",
        label=f"{name} (ECE = {metrics['ece']['value']:.3f}, Brier = {metrics['brier']['value']:.3f})",
    )
    curve_ax.set(
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        ylabel="observed fraction of emergencies",
        title=f"{title}\nReliability diagram ({report['reliability']['n_bins']} equal-width bins)",
    )
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(loc="upper left")
    edges = np.linspace(0, 1, report["reliability"]["n_bins"] + 1)
    histogram_ax.hist(
        [probabilities[labels == 0], probabilities[labels == 1]],
        bins=edges,
        stacked=True,
        label=["non-emergency", "emergency"],
        color=["tab:blue", "tab:red"],
        alpha=0.8,
    )
    histogram_ax.set(xlabel="predicted P(emergency)" + (" after calibration" if calibrated else ""), ylabel="notes")
    histogram_ax.margins(y=0.4)  # headroom for the legend above the bars
    histogram_ax.legend(loc="upper left", ncols=2)
    figure.savefig(path, dpi=120)


def write_report(report: dict, y_true, prob, out_dir: str | Path, title: str) -> None:
    """Write `metrics.json`, `report.md`, `roc.png`, `pr.png` and `reliability.png` into `out_dir`.

    `prob` are the probabilities the report describes (calibrated, when the report holds a calibration)."""
    labels, probabilities = checked_inputs(y_true, prob)
    if labels.size != report["counts"]["n"]:
        raise ValueError(f"report was made from {report['counts']['n']} rows but y_true has {labels.size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(_markdown(report, title), encoding="utf-8")
    _plot_roc(report, labels, probabilities, title, out / "roc.png")
    _plot_pr(report, labels, probabilities, title, out / "pr.png")
    _plot_reliability(report, labels, probabilities, title, out / "reliability.png")
