"""``--form attention``: each Conv as the standard ONNX Attention operator, exactly.

Same tolerances as every other form (``helpers.assert_parity``: 1e-5 of the largest
reference value plus 1e-6): q . k is exactly 0, so the operator's softmax is the one-hot
softmax of the relative-position mask and the arithmetic is the default form's.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings

import conv2attn
from conv2attn.cli import main
from conv2attn.errors import InputError
from conv2attn.record import converted_layers
from tests.helpers import assert_parity, chain_model, conv_model, random_input, run
from tests.test_dynamic import check_dynamic, dynamic, dynamic_configs
from tests.test_property import check, conv_configs

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "150"))


def attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "Attention"]


@settings(
    max_examples=max(EXAMPLES // 2, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(conv_configs())
def test_random_2d_convs_as_the_attention_operator(config):
    check(config, form="attention")


@settings(
    max_examples=max(EXAMPLES // 6, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(conv_configs(ranks=(1, 3)))
def test_random_1d_and_3d_convs_as_the_attention_operator(config):
    check(config, form="attention")


@settings(
    max_examples=max(EXAMPLES // 3, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(dynamic_configs())
def test_random_dynamic_convs_as_the_attention_operator(case):
    config, sizes = case
    assume(all(min(s) >= 1 for s in sizes))
    check_dynamic(config, sizes, form="attention")


@pytest.mark.parametrize("attention", ["global", "local"])
@pytest.mark.parametrize("patch", ["auto", 1])  # patch 1: project-first layers too
def test_operator_holds_real_query_and_key_projections(attention, patch):
    model = chain_model()
    converted, report = conv2attn.convert(model, attention=attention, patch=patch, form="attention")
    nodes = attention_nodes(converted)
    assert len(nodes) == len(report.layers) == 3
    assert {o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")} == {23}
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in converted.graph.initializer}
    for layer in report.layers:
        scope = f"{layer.name}/attn"
        w_q, w_k = initializers[f"{scope}/W_Q"], initializers[f"{scope}/W_K"]
        assert w_q.shape[1] == layer.heads * 16 and not w_q.any() and not w_k.any()
        node = next(n for n in nodes if n.name == f"{scope}/Attention")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["q_num_heads"] == layer.heads
        assert attrs["kv_num_heads"] == (1 if layer.order == "attend-first" else layer.heads)
    assert {entry["form"] for entry in converted_layers(converted)} == {"attention"}
    # the report counts what the operator adds: W_Q, W_K and q . k for every pair
    _, default = conv2attn.convert(model, attention=attention, patch=patch)
    for standard, plain in zip(report.layers, default.layers):
        assert standard.macs_after > plain.macs_after and standard.form == "attention"
    assert report.to_dict()["options"]["form"] == "attention"
    feeds = random_input(model)
    assert_parity(run(model, feeds), run(converted, feeds))


@pytest.mark.parametrize("sizes", ["static", "dynamic"])
@pytest.mark.parametrize("attention", ["global", "local"])
def test_float16_model_as_the_attention_operator(attention, sizes):
    """The mask is clipped to -30000 before the cast to float16 (exp of it is 0)."""
    model = conv_model(dtype=np.float16, size=(12, 10))
    model = dynamic(model) if sizes == "dynamic" else model
    converted, _ = conv2attn.convert(model, attention=attention, form="attention")
    rng = np.random.default_rng(0)
    for size in [(12, 10), *([(7, 15)] if sizes == "dynamic" else [])]:
        feeds = {"x": rng.standard_normal((2, 4, *size)).astype(np.float16)}
        expected = run(model, feeds)[0].astype(np.float32)
        # float16 rounding of a 36-term sum: about 1e-3 of the largest value
        assert_parity([expected], [run(converted, feeds)[0].astype(np.float32)], rtol=2e-3)


def test_old_opsets_are_upgraded_and_the_original_is_untouched():
    model = chain_model(opset=11)
    before = model.SerializeToString()
    converted, _ = conv2attn.convert(model, form="attention")
    assert model.SerializeToString() == before
    feeds = random_input(model)
    assert_parity(run(model, feeds), run(converted, feeds))


def test_a_model_the_version_converter_cannot_upgrade_is_refused():
    model = chain_model(opset=11)
    # an operator the converter has no adapter for: refused, never written half-upgraded
    model.graph.node.insert(0, onnx.helper.make_node("Scatter", ["a", "b", "c"], ["d"]))
    with pytest.raises(InputError, match=r"--form attention needs opset 23.*--form matmul"):
        conv2attn.convert(model, form="attention")


@pytest.mark.parametrize("attention", ["global", "local"])
def test_torchvision_models_as_the_attention_operator(torchvision_model, attention):
    for name in ("resnet18", "mobilenet_v2"):  # mobilenet_v2: depthwise layers
        original = onnx.load(torchvision_model(name))
        converted, report = conv2attn.convert(original, attention=attention, form="attention")
        assert len(attention_nodes(converted)) == len(report.layers)
        feeds = random_input(original, batch=2)
        assert_parity(run(original, feeds), run(converted, feeds))


def test_dynamic_torchvision_model_as_the_attention_operator(tmp_path):
    model = dynamic(chain_model())
    converted, report = conv2attn.convert(model, attention="local", form="attention")
    assert all(layer.dynamic for layer in report.layers)
    rng = np.random.default_rng(0)
    for size in ((32, 48), (17, 9), (1, 1)):
        feeds = {"x": rng.standard_normal((2, 3, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


def test_form_option_on_the_command_line(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(chain_model(), source)
    out = tmp_path / "m_attn.onnx"
    assert main(["convert", str(source), "-o", str(out), "--form", "attention", "-q"]) == 0
    assert attention_nodes(onnx.load(out))
    assert main(["check", str(source), str(out), "--per-layer", "-q"]) == 0
    with pytest.raises(SystemExit) as refused:
        main(["convert", str(source), "-o", str(out), "--form", "fused", "--force"])
    assert refused.value.code == 2 and "--form" in capsys.readouterr().err


def test_the_upgrade_never_serializes_the_weights(monkeypatch):
    """onnx's version converter serializes its input (a 2 GB limit): it is given the
    model's skeleton, and the weights are put back afterwards."""
    from conv2attn.graph import rewrite
    from conv2attn.graph.shapes import SKELETON_MAX_BYTES

    upgrade = rewrite.version_converter.convert_version
    seen = []

    def checked(model, target):
        seen.append(max(len(t.raw_data) for t in model.graph.initializer))
        return upgrade(model, target)

    monkeypatch.setattr(rewrite.version_converter, "convert_version", checked)
    model = conv_model(in_channels=64, out_channels=64, size=(16, 16), opset=11)
    converted, _ = conv2attn.convert(model, form="attention")
    assert seen and seen[0] <= SKELETON_MAX_BYTES < 64 * 64 * 9 * 4
    feeds = random_input(model)
    assert_parity(run(model, feeds), run(converted, feeds))


def test_weights_come_back_when_the_converter_unmarks_the_stubs(monkeypatch):
    """onnx 1.18's version converter returns the skeleton's stubs as empty tensors, no
    longer marked external: the weights are put back by name all the same."""
    from conv2attn.graph import rewrite

    upgrade = rewrite.version_converter.convert_version

    def unmarking(model, target):
        upgraded = upgrade(model, target)
        for tensor in upgraded.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
        return upgraded

    monkeypatch.setattr(rewrite.version_converter, "convert_version", unmarking)
    model = conv_model(in_channels=64, out_channels=64, size=(16, 16), opset=11)
    converted, _ = conv2attn.convert(model, form="attention")
    feeds = random_input(model)
    assert_parity(run(model, feeds), run(converted, feeds))
