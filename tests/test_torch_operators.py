"""The operators around converted Convs, run in PyTorch by ``torch_graph.load_trainable``.

Each case puts one operator (or the shape arithmetic real exporters write) after a
converted Conv and checks the module against onnxruntime running the same converted
model: the values within the parity bound (``helpers.assert_parity``: 1e-5 of the largest
value plus 1e-6; the operators themselves only move, compare or normalise values), the
dtype and the shape exactly. The cases cover what torchvision's classifiers export
(shufflenet_v2's channel split, swin's shifted windows and padding, maxvit's Einsum,
LayerNormalization from opset 17) and the corners of each operator: negative indices,
negative and clamped Slice bounds and steps, negative pads, every Pad mode, integer Div.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.errors import InputError
from conv2attn.torch_graph import load_trainable
from tests.helpers import assert_parity, run

SHAPE = (2, 4, 6, 7)  # the Conv's output, NCHW


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class Case:
    """``x -> Conv(3x3, pad 1) -> y``, then nodes reading ``y`` and constants."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        weight = rng.standard_normal((SHAPE[1], 3, 3, 3)).astype(np.float32) / 5
        self.nodes = [helper.make_node("Conv", ["x", "w"], ["y"], "conv", pads=[1, 1, 1, 1])]
        self.initializers = [numpy_helper.from_array(weight, "w")]

    def constant(self, name: str, values) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], output, **attrs))
        return output

    def model(self, output: str, elem_type: int = TensorProto.FLOAT, opset: int = 18):
        graph = helper.make_graph(
            self.nodes,
            "case",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SHAPE[0], 3, *SHAPE[2:]])],
            [helper.make_tensor_value_info(output, elem_type, None)],
            self.initializers,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def pad(mode: str, pads: list[int], axes: list[int] | None = None, value: float | None = None):
    case = Case()
    inputs = ["y", case.constant("pads", _ints(*pads))]
    if value is not None or axes is not None:
        inputs.append(case.constant("value", np.float32(value)) if value is not None else "")
    if axes is not None:
        inputs.append(case.constant("axes", _ints(*axes)))
    return case.model(case.node("Pad", inputs, "out", mode=mode), opset=19)


def slice_(starts, ends, axes, steps):
    case = Case()
    bounds = [case.constant(n, _ints(*v)) for n, v in [("s", starts), ("e", ends), ("a", axes)]]
    return case.model(case.node("Slice", ["y", *bounds, case.constant("t", _ints(*steps))], "out"))


def gather(indices, axis: int):
    case = Case()
    return case.model(case.node("Gather", ["y", case.constant("i", indices)], "out", axis=axis))


def channel_split():
    """shufflenet_v2's split: half the channels, the half computed from Shape by Div."""
    case = Case()
    channels = case.node("Gather", [case.node("Shape", ["y"], "shape"), "one"], "channels")
    case.constant("one", np.int64(1))
    half = case.node("Div", [channels, case.constant("two", np.int64(2))], "half")
    end = case.node("Unsqueeze", [half, case.constant("zero", _ints(0))], "end")
    out = case.node("Slice", ["y", case.constant("start", _ints(0)), end, "axis"], "out")
    case.constant("axis", _ints(1))
    return case.model(out)


def cast_round_trip():
    case = Case()
    low = case.node("Cast", ["y"], "half", to=TensorProto.FLOAT16)
    return case.model(case.node("Cast", [low], "out", to=TensorProto.FLOAT))


def alternating_sign():
    """Range, Mod, Equal, Not, Where and Expand: even columns kept, odd ones negated."""
    case = Case()
    columns = case.node(
        "Range",
        [case.constant("r0", np.int64(0)), case.constant("rn", np.int64(SHAPE[3])), "r1"],
        "columns",
    )
    case.constant("r1", np.int64(1))
    parity = case.node("Mod", [columns, case.constant("m", np.int64(2))], "parity")
    odd = case.node("Not", [case.node("Equal", [parity, "r0"], "even")], "odd")
    mask = case.node("Expand", [odd, case.constant("full", _ints(*SHAPE))], "mask")
    flipped = case.node("Mul", ["y", case.constant("minus", np.float32(-1))], "flipped")
    return case.model(case.node("Where", [mask, flipped, "y"], "out"))


def filled_like():
    case = Case()
    shape = case.node("Shape", ["y"], "shape")
    value = numpy_helper.from_array(np.array([1.5], np.float32))
    filled = case.node("ConstantOfShape", [shape], "filled", value=value)
    return case.model(case.node("Add", ["y", filled], "out"))


def scatter():
    case = Case()
    indices = case.constant("i", np.array([[0, 1], [1, -1]], np.int64))
    updates = case.constant("u", np.zeros((2, *SHAPE[2:]), np.float32))
    return case.model(case.node("ScatterND", ["y", indices, updates], "out"))


def l2_normalised_exp():
    case = Case()
    positive = case.node("Exp", ["y"], "positive")
    norm = case.node("ReduceL2", [positive], "norm", axes=[1], keepdims=1)
    return case.model(case.node("Div", [positive, norm], "out"), opset=17)


def layer_norm():
    case = Case()
    scale = case.constant("scale", np.linspace(0.5, 1.5, SHAPE[3]).astype(np.float32))
    bias = case.constant("bias", np.linspace(-1, 1, SHAPE[3]).astype(np.float32))
    out = case.node("LayerNormalization", ["y", scale, bias], "out", axis=-1, epsilon=1e-3)
    return case.model(out, opset=17)


def einsum():
    case = Case()
    mixing = case.constant("mix", np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    return case.model(case.node("Einsum", ["y", mixing], "out", equation="bchw,cd->bdhw"))


CASES = {
    "Pad constant, value and axes": lambda: pad("constant", [1, 0, 2, 3], [2, -1], 0.5),
    "Pad reflect": lambda: pad("reflect", [0, 0, 1, 2, 0, 0, 2, 1]),
    "Pad edge, negative pads": lambda: pad("edge", [0, 0, -1, 2, 0, 0, 1, -2]),
    "Pad wrap": lambda: pad("wrap", [0, 1, 2, 0, 0, 0, 1, 3]),
    "Slice backwards with a step": lambda: slice_([-1], [-100], [3], [-2]),
    "Slice clamped, two axes": lambda: slice_([1, 0], [1000, 3], [2, -3], [2, 1]),
    "Gather negative indices": lambda: gather(np.array([[-1, 0], [2, 2]], np.int64), 1),
    "Gather one index": lambda: gather(np.int64(-2), 2),
    "channel split by integer Div": channel_split,
    "Cast to float16 and back": cast_round_trip,
    "Range Mod Equal Not Expand Where": alternating_sign,
    "ConstantOfShape": filled_like,
    "ScatterND": scatter,
    "Exp ReduceL2": l2_normalised_exp,
    "LayerNormalization": layer_norm,
    "Einsum": einsum,
}


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_the_module_computes_what_onnxruntime_computes(build):
    converted, report = conv2attn.convert(build(), attention="local")
    assert [layer.name for layer in report.layers] == ["conv"]
    feeds = {"x": np.random.default_rng(1).standard_normal((SHAPE[0], 3, *SHAPE[2:]))}
    feeds["x"] = feeds["x"].astype(np.float32)
    (expected,) = run(converted, feeds)
    with torch.no_grad():
        got = load_trainable(converted).eval()(torch.from_numpy(feeds["x"])).numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert_parity([expected], [got])


def _one_node(op: str, inputs, elem_type: int = TensorProto.FLOAT, **attrs):
    def build():
        case = Case()
        return case.model(case.node(op, ["y", *inputs(case)], "out", **attrs), elem_type)

    return build


REFUSED = {
    "ScatterND reduction": (
        _one_node(
            "ScatterND",
            lambda case: [
                case.constant("i", _ints(0).reshape(1, 1)),
                case.constant("u", np.ones((1, *SHAPE[1:]), np.float32)),
            ],
            reduction="add",
        ),
        "ScatterND with a reduction",
    ),
    "Cast to bfloat16": (
        _one_node("Cast", lambda case: [], TensorProto.BFLOAT16, to=TensorProto.BFLOAT16),
        "Cast to bfloat16",
    ),
    "MaxPool SAME_UPPER": (
        _one_node("MaxPool", lambda case: [], kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
        "MaxPool with auto_pad SAME_UPPER",
    ),
    "AveragePool asymmetric pads": (
        _one_node("AveragePool", lambda case: [], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        "AveragePool with asymmetric pads",
    ),
}


@pytest.mark.parametrize("build, reason", REFUSED.values(), ids=REFUSED.keys())
def test_what_the_module_cannot_run_is_refused_when_it_loads(build, reason):
    """Refused by name at load time, not at the first forward: a training script learns
    before it has built an optimiser or read a batch."""
    converted, _ = conv2attn.convert(build(), attention="local")
    with pytest.raises(InputError, match=f"node 'out': {reason}"):
        load_trainable(converted)
