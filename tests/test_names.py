"""The emitted names are a contract: every stage that finds nodes by name still finds them.

Which nodes replace a Conv is worked out here from the graph's structure alone (the nodes
between the original model's tensors that compute the Conv's output), independently of
any name. Then each reader is held to it: TensorRT's float32 pinning selects exactly the
logits and Softmax nodes, the HTML report reads each layer's Softmax, and both per-layer
profiles attribute every node of a replacement to its Conv and to no other.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import pytest

import conv2attn
from conv2attn import names
from conv2attn.record import converted_layers
from conv2attn.runtime.ort import OrtRunner
from conv2attn.runtime.tensorrt import _set_precision, layer_owner, layer_prefixes
from conv2attn.visual_report import attention_picture
from tests.helpers import chain_model, conv_model, random_input, save_model_file

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def _models():
    """Converted models covering every emitted form: global and local attention, both
    operation orders, grouped and depthwise Convs, float16 (Softmax cast back), and the
    standard Attention operator."""
    digits = onnx.load(str(DIGITS))
    cases = {
        "digits-global": (digits, {"attention": "global"}),
        "digits-local": (digits, {"attention": "local"}),
        "chain-project-first": (chain_model(), {"patch": 1}),
        "depthwise-local": (conv_model(4, 8, group=4, size=(12, 12)), {"attention": "local"}),
        "grouped-global": (conv_model(4, 6, group=2), {"attention": "global"}),
        "float16-local": (conv_model(dtype=np.float16), {"attention": "local"}),
        "operator-digits-local": (digits, {"attention": "local", "form": "attention"}),
        "operator-project-first": (chain_model(), {"patch": 1, "form": "attention"}),
        "operator-depthwise-global": (
            conv_model(4, 8, group=4, size=(12, 12)),
            {"attention": "global", "form": "attention"},
        ),
        "operator-float16-global": (
            conv_model(dtype=np.float16),
            {"attention": "global", "form": "attention"},
        ),
    }
    for case, (model, options) in cases.items():
        # NCHW between layers: each replacement then reads and writes the original model's
        # tensors, which is how ``replacement_nodes`` finds it without using names
        converted, _ = conv2attn.convert(model, **options, layout="nchw")
        yield pytest.param(model, converted, id=case)


MODELS = list(_models())


def replacement_nodes(original: onnx.ModelProto, converted: onnx.ModelProto) -> dict[str, set]:
    """Per converted Conv (by the record's output tensor), the names of the nodes that
    compute it from tensors the original model already had, found by walking producers."""
    known = {t.name for t in original.graph.initializer}
    known |= {v.name for v in original.graph.input}
    known |= {out for node in original.graph.node for out in node.output}
    producers = {out: node for node in converted.graph.node for out in node.output}
    owned = {}
    for layer in converted_layers(converted):
        found, stack = set(), [producers[layer["output"]]]
        while stack:
            node = stack.pop()
            if node.name in found:
                continue
            found.add(node.name)
            stack += [
                producers[name] for name in node.input if name in producers and name not in known
            ]
        owned[layer["name"]] = found
    return owned


def softmax_and_logits(converted: onnx.ModelProto) -> set[str]:
    """Every Softmax, the nodes computing its input (constants only: the quadratic
    logits), and the reshapes, transposes and cast between it and its MatMul."""
    producers = {out: node for node in converted.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in converted.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    selected = set()
    for attention in (n for n in converted.graph.node if n.op_type == "Attention"):
        # the standard form: the mask's logits, up to its cast to the model's type
        mask = producers[attention.input[3]]
        stack = [producers[i] for i in mask.input] if mask.op_type == "Cast" else [mask]
        while stack:
            node = stack.pop()
            selected.add(node.name)
            stack += [producers[i] for i in node.input if i in producers]
    for softmax in (n for n in converted.graph.node if n.op_type == "Softmax"):
        stack = [softmax]
        while stack:
            node = stack.pop()
            selected.add(node.name)
            stack += [producers[i] for i in node.input if i in producers]
        node = softmax
        while True:
            following = consumers[node.output[0]]
            if len(following) > 1:  # each head's rows taken apart (narrowed values)
                assert {n.op_type for n in following} == {"Gather"}
                break
            (following,) = following
            # the product, or the fold's (a single key's attention times W_O: a Mul)
            if following.op_type in ("MatMul", "Gemm") or following.name.endswith("/fold/Mul"):
                break
            selected.add(following.name)
            node = following
    return selected


@pytest.mark.parametrize(("original", "converted"), MODELS)
def test_tensorrt_float32_pinning_selects_exactly_the_logits_and_softmax(original, converted):
    expected = softmax_and_logits(converted)
    assert expected, "the converted model has no Softmax"

    class Layer:
        def __init__(self, name):
            self.name, self.precision, self.num_outputs = name, None, 1
            self.output_type = None

        def get_output(self, index):
            return types.SimpleNamespace(dtype="float16")

        def set_output_type(self, index, dtype):
            self.output_type = dtype

    layers = [Layer(node.name) for node in converted.graph.node]
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    config = types.SimpleNamespace(set_flag=lambda flag: None, clear_flag=lambda flag: None)
    trt = types.SimpleNamespace(
        BuilderFlag=types.SimpleNamespace(
            TF32="TF32", FP16="FP16", BF16="BF16", PREFER_PRECISION_CONSTRAINTS="PREFER"
        ),
        float32="float32",
        float16="float16",
        bfloat16="bfloat16",
    )
    _set_precision(trt, network, config, "fp16")
    pinned = {layer.name for layer in layers if layer.precision == "float32"}
    assert pinned == expected
    assert all(layer.output_type == "float32" for layer in layers if layer.name in pinned)


@pytest.mark.parametrize(("original", "converted"), MODELS)
def test_every_replacement_node_carries_its_conv_name(original, converted):
    for conv, nodes in replacement_nodes(original, converted).items():
        assert nodes and all(n.startswith(names.owner_prefix(conv)) for n in nodes), conv


@pytest.mark.parametrize(("original", "converted"), MODELS)
def test_the_graph_pass_finds_the_conv_of_every_replacement_node(original, converted):
    prefixes = {
        names.owner_prefix(layer["name"]): layer["name"] for layer in converted_layers(converted)
    }
    owned = replacement_nodes(original, converted)
    for conv, nodes in owned.items():
        assert {names.owner(node, prefixes) for node in nodes} == {conv}
    others = {n.name for n in converted.graph.node} - set().union(*owned.values())
    assert all(names.owner(node, prefixes) is None for node in others)


def test_a_conv_named_like_a_replacement_owns_only_its_own_nodes():
    """A Conv whose name holds ``/attn/`` (a model converted twice, say): each node goes
    to the Conv with the longest prefix it starts with."""
    prefixes = {names.owner_prefix(c): c for c in ("a", "a/attn/b")}
    assert names.owner("a/attn/proj/MatMul", prefixes) == "a"
    assert names.owner("a/attn/b/attn/proj/MatMul", prefixes) == "a/attn/b"
    assert names.owner("a/attn/c/attn/proj/MatMul", prefixes) == "a"
    assert names.owner("c/attn/proj/MatMul", prefixes) is None
    assert names.owner("a/proj/MatMul", prefixes) is None


@pytest.mark.parametrize(("original", "converted"), MODELS)
def test_tensorrt_layer_attribution_finds_every_node_of_each_conv(original, converted):
    record = converted_layers(converted)
    prefixes = layer_prefixes(record)
    owned = replacement_nodes(original, converted)
    for conv, nodes in owned.items():
        assert {layer_owner(node, prefixes) for node in nodes} == {conv}
    others = {n.name for n in converted.graph.node} - set().union(*owned.values())
    assert all(layer_owner(node, prefixes) is None for node in others)


@pytest.mark.parametrize(("original", "converted"), MODELS)
def test_report_reads_every_layers_softmax(original, converted):
    feeds = random_input(original, batch=1)
    for layer in converted_layers(converted):
        picture = attention_picture(original, converted, layer, feeds)
        assert picture.heads == layer["heads"]
        assert np.allclose(picture.maps.reshape(picture.heads, -1).sum(axis=1), 1.0)


def test_onnxruntime_profile_attributes_time_to_every_converted_conv(tmp_path):
    original = chain_model()
    converted, _ = conv2attn.convert(original, attention="local")
    path = save_model_file(converted, tmp_path / "chain_attn.onnx")
    feed = random_input(original, batch=1)
    runner = OrtRunner(path, feed, threads=1)
    times = runner.layer_times(3, converted_layers(converted), None)
    recorded = {layer["name"] for layer in converted_layers(converted)}
    assert recorded <= {t.name for t in times}
    assert all(t.ms > 0 for t in times if t.name in recorded)
