"""Loading students: a shallower copy of an encoder (`--student-layers`), on the tiny fixture encoder."""

import pytest
import torch

from training.errors import ConfigError
from training.modeling import kept_layers, load_student, load_tokenizer


def test_kept_layers_are_spread_uniformly_and_end_on_the_last():
    assert kept_layers(12, 6) == [2, 4, 6, 8, 10, 12]
    assert kept_layers(12, 4) == [3, 6, 9, 12]
    assert kept_layers(12, 12) == list(range(1, 13))
    assert kept_layers(2, 1) == [2]


def test_a_shallower_student_keeps_its_layers_weights_and_saves_as_a_smaller_model(tmp_path, tiny_bert_dir):
    torch.manual_seed(0)
    full = load_student(str(tiny_bert_dir))
    torch.manual_seed(0)
    shallow = load_student(str(tiny_bert_dir), layers=1)
    assert shallow.config.num_hidden_layers == len(shallow.bert.encoder.layer) == 1
    for name, weight in shallow.bert.encoder.layer[0].state_dict().items():
        assert torch.equal(weight, full.bert.encoder.layer[1].state_dict()[name])  # layer 2 of 2
    shallow.save_pretrained(tmp_path)
    reloaded = load_student(str(tmp_path)).eval()
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    batch = tokenizer(["chest pain since morning", "fever"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(reloaded(**batch).logits, shallow.eval()(**batch).logits, atol=1e-6)


def test_more_layers_than_the_student_has_is_a_clear_error(tiny_bert_dir):
    with pytest.raises(ConfigError, match="only 2 layers"):
        load_student(str(tiny_bert_dir), layers=3)
