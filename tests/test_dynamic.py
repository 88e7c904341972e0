"""One converted model for every input size: runtime geometry.

A size the original leaves dynamic stays dynamic; the converted graph computes pads,
crops, the token grid, global attention's coordinates and local attention's windows from
``Shape`` at run time. Each test converts once and checks the one file at several sizes.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import helper

import conv2attn
from conv2attn.cli import main
from conv2attn.errors import InputError
from conv2attn.torch_graph import load_trainable
from tests.helpers import assert_parity, chain_model, conv_model, run, save_model_file
from tests.test_property import check_queries, conv_configs, reference

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "150"))


def dynamic(model: onnx.ModelProto, names=("H", "W")) -> onnx.ModelProto:
    """``model`` with the spatial sizes of its inputs and outputs left open."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in zip(range(2, len(dims)), names):
            dims[axis].Clear()
            dims[axis].dim_param = f"{value.name}_{name}"
    return model


def ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


SIZES = [(224, 224), (160, 192), (97, 131), (3, 5), (1, 1)]


@pytest.mark.parametrize("attention", ["global", "local"])
@pytest.mark.parametrize("patch", ["auto", 4])
def test_one_converted_file_runs_at_every_size(attention, patch):
    model = dynamic(chain_model())
    converted, report = conv2attn.convert(model, attention=attention, patch=patch)
    assert all(layer.dynamic for layer in report.layers)
    assert {"Shape", "Conv"} & ops(converted) == {"Shape"}  # the geometry, at run time
    rng = np.random.default_rng(0)
    for size in SIZES:  # 3x5 and 1x1 are smaller than the patch (4) and a block
        feeds = {"x": rng.standard_normal((2, 3, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


def test_a_static_model_stays_static():
    converted, report = conv2attn.convert(chain_model())
    assert not any(layer.dynamic for layer in report.layers)
    assert not {"Shape", "Range", "Where"} & ops(converted)


@pytest.mark.parametrize("attention", ["global", "local"])
def test_a_1d_audio_model_takes_any_length(attention):
    model = dynamic(
        conv_model(in_channels=1, out_channels=4, kernel=(5,), strides=[2], pads=[2, 2],
                   size=(16000,)),
        names=("L",),
    )  # fmt: skip
    converted, _ = conv2attn.convert(model, attention=attention)
    rng = np.random.default_rng(1)
    for length in (16000, 9999, 7, 1):
        feeds = {"x": rng.standard_normal((1, 1, length)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


def test_nominal_shape_is_what_the_plan_is_for(tmp_path):
    model = dynamic(chain_model())
    _, default = conv2attn.convert(model)
    _, nominal = conv2attn.convert(model, nominal_shapes=["x:1x3x32x48"])
    assert default.layers[0].input_size == (224, 224)
    assert nominal.layers[0].input_size == (32, 48)
    path = save_model_file(model, tmp_path / "chain.onnx")
    args = [
        "convert",
        str(path),
        "-o",
        str(tmp_path / "out.onnx"),
        "--nominal-shape",
        "x:1x3x32x48",
    ]
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 0
    layers = __import__("json").loads((tmp_path / "r.json").read_text())["layers"]
    assert layers[0]["dynamic"] and layers[0]["input_size"] == [32, 48]


def padded_to_a_multiple_model(path) -> None:
    """What torch.onnx.export writes for a 1-D signal reflect-padded to a multiple of 8
    (pads computed from the length: Shape -> Gather -> Mod/Sub -> ...) before a Conv1d."""
    torch = pytest.importorskip("torch")

    class PadThenConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(2, 4, 9, stride=2)

        def forward(self, x):
            extra = (8 - x.shape[-1] % 8) % 8
            return self.conv(
                torch.nn.functional.pad(x, (extra // 2, extra - extra // 2), mode="reflect")
            )

    torch.manual_seed(0)
    module = PadThenConv().eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, torch.randn(1, 2, 100), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {2: "L"}, "y": {2: "M"}},
        )  # fmt: skip


def test_a_conv_after_shape_arithmetic_converts(tmp_path):
    path = tmp_path / "padded.onnx"
    padded_to_a_multiple_model(path)
    model = onnx.load(str(path))
    assert {"Shape", "Pad"} <= ops(model)
    converted, report = conv2attn.convert(model)
    assert len(report.layers) == 1 and report.layers[0].dynamic
    rng = np.random.default_rng(2)
    for length in (100, 57, 200, 31):
        feeds = {"x": rng.standard_normal((1, 2, length)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["global", "local"])
def test_torchvision_model_with_dynamic_height_and_width(attention, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import warnings

    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, torch.randn(1, 3, 224, 224), str(path), dynamo=False, opset_version=17,
            input_names=["image"], dynamic_axes={"image": {0: "N", 2: "H", 3: "W"}},
        )  # fmt: skip
    original = onnx.load(str(path))
    converted, report = conv2attn.convert(original, attention=attention)
    assert len(report.layers) == 20 and all(layer.dynamic for layer in report.layers)
    rng = np.random.default_rng(3)
    for size in ((224, 224), (160, 192)):
        feeds = {"image": rng.standard_normal((1, 3, *size)).astype(np.float32)}
        assert_parity(run(original, feeds), run(converted, feeds))


@st.composite
def dynamic_configs(draw, ranks=(2,)):
    config = draw(conv_configs(ranks=ranks))
    rank = len(config["model"]["kernel"])
    max_size = 13 if rank < 3 else 6
    sizes = [tuple(draw(st.integers(1, max_size)) for _ in range(rank)) for _ in range(2)]
    return config, sizes


def check_dynamic(config: dict, sizes: list[tuple[int, ...]], form: str = "matmul") -> None:
    m = config["model"]
    rank = len(m["kernel"])
    model = dynamic(conv_model(**m), names=("A", "B", "C")[:rank])
    options = dict(
        patch=config["patch"], attention=config["attention"], block=config["block"],
        nominal_shapes={"x": [1, m["in_channels"], *m["size"]]}, form=form, grid=config["grid"],
        queries=config["queries"],
    )  # fmt: skip
    if (
        config["grid"] == "fixed"
        and (m["auto_pad"] or "").startswith("SAME")
        and (max(m["strides"]) > 1)
    ):
        # the begin pad moves with the size, and with it the fixed grid's phase
        with pytest.raises(InputError, match="has no fixed token grid"):
            conv2attn.convert(model, **options)
        return
    converted, report = conv2attn.convert(model, **options)
    assert report.layers[0].dynamic
    check_queries(config, report.layers[0])
    rng = np.random.default_rng(m["seed"])
    checked = 0
    for size in [tuple(m["size"]), *sizes]:
        trial = {**config, "model": {**m, "size": size}}
        feeds = {"x": rng.standard_normal((config["batch"], m["in_channels"], *size))}
        feeds["x"] = feeds["x"].astype(np.float32)
        try:
            expected = reference(conv_model(**trial["model"]), feeds, trial)
        except Exception:  # a size the Conv itself cannot take: nothing to compare
            continue
        assert_parity(expected, run(converted, feeds))
        checked += 1
    assert checked >= 1  # the nominal size always works


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(dynamic_configs())
def test_random_convs_with_dynamic_sizes_match_at_random_sizes(case):
    config, sizes = case
    assume(all(min(s) >= 1 for s in sizes))
    check_dynamic(config, sizes)


@settings(
    max_examples=max(EXAMPLES // 3, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(dynamic_configs(ranks=(1, 3)))
def test_random_1d_and_3d_convs_with_dynamic_sizes(case):
    config, sizes = case
    check_dynamic(config, sizes)


@pytest.mark.parametrize("kind", ["dynamic", "static-per-channel"])
@pytest.mark.parametrize("attention", ["global", "local"])
def test_integer_convs_keep_dynamic_sizes_bit_identical(kind, attention, tmp_path):
    from tests.test_quantized import DIGITS, DIGITS_DATA, quantized

    images = np.load(DIGITS_DATA)["image"]
    model = onnx.load(quantized(DIGITS, tmp_path, kind, images[:8], "image"))
    model = dynamic(model)
    converted, report = conv2attn.convert(
        model, attention=attention, nominal_shapes=["image:1x1x32x32"]
    )
    assert all(layer.dynamic and layer.integer for layer in report.layers)
    rng = np.random.default_rng(4)
    for size in ((32, 32), (24, 40), (17, 9)):
        feeds = {"image": rng.standard_normal((2, 1, *size)).astype(np.float32)}
        for expected, actual in zip(run(model, feeds), run(converted, feeds)):
            np.testing.assert_array_equal(expected, actual)


@pytest.fixture
def dynamic_pair(tmp_path):
    model = dynamic(chain_model())
    original = save_model_file(model, tmp_path / "chain.onnx")
    converted = tmp_path / "chain_attn.onnx"
    assert main(["convert", str(original), "-o", str(converted), "-q"]) == 0
    return original, converted


def test_check_runs_one_file_at_several_sizes(dynamic_pair, tmp_path, capsys):
    original, converted = dynamic_pair
    report = tmp_path / "check.json"
    sizes = ["x:1x3x224x224", "x:2x3x160x192", "x:1x3x97x131"]
    args = ["check", str(original), str(converted), "--json", str(report)]
    assert main([*args, *(f"--input-shape={s}" for s in sizes)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("parity: PASS") == 3 and "== at x:2x3x160x192" in printed
    runs = __import__("json").loads(report.read_text())
    assert runs["passed"] and [r["input_shapes"]["x"] for r in runs["runs"]] == [
        [1, 3, 224, 224], [2, 3, 160, 192], [1, 3, 97, 131],
    ]  # fmt: skip


def test_profile_takes_trtexec_shape_ranges_and_times_at_opt(dynamic_pair, tmp_path, capsys):
    original, converted = dynamic_pair
    ranges = ["--minShapes", "x:1x3x32x32", "--optShapes", "x:1x3x64x48",
              "--maxShapes", "x:1x3x128x128"]  # fmt: skip
    report = tmp_path / "profile.json"
    timing = ["--iterations", "2", "--warmup", "0", "-q", "--json", str(report)]
    assert main(["profile", str(original), str(converted), *ranges, *timing]) == 0
    assert main(["profile", str(original), "--min-shapes", "x:1x3x64x64", "--opt-shapes",
                 "x:1x3x32x32", "--max-shapes", "x:1x3x128x128"]) == 2  # fmt: skip
    assert "not min <= opt <= max" in capsys.readouterr().err


def test_tensorrt_profile_spans_the_range_and_defaults_to_the_timed_shape():
    from conv2attn.runtime.tensorrt import EngineSettings, cache_key, optimization_shapes

    model = dynamic(chain_model())
    feeds = {"x": np.zeros((1, 3, 64, 48), np.float32)}
    assert optimization_shapes(model, feeds) == {"x": ((1, 3, 64, 48),) * 3}
    span = ((1, 3, 32, 32), (1, 3, 64, 48), (1, 3, 128, 128))
    assert optimization_shapes(model, feeds, {"x": span}) == {"x": span}
    first = cache_key("d", EngineSettings("fp16", None, {"x": span}), "10.9", "H100")
    other = cache_key(
        "d", EngineSettings("fp16", None, {"x": ((1, 3, 64, 48),) * 3}), "10.9", "H100"
    )
    assert first != other  # one engine per range


@pytest.mark.parametrize("group", [1, 2])
def test_single_key_attention_keeps_dynamic_sizes(group):
    """Kernel-1 Convs under local attention multiply every token in one product at any size
    (``emit_dynamic._attend``): no window Gather, parity at every size."""
    model = dynamic(conv_model(4, 6, kernel=(1, 1), group=group, size=(9, 11)))
    converted, report = conv2attn.convert(model, attention="local", patch=1, block=1)
    (layer,) = report.layers
    assert layer.dynamic and layer.heads == 1 and layer.keys == 1
    assert "Gather" not in ops(converted)
    rng = np.random.default_rng(0)
    for size in SIZES:
        feeds = {"x": rng.standard_normal((2, 4, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


@pytest.mark.parametrize(
    "group, out_channels, patch, strides, dtype",
    [
        (1, 6, (1, 1), None, np.float32),
        (1, 6, (2, 1), None, np.float32),
        (4, 4, (1, 1), (2, 2), np.float32),  # depthwise
        (4, 8, (2, 2), None, np.float32),  # depthwise, two outputs per channel
        (4, 4, (1, 1), None, np.float16),
    ],
)
def test_one_query_per_block_folds_the_heads_into_w_o_at_any_size(
    group, out_channels, patch, strides, dtype
):
    """A dynamic local plan with one query per block projects its gathered windows with
    W_O and the attention folded together (design section 3), as on static sizes: no
    product per block; a depthwise one gathers whole pixels. The module that
    ``load_trainable`` rebuilds reads its W_O back and agrees at two sizes."""
    model = dynamic(
        conv_model(4, out_channels, group=group, strides=strides, pads=[1, 1, 1, 1], dtype=dtype)
    )
    converted, report = conv2attn.convert(model, attention="local", patch=list(patch), block=1)
    (layer,) = report.layers
    assert layer.dynamic and layer.folded and layer.heads > 1
    nodes = converted.graph.node
    products = [n.name for n in nodes if n.op_type == "MatMul" and "/attn/fold/" not in n.name]
    # one product per tile of blocks (sized at the nominal 224x224), none per block
    runs = [""] if layer.tiles == 1 else [f"tile{i}/" for i in range(layer.tiles)]
    assert products == ([] if group > 1 else [f"conv/attn/{run}proj/MatMul" for run in runs])
    if group > 1:
        gathers = [n for n in nodes if n.op_type == "Gather"]
        assert len(gathers) == layer.tiles
        # tokens, not channels
        assert all(helper.get_attribute_value(g.attribute[0]) == 1 for g in gathers)
    rng = np.random.default_rng(0)
    # float16: the projection sums the Conv's products in another order; two float16
    # roundings (2 * 2**-10) of the largest output, as for static sizes
    tolerance = {} if dtype == np.float32 else dict(rtol=2 * 2**-10, atol=0)
    module = load_trainable(converted).eval() if dtype == np.float32 else None
    for size in [(9, 11), (16, 13), (3, 5), (1, 1)]:
        feeds = {"x": rng.standard_normal((2, 4, *size)).astype(dtype)}
        expected = run(model, feeds)
        assert_parity(expected, run(converted, feeds), **tolerance)
        if module is not None and size != (1, 1):
            with torch.no_grad():
                got = module(torch.from_numpy(feeds["x"])).numpy()
            assert_parity(expected, [got])


def test_a_stride_1_conv_on_pixel_tokens_crops_nothing_and_pads_by_constants():
    """Its runtime geometry is the input size plus constants (``runtime_geometry.Offset``):
    the pads resolve to ints, the crops to the sizes themselves, so the subgraph has no
    Slice copying the tensor whole and no arithmetic for its pads."""
    model = dynamic(conv_model(4, 6, pads=[1, 1, 1, 1]))
    converted, report = conv2attn.convert(model, attention="local", patch=1, block=1)
    (layer,) = report.layers
    assert layer.dynamic
    nodes = converted.graph.node
    assert not [n.name for n in nodes if "crop" in n.name]
    constants = {t.name for t in converted.graph.initializer}
    (pad,) = [n for n in nodes if n.op_type == "Pad"]
    assert pad.input[1] in constants
    rng = np.random.default_rng(0)
    for size in SIZES:
        feeds = {"x": rng.standard_normal((2, 4, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


def test_a_size_plus_a_constant_cancels_and_compares():
    from conv2attn.graph.emit import _Builder
    from conv2attn.graph.runtime_geometry import ShapeMath

    graph = gs.Graph(opset=13)
    m = ShapeMath(_Builder(graph, "conv/attn", np.dtype(np.float32)))
    n = m.runtime(gs.Variable("n", np.int64, [1]), least=1)
    wider = m.add(m.mul(m.div(n, 1), 1), 2)  # n + 2
    assert m.sub(wider, n) == 2 and m.same(m.sub(wider, 2), n)
    assert m.min(wider, n) is n and m.max(n, wider) is wider
    assert m.min(1, wider) == 1  # n + 2 >= 3 at every size
    assert m.max(0, m.sub(n, 1)) == m.sub(n, 1)  # n - 1 >= 0
    undecided = m.min(m.sub(n, 1), 1)  # n - 1 against 1: either, so computed
    assert isinstance(undecided, gs.Variable)
    assert [node.op for node in graph.nodes] == ["Add", "Less", "Where"]  # n - 1, min
    assert not m.same(m.mul(n, 2), m.mul(n, 2))  # products are computed, not compared


@pytest.mark.parametrize("kernel", [(3, 3), (3, 3, 3)])
def test_global_logits_are_built_axis_by_axis_and_written_once_at_full_size(kernel):
    """A dynamic model's global attention computes its logits on every run. Along each
    axis they are a small [queries, heads, keys] table, and the tables are summed by
    broadcasting: the full [q, heads, K] tensor is written once, by the last Add, then
    read by the Softmax, with no pass per step of the formula at full size."""
    rank = len(kernel)
    size = {2: (20, 24), 3: (6, 8, 10)}[rank]
    names = {2: ("H", "W"), 3: ("D", "H", "W")}[rank]
    model = dynamic(conv_model(kernel=kernel, pads=[1] * 2 * rank, size=size), names=names)
    converted, _ = conv2attn.convert(model, attention="global", patch=1)
    logits = [
        node.output[0]
        for node in converted.graph.node
        if "/attn/logits/" in node.name and node.op_type in {"Sub", "Mul", "Add", "ReduceSum"}
    ]
    probe = onnx.ModelProto()
    probe.CopyFrom(converted)
    probe.graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in logits
    )
    (softmax,) = [node for node in converted.graph.node if node.op_type == "Softmax"]
    probe.graph.output.append(
        helper.make_tensor_value_info(softmax.input[0], onnx.TensorProto.FLOAT, None)
    )
    rng = np.random.default_rng(2)
    for spatial in (size, tuple(s + 3 for s in size)):
        feeds = {"x": rng.standard_normal((1, 4, *spatial)).astype(np.float32)}
        outputs = run(probe, feeds)
        assert_parity(run(model, feeds), outputs[:1])
        full = outputs[-1].size  # q * heads * K
        written = dict(zip(logits, outputs[1:-1]))
        at_full_size = [name for name, value in written.items() if value.size >= full]
        assert at_full_size == [f"conv/attn/logits/axis{rank - 1}/sum_output_0"]


@pytest.mark.parametrize("group", [1, 8])
def test_a_folded_plan_gathers_in_the_tiles_of_its_nominal_size_at_any_size(group):
    """A dynamic local plan that folds its heads gathers and projects its blocks in tiles,
    as a static one does, so the gathered windows stay in cache: as many tiles as the
    static conversion at the nominal size, none with ``tiles=False``. At small sizes the
    runtime split leaves some tiles empty; the outputs still agree, in onnxruntime and in
    the module ``load_trainable`` rebuilds."""
    options = dict(attention="local", patch=[1, 1], block=1)
    model = conv_model(8, 8, group=group, pads=[1, 1, 1, 1], size=(224, 224))
    _, static = conv2attn.convert(model, **options)
    converted, report = conv2attn.convert(dynamic(model), **options)
    (layer,), (pinned,) = report.layers, static.layers
    assert layer.dynamic and layer.folded and layer.tiles == pinned.tiles > 1
    gathers = [n for n in converted.graph.node if n.op_type == "Gather"]
    assert len(gathers) == layer.tiles
    whole, _ = conv2attn.convert(dynamic(model), tiles=False, **options)
    assert len([n for n in whole.graph.node if n.op_type == "Gather"]) == 1
    module = load_trainable(converted).eval()
    rng = np.random.default_rng(3)
    for size in [(224, 224), (97, 131), (2, 3), (1, 1)]:  # 6 and 1 blocks: empty tiles
        feeds = {"x": rng.standard_normal((2, 8, *size)).astype(np.float32)}
        expected = run(model, feeds)
        assert_parity(expected, run(converted, feeds))
        with torch.no_grad():
            got = module(torch.from_numpy(feeds["x"])).numpy()
        assert_parity(expected, [got])
