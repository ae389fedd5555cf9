"""The DSG-KD training objective: the student's cross-entropy plus word-level distillation from the teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.config import DistillArguments, Method, ModelArguments, WordPolicy
from training.data.examples import Examples
from training.distill.align import align_words
from training.distill.cache import TeacherCache, default_cache_dir, load_or_build
from training.distill.losses import MultiLevelDistillLoss, logit_distill_loss
from training.distill.teacher import TeacherOutputs, load_teacher, run_teacher
from training.errors import ConfigError
from training.modeling import load_tokenizer, position_limit, to_device
from training.objectives import model_inputs


@dataclass
class DistillCollator:
    """Tokenizes a batch for both models and aligns them on shared words (index tensors, see align.py)."""

    examples: Examples
    tokenizer: PreTrainedTokenizerBase
    teacher_tokenizer: PreTrainedTokenizerBase
    max_length: int
    teacher_max_length: int
    word_policy: WordPolicy
    max_words: int

    def __call__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        texts = [self.examples.texts[i] for i in positions]
        student = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        teacher = self.teacher_tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.teacher_max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        alignment = align_words(
            texts, student.pop("offset_mapping"), teacher.pop("offset_mapping"), self.word_policy, self.max_words
        )
        batch = {k: v for k, v in student.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch.update(
            teacher_input_ids=teacher["input_ids"],
            teacher_attention_mask=teacher["attention_mask"],
            word_index=alignment.student_word_index,
            teacher_word_index=alignment.teacher_word_index,
            word_mask=alignment.word_mask,
            words_lost_student=torch.tensor(alignment.lost_student),
            words_lost_teacher=torch.tensor(alignment.lost_teacher),
            words_over_max=torch.tensor(alignment.over_max_words),
            labels=torch.as_tensor(self.examples.labels[positions]),
            positions=torch.as_tensor(positions),
        )
        return batch


class DistillObjective:
    """`mlkd`: CE + alpha * hidden loss + beta * attention loss (+ optional logit distillation)."""

    def __init__(
        self,
        tokenizer,
        teacher_tokenizer,
        teacher: PreTrainedModel,
        loss: MultiLevelDistillLoss,
        args: DistillArguments,
        max_length: int,
        teacher_max_length: int,
        logit_weight: float,
    ):
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.teacher: PreTrainedModel | None = teacher  # None once the cache replaces it
        self.distill_loss, self.args = loss, args
        self.max_length, self.teacher_max_length = max_length, teacher_max_length
        self.logit_weight = logit_weight  # --logit-weight, or the method's default (DistillArguments.logit_weight_for)
        self.cache: TeacherCache | None = None

    def collator(self, examples: Examples) -> DistillCollator:
        return DistillCollator(
            examples,
            self.tokenizer,
            self.teacher_tokenizer,
            self.max_length,
            self.teacher_max_length,
            self.args.word_policy,
            self.args.max_words,
        )

    def extra_modules(self) -> list[nn.Module]:
        return [self.distill_loss]

    def count_words(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["word_mask"].sum())

    def build_cache(self, examples: Examples, batch_size: int, device: torch.device) -> None:
        """Replaces the teacher by its targets for `examples`, from the disk cache (see cache.py): reused when a
        run with the same notes, teacher and options made them, else computed now."""
        if self.teacher is None:
            raise RuntimeError("the teacher cache is built already")
        root = Path(self.args.teacher_cache_dir) if self.args.teacher_cache_dir else default_cache_dir()
        collator = self.collator(examples)
        self.cache = load_or_build(root, collator, self.teacher, self.distill_loss, device, batch_size)
        self.teacher = None  # the cache replaces it: free its memory

    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> TeacherOutputs:
        if self.cache is not None:
            return self.cache.lookup(batch["positions"], batch["word_mask"].shape[1], batch["word_mask"].device)
        if self.teacher is None:
            raise RuntimeError("neither a teacher nor a teacher cache")
        return run_teacher(self.teacher, self.distill_loss, batch)

    def loss(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], accum_steps: int, accum_words: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss, and its logs: losses (floats, averaged per epoch by fit) and word counts (ints,
        summed per epoch): aligned words, and candidate words lost to either model's truncation or --max-words."""
        outputs = model(**model_inputs(batch), output_hidden_states=True, output_attentions=True)
        ce = F.cross_entropy(outputs.logits.float(), batch["labels"])
        teacher = self.teacher_outputs(batch)
        kd = self.distill_loss(
            outputs.hidden_states,
            outputs.attentions,
            batch["word_index"],
            batch["word_mask"],
            teacher.words,
            normalizer=accum_words,
        )
        total = ce / accum_steps + kd.total
        # kd's terms are this pass's share of the step's loss per aligned word (divided by the words of all the
        # step's passes): times the passes, the mean of an epoch's logs is the loss per word.
        logs = {
            "ce": ce.item(),
            "hidden": kd.hidden.item() * accum_steps,
            "attention": kd.attention.item() * accum_steps,
            "words": kd.num_words,
            "words_lost_student": int(batch["words_lost_student"]),
            "words_lost_teacher": int(batch["words_lost_teacher"]),
            "words_over_max": int(batch["words_over_max"]),
        }
        target, target_loss = self.prediction_target(teacher, outputs.logits.float(), batch["labels"])
        if target is not None:
            logit = logit_distill_loss(outputs.logits.float(), target, self.args.temperature)
            total = total + (self.logit_weight * logit + target_loss) / accum_steps
            logs["logit"] = logit.item()
        return total, logs

    def prediction_target(
        self, teacher: TeacherOutputs, student_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits the student's prediction is distilled towards (if any), and the loss of what made them."""
        target = teacher.logits if self.logit_weight > 0 else None
        return target, torch.zeros((), device=student_logits.device)


class EnsembleObjective(DistillObjective):
    """`ensemble`: mlkd, plus distillation of the student's prediction towards a teacher-student ensemble.

    A linear probe on the frozen teacher's mean-pooled last layer learns the task alongside the student
    (cross-entropy); the average of the probe's and the student's logits is the ensemble, whose softened
    prediction (detached) the student is distilled towards, as in on-the-fly native ensemble distillation
    (Lan et al., NeurIPS 2018). Only the student is deployed: the probe, like the projection, is a training
    aid. See the README ("MLKD-Ensemble") for why this definition.
    """

    def __init__(self, *args, probe: nn.Linear, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe = probe

    def extra_modules(self) -> list[nn.Module]:
        return [self.distill_loss, self.probe]

    def prediction_target(
        self, teacher: TeacherOutputs, student_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probe_logits = self.probe(teacher.sentence)
        return ((student_logits + probe_logits) / 2).detach(), F.cross_entropy(probe_logits, labels)


def build_distill_objective(
    method: Method,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_args: ModelArguments,
    args: DistillArguments,
    train: Examples,
    device: torch.device,
) -> DistillObjective:
    if not model_args.teacher:
        raise ConfigError(f"--method {method} needs --teacher")
    logit_weight = args.logit_weight_for(method)
    uses_teacher_head = method == "mlkd" and logit_weight > 0
    teacher = to_device(load_teacher(model_args.teacher, with_head=uses_teacher_head), device)
    if uses_teacher_head and teacher.config.num_labels != model.config.num_labels:
        raise ConfigError("--logit-weight with mlkd needs a teacher with a two-label classification head")
    loss = MultiLevelDistillLoss(model.config, teacher.config, args).to(device)
    teacher_tokenizer = load_tokenizer(model_args.teacher)
    teacher_limit = position_limit(teacher, teacher_tokenizer)
    teacher_max_length = teacher_limit if args.teacher_max_length is None else args.teacher_max_length
    if teacher_max_length > teacher_limit:
        raise ConfigError(
            f"--teacher-max-length {teacher_max_length} is more than the teacher can read ({teacher_limit} tokens)"
        )
    parts = (tokenizer, teacher_tokenizer, teacher, loss, args, model_args.max_length, teacher_max_length, logit_weight)
    objective: DistillObjective
    if method == "ensemble":
        probe = nn.Linear(teacher.config.hidden_size, model.config.num_labels).to(device)
        objective = EnsembleObjective(*parts, probe=probe)
    else:
        objective = DistillObjective(*parts)
    if args.teacher_cache:
        objective.build_cache(train, batch_size=32, device=device)
    return objective
