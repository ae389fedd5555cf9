"""Explanations by word occlusion: which words of a note moved its P(emergency) most.

A word's contribution is P(note) - P(note without the word), both calibrated and both from the same model run
(`classify_texts(..., explain=True)` scores a note and its variants together): positive when the word pushed
the note towards emergency. It measures how sensitive this model's output is to deleting that one word, not
what caused the patient's condition; two words that carry the same information each score low.

A word is a whitespace-separated token trimmed to its first and last letter or digit: in "CC: chest pain.
BT 38.9," the words are CC, chest, pain, BT and 38.9; a token without a letter or digit ("-", "(+)") is no
word. Numbers are words: deleting one measures the value being written against it being absent, not against a
normal value. Deleting a word removes exactly its characters; the rest of the note stays as it was.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

# From a letter or digit (`\w` without `_`) to the last letter or digit before the next whitespace.
_WORD = re.compile(r"[^\W_](?:\S*[^\W_])?")


@dataclass(frozen=True)
class Word:
    text: str  # note[start:end]
    start: int  # index of its first character in the note (Python str index: code points)
    end: int  # index just past its last character


@dataclass(frozen=True)
class WordContribution:
    word: Word
    contribution: float  # P(note) - P(note without the word): positive pushed towards emergency


def note_words(text: str, at_most: int | None = None) -> list[Word]:
    """The words of a note, in order; only its first `at_most` when given (the rest is not searched)."""
    return [Word(match.group(), match.start(), match.end()) for match in islice(_WORD.finditer(text), at_most)]


def without(text: str, word: Word) -> str:
    """The note with the word's characters deleted."""
    return text[: word.start] + text[word.end :]


def variants(texts: Sequence[str], words: Sequence[Sequence[Word]]) -> list[str]:
    """Each note with one of its words deleted: the first note's variants in word order, then the next note's."""
    return [without(text, word) for text, its_words in zip(texts, words, strict=True) for word in its_words]


def explanations(
    words: Sequence[Sequence[Word]], probabilities: np.ndarray, variant_probabilities: np.ndarray, top_k: int
) -> list[tuple[WordContribution, ...]]:
    """Each note's `top_contributions`, from P(emergency) of the notes and of their `variants`."""
    ends = np.cumsum([len(its_words) for its_words in words])
    return [
        top_contributions(its_words, probability - variant_probabilities[end - len(its_words) : end], top_k)
        for its_words, probability, end in zip(words, probabilities, ends, strict=True)
    ]


def top_contributions(words: Sequence[Word], contributions: np.ndarray, top_k: int) -> tuple[WordContribution, ...]:
    """The `top_k` words with the largest |contribution|, largest first; ties in note order."""
    order = sorted(range(len(words)), key=lambda position: -abs(float(contributions[position])))
    return tuple(WordContribution(words[position], float(contributions[position])) for position in order[:top_k])
