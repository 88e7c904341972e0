"""The fixed token grid (``--grid fixed``, design section 8): Li et al.'s ViT setting.

Tokens start at the first input pixel and output token I covers the pixels of input
token I, so a 3x3 stride-1 Conv needs 9 heads at every patch (the shifted grid: 4 from
patch 2 on). Parity is the same as on the shifted grid (``helpers.assert_parity``); the
property tests draw the grid too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import conv2attn
from conv2attn.cli import main
from conv2attn.core import geometry, planning
from conv2attn.core.geometry import (
    Attention,
    ConvSpec,
    Grid,
    Order,
    auto_patches,
    has_phase,
    plan_attention,
)
from conv2attn.core.planning import plan_layers
from conv2attn.errors import InputError
from conv2attn.record import converted_layers
from conv2attn.torch_graph import load_trainable
from conv2attn.trainable import convert_module
from tests.helpers import assert_parity, conv_model, random_input, run
from tests.test_dynamic import dynamic

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def three_by_three(stride=1, size=(12, 12), pad=1):
    return ConvSpec(4, 4, 1, (3, 3), (stride, stride), (1, 1), (pad, pad), (pad, pad), size)


@pytest.mark.parametrize("patch", [1, 2, 3, 4])
def test_a_3x3_conv_needs_9_heads_on_the_fixed_grid_at_every_patch(patch):
    fixed = plan_attention(three_by_three(), (patch, patch), grid=Grid.FIXED)
    shifted = plan_attention(three_by_three(), (patch, patch), grid=Grid.SHIFTED)
    assert fixed.heads == fixed.fixed_grid_heads == 9
    assert shifted.heads == (9 if patch == 1 else 4)
    assert shifted.fixed_grid_heads == 9  # what the report prints next to the 4
    # each head's key token relative to the query's own token: -1, 0, 1 per axis
    assert set(fixed.grid_head_offsets) == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    assert min(min(o) for o in shifted.grid_head_offsets) == 0


@pytest.mark.parametrize(
    "spec",
    [
        three_by_three(),
        three_by_three(stride=2, size=(13, 11)),
        ConvSpec(3, 8, 1, (7, 7), (2, 2), (1, 1), (3, 3), (3, 3), (20, 17)),
        ConvSpec(2, 4, 2, (5, 3), (1, 2), (2, 1), (4, 1), (3, 0), (15, 9)),
    ],
)
@pytest.mark.parametrize("patch", [1, 2, 3])
def test_the_first_input_pixel_starts_a_token(spec, patch):
    """What makes the grid fixed: whole tokens of zeros, then the input, token-aligned; and
    output patch I covers input token I's pixels (stride 1: the same pixels)."""
    plan = plan_attention(spec, (patch, patch), grid=Grid.FIXED)
    for axis in plan.axes:
        assert axis.zeros_before % axis.in_patch == 0
        assert axis.zeros_before // axis.in_patch == axis.grid_offset
    # keys span the receptive field and no more: the nearest and farthest offsets are read
    for axis, k, s, d, pb in zip(
        plan.axes, spec.kernel, spec.strides, spec.dilations, spec.pads_begin
    ):
        first = -pb  # input pixel the first output of token 0 reads, relative to token 0
        last = (axis.patch - 1) * s + d * (k - 1) - pb
        assert first // axis.in_patch == -axis.grid_offset
        assert last // axis.in_patch == axis.reach - axis.grid_offset


@pytest.mark.parametrize("attention", ["global", "local"])
@pytest.mark.parametrize("order", list(Order))
def test_fixed_grid_plans_compute_the_conv(attention, order):
    model = conv_model(4, 6, kernel=(3, 5), strides=[1, 2], pads=[1, 2, 1, 2], size=(11, 13))
    for patch in (1, 2, 3):
        converted, report = conv2attn.convert(
            model, patch=patch, attention=attention, grid="fixed", max_param_growth=1e9
        )
        (layer,) = report.layers
        assert layer.grid == "fixed" and layer.heads == layer.fixed_grid_heads
        feeds = random_input(model, batch=2)
        assert_parity(run(model, feeds), run(converted, feeds))


def test_auto_takes_the_cheaper_grid_and_prefers_fixed_where_they_are_one():
    """With a phase of 0 (stride 1, patch 1) both grids are the same computation: auto
    calls it fixed. Where the fixed grid needs more heads, auto stays shifted."""
    specs = [three_by_three(), three_by_three(size=(56, 56))]
    chosen = plan_layers(specs, ["a", "b"], patch=(1, 1), grid="auto").plans
    assert chosen[0].grid is Grid.FIXED and chosen[0].phase == (0, 0)
    chosen = plan_layers(specs, ["a", "b"], patch=(2, 2), grid="auto").plans
    assert [p.grid for p in chosen] == [Grid.SHIFTED, Grid.SHIFTED]
    assert all(p.heads == 4 and p.fixed_grid_heads == 9 for p in chosen)


PHASE_SPECS = [
    ConvSpec(8, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (14, 14)),
    ConvSpec(8, 8, 1, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (15, 14)),
    ConvSpec(3, 8, 1, (7, 7), (2, 2), (1, 1), (3, 3), (3, 3), (20, 20)),
    ConvSpec(8, 8, 1, (1, 1), (2, 2), (1, 1), (0, 0), (0, 0), (14, 14)),  # subsampled
    ConvSpec(8, 8, 1, (1, 1), (1, 1), (1, 1), (0, 2), (0, 2), (9, 9)),
    ConvSpec(8, 8, 8, (5, 5), (1, 1), (2, 2), (4, 4), (4, 4), (12, 12)),
]


@pytest.mark.parametrize("spec", PHASE_SPECS)
def test_has_phase_says_which_shifted_plans_differ_from_their_fixed_twin(spec):
    for patch in auto_patches(spec):
        plan = plan_attention(spec, patch, grid=Grid.SHIFTED)
        assert has_phase(spec, patch) == (not plan.grid_aligned), patch


@pytest.mark.parametrize("attention", ["global", "local", "auto"])
def test_grid_auto_plans_a_phase_free_patch_once_and_chooses_as_a_full_search(
    attention, monkeypatch
):
    """Grid auto skips the shifted plans of patches without a phase (they are their fixed
    twins): it considers and chooses the plans that planning both grids in full does."""
    names = [f"c{i}" for i in range(len(PHASE_SPECS))]

    def planned():
        geometry._candidates.cache_clear()
        plans = plan_layers(PHASE_SPECS, names, attention=attention, grid="auto")
        return [p.rank_key for p in plans.plans], [
            [p.rank_key for p in layer] for layer in plans.considered
        ]

    skipping = planned()
    monkeypatch.setattr(planning, "has_phase", lambda spec, patch: True)
    assert planned() == skipping


def test_the_table_and_the_record_state_both_head_counts(tmp_path, capsys):
    out = tmp_path / "shifted.onnx"
    assert main(["convert", str(DIGITS), "-o", str(out), "--grid", "shifted"]) == 0
    table = capsys.readouterr().out
    assert "4 (9)" in table and "n heads on Li et al.'s fixed token grid" in table
    record = converted_layers(onnx.load(out))
    assert all(entry["grid"] == "shifted" for entry in record)
    assert any(entry["heads"] < entry["fixed_grid_heads"] for entry in record)

    fixed = tmp_path / "fixed.onnx"
    report = tmp_path / "fixed.json"
    args = ["convert", str(DIGITS), "-o", str(fixed), "--grid", "fixed", "--report", str(report)]
    assert main(args) == 0
    assert "(9)" not in capsys.readouterr().out  # heads used are the fixed grid's
    data = json.loads(report.read_text())
    assert data["options"]["grid"] == "fixed"
    assert all(layer["heads"] == layer["fixed_grid_heads"] for layer in data["layers"])
    check = ["check", str(DIGITS), str(fixed), "--inputs", str(DIGITS.parent / "digits_test.npz")]
    assert main([*check, "--per-layer"]) == 0
    capsys.readouterr()

    auto = tmp_path / "auto.onnx"
    assert main(["convert", str(DIGITS), "-o", str(auto), "--grid", "auto"]) == 0
    assert " grid " in capsys.readouterr().out.splitlines()[0] + " "  # each layer's own


def test_a_pad_that_moves_with_the_size_has_no_fixed_grid():
    model = dynamic(
        conv_model(3, 4, kernel=(3, 3), strides=[2, 2], auto_pad="SAME_UPPER", size=(9, 11))
    )
    with pytest.raises(InputError, match="Conv 'conv' has no fixed token grid: auto_pad"):
        conv2attn.convert(model, grid="fixed")
    converted, report = conv2attn.convert(model, grid="auto")
    assert report.layers[0].grid == "shifted"
    rng = np.random.default_rng(0)
    for size in ((9, 11), (16, 15), (3, 4)):
        feeds = {"x": rng.standard_normal((2, 3, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))
    with pytest.raises(InputError, match="--grid diagonal: expected shifted, fixed or auto"):
        conv2attn.convert(model, grid="diagonal")


def test_stride_1_same_padding_keeps_a_fixed_grid_at_every_size():
    model = dynamic(conv_model(3, 4, kernel=(3, 3), auto_pad="SAME_LOWER", size=(9, 11)))
    converted, report = conv2attn.convert(model, grid="fixed", attention="local")
    assert report.layers[0].grid == "fixed" and report.layers[0].dynamic
    rng = np.random.default_rng(1)
    for size in ((9, 11), (16, 15), (3, 4), (1, 1)):
        feeds = {"x": rng.standard_normal((2, 3, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


def test_pytorch_layers_and_the_round_trip_keep_the_fixed_grid():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    converted = convert_module(cnn, x, grid="fixed", patch=2, max_param_growth=100)
    assert converted[0].plan.grid is Grid.FIXED and converted[0].plan.heads == 9
    with torch.no_grad():
        torch.testing.assert_close(converted(x), cnn(x), rtol=1e-5, atol=1e-5)

    original = onnx.load(str(DIGITS))
    model, _ = conv2attn.convert(original, grid="fixed", attention="local")
    module = load_trainable(model)
    assert all(layer.plan.grid is Grid.FIXED for _, layer in module.named_layers())
    feeds = random_input(original, batch=3)
    with torch.no_grad():
        got = module.eval()(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert_parity(run(original, feeds), [got])


def test_local_attention_windows_cover_the_symmetric_neighbourhood():
    plan = plan_attention(three_by_three(size=(8, 8)), (2, 2), Order.ATTEND_FIRST,
                          Attention.LOCAL, (2, 2), Grid.FIXED)  # fmt: skip
    # a 2x2 block of queries with offsets -1..1 needs 4 keys per axis
    assert plan.window_grid == (4, 4) and plan.heads == 9


@pytest.mark.parametrize("attention", ["global", "local"])
def test_the_report_shows_each_head_at_its_offset_around_the_query(attention):
    """The HTML report reads the layer's Softmax: on the fixed grid a 3x3 Conv's heads
    attend to the tokens at -1, 0, 1 per axis around the query's own token."""
    from conv2attn.inputs import graph_inputs, random_samples
    from conv2attn.visual_report import attention_picture

    model = conv_model(4, 4, kernel=(3, 3), pads=[1, 1, 1, 1], size=(12, 12))
    converted, _ = conv2attn.convert(model, patch="2", grid="fixed", attention=attention)
    (layer,) = converted_layers(converted)
    feeds = random_samples(graph_inputs(model), 1, 0, {}).feeds
    picture = attention_picture(model, converted, layer, feeds)
    assert picture.heads == 9
    assert sorted(picture.offsets) == [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    assert all(picture.maps[h].max() == pytest.approx(1.0, abs=1e-6) for h in range(9))


@pytest.mark.parametrize("attention", ["global", "local"])
def test_integer_convs_on_the_fixed_grid_stay_bit_identical(attention, tmp_path):
    """The integer form selects tokens by index (design section 10); on the fixed grid the
    zero tokens ahead are the input's zero point like any pad."""
    from tests.test_quantized import DIGITS_DATA, quantized
    from tests.test_quantized import run as run_quantized

    images = np.load(DIGITS_DATA)["image"]
    model = onnx.load(quantized(DIGITS, tmp_path, "static", images[:16], "image"))
    converted, report = conv2attn.convert(model, attention=attention, grid="fixed")
    assert report.layers and all(layer.integer for layer in report.layers)
    assert all(layer.grid == "fixed" for layer in report.layers)
    feeds = {"image": images[:64]}
    for a, b in zip(run_quantized(model, feeds, False), run_quantized(converted, feeds, False)):
        np.testing.assert_array_equal(a, b)
