"""The graph check of exported ONNX files, on small hand-made graphs."""

import onnx
import pytest
from onnx import TensorProto, helper

from training.onnx_variants import ExportError, check_graph


def save_graph(path, inputs, output_name="logits", output_shape=("batch_size", 2)):
    """A graph that maps an embedding of input_ids to a [batch, 2] output (the other inputs are unused)."""
    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, list(shape)) for name, shape in inputs]
    embedding = helper.make_tensor("embedding", TensorProto.FLOAT, [10, 2], [0.1] * 20)
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded"], [output_name], axes=[1], keepdims=0),
    ]
    output = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(output_shape))
    graph = helper.make_graph(nodes, "g", graph_inputs, [output], initializer=[embedding])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


DYNAMIC = ("batch_size", "sequence_length")


def test_accepts_a_classifier_graph_with_dynamic_axes(tmp_path):
    check_graph(
        save_graph(
            tmp_path / "ok.onnx", [("input_ids", DYNAMIC), ("attention_mask", DYNAMIC), ("token_type_ids", DYNAMIC)]
        )
    )


@pytest.mark.parametrize(
    ("inputs", "output", "message"),
    [
        ([("input_ids", DYNAMIC)], ("logits", ("batch_size", 2)), "missing input 'attention_mask'"),
        (
            [("input_ids", (1, 16)), ("attention_mask", DYNAMIC)],
            ("logits", ("batch_size", 2)),
            "input 'input_ids' is not \\[batch, sequence\\] with dynamic axes",
        ),
        (
            [("input_ids", DYNAMIC), ("attention_mask", DYNAMIC), ("pixel_values", DYNAMIC)],
            ("logits", ("batch_size", 2)),
            "unexpected input 'pixel_values'",
        ),
        (
            [("input_ids", DYNAMIC), ("attention_mask", DYNAMIC)],
            ("scores", ("batch_size", 2)),
            "missing output 'logits'",
        ),
        (
            [("input_ids", DYNAMIC), ("attention_mask", DYNAMIC)],
            ("logits", ("batch_size", 3)),
            "output 'logits' is not \\[batch, 2\\]",
        ),
    ],
)
def test_rejects_graphs_the_service_cannot_feed(tmp_path, inputs, output, message):
    path = save_graph(tmp_path / "bad.onnx", inputs, *output)
    with pytest.raises(ExportError, match=message):
        check_graph(path)
