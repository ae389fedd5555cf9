"""The model bundle's manifest: what the service needs to know about a model, validated on load."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
LABELS = ("non-emergency", "emergency")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Encoders(Strict):
    student: str = Field(description="The student encoder the model was fine-tuned from.")
    teacher: str | None = Field(
        None,
        description="The teacher distilled into the student, if any: a domain encoder (mlkd, ensemble) or a "
        "fine-tuned classifier with the student's tokenizer (layer-kd).",
    )
    method: str = Field(description="Training method: base, mlkd, ensemble or layer-kd.")
    layers: int | None = Field(None, gt=0, description="Encoder layers of the model (None: not recorded).")
    student_layers: int | None = Field(
        None, gt=0, description="fit --student-layers: the layers kept of the student it started from (None: all)."
    )
    quantization_aware: bool = Field(
        False, description="Fine-tuned with fake int8 quantization of every matrix product (fit --quantization-aware)."
    )


class Decision(Strict):
    threshold: float = Field(ge=0, le=1, description="P(emergency) at or above which a note is labelled emergency.")
    policy: str = Field(description="How the threshold was chosen: prevalence, fixed-0.5 or target-sensitivity.")
    target_sensitivity: float | None = Field(None, description="Validation sensitivity aimed at (target-sensitivity).")

    def label(self, probability: float) -> Literal["emergency", "non-emergency"]:
        """The label of a note with this P(emergency)."""
        return "emergency" if probability >= self.threshold else "non-emergency"


class Calibration(Strict):
    """P(emergency) = sigmoid(scale * (logit[emergency] - logit[non-emergency]) + bias). scale 1, bias 0 is the
    model's own softmax; temperature scaling T is scale 1/T, bias 0; Platt scaling fits both."""

    method: Literal["none", "temperature", "platt"] = "none"
    scale: float = Field(1.0, gt=0)
    bias: float = 0.0
    fitted_on: str | None = Field(None, description="The labelled notes it was fitted on, e.g. the validation split.")
    notes: int | None = Field(None, description="How many notes it was fitted on.")


class Recalibration(Strict):
    """A bundle recalibrated for a site (`python -m training recalibrate`): the same ONNX and tokenizer files as
    `source_version`, with a calibration and a decision threshold fitted on the site's own labelled notes."""

    source_version: str = Field(description="The version of the bundle that was recalibrated.")
    data_file: str = Field(description="The name of the site's data file (no path).")
    data_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the site's data file.")
    notes: int = Field(gt=0, description="Labelled notes of the site.")
    fit_notes: int = Field(gt=0, description="Notes the calibration and the threshold were fitted on.")
    check_notes: int = Field(gt=0, description="Held-out notes the before/after metrics were measured on.")
    prevalence: float = Field(ge=0, le=1, description="Fraction of emergencies among the site's notes.")
    split_seed: int = Field(description="Seed of the stratified fit/check split.")
    calibration_selection: dict[str, Any] = Field(description="How the calibration method was chosen.")
    before: dict[str, Any] = Field(
        description="Check-part metrics (95% bootstrap CIs) with the source bundle's calibration and threshold."
    )
    after: dict[str, Any] = Field(description="Check-part metrics with the new calibration and threshold.")


class Variant(Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int
    kept: bool = Field(
        description="In the bundle; a variant that failed its checks is listed with its figures, "
        "but its file is deleted."
    )
    max_abs_diff: float | None = Field(
        description="Largest |P_onnx - P_torch| on held-out notes "
        "(None: could not be run on the CPU provider, see note)."
    )
    label_agreement: float | None = Field(
        description="Fraction of held-out notes given the same label as PyTorch at the decision threshold."
    )
    valid_auroc: float | None
    auroc_drop: float | None = Field(description="Validation AUROC of PyTorch minus this variant's.")
    batch_shift: float | None = Field(
        None,
        description="Largest |P(note scored alone) - P(same note scored in a "
        "batch of 32)| on held-out notes: how much a note's result "
        "depends on the notes batched with it (None: not measured).",
    )
    note: str | None = Field(None, description="Why the variant was dropped or not evaluated.")
    checked_on: str | None = Field(
        None, description="The ONNX Runtime execution provider these figures were measured on (None: not recorded)."
    )
    probe_atol: float | None = Field(
        None,
        description="The largest |P(emergency) - fp32 reference| on the manifest's probe notes that the service "
        "accepts at start with this variant, on any provider (None: not measured).",
    )


class Probes(Strict):
    """SYNTHETIC notes written for the check (no patient's), and fp32's logit margins on them at export, on the CPU
    provider. At every start the service scores them with the variant it serves, on the provider in use, and is
    not ready when a P(emergency) differs from sigmoid(calibration of the margin) by more than the variant's
    `probe_atol`. Margins rather than probabilities, so that a recalibrated bundle keeps its reference."""

    notes: list[str] = Field(min_length=1)
    fp32_margins: list[float]
    batch_size: int = Field(1, gt=0, description="Most notes per model run when they were scored; scored so again.")

    @model_validator(mode="after")
    def _one_margin_per_note(self) -> Probes:
        if len(self.fp32_margins) != len(self.notes):
            raise ValueError(f"{len(self.notes)} notes but {len(self.fp32_margins)} fp32_margins")
        return self


class Manifest(Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created_at: datetime
    source_run: str
    encoders: Encoders
    labels: tuple[str, str] = LABELS
    decision: Decision
    calibration: Calibration = Field(
        default_factory=Calibration, description="Applied to the logits before the threshold (none: plain softmax)."
    )
    max_input_tokens: int = Field(gt=0, description="Most tokens of a note the model reads (its position limit).")
    trained_max_tokens: int | None = Field(
        None, description="Tokens per note at training (longer training notes were cut to their head)."
    )
    preprocessing: list[str] = Field(description="What is done to a note's text before tokenization.")
    test_metrics: dict[str, Any] = Field(
        description="Test-set metrics with 95% bootstrap CIs, as written by the evaluation."
    )
    variants: dict[str, Variant] = Field(description="ONNX files by variant name: fp32, int8, fp16.")
    tokenizer_files: dict[str, str] = Field(description="sha256 of each tokenizer file.")
    int8_matmuls: Literal["all", "except-ffn-down"] | None = Field(
        None,
        description="Which MatMuls the int8 variant quantizes: all, or all except the feed-forward "
        "down-projections, kept fp32 (None: not recorded).",
    )
    int8_rounds_outputs: bool | None = Field(
        None,
        description="Whether the int8 variant rounds each MatMul's output too (ONNX Runtime's QLinearMatMul), or "
        "only what each MatMul reads (None: not recorded).",
    )
    export_method: str = Field(description="optimum, or torch.onnx when optimum could not export the architecture.")
    library_versions: dict[str, str]
    recalibration: Recalibration | None = Field(
        None, description="Present when the calibration and threshold were refitted on a site's own notes."
    )
    probes: Probes | None = Field(
        None, description="What the service checks its variant against at start (None: exported before probes)."
    )

    @model_validator(mode="after")
    def _kept_variants_have_a_probe_tolerance(self) -> Manifest:
        if self.probes is not None:
            missing = [name for name, v in self.variants.items() if v.kept and v.probe_atol is None]
            if missing:
                raise ValueError(f"probes are given but variants {missing} have no probe_atol")
        return self
