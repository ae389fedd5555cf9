"""Options of every training command, one dataclass per concern (as in Hugging Face's run_glue.py).

The CLI turns each field into a flag with the field's help text; a YAML/JSON file may hold the same
options (flags given on the command line win).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Options that contradict each other or name something unknown."""


@dataclass
class DataArguments:
    data: str = field(
        default="ktas", metadata={"help": "'ktas' (the bundled KTAS data) or a path to a CSV/TSV/JSONL/Parquet file."}
    )
    data_format: str = field(
        default="auto",
        metadata={
            "help": "'ktas' builds triage notes from KTAS columns; 'table' reads text/label columns; 'auto' picks 'ktas' for --data ktas."
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
            "help": "Map raw labels to 0/1, e.g. '1=1,2=1,3=1,4=0,5=0' or 'yes=emergency,no=non-emergency'. Default: 0/1 or the label names."
        },
    )
    delimiter: str | None = field(
        default=None, metadata={"help": "Delimiter of a CSV/TSV file (sniffed when not given)."}
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


@dataclass
class ModelArguments:
    student: str = field(
        default="e5-small",
        metadata={"help": "Student encoder: a shortcut (e5-small, minilm-l6), a local directory, or a hub id."},
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Frozen domain teacher for mlkd/ensemble: shortcut, local directory or hub id."}
    )
    max_length: int = field(
        default=384,
        metadata={
            "help": "Maximum tokens per note; longer notes are truncated (batches are padded only to their longest note)."
        },
    )


@dataclass
class TrainingArguments:
    out: str = field(default="runs/default", metadata={"help": "Run directory for checkpoints, logs and reports."})
    method: str = field(
        default="base",
        metadata={
            "help": "base (plain fine-tuning), mlkd (DSG-KD) or ensemble (DSG-KD with teacher-student logit ensemble)."
        },
    )
    epochs: int = field(default=10, metadata={"help": "Maximum number of epochs."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides --epochs when reached first)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Notes per forward pass."})
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
    select_metric: str = field(
        default="auroc",
        metadata={
            "help": "Validation metric for early stopping and the exported checkpoint: auroc, brier, loss or f1."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed for weights, batches and dropout."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]. Mixed precision is used on CUDA."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)."})
    freeze_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Keep the word-embedding matrix fixed: with a large multilingual vocabulary (e5-small: 250k x 384) a step is much cheaper, and a small data set cannot move most rows anyway."
        },
    )


@dataclass
class DistillArguments:
    alpha: float = field(default=0.5, metadata={"help": "Weight of the word-level hidden-state loss."})
    beta: float = field(default=0.1, metadata={"help": "Weight of the word-level attention loss."})
    word_policy: str = field(default="latin", metadata={"help": "Words to align: 'latin' (English terms) or 'all'."})
    max_words: int = field(default=32, metadata={"help": "At most this many aligned words per note."})
    hidden_loss: str = field(default="mse", metadata={"help": "Hidden-state loss: mse or cosine."})
    attention_loss: str = field(default="mse", metadata={"help": "Attention loss: mse or kl."})
    layer_map: str | None = field(
        default=None,
        metadata={"help": "Student:teacher layer pairs, e.g. '2:1,4:2,6:3'; default maps layers uniformly."},
    )
    logit_weight: float = field(
        default=0.0, metadata={"help": "Weight of logit distillation (needs a teacher with a classification head)."}
    )
    temperature: float = field(default=2.0, metadata={"help": "Temperature of logit distillation."})
    teacher_cache: bool = field(
        default=True,
        metadata={"help": "Compute the frozen teacher's word features once per dataset and reuse them every epoch."},
    )


@dataclass
class EvalArguments:
    threshold_policy: str = field(
        default="prevalence",
        metadata={
            "help": "Decision threshold for the model's label: prevalence (training prevalence, the original rule), fixed-0.5, or target-sensitivity."
        },
    )
    target_sensitivity: float = field(
        default=0.95, metadata={"help": "Sensitivity the target-sensitivity threshold must reach on validation."}
    )
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for 95% confidence intervals."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})


@dataclass
class PretrainArguments:
    model: str = field(metadata={"help": "Encoder to pretrain: a Hugging Face hub id or a local directory."})
    corpus: str = field(
        metadata={
            "help": "Corpus: 'icd10cm' or a notes file (.csv, .tsv, .jsonl, .parquet: see text_column; .txt: one note per line)."
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
    eval_lines: int = field(
        default=0,
        metadata={
            "help": "Hold out this many corpus lines and report MLM loss/accuracy on them before and after; 0: none."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the MLM head, data order, masking, dropout and hold-out."})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("max_length", "batch_size", "save_steps", "log_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"mlm_probability must be between 0 and 1, got {self.mlm_probability}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_lines < 0:
            raise ConfigError(f"eval_lines must not be negative, got {self.eval_lines}")

    def options(self) -> dict[str, Any]:
        """The options as JSON values."""
        return json.loads(json.dumps(asdict(self), default=str))
