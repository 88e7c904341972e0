"""Float64 numpy references: a direct N-D convolution and the attention construction.

Both are written from the definitions, independently of the emitted graph, so the
tests can check the weight construction exactly and the graph against them.
"""

from __future__ import annotations

import itertools

import numpy as np

from conv2attn.core.geometry import Attention, AttentionPlan, ConvSpec, Order
from conv2attn.core.weights import (
    attention_probabilities,
    output_bias,
    output_projection,
    window_indices,
)


def direct_conv(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, spec: ConvSpec
) -> np.ndarray:
    """ONNX Conv semantics in float64, by explicit summation over kernel taps."""
    x = x.astype(np.float64)
    weight = weight.astype(np.float64)
    batch = x.shape[0]
    rank = spec.rank
    padded = np.pad(x, [(0, 0), (0, 0), *zip(spec.pads_begin, spec.pads_end)], mode="constant")
    out_size = spec.output_size
    group = spec.group
    cg_in = spec.in_channels // group
    cg_out = spec.out_channels // group
    y = np.zeros((batch, spec.out_channels, *out_size), dtype=np.float64)
    for tap in itertools.product(*(range(k) for k in spec.kernel)):
        window = tuple(
            slice(d * t, d * t + s * (n - 1) + 1, s)
            for t, s, d, n in zip(tap, spec.strides, spec.dilations, out_size)
        )
        for k in range(group):
            xs = padded[(slice(None), slice(k * cg_in, (k + 1) * cg_in), *window)]
            ws = weight[(slice(k * cg_out, (k + 1) * cg_out), slice(None), *tap)]
            y[:, k * cg_out : (k + 1) * cg_out] += np.einsum("bc...,oc->bo...", xs, ws)
    if bias is not None:
        y += bias.astype(np.float64).reshape(1, -1, *([1] * rank))
    return y


def attention_conv(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, plan: AttentionPlan
) -> np.ndarray:
    """The construction of sections 1-3 in float64: patchify, attend, project, un-patchify."""
    spec = plan.spec
    rank = spec.rank
    x = x.astype(np.float64)
    batch = x.shape[0]
    group = spec.group
    if plan.subsamples:  # every s-th padded row along kernel-1 axes
        source, steps = plan.source, plan.input_steps
        pads = [
            (pb, pe) if s > 1 else (0, 0)
            for pb, pe, s in zip(source.pads_begin, source.pads_end, steps)
        ]
        x = np.pad(x, [(0, 0), (0, 0), *pads])
        x = x[(slice(None), slice(None), *(slice(0, None, s) for s in steps))]
        x = x[(slice(None), slice(None), *(slice(0, n) for n in spec.input_size))]
    # Pad (or crop) to the token grid.
    for axis, a in enumerate(plan.axes):
        dim = 2 + axis
        if a.pad_end < 0:
            x = np.take(x, np.arange(x.shape[dim] + a.pad_end), axis=dim)
    pad = [(0, 0), (0, 0)] + [(a.pad_begin, max(a.pad_end, 0)) for a in plan.axes]
    x = np.pad(x, pad)
    # [B, g, Cg, T1, P1, T2, P2, ..] -> tokens [B, g, N, Dg_in], features (y, x, .., c) when
    # channels-last, else (c, y, x, ..)
    split = [batch, group, spec.in_channels // group]
    for a in plan.axes:
        split += [a.tokens, a.in_patch]
    x = x.reshape(split)
    token_axes = [3 + 2 * i for i in range(rank)]
    pixel_axes = [4 + 2 * i for i in range(rank)]
    feature_axes = [*pixel_axes, 2] if plan.channels_last else [2, *pixel_axes]
    tokens = x.transpose([0, 1, *token_axes, *feature_axes])
    tokens = tokens.reshape(batch, group, plan.tokens, plan.group_in_dim)

    probs = attention_probabilities(plan)  # [queries, heads, keys] of one block
    projection = output_projection(plan, weight.astype(np.float64))
    if plan.attention is Attention.LOCAL:
        keys = tokens[:, :, window_indices(plan)]  # [B, g, blocks, window, Dg_in]
    else:
        keys = tokens[:, :, None]  # one block whose window is every token
    if plan.order is Order.ATTEND_FIRST:
        attended = np.einsum("qhk,bgnkd->bgnqhd", probs, keys)
        if plan.narrows_values:
            attended = _narrowed(plan, attended)
        else:
            attended = attended.reshape(*attended.shape[:4], plan.heads * plan.group_in_dim)
        out = attended @ projection[:, None]
    else:
        projected = (keys @ projection[:, None]).reshape(
            *keys.shape[:4], plan.heads, plan.group_out_dim
        )
        out = np.einsum("qhk,bgnkhd->bgnqd", probs, projected)
    out = out + output_bias(plan, bias, np.float64)[:, None]
    # [B, g, nb1, nb2, .., b1, b2, .., (Cg_out, p1, p2, .. | p1, p2, .., Cg_out)]
    #   -> [B, g, Cg_out, nb1, b1, p1, nb2, b2, p2, ..] -> [B, C_out, *(nb*b*p)] -> crop
    blocks = [a.blocks for a in plan.axes]
    cg_out = spec.out_channels // group
    features = [*plan.patch, cg_out] if plan.channels_last else [cg_out, *plan.patch]
    out = out.reshape([batch, group, *blocks, *plan.block, *features])
    channel = 2 + 3 * rank if plan.channels_last else 2 + 2 * rank
    first_pixel = 2 + 2 * rank if plan.channels_last else 3 + 2 * rank
    perm = [
        0,
        1,
        channel,
        *itertools.chain.from_iterable((2 + i, 2 + rank + i, first_pixel + i) for i in range(rank)),
    ]
    out = out.transpose(perm).reshape(
        batch, spec.out_channels, *(a.queries * a.patch for a in plan.axes)
    )
    crop = tuple(slice(0, a.output) for a in plan.axes)
    return out[(slice(None), slice(None), *crop)]


def _narrowed(plan, attended: np.ndarray) -> np.ndarray:
    """[.., q, heads, Dg_in] -> [.., q, value_dim]: each head's features for the pixels of
    its key it reads (``AttentionPlan.value_spans``), heads in order."""
    channels = plan.spec.in_channels // plan.spec.group
    lead = attended.shape[:-2]
    parts = []
    for head, spans in enumerate(plan.value_spans):
        features = attended[..., head, :]
        if plan.channels_last:
            pixels = features.reshape(*lead, *plan.in_patch, channels)
            window = tuple(slice(start, stop) for start, stop in spans)
            kept = pixels[(Ellipsis, *window, slice(None))]
        else:
            pixels = features.reshape(*lead, channels, *plan.in_patch)
            kept = pixels[(Ellipsis, *(slice(start, stop) for start, stop in spans))]
        parts.append(kept.reshape(*lead, -1))
    return np.concatenate(parts, axis=-1)
