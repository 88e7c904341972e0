"""A Reshape of a Reshape reads the first one's input (``graph/reshapes.py``): the
values keep their order, so the results are the same bit for bit, and the tensors a
layer's check and the PyTorch import read stay in the graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.graph import rewrite
from conv2attn.graph.reshapes import collapse_reshapes
from conv2attn.record import converted_layers
from tests.helpers import assert_checked_and_rebuilt, random_input, run
from tests.test_zero_token import expanded_depthwise


def chain(shapes: list[list[int]], allowzero: int = 0, also_read: int | None = None):
    """x [2, 3, 4, 5] -> Reshape to each of ``shapes`` in turn -> y; ``also_read``: the
    output of that Reshape is a graph output too."""
    nodes, inits, previous = [], [], "x"
    for index, shape in enumerate(shapes):
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), f"s{index}"))
        out = "y" if index == len(shapes) - 1 else f"r{index}"
        nodes.append(
            helper.make_node(
                "Reshape", [previous, f"s{index}"], [out], f"reshape{index}", allowzero=allowzero
            )
        )
        previous = out
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if also_read is not None:
        outputs.append(helper.make_tensor_value_info(f"r{also_read}", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 5])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def collapsed(model: onnx.ModelProto, keep: frozenset[str] = frozenset()):
    graph = gs.import_onnx(model)
    count = collapse_reshapes(graph, keep)
    graph.cleanup().toposort()
    return gs.export_onnx(graph), count


def reshapes(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "Reshape" for node in model.graph.node)


@pytest.mark.parametrize(
    "shapes, left",
    [
        ([[0, 12, 5], [0, 60], [0, 6, 10], [0, 3, 4, 5]], 1),  # the batch copied all along
        ([[0, -1], [2, 3, 20]], 1),  # a static size after a copied one
        ([[0, 60], [-1, 5, 4, 3]], 1),  # -1: the size follows from the others
        ([[2, 60], [0, 6, 10]], 2),  # the 0 would copy the input's N, not the first's 2
        ([[0, 3, 20], [0, 0, 20]], 2),  # the second 0 would copy 3 from x, not 3 from s0
    ],
    ids=["copied-batch", "static-after", "minus-one", "zero-not-copied", "zero-mismatch"],
)
def test_a_reshape_of_a_reshape_reads_its_input_with_the_same_result(shapes, left):
    model = chain(shapes)
    result, count = collapsed(model)
    assert reshapes(result) == left and count == len(shapes) - left
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)}
    np.testing.assert_array_equal(run(result, feeds)[0], run(model, feeds)[0])


def test_kept_and_read_tensors_and_literal_zeros_stay():
    shapes = [[0, 60], [0, 6, 10], [0, 3, 4, 5]]
    assert reshapes(collapsed(chain(shapes), keep=frozenset({"r1"}))[0]) == 2
    assert reshapes(collapsed(chain(shapes, also_read=0))[0]) == 2
    assert reshapes(collapsed(chain([[2, 60], [2, 6, 10]], allowzero=1))[0]) == 2


def test_a_converted_model_keeps_its_layer_outputs_and_its_results(monkeypatch):
    """mobilenet_v2's pattern converted: fewer Reshapes, bit-identical outputs, every
    recorded layer output still there for the per-layer check and the PyTorch import."""
    model = expanded_depthwise()
    options = dict(attention="local", patch=1)
    converted, _ = conv2attn.convert(model, **options)
    monkeypatch.setattr(rewrite, "collapse_reshapes", lambda graph, keep: 0)
    uncollapsed, _ = conv2attn.convert(model, **options)
    assert reshapes(converted) < reshapes(uncollapsed)
    feeds = random_input(model, batch=3)
    np.testing.assert_array_equal(run(converted, feeds)[0], run(uncollapsed, feeds)[0])
    tensors = {name for node in converted.graph.node for name in node.output}
    for layer in converted_layers(converted):
        assert (layer.get("output_channels_last") or layer["output"]) in tensors
    assert_checked_and_rebuilt(model, converted, feeds, ["stem", "expand", "dw", "project"])
