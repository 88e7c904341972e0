"""Random networks built from what real CNNs are made of, converted under random options.

Each case is a small network mixing ordinary, strided, dilated, depthwise and grouped
Convs with the operations between them in torchvision's classifiers: per-channel scales,
BatchNormalization, residual Adds, Relu, Sigmoid, SiLU, Clip (ReLU6), HardSwish,
squeeze-and-excitation gates, max and average pools, channel Concats of two branches and
Pads; some intermediate tensors are graph outputs too, and some inputs leave height and
width open. It is converted with a random choice of attention, grid, layout, patch,
queries, form, batch, tile budget (which also sizes the gates whose stretch runs one
batch item at a time, ``graph.per_item``) and BatchNormalization folding.

What a user relies on, whatever the mix: every Conv converts, the outputs keep parity
(``helpers.assert_parity``: 1e-5 of the largest value plus 1e-6), ``check --per-layer``
passes on every converted layer, and ``torch_graph.load_trainable`` rebuilds the
converted model in PyTorch with the same parity. CI runs 40 networks; PROPERTY_EXAMPLES
raises it.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.core import geometry
from conv2attn.errors import InputError
from conv2attn.graph import per_item
from conv2attn.inputs import Samples
from conv2attn.torch_graph import load_trainable
from conv2attn.validate import check
from tests.helpers import assert_parity, run

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "40"))


class Builder:
    """Appends nodes and He-scaled weights, tracking each tensor's [C, H, W]."""

    def __init__(self, seed: int, channels: int, size: tuple[int, int]) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []
        self.shapes: dict[str, tuple[int, int, int]] = {"x": (channels, *size)}
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def constant(self, values: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def weight(self, shape: tuple[int, ...]) -> str:
        # unit variance through each Conv, as in a trained network: parity is stated
        # against the largest output, and saturating gates would hide errors before them
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else 1
        values = self.rng.standard_normal(shape) / np.sqrt(fan_in)
        return self.constant(values.astype(np.float32), "w")

    def add(self, op: str, inputs: list[str], shape: tuple[int, int, int], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], out, **attrs))
        self.shapes[out] = shape
        return out

    def conv(self, x, out_channels, kernel, stride=1, pad=0, group=1, dilation=1, bias=True):
        channels, *size = self.shapes[x]
        out = [(n + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for n in size]
        if min(out) < 1:
            return None
        inputs = [x, self.weight((out_channels, channels // group, kernel, kernel))]
        if bias:
            inputs.append(self.weight((out_channels,)))
        attrs = dict(kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4)
        attrs.update(group=group, dilations=[dilation] * 2)
        return self.add("Conv", inputs, (out_channels, *out), **attrs)

    def activation(self, x: str, kind: str) -> str:
        shape = self.shapes[x]
        if kind == "SiLU":
            return self.add("Mul", [x, self.add("Sigmoid", [x], shape)], shape)
        if kind == "Clip":
            low, high = self.constant(np.float32(0)), self.constant(np.float32(6))
            return self.add("Clip", [x, low, high], shape)
        return self.add(kind, [x], shape)


ACTIVATIONS = ["Relu", "Sigmoid", "SiLU", "Clip", "HardSwish", None]


@st.composite
def networks(draw):
    channels = draw(st.sampled_from([3, 4, 6, 8]))
    height = draw(st.sampled_from([7, 8, 12, 16, 17]))
    width = draw(st.sampled_from([height, height, 9, 14]))
    net = Builder(draw(st.integers(0, 2**16)), channels, (height, width))
    current, outputs = "x", []
    for _ in range(draw(st.integers(2, 6))):
        channels, height, width = net.shapes[current]
        kind = draw(st.sampled_from(["conv", "conv", "depthwise", "grouped", "bn", "pool"]))
        kind = draw(st.sampled_from([kind, kind, "gate", "branches", "pad"]))
        block_input = current
        if kind in ("conv", "depthwise", "grouped"):
            kernel = draw(st.sampled_from([1, 3, 3, 5, 7] if kind == "conv" else [3, 3, 5]))
            if kind == "depthwise":
                group, width_out = channels, channels * draw(st.sampled_from([1, 1, 2]))
            elif kind == "grouped" and channels % 2 == 0:
                group, width_out = 2, 2 * draw(st.integers(1, 3))
            else:
                group, width_out = 1, draw(st.sampled_from([2, 4, 6, 8, 16]))
            conv = net.conv(
                current,
                width_out,
                kernel,
                stride=draw(st.sampled_from([1, 1, 2])),
                pad=draw(st.sampled_from([kernel // 2, kernel // 2, 0])),
                group=group,
                dilation=draw(st.sampled_from([1, 1, 1, 2])),
                bias=draw(st.integers(0, 3)) > 0,
            )
            if conv is None:
                continue
            current = conv
            if draw(st.booleans()):
                scale = net.weight((width_out, 1, 1))
                current = net.add("Mul", [current, scale], net.shapes[current])
            if net.shapes[current] == net.shapes[block_input] and draw(st.booleans()):
                current = net.add("Add", [current, block_input], net.shapes[current])
            activation = draw(st.sampled_from(ACTIVATIONS))
            if activation:
                current = net.activation(current, activation)
        elif kind == "bn":
            conv = net.conv(current, channels, 3, pad=1)
            stats = [net.weight((channels,)) for _ in range(3)]
            variance = net.constant((net.rng.random(channels) + 0.5).astype(np.float32))
            normalized = net.add("BatchNormalization", [conv, *stats, variance], net.shapes[conv])
            current = net.activation(normalized, "Relu")
        elif kind == "pool" and min(height, width) >= 3:
            if draw(st.booleans()):
                shape = (channels, (height - 1) // 2 + 1, (width - 1) // 2 + 1)
                attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
                current = net.add("MaxPool", [current], shape, **attrs)
            else:
                shape = (channels, height // 2, width // 2)
                current = net.add(
                    "AveragePool", [current], shape, kernel_shape=[2, 2], strides=[2, 2]
                )
        elif kind == "gate":  # squeeze-and-excitation, as in efficientnet and mobilenet_v3
            pooled = net.add("GlobalAveragePool", [current], (channels, 1, 1))
            squeezed = net.activation(net.conv(pooled, max(channels // 2, 1), 1), "Relu")
            excited = net.conv(squeezed, channels, 1)
            gate = net.add(
                draw(st.sampled_from(["Sigmoid", "HardSigmoid"])), [excited], (channels, 1, 1)
            )
            current = net.add("Mul", [current, gate], net.shapes[current])
        elif kind == "branches":  # inception-style channel Concat
            left = net.activation(net.conv(current, draw(st.sampled_from([2, 4])), 1), "Relu")
            right = net.conv(current, draw(st.sampled_from([2, 4])), 3, pad=1)
            shape = (net.shapes[left][0] + net.shapes[right][0], height, width)
            current = net.add("Concat", [left, right], shape, axis=1)
        elif kind == "pad":
            pads = net.constant(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64))
            current = net.add("Pad", [current, pads], (channels, height + 1, width + 1))
        if current != "x" and draw(st.integers(0, 5)) == 0:
            outputs.append(current)
    convs = sum(node.op_type == "Conv" for node in net.nodes)
    assume(convs >= 1 and current != "x")
    if current not in outputs:
        outputs.append(current)
    open_size = draw(st.integers(0, 3)) == 0
    channels, height, width = net.shapes["x"]
    dims = ["N", channels, "H", "W"] if open_size else ["N", channels, height, width]
    graph = helper.make_graph(
        net.nodes,
        "network",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor_value_info(
                name,
                TensorProto.FLOAT,
                ["N", net.shapes[name][0], f"{name}_h", f"{name}_w"]
                if open_size
                else ["N", *net.shapes[name]],
            )
            for name in outputs
        ],
        net.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    feeds = {"x": net.rng.standard_normal((3, channels, height, width)).astype(np.float32)}
    return model, feeds, convs


@st.composite
def conversion_options(draw):
    attention = draw(st.sampled_from(["global", "local", "local", "auto"]))
    options = dict(
        attention=attention,
        grid=draw(st.sampled_from(["shifted", "fixed", "auto"])),
        layout=draw(st.sampled_from(["channels-last", "channels-last", "nchw"])),
        patch=draw(st.sampled_from(["auto", "auto", "1", "2"])),
        queries=draw(
            st.sampled_from(["auto", "patch"] + (["strided"] if attention != "global" else []))
        ),
        form=draw(st.sampled_from(["matmul"] * 7 + ["attention"])),
        batch=draw(st.sampled_from([1, 1, 4])),
        tiles=draw(st.sampled_from([True, True, True, False])),
        fold_bn=draw(st.booleans()),
        max_param_growth=1e9,
    )
    # small budgets split even these small layers' local attention into tiles
    tile_bytes = draw(st.sampled_from([geometry.TILE_BYTES, 2**12, 2**14, 2**16]))
    return options, tile_bytes


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True)
@given(networks(), conversion_options())
def test_random_networks_convert_with_parity_and_every_layer_checks(network, choice):
    model, feeds, convs = network
    options, tile_bytes = choice
    # budgets scaled down further let these small maps' gates (120 B to 3 KB per item)
    # run their stretch one batch item at a time
    with (
        mock.patch.object(geometry, "TILE_BYTES", tile_bytes),
        mock.patch.object(per_item, "TILE_BYTES", tile_bytes // 16),
        mock.patch.object(per_item, "GATE_ITEM_BYTES", tile_bytes // 64),
    ):
        try:
            converted, report = conv2attn.convert(model, **options)
        except InputError:  # a forced patch larger than a Conv's output, say
            event("refused")
            assume(False)
    assert len(report.layers) == convs
    event(
        f"per-item layers: {'some' if any(layer.per_item for layer in report.layers) else 'none'}"
    )
    event(f"tiled layers: {'some' if any(layer.tiles > 1 for layer in report.layers) else 'none'}")
    event(f"dynamic layers: {'some' if any(layer.dynamic for layer in report.layers) else 'none'}")
    expected = run(model, feeds)
    assert_parity(expected, run(converted, feeds))
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed and len(result.layers) == convs
    with torch.no_grad():
        rebuilt = load_trainable(converted).eval()(torch.from_numpy(feeds["x"]))
    rebuilt = [rebuilt] if isinstance(rebuilt, torch.Tensor) else list(rebuilt)
    assert_parity(expected, [tensor.numpy() for tensor in rebuilt])
