"""Convs inside control-flow bodies (If, Loop, Scan) convert, with outer-scope names resolved."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conv2attn.graph.rewrite import convert
from conv2attn.inputs import Samples
from conv2attn.validate import check
from tests.helpers import assert_parity, run

FLOAT = TensorProto.FLOAT
rng = np.random.default_rng(7)


def weight(name: str, shape: list[int]) -> TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def if_model() -> onnx.ModelProto:
    """then: Conv(x, outer w, outer b) -> Relu; else: strided Conv with a branch-local
    weight, then a nested If whose branches hold one more Conv each."""
    then_branch = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["t"], name="then_conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["t"], ["then_y"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_y", FLOAT, [1, 4, 8, 8])],
    )
    inner = {
        branch: helper.make_graph(
            [
                helper.make_node(
                    "Conv", ["e", f"w_{branch}"], [f"{branch}_y"], name=f"{branch}_conv"
                )
            ],
            branch,
            [],
            [helper.make_tensor_value_info(f"{branch}_y", FLOAT, [1, 4, 8, 8])],
            [weight(f"w_{branch}", [4, 4, 1, 1])],
        )
        for branch in ("inner_then", "inner_else")
    }
    else_branch = helper.make_graph(
        [
            helper.make_node(
                "Conv",
                ["x", "w_else"],
                ["e"],
                name="else_conv",
                pads=[1, 1, 1, 1],
                dilations=[1, 1],
            ),
            helper.make_node(
                "If",
                ["c"],
                ["else_y"],
                name="inner_if",
                then_branch=inner["inner_then"],
                else_branch=inner["inner_else"],
            ),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("else_y", FLOAT, [1, 4, 8, 8])],
        [weight("w_else", [4, 3, 3, 3])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Not", ["c"], ["not_c"]),
            helper.make_node(
                "If", ["not_c"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch
            ),
        ],
        "if_model",
        [
            helper.make_tensor_value_info("x", FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4, 8, 8])],
        [weight("w", [4, 3, 3, 3]), weight("b", [4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def loop_model() -> onnx.ModelProto:
    """The body applies an outer-scope Conv (3x3, pads 1) to the carried state, trip_count
    times, and also emits each step's state as a scan output."""
    body = helper.make_graph(
        [
            helper.make_node("Conv", ["state", "w", "b"], ["conv"], name="body_conv", pads=[1] * 4),
            helper.make_node("Tanh", ["conv"], ["next"]),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
            helper.make_node("Identity", ["next"], ["step"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state", FLOAT, [2, 4, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("next", FLOAT, [2, 4, 6, 6]),
            helper.make_tensor_value_info("step", FLOAT, [2, 4, 6, 6]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y", "steps"], name="loop", body=body)],
        "loop_model",
        [helper.make_tensor_value_info("x", FLOAT, [2, 4, 6, 6])],
        [
            helper.make_tensor_value_info("y", FLOAT, [2, 4, 6, 6]),
            helper.make_tensor_value_info("steps", FLOAT, [3, 2, 4, 6, 6]),
        ],
        [
            weight("w", [4, 4, 3, 3]),
            weight("b", [4]),
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def scan_model() -> onnx.ModelProto:
    """Scan over a sequence of frames [T, 1, 2, 7, 7]: each frame goes through a strided
    Conv whose weight is outer-scope, and a running sum is carried."""
    body = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["frame", "w"], ["feat"], name="frame_conv", strides=[2, 2], pads=[1] * 4
            ),
            helper.make_node("Add", ["total", "feat"], ["total_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("total", FLOAT, [1, 3, 4, 4]),
            helper.make_tensor_value_info("frame", FLOAT, [1, 2, 7, 7]),
        ],
        [
            helper.make_tensor_value_info("total_out", FLOAT, [1, 3, 4, 4]),
            helper.make_tensor_value_info("feat", FLOAT, [1, 3, 4, 4]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Scan", ["zero", "frames"], ["total", "feats"], num_scan_inputs=1, body=body
            )
        ],
        "scan_model",
        [helper.make_tensor_value_info("frames", FLOAT, [5, 1, 2, 7, 7])],
        [
            helper.make_tensor_value_info("total", FLOAT, [1, 3, 4, 4]),
            helper.make_tensor_value_info("feats", FLOAT, [5, 1, 3, 4, 4]),
        ],
        [
            weight("w", [3, 2, 3, 3]),
            numpy_helper.from_array(np.zeros((1, 3, 4, 4), np.float32), "zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


def records(model: onnx.ModelProto) -> dict[str, dict]:
    record = next(p for p in model.metadata_props if p.key == "conv2attn")
    return {layer["name"]: layer for layer in json.loads(record.value)["layers"]}


def conv_ops(graph: onnx.GraphProto) -> int:
    """Conv nodes in ``graph`` and every body inside it."""
    count = 0
    for node in graph.node:
        count += node.op_type == "Conv"
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                count += conv_ops(attribute.g)
    return count


@pytest.mark.parametrize("attention", ["global", "local"])
def test_convs_in_nested_if_branches_convert_with_parity(attention):
    model = if_model()
    converted, report = convert(model, attention=attention)
    assert conv_ops(converted.graph) == 0
    assert {layer.name: layer.graph for layer in report.layers} == {
        "then_conv": "if/then_branch",
        "else_conv": "if/else_branch",
        "inner_then_conv": "if/else_branch/inner_if/then_branch",
        "inner_else_conv": "if/else_branch/inner_if/else_branch",
    }
    assert records(converted)["inner_then_conv"]["graph"] == "if/else_branch/inner_if/then_branch"
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    for condition in (True, False):  # every branch runs for one of the two
        feeds = {"x": x, "c": np.array(condition)}
        assert_parity(run(model, feeds), run(converted, feeds))


def test_conv_in_loop_body_converts_with_parity():
    model = loop_model()
    converted, report = convert(model, attention="local")
    assert [(layer.name, layer.graph) for layer in report.layers] == [("body_conv", "loop/body")]
    assert conv_ops(converted.graph) == 0
    feeds = {"x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    assert_parity(run(model, feeds), run(converted, feeds))


def test_conv_in_scan_body_converts_with_parity():
    model = scan_model()
    converted, report = convert(model)
    assert [layer.graph for layer in report.layers] == ["Scan/body"]
    assert report.layers[0].output_size == (4, 4)
    feeds = {"frames": rng.standard_normal((5, 1, 2, 7, 7)).astype(np.float32)}
    assert_parity(run(model, feeds), run(converted, feeds))


def test_per_layer_check_notes_layers_inside_bodies():
    model = if_model()
    converted, _ = convert(model)
    samples = Samples(
        {"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32), "c": np.array(False)},
        None,
        "test",
    )
    result = check(model, converted, samples, per_layer=True)
    assert result.passed
    assert result.layers is None  # no Conv of the main graph to compare layer by layer
    assert any("4 converted Conv(s) inside control-flow bodies" in note for note in result.notes)


def test_include_selects_a_conv_inside_a_body():
    converted, report = convert(if_model(), include=["inner_*"])
    assert sorted(layer.name for layer in report.layers) == ["inner_else_conv", "inner_then_conv"]
    assert conv_ops(converted.graph) == 2
