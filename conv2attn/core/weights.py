"""Weights of the attention that reproduces a Conv, in numpy (``docs/design.md`` sections 2-3).

Layouts, shared with the emitted graph:

- a token is one input patch. Ungrouped Convs flatten it channels-last, feature
  ``(y, x, c)``, so that patchify is an NCHW->NHWC transpose plus moves of whole pixel
  rows; grouped Convs flatten it channel-major, feature ``(c, y, x)`` of group ``k``
  holding input channel ``k * Cg + c`` (``AttentionPlan.channels_last`` tells which);
- heads are ordered as ``AttentionPlan.head_offsets`` (row-major over the offsets);
- an output token is one output patch, flattened ``(u, v, co)`` or ``(co, u, v)`` alike.

The attention itself has no weights: W_Q = W_K = 0 and W_V = I, and the relative
positional logits are built from the coordinate vectors returned here.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from conv2attn.core.geometry import Attention, AttentionPlan, Order

# exp(-ALPHA) underflows to exactly 0 in float32 and float16, so softmax is one-hot
# (section 2); logits are kept in float32 where ALPHA times any squared distance is finite.
ALPHA = 200.0
# The trainable layer (conv2attn.torch) needs gradients through the softmax, which a
# one-hot softmax does not pass. At alpha 24 a neighbour at distance 1 gets weight
# exp(-24) = 3.8e-11: far below float32 rounding of the output (2^-24 = 6e-8 relative,
# four such neighbours per axis pair at most), yet a non-zero gradient.
TRAINABLE_ALPHA = 24.0


def _axis_entries(
    kernel: int, stride: int, dilation: int, patch: int, in_patch: int, phase: int = 0
) -> list[tuple[int, int, int, int]]:
    """(a, y, u, k) along one axis: output pixel u of a patch reads, through kernel tap k,
    input pixel y of the patch at offset +a, where
    phase + u * stride + dilation * k == a * in_patch + y (section 3; the phase is the
    fixed grid's, section 8; with strided queries the patch is 1 and the input patch one
    pixel, so a == dilation * k). Distinct taps of one output pixel read distinct pixels."""
    return [
        (*divmod(phase + u * stride + dilation * k, in_patch), u, k)
        for u in range(patch)
        for k in range(kernel)
    ]


def output_projection(
    plan: AttentionPlan, weight: np.ndarray, channels_last: bool | None = None
) -> np.ndarray:
    """W_O for ``plan.order``, one matrix per group, in the Conv weight's dtype; token
    features as ``plan.channels_last`` says unless ``channels_last`` overrides it.

    Attend-first: ``[g, heads * Dg_in, Dg_out]``, rows ``(head, c, y..)``.
    Project-first: ``[g, Dg_in, heads * Dg_out]``, columns ``(head, co, u..)``.
    Each entry is a copy of one Conv weight or zero, so the construction is exact.
    """
    spec = plan.spec
    group = spec.group
    cg_out = spec.out_channels // group
    cg_in = spec.in_channels // group
    expected = (spec.out_channels, cg_in, *spec.kernel)
    if tuple(weight.shape) != expected:
        raise ValueError(f"Conv weight has shape {list(weight.shape)}, expected {list(expected)}")
    if channels_last is None:
        channels_last = plan.channels_last

    # [g, Cg_in, Cg_out, k1, ..]: one [g, Cg_in, Cg_out] block per kernel tap.
    w = weight.reshape(group, cg_out, cg_in, *spec.kernel).swapaxes(1, 2)
    offsets = [a.reach + 1 for a in plan.axes]
    in_patch = list(plan.in_patch)
    patch = list(plan.patch)
    if channels_last:  # rows (head, y.., c), columns (u.., co)
        shape = [group, *offsets, *in_patch, cg_in, *patch, cg_out]
    else:  # rows (head, c, y..), columns (co, u..)
        shape = [group, *offsets, cg_in, *in_patch, cg_out, *patch]
    projection = np.zeros(shape, dtype=weight.dtype)
    every = slice(None)
    per_axis = [
        _axis_entries(k, s, d, a.patch, a.in_patch, a.phase)
        for k, s, d, a in zip(spec.kernel, spec.strides, spec.dilations, plan.axes)
    ]
    # Each entry is written once (one tap per input pixel of an output pixel), so the
    # values are copies of the weights: exact in any dtype.
    for entry in itertools.product(*per_axis):
        a, y, u, k = ([axis[i] for axis in entry] for i in range(4))
        if channels_last:
            where = (every, *a, *y, every, *u, every)
        else:
            where = (every, *a, every, *y, every, *u)
        projection[where] = w[(every, every, every, *k)]
    if plan.narrows_values:
        return _narrowed_rows(plan, projection, channels_last)
    projection = projection.reshape(group, plan.heads * plan.group_in_dim, plan.group_out_dim)
    if plan.order is Order.PROJECT_FIRST:
        projection = (
            projection.reshape(group, plan.heads, plan.group_in_dim, plan.group_out_dim)
            .transpose(0, 2, 1, 3)
            .reshape(group, plan.group_in_dim, plan.heads * plan.group_out_dim)
        )
    return np.ascontiguousarray(projection)


def _narrowed_rows(plan: AttentionPlan, projection: np.ndarray, channels_last: bool) -> np.ndarray:
    """W_O ``[g, value_dim, Dg_out]`` of a plan that narrows its values
    (``AttentionPlan.narrows_values``): each head's rows for the pixels it reads, heads in
    order. ``projection`` is W_O split as ``output_projection`` fills it; the rows left
    out are zero there, as no output pixel reads those pixels through that head."""
    group = plan.spec.group
    first = 1 if channels_last else 2  # one head: [g, (c,) P1, P2, ..]
    rows = []
    for offset, spans in zip(plan.head_offsets, plan.value_spans, strict=True):
        head = projection[(slice(None), *offset)]
        window = [slice(None)] * head.ndim
        for axis, (start, stop) in enumerate(spans):
            window[first + axis] = slice(start, stop)
        rows.append(head[tuple(window)].reshape(group, -1, plan.group_out_dim))
    return np.ascontiguousarray(np.concatenate(rows, axis=1))


def emitted_channels_last(plan: AttentionPlan, dynamic: bool) -> bool:
    """Whether the graph emitted for ``plan`` holds channels-last tokens and W_O
    (``output_projection``). Static sizes: as the plan says. Dynamic sizes: one general
    channel-major layout per group, except a depthwise plan that folds its heads, whose
    gathered windows must hold whole pixels (every channel of a key) to be read fast."""
    if not dynamic:
        return plan.channels_last
    return plan.depthwise and plan.folds_heads


def depthwise_layout(plan: AttentionPlan, projection: np.ndarray) -> np.ndarray:
    """A depthwise Conv's W_O as the emitted per-channel product reads it: per channel
    ``[C, heads * P, p * m]`` stored as ``[heads * P, p, C, m]`` (``emit``)."""
    spec = plan.spec
    channels, multiplier = spec.in_channels, spec.out_channels // spec.group
    taps = plan.heads * math.prod(plan.in_patch)
    pixels = math.prod(plan.patch)
    return projection.reshape(channels, taps, pixels, multiplier).transpose(1, 2, 0, 3)


def depthwise_bias_layout(plan: AttentionPlan, bias: np.ndarray) -> np.ndarray:
    """A depthwise Conv's bias per (p, m) of each channel as (p, C, m): the channels-last
    output features of ``depthwise_layout``."""
    spec = plan.spec
    pixels = math.prod(plan.patch)
    multiplier = spec.out_channels // spec.group
    return bias.reshape(spec.in_channels, pixels, multiplier).transpose(1, 0, 2).reshape(-1)


def output_bias(
    plan: AttentionPlan,
    bias: np.ndarray | None,
    dtype: np.dtype,
    channels_last: bool | None = None,
) -> np.ndarray:
    """The Conv bias repeated over every pixel of an output patch: ``[g, 1, Dg_out]``."""
    spec = plan.spec
    values = (
        np.zeros(spec.out_channels, dtype=np.float64) if bias is None else bias.astype(np.float64)
    )
    if values.shape != (spec.out_channels,):
        raise ValueError(
            f"Conv bias has shape {list(values.shape)}, expected [{spec.out_channels}]"
        )
    pixels = int(np.prod(plan.patch))
    cg_out = spec.out_channels // spec.group
    if plan.channels_last if channels_last is None else channels_last:  # (u, v, co)
        repeated = np.broadcast_to(
            values.reshape(spec.group, 1, 1, cg_out), (spec.group, 1, pixels, cg_out)
        )
    else:  # (co, u, v)
        repeated = np.broadcast_to(
            values.reshape(spec.group, 1, cg_out, 1), (spec.group, 1, cg_out, pixels)
        )
    return np.ascontiguousarray(repeated.reshape(spec.group, 1, plan.group_out_dim).astype(dtype))


def _grid_coordinates(grid: tuple[int, ...]) -> list[np.ndarray]:
    mesh = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")
    return [m.reshape(-1).astype(np.float32) for m in mesh]


def query_coordinates(plan: AttentionPlan) -> list[np.ndarray]:
    """Per axis, the grid position of every query of the attention pattern, as float32.

    Global: the kept query tokens. Local: the tokens of one block, which share one pattern
    (with strided queries, every ``step``-th token from the block's first).
    """
    if plan.attention is Attention.GLOBAL:
        return _grid_coordinates(plan.query_grid)
    return [c * step for c, step in zip(_grid_coordinates(plan.block), plan.query_steps)]


def key_coordinates(plan: AttentionPlan) -> list[np.ndarray]:
    """Per axis, the grid position of every key: all tokens, or one block's window."""
    grid = plan.token_grid if plan.attention is Attention.GLOBAL else plan.window_grid
    return _grid_coordinates(grid)


def head_offset_coordinates(plan: AttentionPlan) -> list[np.ndarray]:
    """Per spatial axis, the key offset of every head, as float32."""
    offsets = np.array(plan.head_offsets, dtype=np.float32).reshape(plan.heads, plan.spec.rank)
    return [offsets[:, axis].copy() for axis in range(plan.spec.rank)]


def window_indices(plan: AttentionPlan) -> np.ndarray:
    """``[blocks, keys]`` row-major token indices of each block's keys: its window (local
    attention) or every token (global attention, one block)."""
    return _block_indices(plan, [np.arange(a.window) for a in plan.axes])


def query_indices(plan: AttentionPlan) -> np.ndarray:
    """``[blocks, block queries]`` row-major token indices of each block's queries (global
    attention: one block holding the whole query grid)."""
    return _block_indices(plan, [np.arange(a.block) * a.step for a in plan.axes])


def window_coordinates(plan: AttentionPlan) -> list[np.ndarray]:
    """Per axis, ``[blocks along the axis, window]``: the token coordinates along it of
    each block's keys. ``window_indices`` is their row-major combination: block ``(i, j)``
    reads the tokens ``(rows[i, a], columns[j, b])``, key ``a * window + b``."""
    return _per_axis(plan, [np.arange(a.window) for a in plan.axes])


def _per_axis(plan: AttentionPlan, within: list[np.ndarray]) -> list[np.ndarray]:
    """``within[axis]``: token offsets from a block's first token along each axis; the
    coordinates ``[blocks along the axis, extent]`` they give."""
    return [
        (np.arange(a.blocks) * a.block * a.step)[:, None] + offsets[None, :]
        for a, offsets in zip(plan.axes, within)
    ]


def _block_indices(plan: AttentionPlan, within: list[np.ndarray]) -> np.ndarray:
    """``within[axis]``: token offsets from a block's first token along each axis."""
    per_axis = _per_axis(plan, within)
    extents = [len(offsets) for offsets in within]
    strides = np.cumprod([1, *reversed(plan.token_grid[1:])])[::-1]
    rank = plan.spec.rank
    index = np.zeros([a.blocks for a in plan.axes] + extents, np.int64)
    for axis, (rows, stride) in enumerate(zip(per_axis, strides)):
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = rows.shape
        index += (rows * stride).reshape(shape)
    return index.reshape(plan.blocks, int(np.prod(extents)))


def relative_positions(plan: AttentionPlan) -> list[np.ndarray]:
    """Per axis, ``[block queries, keys]`` key position minus query position (int64); the
    same for every block."""
    queries = query_coordinates(plan)
    keys = key_coordinates(plan)
    return [(k[None, :] - q[:, None]).astype(np.int64) for q, k in zip(queries, keys)]


def relative_position_range(plan: AttentionPlan) -> tuple[list[int], list[int]]:
    """Per axis, the smallest relative position ``relative_positions`` holds and how many
    there are from it to the largest: every query meets every key, so they are the
    extreme coordinates' differences, found without the ``[queries, keys]`` table (which
    global attention on a large grid could not hold)."""
    queries, keys = query_coordinates(plan), key_coordinates(plan)
    lows = [int(k.min() - q.max()) for q, k in zip(queries, keys)]
    spans = [int(k.max() - q.min()) - low + 1 for q, k, low in zip(queries, keys, lows)]
    return lows, spans


def quadratic_encoding(plan: AttentionPlan, alpha: float = ALPHA) -> tuple[np.ndarray, list[int]]:
    """Section 2's logits as a table over relative positions: ``table[h, d_0.., d_r]`` =
    ``-alpha * sum_i (d_i - offset_h,i)^2``, for every relative position ``d`` that
    ``relative_positions`` holds, and per axis the smallest such ``d`` (index 0).
    Float32; differences are squared before scaling (section 2's fp16 rule)."""
    lows, spans = relative_position_range(plan)
    offsets = np.array(plan.head_offsets, dtype=np.float64).reshape(plan.heads, -1)
    distance = np.zeros([plan.heads, *spans])
    for axis, (low, span) in enumerate(zip(lows, spans)):
        shape = [1] * (plan.spec.rank + 1)
        shape[0], shape[axis + 1] = plan.heads, span
        position = np.arange(low, low + span, dtype=np.float64)
        distance += ((position[None, :] - offsets[:, axis : axis + 1]) ** 2).reshape(shape)
    return (-alpha * distance).astype(np.float32), lows


def attention_probabilities(plan: AttentionPlan) -> np.ndarray:
    """Softmax of the quadratic relative logits, ``[queries, heads, keys]``, in float64.

    The reference for what the emitted graph computes in-graph. For local attention it is
    the pattern of one block, shared by every block.
    """
    queries = query_coordinates(plan)
    keys = key_coordinates(plan)
    offsets = head_offset_coordinates(plan)
    distance = 0.0
    for q, k, offset in zip(queries, keys, offsets):
        delta = k[None, None, :] - q[:, None, None] - offset[None, :, None]
        distance = distance + delta.astype(np.float64) ** 2
    logits = -ALPHA * distance
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=-1, keepdims=True)


# -- integer Convs (ConvInteger, QLinearConv) ------------------------------------------------


def selection_indices(plan: AttentionPlan) -> np.ndarray:
    """``[blocks * block queries * heads]``: the token each (query, head) takes, in the
    order of the attention rows. An integer layer copies these tokens with a Gather: the
    one-hot attention of section 2 is a selection, and a selection needs no arithmetic."""
    strides = np.cumprod([1, *reversed(plan.token_grid[1:])])[::-1]
    offsets = np.array(plan.head_offsets, dtype=np.int64).reshape(plan.heads, -1) @ strides
    return (query_indices(plan)[:, :, None] + offsets[None, None, :]).reshape(-1)


def column_channels(plan: AttentionPlan, channels_last: bool | None = None) -> np.ndarray:
    """``[g, Dg_out]``: the output channel of every column of ``output_projection``."""
    spec = plan.spec
    group = spec.group
    per_group = spec.out_channels // group
    columns = np.arange(plan.group_out_dim)
    pixels = int(np.prod(plan.patch))
    if channels_last is None:
        channels_last = plan.channels_last
    within = columns % per_group if channels_last else columns // pixels
    return np.arange(group)[:, None] * per_group + within[None, :]


def integer_projection(
    plan: AttentionPlan,
    weight: np.ndarray,
    zero_point: np.ndarray,
    channels_last: bool | None = None,
    x_dtype: np.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """W_O of an integer Conv for attending first, in the weight's own type, and its
    zero point per column (``[g, Dg_out]``).

    ``MatMulInteger`` multiplies ``(w - zero point)``; the entries that must contribute
    nothing hold the zero point of their column, every other entry a copy of one weight:
    exact, and within the weight type's range.

    For uint8 inputs (``x_dtype``) int8 weights become uint8 (``unsigned_weights``)."""
    centred = weight.astype(np.float64) - zero_point.astype(np.float64).reshape(
        -1, *([1] * (weight.ndim - 1))
    )
    projection = output_projection(plan, centred, channels_last)  # exact small integers
    column_zero = zero_point[column_channels(plan, channels_last)]  # [g, Dg_out]
    values = projection + column_zero[:, None, :].astype(np.float64)
    values, column_zero = values.astype(weight.dtype), column_zero.astype(weight.dtype)
    if x_dtype is not None and np.dtype(x_dtype) == np.uint8 and weight.dtype == np.int8:
        return unsigned_weights(values, column_zero)
    return values, column_zero


def unsigned_weights(weight: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and zero points as uint8, ``w + 128`` and ``z + 128``: every ``w - z``
    as it was. onnxruntime's uint8-by-int8 products on x86 CPUs without VNNI sum pairs of
    products in 16 bits, which saturate (2 x 255 x 127 > 32767); its uint8-by-uint8
    products do not, so integer products over uint8 inputs take their weights this way."""
    return tuple((a.astype(np.int16) + 128).astype(np.uint8) for a in (weight, zero_point))
