"""The constant channel that carries biases into the 1x1 products that follow
(``graph.bias_channel``): where it goes, where it does not, and that the models it
changes keep parity, their per-layer checks and their PyTorch round trip."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.core.geometry import PRODUCT_COLUMNS, TRAFFIC_COST, bias_channel_gain
from conv2attn.record import converted_layers
from tests.helpers import (
    assert_checked_and_rebuilt,
    assert_parity,
    random_initializers,
    random_input,
    run,
)

SIZE = (12, 12)


def model_of(nodes, weights, size_out=SIZE) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, *SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 96, *size_out])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def clip_bounds():
    return [
        numpy_helper.from_array(np.array(0, np.float32), "low"),
        numpy_helper.from_array(np.array(6, np.float32), "high"),
    ]


def inverted_residuals(narrow: int = 24) -> onnx.ModelProto:
    """mobilenet_v2's pattern: a 3x3 Conv writes ``narrow`` channels, a 1x1 expansion
    reads them, a 1x1 projection adds back onto them (a residual), and a second
    expansion reads the sum."""
    w = random_initializers(seed=3)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "stem", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["a0"], "stem_relu"),
        helper.make_node("Conv", ["a0", "w1", "b1"], ["c1"], "expand1"),
        helper.make_node("Clip", ["c1", "low", "high"], ["a1"], "expand1_clip"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], "project1"),
        helper.make_node("Add", ["c2", "a0"], ["s2"], "residual"),
        helper.make_node("Conv", ["s2", "w3", "b3"], ["y"], "expand2"),
    ]
    weights = [w("w0", (narrow, 4, 3, 3)), w("b0", (narrow,)), w("w1", (96, narrow, 1, 1))]
    weights += [w("b1", (96,)), w("w2", (narrow, 96, 1, 1)), w("b2", (narrow,))]
    weights += [w("w3", (96, narrow, 1, 1)), w("b3", (96,)), *clip_bounds()]
    return model_of(nodes, weights)


def record_of(model: onnx.ModelProto) -> dict[str, dict]:
    return {layer["name"]: layer for layer in converted_layers(model)}


def test_the_readers_take_their_bias_from_the_channel_the_writers_append():
    """The 1x1 expansions read their biases from a constant channel (their bias Adds go);
    the 3x3 stem writes 1 in it, the projection 0, so that the residual sum holds 1; the
    model keeps parity, its per-layer check names every Conv, and the PyTorch import
    rebuilds the same model."""
    model = inverted_residuals()
    converted, report = conv2attn.convert(model)
    record = record_of(converted)
    assert record["expand1"]["bias_channel_in"] and record["expand2"]["bias_channel_in"]
    assert record["stem"]["bias_channel_out"] == 1 and record["project1"]["bias_channel_out"] == 0
    assert "bias_channel_in" not in record["stem"] and "bias_channel_out" not in record["expand2"]
    # the layers count the channel; the MACs before are the Convs' own
    by_name = {layer.name: layer for layer in report.layers}
    assert (by_name["expand1"].in_channels, by_name["stem"].out_channels) == (25, 25)
    assert by_name["expand1"].macs_before == 96 * 24 * SIZE[0] * SIZE[1]
    bias_adds = {n.name for n in converted.graph.node if n.name.endswith("proj/Add")}
    assert not any(name.startswith(("expand1/", "expand2/")) for name in bias_adds)
    assert "stem/attn/proj/Add" in bias_adds  # the writer adds its 1 with its bias
    feeds = random_input(model, batch=3)
    assert_parity(run(model, feeds), run(converted, feeds))
    assert_checked_and_rebuilt(model, converted, feeds, ["stem", "expand1", "project1", "expand2"])


def test_a_sum_of_two_writers_holds_one():
    """Two 1x1 Convs read one input and their outputs are added (a ResNet's downsampling
    block): one writes 1, the other 0, and the Conv after the sum reads 1."""
    w = random_initializers(seed=5)
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], "branch", pads=[1] * 4),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], "shortcut"),
        helper.make_node("Add", ["a", "b"], ["s"], "sum"),
        helper.make_node("Relu", ["s"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "wc", "bc"], ["y"], "reader"),
    ]
    weights = [w("wa", (24, 4, 3, 3)), w("ba", (24,)), w("wb", (24, 4, 1, 1)), w("bb", (24,))]
    weights += [w("wc", (96, 24, 1, 1)), w("bc", (96,))]
    model = model_of(nodes, weights)
    converted, _ = conv2attn.convert(model)
    record = record_of(converted)
    assert sorted([record["branch"]["bias_channel_out"], record["shortcut"]["bias_channel_out"]])
    assert record["branch"]["bias_channel_out"] + record["shortcut"]["bias_channel_out"] == 1
    assert record["reader"]["bias_channel_in"]
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))


def readers_elsewhere():
    """Feature maps the channel cannot go through, each with the reason."""
    w = random_initializers(seed=7)
    base = [w("w0", (24, 4, 3, 3)), w("b0", (24,)), w("w1", (96, 24, 1, 1)), w("b1", (96,))]
    stem = helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], "stem", pads=[1] * 4)
    gate = [
        helper.make_node("Sigmoid", ["c0"], ["g"], "gate"),
        helper.make_node("Conv", ["g", "w1", "b1"], ["y"], "reader"),
    ]
    padded = [
        helper.make_node("Conv", ["c0", "w1", "b1"], ["y"], "reader", pads=[1] * 4),
    ]
    unpadded = helper.make_node("Conv", ["c0", "w1", "b1"], ["y"], "reader")
    three = [w("w3", (96, 24, 3, 3))]
    by_3x3 = [
        helper.make_node("Conv", ["c0", "w1", "b1"], ["p"], "reader"),
        helper.make_node("Conv", ["c0", "w3", "b1"], ["q"], "neighbour", pads=[1] * 4),
        helper.make_node("Add", ["p", "q"], ["y"], "join"),
    ]
    return {
        # Sigmoid maps the constant 1 to 0.73
        "gate": (model_of([stem, *gate], base), {}),
        # padding would read 0 where the bias belongs
        "padded": (model_of([stem, *padded], base, size_out=(14, 14)), {}),
        # a 3x3 Conv reads the map too: the channel would be one more input channel there
        "read-by-3x3": (model_of([stem, *by_3x3], base + three), {}),
        # for GPU runtimes the bias Adds stay
        "no-tiles": (model_of([stem, unpadded], base), {"tiles": False}),
    }


@pytest.mark.parametrize("case", readers_elsewhere().values(), ids=readers_elsewhere().keys())
def test_no_channel_where_a_reader_could_not_take_it(case):
    model, options = case
    converted, _ = conv2attn.convert(model, **options)
    for layer in converted_layers(converted):
        assert "bias_channel_in" not in layer and "bias_channel_out" not in layer, layer["name"]
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))


def test_a_writer_whose_product_would_need_one_more_column_block_appends_nothing():
    """64 channels fill four column blocks exactly: a 65th costs the 3x3 Conv a fifth block
    (its 36 rows each) for every pixel, more than the reader's bias Add saves."""
    converted, _ = conv2attn.convert(inverted_residuals(narrow=PRODUCT_COLUMNS * 4))
    for layer in converted_layers(converted):
        assert "bias_channel_in" not in layer and "bias_channel_out" not in layer, layer["name"]


def test_the_gain_weighs_the_saved_pass_against_the_added_column_and_row():
    tokens = 100
    # 24 -> 25 columns stays in two blocks: the reader's pass saved, one row added
    saved = TRAFFIC_COST * tokens * 96
    assert bias_channel_gain([(tokens, 36, 24)], [(tokens, 96)]) == saved - tokens * 96
    # 32 -> 33 columns needs a third block of 16 columns, for each of 36 rows
    cost = tokens * 36 * PRODUCT_COLUMNS + tokens * 96
    assert bias_channel_gain([(tokens, 36, 32)], [(tokens, 96)]) == saved - cost
    assert bias_channel_gain([(tokens, 576, 64)], [(tokens, 256)]) < 0
