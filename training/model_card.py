"""MODEL_CARD.md of a bundle: intended use, data, metrics with CIs, calibration, threshold, limitations."""

from __future__ import annotations

import json
from pathlib import Path

from app.manifest import Manifest
from training.data.examples import Examples
from training.evaluate import METRIC_LABELS, THRESHOLD_POLICIES

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


def _card(manifest: Manifest, data_config: dict, parts: dict[str, Examples], report: dict, parity_notes: int) -> str:
    encoders, decision = manifest.encoders, manifest.decision
    level = report["bootstrap"]["level"]
    at_threshold = report["thresholds"][decision.policy]
    provenance = KTAS_PROVENANCE if is_ktas(data_config) else f"The data file `{Path(data_config['data']).name}`."
    teacher = f", distilling the domain teacher `{encoders.teacher}`" if encoders.teacher else ""
    lines = [
        f"# {manifest.name} {manifest.version}",
        "",
        f"Classifies an emergency-department triage note as **emergency** or **non-emergency**. Student encoder "
        f"`{encoders.student}`, trained with method `{encoders.method}`{teacher}; source run `{manifest.source_run}`.",
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
        f"Brier score {_value(report['threshold_free']['brier'])}, expected calibration error (ECE, "
        f"{report['reliability']['n_bins']} equal-width bins) {_value(report['threshold_free']['ece'])}: lower is "
        "better. P(emergency) is the softmax output, not recalibrated; read it as a score, not as a risk.",
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
        "",
        "## Known limitations",
        "",
        *_limitations(manifest, data_config),
        "",
    ]
    return "\n".join(lines)


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
        f"| {METRIC_LABELS.get(name, name)}{suffix} | {_value(m)} | {m['low']:.3f} - {m['high']:.3f} |"
        for name, m in metrics.items()
    ]


def _value(metric: dict) -> str:
    return f"{metric['value']:.3f}"


def _figure(value: float | None, spec: str) -> str:
    return "not measured" if value is None else format(value, spec)
