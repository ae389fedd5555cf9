"""DSG-KD vs plain fine-tuning on the bundled KTAS data: several seeds, one split, one budget.

Grid (every run: same split, same recipe, the notes rendered in `--render`, `--seeds` training seeds):
  main       for each student in `--students`: base, mlkd, ensemble (domain teacher `--teacher`)
  ablations  student e5-small, mlkd, one change each from the defaults (`--seeds-ablation` seeds): see
             `ABLATIONS`

Each run is `training.fit` (its own test report under <out>/runs/<name>/eval/), then evaluated on its test
split rendered in every style of `--evaluate-on` (eval-render-STYLE/). Runs already finished are reused, so a
stopped experiment resumes. Then the results page: per test rendering, metrics averaged over seeds with 95%
bootstrap CIs over test notes, the paired DSG-KD - base differences, the nurses' own triage (KTAS_RN) on the
same test notes as the human reference, ROC and reliability figures (of the training rendering).

    python experiments/ktas_dsgkd.py --out runs/experiment --docs docs/results             (shorthand notes)
    python experiments/ktas_dsgkd.py --render ko --evaluate-on shorthand,narrative,ko,mixed --students e5-small \
        --teacher models/pretrained/minilm-l6-medical --out runs/experiment-ko --docs docs/results
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import typer
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from training.config import (
    RENDER_STYLES,
    DataArguments,
    DistillArguments,
    EvalArguments,
    ModelArguments,
    RenderStyle,
    TrainingArguments,
)
from training.data.ktas import BUNDLED_KTAS, load_ktas
from training.data.readers import read_table
from training.data.split import make_split
from training.evaluate import compute_metrics, reliability_bins, resample_indices, resampled_metrics
from training.fit import fit
from training.run_dir import RunDirectory
from training.run_report import evaluate_run

log = logging.getLogger("experiment")
METRICS = ("auroc", "auprc", "f1", "sensitivity", "specificity", "brier", "ece")
SPLIT_SEED = 42


@dataclass(frozen=True)
class Config:
    """One cell of the grid, trained once per seed."""

    name: str
    group: str  # "main" or "ablation"
    student: str
    method: str
    teacher: str | None = None
    distill: dict = field(default_factory=dict)  # DistillArguments overrides


MAX_LENGTH = 128  # student tokens; every KTAS rendering fits (longest: 78 e5 tokens)

# name -> DistillArguments overrides; each changes one thing from the defaults. The teacher ablations are in `grid`.
ABLATIONS: dict[str, dict] = {
    "hidden only": {"beta": 0.0},
    "attention only": {"alpha": 0.0},
    "all words": {"word_policy": "all"},
    "relation hidden loss": {"hidden_loss": "relation"},
    "attention head by head with mse": {"attention_heads": "by-index", "attention_loss": "mse"},
    "teacher budget = student's": {"teacher_max_length": MAX_LENGTH},
}


def grid(students: list[str], teacher: str, other_teachers: dict[str, str], ablations: list[str]) -> list[Config]:
    configs = []
    for student in students:
        configs.append(Config(f"{student}/base", "main", student, "base"))
        for method in ("mlkd", "ensemble"):
            configs.append(Config(f"{student}/{method}", "main", student, method, teacher))
    configs += [
        Config(f"e5-small/mlkd {name}", "ablation", "e5-small", "mlkd", teacher, ABLATIONS[name]) for name in ablations
    ]
    configs += [
        Config(f"e5-small/mlkd teacher {name}", "ablation", "e5-small", "mlkd", path)
        for name, path in other_teachers.items()
    ]
    return configs


def run_dir(out: Path, config: Config, seed: int) -> Path:
    return out / "runs" / config.name.replace("/", "__").replace(" ", "-") / f"seed-{seed}"


def train(
    config: Config,
    seed: int,
    out: Path,
    split_file: Path,
    recipe: TrainingArguments,
    render: RenderStyle,
    evaluate_on: list[RenderStyle],
) -> dict:
    """Fit one run unless it finished before, evaluate it on every rendering of `evaluate_on`; returns per
    rendering its test predictions and target-sensitivity threshold (chosen on that rendering's validation
    notes), and its wall time."""
    directory = run_dir(out, config, seed)
    run = RunDirectory(directory)
    timing = directory / "wall_seconds.json"
    if not (run.predictions_file().is_file() and timing.is_file()):
        shutil.rmtree(directory, ignore_errors=True)  # a run stopped half-way starts over
        start = time.perf_counter()
        fit(
            DataArguments(data="ktas", split_file=str(split_file), render=render),
            ModelArguments(student=config.student, teacher=config.teacher, max_length=MAX_LENGTH),
            replace(recipe, out=str(directory), method=config.method, seed=seed),
            DistillArguments(**config.distill),
            EvalArguments(),
        )
        timing.write_text(json.dumps({"wall_seconds": round(time.perf_counter() - start, 1)}))
    predictions, thresholds = {render: pd.read_csv(run.predictions_file())}, {render: run.decision()["threshold"]}
    for style in evaluate_on:
        if style == render:
            continue
        if not run.predictions_file(render=style).is_file():
            evaluate_run(run, EvalArguments(), render=style)
        report = json.loads(run.metrics_file(render=style).read_text())
        predictions[style] = pd.read_csv(run.predictions_file(render=style))
        thresholds[style] = report["thresholds"]["target-sensitivity"]["threshold"]
    return {
        "config": config.name,
        "seed": seed,
        "threshold": thresholds,
        "predictions": predictions,
        "wall_seconds": json.loads(timing.read_text())["wall_seconds"],
    }


def nurse_scores(row_ids: np.ndarray) -> np.ndarray:
    """The triage nurse's KTAS level as a score in [0, 1] (level 1 -> 1, level 5 -> 0): at 0.5 it calls
    levels 1-3 an emergency, exactly as `training.data.ktas` maps the expert's levels to labels."""
    levels = pd.to_numeric(read_table(BUNDLED_KTAS, delimiter=";")["KTAS_RN"]).to_numpy()[row_ids]
    return (5 - levels) / 4


def summarise(
    runs: list[dict], configs: list[Config], style: RenderStyle, n_resamples: int
) -> tuple[pd.DataFrame, dict, dict]:
    """On the test notes rendered in `style`, per config: seed-mean of each metric with a 95% CI from resampling
    test notes (every run scored on the same resamples), and the seed-to-seed SD. Also the paired differences
    in test AUROC (every DSG-KD config minus base, every ablation minus full mlkd, on the seeds both have), and
    the triage nurse's figures on the same notes."""
    first = runs[0]["predictions"][style]
    if any(not r["predictions"][style]["row_id"].equals(first["row_id"]) for r in runs):
        raise RuntimeError("runs were tested on different notes: they must share one split")
    labels = first["label"].to_numpy()
    indices = resample_indices(labels, n_resamples, seed=0)

    rows, points, resampled = [], {}, {}
    for config in configs:
        seeds = [r for r in runs if r["config"] == config.name]
        points[config.name], resampled[config.name] = {}, {}
        for r in seeds:
            probabilities, threshold = r["predictions"][style]["p_emergency"], r["threshold"][style]
            points[config.name][r["seed"]] = compute_metrics(labels, probabilities, threshold)
            resampled[config.name][r["seed"]] = resampled_metrics(labels, probabilities, threshold, indices)
        row = {
            "config": config.name,
            "group": config.group,
            "seeds": len(seeds),
            "minutes_per_run": np.mean([r["wall_seconds"] for r in seeds]) / 60,
        }
        for m in METRICS:
            values = np.array([p[m] for p in points[config.name].values()])
            seed_mean = np.mean([x[m] for x in resampled[config.name].values()], axis=0)
            low, high = np.percentile(seed_mean, [2.5, 97.5])
            row |= {m: values.mean(), f"{m}_low": low, f"{m}_high": high, f"{m}_sd": values.std(ddof=1)}
        rows.append(row)

    def difference(name: str, reference: str) -> dict:
        seeds = sorted(set(points[name]) & set(points[reference]))
        per_seed = np.array([points[name][s]["auroc"] - points[reference][s]["auroc"] for s in seeds])
        resampled_difference = np.mean(
            [resampled[name][s]["auroc"] - resampled[reference][s]["auroc"] for s in seeds], axis=0
        )
        return {
            "mean": float(per_seed.mean()),
            "low": float(np.percentile(resampled_difference, 2.5)),
            "high": float(np.percentile(resampled_difference, 97.5)),
            "seed_sd": float(per_seed.std(ddof=1)) if per_seed.size > 1 else float("nan"),
            "seeds_better": int((per_seed > 0).sum()),
            "seeds": int(per_seed.size),
        }

    paired = {}
    for config in configs:
        base = f"{config.student}/base"
        if config.method != "base" and base in points:
            paired[f"{config.name} - base"] = difference(config.name, base)
        if config.group == "ablation" and f"{config.student}/mlkd" in points:
            paired[f"{config.name} - {config.student}/mlkd"] = difference(config.name, f"{config.student}/mlkd")

    nurse = nurse_scores(first["row_id"].to_numpy())
    nurse_point = compute_metrics(labels, nurse, 0.5)
    nurse_resampled = resampled_metrics(labels, nurse, 0.5, indices)
    reference = {
        m: {
            "value": nurse_point[m],
            "low": float(np.percentile(nurse_resampled[m], 2.5)),
            "high": float(np.percentile(nurse_resampled[m], 97.5)),
        }
        for m in ("auroc", "f1", "sensitivity", "specificity")
    }
    return pd.DataFrame(rows), paired, reference


def figures(runs: list[dict], configs: list[Config], style: RenderStyle, nurse: dict, docs: Path, stem: str) -> None:
    """ROC and reliability curves of the main methods on the test notes rendered in `style`, one panel per
    student, each curve pooled over seeds; the nurse's operating point on the ROC panels."""
    students = sorted({c.student for c in configs if c.group == "main"})
    for kind in ("roc", "reliability"):
        figure = Figure(figsize=(6 * len(students), 5.2))
        axes = figure.subplots(1, len(students), squeeze=False)
        for ax, student in zip(axes[0], students, strict=True):
            for config in (c for c in configs if c.group == "main" and c.student == student):
                frames = [r["predictions"][style] for r in runs if r["config"] == config.name]
                labels = np.concatenate([f["label"] for f in frames])
                probs = np.concatenate([f["p_emergency"] for f in frames])
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(labels, probs)
                    ax.plot(fpr, tpr, label=config.method)
                else:
                    bins = reliability_bins(labels, probs)
                    ax.plot(
                        [b["mean_predicted"] for b in bins],
                        [b["fraction_positive"] for b in bins],
                        "o-",
                        label=config.method,
                    )
            if kind == "roc":
                ax.plot(
                    1 - nurse["specificity"]["value"],
                    nurse["sensitivity"]["value"],
                    "k*",
                    markersize=12,
                    label="triage nurse (KTAS_RN 1-3)",
                )
                ax.set(xlabel="1 - specificity", ylabel="sensitivity")
            else:
                ax.set(xlabel="mean predicted P(emergency)", ylabel="observed emergency rate")
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            ax.set(title=f"student {student}, {len(frames)} seeds pooled", xlim=(0, 1), ylim=(0, 1))
            ax.legend(loc="lower right")
        figure.suptitle(f"KTAS test split ({style}): {kind.upper() if kind == 'roc' else 'reliability'}")
        figure.tight_layout()
        figure.savefig(docs / f"{stem.replace('ktas_dsgkd', kind)}.png", dpi=110)


def markdown(
    sections: dict[str, tuple[pd.DataFrame, dict]],
    reference: dict,
    recipe: TrainingArguments,
    render: RenderStyle,
    teacher: str,
    total_minutes: float,
    n_test: int,
    stem: str,
) -> str:
    def cell(row, m):
        return f"{row[m]:.3f} [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}] ±{row[m + '_sd']:.3f}"

    lines = [
        f"# KTAS ({render} notes): DSG-KD vs plain fine-tuning (generated by `experiments/ktas_dsgkd.py`)",
        "",
        f"Test split: {n_test} records (split seed {SPLIT_SEED}, 70/15/15 stratified), the same for every run. "
        f"Trained on the notes rendered `{render}`. Recipe for every run: {recipe.epochs} epochs (patience "
        f"{recipe.patience}), batch {recipe.batch_size}, encoder lr {recipe.encoder_lr}, head lr {recipe.head_lr}, "
        f"word embedding frozen, max {MAX_LENGTH} student tokens, checkpoint with the best validation AUROC, "
        f"calibrated on validation, target-sensitivity threshold (0.95 on validation). Teacher: `{teacher}`.",
        "",
        "Cells: mean over seeds [95% CI: bootstrap over test notes of the seed mean, 1,000 resamples] "
        "±SD over seeds. Sensitivity, specificity and F1 are at each run's threshold for that rendering "
        "(chosen on the validation notes of the same rendering).",
    ]
    for style, (table, paired) in sections.items():
        lines += [
            "",
            f"## Test notes rendered `{style}`" + (" (the training rendering)" if style == render else ""),
            "",
            "| config | seeds | " + " | ".join(METRICS) + " | min/run |",
            "|---|---|" + "---|" * len(METRICS) + "---|",
        ]
        for _, row in table.iterrows():
            lines.append(
                f"| {row['config']} | {row['seeds']} | "
                + " | ".join(cell(row, m) for m in METRICS)
                + f" | {row['minutes_per_run']:.1f} |"
            )
        lines += [
            "",
            f"Paired test AUROC differences (`{style}`), same seeds:",
            "",
            "| comparison | mean difference | 95% CI (test-note bootstrap) | SD over seeds | seeds better |",
            "|---|---|---|---|---|",
        ]
        for name, d in paired.items():
            lines.append(
                f"| {name} | {d['mean']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | {d['seed_sd']:.4f} | "
                f"{d['seeds_better']} of {d['seeds']} |"
            )
    lines += [
        "",
        "## Human reference: the triage nurse (KTAS_RN) against the expert (KTAS_expert), same test records",
        "",
        "| metric | value [95% CI] |",
        "|---|---|",
    ]
    for m, v in reference.items():
        lines.append(f"| {m} | {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}] |")
    figure_suffix = stem.removeprefix("ktas_dsgkd")
    lines += [
        "",
        "AUROC of the nurse is that of the 5-level KTAS_RN as a score; the other figures are at "
        "levels 1-3 = emergency.",
        "",
        f"Total wall time of the runs: {total_minutes:.0f} min.",
        "",
        f"![ROC](roc{figure_suffix}.png)",
        "",
        f"![Reliability](reliability{figure_suffix}.png)",
        "",
    ]
    return "\n".join(lines)


def main(
    out: Path = typer.Option(Path("runs/experiment"), help="Where the runs go (reused: the experiment resumes)."),
    docs: Path = typer.Option(Path("docs/results"), help="Where the results page and figures go."),
    render: str = typer.Option("shorthand", help="Rendering of the training (and validation) notes."),
    evaluate_on: str = typer.Option("", help="Test renderings to report, comma-separated (default: --render)."),
    students: str = typer.Option("e5-small,minilm-l6", help="Students of the main grid, comma-separated."),
    methods: str = typer.Option("base,mlkd,ensemble", help="Methods of the main grid, comma-separated."),
    teacher: str = typer.Option("models/pretrained/minilm-l6-icd10cm", help="Domain teacher (MLM-pretrained)."),
    other_teachers: str = typer.Option(
        "without MLM=minilm-l6",
        help="Teacher ablations, comma-separated NAME=PATH, e.g. 'ICD-10-CM only=models/pretrained/minilm-l6-icd10cm'.",
    ),
    ablations: str = typer.Option(
        "hidden only,attention only,all words", help=f"Ablations to run, comma-separated, from: {', '.join(ABLATIONS)}."
    ),
    seeds: int = typer.Option(5, help="Training seeds of the main grid."),
    seeds_ablation: int = typer.Option(3, help="Training seeds of each ablation."),
    epochs: int = typer.Option(3, help="Epochs of every run."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    groups: str = typer.Option("main,ablation", help="Which parts of the grid to run: main, ablation."),
    report_only: bool = typer.Option(False, help="Train nothing: report the runs of the grid that have finished."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    styles = [render] + [s for s in _items(evaluate_on) if s != render]
    unknown = [s for s in styles if s not in RENDER_STYLES] + [a for a in _items(ablations) if a not in ABLATIONS]
    if unknown:
        raise typer.BadParameter(f"unknown rendering or ablation: {', '.join(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    split_file = out / "split.json"
    if not split_file.is_file():
        make_split(load_ktas(), seed=SPLIT_SEED).save(split_file)
    recipe = TrainingArguments(
        out="",
        epochs=epochs,
        patience=2,
        batch_size=16,
        encoder_lr=5e-5,
        head_lr=1e-3,
        freeze_embeddings=True,
        threads=threads,
    )
    others = dict(item.split("=", 1) for item in _items(other_teachers))
    configs = grid(_items(students), teacher, others, _items(ablations))
    main_methods = _items(methods)
    configs = [c for c in configs if c.group in groups.split(",") and (c.group != "main" or c.method in main_methods)]
    runs = []
    for config in configs:
        for seed in range(seeds if config.group == "main" else seeds_ablation):
            if report_only and not (run_dir(out, config, seed) / "wall_seconds.json").is_file():
                continue
            runs.append(train(config, seed, out, split_file, recipe, render, styles))
            log.info("%s seed %d: %.0f s", config.name, seed, runs[-1]["wall_seconds"])
    configs = [c for c in configs if any(r["config"] == c.name for r in runs)]

    stem = "ktas_dsgkd" if render == "shorthand" else f"ktas_dsgkd_{render}"
    sections, nurse = {}, {}
    for style in styles:
        table, paired, reference = summarise(runs, configs, style, n_resamples=1000)
        sections[style] = (table, paired)
        nurse = nurse or reference  # the nurse's figures do not depend on the rendering
    figures(runs, configs, render, nurse, docs, stem)
    n_test = len(runs[0]["predictions"][render])
    total_minutes = sum(r["wall_seconds"] for r in runs) / 60
    page = markdown(sections, nurse, recipe, render, teacher, total_minutes, n_test, stem)
    (docs / f"{stem}.md").write_text(page)
    (docs / f"{stem}.json").write_text(
        json.dumps(
            {
                "render": render,
                "renderings": {
                    style: {"table": table.to_dict("records"), "paired": paired}
                    for style, (table, paired) in sections.items()
                },
                "nurse": nurse,
                "total_minutes": total_minutes,
            },
            indent=2,
            default=float,
        )
    )
    print(page)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


if __name__ == "__main__":
    typer.run(main)
