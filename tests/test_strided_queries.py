"""Strided queries (``--queries``, design section 5): local attention of a strided Conv on
one-pixel tokens, a query every stride tokens, so the kernel's taps are the heads.

The patch construction turns a stride-2 3x3 Conv into 4 heads over tokens of 2x2 pixels,
whose projection holds 16 taps of which the kernel uses 9 (1.78x the Conv's
multiply-adds). With strided queries the same Conv is 9 heads over pixels: the
projection does exactly the Conv's multiply-adds. Parity is the same as for every other
plan (``helpers.assert_parity``); the property tests draw ``queries`` too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import conv2attn
from conv2attn.cli import main
from conv2attn.core.geometry import (
    GATHER_ROW_MOVES,
    ROWS_FIRST_FEATURES,
    Attention,
    ConvSpec,
    GeometryError,
    Grid,
    Order,
    plan_attention,
)
from conv2attn.core.planning import plan_layers
from conv2attn.core.weights import output_projection, query_indices, window_indices
from conv2attn.errors import InputError
from conv2attn.record import converted_layers
from conv2attn.torch_graph import load_trainable
from conv2attn.trainable import convert_module
from tests.helpers import assert_parity, conv_model, random_input, run
from tests.test_dynamic import dynamic

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
LOCAL = Attention.LOCAL


def downsampling(size=(56, 56), channels=(64, 128)):
    """A ResNet's stride-2 3x3 Conv (padding 1)."""
    return ConvSpec(*channels, 1, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), size)


def test_the_kernels_taps_are_the_heads_and_the_projection_does_the_convs_work():
    spec = downsampling()
    patch = plan_attention(spec, (1, 1), attention=LOCAL, block=(2, 2))
    strided = plan_attention(spec, (1, 1), attention=LOCAL, block=(2, 2), strided_queries=True)
    assert patch.heads == 4 and patch.in_patch == (2, 2)
    assert strided.heads == 9 and strided.in_patch == (1, 1) and strided.query_steps == (2, 2)
    assert strided.heads == strided.fixed_grid_heads
    assert strided.projection_macs == spec.macs  # 28x28 queries, whole blocks of 2x2
    assert patch.projection_macs == spec.macs * 16 // 9
    # tokens: from the first query's first tap to the last query's last tap
    assert strided.token_grid == (2 * (28 - 1) + 3,) * 2
    # a block of 2 queries per axis reads 2 * (2 - 1) + 3 = 5 tokens per axis
    assert strided.window_grid == (5, 5)


def test_the_projection_is_the_stride_1_pixel_plans():
    """Strided queries change where queries sit, not what a head's key is multiplied by."""
    spec = downsampling(size=(10, 9), channels=(3, 5))
    stride_1 = ConvSpec(3, 5, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (10, 9))
    weight = np.random.default_rng(0).standard_normal((5, 3, 3, 3)).astype(np.float32)
    for order in Order:
        strided = plan_attention(spec, (1, 1), order, LOCAL, (2, 3), strided_queries=True)
        pixels = plan_attention(stride_1, (1, 1), order, LOCAL, (2, 3))
        np.testing.assert_array_equal(
            output_projection(strided, weight), output_projection(pixels, weight)
        )


def test_queries_sit_every_stride_tokens_inside_their_window():
    plan = plan_attention(downsampling(size=(9, 9), channels=(2, 2)), (1, 1), attention=LOCAL,
                          block=(2, 2), strided_queries=True)  # fmt: skip
    columns = plan.token_grid[1]
    queries = query_indices(plan)
    windows = window_indices(plan)
    # 5 outputs per axis in 3 blocks of 2: queries 0, 2, .., 10 and their taps up to 12
    assert plan.blocks == 9 and plan.token_grid == (13, 13)
    first_block = [(i // columns, i % columns) for i in queries[0]]
    assert first_block == [(0, 0), (0, 2), (2, 0), (2, 2)]
    # block (0, 1) starts 2 queries = 4 tokens to the right
    assert divmod(int(queries[1][0]), columns) == (0, 4)
    for block in range(plan.blocks):
        assert set(queries[block]) <= set(windows[block])
        # every query's 3x3 taps lie in the block's window
        for query in queries[block]:
            taps = {query + dy * columns + dx for dy in range(3) for dx in range(3)}
            assert taps <= set(windows[block])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(attention=Attention.GLOBAL), "strided queries need local attention"),
        (dict(attention=LOCAL, block=(1, 1), patch=(2, 1)), "take output patch 1, not 2"),
    ],
)
def test_plans_that_cannot_take_strided_queries_say_why(kwargs, message):
    patch = kwargs.pop("patch", (1, 1))
    with pytest.raises(GeometryError, match=message):
        plan_attention(downsampling(size=(8, 8)), patch, strided_queries=True, **kwargs)
    stride_1 = ConvSpec(2, 2, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (8, 8))
    with pytest.raises(GeometryError, match="need a stride above 1"):
        plan_attention(stride_1, (1, 1), attention=LOCAL, block=(1, 1), strided_queries=True)
    # a kernel-1 strided axis is subsampled first: it has no stride left to stride queries
    pointwise = ConvSpec(2, 2, 1, (1, 1), (2, 2), (1, 1), (0, 0), (0, 0), (8, 8))
    with pytest.raises(GeometryError, match="need a stride above 1"):
        plan_attention(pointwise, (1, 1), attention=LOCAL, block=(1, 1), strided_queries=True)


CASES = {
    "resnet downsampling": dict(in_channels=8, out_channels=16, strides=[2, 2], pads=[1] * 4,
                                size=(14, 13)),
    "stem 7x7": dict(in_channels=3, out_channels=8, kernel=(7, 7), strides=[2, 2],
                     pads=[3] * 4, size=(19, 20)),
    "stride 3, 2, dilated": dict(in_channels=4, out_channels=6, kernel=(3, 2), strides=[3, 2],
                                 dilations=[2, 1], pads=[2, 0, 1, 1], size=(17, 12)),
    "depthwise 5x5": dict(in_channels=6, out_channels=6, group=6, kernel=(5, 5),
                          strides=[2, 2], pads=[2] * 4, size=(15, 15)),
    "grouped": dict(in_channels=6, out_channels=4, group=2, strides=[2, 2], pads=[1] * 4,
                    size=(11, 12)),
    "stride along one axis": dict(in_channels=4, out_channels=4, strides=[2, 1],
                                  pads=[1] * 4, size=(12, 9)),
}  # fmt: skip


def only(order: str):
    """The planner, keeping each Conv's cheapest plan of one order: a test's way to
    emit both orders."""
    from conv2attn.core import planning
    from conv2attn.core.geometry import best_plan

    def plan_layers(*args, **kwargs):
        chosen = planning.plan_layers(*args, **kwargs)
        plans = [
            best_plan([p for p in considered if p.order.value == order])
            for considered in chosen.considered
        ]
        return planning.LayerPlans(plans, chosen.considered, True)

    return plan_layers


@pytest.mark.parametrize(
    ("case", "order"),
    [
        (case, order)
        for case in CASES
        for order in ("attend-first", "project-first")
        if not (case == "depthwise 5x5" and order == "project-first")  # attends first only
    ],
)
def test_strided_queries_compute_the_conv(case, order, monkeypatch):
    monkeypatch.setattr("conv2attn.graph.rewrite.plan_layers", only(order))
    model = conv_model(**CASES[case])
    feeds = random_input(model, batch=2)
    expected = run(model, feeds)
    blocks = ["auto", "1", "3x2"]
    if case == "stride along one axis":
        blocks.append("2x3")
    for block in blocks:
        for tile_batch in (1, 10**9):  # 10**9: every block is a tile of its own
            converted, report = conv2attn.convert(
                model, attention="local", queries="strided", block=block, batch=tile_batch,
            )  # fmt: skip
            (layer,) = report.layers
            assert layer.strided_queries and layer.order == order
            assert_parity(expected, run(converted, feeds))


def test_the_standard_attention_operator_takes_strided_queries():
    model = conv_model(**CASES["resnet downsampling"])
    converted, report = conv2attn.convert(
        model, attention="local", queries="strided", form="attention"
    )
    assert report.layers[0].strided_queries
    assert "Attention" in {n.op_type for n in converted.graph.node}
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))


@pytest.mark.parametrize("case", ["resnet downsampling", "stride 3, 2, dilated"])
def test_dynamic_sizes_keep_their_strided_queries(case):
    model = dynamic(conv_model(**CASES[case]))
    converted, report = conv2attn.convert(model, attention="local", queries="strided")
    assert report.layers[0].dynamic and report.layers[0].strided_queries
    rng = np.random.default_rng(0)
    channels = CASES[case]["in_channels"]
    for size in ((14, 13), (23, 31), (5, 4), (3, 3)):
        feeds = {"x": rng.standard_normal((2, channels, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


@pytest.mark.parametrize("attention", ["local", "auto"])
def test_integer_convs_with_strided_queries_stay_bit_identical(attention, tmp_path):
    """The digits model's stride-2 3x3 Convs, quantized: the selection reads every
    stride-th pixel token's neighbours."""
    from tests.test_quantized import DIGITS_DATA, quantized
    from tests.test_quantized import run as run_quantized

    images = np.load(DIGITS_DATA)["image"]
    model = onnx.load(quantized(DIGITS, tmp_path, "static", images[:16], "image"))
    converted, report = conv2attn.convert(model, attention=attention, queries="strided")
    strided = [layer for layer in report.layers if layer.strided_queries]
    assert strided and all(layer.integer for layer in strided)
    feeds = {"image": images[:64]}
    for a, b in zip(run_quantized(model, feeds, False), run_quantized(converted, feeds, False)):
        np.testing.assert_array_equal(a, b)


def test_patch_queries_are_never_strided_and_auto_takes_the_cheaper():
    spec = downsampling()
    patch = plan_layers([spec], ["down"], attention="local", queries="patch").plans[0]
    assert not patch.strided_queries
    # 56x56 -> 28x28 with 64 -> 128 channels: 1.78x the multiply-adds on 2x2 tokens
    auto = plan_layers([spec], ["down"], attention="local", queries="auto").plans[0]
    assert auto.strided_queries and auto.cost < patch.cost
    assert auto.projection_macs == spec.macs
    # attention auto: "strided" leaves the global plans in the choice
    plans = plan_layers([spec], ["down"], attention="auto", queries="strided").considered[0]
    assert {p.attention for p in plans} == {Attention.GLOBAL, Attention.LOCAL}
    assert all(p.strided_queries for p in plans if p.attention is LOCAL)


@pytest.mark.parametrize(
    "kernel, out_channels",
    [(3, 32), (7, 64)],  # mobilenet_v2's and efficientnet_b0's stem; resnet's
)
def test_a_three_channel_stem_takes_pixel_tokens_with_its_window_rows_gathered_first(
    kernel, out_channels
):
    # Folded (no attention product), strided queries gathered pixel by pixel would copy
    # one row of 3 features per tap: 9 rows per output for a 3x3 kernel, 49 for a 7x7 one,
    # and resnet18's 7x7 stem was the faster on 1x3 patches (4 and 8 rows of 36 features,
    # 5x and 2x the Conv's multiply-adds). Gathered window rows first, a window is one row
    # of 3 x kernel features per window column, and both stems take pixel tokens, with
    # exactly their Conv's multiply-adds. Kernel time of the stem's nodes, per-node
    # profiles: resnet18's 2.97 ms against 3.63 on 1x3 patches; mobilenet_v2's 0.67
    # against 0.98 ms gathered pixel by pixel.
    pad = kernel // 2
    spec = ConvSpec(3, out_channels, 1, (kernel,) * 2, (2, 2), (1, 1), (pad,) * 2, (pad,) * 2,
                    (224, 224))  # fmt: skip
    # no parameter budget: in a whole model the stem's share of it is small
    (plan,) = plan_layers([spec], ["stem"], attention="local", max_param_growth=1e9).plans
    assert plan.strided_queries and plan.gathers_rows_first
    assert plan.folds_heads and plan.projection_macs == spec.macs


def test_only_narrow_two_dimensional_pixel_tokens_are_gathered_rows_first():
    def plan(spec, **kwargs):
        options = {"strided_queries": True, **kwargs}
        return plan_attention(
            spec, (1,) * spec.rank, Order.ATTEND_FIRST, LOCAL, (1,) * spec.rank, **options
        )

    stem = ConvSpec(3, 8, 1, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (16, 16))
    assert plan(stem).gathers_rows_first
    wider = ConvSpec(
        ROWS_FIRST_FEATURES + 1, 8, 1, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (16, 16)
    )
    assert plan(wider).folds_heads and not plan(wider).gathers_rows_first
    one_row = ConvSpec(3, 8, 1, (1, 3), (1, 2), (1, 1), (0, 1), (0, 1), (16, 16))
    assert not plan(one_row).gathers_rows_first
    line = ConvSpec(3, 8, 1, (3,), (2,), (1,), (1,), (1,), (16,))
    assert plan(line).folds_heads and not plan(line).gathers_rows_first
    # the row Gather, its Transpose and one row per window column: less than the rows
    # of a Gather of every key on its own
    rows_first = plan(stem)
    assert rows_first.moved < rows_first.blocks * rows_first.keys * GATHER_ROW_MOVES


def test_pytorch_layers_and_the_round_trip_keep_strided_queries():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
    ).eval()
    x = torch.randn(2, 3, 13, 12)
    converted = convert_module(cnn, x, attention="local", queries="strided")
    assert converted[2].plan.strided_queries and converted[2].plan.heads == 9
    with pytest.raises(ValueError, match="strided queries apply to local"):
        convert_module(cnn, x, attention="global", queries="strided")
    with torch.no_grad():
        torch.testing.assert_close(converted(x), cnn(x), rtol=1e-5, atol=1e-5)
        other = torch.randn(1, 3, 9, 16)  # another size: the layer plans it on first use
        torch.testing.assert_close(converted(other), cnn(other), rtol=1e-5, atol=1e-5)

    original = onnx.load(str(DIGITS))
    model, report = conv2attn.convert(original, attention="local", queries="strided")
    assert any(layer.strided_queries for layer in report.layers)
    module = load_trainable(model)
    assert any(layer.plan.strided_queries for _, layer in module.named_layers())
    feeds = random_input(original, batch=3)
    with torch.no_grad():
        got = module.eval()(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert_parity(run(original, feeds), [got])


def test_the_table_the_json_and_the_record_name_strided_queries(tmp_path, capsys):
    out = tmp_path / "strided.onnx"
    report = tmp_path / "strided.json"
    args = ["convert", str(DIGITS), "-o", str(out), "--attention", "local"]
    assert main([*args, "--queries", "strided", "--report", str(report)]) == 0
    table = capsys.readouterr().out
    assert "1x1*" in table and "patch n*: strided queries" in table
    data = json.loads(report.read_text())
    assert data["options"]["queries"] == "strided"
    strided = [layer for layer in data["layers"] if layer["strided_queries"]]
    assert strided and all(math.prod(layer["strides"]) > 1 for layer in strided)
    record = converted_layers(onnx.load(out))
    assert [e["strided_queries"] for e in record] == [
        layer["strided_queries"] for layer in data["layers"]
    ]
    check = ["check", str(DIGITS), str(out), "--inputs", str(DIGITS.parent / "digits_test.npz")]
    assert main([*check, "--per-layer", "-q"]) == 0

    described = tmp_path / "inspect.json"
    inspect = ["inspect", str(DIGITS), "--attention", "local", "--json", str(described)]
    assert main([*inspect, "--queries", "strided", "-q"]) == 0
    planned = json.loads(described.read_text())
    assert [layer["strided_queries"] for layer in planned["plan"]["layers"]] == [
        layer["strided_queries"] for layer in data["layers"]
    ]

    patch = tmp_path / "patch.onnx"
    assert main([*args[:3], str(patch), "--attention", "local", "--queries", "patch"]) == 0
    table = capsys.readouterr().out
    assert "*" not in table.split("\n\n")[0] and "strided queries" not in table
    with pytest.raises(InputError, match="--queries diagonal: expected patch, strided or auto"):
        conv2attn.convert(str(DIGITS), queries="diagonal")
    with pytest.raises(InputError, match="--queries strided applies to --attention local or auto"):
        conv2attn.convert(str(DIGITS), attention="global", queries="strided")
    assert (
        main(["convert", str(DIGITS), "-o", str(tmp_path / "g.onnx"), "--queries", "strided"]) == 2
    )
    assert "--queries strided applies to" in capsys.readouterr().err


def test_the_fixed_grid_puts_each_head_around_the_querys_pixel():
    plan = plan_attention(downsampling(size=(8, 8)), (1, 1), attention=LOCAL, block=(2, 2),
                          grid=Grid.FIXED, strided_queries=True)  # fmt: skip
    assert set(plan.grid_head_offsets) == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    assert plan.grid_aligned  # one-pixel tokens: the shifted and the fixed grid are one


def test_the_report_finds_each_head_around_its_strided_query():
    """The HTML report reads the layer's Softmax: a query sits on every second token, and
    its heads attend to the pixels at -1, 0, 1 per axis around it."""
    from conv2attn.inputs import graph_inputs, random_samples
    from conv2attn.visual_report import attention_picture

    model = conv_model(4, 4, kernel=(3, 3), strides=[2, 2], pads=[1] * 4, size=(12, 12))
    converted, report = conv2attn.convert(model, attention="local", queries="strided", block=3)
    assert report.layers[0].strided_queries and report.layers[0].grid == "fixed"
    (layer,) = converted_layers(converted)
    feeds = random_samples(graph_inputs(model), 1, 0, {}).feeds
    picture = attention_picture(model, converted, layer, feeds)
    assert picture.heads == 9 and picture.key_grid == (7, 7)  # 2 * (3 - 1) + 1 + 2
    assert sorted(picture.offsets) == [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]


def test_a_seven_by_seven_stem_keeps_patches_where_emission_gathers_pixel_by_pixel():
    """The dynamic emission and the GPU form (``--no-tiles``) gather windows pixel by
    pixel: 49 rows of 3 floats per output for a 7x7 stem on pixel tokens, which the
    planning prices as such and avoids."""
    spec = ConvSpec(3, 64, 1, (7, 7), (2, 2), (1, 1), (3, 3), (3, 3), (224, 224))
    (plan,) = plan_layers(
        [spec], ["stem"], attention="local", max_param_growth=1e9, rows_first=[False]
    ).plans
    assert not plan.strided_queries and not plan.gathers_rows_first and plan.in_dim >= 12

    def model():
        return conv_model(
            in_channels=3,
            out_channels=8,
            kernel=(7, 7),
            strides=[2, 2],
            pads=[3] * 4,
            size=(32, 32),
        )

    for converted, report in (
        conv2attn.convert(dynamic(model()), attention="local"),
        conv2attn.convert(model(), attention="local", tiles=False),
        conv2attn.convert(model(), attention="local"),
    ):
        rows_first = any("window_rows" in node.name for node in converted.graph.node)
        assert report.layers[0].strided_queries == rows_first
    assert rows_first  # the CPU emission of the static shape
