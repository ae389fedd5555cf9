"""Options of every training command, one dataclass per concern (as in Hugging Face's run_glue.py).

The CLI turns each field into a flag with the field's help text; a YAML/JSON file may hold the same
options (flags given on the command line win). Every option is checked when its dataclass is built,
before anything heavy is imported or trained: closed choices are `Literal` types (the CLI lists the
allowed values, and values read from a config file are checked against the same lists), ranges and
combinations are checked in `__post_init__`, and each error names the option. This module must not
import torch or transformers.
"""

from __future__ import annotations

import codecs
import json
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from training.errors import ConfigError

__all__ = [
    "ATTENTION_HEADS",
    "ATTENTION_LOSSES",
    "CALIBRATION_METHODS",
    "DATA_FORMATS",
    "HIDDEN_LOSSES",
    "METHODS",
    "RENDER_STYLES",
    "SELECT_METRICS",
    "THRESHOLD_POLICIES",
    "WORD_POLICIES",
    "AttentionHeads",
    "AttentionLoss",
    "CalibrationMethod",
    "ConfigError",
    "DataArguments",
    "DataFormat",
    "DistillArguments",
    "EvalArguments",
    "HiddenLoss",
    "Int8MatMuls",
    "LayerMap",
    "Method",
    "ModelArguments",
    "Precision",
    "PretrainArguments",
    "RenderStyle",
    "ReportTo",
    "SelectMetric",
    "ThresholdPolicy",
    "TrainingArguments",
    "WordPolicy",
    "check_fit_options",
    "flag",
    "parse_layer_map",
]

Method = Literal["base", "mlkd", "ensemble", "layer-kd"]
SelectMetric = Literal["auroc", "brier", "loss", "f1"]  # the validation metrics a best checkpoint is kept for
ThresholdPolicy = Literal["prevalence", "fixed-0.5", "target-sensitivity"]
CalibrationMethod = Literal["auto", "none", "temperature", "platt"]
DataFormat = Literal["auto", "ktas", "table"]
RenderStyle = Literal["shorthand", "narrative", "ko", "mixed"]  # renderings of KTAS records (training/data/render.py)
WordPolicy = Literal["latin", "all"]
HiddenLoss = Literal["mse", "cosine", "relation"]
AttentionLoss = Literal["mse", "kl"]
AttentionHeads = Literal["mean", "by-index"]
ReportTo = Literal["none", "tensorboard", "mlflow"]  # experiment trackers (training/tracking.py)
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # of training steps (training/precision.py)
LayerMap = list[tuple[int, int]]  # (student layer, teacher layer) pairs, counted from 1
Int8MatMuls = Literal["auto", "all", "except-ffn-down"]  # what `export` quantizes in the int8 variant

METHODS: tuple[Method, ...] = get_args(Method)
SELECT_METRICS: tuple[SelectMetric, ...] = get_args(SelectMetric)
THRESHOLD_POLICIES: tuple[ThresholdPolicy, ...] = get_args(ThresholdPolicy)
CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = get_args(CalibrationMethod)
DATA_FORMATS: tuple[DataFormat, ...] = get_args(DataFormat)
RENDER_STYLES: tuple[RenderStyle, ...] = get_args(RenderStyle)
WORD_POLICIES: tuple[WordPolicy, ...] = get_args(WordPolicy)
HIDDEN_LOSSES: tuple[HiddenLoss, ...] = get_args(HiddenLoss)
ATTENTION_LOSSES: tuple[AttentionLoss, ...] = get_args(AttentionLoss)
ATTENTION_HEADS: tuple[AttentionHeads, ...] = get_args(AttentionHeads)

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def flag(name: str) -> str:
    """The command-line flag of a field: `threshold_policy` -> `--threshold-policy`."""
    return "--" + name.replace("_", "-")


def _literal_values(kind: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) type; () for any other type."""
    if get_origin(kind) is Literal:
        return get_args(kind)
    return tuple(v for arg in get_args(kind) if get_origin(arg) is Literal for v in get_args(arg))


def _check_choices(options: Any) -> None:
    """Values of `Literal` fields must be one of the allowed values (a config file bypasses the CLI's check)."""
    hints = typing.get_type_hints(type(options))
    for f in fields(options):
        allowed = _literal_values(hints[f.name])
        value = getattr(options, f.name)
        if allowed and value is not None and value not in allowed:
            raise ConfigError(f"{flag(f.name)}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def _at_least(options: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{flag(name)} must be at least {minimum}, got {value}")


def _positive(options: Any, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{flag(name)} must be positive, got {value}")


def _fraction(options: Any, *names: str, low_open: bool = True, high_open: bool = True) -> None:
    for name in names:
        value = getattr(options, name)
        above = value > 0 if low_open else value >= 0
        below = value < 1 if high_open else value <= 1
        if not (above and below):
            interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            raise ConfigError(f"{flag(name)} must be in {interval}, got {value}")


def parse_layer_map(spec: str | None) -> LayerMap | None:
    """'2:1,4:2' -> [(2, 1), (4, 2)] (student layer : teacher layer, counted from 1); None or '' -> None."""
    if not spec:
        return None
    pairs: LayerMap = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        try:
            student, teacher = (int(p) for p in parts)
        except ValueError as err:
            raise ConfigError(f"--layer-map {spec!r}: expected pairs like '2:1,4:2'") from err
        if student < 1 or teacher < 1:
            raise ConfigError(
                f"--layer-map {spec!r}: layers count from 1 (the embeddings are not mapped), got {item.strip()!r}"
            )
        pairs.append((student, teacher))
    return pairs


@dataclass
class DataArguments:
    data: str = field(
        default="ktas", metadata={"help": "'ktas' (the bundled KTAS data) or a path to a CSV/TSV/JSONL/Parquet file."}
    )
    data_format: DataFormat = field(
        default="auto",
        metadata={
            "help": "'ktas' builds triage notes from KTAS columns; 'table' reads text/label columns; "
            "'auto' picks 'ktas' for --data ktas."
        },
    )
    text_columns: list[str] = field(
        default_factory=lambda: ["text"],
        metadata={"help": "Text column(s) of a table; several are joined with newlines."},
    )
    label_column: str = field(default="label", metadata={"help": "Label column of a table."})
    label_map: str | None = field(
        default=None,
        metadata={
            "help": "Map raw labels to 0/1, e.g. '1=1,2=1,3=1,4=0,5=0' or 'yes=emergency,no=non-emergency'. "
            "Default: 0/1 or the label names."
        },
    )
    delimiter: str | None = field(
        default=None, metadata={"help": "Delimiter of a CSV/TSV file (sniffed when not given)."}
    )
    encoding: str | None = field(
        default=None,
        metadata={
            "help": "Text encoding of a CSV/TSV/JSONL file, e.g. cp949 or euc-kr. Default: UTF-8, else detected "
            "(Korean CP949/EUC-KR are read as such; another guess must be confirmed with this option)."
        },
    )
    drop_empty: bool = field(
        default=False, metadata={"help": "Drop rows with empty text (the count is logged) instead of failing."}
    )
    valid_file: str | None = field(
        default=None,
        metadata={"help": "Use this file as the validation set (with --test-file) instead of splitting --data."},
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Use this file as the test set (with --valid-file) instead of splitting --data."},
    )
    split_file: str | None = field(
        default=None, metadata={"help": "Reuse the split (row ids) saved by an earlier run, e.g. runs/base/split.json."}
    )
    valid_fraction: float = field(default=0.15, metadata={"help": "Fraction of --data for validation when splitting."})
    test_fraction: float = field(default=0.15, metadata={"help": "Fraction of --data for test when splitting."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the stratified split."})
    render: RenderStyle = field(
        default="shorthand",
        metadata={
            "help": "How each KTAS record is written as a note: shorthand (the compact template), narrative "
            "(English sentences), ko (Korean ED-note style, English terms in Latin script), or mixed (a style "
            "drawn per record and per epoch for training; validation and test keep one fixed draw). Re-rendered "
            "real records, not real free text; the split is made on records, so no record crosses it."
        },
    )
    render_seed: int = field(
        default=0, metadata={"help": "Seed of the renderings' phrasing (with the record's row id, style and epoch)."}
    )

    @property
    def is_ktas(self) -> bool:
        """True when the notes are built from KTAS records (--data ktas, or --data-format ktas)."""
        return self.data_format == "ktas" or (self.data_format == "auto" and self.data == "ktas")

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.render != "shorthand" and not self.is_ktas:
            raise ConfigError(
                f"--render {self.render} re-renders KTAS records: it needs --data ktas or --data-format ktas, "
                f"not --data {self.data!r} with --data-format {self.data_format!r}"
            )
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError as err:
                raise ConfigError(f"--encoding: unknown encoding {self.encoding!r} (e.g. cp949, euc-kr)") from err
        if not self.text_columns:
            raise ConfigError("--text-columns: at least one column is needed")
        if bool(self.valid_file) != bool(self.test_file):
            raise ConfigError("--valid-file and --test-file go together")
        _fraction(self, "valid_fraction", "test_fraction")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"--valid-fraction {self.valid_fraction} + --test-fraction {self.test_fraction} leave no training data"
            )


@dataclass
class ModelArguments:
    student: str = field(
        default="e5-small",
        metadata={"help": "Student encoder: a shortcut (e5-small, minilm-l6), a local directory, or a hub id."},
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Frozen teacher: for mlkd/ensemble a domain encoder (shortcut, local directory or hub id); for "
            "layer-kd a fine-tuned classifier with the student's tokenizer (a checkpoint directory of a run)."
        },
    )
    student_layers: int | None = field(
        default=None,
        metadata={
            "help": "Keep only this many of the student's encoder layers, spread uniformly and ending on its last "
            "(6 of 12: layers 2, 4, .., 12), each initialised from the layer it replaces: a smaller, faster "
            "student, e.g. for --method layer-kd from the fine-tuned full-depth model. Default: all."
        },
    )
    max_length: int = field(
        default=384,
        metadata={
            "help": "Maximum tokens per note; longer notes are truncated "
            "(batches are padded only to their longest note)."
        },
    )

    def __post_init__(self) -> None:
        _at_least(self, 2, "max_length")  # room for the special tokens and one word
        _at_least(self, 1, "student_layers")


@dataclass
class TrainingArguments:
    out: str = field(default="runs/default", metadata={"help": "Run directory for checkpoints, logs and reports."})
    method: Method = field(
        default="base",
        metadata={
            "help": "base (plain fine-tuning), mlkd (DSG-KD), ensemble (DSG-KD with teacher-student logit "
            "ensemble), or layer-kd (distillation from a fine-tuned --teacher with the same tokenizer: logits, "
            "hidden states and attention maps token by token, on the --layer-map pairs)."
        },
    )
    epochs: int = field(default=10, metadata={"help": "Maximum number of epochs."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides --epochs when reached first)."}
    )
    batch_size: int = field(
        default=16,
        metadata={
            "help": "Notes per forward pass, of each process under torchrun: an optimizer step takes "
            "--batch-size x --grad-accum x processes notes."
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Notes per forward pass during evaluation."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes accumulated per optimizer step."})
    encoder_lr: float = field(
        default=3e-5, metadata={"help": "Learning rate of the encoder (the original work used 1e-5..1e-4)."}
    )
    head_lr: float = field(
        default=1e-3, metadata={"help": "Learning rate of the classification head and distillation projections."}
    )
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (not applied to biases and LayerNorm)."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps with linear learning-rate warmup."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    patience: int = field(
        default=3, metadata={"help": "Stop after this many epochs without improving --select-metric on validation."}
    )
    select_metric: SelectMetric = field(
        default="auroc",
        metadata={"help": "Validation metric for early stopping and the checkpoint evaluated on test."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for weights, batches and dropout."})
    device: str = field(
        default="auto", metadata={"help": "auto, cpu, mps or cuda[:N]; under torchrun, cuda is each process's own GPU."}
    )
    precision: Precision = field(
        default="auto",
        metadata={
            "help": "Precision of the training steps: fp32, or autocast to bf16 or fp16 (fp16 with a loss scaler); "
            "auto: bf16 on a CUDA GPU that has it, else fp16 there, fp32 elsewhere. The distillation losses and "
            "validation are computed in fp32 whatever this says."
        },
    )
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)."})
    quantization_aware: bool = field(
        default=False,
        metadata={
            "help": "Quantization-aware fine-tuning: every matrix product runs on int8-rounded weights and inputs "
            "(fake quantization, as the bundle's static int8 graph rounds them: weights per output channel, "
            "activation ranges taken on the first training notes at the start of each epoch; "
            "training/quantization.py), so that the weights adapt to the int8 variant's rounding. Meant for a "
            "short final run whose --student is a trained checkpoint."
        },
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Keep the word-embedding matrix fixed: with a large multilingual vocabulary "
            "(e5-small: 250k x 384) a step is much cheaper, and a small data set cannot move most rows anyway."
        },
    )
    checkpoint_steps: int | None = field(
        default=None,
        metadata={
            "help": "Also write the resumable state every this many optimizer steps (it is always written at the "
            "end of each epoch, to checkpoints/resume.pt, and removed when fit ends)."
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the stopped run in --out from its resumable state; every other option must be as in "
            "its run_config.json (except --checkpoint-steps and --threads)."
        },
    )
    report_to: ReportTo = field(
        default="none",
        metadata={
            "help": "Log options, per-epoch metrics, the test report and the exported bundle to mlflow, or to "
            "tensorboard (event files in <out>/tensorboard); needs the `tracking` extra."
        },
    )
    tracking_uri: str | None = field(
        default=None,
        metadata={
            "help": "MLflow tracking URI (--report-to mlflow); default: $MLFLOW_TRACKING_URI, else the SQLite "
            "store sqlite:///mlruns/mlflow.db (no server needed)."
        },
    )
    experiment_name: str = field(default="triage", metadata={"help": "MLflow experiment of the run."})

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.tracking_uri and self.report_to != "mlflow":
            raise ConfigError("--tracking-uri goes with --report-to mlflow")
        _at_least(self, 1, "epochs", "max_steps", "batch_size", "eval_batch_size", "grad_accum", "patience", "threads")
        _at_least(self, 1, "checkpoint_steps")
        _positive(self, "encoder_lr", "head_lr", "max_grad_norm")
        _at_least(self, 0, "weight_decay")
        _fraction(self, "warmup_ratio", low_open=False)
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"--device: {self.device!r} is not one of 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")


@dataclass
class DistillArguments:
    """Everything about distillation, from the word alignment to the loss weights (`mlkd`, `ensemble`)."""

    alpha: float = field(default=0.5, metadata={"help": "Weight of the word-level hidden-state loss added to the CE."})
    beta: float = field(default=0.1, metadata={"help": "Weight of the word-level attention loss added to the CE."})
    word_policy: WordPolicy = field(
        default="latin", metadata={"help": "Words to align: 'latin' (English terms) or 'all'."}
    )
    max_words: int = field(default=32, metadata={"help": "At most this many aligned words per note."})
    teacher_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum teacher tokens per note (default: the teacher's position limit, e.g. 512). The "
            "teacher's own budget: its tokenizer may cut a note into many more tokens than the student's (an "
            "English teacher splits Hangul into pieces), and a word either model truncates away is not distilled."
        },
    )
    hidden_loss: HiddenLoss = field(
        default="mse",
        metadata={
            "help": "Hidden-state loss of each aligned word, per mapped layer: mse (mean squared difference over "
            "the teacher's features) or cosine (1 - cosine similarity), both after a learned linear projection "
            "of the student's word state (one per mapped layer, trained with the student, never exported); or "
            "relation: each model's word-by-word cosine-similarity matrix over the note's aligned words, the "
            "student's row of a word compared to the teacher's by mean squared difference (no projection: "
            "independent of either model's coordinates and width)."
        },
    )
    attention_loss: AttentionLoss = field(
        default="kl",
        metadata={
            "help": "Attention loss of each aligned word's row of the word-by-word attention map, renormalised "
            "over the note's aligned words: kl (KL(teacher || student) of the row as a distribution) or mse "
            "(mean squared difference over the aligned words)."
        },
    )
    attention_heads: AttentionHeads = field(
        default="mean",
        metadata={
            "help": "Which heads' attention maps are compared: mean (each model's map averaged over its heads; "
            "the heads of two separately trained models do not correspond) or by-index (head i to head i; "
            "needs as many heads in both models)."
        },
    )
    layer_map: str | None = field(
        default=None,
        metadata={
            "help": "Student:teacher layer pairs counted from 1, e.g. '2:1,4:2,6:3'; "
            "default: one pair per layer of the shallower model, spread uniformly."
        },
    )
    logit_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of logit distillation; default: the method's (mlkd 0, ensemble 1, layer-kd 1). mlkd "
            "with a weight above 0 needs a teacher fine-tuned with a two-label classification head; 0 turns "
            "ensemble's term off."
        },
    )
    temperature: float = field(default=2.0, metadata={"help": "Temperature of logit distillation."})
    teacher_cache: bool = field(
        default=True,
        metadata={
            "help": "Compute the frozen teacher's word features once per dataset, on disk (--teacher-cache-dir), "
            "and reuse them every epoch and in every later run with the same notes, teacher and options "
            "(mlkd, ensemble; layer-kd's teacher runs on every batch)."
        },
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of teacher caches, one subdirectory per fingerprint of notes, teacher and options "
            "(default: <models dir>/teacher-cache, the models dir being $TRIAGE_MODELS_DIR or models/). "
            "A cache holds features of patient notes: keep it as private as the notes; delete it to free its space."
        },
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _at_least(self, 0, "alpha", "beta", "logit_weight")
        _at_least(self, 1, "max_words")
        _at_least(self, 2, "teacher_max_length")  # room for the special tokens and one word
        _positive(self, "temperature")
        parse_layer_map(self.layer_map)

    def logit_weight_for(self, method: Method) -> float:
        """--logit-weight, else the method's default: 1 for ensemble, whose ensemble target is what the method adds,
        and for layer-kd, whose teacher is a fine-tuned classifier; 0 for mlkd, whose teacher is usually
        MLM-pretrained and has no trained classification head."""
        if self.logit_weight is not None:
            return self.logit_weight
        return 1.0 if method in ("ensemble", "layer-kd") else 0.0

    @property
    def layer_pairs(self) -> LayerMap | None:
        """`layer_map` as (student layer, teacher layer) pairs; None: the uniform map (see `uniform_layer_map`)."""
        return parse_layer_map(self.layer_map)


@dataclass
class EvalArguments:
    threshold_policy: ThresholdPolicy = field(
        default="target-sensitivity",
        metadata={
            "help": "Decision threshold the model ships with: target-sensitivity (the highest threshold reaching "
            "--target-sensitivity on validation, the default: it protects patients), prevalence (training "
            "prevalence, the original rule), or fixed-0.5. The report shows all three."
        },
    )
    target_sensitivity: float = field(
        default=0.95, metadata={"help": "Sensitivity the target-sensitivity threshold must reach on validation."}
    )
    calibration: CalibrationMethod = field(
        default="auto",
        metadata={
            "help": "Calibration of P(emergency) fitted on the validation split: auto (temperature or Platt, "
            "chosen by cross-validation on it), temperature, platt, or none (the model's own softmax)."
        },
    )
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for 95% confidence intervals."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})

    def __post_init__(self) -> None:
        _check_choices(self)
        _fraction(self, "target_sensitivity", high_open=False)
        _at_least(self, 2, "bootstrap")


def check_fit_options(
    data: DataArguments,
    model: ModelArguments,
    training: TrainingArguments,
    distill: DistillArguments,
    evaluation: EvalArguments,
) -> None:
    """Checks across the option groups of `fit` (each group checks itself when built)."""
    if training.method != "base" and not model.teacher:
        raise ConfigError(f"--method {training.method} needs --teacher")
    if training.method in ("mlkd", "ensemble") and distill.teacher_cache and data.render == "mixed":
        raise ConfigError(
            "--render mixed re-draws the training notes every epoch, but --teacher-cache keeps the teacher's "
            "features of fixed notes: pass --no-teacher-cache (the teacher then runs on each epoch's notes)"
        )


HELDOUT_FRACTION = 0.05  # of a pretraining corpus's documents, held out for the MLM scores


@dataclass
class PretrainArguments:
    model: str = field(metadata={"help": "Encoder to pretrain: a Hugging Face hub id or a local directory."})
    corpus: str = field(
        metadata={
            "help": "Corpus: 'icd10cm' or a notes file "
            "(.csv, .tsv, .jsonl, .parquet: see text_column; .txt: one note per line)."
        }
    )
    out: Path = field(
        metadata={"help": "Output directory for the encoder and pretrain.json; rerunning with it resumes the run."}
    )
    text_column: str = field(default="text", metadata={"help": "Column of the notes file that holds the text."})
    max_length: int = field(default=128, metadata={"help": "Longer lines are truncated to this many tokens."})
    batch_size: int = field(default=32, metadata={"help": "Lines per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (not applied to biases and norms)."}
    )
    warmup_ratio: float = field(
        default=0.06, metadata={"help": "Fraction of the steps with linear learning-rate warmup."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradients are clipped to this global norm."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the corpus, unless max_steps is given."})
    max_steps: int | None = field(default=None, metadata={"help": "Number of optimizer steps; overrides epochs."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens (or words) to mask."})
    whole_word_mask: bool = field(
        default=False,
        metadata={
            "help": "Mask all sub-tokens of a word together (fast tokenizers only; masked tokens all become [MASK])."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Batch lines of similar length together: less padding, much faster on corpora of short lines."
        },
    )
    save_steps: int = field(default=500, metadata={"help": "Write a resumable checkpoint every this many steps."})
    log_steps: int = field(default=50, metadata={"help": "Record the mean training loss every this many steps."})
    heldout_fraction: float = field(
        default=HELDOUT_FRACTION,
        metadata={
            "help": "Hold out this fraction of the corpus's documents (ICD codes, notes; chosen by a hash of their "
            "names, whatever the seed) and report MLM loss/accuracy on them before and after; 0: none."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the MLM head, data order, masking and dropout."})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        _at_least(self, 1, "max_length", "batch_size", "save_steps", "log_steps", "max_steps")
        _positive(self, "epochs", "learning_rate", "max_grad_norm")
        _fraction(self, "mlm_probability")
        _fraction(self, "warmup_ratio", "heldout_fraction", low_open=False)
        _at_least(self, 0, "weight_decay")

    def options(self) -> dict[str, Any]:
        """The options as JSON values."""
        return json.loads(json.dumps(asdict(self), default=str))
