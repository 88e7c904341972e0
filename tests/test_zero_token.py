"""Zero padding that only key-window Gathers read becomes one zero token appended to the
token table (``graph/zero_token.py``).

The Gathers read the same values from a different table, so every comparison here is
bit for bit (``assert_array_equal``), not within a tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn import names
from conv2attn.graph import rewrite, zero_token
from conv2attn.graph.zero_token import ZeroTokens, pads_as_zero_tokens
from conv2attn.record import converted_layers
from tests.helpers import (
    assert_checked_and_rebuilt,
    assert_parity,
    random_initializers,
    random_input,
    run,
)


def padded_gathers(
    grid: tuple[int, ...] = (5, 6),
    begin: tuple[int, ...] = (1, 2),
    end: tuple[int, ...] = (2, 1),
    batch: int | str = "N",
    dtype: type = np.float32,
    fill: float | None = None,
    mode: str = "constant",
    channel_pad: int = 0,
    target: list[int] | None = None,
    axis: int = 1,
    indices_input: bool = False,
    pad_output: bool = False,
    pad_name: str = "layer/attn/pad/Pad",
    gather_name: str = "layer/attn/Gather2",
) -> onnx.ModelProto:
    """Channels-last ``x [B, *grid, C]`` -> Pad -> Reshape to a token table -> two Gathers
    of windows, the second reading the first's indices in another order; all of them
    converted layer ``layer``'s nodes unless named otherwise."""
    channels = 3
    padded = [n + b + e for n, b, e in zip(grid, begin, end)]
    tokens = int(np.prod(padded))
    rng = np.random.default_rng(0)
    windows = rng.integers(0, tokens, (7, 4)).astype(np.int64)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    pads = [0, *begin, 0, 0, *end, channel_pad]
    initializers = [
        numpy_helper.from_array(np.array(pads, np.int64), "pads"),
        numpy_helper.from_array(np.array(target or [0, tokens, channels], np.int64), "shape"),
        numpy_helper.from_array(windows[::-1].copy(), "reversed"),
    ]
    inputs = [helper.make_tensor_value_info("x", elem, [batch, *grid, channels])]
    if indices_input:
        inputs.append(helper.make_tensor_value_info("windows", TensorProto.INT64, [7, 4]))
    else:
        initializers.append(numpy_helper.from_array(windows, "windows"))
    pad_inputs = ["x", "pads"]
    if fill is not None:
        initializers.append(numpy_helper.from_array(np.array(fill, dtype), "fill"))
        pad_inputs.append("fill")
    nodes = [
        helper.make_node("Pad", pad_inputs, ["padded"], pad_name, mode=mode),
        helper.make_node("Reshape", ["padded", "shape"], ["table"], "layer/attn/merge"),
        helper.make_node("Gather", ["table", "windows"], ["y1"], "layer/attn/Gather", axis=axis),
        helper.make_node("Gather", ["table", "reversed"], ["y2"], gather_name, axis=axis),
    ]
    outputs = [helper.make_tensor_value_info(y, elem, None) for y in ("y1", "y2")]
    if pad_output:
        outputs.append(helper.make_tensor_value_info("padded", elem, None))
    graph = helper.make_graph(nodes, "padded_gathers", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    graph = gs.import_onnx(model)
    layers = {names.owner_prefix(conv): conv for conv in ("layer", "other")}
    count = pads_as_zero_tokens(graph, layers).replaced
    graph.cleanup().toposort()
    result = gs.export_onnx(graph)
    return result, count


def feeds_for(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    x = model.graph.input[0]
    dims = [
        batch if d.dim_param or not d.dim_value else d.dim_value
        for d in x.type.tensor_type.shape.dim
    ]
    dtype = helper.tensor_dtype_to_np_dtype(x.type.tensor_type.elem_type)
    rng = np.random.default_rng(1)
    values = rng.standard_normal(dims) * 50 if dtype.kind == "f" else rng.integers(1, 250, dims)
    feeds = {"x": values.astype(dtype)}
    if len(model.graph.input) > 1:
        feeds["windows"] = numpy_helper.to_array(
            next(t for t in padded_gathers().graph.initializer if t.name == "windows")
        )
    return feeds


def ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # 2-D grid, dynamic batch: the fill token built from the batch size
        dict(batch=2),  # static batch: the fill token is a constant
        dict(grid=(9,), begin=(2,), end=(0,)),  # 1-D
        dict(grid=(3, 4, 2), begin=(1, 0, 1), end=(1, 1, 0)),  # 3-D
        dict(fill=0.25),  # a constant fill other than zero
        dict(dtype=np.uint8, fill=3),  # an integer Conv's zero point
        dict(dtype=np.float16),
    ],
    ids=["dynamic", "static", "1d", "3d", "fill", "uint8", "float16"],
)
def test_padding_read_by_gathers_becomes_one_fill_token_with_the_same_bits(case):
    model = padded_gathers(**case)
    result, count = rewritten(model)
    assert count == 1 and "Pad" not in ops(result)
    dynamic = case.get("batch", "N") == "N"
    assert ("Expand" in ops(result)) == dynamic
    feeds = feeds_for(model)
    expected, got = run(model, feeds), run(result, feeds)
    for e, g in zip(expected, got):
        assert e.dtype == g.dtype
        np.testing.assert_array_equal(g, e)
    if dynamic:  # any batch: the fill token follows the input's batch size
        feeds = feeds_for(model, batch=5)
        for e, g in zip(run(model, feeds), run(result, feeds)):
            np.testing.assert_array_equal(g, e)
    # the new nodes belong to the Pad's layer
    new = [node.name for node in result.graph.node if node.op_type not in ("Gather",)]
    assert all(name.startswith("layer/attn/pad/zero_token/") for name in new)


@pytest.mark.parametrize(
    "case",
    [
        dict(pad_output=True),  # the padded tensor is also a graph output
        dict(indices_input=True),  # indices not known at conversion
        dict(channel_pad=1, target=[0, 8 * 9, 4]),  # padding the channels too
        dict(mode="reflect"),  # padded positions hold different values
        dict(target=[0, -1]),  # not a token table
        dict(axis=2),  # gathering channels
        dict(pad_name="source/Pad"),  # the source model's Pad: its zeros are not the layer's
        dict(gather_name="other/attn/Gather"),  # a table that another layer reads too
    ],
    ids=[
        "pad-output",
        "indices-input",
        "channel-pad",
        "reflect",
        "not-a-table",
        "axis",
        "source-pad",
        "two-layers",
    ],
)
def test_any_other_pattern_is_left_as_it_is(case):
    model = padded_gathers(**case)
    result, count = rewritten(model)
    assert count == 0 and ops(result) == ops(model)


def depthwise_block() -> onnx.ModelProto:
    """3x3 Conv -> Relu -> depthwise 3x3 -> Relu -> 1x1 Conv: local attention over pixel
    tokens gathers the depthwise Conv's key windows out of a padded table."""
    weight = random_initializers(seed=3)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", kernel_shape=[3, 3], pads=[1] * 4),
        node("Relu", ["c1"], ["r1"], "relu1"),
        node("Conv", ["r1", "w2", "b2"], ["c2"], "dw", kernel_shape=[3, 3], pads=[1] * 4, group=8),
        node("Relu", ["c2"], ["r2"], "relu2"),
        node("Conv", ["r2", "w3"], ["y"], "conv3", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "depthwise_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 12, 10])],
        [
            weight("w1", (8, 4, 3, 3)),
            weight("b1", (8,)),
            weight("w2", (8, 1, 3, 3)),
            weight("b2", (8,)),
            weight("w3", (5, 8, 1, 1)),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def padded_tables(model: onnx.ModelProto) -> int:
    """Pads whose output a Reshape turns into a table that Gathers read."""
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return sum(
        node.op_type == "Pad"
        and any(
            r.op_type == "Reshape"
            and any(g.op_type == "Gather" for g in readers.get(r.output[0], []))
            for r in readers.get(node.output[0], [])
        )
        for node in model.graph.node
    )


def test_converted_local_attention_reads_a_zero_token_instead_of_padding(monkeypatch):
    model = depthwise_block()
    options = dict(attention="local", patch=1)
    converted, _ = conv2attn.convert(model, **options)
    gpu, _ = conv2attn.convert(model, **options, tiles=False)
    monkeypatch.setattr(rewrite, "pads_as_zero_tokens", lambda *args: ZeroTokens())
    padded, _ = conv2attn.convert(model, **options)
    # conv1 pads the NCHW graph input before its Transpose to channels-last: not a table
    assert padded_tables(padded) == 1 and padded_tables(converted) == 0
    assert padded_tables(gpu) == 1  # the GPU emission keeps its Pads
    zero_token = [n.name for n in converted.graph.node if "/zero_token/" in n.name]
    assert {name.split("/")[0] for name in zero_token} == {"dw"}
    assert all(name.startswith(names.owner_prefix(name.split("/")[0])) for name in zero_token)
    feeds = random_input(model, batch=3)
    np.testing.assert_array_equal(run(converted, feeds)[0], run(padded, feeds)[0])
    assert_parity(run(model, feeds), run(converted, feeds))

    assert_checked_and_rebuilt(model, converted, feeds, ["conv1", "dw", "conv3"])


def expanded_depthwise(activation: str = "Clip", stem_activation: str = "Relu") -> onnx.ModelProto:
    """mobilenet_v2's pattern: a 3x3 Conv writes 24 channels, a 1x1 expansion takes its
    bias from the constant channel (``graph.bias_channel``; not through a Sigmoid), an
    activation, then a padded depthwise 3x3 Conv and a 1x1 projection."""
    narrow = 24
    w = random_initializers(seed=5)
    node = helper.make_node
    act = {
        "Clip": node("Clip", ["c1", "low", "high"], ["a1"], "act"),
        "Clip-above-0": node("Clip", ["c1", "one", "high"], ["a1"], "act"),
        "Relu": node("Relu", ["c1"], ["a1"], "act"),
        "HardSwish": node("HardSwish", ["c1"], ["a1"], "act"),
        "Sigmoid": node("Sigmoid", ["c1"], ["a1"], "act"),
    }[activation]
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"], "stem", pads=[1] * 4),
        node(stem_activation, ["c0"], ["a0"], "stem_act"),
        node("Conv", ["a0", "w1", "b1"], ["c1"], "expand"),
        act,
        node("Conv", ["a1", "w2", "b2"], ["c2"], "dw", pads=[1] * 4, group=96),
        node("Relu", ["c2"], ["a2"], "dw_relu"),
        node("Conv", ["a2", "w3", "b3"], ["y"], "project"),
    ]
    weights = [w("w0", (narrow, 4, 3, 3)), w("b0", (narrow,)), w("w1", (96, narrow, 1, 1))]
    weights += [w("b1", (96,)), w("w2", (96, 1, 3, 3)), w("b2", (96,))]
    weights += [w("w3", (16, 96, 1, 1)), w("b3", (16,))]
    weights += [
        numpy_helper.from_array(np.array(value, np.float32), name)
        for name, value in (("low", 0), ("one", 1), ("high", 6))
    ]
    graph = helper.make_graph(
        nodes,
        "expanded_depthwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 12, 12])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])  # HardSwish


def zero_token_scopes(model: onnx.ModelProto) -> set[str]:
    return {n.name.split("/")[0] for n in model.graph.node if "/zero_token/" in n.name}


@pytest.mark.parametrize("activation", ["Clip", "Relu", "HardSwish"])
def test_the_zero_token_is_appended_ahead_of_the_projection_that_feeds_the_padding(
    activation, monkeypatch
):
    """The expansion's row of zeros projects to zeros and its activation keeps them: the
    zero token is appended to its 25 input features, not to its 96 outputs. The model
    keeps parity, the per-layer check sees each Conv's own output (the token dropped),
    and the PyTorch import rebuilds the same model."""
    model = expanded_depthwise(activation)
    options = dict(attention="local", patch=1)
    converted, _ = conv2attn.convert(model, **options)
    assert zero_token_scopes(converted) == {"expand"}
    fill = [t for t in converted.graph.initializer if t.name.startswith("expand/attn/zero_token/")]
    widths = {tuple(t.dims) for t in fill if t.data_type == TensorProto.FLOAT}
    assert widths == {(1, 1, 1, 25)}  # the token's batch follows the input's (dynamic)
    record = {layer["name"]: layer for layer in converted_layers(converted)}
    assert record["expand"]["output_zero_token"] == [12, 12]
    assert record["dw"]["input_zero_token"] and "output_zero_token" not in record["dw"]
    feeds = random_input(model, batch=3)
    assert_parity(run(model, feeds), run(converted, feeds))
    monkeypatch.setattr(zero_token, "_projected_zeros", lambda *args: None)
    in_place, _ = conv2attn.convert(model, **options)
    assert zero_token_scopes(in_place) == {"dw"}
    assert_parity(run(in_place, feeds), run(converted, feeds))
    assert_checked_and_rebuilt(model, converted, feeds, ["stem", "expand", "dw", "project"])


@pytest.mark.parametrize(
    "case",
    [
        dict(activation="Clip-above-0"),  # Clip(1, 6) turns the zeros into ones
        dict(activation="Sigmoid"),  # sigmoid(0) is 1/2
        dict(stem_activation="Sigmoid"),  # no constant channel: the bias is added after
    ],
    ids=["clip-above-0", "sigmoid", "bias-add"],
)
def test_the_zero_token_stays_with_the_padding_where_zeros_would_not_stay_zero(case):
    model = expanded_depthwise(**case)
    converted, _ = conv2attn.convert(model, attention="local", patch=1)
    assert zero_token_scopes(converted) == {"dw"}
    assert not any("zero_token" in key for layer in converted_layers(converted) for key in layer)
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))


def test_an_infinite_projection_weight_keeps_the_zero_token_with_the_padding():
    """A row of zeros times an infinite weight is not zero: the token stays a constant."""
    model = expanded_depthwise()
    weights = next(t for t in model.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(weights).copy()
    values[0, 0, 0, 0] = np.inf
    weights.CopyFrom(numpy_helper.from_array(values, "w1"))
    converted, _ = conv2attn.convert(model, attention="local", patch=1, check=False)
    assert zero_token_scopes(converted) == {"dw"}


def test_a_pad_of_the_source_model_before_a_layer_stays_a_pad():
    """Conv -> Relu -> the source's own Pad -> an unpadded local 7x7 Conv: the Pad goes
    channels-last (``graph.layout``) and its table feeds the 7x7 layer's Gathers, but
    its zeros are the source's. It stays a Pad, so the 7x7 layer starts at its output
    in the per-layer check and in the PyTorch import."""
    weight = random_initializers(seed=7)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1] * 4),
        node("Relu", ["c1"], ["r1"], "relu1"),
        node("Pad", ["r1", "pads"], ["p1"], "source_pad"),
        node("Conv", ["p1", "w2"], ["y"], "conv2"),
    ]
    pads = numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "pads")
    graph = helper.make_graph(
        nodes,
        "source_pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 1, 1])],
        [weight("w1", (8, 3, 3, 3)), weight("b1", (8,)), weight("w2", (8, 8, 7, 7)), pads],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    converted, _ = conv2attn.convert(model, attention="local", patch=1)
    # conv1 pads the NCHW graph input before its Transpose: not a table
    assert "source_pad" in [n.name for n in converted.graph.node if n.op_type == "Pad"]
    assert padded_tables(converted) == 1
    assert not any("zero_token" in key for layer in converted_layers(converted) for key in layer)
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))
    assert_checked_and_rebuilt(model, converted, feeds, ["conv1", "conv2"])
