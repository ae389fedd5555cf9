"""Quantization-aware fine-tuning's fake quantization, on the tiny fixture encoder (SYNTHETIC notes)."""

import numpy as np
import pytest
import torch
from onnxruntime.quantization.quant_utils import compute_scale_zp
from torch import nn

from training.modeling import load_student, load_tokenizer
from training.quantization import ActivationRange, FakeQuantLinear, QuantizationAware


@pytest.fixture
def student_and_tokenizer(tiny_bert_dir):
    torch.manual_seed(0)
    return load_student(str(tiny_bert_dir), "eager"), load_tokenizer(str(tiny_bert_dir))


def test_every_linear_layer_is_fake_quantized_under_its_own_parameter_names(student_and_tokenizer, notes):
    student, tokenizer = student_and_tokenizer
    names = student.state_dict().keys()
    quantization = QuantizationAware(student, tokenizer, [t for t, _ in notes[:40]], 64, "cpu")
    assert student.state_dict().keys() == names  # a checkpoint saves (and reloads as) the plain model
    assert not any(type(module) is nn.Linear for module in student.modules())
    # per layer: inputs of Q, K, V, attention output, FFN up and down; outputs of Q, K, V; the attention
    # probabilities; then the pooler's and the classifier's inputs
    assert len(quantization.activations) == 2 * 10 + 2
    assert len(quantization.ranges.state_dict()) == 2 * (2 * 10 + 2 + 3)  # low and high; + 3 embedding tables
    assert isinstance(student.bert.encoder.layer[0].output.dense, FakeQuantLinear)


def test_sdpa_attention_is_refused_since_its_probabilities_cannot_be_rounded(tiny_bert_dir):
    with pytest.raises(ValueError, match="eager"):
        QuantizationAware(load_student(str(tiny_bert_dir), "sdpa"), load_tokenizer(str(tiny_bert_dir)), [], 64, "cpu")


@pytest.mark.parametrize(("low", "high"), [(-3.0, 5.0), (0.5, 2.0), (-4.0, -1.0)])
def test_activations_round_to_onnx_runtimes_uint8_grid(low, high):
    activation = ActivationRange()
    activation.reset()
    activation.observing = True
    activation(torch.tensor([low, high]))
    activation.observing = False
    zero_point, scale = compute_scale_zp(
        np.array(low, np.float32), np.array(high, np.float32), np.array(0, np.uint8), np.array(255, np.uint8)
    )
    zero_point, scale = float(zero_point), float(scale)
    x = torch.linspace(low, high, 101)
    expected = (np.clip(np.round(x.numpy() / scale) + zero_point, 0, 255) - zero_point) * scale
    assert np.allclose(activation(x).numpy(), expected, atol=1e-6)


def test_weights_round_per_output_channel_to_symmetric_int8():
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -0.5, 0.25, 0.1], [10.0, 3.3, -7.1, 0.0], [0.011, 0.021, 0.03, -0.04]]))
    quantized = FakeQuantLinear(linear)
    quantized.input_range.high.fill_(1.0)  # inputs 0 and 1, which uint8 on [0, 1] represents exactly
    weights = quantized(torch.eye(4)) - linear.bias  # row j: weight[:, j] rounded
    scales = linear.weight.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(weights.T, torch.round(linear.weight / scales) * scales, atol=1e-6)
    assert not torch.allclose(weights.T, linear.weight, atol=1e-6)


def test_calibrated_student_stays_close_to_the_float_model_and_trains(student_and_tokenizer, notes):
    student, tokenizer = student_and_tokenizer
    texts = [t for t, _ in notes[:40]]
    batch = tokenizer(texts[:8], padding=True, return_tensors="pt")
    with torch.inference_mode():
        reference = student.eval()(**batch).logits
    quantization = QuantizationAware(student, tokenizer, texts, 64, "cpu")
    quantization.calibrate()
    assert all(activation.high > activation.low for activation in quantization.activations)
    with torch.inference_mode():
        rounded = student(**batch).logits
    assert not torch.equal(rounded, reference)
    assert torch.allclose(rounded, reference, atol=0.1)
    student.train()
    student(**batch).logits.sum().backward()  # straight-through gradients reach the weights
    assert student.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
