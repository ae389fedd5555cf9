"""Word alignment between two tokenizers that cut the same raw text differently.

Student and teacher tokens do not correspond position by position, but both tokenizers report
each token's character span (`offset_mapping`). Words are cut from the raw text once, here, and
every token is labelled with the word whose characters it covers, so that each model's subword
states can later be pooled over the same words.

Word rules (`split_words`), chosen for Korean notes with embedded English medical terms:

- Latin word: a Latin letter followed by Latin letters, combining marks and digits, with internal
  hyphens or apostrophes joining such runs: "fever", "X-ray", "Crohn's", "COVID-19", "SpO2".
  A trailing or leading hyphen/apostrophe is not part of the word.
- Number: digits with dot-separated digit groups: "39.2", "2024.01.05". A comma ends a number, so
  the list "2,3" is two numbers. A sign is not part of a number.
- Hangul word: a run of Hangul letters.
- Other word: a run of letters of any other script (Hanja, Greek, Kana).
- A change of script ends a word, except digits inside a Latin word: "3회" is the number "3" and
  the Hangul word "회"; "fever로" is "fever" and the particle "로"; "2mg" is "2" and "mg".
- Punctuation, symbols and spaces are never part of a word.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import regex
import torch

from training.config import WORD_POLICIES, WordPolicy

Offsets = torch.Tensor | Sequence[Sequence[tuple[int, int]]]


class Script(enum.StrEnum):
    LATIN = "latin"
    NUMBER = "number"
    HANGUL = "hangul"
    OTHER = "other"


_WORD_PATTERN = regex.compile(
    r"""
    (?P<latin>\p{Latin}[\p{Latin}\p{M}\p{Nd}]*(?:['’\-‐][\p{Latin}\p{Nd}][\p{Latin}\p{M}\p{Nd}]*)*)
    | (?P<number>\p{Nd}+(?:\.\p{Nd}+)*)
    | (?P<hangul>[\p{Hangul}&&\p{L}]+)
    | (?P<other>[[\p{L}\p{M}]--\p{Latin}--\p{Hangul}]+)
    """,  # noqa: RUF001 (the right single quotation mark and the hyphen join words, as an apostrophe and "-" do)
    regex.VERBOSE | regex.V1,
)


@dataclass(frozen=True)
class Word:
    """Characters `start:end` of a text, holding no text itself (notes are private)."""

    start: int
    end: int
    script: Script


@dataclass
class WordAlignment:
    """Word slot of every token of both models for one batch; slot ids are 0..num_words-1, -1 for none."""

    student_word_index: torch.Tensor  # [B, T_s] long
    teacher_word_index: torch.Tensor  # [B, T_t] long
    word_mask: torch.Tensor  # [B, W] bool: slot w of sample b holds an aligned word
    num_words: int  # W, the most aligned words of any sample in the batch (may be 0)
    words: list[list[Word]]  # the aligned words of each sample, in slot order
    # Candidate words of the batch that were not aligned, as counts only (notes are private): those lying past
    # the student's or the teacher's truncation (a word cut by both counts on both sides), and those both models
    # still had but beyond the first `max_words` of their note.
    lost_student: int
    lost_teacher: int
    over_max_words: int


def split_words(text: str) -> list[Word]:
    """The words of `text` in reading order, with character spans and script (rules in the module doc)."""
    return [Word(m.start(), m.end(), Script(m.lastgroup)) for m in _WORD_PATTERN.finditer(text)]


def align_words(
    texts: Sequence[str],
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    policy: WordPolicy = "latin",
    max_words: int = 32,
) -> WordAlignment:
    """Aligns both tokenizations of `texts` on shared words.

    `*_offsets` are the fast tokenizers' `offset_mapping` ([B, T, 2], padded; special and padding
    tokens are (0, 0)). Candidate words are the Latin words (`policy="latin"`) or all words
    (`"all"`). A token belongs to the candidate word it overlaps most (ties: the earlier word);
    a word is kept only if both models have a token in it (truncation can remove it from either),
    and each note keeps at most its first `max_words` kept words. A word lies past a model's truncation
    when it starts at or after the end of that model's last token.
    """
    if policy not in WORD_POLICIES:
        raise ValueError(f"policy must be one of {WORD_POLICIES}, got {policy!r}")
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    student_offsets = _as_offset_tensor(student_offsets, "student_offsets", len(texts))
    teacher_offsets = _as_offset_tensor(teacher_offsets, "teacher_offsets", len(texts))

    candidates = [[w for w in split_words(t) if policy == "all" or w.script is Script.LATIN] for t in texts]
    spans = _pad_spans(candidates)
    is_candidate = torch.arange(spans.shape[1]) < torch.tensor([len(c) for c in candidates], dtype=torch.long)[:, None]
    student_candidate = _candidate_of_token(student_offsets, spans)
    teacher_candidate = _candidate_of_token(teacher_offsets, spans)

    in_both = _has_token(student_candidate, spans.shape[1]) & _has_token(teacher_candidate, spans.shape[1])
    slot = in_both.long().cumsum(dim=1) - 1
    kept = in_both & (slot < max_words)
    slot = torch.where(kept, slot, -1)
    words_per_note = kept.sum(dim=1)
    num_words = int(words_per_note.max()) if len(texts) else 0

    return WordAlignment(
        student_word_index=_slot_of_token(student_candidate, slot),
        teacher_word_index=_slot_of_token(teacher_candidate, slot),
        word_mask=torch.arange(num_words) < words_per_note[:, None],
        num_words=num_words,
        words=[
            [w for w, keep in zip(note, row, strict=False) if keep]  # row is padded to the most candidates
            for note, row in zip(candidates, kept.tolist(), strict=True)
        ],
        lost_student=int((is_candidate & _past_truncation(student_offsets, spans)).sum()),
        lost_teacher=int((is_candidate & _past_truncation(teacher_offsets, spans)).sum()),
        over_max_words=int((in_both & ~kept).sum()),
    )


def _as_offset_tensor(offsets: Offsets, name: str, batch_size: int) -> torch.Tensor:
    offsets = torch.as_tensor(offsets, dtype=torch.long)
    if offsets.ndim != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"{name} must have shape [batch, tokens, 2], got {tuple(offsets.shape)}")
    if offsets.shape[0] != batch_size:
        raise ValueError(f"{name} has {offsets.shape[0]} rows for {batch_size} texts")
    return offsets


def _pad_spans(candidates: list[list[Word]]) -> torch.Tensor:
    """[B, C, 2] character spans of each note's candidate words; (0, 0) pads, overlapping no token."""
    spans = torch.zeros(len(candidates), max(map(len, candidates), default=0), 2, dtype=torch.long)
    for row, words in zip(spans, candidates, strict=True):
        if words:
            row[: len(words)] = torch.tensor([(w.start, w.end) for w in words])
    return spans


def _candidate_of_token(offsets: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """[B, T] candidate-word id overlapped most by each token, -1 where a token overlaps none."""
    overlap = (
        torch.minimum(offsets[:, :, None, 1], spans[:, None, :, 1])
        - torch.maximum(offsets[:, :, None, 0], spans[:, None, :, 0])
    ).clamp(min=0)
    if overlap.shape[-1] == 0:
        return torch.full(offsets.shape[:2], -1, dtype=torch.long)
    most, candidate = overlap.max(dim=-1)
    return torch.where(most > 0, candidate, -1)


def _has_token(candidate_of_token: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """[B, C] whether each candidate word received at least one token."""
    counts = torch.zeros(candidate_of_token.shape[0], num_candidates + 1, dtype=torch.long)
    counts.scatter_add_(1, candidate_of_token + 1, torch.ones_like(candidate_of_token))
    return counts[:, 1:] > 0


def _past_truncation(offsets: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """[B, C] whether each candidate word starts at or after the end of every token of its note: truncation
    cut it. (A word before that end can still lack a token of its own, e.g. "세" inside the token "3세".)"""
    return (offsets[:, None, :, 1] <= spans[:, :, None, 0]).all(dim=-1)


def _slot_of_token(candidate_of_token: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[B, T] word slot of each token: its candidate's slot, -1 for no candidate or a dropped one."""
    slot_or_none = torch.cat([torch.full((slot.shape[0], 1), -1), slot], dim=1)
    return slot_or_none.gather(1, candidate_of_token + 1)
