"""Word splitting and cross-tokenizer word alignment, checked on three tokenizer families built offline."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from training.distill.align import Script, Word, align_words, split_words

EXAMPLE = "3세 남아 fever 39.2 vomiting 3회, lethargy"
MIXED = [EXAMPLE, "X-ray상 pneumonia 의심, SpO2 92%", "어제부터 seizure로 내원, Crohn's disease 과거력"]
FAMILIES = ["wordpiece", "unigram", "bytelevel"]


def _tokenizer_corpus(notes: list[tuple[str, int]]) -> list[str]:
    return [text for text, _ in notes] + MIXED * 3


SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _unigram_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with NFKC and the Metaspace pre-tokenizer, as in XLM-R."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        corpus, trainers.UnigramTrainer(vocab_size=200, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False)
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>")), ("</s>", tokenizer.token_to_id("</s>"))],
    )
    return _wrap(tokenizer)


def _bytelevel_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """GPT-2/RoBERTa-style byte-level BPE."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")), trim_offsets=True
    )
    return _wrap(tokenizer)


@pytest.fixture(scope="module")
def tokenizers(tiny_bert_dir, notes) -> dict[str, PreTrainedTokenizerFast]:
    corpus = _tokenizer_corpus(notes)
    return {
        "wordpiece": AutoTokenizer.from_pretrained(tiny_bert_dir),
        "unigram": _unigram_tokenizer(corpus),
        "bytelevel": _bytelevel_tokenizer(corpus),
    }


def offsets(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int | None = None) -> torch.Tensor:
    encoded = tokenizer(
        texts,
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    return encoded["offset_mapping"]


def reference_word_index(text: str, token_offsets: list[tuple[int, int]], words: list[Word]) -> list[int]:
    """Slot of the aligned word each token overlaps most (first on ties), -1 if none: a plain loop."""
    index = []
    for start, end in token_offsets:
        overlaps = [min(end, w.end) - max(start, w.start) for w in words]
        best = max(range(len(words)), key=lambda i: (overlaps[i], -i), default=None)
        index.append(best if best is not None and overlaps[best] > 0 else -1)
    return index


def word_texts(text: str, words: list[Word]) -> list[str]:
    return [text[w.start : w.end] for w in words]


# --- split_words ---------------------------------------------------------------------------------


def test_split_words_on_a_mixed_korean_english_note():
    words = split_words(EXAMPLE)
    assert [(EXAMPLE[w.start : w.end], w.script) for w in words] == [
        ("3", Script.NUMBER),
        ("세", Script.HANGUL),
        ("남아", Script.HANGUL),
        ("fever", Script.LATIN),
        ("39.2", Script.NUMBER),
        ("vomiting", Script.LATIN),
        ("3", Script.NUMBER),
        ("회", Script.HANGUL),
        ("lethargy", Script.LATIN),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("X-ray상 Crohn's COVID-19", ["X-ray", "상", "Crohn's", "COVID-19"]),
        ("fever로 SpO2는 2mg", ["fever", "로", "SpO2", "는", "2", "mg"]),
        ("-rash- 'itchy'", ["rash", "itchy"]),
        ("2024.01.05 2,3회 -1.5", ["2024.01.05", "2", "3", "회", "1.5"]),
        ("β-blocker 漢字 café", ["β", "blocker", "漢字", "café"]),
        ("... , !? -- % ℃", []),
    ],
)
def test_split_words_rules(text, expected):
    assert word_texts(text, split_words(text)) == expected


def test_split_words_scripts_of_other_letters():
    assert [w.script for w in split_words("β 漢字 ｂｐｍ")] == [Script.OTHER, Script.OTHER, Script.LATIN]  # noqa: RUF001


# --- align_words ---------------------------------------------------------------------------------


PAIRS = [("wordpiece", "unigram"), ("unigram", "bytelevel"), ("bytelevel", "wordpiece")]


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_latin_words_are_aligned_across_tokenizers(tokenizers, student, teacher):
    student_offsets, teacher_offsets = offsets(tokenizers[student], MIXED), offsets(tokenizers[teacher], MIXED)
    alignment = align_words(MIXED, student_offsets, teacher_offsets)

    assert [word_texts(t, w) for t, w in zip(MIXED, alignment.words, strict=True)] == [
        ["fever", "vomiting", "lethargy"],
        ["X-ray", "pneumonia", "SpO2"],
        ["seizure", "Crohn's", "disease"],
    ]
    assert alignment.num_words == 3
    assert alignment.word_mask.all()
    for b, (text, words) in enumerate(zip(MIXED, alignment.words, strict=True)):
        for name, index, token_offsets in [
            ("student", alignment.student_word_index, student_offsets),
            ("teacher", alignment.teacher_word_index, teacher_offsets),
        ]:
            expected = reference_word_index(text, token_offsets[b].tolist(), words)
            assert index[b].tolist() == expected, name
            assert set(range(len(words))) <= set(expected), f"{name} has a word without tokens"


@pytest.mark.parametrize(("student", "teacher"), [("unigram", "bytelevel"), ("bytelevel", "unigram")])
def test_policy_all_aligns_every_word(tokenizers, student, teacher):
    alignment = align_words(
        [EXAMPLE], offsets(tokenizers[student], [EXAMPLE]), offsets(tokenizers[teacher], [EXAMPLE]), policy="all"
    )
    assert word_texts(EXAMPLE, alignment.words[0]) == [
        "3",
        "세",
        "남아",
        "fever",
        "39.2",
        "vomiting",
        "3",
        "회",
        "lethargy",
    ]
    assert alignment.num_words == 9


def test_a_token_spanning_two_words_counts_for_the_earlier_one(tokenizers):
    wordpiece_offsets = offsets(tokenizers["wordpiece"], [EXAMPLE])
    assert wordpiece_offsets[0, 1].tolist() == [0, 2]  # the tiny WordPiece vocab keeps "3세" whole
    alignment = align_words([EXAMPLE], wordpiece_offsets, offsets(tokenizers["unigram"], [EXAMPLE]), policy="all")
    assert word_texts(EXAMPLE, alignment.words[0]) == ["3", "남아", "fever", "39.2", "vomiting", "3", "회", "lethargy"]
    assert alignment.student_word_index[0, 1] == 0  # the token "3세" (after [CLS]) belongs to "3"
    assert alignment.lost_student == alignment.lost_teacher == 0  # "세" has no token of its own, but was not cut


def test_batches_of_unequal_notes_are_padded(tokenizers):
    texts = [EXAMPLE, "발열 cough", "보호자 동반 내원"]
    alignment = align_words(texts, offsets(tokenizers["wordpiece"], texts), offsets(tokenizers["bytelevel"], texts))
    assert alignment.num_words == 3
    assert alignment.word_mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert alignment.student_word_index[1].max() == 0 and (alignment.student_word_index[2] == -1).all()
    assert alignment.teacher_word_index.shape == offsets(tokenizers["bytelevel"], texts).shape[:2]


@pytest.mark.parametrize("teacher", ["unigram", "bytelevel", "wordpiece"])
def test_words_truncated_away_by_either_model_are_dropped(tokenizers, teacher):
    full = offsets(tokenizers[teacher], [EXAMPLE])[0]
    lethargy = EXAMPLE.index("lethargy")
    first_lethargy_token = next(i for i, (start, end) in enumerate(full.tolist()) if end > lethargy)
    truncated = offsets(tokenizers[teacher], [EXAMPLE], max_length=first_lethargy_token + 1)

    student_offsets = offsets(tokenizers["wordpiece"], [EXAMPLE])
    alignment = align_words([EXAMPLE], student_offsets, truncated)
    assert word_texts(EXAMPLE, alignment.words[0]) == ["fever", "vomiting"]
    lethargy_tokens = student_offsets[0, :, 1] > lethargy
    assert (alignment.student_word_index[0, lethargy_tokens] == -1).all()
    assert (alignment.lost_student, alignment.lost_teacher, alignment.over_max_words) == (0, 1, 0)

    swapped = align_words([EXAMPLE], truncated, student_offsets)
    assert word_texts(EXAMPLE, swapped.words[0]) == ["fever", "vomiting"]
    assert (swapped.lost_student, swapped.lost_teacher, swapped.over_max_words) == (1, 0, 0)

    everything = align_words([EXAMPLE], truncated, truncated, policy="all")
    assert (everything.lost_student, everything.lost_teacher) == (1, 1)  # a word cut by both counts on both sides


def test_max_words_keeps_the_first_words(tokenizers):
    alignment = align_words(
        [EXAMPLE], offsets(tokenizers["unigram"], [EXAMPLE]), offsets(tokenizers["wordpiece"], [EXAMPLE]), max_words=2
    )
    assert word_texts(EXAMPLE, alignment.words[0]) == ["fever", "vomiting"]
    assert alignment.student_word_index.max() == 1 and alignment.teacher_word_index.max() == 1
    assert (alignment.lost_student, alignment.lost_teacher, alignment.over_max_words) == (0, 0, 1)

    long_note = " ".join(["fever"] * 40)
    capped = align_words(
        [long_note], offsets(tokenizers["bytelevel"], [long_note]), offsets(tokenizers["unigram"], [long_note])
    )
    assert capped.num_words == 32
    assert capped.student_word_index.max() == 31
    assert capped.over_max_words == 8


def test_a_note_without_latin_words_has_no_slots(tokenizers):
    text = "보호자 동반 내원, 3회"
    alignment = align_words([text], offsets(tokenizers["wordpiece"], [text]), offsets(tokenizers["unigram"], [text]))
    assert alignment.num_words == 0
    assert alignment.word_mask.shape == (1, 0)
    assert (alignment.student_word_index == -1).all() and (alignment.teacher_word_index == -1).all()


def test_bad_arguments_are_named():
    one = torch.tensor([[[0, 0], [0, 5]]])
    with pytest.raises(ValueError, match="policy"):
        align_words(["fever"], one, one, policy="english")
    with pytest.raises(ValueError, match="max_words"):
        align_words(["fever"], one, one, max_words=0)
    with pytest.raises(ValueError, match="teacher_offsets has 1 rows for 2 texts"):
        align_words(["fever", "cough"], torch.cat([one, one]), one)
    with pytest.raises(ValueError, match=r"student_offsets must have shape \[batch, tokens, 2\]"):
        align_words(["fever"], one[0], one)
