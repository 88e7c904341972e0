"""Geometry and cost model (docs/design.md sections 1 and 4): pure Python, no onnx."""

import pytest

from conv2attn.core.geometry import (
    BLOCK_PRODUCT_MACS,
    TRAFFIC_COST,
    Attention,
    AutoPad,
    ConvSpec,
    GeometryError,
    Order,
    candidate_plans,
    choose_plans,
    plan_attention,
    resolve_pads,
)


def spec(kernel, stride, size=56, cin=64, cout=64, group=1, dilation=1, pad=None):
    pad = kernel // 2 if pad is None else pad
    return ConvSpec(
        cin,
        cout,
        group,
        (kernel, kernel),
        (stride, stride),
        (dilation, dilation),
        (pad, pad),
        (pad, pad),
        (size, size),
    )


# The head-count table of section 1.
@pytest.mark.parametrize(
    ("kernel", "stride", "patch", "heads"),
    [
        (3, 1, 1, 9),
        (3, 1, 2, 4),
        (3, 1, 4, 4),
        (3, 1, 7, 4),
        (7, 2, 2, 9),
        (7, 2, 4, 4),
        (1, 1, 1, 1),
        (1, 2, 3, 1),
        (1, 4, 2, 1),
        (3, 2, 1, 4),
    ],
)
def test_head_count_matches_design_table(kernel, stride, patch, heads):
    plan = plan_attention(spec(kernel, stride, size=224), (patch, patch))
    assert plan.heads == heads
    assert len(plan.head_offsets) == heads


def test_worked_example_resnet18_layer1():
    plan = plan_attention(spec(3, 1), (2, 2))
    assert (plan.in_patch, plan.reach, plan.token_grid) == ((2, 2), (1, 1), (29, 29))
    assert plan.tokens == 841
    assert (plan.in_dim, plan.out_dim) == (256, 256)
    # docs/design.md section 1 counts all 841 tokens as queries (724.3 M + 220.5 M); the 57 tokens
    # of the halo row and column are only cropped, so just the 784 kept ones are computed.
    assert plan.queries == 28 * 28
    assert plan.attention_macs == 4 * 784 * 841 * 256  # 675.2 M
    assert plan.projection_macs == 4 * 784 * 256 * 256  # 205.5 M
    assert plan.spec.macs == 115_605_504

    patch1 = plan_attention(spec(3, 1), (1, 1))
    assert (patch1.reach, patch1.heads, patch1.tokens) == ((2, 2), 9, 58 * 58)


def test_worked_example_resnet18_stem():
    plan = plan_attention(spec(7, 2, size=224, cin=3, pad=3), (4, 4))
    assert plan.in_patch == (8, 8)
    assert plan.spec.output_size == (112, 112)
    assert plan.axes[0].grid == 28
    assert plan.reach == (1, 1)
    assert plan.heads == 4 and plan.tokens == 841
    assert plan.in_dim == 3 * 64 and plan.out_dim == 64 * 16


def test_rectangular_and_nd_heads_multiply_per_axis():
    rect = ConvSpec(2, 2, 1, (3, 1), (1, 1), (1, 1), (1, 0), (1, 0), (10, 10))
    assert plan_attention(rect, (2, 3)).heads == 2  # R = (1, 0)
    cube = ConvSpec(2, 2, 1, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1,) * 3, (1,) * 3, (6, 6, 6))
    assert plan_attention(cube, (2, 2, 2)).heads == 8
    line = ConvSpec(2, 2, 1, (5,), (1,), (2,), (4,), (4,), (20,))
    assert plan_attention(line, (1,)).heads == 9


def test_token_grid_covers_every_read_row():
    """T * P is enough for every output read, and the end pad may be negative (a crop)."""
    s = ConvSpec(1, 1, 1, (3, 3), (2, 2), (1, 1), (0, 0), (0, 0), (8, 8))  # last row unread
    plan = plan_attention(s, (1, 1))
    axis = plan.axes[0]
    last_read = (s.output_size[0] - 1) * 2 + 2
    assert axis.tokens_extent >= last_read + 1
    assert axis.pad_end == axis.tokens_extent - 8


@pytest.mark.parametrize(
    ("mode", "begin", "end"),
    [
        (AutoPad.SAME_UPPER, (1, 0), (2, 1)),
        (AutoPad.SAME_LOWER, (2, 1), (1, 0)),
        (AutoPad.VALID, (0, 0), (0, 0)),
    ],
)
def test_auto_pad(mode, begin, end):
    # input 7x7, kernel 4x2, stride 1x2: outputs 7 and 4, total pads 6+4-7 = 3 and 6+2-7 = 1
    assert resolve_pads(mode, (7, 7), (4, 2), (1, 2), (1, 1), None) == (begin, end)


def test_explicit_pads_split_begin_end():
    assert resolve_pads("NOTSET", (5, 5), (3, 3), (1, 1), (1, 1), [1, 2, 3, 4]) == ((1, 2), (3, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stride": 0}, "strides"),
        ({"kernel": 9, "size": 4, "pad": 0}, "larger than the padded input"),
        ({"group": 3}, "group 3 must divide"),
        ({"pad": -1}, "must not be negative"),
    ],
)
def test_invalid_conv_is_refused_with_reason(kwargs, message):
    kernel = kwargs.pop("kernel", 3)
    stride = kwargs.pop("stride", 1)
    with pytest.raises(GeometryError, match=message):
        plan_attention(spec(kernel, stride, **kwargs), (1, 1))


def test_cost_formulas_of_both_orders():
    s = spec(3, 1, size=14, cin=8, cout=16, group=2)
    first = plan_attention(s, (2, 2), Order.ATTEND_FIRST)
    second = plan_attention(s, (2, 2), Order.PROJECT_FIRST)
    n, q, h = first.tokens, first.queries, first.heads
    assert (n, q, h) == (8 * 8, 7 * 7, 4)
    per_token = h * (8 // 2 * 4) * (16 // 2 * 4) * 2  # grouped: g blocks of Dg_in x Dg_out
    # attend first: queries attend to all tokens, then the queries are projected
    assert first.macs == h * q * n * 8 * 4 + q * per_token
    # project first: every token is projected (they are all keys), then attended
    assert second.macs == h * q * n * 16 * 4 + n * per_token
    assert first.params == second.params == h * (4 * 4) * (8 * 4) * 2


def test_candidates_cover_rectangles_and_both_orders():
    plans = candidate_plans(spec(3, 1, size=6))
    patches = {p.patch for p in plans}
    assert (2, 5) in patches and (6, 1) in patches and (7, 1) not in patches
    assert {p.order for p in plans} == set(Order)


def test_choice_respects_whole_model_parameter_budget():
    layers = [candidate_plans(spec(3, 1, size=28, cin=32, cout=32)) for _ in range(3)]
    original = 3 * layers[0][0].spec.params
    unconstrained, met = choose_plans(layers, original, max_param_growth=1e9)
    assert met
    tight, met = choose_plans(layers, original, max_param_growth=1.0)
    assert met
    assert sum(p.params for p in tight) <= original
    assert sum(p.macs for p in tight) >= sum(p.macs for p in unconstrained)
    # A 3x3 stride-2 Conv on 2x2-pixel tokens has 4 heads, whose values a global plan
    # narrows to the pixels they read: 2 + 1 per axis, 9 in all, the Conv's parameters.
    strided = [candidate_plans(spec(3, 2, size=28))]
    conv_params = strided[0][0].spec.params
    plans, met = choose_plans(strided, conv_params, max_param_growth=1.0)
    assert met and plans[0].params == conv_params and plans[0].narrows_values
    # With whole heads (an explicit attention) it cannot stay at 1x: reported unmet.
    whole = [candidate_plans(spec(3, 2, size=28), fold_heads=False)]
    plans, met = choose_plans(whole, conv_params, max_param_growth=1.0)
    assert not met and plans[0].params == min(p.params for p in whole[0])


def test_kernel_1_axes_subsample_instead_of_reading_whole_patches():
    downsample = spec(1, 2, size=56, cin=64, cout=128, pad=0)
    plan = plan_attention(downsample, (1, 1))
    assert plan.input_steps == (2, 2) and plan.spec.strides == (1, 1)
    assert plan.spec.input_size == (28, 28) and plan.in_patch == (1, 1)
    assert plan.params == downsample.params  # no weights for pixels the Conv never reads
    mixed = ConvSpec(4, 4, 1, (1, 3), (3, 2), (1, 1), (1, 1), (2, 1), (10, 9))
    plan = plan_attention(mixed, (1, 1))
    assert plan.input_steps == (3, 1)
    assert plan.spec.input_size == (mixed.output_size[0], 9)
    assert plan.spec.pads_begin == (0, 1) and plan.spec.output_size == mixed.output_size


def test_single_key_plans_pay_no_gather_and_no_per_block_calls():
    """A kernel-1 Conv under local attention with one-token blocks: the cost is the
    projection and the layout, nothing per block and no attention product (its attention,
    exactly 1, multiplies W_O at load time: ``emit._single_key``)."""
    spec = ConvSpec(64, 64, 1, (1, 1), (1, 1), (1, 1), (0, 0), (0, 0), (56, 56))
    single = plan_attention(spec, (1, 1), Order.ATTEND_FIRST, Attention.LOCAL, (1, 1))
    assert single.single_key and single.attention_macs > 0
    assert single.cost == single.projection_macs + TRAFFIC_COST * single.moved
    three = ConvSpec(64, 64, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (56, 56))
    blocked = plan_attention(three, (1, 1), Order.ATTEND_FIRST, Attention.LOCAL, (1, 2))
    assert not blocked.single_key
    assert blocked.cost >= blocked.macs + TRAFFIC_COST * blocked.moved + (
        blocked.blocks * BLOCK_PRODUCT_MACS
    )


def test_the_plan_cache_keeps_small_models_and_drops_large_ones():
    """Candidates are cached so a repeated Conv (or model) is planned once, but a large
    model's thousands of plans (about 15 kB each) must not outlive its planning."""
    from conv2attn.core import geometry
    from conv2attn.core.planning import plan_layers

    geometry.trim_plan_cache(0)
    spec = ConvSpec(8, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (12, 12))
    plan_layers([spec], ["c"], attention="auto")
    hits = geometry._candidates.cache_info().hits
    plan_layers([spec], ["c"], attention="auto")
    assert geometry._candidates.cache_info().hits > hits  # planned once
    sizes = range(40, 72)  # distinct Convs, each with its own candidates
    specs = [ConvSpec(8, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (n, n)) for n in sizes]
    plan_layers(specs, [f"c{n}" for n in sizes], attention="auto")
    assert geometry._cached_plans <= geometry.CACHED_PLANS_LIMIT
    assert geometry._candidates.cache_info().currsize == 0


def test_global_heads_hold_only_the_key_pixels_they_read():
    """resnet18's 7x7 stride-2 stem on 8x8-pixel tokens (patch 4): an output patch reads 13
    pixels per axis, 8 of its own token and 5 of the next, so its four heads hold 8x8,
    8x5, 5x8 and 5x5 pixels: 169 of 256 per channel, and the product, the projection and
    W_O shrink alike."""
    stem = spec(7, 2, size=224, cin=3)
    narrowed = plan_attention(stem, (4, 4))
    whole = plan_attention(stem, (4, 4), narrow_values=False)
    assert narrowed.narrows_values and not whole.narrows_values
    assert narrowed.value_spans == (
        ((0, 8), (0, 8)),
        ((0, 8), (0, 5)),
        ((0, 5), (0, 8)),
        ((0, 5), (0, 5)),
    )
    assert narrowed.head_in_dims == (192, 120, 120, 75)
    assert whole.head_in_dims == (192,) * 4 and whole.value_dim == 4 * whole.in_dim
    for figure in ("attention_macs", "projection_macs", "params"):
        assert getattr(narrowed, figure) * 256 == getattr(whole, figure) * 169, figure


def test_only_global_attend_first_plans_with_partly_read_keys_narrow():
    stem = spec(7, 2, size=224, cin=3)
    assert not plan_attention(stem, (4, 4), Order.PROJECT_FIRST).narrows_values
    assert not plan_attention(stem, (4, 4), attention=Attention.LOCAL, block=(2, 2)).narrows_values
    # one-pixel tokens of a stride-1 Conv: each head reads its whole key
    assert not plan_attention(spec(3, 1), (1, 1)).narrows_values
    assert not plan_attention(spec(3, 1, group=4), (2, 2)).narrows_values  # grouped
    # the explicit attention of the standard form and integer Convs keeps whole heads
    explicit = candidate_plans(stem, fold_heads=False)
    assert explicit and not any(plan.narrows_values for plan in explicit)
    assert any(plan.narrows_values for plan in candidate_plans(stem))
    # the GPU form (--no-tiles) keeps them whole too, and still folds local heads
    whole = candidate_plans(stem, narrow_values=False)
    assert whole and not any(plan.narrows_values for plan in whole)
    local = candidate_plans(stem, Attention.LOCAL, narrow_values=False)
    assert any(plan.folds_heads for plan in local)


def test_a_head_between_dilated_taps_holds_nothing():
    """A 2-tap kernel with dilation 2 on one-pixel tokens reads keys 0 and 2 of its three
    head offsets along that axis: the middle head has no pixels, no product and no rows."""
    dilated = ConvSpec(1, 1, 1, (2, 1), (1, 1), (2, 1), (0, 0), (2, 0), (5, 5))
    plan = plan_attention(dilated, (1, 1))
    assert plan.heads == 3 and plan.narrows_values
    assert plan.head_in_dims == (1, 0, 1)
    assert plan.params == dilated.params == 2
