"""Weight construction (sections 2-3) in numpy, exact in float64 against a direct Conv."""

import numpy as np
import pytest

from conv2attn.core.geometry import Attention, ConvSpec, Grid, Order, plan_attention
from conv2attn.core.weights import (
    attention_probabilities,
    output_bias,
    output_projection,
    relative_position_range,
    relative_positions,
)
from tests.reference import attention_conv, direct_conv

# (in, out, group, kernel, stride, dilation, pads_begin, pads_end, size, patch)
CONFIGS = [
    (3, 4, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (8, 9), (2, 2)),
    (3, 4, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (8, 9), (1, 1)),
    (3, 4, 1, (7, 7), (2, 2), (1, 1), (3, 3), (3, 3), (16, 16), (4, 4)),
    (4, 6, 2, (3, 2), (2, 1), (1, 1), (0, 1), (2, 0), (9, 7), (2, 3)),
    (4, 4, 4, (3, 3), (1, 1), (2, 2), (2, 2), (2, 2), (10, 10), (3, 3)),
    (2, 3, 1, (1, 1), (3, 3), (1, 1), (0, 0), (0, 0), (10, 11), (2, 1)),
    (2, 3, 1, (2, 2), (4, 4), (1, 1), (1, 0), (0, 1), (13, 13), (1, 2)),
    (2, 3, 1, (1, 3), (3, 2), (1, 1), (2, 1), (1, 0), (11, 10), (2, 2)),  # subsampled rows
    (2, 2, 1, (5,), (2,), (2,), (3,), (1,), (17,), (3,)),
    (2, 3, 1, (3, 3, 3), (1, 2, 1), (1, 1, 2), (1, 1, 2), (1, 0, 2), (5, 6, 7), (2, 1, 2)),
]


ATTENTION = {
    "global": (Attention.GLOBAL, None),
    "local-block-1": (Attention.LOCAL, 1),
    "local-block-2": (Attention.LOCAL, 2),
    "local-block-3": (Attention.LOCAL, 3),
}


def config_plan(config, attention, order, grid=Grid.SHIFTED):
    cin, cout, group, kernel, stride, dilation, pb, pe, size, patch = config
    spec = ConvSpec(cin, cout, group, kernel, stride, dilation, pb, pe, size)
    mode, block = attention
    blocks = None if block is None else (block,) * spec.rank
    return spec, plan_attention(spec, patch, order, mode, blocks, grid)


@pytest.mark.parametrize("attention", ATTENTION.values(), ids=ATTENTION.keys())
@pytest.mark.parametrize("order", list(Order))
@pytest.mark.parametrize("config", CONFIGS)
def test_construction_equals_direct_conv_float64(config, order, attention):
    cin, cout, group, kernel, _, _, _, _, size, _ = config
    spec, plan = config_plan(config, attention, order)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cin, *size))
    w = rng.standard_normal((cout, cin // group, *kernel))
    b = rng.standard_normal(cout)
    expected = direct_conv(x, w, b, spec)
    got = attention_conv(x, w, b, plan)
    assert got.shape == expected.shape
    # Float64 rounding of sums of at most Cin*K products of unit normals.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_attention_is_one_hot_at_the_head_offset():
    spec = ConvSpec(1, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (6, 6))
    plan = plan_attention(spec, (2, 2))
    probs = attention_probabilities(plan)  # [queries, heads, tokens]
    t_h, t_w = plan.token_grid
    _, g_w = plan.query_grid
    checked = 0
    for query in range(plan.queries):
        r, c = divmod(query, g_w)
        for head, (a, b) in enumerate(plan.head_offsets):
            if r + a < t_h and c + b < t_w:
                key = (r + a) * t_w + (c + b)
                assert probs[query, head, key] == 1.0
                others = np.delete(probs[query, head], key)
                assert others.max() < 1e-80  # exp(-ALPHA) in float64; exactly 0 in float32
                checked += 1
    assert checked == plan.queries * plan.heads  # every kept query finds its key


def test_projection_entries_are_copies_of_the_conv_weights():
    spec = ConvSpec(4, 6, 2, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (9, 9))
    plan = plan_attention(spec, (2, 2))
    w = np.random.default_rng(0).standard_normal((6, 2, 3, 3)).astype(np.float32)
    projection = output_projection(plan, w)
    assert projection.dtype == np.float32
    assert projection.shape == (2, plan.heads * plan.group_in_dim, plan.group_out_dim)
    nonzero = projection[projection != 0]
    assert set(nonzero.tolist()) <= set(w.ravel().tolist())
    # Every weight is used once per output pixel of a patch.
    assert nonzero.size == w.size * 4


def test_grouped_projection_stores_no_zero_blocks():
    spec = ConvSpec(32, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (8, 8))
    plan = plan_attention(spec, (2, 2))
    projection = output_projection(plan, np.ones((32, 1, 3, 3), dtype=np.float32))
    # heads * (1 channel * 2x2 input patch) rows per group; dense would be (4 * 128, 128)
    assert projection.shape == (32, 4 * 4, 4)


def test_bias_repeats_over_the_output_patch_in_the_token_layout():
    grouped = ConvSpec(4, 4, 2, (1, 1), (1, 1), (1, 1), (0, 0), (0, 0), (4, 4))
    plan = plan_attention(grouped, (1, 2))
    assert not plan.channels_last  # two input channels per group: channel-major (co, u, v)
    bias = output_bias(plan, np.array([1, 2, 3, 4], dtype=np.float32), np.float16)
    assert bias.dtype == np.float16
    assert bias.tolist() == [[[1, 1, 2, 2]], [[3, 3, 4, 4]]]
    dense = ConvSpec(2, 2, 1, (1, 1), (1, 1), (1, 1), (0, 0), (0, 0), (4, 4))
    plan = plan_attention(dense, (1, 2))
    assert plan.channels_last  # (u, v, co)
    assert output_bias(plan, np.array([1, 2], np.float32), np.float32).tolist() == [[[1, 2, 1, 2]]]


def test_weight_shape_mismatch_is_refused():
    spec = ConvSpec(2, 2, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (4, 4))
    with pytest.raises(ValueError, match="expected"):
        output_projection(plan_attention(spec, (1, 1)), np.zeros((2, 2, 3, 2)))


@pytest.mark.parametrize("grid", list(Grid))
@pytest.mark.parametrize("attention", ATTENTION.values(), ids=ATTENTION.keys())
@pytest.mark.parametrize("config", CONFIGS)
def test_relative_position_range_is_the_tables_without_building_it(config, attention, grid):
    _, plan = config_plan(config, attention, Order.ATTEND_FIRST, grid)
    table = relative_positions(plan)
    lows, spans = relative_position_range(plan)
    assert lows == [int(d.min()) for d in table]
    assert spans == [int(d.max()) - int(d.min()) + 1 for d in table]
