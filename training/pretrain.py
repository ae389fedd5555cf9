"""Masked-LM pretraining of an encoder on an unlabelled corpus: how domain teachers for DSG-KD are made.

Layout of the output directory `out/`:

    config.json, model.safetensors, tokenizer files   the encoder without its MLM head (loads with AutoModel)
    pretrain.json                                     options, corpus (sources, licences, hash), steps, losses,
                                                      timings, held-out scores
    checkpoint/                                       the latest resumable state: MLM model, tokenizer and
                                                      trainer_state.pt (optimizer, scheduler, step, RNG states)

Rerunning with the same `out` resumes from `out/checkpoint/`.

The held-out documents (`split_heldout`) and their masks (`evaluate_mlm`'s defaults) depend on neither the seed nor
the training options, so the held-out scores of any two models that share a tokenizer compare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
    set_seed,
)

from training.config import PretrainArguments
from training.corpora import CorpusLine, corpus_sources, load_corpus

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
REPORT = "pretrain.json"
# Options that may differ when a run is resumed; a change to any other one makes it a different run.
RESUMABLE_OPTIONS = {"epochs", "max_steps", "save_steps", "log_steps"}
# With group_by_length, runs of this many batches are sorted by length (as in Hugging Face's LengthGroupedSampler).
LENGTH_GROUP_BATCHES = 50
# Attributes that hold the MLM head in BERT-like and RoBERTa-like models (see masked_token_logits).
MLM_HEAD_ATTRIBUTES = ("cls", "lm_head")


@dataclass(frozen=True)
class MlmScores:
    loss: float  # mean cross-entropy over the masked tokens
    accuracy: float  # top-1 accuracy over the masked tokens
    masked_tokens: int


@dataclass
class TrainerState:
    """Progress that a checkpoint carries besides the weights, optimizer, scheduler and RNG states."""

    step: int = 0
    # (step, mean training loss of the steps since the previous entry)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0  # time spent in training steps over all sessions, checkpoint writing excluded
    heldout_before: dict[str, float] | None = None


@dataclass
class MlmCollator(DataCollatorForLanguageModeling):
    """`DataCollatorForLanguageModeling` with dynamic padding that also works with `whole_word_mask=True`.

    Whole-word masking (which replaces the deprecated `DataCollatorForWholeWordMask` in transformers 4.57)
    reads each example's `offset_mapping`, but `tokenizer.pad` leaves that ragged; it is padded here.
    """

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:  # tokenized lines: dicts with input_ids...
        if self.whole_word_mask:
            longest = max(len(example["input_ids"]) for example in examples)
            side = self.tokenizer.padding_side
            examples = [
                {**example, "offset_mapping": _pad_offsets(example["offset_mapping"], longest, side)}
                for example in examples
            ]
        return super().torch_call(examples)


def pretrain(args: PretrainArguments) -> Path:
    """Pretrain `args.model` with masked-LM on `args.corpus`, resuming from `args.out/checkpoint` if present;
    returns `args.out`, which then holds the encoder (AutoModel format), its tokenizer and pretrain.json."""
    started = time.perf_counter()
    lines = load_corpus(args.corpus, args.text_column)
    corpus_hash = corpus_sha256([line.text for line in lines])
    train_lines, heldout_lines = split_heldout(lines, args.heldout_fraction)
    logger.info("corpus %s: %d lines, %d held out, sha256 %s", args.corpus, len(lines), len(heldout_lines), corpus_hash)

    checkpoint = args.out / CHECKPOINT_DIR
    resuming = (checkpoint / TRAINER_STATE).is_file()
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint if resuming else args.model)
    model = load_mlm_model(checkpoint if resuming else args.model)
    collator = make_collator(tokenizer, args.mlm_probability, args.whole_word_mask, args.seed)
    features = tokenize(tokenizer, train_lines, args.max_length, args.whole_word_mask)
    steps_per_epoch = math.ceil(len(features) / args.batch_size)
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)

    def heldout_scores() -> dict[str, float] | None:
        return asdict(evaluate_mlm(model, tokenizer, heldout_lines)) if heldout_lines else None

    if resuming:
        state = load_checkpoint(checkpoint, args, corpus_hash, optimizer, scheduler, collator)
        logger.info("resuming from step %d of %d", state.step, total_steps)
    else:
        state = TrainerState(heldout_before=heldout_scores())

    model.train()
    window: list[float] = []
    batches = shuffled_batches(features, collator, args.batch_size, args.group_by_length, args.seed, state.step)
    batches = islice(batches, total_steps - state.step)
    with tqdm(total=total_steps, initial=state.step, desc="MLM pretraining", unit="step") as progress:
        step_started = time.perf_counter()
        for batch in batches:
            window.append(_train_step(model, batch, optimizer, scheduler, args.max_grad_norm))
            state.step += 1
            progress.set_postfix(loss=f"{fmean(window):.4f}", refresh=False)
            progress.update()
            if state.step % args.log_steps == 0 or state.step == total_steps:
                state.loss_curve.append((state.step, fmean(window)))
                window.clear()
            state.train_seconds += time.perf_counter() - step_started
            if state.step % args.save_steps == 0 or state.step == total_steps:
                save_checkpoint(checkpoint, model, tokenizer, optimizer, scheduler, collator, state, args, corpus_hash)
            step_started = time.perf_counter()

    save_encoder(model, args.model, args.out)
    tokenizer.save_pretrained(args.out)
    report = {
        "options": args.options(),
        "corpus": {
            "sources": corpus_sources(args.corpus),
            "lines": len(lines),
            "train_lines": len(train_lines),
            "heldout_lines": len(heldout_lines),
            "sha256": corpus_hash,
        },
        "steps": state.step,
        "epochs_done": state.step / steps_per_epoch,
        "first_loss": state.loss_curve[0][1],
        "final_loss": state.loss_curve[-1][1],
        "loss_curve": state.loss_curve,
        "train_seconds": state.train_seconds,
        "steps_per_second": state.step / state.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "heldout_before": state.heldout_before,
        "heldout_after": heldout_scores(),
    }
    (args.out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("encoder saved to %s after %d steps, final loss %.4f", args.out, state.step, report["final_loss"])
    return args.out


@torch.inference_mode()
def evaluate_mlm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lines: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    mlm_probability: float = 0.15,
    whole_word_mask: bool = False,
    seed: int = 0,
) -> MlmScores:
    """Masked-token loss and top-1 accuracy of an MLM model on `lines`. The masks depend only on the lines,
    the tokenizer and the other arguments, so two models sharing a tokenizer (e.g. before and after pretraining)
    see the same ones."""
    collator = make_collator(tokenizer, mlm_probability, whole_word_mask, seed)
    features = tokenize(tokenizer, lines, max_length, whole_word_mask)
    was_training = model.training
    model.eval()
    loss_sum, correct, masked_tokens = 0.0, 0, 0
    for start in range(0, len(features), batch_size):
        logits, labels = masked_token_logits(model, collator(features[start : start + batch_size]))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == labels).sum())
        masked_tokens += len(labels)
    model.train(was_training)
    if masked_tokens == 0:
        raise ValueError(f"no token of the {len(lines)} evaluation lines was masked; give more lines")
    return MlmScores(loss=loss_sum / masked_tokens, accuracy=correct / masked_tokens, masked_tokens=masked_tokens)


def evaluate_heldout(source: str | Path, corpus: str, heldout_fraction: float, text_column: str = "text") -> MlmScores:
    """The held-out scores that pretrain reports, for any MLM model: compares teachers on one held-out set. `source`
    is a pretrain output directory (its checkpoint/ keeps the MLM head that the encoder it holds lacks) or a model
    directory or hub id that AutoModelForMaskedLM loads."""
    checkpoint = Path(source) / CHECKPOINT_DIR
    if (checkpoint / TRAINER_STATE).is_file():
        source = checkpoint
    _, heldout_lines = split_heldout(load_corpus(corpus, text_column), heldout_fraction)
    if not heldout_lines:
        raise ValueError(f"no document of corpus {corpus!r} is held out with fraction {heldout_fraction}")
    return evaluate_mlm(load_mlm_model(source), AutoTokenizer.from_pretrained(source), heldout_lines)


def masked_token_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLM logits, labels) of the masked tokens of `batch`. Where the model's MLM head is known, it runs on those
    tokens only instead of on every position as the model's own forward does ("sparse token prediction", Izsak et
    al. 2021): the same values, for about a sixth of the cost of the vocabulary projection."""
    labels = batch["labels"]
    masked = labels != -100
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    head = next((getattr(model, name) for name in MLM_HEAD_ATTRIBUTES if hasattr(model, name)), None)
    if head is None:
        return model(**inputs).logits[masked], labels[masked]
    return head(model.base_model(**inputs).last_hidden_state[masked]), labels[masked]


def load_mlm_model(source: str | Path) -> PreTrainedModel:
    """`AutoModelForMaskedLM` from `source`; an encoder-only checkpoint gets a freshly initialised MLM head."""
    model, loading = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
    if loading["missing_keys"]:
        logger.warning(
            "%s has no MLM head weights: freshly initialised %d tensors (%s)",
            source,
            len(loading["missing_keys"]),
            ", ".join(loading["missing_keys"]),
        )
    return model


def make_collator(
    tokenizer: PreTrainedTokenizerBase, mlm_probability: float, whole_word_mask: bool, seed: int
) -> MlmCollator:
    """Masks `mlm_probability` of the tokens (80% [MASK], 10% random, 10% kept) or, with `whole_word_mask`,
    of the words (all [MASK]: transformers supports no other replacement for whole words)."""
    collator = MlmCollator(
        tokenizer,
        mlm_probability=mlm_probability,
        whole_word_mask=whole_word_mask,
        mask_replace_prob=1.0 if whole_word_mask else 0.8,
        random_replace_prob=0.0 if whole_word_mask else 0.1,
    )
    # Set the generator here rather than through the collator's `seed` option, which ignores seed 0.
    collator.generator = torch.Generator().manual_seed(seed)
    return collator


def tokenize(
    tokenizer: PreTrainedTokenizerBase, lines: list[str], max_length: int, whole_word_mask: bool
) -> list[dict[str, list]]:
    """Unpadded, truncated encodings of `lines`, one dict per line, as the collator takes them."""
    if whole_word_mask and not tokenizer.is_fast:
        raise ValueError(
            f"whole-word masking needs a fast tokenizer (it reads offset mappings); {type(tokenizer).__name__} is not"
        )
    encoding = tokenizer(
        lines,
        truncation=True,
        max_length=max_length,
        return_special_tokens_mask=True,
        return_offsets_mapping=whole_word_mask,
    )
    return [dict(zip(encoding.keys(), values, strict=True)) for values in zip(*encoding.values(), strict=True)]


def split_heldout(lines: list[CorpusLine], fraction: float) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts), both in corpus order. Whole documents are held out, about `fraction` of
    them, chosen by a hash of the document's name: the same ones whatever the seed, the order of the corpus or
    the corpora joined to it (so an ICD code held out of `icd10cm` is held out of `icd10cm+icd10who` too)."""
    train: list[str] = []
    heldout: list[str] = []
    for line in lines:
        (heldout if is_heldout(line.document, fraction) else train).append(line.text)
    if not train:
        raise ValueError(f"holding out {fraction} of the documents leaves none of the {len(lines)} lines to train on")
    return train, heldout


def is_heldout(document: str, fraction: float) -> bool:
    """Whether `document` falls in the held-out `fraction`: the first 8 bytes of its SHA-256, as a fraction of 2**64."""
    digest = hashlib.sha256(document.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def corpus_sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def shuffled_batches(
    features: list[dict[str, list]],
    collator: Callable[[list[dict[str, list]]], dict[str, torch.Tensor]],
    batch_size: int,
    group_by_length: bool,
    seed: int,
    start_step: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches from step `start_step` on; epoch e is ordered by a permutation seeded with
    seed + e, so a resumed run sees the same batches as an uninterrupted one."""
    lengths = torch.tensor([len(feature["input_ids"]) for feature in features])
    steps_per_epoch = math.ceil(len(features) / batch_size)
    epoch, skipped_steps = divmod(start_step, steps_per_epoch)
    while True:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
        if group_by_length:
            groups = order.split(batch_size * LENGTH_GROUP_BATCHES)
            order = torch.cat([group[lengths[group].argsort(descending=True, stable=True)] for group in groups])
        positions = order.tolist()
        for start in range(skipped_steps * batch_size, len(positions), batch_size):
            yield collator([features[i] for i in positions[start : start + batch_size]])
        epoch, skipped_steps = epoch + 1, 0


def save_encoder(mlm_model: PreTrainedModel, source: str, out: Path) -> None:
    """Save the encoder of `mlm_model` in AutoModel format. MLM models carry no pooler, so the pooler
    (if any) is the one of `source`, the checkpoint pretraining started from."""
    encoder = AutoModel.from_pretrained(source)
    missing, unexpected = encoder.load_state_dict(mlm_model.base_model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(
            f"the MLM model's encoder does not match AutoModel of {source}: missing {missing}, unexpected {unexpected}"
        )
    encoder.save_pretrained(out)


def save_checkpoint(
    directory: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    collator: MlmCollator,
    state: TrainerState,
    args: PretrainArguments,
    corpus_hash: str,
) -> None:
    """Replace the checkpoint in `directory`; it is written aside first, so a crash never leaves half of one."""
    staging = directory.with_name(f"{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    torch.save(
        {
            "state": asdict(state),
            "options": args.options(),
            "corpus_sha256": corpus_hash,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "mask_rng": collator.generator.get_state(),
        },
        staging / TRAINER_STATE,
    )
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def load_checkpoint(
    directory: Path,
    args: PretrainArguments,
    corpus_hash: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    collator: MlmCollator,
) -> TrainerState:
    """Restore optimizer, scheduler and RNG states from `directory` after checking it belongs to this run."""
    saved = torch.load(directory / TRAINER_STATE)
    changed = {
        name: (saved["options"].get(name), value)
        for name, value in args.options().items()
        if name not in RESUMABLE_OPTIONS and saved["options"].get(name) != value
    }
    if changed:
        described = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        raise ValueError(f"{directory} belongs to a run with other options ({described}); use another out directory")
    if saved["corpus_sha256"] != corpus_hash:
        raise ValueError(f"the corpus changed since {directory} was written; use another out directory")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    collator.generator.set_state(saved["mask_rng"])
    return TrainerState(**saved["state"])


def _train_step(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> float:
    loss = F.cross_entropy(*masked_token_logits(model, batch))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _param_groups(model: PreTrainedModel, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: no weight decay on biases and normalisation weights (the 1-D parameters)."""
    params = [param for param in model.parameters() if param.requires_grad]
    return [
        {"params": [param for param in params if param.ndim >= 2], "weight_decay": weight_decay},
        {"params": [param for param in params if param.ndim < 2], "weight_decay": 0.0},
    ]


def _pad_offsets(offsets: list[tuple[int, int]], length: int, side: str) -> list[tuple[int, int]]:
    padding = [(0, 0)] * (length - len(offsets))
    return offsets + padding if side == "right" else padding + offsets
