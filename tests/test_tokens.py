"""Patch tokens flow between converted Convs that share a token grid (``graph/tokens.py``,
design section 8): no un-patchify/patchify pair between them, the same function, every
layer still checked and rebuilt in PyTorch from its record.

Parity is ``helpers.assert_parity`` (1e-5 of the largest value plus 1e-6); between the
layouts the comparison is exact, since the pass only moves values. CI runs 60 random
streams; PROPERTY_EXAMPLES raises it.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.cli import main
from conv2attn.errors import InputError
from conv2attn.inputs import Samples
from conv2attn.record import converted_layers
from conv2attn.torch_graph import load_trainable
from conv2attn.validate import check
from tests.helpers import assert_parity, random_initializers, random_input, run

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "60"))


def shuffles(model: onnx.ModelProto) -> list[str]:
    """The patch shuffles left: each converted Conv's patchify and un-patchify Transposes."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Transpose" and node.name.endswith("patchify/Transpose")
    ]


def vit_stretch(extra_output: bool = False) -> onnx.ModelProto:
    """conv1 -> per-channel scale/shift -> Relu -> conv2 -> residual Add -> SiLU -> 1x1
    conv3: on a fixed grid of 2x2 patches, the stretch of a ViT's residual stream."""
    weight = random_initializers(seed=0)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Mul", ["c1", "scale"], ["s1"], "scale"),
        helper.make_node("Add", ["s1", "shift"], ["b1"], "shift"),
        helper.make_node("Relu", ["b1"], ["r1"], "relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv2", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["c2", "r1"], ["sum"], "residual"),
        helper.make_node("Sigmoid", ["sum"], ["gate"], "sigmoid"),
        helper.make_node("Mul", ["sum", "gate"], ["silu"], "silu"),
        helper.make_node("Conv", ["silu", "w3"], ["y"], "conv3", kernel_shape=[1, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8, 12])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", 6, 8, 12]))
    graph = helper.make_graph(
        nodes,
        "stretch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 12])],
        outputs,
        [
            weight("w1", (6, 4, 3, 3)),
            weight("w2", (6, 6, 3, 3)),
            weight("w3", (5, 6, 1, 1)),
            weight("scale", (6, 1, 1)),
            weight("shift", (1, 6, 1, 1)),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


FIXED = dict(attention="global", grid="fixed", patch=2, max_param_growth=100)


def test_tokens_flow_through_the_residual_stream():
    model = vit_stretch()
    converted, report = conv2attn.convert(model, **FIXED)
    nchw, _ = conv2attn.convert(model, **FIXED, layout="nchw")
    # every Conv patchifies and un-patchifies on its own (6) against one pair around all
    assert len(shuffles(nchw)) == 6
    assert shuffles(converted) == [
        "conv1/attn/patchify/Transpose",
        "conv3/attn/unpatchify/Transpose",
    ]
    produced = {t for node in converted.graph.node for t in node.output}
    assert "conv2/attn/unpatchify/tokens_output_0" in produced
    assert {"r1/tokens", "silu/tokens"} <= produced and not {"c1", "r1", "silu"} & produced
    # the padding of conv2 is whole tokens: [B, T1, T2, P1, P2, C] padded on T1 and T2
    pad = next(n for n in converted.graph.node if n.name == "conv2/attn/pad/Pad")
    pads = next(i for i in converted.graph.initializer if i.name == pad.input[1])
    assert numpy_helper.to_array(pads).tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv1"].output_patch == (2, 2) and layers["conv1"].input_patch == ()
    assert layers["conv2"].input_patch == layers["conv2"].output_patch == (2, 2)
    assert layers["conv3"].input_patch == (2, 2) and layers["conv3"].output_patch == ()
    recorded = {layer["name"]: layer for layer in converted_layers(converted)}
    assert recorded["conv2"]["output_patch"] == [2, 2]
    assert recorded["conv2"]["output_channels_last"] == "conv2/attn/unpatchify/tokens_output_0"
    feeds = random_input(model, batch=3)
    assert_parity(run(model, feeds), run(converted, feeds))
    np.testing.assert_array_equal(run(converted, feeds)[0], run(nchw, feeds)[0])


def test_the_conversion_table_says_which_layers_read_tokens(tmp_path, capsys):
    source, out = tmp_path / "stretch.onnx", tmp_path / "out.onnx"
    onnx.save(vit_stretch(), source)
    args = ["convert", str(source), "-o", str(out), "--attention", "global", "--grid", "fixed"]
    assert main([*args, "--patch", "2", "--max-param-growth", "100"]) == 0
    assert (
        "2 layer(s) read patch tokens straight from the Convs before them"
        in capsys.readouterr().out
    )
    recorded = {layer["name"]: layer for layer in converted_layers(onnx.load(out))}
    assert recorded["conv3"]["input_patch"] == [2, 2] and "input_patch" not in recorded["conv1"]


def test_every_layer_is_checked_and_rebuilt_from_its_tokens():
    """``check --per-layer`` un-patchifies a layer held as tokens itself, and the PyTorch
    model lays its layers' NCHW tensors out as the tokens the graph holds."""
    model = vit_stretch()
    converted, _ = conv2attn.convert(model, **FIXED)
    feeds = random_input(model, batch=2)
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed
    assert [layer.name for layer in result.layers] == ["conv1", "conv2", "conv3"]
    assert all(layer.max_rel < 1e-5 for layer in result.layers)

    module = load_trainable(converted).eval()
    with torch.no_grad():
        got = module(torch.from_numpy(feeds["x"])).numpy()
    assert_parity(run(model, feeds), [got])


def test_local_attention_blocks_are_laid_on_the_grid_once():
    """Local attention's output tokens come block by block: one reorder (whole runs of a
    block row) lays them on the grid, in place of the un-patchify, and the next Conv
    still reads them without a patchify."""
    model = vit_stretch()
    options = dict(attention="local", grid="fixed", patch=2, block="2x3", max_param_growth=100)
    converted, report = conv2attn.convert(model, **options)
    nchw, _ = conv2attn.convert(model, **options, layout="nchw")
    assert shuffles(converted) == [
        "conv1/attn/patchify/Transpose",
        "conv3/attn/unpatchify/Transpose",
    ]
    reorders = [n.name for n in converted.graph.node if n.name.endswith("/tokens/Transpose")]
    assert reorders == [
        "conv1/attn/unpatchify/tokens/Transpose",
        "conv2/attn/unpatchify/tokens/Transpose",
    ]
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv2"].block == (2, 3) and layers["conv2"].input_patch == (2, 2)
    feeds = random_input(model, batch=2)
    got = run(converted, feeds)
    np.testing.assert_array_equal(got[0], run(nchw, feeds)[0])
    assert_parity(run(model, feeds), got)
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed and len(result.layers) == 3
    with torch.no_grad():
        rebuilt = load_trainable(converted).eval()(torch.from_numpy(feeds["x"])).numpy()
    assert_parity(run(model, feeds), [rebuilt])


def test_a_tensor_read_outside_the_stream_keeps_its_name_and_layout():
    """r1 is also a graph output: it is un-patchified once, under its own name, and the
    tokens still flow into conv2 and the residual Add."""
    model = vit_stretch(extra_output=True)
    converted, _ = conv2attn.convert(model, **FIXED)
    assert [o.name for o in converted.graph.output] == ["y", "r1"]
    assert shuffles(converted) == [
        "conv1/attn/patchify/Transpose",
        "conv3/attn/unpatchify/Transpose",
    ]
    assert sum(n.name == "r1/tokens/to_pixels" for n in converted.graph.node) == 1
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))


def test_a_layer_whose_padding_splits_tokens_reads_pixels():
    """On the shifted grid conv2's tokens start one pixel before the image, inside conv1's
    output tokens: it patchifies pixels made from the stream, once, while the 1x1 conv3
    (no padding: its tokens start at the first pixel, as every output's do) reads the
    stream's tokens."""
    model = vit_stretch()
    shifted = {**FIXED, "grid": "shifted"}
    converted, report = conv2attn.convert(model, **shifted)
    assert shuffles(converted) == [
        "conv1/attn/patchify/Transpose",
        "conv2/attn/patchify/Transpose",
        "conv3/attn/unpatchify/Transpose",
    ]
    assert sum(n.name == "r1/tokens/to_pixels" for n in converted.graph.node) == 1
    layers = {layer.name: layer for layer in report.layers}
    assert layers["conv2"].input_patch == () and layers["conv2"].output_patch == (2, 2)
    assert layers["conv3"].input_patch == (2, 2)
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed and len(result.layers) == 3


def test_resnet18_on_the_fixed_grid_is_a_token_stream(torchvision_model):
    """Global attention on the fixed grid: layer2's four 3x3 Convs share patch tokens
    through their residual Adds (its downsampling Conv patchifies layer1's pixels once),
    and layer3's downsampling Conv merges them in token space (its input patch is layer2's
    output patch); its 1x1 shortcut, which subsamples pixels, reads them un-patchified."""
    original = onnx.load(str(torchvision_model("resnet18")))
    options = dict(attention="global", grid="fixed")
    converted, report = conv2attn.convert(original, **options)
    nchw, _ = conv2attn.convert(original, **options, layout="nchw")
    layers = {layer.name: layer for layer in report.layers}
    stretch = [f"/layer2/layer2.{block}/conv{conv}/Conv" for block in (0, 1) for conv in (1, 2)]
    patch = layers[stretch[0]].patch  # the cost model's: 2x2 today
    assert max(patch) > 1 and all(layers[name].patch == patch for name in stretch)
    assert all(layers[name].output_patch == patch for name in stretch)
    assert all(layers[name].input_patch == patch for name in stretch[1:])
    assert layers["/layer3/layer3.0/conv1/Conv"].input_patch == patch
    assert layers["/layer3/layer3.0/downsample/downsample.0/Conv"].input_patch == ()
    left = shuffles(converted)
    assert [name for name in left if name.startswith("/layer2/")] == [
        "/layer2/layer2.0/conv1/Conv/attn/patchify/Transpose"
    ]
    # gone: the four Convs' un-patchify, the patchify of the three after the first, and
    # layer3.0.conv1's
    assert len(left) <= len(shuffles(nchw)) - 8
    feeds = random_input(original, batch=2)
    assert_parity(run(original, feeds), run(converted, feeds))
    for moved, kept in zip(run(converted, feeds), run(nchw, feeds)):
        np.testing.assert_array_equal(moved, kept)


@st.composite
def streams(draw):
    """A random stretch of Convs joined by the operations tokens flow through: per-channel
    scales, activations, SiLU gates, residual Adds, some tensors also graph outputs."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels = draw(st.integers(2, 6))
    # mostly even sizes: a Conv's output tokens flow when its patch tiles its output
    size = [draw(st.sampled_from([4, 6, 8, 8, 12, 5, 7])) for _ in range(2)]
    nodes, inits, outputs = [], [], []
    shapes = {"x": (channels, *size)}

    def weight(name, shape):
        # unit variance through each Conv (He-style), as in a trained network: parity is
        # stated against the largest output, and a Sigmoid at the end would hide how large
        # unscaled random weights make the values before it
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else 1
        values = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        inits.append(numpy_helper.from_array(values, name))
        return name

    current = "x"
    for index in range(draw(st.integers(2, 4))):
        kernel = draw(st.sampled_from([1, 3, 3, 5]))
        stride = draw(st.sampled_from([1, 1, 1, 2]))
        pad = draw(st.sampled_from([kernel // 2, kernel // 2, 0]))
        out_size = [(n + 2 * pad - kernel) // stride + 1 for n in size]
        if min(out_size) < 1:
            break
        width = draw(st.integers(2, 6))
        conv = f"conv{index}"
        w = weight(f"w{index}", (width, channels, kernel, kernel))
        attrs = dict(kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4)
        nodes.append(helper.make_node("Conv", [current, w], [f"{conv}_y"], conv, **attrs))
        block_input, current = current, f"{conv}_y"
        shapes[current] = (width, *out_size)
        if draw(st.booleans()):
            scale = weight(f"scale{index}", (width, 1, 1))
            nodes.append(helper.make_node("Mul", [current, scale], [f"{conv}_s"], f"scale{index}"))
            current = f"{conv}_s"
        if draw(st.booleans()) and shapes[block_input] == (width, *out_size):
            nodes.append(
                helper.make_node("Add", [current, block_input], [f"{conv}_r"], f"add{index}")
            )
            current = f"{conv}_r"
        activation = draw(st.sampled_from(["Relu", "Sigmoid", "silu", None]))
        if activation == "silu":
            nodes.append(helper.make_node("Sigmoid", [current], [f"{conv}_g"], f"gate{index}"))
            nodes.append(
                helper.make_node("Mul", [current, f"{conv}_g"], [f"{conv}_a"], f"silu{index}")
            )
            current = f"{conv}_a"
        elif activation:
            nodes.append(helper.make_node(activation, [current], [f"{conv}_a"], f"act{index}"))
            current = f"{conv}_a"
        shapes[current] = (width, *out_size)
        if draw(st.integers(0, 4)) == 0:
            outputs.append(current)
        channels, size = width, out_size
    assume(len(nodes) >= 2 and any(n.op_type == "Conv" for n in nodes[1:]))
    if current not in outputs:
        outputs.append(current)
    graph = helper.make_graph(
        nodes,
        "stream",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shapes["x"]])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", *shapes[o]]) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = dict(
        attention=draw(st.sampled_from(["global", "global", "global", "local"])),
        grid=draw(st.sampled_from(["fixed", "fixed", "fixed", "shifted", "auto"])),
        patch=draw(st.sampled_from(["2", "2", "2x1", "auto", "1", "1x3"])),
        max_param_growth=1e9,
    )
    return model, options


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(streams())
def test_random_streams_keep_parity_and_every_layer_checks(case):
    model, options = case
    try:
        converted, report = conv2attn.convert(model, **options)
    except InputError:  # a forced patch larger than a Conv's output, say
        event("refused")
        assume(False)
    flowing = sum(bool(layer.input_patch) for layer in report.layers)
    event(f"Convs reading tokens: {min(flowing, 2)}{'+' if flowing >= 2 else ''}")
    nchw, _ = conv2attn.convert(model, **options, layout="nchw")
    feeds = random_input(model, batch=2)
    got = run(converted, feeds)
    for moved, kept in zip(got, run(nchw, feeds)):  # only where values sit changes
        np.testing.assert_array_equal(moved, kept)
    assert_parity(run(model, feeds), got)
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed and len(result.layers) == len(report.layers)
