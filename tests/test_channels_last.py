"""Tensors between converted Convs stay channels-last (``--layout channels-last``,
``graph/layout.py``): fewer Transposes, the same function, every layer still checked
and rebuilt in PyTorch from its record.

Parity is ``helpers.assert_parity`` (1e-5 of the largest value plus 1e-6): the pass only
moves values, so the converted model computes exactly what the NCHW layout computes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn import names
from conv2attn.cli import main
from conv2attn.inputs import Samples
from conv2attn.record import converted_layers
from conv2attn.torch_graph import load_trainable
from conv2attn.validate import check
from tests.helpers import (
    assert_checked_and_rebuilt,
    assert_parity,
    assert_same_arithmetic,
    random_initializers,
    random_input,
    run,
)

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def transposes(model: onnx.ModelProto) -> int:
    """Transposes of data (not of the attention constants, which runtimes fold)."""
    constant = ("/Softmax/", f"/{names.FOLD}/")
    return sum(
        node.op_type == "Transpose" and not any(part in node.name for part in constant)
        for node in model.graph.node
    )


def residual_block(opset: int = 13) -> onnx.ModelProto:
    """conv -> BN-like scale/shift -> Clip -> conv, plus a residual Add and a SiLU gate:
    the operations between converted Convs that commute with the layout."""
    weight = random_initializers(seed=0)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Mul", ["c1", "scale"], ["s1"], "scale"),
        helper.make_node("Add", ["s1", "shift"], ["b1"], "shift"),
        helper.make_node("Clip", ["b1", "low", "high"], ["r1"], "clip"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["c2", "r1"], ["sum"], "residual"),
        helper.make_node("Sigmoid", ["sum"], ["gate"], "sigmoid"),
        helper.make_node("Mul", ["sum", "gate"], ["silu"], "silu"),
        helper.make_node("Conv", ["silu", "w3"], ["y"], "conv3", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 10, 12])],
        [
            weight("w1", (6, 4, 3, 3)),
            weight("w2", (6, 6, 3, 3)),
            weight("w3", (5, 6, 1, 1)),
            weight("scale", (6, 1, 1)),
            weight("shift", (1, 6, 1, 1)),
            numpy_helper.from_array(np.array(-1.0, np.float32), "low"),
            numpy_helper.from_array(np.array(1.5, np.float32), "high"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("attention", ["global", "local"])
def test_tensors_between_converted_convs_stay_channels_last(attention):
    model = residual_block()
    # pixel tokens, blocks along rows: no patch or block moves, only the layout changes
    options = dict(attention=attention, patch=1, block="1x4" if attention == "local" else "auto")
    converted, report = conv2attn.convert(model, **options)
    nchw, _ = conv2attn.convert(model, **options, layout="nchw")
    # three Convs: NCHW -> NHWC and back around each (6) against one pair around the block
    assert transposes(nchw) == 6 and transposes(converted) == 2
    ops = {n.name: n for n in converted.graph.node}
    assert "c1" not in {t for n in converted.graph.node for t in n.output}  # gone, not renamed
    assert ops["scale"].input[1].endswith("/channels_last")  # the constants re-laid out
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv1"].output_channels_last and not layers["conv1"].input_channels_last
    assert layers["conv2"].input_channels_last and layers["conv3"].input_channels_last
    assert layers["conv3"].output_channels_last is None  # the graph output stays NCHW
    feeds = random_input(model, batch=3)
    assert_parity(run(model, feeds), run(converted, feeds))
    np.testing.assert_array_equal(run(converted, feeds)[0], run(nchw, feeds)[0])


def test_nothing_is_moved_where_it_would_add_transposes():
    """One Conv between NCHW-only neighbours: channels-last would need a Transpose on
    each side of every elementwise node, so the layout stays as emitted."""
    model = residual_block()
    converted, _ = conv2attn.convert(model, include=["conv2"], patch=1)
    nchw, _ = conv2attn.convert(model, include=["conv2"], patch=1, layout="nchw")
    assert transposes(converted) == transposes(nchw) == 2
    assert [n.name for n in converted.graph.node] == [n.name for n in nchw.graph.node]


def test_per_layer_check_and_round_trip_read_channels_last_outputs():
    model = residual_block()
    converted, report = conv2attn.convert(model, patch=1, attention="local")
    assert any(layer.output_channels_last for layer in report.layers)
    feeds = random_input(model, batch=2)
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed
    assert [layer.name for layer in result.layers] == ["conv1", "conv2", "conv3"]
    assert all(layer.max_rel < 1e-5 for layer in result.layers)

    module = load_trainable(converted)
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(feeds["x"])).numpy()
    assert_parity(run(model, feeds), [got])


def grouped_branch() -> onnx.ModelProto:
    """conv1 -> Relu -> (grouped conv2 | 1x1 conv4) -> Add -> Relu -> conv3."""
    weight = random_initializers(seed=0)

    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1"], ["c1"], "conv1", kernel_shape=[3, 3], pads=[1] * 4),
        node("Relu", ["c1"], ["r1"], "relu1"),
        node("Conv", ["r1", "w2"], ["c2"], "conv2", kernel_shape=[3, 3], pads=[1] * 4, group=2),
        node("Conv", ["r1", "w4"], ["c4"], "conv4", kernel_shape=[1, 1]),
        node("Add", ["c2", "c4"], ["sum"], "add"),
        node("Relu", ["sum"], ["r2"], "relu2"),
        node("Conv", ["r2", "w3"], ["y"], "conv3", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "grouped_branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 10, 12])],
        [weight("w1", (6, 4, 3, 3)), weight("w2", (6, 3, 3, 3)), weight("w4", (6, 6, 1, 1)),
         weight("w3", (5, 6, 1, 1))],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_layer_whose_crop_moves_channels_last_is_still_found():
    """A grouped Conv's channel-major tokens return to NCHW and are cropped there; the crop
    joins the residual Add's region, so the Conv's output itself is renamed channels-last."""
    model = grouped_branch()
    # 10x12 outputs on 3x3 patches: a crop
    converted, report = conv2attn.convert(model, patch=3, max_param_growth=1e9)
    layers = {layer.name: layer for layer in report.layers}
    held = layers["conv2"].output_channels_last
    produced = {t for n in converted.graph.node for t in n.output}
    assert held in produced and "c2" not in produced
    feeds = random_input(model, batch=2)
    assert_checked_and_rebuilt(model, converted, feeds, ["conv1", "conv2", "conv4", "conv3"])


def inception_join() -> onnx.ModelProto:
    """Two converted branches joined by a channel Concat (Inception, GoogLeNet), a ReLU and
    a converted Conv on the join."""
    weight = random_initializers(seed=0)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["b1"], "branch1", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["b2"], "branch2", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Concat", ["b1", "b2"], ["joined"], "join", axis=1),
        helper.make_node("Relu", ["joined"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w3"], ["y"], "head", kernel_shape=[3, 3], pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "join",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 11])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 9, 11])],
        [weight("w1", (2, 3, 1, 1)), weight("w2", (5, 3, 3, 3)), weight("w3", (4, 7, 3, 3))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_channel_concat_joins_channels_last_branches():
    model = inception_join()
    converted, report = conv2attn.convert(model, attention="local", patch=1)
    nchw, _ = conv2attn.convert(model, attention="local", patch=1, layout="nchw")
    # three go: both branches' way back to NCHW and the head's way to channels-last
    assert transposes(converted) == transposes(nchw) - 3
    left = {n.name for n in converted.graph.node if n.op_type == "Transpose"}
    assert (
        not {"branch1/attn/unpatchify/to_nchw/Transpose", "head/attn/patchify/to_nhwc/Transpose"}
        & left
    )
    join = next(n for n in converted.graph.node if n.name == "join")
    assert helper.get_attribute_value(join.attribute[0]) == 3  # the channel axis, last
    layers = {layer.name: layer for layer in report.layers}
    assert layers["head"].input_channels_last and layers["branch1"].output_channels_last
    feeds = random_input(model, batch=2)
    got = run(converted, feeds)
    np.testing.assert_array_equal(got[0], run(nchw, feeds)[0])
    assert_parity(run(model, feeds), got)
    assert check(model, converted, Samples(feeds, None, "random"), per_layer=True).passed
    with torch.no_grad():
        rebuilt = load_trainable(converted).eval()(torch.from_numpy(feeds["x"])).numpy()
    assert_parity(run(model, feeds), [rebuilt])


def grouped_into_branches() -> onnx.ModelProto:
    """A grouped Conv whose global attention's bias Add writes its NCHW output, then Relu,
    two Pads and two branches joined by a channel Concat: channels-last from the Relu on
    removes a Transpose, and would from the bias Add on too."""
    init = random_initializers(seed=0)
    pads = numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "pads")
    nodes = [
        helper.make_node("Conv", ["x", "wg", "bg"], ["g"], "grouped", group=3, strides=[2, 2]),
        helper.make_node("Relu", ["g"], ["r"], "relu"),
        helper.make_node("Pad", ["r", "pads"], ["p1"], "pad1"),
        helper.make_node("Pad", ["p1", "pads"], ["p2"], "pad2"),
        helper.make_node("Conv", ["p2", "w1", "b1"], ["c1"], "point"),
        helper.make_node("Relu", ["c1"], ["a1"], "point_relu"),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], "neighbour", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a1", "c3"], ["y"], "join", axis=1),
    ]
    weights = [init("wg", (3, 1, 3, 3)), init("bg", (3,)), init("w1", (4, 3, 1, 1))]
    weights.append(init("b1", (4,)))
    weights += [init("w3", (2, 3, 3, 3)), init("b3", (2,)), pads]
    graph = helper.make_graph(
        nodes,
        "grouped_into_branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 9, 9])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_each_layer_keeps_its_weights_as_emitted_where_the_tensors_after_it_move():
    """The PyTorch import reads each Conv back out of its layer's W_O and bias: the pass
    moves the tensors after a layer, never the constants the layer is made of."""
    model = grouped_into_branches()
    options = dict(attention="global", grid="fixed", max_param_growth=1e9)
    converted, report = conv2attn.convert(model, **options)
    # one token per output row of each channel: the bias Add writes the NCHW output
    assert report.layers[0].patch == (1, 7)
    initializers = {t.name for t in converted.graph.initializer}
    assert "pads/channels_last" in initializers  # the Pads run channels-last
    for layer in report.layers:
        assert set(names.layer_weights(layer.name)) <= initializers, layer.name
    feeds = random_input(model, batch=2)
    with torch.no_grad():
        rebuilt = load_trainable(converted).eval()(torch.from_numpy(feeds["x"])).numpy()
    assert_parity(run(model, feeds), [rebuilt])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_lose_most_layout_changes(torchvision_model, name):
    path = torchvision_model(name)
    original = onnx.load(str(path))
    converted, report = conv2attn.convert(original, attention="local")
    nchw, _ = conv2attn.convert(original, attention="local", layout="nchw")
    # every Conv followed by another converted Conv through elementwise ops and Adds
    assert transposes(converted) < transposes(nchw) / 2
    assert sum(layer.input_channels_last for layer in report.layers) >= len(report.layers) - 1
    feeds = random_input(original, batch=2)
    assert_parity(run(original, feeds), run(converted, feeds))
    # only where values sit changes: the same arithmetic, so the same bits as NCHW (the
    # classifier's pool is its map's only reader: it stays NCHW, its sums in their order)
    assert "GlobalAveragePool" in {n.op_type for n in converted.graph.node}
    for moved, kept in zip(run(converted, feeds), run(nchw, feeds)):
        np.testing.assert_array_equal(moved, kept)
    if name == "resnet18":  # at batch 8 the max-pool's 25 MB input pools channels-last
        batch8, _ = conv2attn.convert(original, attention="local", batch=8)
        assert transposes(batch8) == transposes(converted) - 2
        assert "Unsqueeze" in {n.op_type for n in batch8.graph.node}
        np.testing.assert_array_equal(run(batch8, feeds)[0], run(nchw, feeds)[0])


def test_cli_layout_option_and_record(tmp_path, capsys):
    out = tmp_path / "cl.onnx"
    assert main(["convert", str(DIGITS), "-o", str(out), "--attention", "local", "-q"]) == 0
    record = converted_layers(onnx.load(out))
    assert any(entry.get("output_channels_last") for entry in record)
    inputs = str(DIGITS.parent / "digits_test.npz")
    assert main(["check", str(DIGITS), str(out), "--inputs", inputs, "--per-layer"]) == 0
    text = capsys.readouterr().out
    assert all(entry["name"] in text for entry in record)  # every source Conv named
    nchw = tmp_path / "nchw.onnx"
    args = ["convert", str(DIGITS), "-o", str(nchw), "--layout", "nchw", "-q"]
    assert main(args) == 0
    record = converted_layers(onnx.load(nchw))
    assert not any("output_channels_last" in entry for entry in record)
    tensors = {t for n in onnx.load(nchw).graph.node for t in n.output}
    assert all(entry["output"] in tensors for entry in record)  # the Convs' own names
    with pytest.raises(SystemExit) as refused:
        main(["convert", str(DIGITS), "-o", str(nchw), "--layout", "nhwc", "--force"])
    assert refused.value.code == 2 and "--layout" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["global", "local"])
def test_dynamic_sizes_stay_channels_last_between_pixel_token_layers(attention):
    """With height and width open, Convs on one-pixel tokens read and write channels-last
    pixels through one Transpose each (``emit_dynamic.pixel_tokens``), so the pairs
    cancel as on static sizes; each layer's ``Shape`` reads the channels-last tensor
    through a Gather of its dims, and the NCHW tensors between the layers are not made.
    Every size, each layer's check and the PyTorch module agree."""
    from tests.test_dynamic import dynamic

    model = dynamic(residual_block())
    options = dict(attention=attention, patch=1, block=1 if attention == "local" else "auto")
    converted, report = conv2attn.convert(model, **options)
    nchw, _ = conv2attn.convert(model, **options, layout="nchw")
    assert all(layer.dynamic for layer in report.layers)
    assert transposes(nchw) == 6 and transposes(converted) == 2
    made = {t for n in converted.graph.node for t in n.output}
    assert not {"c1", "r1", "c2", "silu"} & made
    shapes = [n for n in converted.graph.node if n.op_type == "Shape"]
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv2"].input_channels_last and layers["conv3"].input_channels_last
    assert len(shapes) == 3 and all(n.input[0] != "x" for n in shapes[1:])
    module = load_trainable(converted).eval()
    for size in [(10, 12), (7, 5), (1, 1)]:
        feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, *size)).astype(np.float32)}
        expected = run(model, feeds)
        assert_parity(expected, run(converted, feeds))
        result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
        assert result.passed and len(result.layers) == 3
        with torch.no_grad():
            assert_parity(expected, [module(torch.from_numpy(feeds["x"])).numpy()])


def pooled_block(pool: str, attrs: dict, opset: int = 13, rank: int = 2) -> onnx.ModelProto:
    """conv -> Relu -> a pool -> conv, batch open: the pool sits between converted Convs."""
    weight = random_initializers(seed=3)
    kernel, sizes = [3] * rank, ([12, 13] if rank == 2 else [20])
    nodes = [
        helper.make_node(
            "Conv", ["x", "w1"], ["c1"], "conv1", kernel_shape=kernel, pads=[1] * 2 * rank
        ),
        helper.make_node("Relu", ["c1"], ["r1"], "relu"),
        helper.make_node(pool, ["r1"], ["p1"], "pool", **attrs),
        helper.make_node(
            "Conv", ["p1", "w2"], ["y"], "conv2", kernel_shape=kernel, pads=[1] * 2 * rank
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "pooled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, *sizes])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight("w1", (6, 4, *kernel)), weight("w2", (5, 6, *kernel))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def pool_reads(model: onnx.ModelProto) -> str:
    """What feeds the pool: the op making its input."""
    made = {out: node for node in model.graph.node for out in node.output}
    (pool,) = [n for n in model.graph.node if n.name == "pool"]
    return made[pool.input[0]].op_type


# one item of pooled_block's pooled tensor: 6 x 12 x 13 floats
ITEM_BYTES = 6 * 12 * 13 * 4


def test_a_large_pool_runs_channels_last_at_the_batch_converted_for():
    """Channels-last pools pay where their input leaves the cache: at ``--batch``
    items (``geometry.POOL_CHANNELS_LAST_BYTES``) the pool joins the tensors between the
    converted Convs and the Transposes around it go; at batch 1, with ``--no-tiles``
    (emission for GPU runtimes) and on sizes that are open it stays NCHW."""
    from conv2attn.core.geometry import POOL_CHANNELS_LAST_BYTES
    from tests.test_dynamic import dynamic

    model = pooled_block("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    large = -(-POOL_CHANNELS_LAST_BYTES // ITEM_BYTES)
    options = dict(attention="global", patch=1)
    small, _ = conv2attn.convert(model, **options)
    moved, _ = conv2attn.convert(model, **options, batch=large)
    untiled, _ = conv2attn.convert(model, **options, batch=large, tiles=False)
    below, _ = conv2attn.convert(model, **options, batch=large - 1)
    open_sizes, _ = conv2attn.convert(dynamic(copy.deepcopy(model)), **options, batch=large)
    assert pool_reads(moved) == "Unsqueeze" and transposes(moved) == 2
    for kept in (small, untiled, below, open_sizes):
        assert pool_reads(kept) != "Unsqueeze" and transposes(kept) == 4
    feeds = random_input(model, batch=3)
    np.testing.assert_array_equal(run(moved, feeds)[0], run(small, feeds)[0])


POOLS = {
    "max 3x3/2": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "max ceil dilated": (
        "MaxPool",
        dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 1], ceil_mode=1),
    ),
    "max same_upper": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "max asymmetric": ("MaxPool", dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0])),
    "average with pads": (
        "AveragePool",
        dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1),
    ),
    "average without pads": (
        "AveragePool",
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
    ),
    "average 2x2/2": ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2])),
}


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("case", POOLS)
def test_a_channels_last_pool_pools_the_same_windows(case, opset, monkeypatch):
    """A pool channels-last is the same pool with a window of 1 over the channels: every
    window and its count of values as on NCHW. Max pools give the same bits as the NCHW
    conversion; average pools the same values up to summation order. The per-layer check
    and the PyTorch module read through it (opset 11: Unsqueeze's axes an attribute)."""
    monkeypatch.setattr("conv2attn.core.geometry.POOL_CHANNELS_LAST_BYTES", 0)
    pool, attrs = POOLS[case]
    model = pooled_block(pool, attrs, opset)
    options = dict(attention="local", patch=1, block="1x4")
    converted, report = conv2attn.convert(model, **options)
    nchw, _ = conv2attn.convert(model, **options, layout="nchw")
    assert pool_reads(converted) == "Unsqueeze" and transposes(converted) == 2
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv1"].output_channels_last and layers["conv2"].input_channels_last
    feeds = random_input(model, batch=3)
    expected = run(model, feeds)
    assert_parity(expected, run(converted, feeds))
    if pool == "MaxPool":
        np.testing.assert_array_equal(run(converted, feeds)[0], run(nchw, feeds)[0])
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed and [layer.name for layer in result.layers] == ["conv1", "conv2"]
    if "auto_pad" not in attrs:  # the PyTorch layer refuses SAME pools in any layout
        with torch.no_grad():
            got = load_trainable(converted).eval()(torch.from_numpy(feeds["x"])).numpy()
        assert_parity(expected, [got])


def test_a_1d_pool_runs_channels_last_as_a_2d_one(monkeypatch):
    monkeypatch.setattr("conv2attn.core.geometry.POOL_CHANNELS_LAST_BYTES", 0)
    model = pooled_block("MaxPool", dict(kernel_shape=[3], strides=[2], pads=[1, 1]), rank=1)
    converted, _ = conv2attn.convert(model, attention="local", patch=1)
    (pool,) = [n for n in converted.graph.node if n.name == "pool"]
    assert pool_reads(converted) == "Unsqueeze" and len(pool.attribute[0].ints) == 2
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))


def test_a_float16_pool_stays_nchw(monkeypatch):
    """Only float32 pools were measured channels-last; others keep the layout emitted."""
    monkeypatch.setattr("conv2attn.core.geometry.POOL_CHANNELS_LAST_BYTES", 0)
    model = pooled_block("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2]))
    for index, tensor in enumerate(model.graph.initializer):
        half = numpy_helper.to_array(tensor).astype(np.float16)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(half, tensor.name))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    converted, _ = conv2attn.convert(model, attention="local", patch=1)
    assert pool_reads(converted) != "Unsqueeze" and transposes(converted) == 4
    feeds = {"x": random_input(model, batch=2)["x"].astype(np.float16)}
    (got,) = run(converted, feeds)
    assert got.dtype == np.float16


def test_a_max_pool_that_returns_indices_stays_nchw(monkeypatch):
    """Its indices count positions in the NCHW tensor, which channels-last would change."""
    monkeypatch.setattr("conv2attn.core.geometry.POOL_CHANNELS_LAST_BYTES", 0)
    model = pooled_block("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2]))
    model.graph.node[2].output.append("indices")
    model.graph.output.append(helper.make_tensor_value_info("indices", TensorProto.INT64, None))
    converted, _ = conv2attn.convert(model, attention="local", patch=1)
    assert pool_reads(converted) != "Unsqueeze" and transposes(converted) == 4
    feeds = random_input(model, batch=2)
    for expected, got in zip(run(model, feeds), run(converted, feeds)):
        assert_parity([expected.astype(np.float64)], [got.astype(np.float64)])


def squeeze_excitation(opset: int, pool: str = "GlobalAveragePool") -> onnx.ModelProto:
    """EfficientNet's block: a depthwise Conv and SiLU, a squeeze-and-excitation gate (a
    global pool, two 1x1 Convs on one pixel, a Sigmoid) scaling the map, a 1x1 Conv."""
    weight = random_initializers(seed=3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["e"], "expand", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["e", "w2"], ["d"], "depthwise", kernel_shape=[3, 3],
                         pads=[1] * 4, group=8),
        helper.make_node("Sigmoid", ["d"], ["ds"], "silu/Sigmoid"),
        helper.make_node("Mul", ["d", "ds"], ["a"], "silu/Mul"),
        # named after its output, as some exporters name nodes
        helper.make_node(pool, ["a"], ["pool"], "pool"),
        helper.make_node("Conv", ["pool", "w3", "b3"], ["f1"], "fc1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["f1"], ["r1"], "fc1/Relu"),
        helper.make_node("Conv", ["r1", "w4", "b4"], ["f2"], "fc2", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["f2"], ["gate"], "gate"),
        helper.make_node("Mul", ["gate", "a"], ["scaled"], "scale"),
        helper.make_node("Conv", ["scaled", "w5"], ["y"], "project", kernel_shape=[1, 1]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "squeeze_excitation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 10, 12])],
        [
            weight("w1", (8, 4, 1, 1)),
            weight("w2", (8, 1, 3, 3)),
            weight("w3", (2, 8, 1, 1)),
            weight("b3", (2,)),
            weight("w4", (8, 2, 1, 1)),
            weight("b4", (8,)),
            weight("w5", (5, 8, 1, 1)),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(
    "opset, pool",
    [(13, "GlobalAveragePool"), (18, "GlobalAveragePool"), (13, "GlobalMaxPool"),
     (18, "GlobalMaxPool")],
)  # fmt: skip
def test_a_squeeze_excitation_gate_keeps_the_map_channels_last(opset, pool):
    """The map between the depthwise Conv and the projection stays channels-last through
    the gate: the pool reduces its spatial axes (an average as a MatMul of a row of
    1/pixels with the pixels), and the one-pixel tensors on the gate's way (pooled
    values, gate) change layout by Reshape, not Transpose."""
    model = squeeze_excitation(opset, pool)
    converted, report = conv2attn.convert(model, attention="local", patch=1)
    nchw, _ = conv2attn.convert(model, attention="local", patch=1, layout="nchw")
    nodes = {n.name: n for n in converted.graph.node}
    initializers = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer}
    # left: the input's way to channels-last and the output's way back
    assert transposes(converted) == 2 < transposes(nchw)
    assert pool not in {n.op_type for n in nodes.values()}
    if pool == "GlobalAveragePool":
        weights = initializers[nodes["pool/MatMul"].input[0]]
        np.testing.assert_array_equal(weights, np.full((1, 10 * 12), 1 / 120, np.float32))
    else:
        (reduce,) = [n for n in nodes.values() if n.op_type == "ReduceMax"]
        axes = (
            list(helper.get_attribute_value(next(a for a in reduce.attribute if a.name == "axes")))
            if opset < 18
            else initializers[reduce.input[1]].tolist()
        )
        assert axes == [1, 2]  # the spatial axes of [B, H, W, C]
    layers = {layer.name: layer for layer in report.layers}
    assert layers["project"].input_channels_last and layers["depthwise"].output_channels_last
    for batch in (1, 3):  # the Reshapes copy the batch: any batch runs
        feeds = random_input(model, batch=batch)
        assert_same_arithmetic(run(nchw, feeds), run(converted, feeds))
    assert_checked_and_rebuilt(
        model, converted, feeds, ["expand", "depthwise", "fc1", "fc2", "project"]
    )


def gate_of_dynamic_size() -> onnx.ModelProto:
    """A Conv of dynamic height and width whose output a global pool's gate scales: the
    pool reads the layer's output itself, whose channels-last tensor has no recorded
    shape."""
    weight = random_initializers(seed=5)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], "conv", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], "pool"),
        helper.make_node("Sigmoid", ["p"], ["g"], "gate"),
        helper.make_node("Mul", ["c", "g"], ["s"], "scale"),
        helper.make_node("Conv", ["s", "w2"], ["y"], "project", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "gate_of_dynamic_size",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [weight("w1", (6, 3, 3, 3)), weight("w2", (4, 6, 1, 1))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("attention", ["local", "global"])
def test_a_gate_of_dynamic_size_reduces_channels_last(attention):
    """Sizes unknown, the average is a ReduceMean over the spatial axes, at any size."""
    model = gate_of_dynamic_size()
    converted, _ = conv2attn.convert(model, attention=attention, patch=1)
    nchw, _ = conv2attn.convert(model, attention=attention, patch=1, layout="nchw")
    ops = [n.op_type for n in converted.graph.node]
    assert "GlobalAveragePool" not in ops and ops.count("ReduceMean") == 1
    assert transposes(converted) < transposes(nchw)
    for height, width in ((10, 12), (7, 9)):
        x = np.random.default_rng(height).standard_normal((2, 3, height, width))
        feeds = {"x": x.astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))
        assert_same_arithmetic(run(nchw, feeds), run(converted, feeds))
