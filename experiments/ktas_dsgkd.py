"""DSG-KD vs plain fine-tuning on the bundled KTAS data: several seeds, one split, one budget.

Grid (every run: same split, same recipe, `--seeds` training seeds):
  main       for each student/teacher pair: base, mlkd, ensemble
  ablations  student e5-small, mlkd: hidden loss only, attention loss only, all words (not only Latin),
             and a teacher without the domain MLM pretraining (`--seeds-ablation` seeds)

Each run is `training.fit` (its own test report under <out>/runs/<name>/eval/). Runs already finished are
reused, so a stopped experiment resumes. Then the results page: test metrics averaged over seeds with 95%
bootstrap CIs over test notes, the paired mlkd - base difference, the nurses' own triage (KTAS_RN) on the
same test notes as the human reference, ROC and reliability figures.

    python experiments/ktas_dsgkd.py --out runs/experiment --docs docs/results
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

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.data.ktas import BUNDLED_KTAS, load_ktas
from training.data.readers import read_table
from training.data.split import make_split
from training.evaluate import compute_metrics, reliability_bins, resample_indices, resampled_metrics
from training.fit import fit
from training.run_dir import RunDirectory

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


def grid(teacher: str, general_teacher: str) -> list[Config]:
    configs = []
    for student in ("e5-small", "minilm-l6"):
        configs.append(Config(f"{student}/base", "main", student, "base"))
        for method in ("mlkd", "ensemble"):
            configs.append(Config(f"{student}/{method}", "main", student, method, teacher))
    configs += [
        Config("e5-small/mlkd hidden only", "ablation", "e5-small", "mlkd", teacher, {"beta": 0.0}),
        Config("e5-small/mlkd attention only", "ablation", "e5-small", "mlkd", teacher, {"alpha": 0.0}),
        Config("e5-small/mlkd all words", "ablation", "e5-small", "mlkd", teacher, {"word_policy": "all"}),
        Config("e5-small/mlkd teacher without MLM", "ablation", "e5-small", "mlkd", general_teacher),
    ]
    return configs


def run_dir(out: Path, config: Config, seed: int) -> Path:
    return out / "runs" / config.name.replace("/", "__").replace(" ", "-") / f"seed-{seed}"


def train(config: Config, seed: int, out: Path, split_file: Path, recipe: TrainingArguments) -> dict:
    """Fit one run unless it finished before; returns its threshold, test predictions and wall time."""
    directory = run_dir(out, config, seed)
    run = RunDirectory(directory)
    predictions = run.predictions_file()
    timing = directory / "wall_seconds.json"
    if not (predictions.is_file() and timing.is_file()):
        shutil.rmtree(directory, ignore_errors=True)  # a run stopped half-way starts over
        start = time.perf_counter()
        fit(
            DataArguments(data="ktas", split_file=str(split_file)),
            ModelArguments(student=config.student, teacher=config.teacher, max_length=128),
            replace(recipe, out=str(directory), method=config.method, seed=seed),
            DistillArguments(**config.distill),
            EvalArguments(),
        )
        timing.write_text(json.dumps({"wall_seconds": round(time.perf_counter() - start, 1)}))
    decision = run.decision()
    return {
        "config": config.name,
        "seed": seed,
        "threshold": decision["threshold"],
        "predictions": pd.read_csv(predictions),
        "wall_seconds": json.loads(timing.read_text())["wall_seconds"],
    }


def nurse_scores(row_ids: np.ndarray) -> np.ndarray:
    """The triage nurse's KTAS level as a score in [0, 1] (level 1 -> 1, level 5 -> 0): at 0.5 it calls
    levels 1-3 an emergency, exactly as `training.data.ktas` maps the expert's levels to labels."""
    levels = pd.to_numeric(read_table(BUNDLED_KTAS, delimiter=";")["KTAS_RN"]).to_numpy()[row_ids]
    return (5 - levels) / 4


def summarise(runs: list[dict], configs: list[Config], n_resamples: int) -> tuple[pd.DataFrame, dict, dict]:
    """Per config: seed-mean of each metric with a 95% CI from resampling test notes (every run scored on
    the same resamples), and the seed-to-seed SD. Also the paired DSG-KD - base differences per student,
    and the triage nurse's figures on the same notes."""
    first = runs[0]["predictions"]
    if any(not r["predictions"]["row_id"].equals(first["row_id"]) for r in runs):
        raise RuntimeError("runs were tested on different notes: they must share one split")
    labels = first["label"].to_numpy()
    indices = resample_indices(labels, n_resamples, seed=0)

    rows, points, resampled_means = [], {}, {}
    for config in configs:
        seeds = [r for r in runs if r["config"] == config.name]
        points[config.name] = {
            r["seed"]: compute_metrics(labels, r["predictions"]["p_emergency"], r["threshold"]) for r in seeds
        }
        resampled = [resampled_metrics(labels, r["predictions"]["p_emergency"], r["threshold"], indices) for r in seeds]
        resampled_means[config.name] = {m: np.mean([x[m] for x in resampled], axis=0) for m in METRICS}
        row = {
            "config": config.name,
            "group": config.group,
            "seeds": len(seeds),
            "minutes_per_run": np.mean([r["wall_seconds"] for r in seeds]) / 60,
        }
        for m in METRICS:
            values = np.array([p[m] for p in points[config.name].values()])
            low, high = np.percentile(resampled_means[config.name][m], [2.5, 97.5])
            row |= {m: values.mean(), f"{m}_low": low, f"{m}_high": high, f"{m}_sd": values.std(ddof=1)}
        rows.append(row)

    paired = {}
    for config in configs:
        if config.group != "main" or config.method == "base":
            continue
        method, base = points[config.name], points[f"{config.student}/base"]
        differences = np.array([method[s]["auroc"] - base[s]["auroc"] for s in sorted(method) if s in base])
        resampled = resampled_means[config.name]["auroc"] - resampled_means[f"{config.student}/base"]["auroc"]
        paired[f"{config.name} - base"] = {
            "mean": float(differences.mean()),
            "low": float(np.percentile(resampled, 2.5)),
            "high": float(np.percentile(resampled, 97.5)),
            "seed_sd": float(differences.std(ddof=1)),
            "seeds_better": int((differences > 0).sum()),
            "seeds": int(differences.size),
        }

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


def figures(runs: list[dict], configs: list[Config], nurse: dict, docs: Path) -> None:
    """ROC and reliability curves of the main methods, one panel per student, each curve pooled over seeds;
    the nurse's operating point on the ROC panels."""
    students = sorted({c.student for c in configs if c.group == "main"})
    for kind in ("roc", "reliability"):
        figure = Figure(figsize=(6 * len(students), 5.2))
        axes = figure.subplots(1, len(students), squeeze=False)
        for ax, student in zip(axes[0], students, strict=True):
            for config in (c for c in configs if c.group == "main" and c.student == student):
                frames = [r["predictions"] for r in runs if r["config"] == config.name]
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
        figure.suptitle(f"KTAS test split: {kind.upper() if kind == 'roc' else 'reliability'}")
        figure.tight_layout()
        figure.savefig(docs / f"{kind}.png", dpi=110)


def markdown(
    table: pd.DataFrame,
    paired: dict,
    reference: dict,
    recipe: TrainingArguments,
    teacher: str,
    total_minutes: float,
    n_test: int,
) -> str:
    def cell(row, m):
        return f"{row[m]:.3f} [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}] ±{row[m + '_sd']:.3f}"

    lines = [
        "# KTAS: DSG-KD vs plain fine-tuning (generated by `experiments/ktas_dsgkd.py`)",
        "",
        f"Test split: {n_test} notes (split seed {SPLIT_SEED}, 70/15/15 stratified), the same for every run. "
        f"Recipe for every run: {recipe.epochs} epochs (patience {recipe.patience}), batch {recipe.batch_size}, "
        f"encoder lr {recipe.encoder_lr}, head lr {recipe.head_lr}, word embedding frozen, max 128 tokens, "
        f"checkpoint with the best validation AUROC, threshold = training prevalence. Teacher: `{teacher}`.",
        "",
        "Cells: mean over seeds [95% CI: bootstrap over test notes of the seed mean, 1,000 resamples] "
        "±SD over seeds. Sensitivity, specificity and F1 are at each run's threshold.",
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
        "## Paired: test AUROC of a DSG-KD method minus base, same seeds",
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
        "## Human reference: the triage nurse (KTAS_RN) against the expert (KTAS_expert), same test notes",
        "",
        "| metric | value [95% CI] |",
        "|---|---|",
    ]
    for m, v in reference.items():
        lines.append(f"| {m} | {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}] |")
    lines += [
        "",
        "AUROC of the nurse is that of the 5-level KTAS_RN as a score; the other figures are at "
        "levels 1-3 = emergency.",
        "",
        f"Total wall time of the runs: {total_minutes:.0f} min.",
        "",
        "![ROC](roc.png)",
        "",
        "![Reliability](reliability.png)",
        "",
    ]
    return "\n".join(lines)


def main(
    out: Path = typer.Option(Path("runs/experiment"), help="Where the runs go (reused: the experiment resumes)."),
    docs: Path = typer.Option(Path("docs/results"), help="Where the results page and figures go."),
    teacher: str = typer.Option("models/pretrained/minilm-l6-icd10cm", help="Domain teacher (MLM-pretrained)."),
    general_teacher: str = typer.Option("minilm-l6", help="The same teacher before domain pretraining (ablation)."),
    seeds: int = typer.Option(5, help="Training seeds of the main grid."),
    seeds_ablation: int = typer.Option(3, help="Training seeds of each ablation."),
    epochs: int = typer.Option(3, help="Epochs of every run."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    groups: str = typer.Option("main,ablation", help="Which parts of the grid to run: main, ablation."),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    configs = [c for c in grid(teacher, general_teacher) if c.group in groups.split(",")]
    runs = []
    for config in configs:
        for seed in range(seeds if config.group == "main" else seeds_ablation):
            runs.append(train(config, seed, out, split_file, recipe))
            log.info("%s seed %d: %.0f s", config.name, seed, runs[-1]["wall_seconds"])

    table, paired, reference = summarise(runs, configs, n_resamples=1000)
    figures(runs, configs, reference, docs)
    n_test = len(runs[0]["predictions"])
    total_minutes = sum(r["wall_seconds"] for r in runs) / 60
    (docs / "ktas_dsgkd.md").write_text(markdown(table, paired, reference, recipe, teacher, total_minutes, n_test))
    (docs / "ktas_dsgkd.json").write_text(
        json.dumps(
            {"table": table.to_dict("records"), "paired": paired, "nurse": reference, "total_minutes": total_minutes},
            indent=2,
            default=float,
        )
    )
    print((docs / "ktas_dsgkd.md").read_text())


if __name__ == "__main__":
    typer.run(main)
