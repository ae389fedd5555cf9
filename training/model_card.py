"""MODEL_CARD.md of a bundle: intended use, data, metrics with CIs, calibration, threshold, limitations; and the
section a site recalibration adds (`recalibrated_card`)."""

from __future__ import annotations

import json
from pathlib import Path

from app.manifest import Manifest
from training.data.examples import Examples
from training.evaluate import CALIBRATION_METRICS, METRIC_LABELS, THRESHOLD_POLICIES

KTAS_PROVENANCE = (
    'Public KTAS data set of Moon et al., "Triage accuracy and causes of mistriage using the Korean Triage and '
    'Acuity Scale", PLOS ONE 14(9): e0216972, 2019 (doi:10.1371/journal.pone.0216972), licensed CC BY 4.0: '
    "1,267 adult patients (age 16-96) of two Korean emergency departments, Oct 2016 - Sep 2017. One note per "
    "record is built from what is known at triage (chief complaint in English nursing shorthand, age, sex, "
    "arrival mode, injury, mental state, pain, vital signs); label emergency = expert KTAS level 1-3."
)


def is_ktas(data_config: dict) -> bool:
    return data_config["data"] == "ktas" or data_config.get("data_format") == "ktas"


def write_model_card(
    path: Path, manifest: Manifest, data_config: dict, parts: dict[str, Examples], report: dict, parity_notes: int
) -> None:
    path.write_text(_card(manifest, data_config, parts, report, parity_notes), encoding="utf-8")


def _shape(manifest: Manifest) -> list[str]:
    encoders = manifest.encoders
    if encoders.layers is None:
        return []
    kept = (
        f" (kept of the student's layers: --student-layers {encoders.student_layers})"
        if encoders.student_layers
        else ""
    )
    aware = " Fine-tuned quantization-aware (fake int8 on every matrix product)." if encoders.quantization_aware else ""
    return ["", f"{encoders.layers} encoder layers{kept}.{aware}"]


def _int8_recipe(manifest: Manifest) -> list[str]:
    recipe = {
        "all": "every MatMul in int8",
        "except-ffn-down": "every MatMul in int8 except the feed-forward down-projections, kept fp32",
    }
    if manifest.int8_matmuls is None:
        return []
    outputs = {True: " Their outputs are rounded too.", False: " Only their inputs are rounded.", None: ""}
    return ["", f"int8: static quantization, {recipe[manifest.int8_matmuls]}.{outputs[manifest.int8_rounds_outputs]}"]


def _card(manifest: Manifest, data_config: dict, parts: dict[str, Examples], report: dict, parity_notes: int) -> str:
    encoders, decision = manifest.encoders, manifest.decision
    level = report["bootstrap"]["level"]
    at_threshold = report["thresholds"][decision.policy]
    provenance = KTAS_PROVENANCE if is_ktas(data_config) else f"The data file `{Path(data_config['data']).name}`."
    teacher = f", distilling the domain teacher `{encoders.teacher}`" if encoders.teacher else ""
    if encoders.method == "layer-kd":
        teacher = f", distilling the fine-tuned classifier `{encoders.teacher}` layer by layer"
    lines = [
        f"# {manifest.name} {manifest.version}",
        "",
        f"Classifies an emergency-department triage note as **emergency** or **non-emergency**. Student encoder "
        f"`{encoders.student}`, trained with method `{encoders.method}`{teacher}; source run `{manifest.source_run}`.",
        *_shape(manifest),
        "",
        "## Intended use",
        "",
        "Decision support for triage staff: a second look that flags notes likely to describe an emergency. "
        "It is not a diagnosis and must not triage patients autonomously; the triage nurse's judgement decides.",
        "",
        "## Training data",
        "",
        provenance,
        "",
        "| part | notes | emergency |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {len(part)} | {part.labels.mean():.1%} |" for name, part in parts.items()),
        "",
        "## Test metrics",
        "",
        f"{report['counts']['n']} test notes; {level:.0%} CIs from a {report['bootstrap']['method']} bootstrap "
        f"with {report['bootstrap']['n_resamples']} resamples.",
        "",
        f"| metric | value | {level:.0%} CI |",
        "| --- | ---: | ---: |",
        *_rows(report["threshold_free"]),
        *_rows(at_threshold["metrics"], suffix=f" at threshold {decision.threshold:.3f}"),
        "",
        "## Calibration",
        "",
        *_calibration(manifest, report),
        "",
        "## Decision threshold",
        "",
        f"A note is labelled emergency when P(emergency) >= {decision.threshold:.4f}. Policy `{decision.policy}`: "
        f"{THRESHOLD_POLICIES.get(decision.policy, 'set by the caller')}; chosen on training/validation data, "
        "never on the test set.",
        "",
        "## ONNX variants",
        "",
        f"Parity with PyTorch on {parity_notes} held-out notes (validation + test).",
        "",
        "| variant | size (MB) | kept | max abs diff of P | label agreement | validation AUROC drop "
        "| batch shift of P |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} | {v.size_bytes / 1e6:.1f} | {'yes' if v.kept else f'no ({v.note})'} | "
            f"{_figure(v.max_abs_diff, '.2e')} | {_figure(v.label_agreement, '.2%')} | "
            f"{_figure(v.auroc_drop, '+.4f')} | "
            f"{_figure(v.batch_shift, '.2e')} |"
            for name, v in manifest.variants.items()
        ),
        "",
        "Batch shift: the largest change of a note's P(emergency) between scoring it alone and in a batch of 32; "
        "the service batches notes of concurrent requests together.",
        *_int8_recipe(manifest),
        "",
        "## Known limitations",
        "",
        *_limitations(manifest, data_config),
        "",
    ]
    return "\n".join(lines)


def _calibration(manifest: Manifest, report: dict) -> list[str]:
    calibration, metrics = manifest.calibration, report["threshold_free"]
    summary = (
        f"Brier score {_value(metrics['brier'])}, expected calibration error (ECE, "
        f"{report['reliability']['n_bins']} equal-width bins) {_value(metrics['ece'])}: lower is better."
    )
    if calibration.method == "none":
        return [summary + " P(emergency) is the softmax output, not recalibrated; read it as a score, not as a risk."]
    lines = [
        f"P(emergency) = sigmoid({calibration.scale:.4f} * (logit[emergency] - logit[non-emergency]) "
        f"{calibration.bias:+.4f}): `{calibration.method}` scaling fitted on the {calibration.fitted_on} "
        f"({calibration.notes} notes), applied by the service. On the test set: {summary}",
    ]
    before = report.get("uncalibrated", {}).get("threshold_free")
    if before:
        lines += [
            "",
            "| test metric | before (softmax) | after |",
            "| --- | ---: | ---: |",
            *(
                f"| {METRIC_LABELS[name]} | {_value(before[name])} | {_value(metrics[name])} |"
                for name in CALIBRATION_METRICS
                if name in before and name in metrics
            ),
        ]
    chance = report["reliability"].get("ece_if_calibrated")
    if chance:
        lines += [
            "",
            f"A perfectly calibrated model would still show an ECE of about {chance['mean']:.3f} "
            f"({chance['low']:.3f} - {chance['high']:.3f}) on {report['counts']['n']} test notes.",
        ]
    return lines


RECALIBRATED_NOTE = "> Recalibrated for a site"


def recalibrated_card(card: str, manifest: Manifest) -> str:
    """The source bundle's MODEL_CARD.md with a note under its title and a `## Site recalibration` section (an
    earlier one is replaced): the calibration and threshold fitted on a site's notes supersede the card's."""
    recalibration = manifest.recalibration
    if recalibration is None:
        raise ValueError("the manifest has no recalibration")
    title, _, rest = card.split("\n## Site recalibration\n", 1)[0].partition("\n")
    rest = rest.strip("\n")
    if rest.startswith(RECALIBRATED_NOTE):  # a bundle recalibrated again: one note, one section
        rest = rest.partition("\n")[2].strip("\n")
    note = (
        f"{RECALIBRATED_NOTE} as version {manifest.version} (from {recalibration.source_version}): the "
        "calibration and decision threshold of the section *Site recalibration* replace those described below."
    )
    calibration, decision = manifest.calibration, manifest.decision
    before, after = recalibration.before, recalibration.after
    rows = [
        f"| {METRIC_LABELS.get(name, name)} | {_value(before['metrics'][name])} ({_interval(before['metrics'][name])}) "
        f"| {_value(after['metrics'][name])} ({_interval(after['metrics'][name])}) |"
        for name in after["metrics"]
        if name in before["metrics"]
    ]
    section = [
        "## Site recalibration",
        "",
        f"Without retraining, calibration and threshold were refitted on {recalibration.notes} labelled notes of "
        f"the site (`{recalibration.data_file}`, sha256 {recalibration.data_sha256[:12]}..., "
        f"{recalibration.prevalence:.1%} emergency), split stratified (seed {recalibration.split_seed}) into "
        f"{recalibration.fit_notes} notes to fit on and {recalibration.check_notes} held-out notes to check on.",
        "",
        f"- Calibration: `{calibration.method}`, P(emergency) = sigmoid({calibration.scale:.4f} * margin "
        f"{calibration.bias:+.4f}).",
        f"- Decision threshold: {decision.threshold:.4f}, policy `{decision.policy}` "
        f"({THRESHOLD_POLICIES.get(decision.policy, 'set by the caller')}), chosen on the fit part.",
        "",
        f"Check part ({recalibration.check_notes} notes), 95% bootstrap CIs; before = the source bundle's "
        f"calibration and threshold {before['threshold']:.4f}, after = the site's, threshold {after['threshold']:.4f}.",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
        *rows,
        "",
    ]
    return "\n".join([title, "", note, "", rest, "", *section])


def _interval(metric: dict) -> str:
    low, high = metric.get("low"), metric.get("high")
    return "CI undefined" if low is None or high is None else f"{low:.3f} - {high:.3f}"


def _limitations(manifest: Manifest, data_config: dict) -> list[str]:
    items = []
    if is_ktas(data_config):
        items += [
            "- Trained on adults (16-96) of two Korean EDs: children and other health systems are out of scope.",
            "- Chief complaints are English nursing shorthand; other writing styles or languages may score worse.",
            "- Vital signs and other structured fields were rendered as text; the model reads numbers as tokens.",
        ]
    items.append("- The test set is small, so the confidence intervals are wide; expect other sites to differ.")
    if manifest.encoders.teacher and _teacher_corpus(manifest.encoders.teacher) == "icd10cm":
        items.append(
            "- The domain teacher was made by masked-LM pretraining on ICD-10-CM code titles: it knows "
            "clinical vocabulary, it is not a clinical-notes model."
        )
    items.append("- Notes longer than the token limit are truncated (the end of the note is not seen).")
    return items


def _teacher_corpus(teacher: str) -> str | None:
    """The corpus a teacher made by `python -m training pretrain` was trained on (from its pretrain.json)."""
    report = Path(teacher) / "pretrain.json"
    return json.loads(report.read_text()).get("options", {}).get("corpus") if report.is_file() else None


def _rows(metrics: dict, suffix: str = "") -> list[str]:
    return [
        f"| {METRIC_LABELS.get(name, name)}{suffix} | {_value(m)} | {_interval(m)} |" for name, m in metrics.items()
    ]


def _value(metric: dict) -> str:
    return "undefined" if metric["value"] is None else f"{metric['value']:.3f}"


def _figure(value: float | None, spec: str) -> str:
    return "not measured" if value is None else format(value, spec)
