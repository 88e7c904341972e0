"""conv2attn.torch: trainable attention equal to the Conv at initialisation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conv2attn.core.geometry import Attention, ConvSpec, best_plan, candidate_plans, resolve_pads
from conv2attn.graph.options import parse_patch
from conv2attn.graph.rewrite import convert
from tests.helpers import assert_parity, run
from tests.test_convert import ATTENTION_MODES, ATTRIBUTE_TABLE

torch = pytest.importorskip("torch")
from conv2attn.trainable import ConvAttention, convert_module, plan_for  # noqa: E402

nn = torch.nn
functional = torch.nn.functional


def per_axis(text: str) -> tuple[int, int] | None:
    if text == "auto":
        return None
    sizes = parse_patch(text)
    return tuple(sizes * 2 if len(sizes) == 1 else sizes)


def reference_conv(x, conv: nn.Conv2d, spec: ConvSpec):
    """The Conv in torch, with ONNX's asymmetric pads applied first."""
    pads = []
    for begin, end in zip(reversed(spec.pads_begin), reversed(spec.pads_end)):
        pads += [begin, end]
    return functional.conv2d(
        functional.pad(x, pads), conv.weight, conv.bias, spec.strides, 0, spec.dilations, spec.group
    )


def assert_equal_outputs(expected, actual):
    assert actual.shape == expected.shape
    # The converter's float32 bound; the softmax leaks exp(-24) ~ 4e-11 to a neighbour.
    assert_parity([expected.detach().numpy()], [actual.detach().numpy()])


@pytest.mark.parametrize("mode", ATTENTION_MODES.values(), ids=ATTENTION_MODES.keys())
@pytest.mark.parametrize("config", ATTRIBUTE_TABLE.values(), ids=ATTRIBUTE_TABLE.keys())
def test_equals_the_conv_at_initialisation_for_every_attribute(config, mode):
    """The ONNX path's attribute table (asymmetric pads and SAME included, which
    nn.Conv2d cannot express: the plan is built from the ONNX attributes)."""
    kernel, strides, dilations, pads, auto_pad, group, (cin, cout), size, bias, patch = config
    strides, dilations = tuple(strides or (1, 1)), tuple(dilations or (1, 1))
    begin, end = resolve_pads(auto_pad or "NOTSET", size, kernel, strides, dilations, pads)
    spec = ConvSpec(cin, cout, group, tuple(kernel), strides, dilations, begin, end, tuple(size))
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, strides, 0, dilations, group, bias=bias)
    patches = None if patch == "auto" else [per_axis(patch)]
    block = per_axis(mode.get("block", "auto"))
    plan = best_plan(candidate_plans(spec, Attention(mode["attention"]), patches, block))
    layer = ConvAttention.from_conv(conv, size, plan=plan)
    x = torch.randn(3, cin, *size)
    assert_equal_outputs(reference_conv(x, conv, spec), layer(x))


@pytest.mark.parametrize(
    "options",
    [
        {"padding": "same", "dilation": 2},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": (2, 1), "padding_mode": "replicate", "stride": 2},
        {"padding": 1, "padding_mode": "circular", "groups": 2},
        {"padding": "valid", "bias": False},
    ],
    ids=["same-dilated", "reflect", "replicate-strided", "circular-grouped", "valid-no-bias"],
)
@pytest.mark.parametrize("attention", ["global", "local"])
def test_from_conv_handles_torch_padding_options(options, attention):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, **options)
    layer = ConvAttention.from_conv(conv, (9, 10), attention=attention)
    x = torch.randn(2, 4, 9, 10)
    assert_equal_outputs(conv(x), layer(x))


def test_patch_choice_is_the_onnx_converters(tmp_path):
    """Same cost model: the torch layer's plan is the one `conv2attn convert` picks."""
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    plan = plan_for(conv, (14, 14))
    model = _export(nn.Sequential(conv), torch.randn(1, 8, 14, 14), tmp_path / "conv.onnx")
    _, report = convert(model)
    assert plan.patch == report.layers[0].patch
    assert plan.heads == report.layers[0].heads and plan.order.value == report.layers[0].order


def test_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match=r"nn\.Conv2d"):
        ConvAttention.from_conv(nn.Conv1d(2, 2, 3), (8,))
    layer = ConvAttention.from_conv(nn.Conv2d(2, 2, 3), (8, 8))
    with pytest.raises(ValueError, match=r"input size \[2, 8\]: .*larger than the padded"):
        layer(torch.randn(1, 2, 2, 8))  # too small for the Conv itself
    with pytest.raises(ValueError, match="larger than the padded input"):
        ConvAttention.from_conv(nn.Conv2d(2, 2, 5), (3, 3))


@pytest.mark.parametrize("attention", ["global", "local"])
def test_one_layer_runs_at_every_size(attention):
    """Built at 8x8, the layer equals the Conv at other sizes too (the weights do not
    depend on the size), and a trained position bias still applies there."""
    torch.manual_seed(0)
    for conv in (
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
        nn.Conv2d(4, 4, 5, padding=2, groups=4, padding_mode="reflect"),
    ):
        layer = ConvAttention.from_conv(conv, (8, 8), attention=attention)
        for size in ((8, 8), (4, 4), (13, 9), (16, 24), (3, 17)):
            x = torch.randn(2, conv.in_channels, *size)
            with torch.no_grad():
                expected = conv(x)
                torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            layer.position_bias.mul_(-1)  # every head now prefers any key but its own
            x = torch.randn(1, conv.in_channels, 13, 9)
            assert (layer(x) - conv(x)).abs().max() > 1e-3


class SmallCnn(nn.Module):
    """Conv-BN-ReLU stages with a strided Conv, a depthwise Conv and a 1x1 Conv."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.Conv2d(16, 12, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCnn().eval()
    with torch.no_grad():
        model.features[1].running_mean.normal_(0, 0.1)
        model.features[1].running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("attention", ["global", "local"])
def test_convert_module_replaces_every_conv_and_keeps_the_output(attention):
    model = small_cnn()
    x = torch.randn(4, 1, 8, 8)
    converted = convert_module(model, x, attention=attention)
    assert not any(isinstance(m, nn.Conv2d) for m in converted.modules())
    assert sum(isinstance(m, ConvAttention) for m in converted.modules()) == 4
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())  # the original is unchanged
    with torch.no_grad():
        assert_equal_outputs(model(x), converted(x))


def test_convert_module_include_and_exclude_by_module_name():
    model = small_cnn()
    x = torch.randn(1, 1, 8, 8)
    converted = convert_module(model, x, include=["features.*"], exclude=["features.6"])
    kinds = {name: type(m).__name__ for name, m in converted.features.named_children()}
    assert kinds["0"] == kinds["3"] == kinds["5"] == "ConvAttention"
    assert kinds["6"] == "Conv2d"
    with pytest.raises(ValueError, match=r"no selected nn\.Conv2d"):
        convert_module(model, x, include=["head"])


def _attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{name}.{index}": parameter
        for name, module in model.named_modules()
        if isinstance(module, ConvAttention)
        for index, parameter in enumerate(module.attention_parameters())
    }


def test_a_step_on_the_attention_parameters_alone_moves_the_output():
    """At initialisation the gates are 0: the output is the CNN's and W_Q/W_K cannot
    change it (their gradient is exactly 0, as for any parameter the output does not yet
    depend on). The gates' gradient is the layer's own signal; one Adam step on the
    attention parameters alone opens them and changes the output, and from then on W_Q
    and W_K receive gradients."""
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(8, 1, 8, 8)
    converted = convert_module(model, x)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    attention = _attention_parameters(converted)
    optimizer = torch.optim.Adam(attention.values(), lr=1e-2)
    labels = torch.arange(8) % 4
    functional.cross_entropy(converted(x), labels).backward()
    layers = [m for m in converted.modules() if isinstance(m, ConvAttention)]
    for layer in layers:
        # measured per layer: largest gate gradient 1.4e-3 .. 2.6e-3, 0.14 .. 0.86 of
        # W_O's largest (the trained value path); the previous design gave W_Q 1e-13
        gate, projection = layer.gate.grad.abs().max(), layer.w_o.grad.abs().max()
        assert gate > 0.05 * projection and gate > 1e-4
        assert layer.w_q.grad.abs().max() == 0
    with torch.no_grad():
        before = converted(x).clone()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():  # far beyond float32 rounding of outputs of about 0.3 (2e-8)
        assert (converted(x) - before).abs().max() > 1e-4
    functional.cross_entropy(converted(x), labels).backward()
    for layer in layers:
        assert layer.w_q.grad.abs().max() > 0 and layer.w_k.grad.abs().max() > 0


def test_attention_parameters_are_what_shapes_the_attention():
    layer = ConvAttention.from_conv(nn.Conv2d(3, 4, 3, padding=1), (6, 6), patch=2)
    named = {id(p): name for name, p in layer.named_parameters()}
    assert [named[id(p)] for p in layer.attention_parameters()] == [
        "w_q", "w_k", "gate", "position_bias",
    ]  # fmt: skip
    assert layer.gate.shape == (layer.plan.heads,) and not layer.gate.any()
    assert layer.w_q.abs().max() > 0  # random, as in any attention layer
    assert layer.position_bias.max() == 0  # each head's own offset
    assert layer.position_bias.shape[0] == layer.plan.heads == 4


def test_attention_statistics_start_at_the_convolution():
    torch.manual_seed(0)
    layer = ConvAttention.from_conv(nn.Conv2d(3, 4, 3, padding=1), (6, 6), patch=2)
    stats = layer.attention_statistics(torch.randn(2, 3, 6, 6))
    assert stats["gates"] == [0.0] * 4
    assert max(stats["off_convolution"]) < 1e-9  # exp(-24) leaks at most
    maps = stats["maps"]
    assert maps.shape[0] == 4 and np.allclose(maps.sum(axis=(1, 2)), 1.0)
    for head, offset in enumerate(stats["offsets"]):  # all mass at the head's own offset
        position = tuple(o - low for o, low in zip(offset, stats["lows"]))
        assert maps[head][position] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        layer.gate.fill_(1.0)
    assert min(layer.attention_statistics(torch.randn(2, 3, 6, 6))["off_convolution"]) > 0.1


def test_state_dict_round_trip():
    model = small_cnn()
    x = torch.randn(2, 1, 8, 8)
    trained = convert_module(model, x, attention="local")
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-2)
    fresh = convert_module(model, x, attention="local")
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
        assert not torch.equal(fresh(x), model(x))


def _export(module: nn.Module, example, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
        )
    import onnx

    return onnx.load(str(path))


@pytest.mark.parametrize("attention", ["global", "local"])
def test_torch_export_onnx_converter_and_original_agree(tmp_path, attention):
    """Three ways to the same numbers: the CNN, its ONNX conversion, and the converted
    torch module exported with torch.onnx.export, all run by onnxruntime."""
    model = small_cnn()
    x = torch.randn(3, 1, 8, 8)
    cnn = _export(model, x, tmp_path / "cnn.onnx")
    converted_onnx, _ = convert(cnn, attention=attention)
    module = convert_module(model, x, attention=attention)
    exported = _export(module, x, tmp_path / "module.onnx")
    assert not [n for n in exported.graph.node if n.op_type == "Conv"]

    feeds = {"x": x.numpy()}
    original = run(cnn, feeds)
    assert np.abs(original[0]).max() > 0.1
    with torch.no_grad():
        assert_parity([model(x).numpy()], original)
    assert_parity(original, run(converted_onnx, feeds))
    assert_parity(original, run(exported, feeds))
    assert_parity(run(converted_onnx, feeds), run(exported, feeds))


@pytest.mark.slow
def test_converted_torchvision_resnet18_equals_the_original():
    from tools.torchvision_models import build

    model = build("resnet18", seed=0)
    x = torch.randn(2, 3, 224, 224)
    converted = convert_module(model, x, attention="local")
    assert sum(isinstance(m, ConvAttention) for m in converted.modules()) == 20
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 1
        assert_equal_outputs(expected, converted(x))
