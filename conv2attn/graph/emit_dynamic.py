"""Emission for a Conv whose spatial size is dynamic: one subgraph for every input size.

The construction is the static one (``emit``), with every size-dependent number computed
in the graph from ``Shape(x)`` (``runtime_geometry``): pads (SAME included), crops, the
token grid, the query coordinates of global attention and the key windows of local
attention. Weights, head offsets, and local attention's block pattern do not depend on
the size and stay constants, and so does a local plan's fold of its heads into W_O
(design section 3). Tokens use one general layout, channel-major per group ([B, g, N, Dg],
g = 1 for ungrouped Convs), except a folded depthwise plan's, which gathers whole pixels
from channels-last tokens (``weights.emitted_channels_last``). One-pixel tokens that
hold every channel (``pixel_tokens``) are the channels-last input itself, so such layers
start and end with one NCHW <-> channels-last Transpose, which the layout pass cancels
between them; the static path's other special layouts need sizes known at conversion
time.

    x [B, C, *n] -> (subsample) -> crop/pad to T*P -> [B, g, N, Dg]
      -> attention (global: logits from Range coordinates, axis by axis; local: Gather
         of windows)
      -> projection + bias -> [B, C_out, *Q*p] -> crop to the Conv's output size
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from conv2attn import names
from conv2attn.core.geometry import Attention, AttentionPlan, AutoPad, Order
from conv2attn.core.weights import (
    ALPHA,
    depthwise_bias_layout,
    head_offset_coordinates,
    query_coordinates,
)
from conv2attn.core.weights import key_coordinates as static_key_coordinates
from conv2attn.graph.emit import Dim, _Builder, _route, attend_narrowed
from conv2attn.graph.emit import _folded_heads as _folded_heads_static
from conv2attn.graph.runtime_geometry import AxisSizes, ShapeMath, Size, axis_sizes, input_sizes


def _reshape(b: _Builder, m: ShapeMath, part: str, x: gs.Variable, dims: list[Size]):
    return b.op("Reshape", part, [x, m.shape(dims)], None, x.dtype)


def _slice_to(b, m, part, x, ends: list[Size], first_axis: int, steps=None, sizes=None):
    """``x``'s first ``ends`` positions along the axes from ``first_axis`` on (every
    ``steps``-th); ``x`` itself where ``sizes``, its own sizes there, are ``ends`` at
    every input size (``ShapeMath.same``): a Slice would copy it whole."""
    if sizes is not None and steps is None and all(map(m.same, ends, sizes)):
        return x
    rank = len(ends)
    inputs = [
        x,
        b.int64(f"{part}/starts", [0] * rank),
        m.shape(ends),
        b.int64(f"{part}/axes", list(range(first_axis, first_axis + rank))),
    ]
    if steps is not None:
        inputs.append(b.int64(f"{part}/steps", steps))
    return b.op("Slice", f"{part}/Slice", inputs, None, x.dtype)


def _moved(b, m, part: str, x: gs.Variable, dims: list[Size], perm: list[int]) -> gs.Variable:
    """``x`` viewed as ``dims`` and transposed by ``perm``, in as few axes as that takes:
    axes of size 1 (a patch, block or group of one) are left out and axes that stay
    together are merged, so a one-pixel patchify is an NCHW -> NHWC move of whole
    channels rather than an element-wise walk over seven axes. The caller reshapes the
    result to the shape it needs. Axis 0 (the batch, ``dims[0]`` = 0: kept from ``x``) is
    never merged."""
    kept = [i for i, d in enumerate(dims) if not (isinstance(d, int) and d == 1)]
    runs: list[list[int]] = []
    for axis in (a for a in perm if a in kept):
        last = runs[-1][-1] if runs else None
        if last is not None and last != 0 and kept.index(axis) == kept.index(last) + 1:
            runs[-1].append(axis)
        else:
            runs.append([axis])
    in_order = sorted(runs)
    view = _reshape(b, m, f"{part}/split", x, [m.product([dims[a] for a in r]) for r in in_order])
    moved_perm = [in_order.index(r) for r in runs]
    if moved_perm == sorted(moved_perm):
        return view
    return b.op("Transpose", f"{part}/Transpose", [view], None, x.dtype, {"perm": moved_perm})


def _pad(b, m, part, x, begin: list[Size], end: list[Size], channels_last: bool = False):
    if all(isinstance(v, int) and v == 0 for v in (*begin, *end)):
        return x
    pads = m.shape([0, *begin, 0, 0, *end, 0] if channels_last else [0, 0, *begin, 0, 0, *end])
    fill = [] if b.pad_value is None else [b.pad_value]  # an integer Conv's zero point
    return b.op("Pad", f"{part}/Pad", [x, pads, *fill], None, x.dtype, attrs={"mode": "constant"})


def _crop_and_pad(b, m, x, axes: list[AxisSizes], channels_last: bool = False) -> gs.Variable:
    """``x`` cropped to the input the token grid reads and padded to the grid's extent."""
    kept, sizes = [a.kept for a in axes], [a.size for a in axes]
    x = _slice_to(b, m, "crop_input", x, kept, first_axis=1 if channels_last else 2, sizes=sizes)
    before, after = [a.zeros_before for a in axes], [a.zeros_after for a in axes]
    return _pad(b, m, "pad", x, before, after, channels_last)


def _grid_input(b, m, x, plan: AttentionPlan, axes: list[AxisSizes]) -> gs.Variable:
    """x subsampled, cropped and padded to the token grid: [B, C, T1 * P1, T2 * P2]."""
    rank = plan.spec.rank
    if plan.subsamples:
        steps = plan.input_steps
        on = [i for i in range(rank) if steps[i] > 1]
        begin = [axes[i].pad_begin if i in on else 0 for i in range(rank)]
        end = [axes[i].pad_end if i in on else 0 for i in range(rank)]
        x = _pad(b, m, "subsample", x, begin, end)
        ends = [m.add(m.mul(m.sub(axes[i].output, 1), steps[i]), 1) for i in on]
        inputs = [
            x,
            b.int64("subsample/starts", [0] * len(on)),
            m.shape(ends),
            b.int64("subsample/axes", [2 + i for i in on]),
            b.int64("subsample/steps", [steps[i] for i in on]),
        ]
        x = b.op("Slice", "subsample/Slice", inputs, None, x.dtype)
    return _crop_and_pad(b, m, x, axes)


def pixel_tokens(plan: AttentionPlan) -> bool:
    """Whether ``plan``'s tokens are single pixels holding every channel, in and out, in
    grid order (one query per block, or global attention), without subsampling: then
    its tokens are the channels-last input itself and its output tokens channels-last
    pixels, so patchify and un-patchify are one NCHW <-> channels-last Transpose each,
    which the layout pass (``graph.layout``) cancels between consecutive layers."""
    one_query = plan.attention is Attention.GLOBAL or plan.block_queries == 1
    whole_pixels = plan.spec.group == 1 or (plan.depthwise and plan.folds_heads)
    return (
        one_query
        and whole_pixels
        and not plan.subsamples
        and all(p == 1 for p in (*plan.patch, *plan.in_patch))
    )


def _pixel_grid(b, m, x, plan: AttentionPlan, axes: list[AxisSizes]) -> gs.Variable:
    """x -> channels-last, cropped and padded to the token grid: [B, T1, T2, C]."""
    rank = plan.spec.rank
    perm = [0, *range(2, rank + 2), 1]
    x = b.op("Transpose", "patchify/to_nhwc/Transpose", [x], None, x.dtype, {"perm": perm})
    return _crop_and_pad(b, m, x, axes, channels_last=True)


def _tokens(b, m, x, plan: AttentionPlan, axes: list[AxisSizes]) -> gs.Variable:
    """x -> [B, g, N, Dg]: on the token grid (``_grid_input``), patchified."""
    spec, rank = plan.spec, plan.spec.rank
    if pixel_tokens(plan):
        grid = _pixel_grid(b, m, x, plan, axes)
        return _reshape(b, m, "patchify/merge", grid, [0, 1, -1, spec.in_channels])
    x = _grid_input(b, m, x, plan, axes)
    group = spec.group
    patches = [v for a, axis in zip(axes, plan.axes) for v in (a.tokens, axis.in_patch)]
    # [B, g, Cg, T1, P1, T2, P2] -> [B, g, T1, T2, Cg, P1, P2]
    perm = [0, 1, *(3 + 2 * i for i in range(rank)), 2, *(4 + 2 * i for i in range(rank))]
    dims = [0, group, spec.in_channels // group, *patches]
    moved = _moved(b, m, "patchify", x, dims, perm)
    return _reshape(b, m, "patchify/merge", moved, [0, group, -1, plan.group_in_dim])


def _coordinate_line(b, m, part: str, size: Size) -> gs.Variable:
    """0, 1, ..., size - 1 as float32."""
    line = b.op(
        "Range", f"{part}/Range", [m.scalar(0), m.scalar(size), m.scalar(1)], None,
        np.dtype(np.int64),
    )  # fmt: skip
    to_float = helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    return b.op("Cast", f"{part}/Cast", [line], None, np.float32, {"to": to_float})


def _global_logits(b, m, plan: AttentionPlan, axes: list[AxisSizes], q: Size, k: Size):
    """Global attention's logits [q, heads, K] on the runtime grid, one axis at a time.
    Along axis a, ``-ALPHA * (key_a - query_a - offset_a)^2`` is a small [queries_a,
    heads, keys_a] table; the logits are the broadcast sum of the tables, so the
    full-size tensor is written once, by the last Add, and queries and keys stay in
    row-major grid order. Every entry is an exact multiple of ALPHA, 0 only where a
    query's head lands on the key, so the softmax is the same one-hot (section 2)."""
    rank, heads = plan.spec.rank, plan.heads
    scale = b.constant(f"{names.LOGITS}/scale", np.array(-ALPHA, dtype=np.float32))
    total = None
    for axis, (a, offsets) in enumerate(zip(axes, head_offset_coordinates(plan))):
        tag = f"{names.LOGITS}/axis{axis}"
        queries = _coordinate_line(b, m, f"{tag}/queries", a.grid)
        keys = _coordinate_line(b, m, f"{tag}/keys", a.tokens)
        query_col = _reshape(b, m, f"{tag}/query_col", queries, [-1, 1, 1])
        key_row = _reshape(b, m, f"{tag}/key_row", keys, [1, 1, -1])
        relative = b.op("Sub", f"{tag}/relative", [key_row, query_col], None, np.float32)
        offset = b.constant(f"{tag}/head_offsets", offsets.reshape(1, heads, 1))
        delta = b.op("Sub", f"{tag}/delta", [relative, offset], None, np.float32)
        square = b.op("Mul", f"{tag}/square", [delta, delta], None, np.float32)
        table = b.op("Mul", f"{tag}/Mul", [square, scale], None, np.float32)
        if rank > 1:
            # query axes, heads, key axes: this axis's table spans its own two
            dims: list[Size] = [1] * (2 * rank + 1)
            dims[axis], dims[rank], dims[rank + 1 + axis] = a.grid, heads, a.tokens
            table = _reshape(b, m, f"{tag}/spread", table, dims)
        total = table if total is None else b.op(
            "Add", f"{tag}/sum", [total, table], None, np.float32
        )  # fmt: skip
    if rank == 1:
        return total
    return _reshape(b, m, f"{names.LOGITS}/by_query", total, [q, heads, k])


def relative_logits(b, m, plan: AttentionPlan, axes: list[AxisSizes]):
    """Section 2's logits [q, heads, K] float32, with ``q`` and ``K``. Local: one block's
    pattern, constants only. Global: from the runtime grid's coordinates, axis by axis
    (``_global_logits``)."""
    rank = plan.spec.rank
    if plan.attention is not Attention.LOCAL:
        q = m.product([a.grid for a in axes])
        k = m.product([a.tokens for a in axes])
        return _global_logits(b, m, plan, axes, q, k), q, k
    q, k = plan.block_queries, plan.keys
    queries = b.constant(f"{names.LOGITS}/query_coords", np.stack(query_coordinates(plan)))
    keys = b.constant(f"{names.LOGITS}/key_coords", np.stack(static_key_coordinates(plan)))
    offsets = b.constant(
        f"{names.LOGITS}/head_offsets", np.stack(head_offset_coordinates(plan))[:, None, :, None]
    )  # [axes, 1, heads, 1]
    query_col = _reshape(b, m, f"{names.LOGITS}/query_col", queries, [rank, -1, 1, 1])
    key_row = _reshape(b, m, f"{names.LOGITS}/key_row", keys, [rank, 1, 1, -1])
    relative = b.op("Sub", f"{names.LOGITS}/relative", [key_row, query_col], None, np.float32)
    delta = b.op("Sub", f"{names.LOGITS}/delta", [relative, offsets], None, np.float32)
    square = b.op("Mul", f"{names.LOGITS}/square", [delta, delta], None, np.float32)
    squared = b.reduce_sum(
        f"{names.LOGITS}/sum", square, 0, None, f"{names.LOGITS}/sum_axes", np.float32
    )
    scale = b.constant(f"{names.LOGITS}/scale", np.array(-ALPHA, dtype=np.float32))
    logits = b.op("Mul", f"{names.LOGITS}/Mul", [squared, scale], None, np.float32)  # [q, h, k]
    return logits, q, k


def _attention_matrix(b, m, plan: AttentionPlan, axes: list[AxisSizes]) -> gs.Variable:
    """Section 2's one-hot softmax of ``relative_logits``."""
    heads = plan.heads
    logits, q, k = relative_logits(b, m, plan, axes)
    rows = _reshape(b, m, f"{names.LOGITS}/rows", logits, [m.mul(q, heads), k])
    probs = b.op("Softmax", names.SOFTMAX, [rows], None, np.float32, attrs={"axis": 1})
    if plan.order is Order.PROJECT_FIRST:
        grouped = _reshape(b, m, f"{names.SOFTMAX}/by_head", probs, [q, heads, k])
        keys_first = b.op(
            "Transpose", f"{names.SOFTMAX}/Transpose", [grouped], None, np.float32,
            {"perm": [0, 2, 1]},
        )  # fmt: skip
        probs = _reshape(b, m, f"{names.SOFTMAX}/key_head", keys_first, [q, m.mul(k, heads)])
    elif plan.narrows_values:  # each head's rows are taken apart (``_attend_narrowed``)
        probs = _reshape(b, m, f"{names.SOFTMAX}/by_head", probs, [q, heads, k])
    if b.dtype != np.float32:
        to = helper.np_dtype_to_tensor_dtype(b.dtype)
        probs = b.op("Cast", f"{names.SOFTMAX}/Cast", [probs], None, b.dtype, {"to": to})
    return probs


def _strides(m: ShapeMath, axes: list[AxisSizes]) -> list[Size]:
    """Row-major strides of the runtime token grid."""
    strides: list[Size] = []
    stride: Size = 1
    for a in reversed(axes):
        strides.insert(0, stride)
        stride = m.mul(stride, a.tokens)
    return strides


def selection_indices(b, m, plan: AttentionPlan, axes: list[AxisSizes]) -> gs.Variable:
    """[blocks * block queries * heads]: the token each (query, head) takes on the runtime
    grid (an integer layer's selection; ``weights.selection_indices`` at a fixed size)."""
    rank = plan.spec.rank
    strides = _strides(m, axes)
    total = None
    for axis, a in enumerate(axes):
        part = f"select/axis{axis}"
        blocks = b.op("Range", f"{part}/blocks", [m.scalar(0), m.scalar(a.blocks), m.scalar(1)],
                      None, np.dtype(np.int64))  # fmt: skip
        within = b.op("Range", f"{part}/within", [m.scalar(0), m.scalar(a.block), m.scalar(1)],
                      None, np.dtype(np.int64))  # fmt: skip
        step = plan.axes[axis].step
        spacing = a.block if step == 1 else m.mul(a.block, step)
        start = b.op("Mul", f"{part}/start", [blocks, m.tensor(spacing)], None, blocks.dtype)
        shape = [1] * (2 * rank + 1)
        shape[axis] = -1
        lifted = _reshape(b, m, f"{part}/lift_start", start, shape)
        shape = [1] * (2 * rank + 1)
        shape[rank + axis] = -1
        lifted_within = _reshape(b, m, f"{part}/lift_within", within, shape)
        offsets = np.array(plan.head_offsets, dtype=np.int64)[:, axis].reshape(
            [1] * (2 * rank) + [plan.heads]
        )
        if step > 1:
            lifted_within = b.op("Mul", f"{part}/within_step", [lifted_within, m.tensor(step)],
                                 None, blocks.dtype)  # fmt: skip
        position = b.op("Add", f"{part}/position", [lifted, lifted_within], None, blocks.dtype)
        keyed = b.op("Add", f"{part}/offset", [position, b.constant(f"{part}/head_offsets",
                     offsets)], None, blocks.dtype)  # fmt: skip
        weighted = b.op("Mul", f"{part}/stride", [keyed, m.tensor(strides[axis])], None,
                        blocks.dtype)  # fmt: skip
        total = weighted if total is None else b.op(
            "Add", f"{part}/sum", [total, weighted], None, blocks.dtype
        )  # fmt: skip
    return _reshape(b, m, "select/merge", total, [-1])


def _window_indices(b, m, plan: AttentionPlan, axes: list[AxisSizes]) -> gs.Variable:
    """[blocks, keys]: each block's window of tokens (block and halo), row-major over the
    runtime token grid."""
    rank = plan.spec.rank
    strides = _strides(m, axes)
    total = None
    for axis, (a, plan_axis) in enumerate(zip(axes, plan.axes)):
        part = f"windows/axis{axis}"
        starts = b.op(
            "Range", f"{part}/Range", [m.scalar(0), m.scalar(a.blocks), m.scalar(1)], None,
            np.dtype(np.int64),
        )  # fmt: skip
        scaled = b.op(
            "Mul", f"{part}/block_start", [starts, m.tensor(plan_axis.block * plan_axis.step)],
            None, np.dtype(np.int64),
        )  # fmt: skip
        shape = [1] * (2 * rank)
        shape[axis] = -1
        start = _reshape(b, m, f"{part}/lift_start", scaled, shape)
        within = np.arange(plan_axis.window, dtype=np.int64).reshape(
            [plan_axis.window if i == rank + axis else 1 for i in range(2 * rank)]
        )
        index = b.op("Add", f"{part}/Add", [start, b.constant(f"{part}/window", within)], None,
                     np.dtype(np.int64))  # fmt: skip
        weighted = b.op("Mul", f"{part}/stride", [index, m.tensor(strides[axis])], None,
                        np.dtype(np.int64))  # fmt: skip
        total = weighted if total is None else b.op(
            "Add", f"{part}/sum", [total, weighted], None, np.dtype(np.int64)
        )  # fmt: skip
    return _reshape(b, m, "windows/merge", total, [-1, plan.keys])


def runtime_axes(
    b: _Builder, x: gs.Variable, plan: AttentionPlan, auto_pad: AutoPad
) -> tuple[ShapeMath, list[AxisSizes]]:
    """The sizes of every axis of ``x``'s Conv, from its runtime shape."""
    m = ShapeMath(b)
    source, local = plan.source or plan.spec, plan.attention is Attention.LOCAL
    sizes = input_sizes(m, x, plan.spec.rank)
    return m, [axis_sizes(m, n, i, source, auto_pad, plan, local) for i, n in enumerate(sizes)]


def emit_dynamic_attention(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    y: gs.Variable,
    plan: AttentionPlan,
    auto_pad: AutoPad,
    projection: np.ndarray,
    bias: np.ndarray,
    batch: Dim,
    tiles: int = 1,
) -> list[gs.Node]:
    """Append the attention computing ``y`` from ``x`` for any spatial size of ``x``.

    ``projection`` and ``bias`` are ``weights.output_projection``/``output_bias`` in the
    channel-major layout (``channels_last=False``); ``plan`` was chosen for a nominal size
    and supplies everything that does not depend on it, ``tiles`` included: a plan that
    folds its heads gathers and projects its blocks in that many runs (``_tiled``)."""
    if tiles > 1 and not (plan.folds_heads and plan.tileable):
        raise ValueError(f"{tiles} tiles for a plan that does not fold its heads")
    dtype = np.dtype(projection.dtype)
    b = _Builder(graph, prefix, dtype)
    m, axes = runtime_axes(b, x, plan, auto_pad)
    if plan.depthwise and plan.folds_heads:
        _depthwise_folded(b, m, x, y, plan, axes, projection, bias, tiles)
        return b.nodes
    spec, local = plan.spec, plan.attention is Attention.LOCAL
    tokens = _tokens(b, m, x, plan, axes)  # [B, g, N, Dg]
    group, heads = spec.group, plan.heads
    dim_in, dim_out = plan.group_in_dim, plan.group_out_dim
    attention = _attention_matrix(b, m, plan, axes)
    windows = None
    if local:
        indices = _window_indices(b, m, plan, axes)

        def windows(values: gs.Variable) -> gs.Variable:
            return b.op("Gather", "Gather", [values, indices], None, values.dtype, {"axis": 2})

    q = plan.block_queries
    lead = [0, group, -1] if local else [0, group]  # local: [B, g, blocks, ..]
    bias_const = b.constant(names.BIAS, bias.reshape(group, *([1] if local else []), 1, dim_out))
    if plan.folds_heads:
        folded = _folded_heads(b, m, plan, attention, projection)
        # one group: a 2-D weight, which onnxruntime packs once for its matrix kernel
        grouped = [] if group == 1 else [group]
        flat_shape = [0, *grouped, -1, plan.keys * dim_in]

        def project(t: _Builder, rows: gs.Variable) -> gs.Variable:
            gathered = t.op("Gather", "Gather", [tokens, rows], None, dtype, {"axis": 2})
            flat = _reshape(t, m, "concat_heads", gathered, flat_shape)
            product = t.op("MatMul", "proj/MatMul", [flat, folded], None, dtype)
            projected = _reshape(t, m, "proj/blocks", product, [0, group, -1, 1, dim_out])
            return t.op("Add", "proj/Add", [projected, bias_const], None, dtype)

        out = _tiled(b, m, axes, indices, tiles, project, axis=2)
        _unpatchify(b, m, out, plan, axes, y)
        return b.nodes
    if plan.order is Order.ATTEND_FIRST:
        weight = projection.reshape(group, *([1] if local else []), *projection.shape[1:])
        if plan.narrows_values:
            concat = _attend_narrowed(b, m, plan, attention, tokens)
        else:
            attended = _attend(b, m, plan, attention, tokens, windows, dim_in)
            concat = _reshape(b, m, "concat_heads", attended, [*lead, q, heads * dim_in] if local
                              else [0, group, -1, heads * dim_in])  # fmt: skip
        projected = b.op(
            "MatMul", "proj/MatMul", [concat, b.constant(names.PROJECTION, weight)], None, dtype
        )
    else:
        weight = b.constant(names.PROJECTION, projection)  # [g, Dg_in, heads * Dg_out]
        per_head = b.op("MatMul", "proj/MatMul", [tokens, weight], None, dtype)
        if plan.single_key:
            projected = _attend(b, m, plan, attention, per_head, windows, dim_out)
        else:
            keys = windows(per_head) if local else per_head
            stacked = _reshape(b, m, "stack_heads", keys, [*lead, plan.keys * heads, dim_out]
                               if local else [0, group, -1, dim_out])  # fmt: skip
            projected = b.op("MatMul", "MatMul", [attention, stacked], None, dtype)
    out = b.op("Add", "proj/Add", [projected, bias_const], None, dtype)
    _unpatchify(b, m, out, plan, axes, y)
    return b.nodes


def _tiled(b, m, axes: list[AxisSizes], indices, tiles: int, body, axis: int) -> gs.Variable:
    """``body(builder, window indices)`` over every block: at once, or in ``tiles`` runs
    of blocks concatenated along ``axis``. The blocks are independent, so each run
    gathers, projects and adds the bias on its own while its intermediates are in cache
    (design section 6). Run ``i`` takes blocks ``[R * i // tiles, R * (i + 1) // tiles)``
    of the ``R`` at run time: as even as the static split at the size the plan was made
    for, and empty runs where an input is so small that ``R < tiles``."""
    if tiles == 1:
        return body(b, indices)
    blocks = m.product([a.blocks for a in axes])
    bounds = [0, *(m.div(m.mul(blocks, i), tiles) for i in range(1, tiles)), blocks]
    parts = []
    for index, (first, last) in enumerate(itertools.pairwise(bounds)):
        t = b.tile(f"tile{index}")
        rows = t.op(
            "Slice", "window_indices",
            [indices, m.tensor(first), m.tensor(last), t.int64("window_indices/axes", [0])],
            None, np.dtype(np.int64),
        )  # fmt: skip
        parts.append(body(t, rows))
    return b.op("Concat", "tiles/Concat", parts, None, parts[0].dtype, attrs={"axis": axis})


def _folded_heads(b, m, plan: AttentionPlan, attention, projection: np.ndarray) -> gs.Variable:
    """``[g, K * Dg_in, Dg_out]`` (one group: ``[K * D_in, D_out]``): per group, each
    head's one-hot attention over the block's K keys times its rows of W_O, summed over
    the heads (design section 3; the static path's fold, over channel-major tokens). Its
    inputs are constants."""
    group, heads = plan.spec.group, plan.heads
    width = plan.group_in_dim * plan.group_out_dim
    per_head = b.constant(names.PROJECTION, projection.reshape(group, heads, width))
    keys_first = b.op(
        "Transpose", f"{names.FOLD}/Transpose", [attention], None, attention.dtype,
        {"perm": [1, 0]},
    )  # fmt: skip
    folded = b.op("MatMul", f"{names.FOLD}/MatMul", [keys_first, per_head], None, per_head.dtype)
    rows = [plan.keys * plan.group_in_dim, plan.group_out_dim]
    return _reshape(b, m, f"{names.FOLD}/rows", folded, rows if group == 1 else [group, *rows])


def _depthwise_folded(b, m, x, y, plan: AttentionPlan, axes, projection, bias, tiles) -> None:
    """A depthwise plan that folds its heads (``weights.emitted_channels_last``), as on
    static sizes (``emit._per_channel_sum``): channels-last tokens [B, N, P * C], each
    block's window of K keys gathered whole, times the folded weight [K * P, p, C, m],
    summed over the K * P taps, plus the bias: [B, blocks, p * C * m]."""
    spec, rank = plan.spec, plan.spec.rank
    channels, multiplier = spec.in_channels, spec.out_channels // spec.group
    if pixel_tokens(plan):
        moved = _pixel_grid(b, m, x, plan, axes)
    else:
        padded = _grid_input(b, m, x, plan, axes)
        patches = [v for a, axis in zip(axes, plan.axes) for v in (a.tokens, axis.in_patch)]
        # [B, C, T1, P1, T2, P2] -> [B, T1, T2, P1, P2, C]
        perm = [0, *(2 + 2 * i for i in range(rank)), *(3 + 2 * i for i in range(rank)), 1]
        moved = _moved(b, m, "patchify", padded, [0, channels, *patches], perm)
    tokens = _reshape(b, m, "patchify/merge", moved, [0, -1, plan.in_dim])
    indices = _window_indices(b, m, plan, axes)
    taps = plan.keys * math.prod(plan.in_patch)
    folded = _folded_heads_static(b, plan, _attention_matrix(b, m, plan, axes), projection)
    bias_row = b.constant(names.BIAS, depthwise_bias_layout(plan, bias))
    dtype = tokens.dtype

    def per_channel_sum(t: _Builder, rows: gs.Variable) -> gs.Variable:
        windows = t.op("Gather", "Gather", [tokens, rows], None, dtype, {"axis": 1})
        split = _reshape(t, m, "concat_heads", windows, [0, -1, taps, 1, channels, 1])
        product = t.op("Mul", "proj/Mul", [split, folded], None, dtype)
        summed = t.reduce_sum("proj/ReduceSum", product, 2, None, "proj/axes", dtype)
        flat = _reshape(t, m, "proj/merge", summed, [0, -1, plan.out_dim])
        return t.op("Add", "proj/Add", [flat, bias_row], None, dtype)

    out = _tiled(b, m, axes, indices, tiles, per_channel_sum, axis=1)
    if pixel_tokens(plan):
        _pixels_to_output(b, m, out, plan, axes, y)
        return
    blocks = [a.blocks for a in axes]
    # [B, Q1, Q2, p1, p2, C_out] -> [B, C_out, Q1, p1, Q2, p2] (one query per block)
    split = [0, *blocks, *plan.patch, channels * multiplier]
    perm = [0, 1 + 2 * rank, *itertools.chain.from_iterable((1 + i, 1 + rank + i) for i in
                                                             range(rank))]  # fmt: skip
    _to_output(b, m, _moved(b, m, "unpatchify", out, split, perm), plan, axes, y)


def _attend(b, m, plan: AttentionPlan, attention, values, windows, dim: int) -> gs.Variable:
    """Attention times each block's keys, ``[B, g, (blocks,) q * heads, dim]``; a
    single-key plan multiplies every token in one product (``emit._attend``)."""
    if not plan.single_key:
        keys = windows(values) if windows is not None else values
        return b.op("MatMul", "MatMul", [attention, keys], None, values.dtype)
    group = plan.spec.group
    flat = _reshape(b, m, "attend/flat", values, [0, group, 1, -1])
    attended = b.op("MatMul", "MatMul", [attention, flat], None, values.dtype)
    return _reshape(b, m, "attend/blocks", attended, [0, group, -1, 1, dim])


def _attend_narrowed(b, m, plan: AttentionPlan, attention, tokens) -> gs.Variable:
    """``emit.attend_narrowed`` over channel-major tokens [B, 1, N, (C, P1, P2, ..)]:
    [B, 1, q, value_dim]."""
    channels = plan.spec.in_channels
    pixels = _reshape(b, m, "heads/pixels", tokens, [0, 1, -1, channels, *plan.in_patch])

    def values(part: str, sliced: gs.Variable, dim: int) -> gs.Variable:
        return _reshape(b, m, part, sliced, [0, 1, -1, dim])

    return attend_narrowed(b, plan, attention, tokens, pixels, 4, values)


def _unpatchify(b, m, values, plan: AttentionPlan, axes: list[AxisSizes], y) -> None:
    """[B, g, (blocks,) q, Dg_out] -> [B, C_out, *Q*p] -> crop to the output -> ``y``."""
    spec, rank = plan.spec, plan.spec.rank
    if pixel_tokens(plan):
        _pixels_to_output(b, m, values, plan, axes, y)
        return
    group, cg_out = spec.group, spec.out_channels // spec.group
    blocks = [a.blocks for a in axes]
    block = [a.block for a in axes]
    split = [0, group, *blocks, *block, cg_out, *plan.patch]
    # [B, g, nb.., b.., Cg_out, p..] -> [B, g, Cg_out, nb1, b1, p1, nb2, b2, p2, ..]
    interleave = itertools.chain.from_iterable(
        (2 + i, 2 + rank + i, 3 + 2 * rank + i) for i in range(rank)
    )
    perm = [0, 1, 2 + 2 * rank, *interleave]
    _to_output(b, m, _moved(b, m, "unpatchify", values, split, perm), plan, axes, y)


def _to_output(b, m, moved: gs.Variable, plan: AttentionPlan, axes: list[AxisSizes], y) -> None:
    """Output patches moved into NCHW order -> [B, C_out, *Q*p] -> crop to the output ->
    ``y``."""
    full = [m.mul(a.queries, p) for a, p in zip(axes, plan.patch)]
    merged = _reshape(b, m, "unpatchify/merge", moved, [0, plan.spec.out_channels, *full])
    outputs = [a.output for a in axes]
    out = _slice_to(b, m, "crop_output", merged, outputs, first_axis=2, sizes=full)
    _route(b, out, y)


def _pixels_to_output(b, m, values, plan: AttentionPlan, axes: list[AxisSizes], y) -> None:
    """Output pixels in grid order, every channel each ([B, (1,) Q, (1,) C_out]) -> [B, Q1,
    Q2, C_out] -> crop to the output -> one Transpose to NCHW -> ``y``."""
    rank = plan.spec.rank
    queries = [a.queries for a in axes]
    grid = _reshape(b, m, "unpatchify/merge", values, [0, *queries, plan.spec.out_channels])
    outputs = [a.output for a in axes]
    out = _slice_to(b, m, "crop_output", grid, outputs, first_axis=1, sizes=queries)
    perm = [0, rank + 1, *range(1, rank + 1)]
    nchw = b.op("Transpose", "unpatchify/to_nchw/Transpose", [out], None, out.dtype, {"perm": perm})
    _route(b, nchw, y)
