"""``--attention auto``: each Conv takes global or local attention, whichever the cost
model prices lower, and the mixed model keeps parity (``helpers.assert_parity``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import conv2attn
from conv2attn.cli import main
from conv2attn.errors import InputError
from conv2attn.record import converted_layers
from conv2attn.trainable import ConvAttention, convert_module
from tests.helpers import assert_parity, random_input, run

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def test_each_conv_takes_the_cheaper_mode():
    model = onnx.load(str(DIGITS))
    options = {"patch": "1x2", "check": False}  # a forced patch: no budget trade-offs
    _, auto = conv2attn.convert(model, attention="auto", **options)
    _, uniform_global = conv2attn.convert(model, attention="global", **options)
    _, uniform_local = conv2attn.convert(model, attention="local", **options)
    assert auto.attention == "auto"
    for chosen, g, local in zip(auto.layers, uniform_global.layers, uniform_local.layers):
        assert chosen.cost == min(g.cost, local.cost)
        if g.cost != local.cost:
            assert chosen.attention == ("global" if g.cost < local.cost else "local")


def _convnext_block() -> onnx.ModelProto:
    """convnext_tiny's first stage in miniature: a 7x7 depthwise Conv (96 channels, 56x56),
    which global attention over large patches serves best, then a dense 3x3 Conv."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((96, 1, 7, 7)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((96, 96, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], "depthwise", group=96, pads=[3] * 4),
        helper.make_node("Conv", ["h", "w2"], ["y"], "dense", pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 96, 56, 56])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 96, 56, 56])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_mixed_model_keeps_parity_and_records_each_layers_mode():
    model = _convnext_block()
    # no parameter budget: in convnext_tiny the depthwise Convs' share of it is small, in
    # this miniature it is not
    converted, report = conv2attn.convert(model, attention="auto", max_param_growth=1e9)
    assert [layer.attention for layer in report.layers] == ["global", "local"]
    assert [entry["block"] is not None for entry in converted_layers(converted)] == [
        layer.attention == "local" for layer in report.layers
    ]
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))


def test_block_applies_to_the_local_plans_of_auto(tmp_path):
    out = tmp_path / "auto.onnx"
    args = ["convert", str(DIGITS), "-o", str(out), "--attention", "auto", "--block", "2", "-q"]
    assert main(args) == 0
    blocks = {tuple(e["block"]) for e in converted_layers(onnx.load(out)) if e["block"]}
    assert blocks <= {(2, 2), (1, 2), (2, 1), (1, 1)}  # 2x2, clamped to small grids
    with pytest.raises(InputError, match="expected global, local or auto"):
        conv2attn.convert(onnx.load(str(DIGITS)), attention="nearby")


def test_pytorch_layers_take_auto_too():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8)
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    converted = convert_module(cnn, x, attention="auto")
    assert all(isinstance(converted[i], ConvAttention) for i in (0, 2))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), cnn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("channels", "size", "kernel", "stride", "mode"),
    [
        # each depthwise layer timed in both forms between two converted pointwise Convs
        # (onnxruntime CPU, 2 threads, best blocks, global against local ms); local
        # attention folds its heads into W_O (``AttentionPlan.folds_heads``). Alone, one
        # layer measured is priced the other way: 192 channels 7x7 at 28x28 (convnext_tiny's
        # second stage, 3.3 ms global against 2.2 local) takes global attention; in the
        # whole model its stretch takes local attention (the test below).
        (96, 56, 7, 1, "global"),  # convnext_tiny's first stage: 3.7 against 4.2
        (384, 14, 7, 1, "local"),  # convnext_tiny's third stage: 2.0 against 1.3
        (768, 7, 7, 1, "local"),  # convnext_tiny's last stage: 1.4 against 1.0
        (240, 28, 5, 1, "local"),  # efficientnet_b0's features.3: 2.9 against 2.2
        (672, 14, 5, 1, "local"),  # efficientnet_b0's features.5: 3.5 against 2.8
    ],
)
def test_auto_takes_the_mode_measured_faster_for_depthwise_convs(
    channels, size, kernel, stride, mode
):
    from conv2attn.core.geometry import ConvSpec
    from conv2attn.core.planning import plan_layers

    pad = kernel // 2
    spec = ConvSpec(
        channels, channels, channels, (kernel,) * 2, (stride,) * 2, (1, 1), (pad,) * 2,
        (pad,) * 2, (size, size),
    )  # fmt: skip
    # no parameter budget: in a whole model the depthwise Convs' share of it is small
    (plan,) = plan_layers([spec], ["dw"], attention="auto", max_param_growth=1e9).plans
    assert plan.attention.value == mode
    if mode == "local":  # on pixel tokens: folded on 1x2 patches it measured slower
        assert plan.folds_heads and plan.patch == (1, 1)


@pytest.mark.slow
def test_auto_takes_the_measured_faster_plans_in_whole_models(torchvision_model):
    """Choices that depend on how the cost model weighs moved elements against
    multiply-adds (``geometry.TRAFFIC_COST``), each timed in the whole model."""
    convnext = conv2attn.convert(torchvision_model("convnext_tiny"), attention="auto")[1]
    modes = {layer.name: layer.attention for layer in convnext.layers}
    # the 192-channel 7x7 depthwise Convs at 28x28 between channels-last neighbours:
    # 2.2 ms local against 3.3 ms global; at 56x56 global stays the faster (3.7 against 4.2)
    second = [mode for name, mode in modes.items() if "features.3." in name and "block" in name]
    first = [mode for name, mode in modes.items() if "features.1." in name and "block" in name]
    assert second == ["local"] * 3 and first == ["global"] * 3
    # a 3x3 three-channel stem on pixel tokens (strided queries): stem kernel time 1.42
    # against 1.99 ms on 1x3 patches in mobilenet_v2
    mobile = conv2attn.convert(torchvision_model("mobilenet_v2"), attention="auto")[1]
    assert mobile.layers[0].strided_queries
