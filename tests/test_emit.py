"""The emission stage on its own: both operation orders, names, and the lean layout."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conv2attn.core.geometry import (
    ROWS_FIRST_FEATURES,
    Attention,
    ConvSpec,
    Order,
    plan_attention,
)
from conv2attn.core.weights import output_bias, output_projection
from conv2attn.graph.emit import WIDE_BIAS_ROW, WIDE_TAP_ROW, emit_attention
from conv2attn.validate import session
from tests.reference import direct_conv

CASES = {
    "dense": ConvSpec(4, 6, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (9, 10)),
    "grouped-strided": ConvSpec(4, 6, 2, (3, 2), (2, 1), (1, 2), (0, 1), (2, 0), (11, 9)),
    "depthwise": ConvSpec(6, 6, 6, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (10, 10)),
}


def build(
    spec,
    patch,
    order,
    dtype=np.float32,
    attention=Attention.GLOBAL,
    block=None,
    wide_rows=False,
    tiles=1,
    strided_queries=False,
):
    plan = plan_attention(spec, patch, order, attention, block, strided_queries=strided_queries)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((spec.out_channels, spec.in_channels // spec.group, *spec.kernel))
    bias = rng.standard_normal(spec.out_channels)
    x = gs.Variable("x", dtype=dtype, shape=["B", spec.in_channels, *spec.input_size])
    y = gs.Variable("y", dtype=dtype, shape=["B", spec.out_channels, *spec.output_size])
    graph = gs.Graph(inputs=[x], outputs=[y], opset=11)
    emit_attention(
        graph,
        "layer/attn",
        x,
        y,
        plan,
        output_projection(plan, weight.astype(dtype)),
        output_bias(plan, bias, dtype),
        "B",
        tiles,
        wide_rows=wide_rows,
    )
    model = gs.export_onnx(graph.cleanup().toposort())
    return model, weight, bias


MODES = {"global": (Attention.GLOBAL, None), "local": (Attention.LOCAL, (2, 1))}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("order", list(Order))
@pytest.mark.parametrize("name", CASES)
def test_both_orders_compute_the_conv(name, order, mode):
    spec = CASES[name]
    model, weight, bias = build(spec, (2, 3), order, np.float32, *mode)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, spec.in_channels, *spec.input_size))
    (got,) = session(model).run(None, {"x": x.astype(np.float32)})
    expected = direct_conv(x, weight, bias, spec)
    error = np.abs(got - expected).max()
    # float32 inputs and weights: a few roundings of sums of at most Cin*K unit-sized products
    assert error <= 1e-5 * np.abs(expected).max() + 1e-6, error


def data_transposes(model):
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Transpose" and "/logits/" not in n.name and "/Softmax/" not in n.name
    ]


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("order", list(Order))
def test_grouped_convs_take_one_transpose_each_way(order, mode):
    model, _, _ = build(CASES["grouped-strided"], (2, 2), order, np.float32, *mode)
    assert data_transposes(model) == [
        "layer/attn/patchify/Transpose",
        "layer/attn/unpatchify/Transpose",
    ]
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    assert sorted(matmuls) == ["layer/attn/MatMul", "layer/attn/proj/MatMul"]  # all heads at once


@pytest.mark.parametrize("order", list(Order))
def test_ungrouped_convs_move_whole_pixels(order):
    """Channels-last tokens: NCHW<->NHWC plus patch moves that keep channels innermost."""
    model, _, _ = build(CASES["dense"], (2, 3), order)
    assert data_transposes(model) == [
        "layer/attn/patchify/to_nhwc/Transpose",
        "layer/attn/patchify/Transpose",
        "layer/attn/unpatchify/Transpose",
        "layer/attn/unpatchify/to_nchw/Transpose",
    ]
    for node in model.graph.node:
        if node.name in ("layer/attn/patchify/Transpose", "layer/attn/unpatchify/Transpose"):
            perm = list(next(a for a in node.attribute if a.name == "perm").ints)
            assert perm[-1] == len(perm) - 1  # channels stay innermost
    # 1x1 patches need no patch moves at all, only the layout change
    model, _, _ = build(CASES["dense"], (1, 1), order)
    assert data_transposes(model) == [
        "layer/attn/patchify/to_nhwc/Transpose",
        "layer/attn/unpatchify/to_nchw/Transpose",
    ]


def test_every_node_is_named_after_the_layer():
    model, _, _ = build(CASES["dense"], (2, 2), Order.ATTEND_FIRST)
    assert all(n.name.startswith("layer/attn/") for n in model.graph.node)
    assert all(i.name.startswith("layer/attn/") for i in model.graph.initializer)
    assert {n.name for n in model.graph.node} >= {
        "layer/attn/Softmax",
        "layer/attn/MatMul",
        "layer/attn/proj/MatMul",
        "layer/attn/proj/Add",
    }


SINGLE_KEY = {
    "pointwise": ConvSpec(8, 6, 1, (1, 1), (1, 1), (1, 1), (0, 0), (0, 0), (7, 9)),
    "pointwise-grouped": ConvSpec(8, 6, 2, (1, 1), (1, 1), (1, 1), (0, 0), (0, 0), (7, 9)),
    "patch-embedding": ConvSpec(3, 8, 1, (4, 4), (4, 4), (1, 1), (0, 0), (0, 0), (16, 12)),
    "strided-1d": ConvSpec(4, 5, 1, (2,), (2,), (1,), (0,), (1,), (13,)),
}


@pytest.mark.parametrize("order", list(Order))
@pytest.mark.parametrize("name", SINGLE_KEY)
def test_single_key_attention_folds_into_w_o(name, order):
    """One head and one query per block means one key per block, the block's own token,
    and a softmax over one key: exactly 1. No window Gather and no attention product: the
    attention multiplies W_O once (a constant Mul, folded at load time), and the projection
    reads the tokens as they are."""
    spec = SINGLE_KEY[name]
    block = (1,) * spec.rank
    plan = plan_attention(spec, block, order, Attention.LOCAL, block)
    assert plan.single_key and plan.blocks > 1
    model, weight, bias = build(spec, block, order, np.float32, Attention.LOCAL, block)
    onnx.checker.check_model(model, full_check=True)
    nodes = {n.name: n for n in model.graph.node}
    assert "Gather" not in {n.op_type for n in model.graph.node}
    assert "layer/attn/MatMul" not in nodes  # no product by the attention
    products = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert [n.name for n in products] == ["layer/attn/proj/MatMul"]
    fold = nodes["layer/attn/fold/Mul"]
    assert fold.input[0] == "layer/attn/W_O" and products[0].input[1] == fold.output[0]
    producers = {out: n for n in model.graph.node for out in n.output}
    chain, tensor = [], fold.input[1]  # the attention, reshaped (transposed, project first)
    while tensor in producers:
        chain.append(producers[tensor].name)
        tensor = producers[tensor].input[0]
    assert "layer/attn/Softmax" in chain
    x = np.random.default_rng(1).standard_normal((3, spec.in_channels, *spec.input_size))
    (got,) = session(model).run(None, {"x": x.astype(np.float32)})
    expected = direct_conv(x, weight, bias, spec)
    # float32 weights and inputs; each output is a sum of at most Cin*K unit-sized products
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max() + 1e-6


def test_blocks_with_several_keys_keep_their_own_products():
    plan = plan_attention(CASES["dense"], (1, 1), Order.ATTEND_FIRST, Attention.LOCAL, (1, 1))
    assert not plan.single_key  # nine heads, nine keys per block
    model, _, _ = build(
        CASES["dense"], (1, 1), Order.ATTEND_FIRST, np.float32, Attention.LOCAL, (1, 1)
    )
    assert "Gather" in {n.op_type for n in model.graph.node}


WIDE_BIAS = {
    # 2 x 6 output patches of 6 channels: 72 features a token, 110 tokens
    "dense-global": (CASES["dense"], (2, 6), Order.ATTEND_FIRST, Attention.GLOBAL, None),
    # wider tokens than ROWS_FIRST_FEATURES: the windows are gathered as they are
    "dense-local": (
        ConvSpec(6, 6, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (9, 10)),
        (1, 1),
        Order.ATTEND_FIRST,
        Attention.LOCAL,
        (1, 1),
    ),
    "depthwise-folded": (CASES["depthwise"], (1, 1), Order.ATTEND_FIRST, Attention.LOCAL, (1, 1)),
    "dense-project-first": (CASES["dense"], (1, 2), Order.PROJECT_FIRST, Attention.LOCAL, (1, 1)),
}


@pytest.mark.parametrize("case", WIDE_BIAS.values(), ids=WIDE_BIAS.keys())
def test_wide_bias_rows_add_the_same_numbers_over_rows_of_several_tokens(case):
    """The bias Add over k tokens side by side, with the bias repeated k times, computes the
    very same sums as token by token: the outputs are identical, and the Add's rows hold
    several tokens but at most WIDE_BIAS_ROW features."""
    spec, patch, order, attention, block = case
    per_token, weight, bias = build(spec, patch, order, np.float32, attention, block)
    wide, _, _ = build(spec, patch, order, np.float32, attention, block, wide_rows=True)
    onnx.checker.check_model(wide, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(wide)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    add = next(n for n in wide.graph.node if n.name == "layer/attn/proj/Add")
    row = shapes[add.output[0]].dim[-1].dim_value
    token = next(n for n in per_token.graph.node if n.name == "layer/attn/proj/Add")
    token_features = onnx.numpy_helper.to_array(
        next(i for i in per_token.graph.initializer if i.name == token.input[1])
    ).size
    assert token_features < row <= WIDE_BIAS_ROW and row % token_features == 0
    # the layer's bias initializer still holds one token's features (the PyTorch import
    # reads it); the row is tiled from it
    kept = {i.name: i for i in wide.graph.initializer}["layer/attn/bias"]
    assert onnx.numpy_helper.to_array(kept).size == token_features
    x = np.random.default_rng(2).standard_normal((3, spec.in_channels, *spec.input_size))
    x = x.astype(np.float32)
    (expected,) = session(per_token).run(None, {"x": x})
    (got,) = session(wide).run(None, {"x": x})
    np.testing.assert_array_equal(got, expected)
    reference = direct_conv(x, weight, bias, spec)
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max() + 1e-6


def assert_same_sums_reordered(model, baseline, weight, bias, spec):
    """``model`` computes what ``baseline`` does up to the order of its sums (1e-6 of the
    largest output: float32 rounding over a few dozen terms), and the Conv (the
    converter's parity bound)."""
    x = np.random.default_rng(2).standard_normal((3, spec.in_channels, *spec.input_size))
    x = x.astype(np.float32)
    (expected,) = session(baseline).run(None, {"x": x})
    (got,) = session(model).run(None, {"x": x})
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
    reference = direct_conv(x, weight, bias, spec)
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max() + 1e-6


SIDE_BY_SIDE = {
    # 90 one-pixel windows of 6 channels: 45 side by side, rows of 270
    "3x3": (ConvSpec(6, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (9, 10)), 1),
    "5x5-dilated": (ConvSpec(8, 8, 8, (5, 5), (1, 1), (2, 1), (4, 2), (4, 2), (7, 6)), 1),
    # 33, 33 and 34 windows a tile: two widths, each repeated weight built once
    "tiles": (ConvSpec(16, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (10, 10)), 3),
}


@pytest.mark.parametrize("case", SIDE_BY_SIDE.values(), ids=SIDE_BY_SIDE.keys())
def test_depthwise_windows_sum_their_taps_side_by_side(case):
    """With wide rows a folded depthwise plan on one-pixel tokens gathers k windows tap by
    tap, so the ReduceSum over the taps runs over rows of k windows' channels (at most
    WIDE_TAP_ROW): the same products and sums as window by window."""
    spec, tiles = case
    args = (spec, (1, 1), Order.ATTEND_FIRST, np.float32, Attention.LOCAL, (1, 1))
    per_window, weight, bias = build(*args, tiles=tiles)
    wide, _, _ = build(*args, wide_rows=True, tiles=tiles)
    onnx.checker.check_model(wide, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(wide)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    sums = [n for n in wide.graph.node if n.op_type == "ReduceSum"]
    assert len(sums) == tiles
    for node in sums:
        row = shapes[node.output[0]].dim[-1].dim_value
        assert spec.in_channels < row <= WIDE_TAP_ROW and row % spec.in_channels == 0
    repeated = [n.name for n in wide.graph.node if n.op_type == "Tile" and "side_by_side" in n.name]
    assert len(repeated) == (2 if tiles == 3 else 1)  # once per width, not per tile
    # each output sums the same taps' products, one rounding per add
    assert_same_sums_reordered(wide, per_window, weight, bias, spec)


@pytest.mark.parametrize(
    "spec",
    [
        ConvSpec(520, 520, 520, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (3, 3)),  # too wide
        ConvSpec(6, 12, 6, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (5, 5)),  # 2 outputs each
    ],
    ids=["wider-than-a-row", "multiplier"],
)
def test_depthwise_windows_stay_one_a_row_where_they_cannot_share_one(spec):
    args = (spec, (1, 1), Order.ATTEND_FIRST, np.float32, Attention.LOCAL, (1, 1))
    wide, _, _ = build(*args, wide_rows=True)
    assert not [n for n in wide.graph.node if "side_by_side" in n.name]


ROWS_FIRST = {
    # (spec, strided queries): RGB stems as torchvision has them, and narrower tokens
    "3x3-stride-2": (ConvSpec(3, 8, 1, (3, 3), (2, 2), (1, 1), (1, 0), (1, 1), (11, 12)), True),
    "7x7-stride-2": (ConvSpec(3, 6, 1, (7, 7), (2, 2), (1, 1), (3, 3), (3, 3), (16, 15)), True),
    "dilated-4-channels": (
        ConvSpec(4, 5, 1, (3, 2), (1, 1), (2, 1), (2, 0), (1, 1), (9, 10)),
        False,
    ),
    "strided-columns": (ConvSpec(2, 5, 1, (3, 3), (1, 2), (1, 1), (1, 1), (1, 1), (9, 10)), True),
}


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("case", ROWS_FIRST.values(), ids=ROWS_FIRST.keys())
def test_narrow_tokens_gather_their_window_rows_first(case, tiles):
    """With wide rows, a folded plan whose one-pixel tokens hold at most
    ROWS_FIRST_FEATURES features gathers each block row's window rows along the input's
    height first, then the windows' columns out of those: the window Gather copies runs
    of (channel, window row) features, and the layer computes the Conv."""
    spec, strided = case
    plan = plan_attention(
        spec, (1, 1), Order.ATTEND_FIRST, Attention.LOCAL, (1, 1), strided_queries=strided
    )
    assert plan.folds_heads and plan.in_dim <= ROWS_FIRST_FEATURES
    args = (spec, (1, 1), Order.ATTEND_FIRST, np.float32, Attention.LOCAL, (1, 1))
    kwargs = {"tiles": tiles, "strided_queries": strided}
    per_pixel, weight, bias = build(*args, **kwargs)
    rows_first, _, _ = build(*args, wide_rows=True, **kwargs)
    onnx.checker.check_model(rows_first, full_check=True)
    nodes = {n.name: n for n in rows_first.graph.node}
    assert "layer/attn/window_rows/Gather" in nodes
    assert not [name for name in nodes if "to_nhwc" in name]
    inferred = onnx.shape_inference.infer_shapes(rows_first)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    gathers = [
        n for n in rows_first.graph.node if n.op_type == "Gather" and "window_rows" not in n.name
    ]
    assert len(gathers) == tiles
    for gather in gathers:
        run = shapes[gather.output[0]].dim[-1].dim_value
        assert run == spec.in_channels * plan.axes[0].window
    # the same products, summed in another order by the MatMul
    assert_same_sums_reordered(rows_first, per_pixel, weight, bias, spec)


def test_wider_tokens_gather_their_windows_pixel_by_pixel():
    spec = ConvSpec(ROWS_FIRST_FEATURES + 1, 6, 1, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (9, 9))
    args = (spec, (1, 1), Order.ATTEND_FIRST, np.float32, Attention.LOCAL, (1, 1))
    model, _, _ = build(*args, wide_rows=True, strided_queries=True)
    names = [n.name for n in model.graph.node]
    assert "layer/attn/patchify/to_nhwc/Transpose" in names
    assert not [name for name in names if "window_rows" in name]
