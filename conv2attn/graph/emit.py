"""Emission of the attention subgraph that replaces one Conv (onnx-graphsurgeon).

The module that builds the attention's ONNX nodes (``layout`` only adds Transposes
between layers). Every node and tensor is named ``<conv name>/attn/<part>`` so a
converted graph reads well in Netron and diffs cleanly; the parts other stages look
for (logits, Softmax, W_O) come from ``names``. Only ops of opset 11 are used (Slice,
Pad, Reshape, Transpose, Gather, Concat, Tile, Sub, Mul, Add, Softmax, MatMul, Gemm,
ReduceSum, Cast), with the forms that are identical in later opsets, except ReduceSum,
whose axes became an input in opset 13: it is written in the model's opset's form.

Dataflow (2-D shown, ``g`` is the group count; the group axis and every size-1 axis
are left out of the emitted shapes):

    x [B, C, H, W] -> crop/pad to the token grid -> [B, C, T1*P1, T2*P2]
      -> patchify     [B, g, N, Dg_in]                          (one Transpose)
      -> attention    softmax(-ALPHA * |d - offset_h|^2) @ tokens, heads interleaved
                      into the rows, so heads concatenate without a Transpose
      -> projection   MatMul with W_O (one per group) + bias    [B, g, N, Dg_out]
      -> un-patchify  [B, C_out, T1*p1, T2*p2]                  (one Transpose)
      -> crop         [B, C_out, Ho, Wo] = y

Where rows are laid out for the CPU, a plan of narrow pixel tokens
(``AttentionPlan.gathers_rows_first``: a stem) gathers its blocks' window rows from the
padded NCHW input first and moves them channels-last in one Transpose, in place of the
patchify; its windows are then gathered column by column.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from conv2attn import names
from conv2attn.core.geometry import Attention, AttentionPlan, Order, Rearrange
from conv2attn.core.weights import (
    ALPHA,
    depthwise_bias_layout,
    depthwise_layout,
    head_offset_coordinates,
    key_coordinates,
    query_coordinates,
    window_coordinates,
    window_indices,
)

Dim = int | str | None


# Ops whose output has their first input's type.
SAME_TYPE_OPS = {"Reshape", "Transpose", "Slice", "Pad", "Gather", "Tile"}
# onnxruntime's CPU Add of a per-feature bias pays a fixed cost per row of features as
# well as per element: at mobilenet_v2's 16- to 32-channel layers' sizes it took 1.6-3x
# as long over rows of one token's features as over rows of 256-1024 (fp32, 2 cores).
# Emission for the CPU lays k tokens side by side as one row of at most this many
# features and repeats the bias k times: the same sums, in fewer and longer rows.
WIDE_BIAS_ROW = 1024
# The same holds for the ReduceSum over a depthwise Conv's taps: over [windows, taps, C]
# it pays per window, so where each window is one pixel's taps, k windows go side by
# side, tap by tap ([windows / k, taps, k * C], the Gather's indices reordered), in rows
# of at most this many features. On 112x112 32-channel and 56x56 144-channel depthwise
# Convs (fp32, 2 cores, per-node profiles) the ReduceSum took 0.4-0.5 ms against 1.2-1.4
# and 0.7-0.9 against 1.0-1.4 ms, and the Gather, Mul and ReduceSum together 2.4 against
# 2.9 ms and 2.5 against 3.5 ms.
WIDE_TAP_ROW = 512


class _Builder:
    """Appends named nodes to a graph and tracks the static shape of what it makes.

    ``pad_value``: what padding fills in (the Conv's zeros; an integer Conv's input zero
    point, which may be computed at runtime). ``wide_rows``: lay several tokens side by
    side in one row where a CPU kernel pays per row: biases added over rows of several
    tokens (``WIDE_BIAS_ROW``), depthwise taps summed over several blocks' windows
    (``WIDE_TAP_ROW``)."""

    def __init__(
        self,
        graph: gs.Graph,
        prefix: str,
        dtype: np.dtype,
        pad_value: gs.Tensor | None = None,
        wide_rows: bool = False,
    ):
        self.graph = graph
        self.prefix = prefix
        self.dtype = dtype
        self.pad_value = pad_value
        self.wide_rows = wide_rows
        self.opset = graph.opset
        self.nodes: list[gs.Node] = []
        self.root = prefix
        self._weights: dict[str, gs.Constant] = {}
        self._layer = self
        self._once: dict[str, gs.Tensor] = {}

    def tile(self, part: str) -> _Builder:
        """A builder naming its nodes ``<prefix>/<part>/..`` that appends to the same
        graph and node list and shares the layer's weights (``weight``)."""
        child = _Builder(
            self.graph, f"{self.prefix}/{part}", self.dtype, self.pad_value, self.wide_rows
        )
        child.nodes, child.root, child._weights = self.nodes, self.root, self._weights
        child._layer, child._once = self._layer, self._once
        return child

    def once(self, part: str, make: Callable[[_Builder], gs.Tensor]) -> gs.Tensor:
        """What ``make`` builds with the layer's own builder (nodes named
        ``<conv>/attn/..``), built the first time any tile asks for ``part``."""
        if part not in self._once:
            self._once[part] = make(self._layer)
        return self._once[part]

    def constant(self, part: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{part}", np.ascontiguousarray(values))

    def weight(self, part: str, values: np.ndarray) -> gs.Constant:
        """A constant named after the layer (``<conv>/attn/<part>``, e.g. W_O) whatever
        tile asks for it: one initializer however many tiles read it."""
        if part not in self._weights:
            self._weights[part] = gs.Constant(f"{self.root}/{part}", np.ascontiguousarray(values))
        return self._weights[part]

    def scalar(self, part: str, value: np.ndarray) -> gs.Constant:
        """A 0-d constant (``constant`` makes every array at least 1-d)."""
        return gs.Constant(f"{self.prefix}/{part}", np.asarray(value).reshape(()))

    def int64(self, part: str, values: Sequence[int]) -> gs.Constant:
        return self.constant(part, np.asarray(values, dtype=np.int64))

    def op(
        self,
        op: str,
        part: str,
        inputs: list[gs.Tensor],
        shape: Sequence[Dim] | None,
        dtype: np.dtype | None = None,
        attrs: dict | None = None,
        output: gs.Variable | None = None,
    ) -> gs.Variable:
        name = f"{self.prefix}/{part}"
        if dtype is None and op in SAME_TYPE_OPS and inputs and inputs[0].dtype is not None:
            dtype = inputs[0].dtype
        if output is None:
            output = gs.Variable(
                names.output_of(name),
                dtype=dtype or self.dtype,
                shape=list(shape) if shape else None,
            )
        node = gs.Node(op, name=name, attrs=attrs or {}, inputs=inputs, outputs=[output])
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return output

    def reduce_sum(
        self,
        part: str,
        x: gs.Variable,
        axis: int,
        shape: Sequence[Dim] | None,
        axes_part: str,
        dtype: np.dtype | None = None,
    ) -> gs.Variable:
        """``x`` summed over ``axis`` (dropped), in the form of the graph's opset: the
        axes an attribute before opset 13, an input (``axes_part``) from it on."""
        if self.opset >= 13:
            inputs, attrs = [x, self.int64(axes_part, [axis])], {"keepdims": 0}
        else:
            inputs, attrs = [x], {"axes": [axis], "keepdims": 0}
        return self.op("ReduceSum", part, inputs, shape, dtype, attrs)

    def reshape(self, part: str, x: gs.Variable, shape: Sequence[Dim]) -> gs.Variable:
        """Reshape whose target copies the batch dimension (``0``), so it may stay symbolic."""
        if x.shape is not None and list(x.shape) == list(shape):
            return x
        target = [0, *shape[1:]]
        return self.op("Reshape", part, [x, self.int64(f"{part}/shape", target)], shape, x.dtype)

    def static_reshape(self, part: str, x: gs.Tensor, shape: Sequence[int]) -> gs.Variable:
        """Reshape of a tensor without a batch axis (the attention constants)."""
        return self.op("Reshape", part, [x, self.int64(f"{part}/shape", shape)], shape, x.dtype)


def _rearrange(
    b: _Builder, part: str, x: gs.Variable, step: Rearrange, merged: Sequence[Dim], batch: Dim
) -> gs.Variable:
    """Reshape to ``step.split``, permute, reshape to ``merged``; size-1 axes left out."""
    split, perm = step.compact()
    split = [batch, *split[1:]]
    if not step.is_identity:
        x = b.reshape(f"{part}/split", x, split)
        x = b.op(
            "Transpose", f"{part}/Transpose", [x], [split[p] for p in perm], attrs={"perm": perm}
        )
    return b.reshape(f"{part}/merge", x, merged)


def _route(b: _Builder, tensor: gs.Variable, y: gs.Variable) -> None:
    """Make the node that produced ``tensor`` produce ``y``, the Conv's output, instead."""
    producer = next(node for node in reversed(b.nodes) if tensor in node.outputs)
    producer.outputs = [y]


def relative_logits(b: _Builder, plan: AttentionPlan) -> gs.Variable:
    """Section 2's quadratic relative logits ``-ALPHA * |d - offset_h|^2``, ``[q, heads, K]``
    float32, built in-graph from coordinate vectors.

    For the ``q`` queries and ``K`` keys of one block (global: the kept queries and every
    token). Differences first, then squares, in float32, so nothing overflows; its inputs
    are constants, so runtimes fold it at load time.
    """
    q, k, heads = len(query_coordinates(plan)[0]), plan.keys, plan.heads
    squared = None
    for axis, (queries, keys, offsets) in enumerate(
        zip(query_coordinates(plan), key_coordinates(plan), head_offset_coordinates(plan))
    ):
        tag = f"{names.LOGITS}/axis{axis}"
        query_pos = b.constant(f"{tag}/query_coords", queries.reshape(q, 1, 1))
        key_pos = b.constant(f"{tag}/key_coords", keys.reshape(1, 1, k))
        relative = b.op("Sub", f"{tag}/relative", [key_pos, query_pos], [q, 1, k], np.float32)
        offset_const = b.constant(f"{tag}/head_offsets", offsets.reshape(1, heads, 1))
        delta = b.op("Sub", f"{tag}/delta", [relative, offset_const], [q, heads, k], np.float32)
        square = b.op("Mul", f"{tag}/square", [delta, delta], [q, heads, k], np.float32)
        squared = (
            square
            if squared is None
            else b.op("Add", f"{tag}/sum", [squared, square], [q, heads, k], np.float32)
        )
    scale = b.constant(f"{names.LOGITS}/scale", np.array(-ALPHA, dtype=np.float32))
    return b.op("Mul", f"{names.LOGITS}/Mul", [squared, scale], [q, heads, k], np.float32)


def _attention_matrix(b: _Builder, plan: AttentionPlan) -> gs.Variable:
    """Softmax of ``relative_logits``. Attend-first: ``[q * heads, K]``, row ``(query,
    head)`` (``[q, heads, K]`` where the plan narrows its values). Project-first: ``[q, K *
    heads]``, column ``(key, head)``. Each row is one-hot (section 2). Cast to the model's
    type after the softmax."""
    logits = relative_logits(b, plan)
    q, heads, k = logits.shape
    rows = b.static_reshape(f"{names.LOGITS}/rows", logits, [q * heads, k])
    probs = b.op("Softmax", names.SOFTMAX, [rows], [q * heads, k], np.float32, attrs={"axis": 1})
    if plan.order is Order.PROJECT_FIRST:
        grouped = b.static_reshape(f"{names.SOFTMAX}/by_head", probs, [q, heads, k])
        keys_first = b.op(
            "Transpose",
            f"{names.SOFTMAX}/Transpose",
            [grouped],
            [q, k, heads],
            np.float32,
            {"perm": [0, 2, 1]},
        )
        probs = b.static_reshape(f"{names.SOFTMAX}/key_head", keys_first, [q, k * heads])
    elif plan.narrows_values:  # each head's rows are taken apart (``_attend_narrowed``)
        probs = b.static_reshape(f"{names.SOFTMAX}/by_head", probs, [q, heads, k])
    if b.dtype != np.float32:
        to = helper.np_dtype_to_tensor_dtype(b.dtype)
        probs = b.op("Cast", f"{names.SOFTMAX}/Cast", [probs], probs.shape, attrs={"to": to})
    return probs


def _subsample(b: _Builder, x: gs.Variable, plan: AttentionPlan, batch: Dim) -> gs.Variable:
    """Every s-th row of the padded input along kernel-1 axes (``geometry.subsampled``)."""
    source, rank = plan.source, plan.spec.rank
    axes = [i for i, step in enumerate(plan.input_steps) if step > 1]
    begin = [source.pads_begin[i] if i in axes else 0 for i in range(rank)]
    end = [source.pads_end[i] if i in axes else 0 for i in range(rank)]
    padded = [n + pb + pe for n, pb, pe in zip(source.input_size, begin, end)]
    x = _pad(b, "subsample", x, begin, end, [batch, source.in_channels, *padded])
    out = source.output_size
    return b.op(
        "Slice",
        "subsample/Slice",
        [
            x,
            b.int64("subsample/starts", [0] * len(axes)),
            b.int64("subsample/ends", [(out[i] - 1) * source.strides[i] + 1 for i in axes]),
            b.int64("subsample/axes", [2 + i for i in axes]),
            b.int64("subsample/steps", [source.strides[i] for i in axes]),
        ],
        [batch, source.in_channels, *plan.spec.input_size],
    )


def _patchify(b: _Builder, x: gs.Variable, plan: AttentionPlan, batch: Dim) -> gs.Variable:
    """The padded input [B, C, T1*P1, T2*P2] as tokens [B, (g,) N, Dg_in].

    The steps are ``plan.patchify_layout()``. Ungrouped, channels-last: NCHW -> NHWC, then
    whole pixel rows move into patch order (onnxruntime moves contiguous runs an order of
    magnitude faster than single elements). Grouped, channel-major: one Transpose, none
    for 1x1 patches of depthwise Convs.
    """
    spec = plan.spec
    layout = plan.patchify_layout()
    if plan.channels_last:
        tokens = [batch, plan.tokens, plan.in_dim]
        to_nhwc, shuffle = layout
        extent = [a.tokens_extent for a in plan.axes]
        x = _rearrange(b, "patchify/to_nhwc", x, to_nhwc, [batch, *extent, spec.in_channels], batch)
        return _rearrange(b, "patchify", x, shuffle, tokens, batch)
    tokens = [batch, spec.group, plan.tokens, plan.group_in_dim]
    return _rearrange(b, "patchify", x, layout[0], tokens, batch)


def _unpatchify(
    b: _Builder, values: gs.Variable, plan: AttentionPlan, batch: Dim, y: gs.Variable
) -> None:
    """Output tokens [B, (g,) (blocks,) q, Dg_out] as the Conv's output ``y`` [B, C_out, Ho, Wo].

    The steps are ``plan.unpatchify_layout()``; global attention is one block whose
    queries are the output patch grid. Channels-last crops before returning to NCHW.
    """
    spec = plan.spec
    full = [a.queries * a.patch for a in plan.axes]
    out_size = list(spec.output_size)
    channels = spec.out_channels
    layout = plan.unpatchify_layout()
    if plan.channels_last:
        shuffle, to_nchw = layout
        out = _rearrange(b, "unpatchify", values, shuffle, [batch, *full, channels], batch)
        if full != out_size:
            out = _slice(
                b, "crop_output", out, out_size, first_axis=1, shape=[batch, *out_size, channels]
            )
        out = _rearrange(b, "unpatchify/to_nchw", out, to_nchw, [batch, channels, *out_size], batch)
    else:
        out = _rearrange(b, "unpatchify", values, layout[0], [batch, channels, *full], batch)
        if full != out_size:
            out = _slice(
                b, "crop_output", out, out_size, first_axis=2, shape=[batch, channels, *out_size]
            )
    _route(b, out, y)


def _pad(
    b: _Builder, part: str, x: gs.Variable, begin: list[int], end: list[int], shape: list[Dim]
) -> gs.Variable:
    """Zero padding of the spatial axes; nothing when there is none."""
    if not any(begin) and not any(end):
        return x
    fill = [] if b.pad_value is None else [b.pad_value]
    return b.op(
        "Pad",
        f"{part}/Pad",
        [x, b.int64(f"{part}/pads", [0, 0, *begin, 0, 0, *end]), *fill],
        shape,
        attrs={"mode": "constant"},
    )


def _slice(
    b: _Builder, part: str, x: gs.Variable, ends: list[int], first_axis: int, shape: list[Dim]
) -> gs.Variable:
    rank = len(ends)
    return b.op(
        "Slice",
        f"{part}/Slice",
        [
            x,
            b.int64(f"{part}/starts", [0] * rank),
            b.int64(f"{part}/ends", ends),
            b.int64(f"{part}/axes", list(range(first_axis, first_axis + rank))),
        ],
        shape,
    )


def _depthwise_projection(
    b: _Builder,
    attended: gs.Variable,
    plan: AttentionPlan,
    lead: list[Dim],
    projection: np.ndarray,
    bias: np.ndarray,
) -> gs.Variable:
    """Per-channel output projection of a depthwise Conv, as a broadcast Mul and a ReduceSum.

    ``attended`` [.., q * heads, P * C] (one attention for every channel) becomes
    [.., q, heads * P, 1, C, 1]; W_O, per channel ``[C, heads * P, p * m]``, is stored as
    ``[heads * P, p, C, m]``; the sum over (head, input pixel) leaves [.., q, p, C, m],
    the channels-last output patch. No zero blocks are stored or multiplied.
    """
    taps = plan.heads * math.prod(plan.in_patch)
    weight = b.weight(names.PROJECTION, depthwise_layout(plan, projection))
    return _per_channel_sum(b, attended, plan, lead, taps, weight, bias)


def _folded_heads(
    b: _Builder,
    plan: AttentionPlan,
    attention: gs.Variable,
    projection: np.ndarray,
    rows_first: bool = False,
) -> gs.Variable:
    """The projection of a plan that folds its heads (``AttentionPlan.folds_heads``):
    each head's one-hot attention ``[heads, K]`` over the block's K keys times its rows
    of W_O, summed over the heads. Ungrouped: ``[K * D_in, D_out]``, rows (key, feature);
    ``rows_first`` (``_gathers_rows_first``): rows (window column, feature, window row);
    depthwise: ``[K * P, p, C, m]``, one weight per key pixel and output feature. Every
    input is a constant, so runtimes compute it once, at load time."""
    if plan.depthwise:
        weight = b.weight(names.PROJECTION, depthwise_layout(plan, projection))
        rows = plan.keys * math.prod(plan.in_patch)
        outputs = list(weight.shape[1:])  # [p, C, m]; W_O's taps: (head, input pixel)
    else:
        weight = b.weight(names.PROJECTION, projection.reshape(projection.shape[1:]))
        rows, outputs = plan.keys * plan.in_dim, [plan.out_dim]
    heads, keys = plan.heads, plan.keys
    width = weight.shape[0] // heads * math.prod(outputs)
    per_head = b.static_reshape(f"{names.FOLD}/per_head", weight, [heads, width])
    # attention^T @ W_O: transA keeps the graph free of a Transpose node
    folded = b.op(
        "Gemm", f"{names.FOLD}/Gemm", [attention, per_head], [keys, width], attrs={"transA": 1}
    )
    if rows_first:
        window = [a.window for a in plan.axes]
        by_key = b.static_reshape(f"{names.FOLD}/by_key", folded, [*window, plan.in_dim, *outputs])
        folded = b.op(
            "Transpose",
            f"{names.FOLD}/by_column",
            [by_key],
            [window[1], plan.in_dim, window[0], *outputs],
            attrs={"perm": [1, 2, 0, 3]},
        )
    return b.static_reshape(f"{names.FOLD}/rows", folded, [rows, *outputs])


def _per_channel_sum(
    b: _Builder,
    source: gs.Variable,
    plan: AttentionPlan,
    lead: list[Dim],
    taps: int,
    weight: gs.Tensor,
    bias: np.ndarray,
) -> gs.Variable:
    """``source`` [.., q * taps / P, P * C] as [.., q, taps, 1, C, 1] times ``weight``
    ``[taps, p, C, m]``, summed over the taps, plus the bias: [.., q, p * C * m]."""
    spec = plan.spec
    channels, multiplier = spec.in_channels, spec.out_channels // spec.group
    pixels = math.prod(plan.patch)
    q = plan.block_queries
    split = b.reshape("concat_heads", source, [*lead, q, taps, 1, channels, 1])
    product = b.op(
        "Mul", "proj/Mul", [split, weight], [*lead, q, taps, pixels, channels, multiplier]
    )
    axis = len(lead) + 1
    summed_shape = [*lead, q, pixels, channels, multiplier]
    summed = b.reduce_sum("proj/ReduceSum", product, axis, summed_shape, "proj/axes")
    flat = b.reshape("proj/merge", summed, [*lead, q, plan.out_dim])
    return _add_bias(b, flat, depthwise_bias_layout(plan, bias), [*lead, q, plan.out_dim])


def _add_bias(b: _Builder, x: gs.Variable, bias: np.ndarray, shape: list[Dim]) -> gs.Variable:
    """``x`` plus ``bias`` (broadcast to ``shape``, the shape of ``x``), as ``proj/Add``;
    ``x`` itself where the bias is zero.

    A bias of one token's features over a tensor static past its batch axis is added over
    rows of k tokens where ``b.wide_rows`` asks for it (``WIDE_BIAS_ROW``): the
    tokens of one batch item are contiguous, so k of them side by side are one row and the
    bias repeated k times is that row's bias."""
    if not bias.any():  # no bias, or one carried into the product (``graph.bias_channel``)
        return x
    width = shape[-1]
    static = all(isinstance(d, int) for d in shape[1:])
    tokens = math.prod(shape[1:-1]) if static else 0
    side_by_side = 1
    if b.wide_rows and tokens and bias.size == width:
        side_by_side = max(
            k for k in range(1, max(WIDE_BIAS_ROW // width, 1) + 1) if tokens % k == 0
        )
    if side_by_side == 1:
        return b.op("Add", "proj/Add", [x, b.weight(names.BIAS, bias)], shape)
    rows = [shape[0], tokens // side_by_side, side_by_side * width]
    # The layer keeps one bias initializer of one token's features (what the PyTorch
    # import reads); the repeated row is computed from it, once, when a runtime loads.
    row_bias = b.op(
        "Tile",
        "proj/bias_row",
        [b.weight(names.BIAS, bias.reshape(-1)), b.int64("proj/bias_row/repeats", [side_by_side])],
        [side_by_side * width],
    )
    wide = b.reshape("proj/bias_rows", x, rows)
    added = b.op("Add", "proj/Add", [wide, row_bias], rows)
    return b.reshape("proj/tokens", added, shape)


def _tokens(b: _Builder, x: gs.Variable, plan: AttentionPlan, batch: Dim) -> gs.Variable:
    """The Conv's input as tokens [B, (g,) N, D]: subsampled along kernel-1 strided axes,
    cropped to what an output reads, padded with the Conv's zeros to the token grid, and
    patchified."""
    return _patchify(b, _padded(b, x, plan, batch), plan, batch)


def _padded(b: _Builder, x: gs.Variable, plan: AttentionPlan, batch: Dim) -> gs.Variable:
    """The Conv's input on the token grid, NCHW: subsampled along kernel-1 strided axes,
    cropped to what an output reads, padded with the Conv's zeros."""
    spec = plan.spec
    if plan.subsamples:
        x = _subsample(b, x, plan, batch)
    extent = [a.tokens_extent for a in plan.axes]
    kept = [a.input_kept for a in plan.axes]
    if kept != list(spec.input_size):
        x = _slice(b, "crop_input", x, kept, first_axis=2, shape=[batch, spec.in_channels, *kept])
    pads_begin = [a.zeros_before for a in plan.axes]
    pads_end = [a.zeros_after for a in plan.axes]
    return _pad(b, "pad", x, pads_begin, pads_end, [batch, spec.in_channels, *extent])


def _gathers_rows_first(b: _Builder, plan: AttentionPlan) -> bool:
    """Whether the plan's key windows are gathered window rows first: where rows are laid
    out for the CPU (``b.wide_rows``) and the plan asks for it
    (``AttentionPlan.gathers_rows_first``). onnxruntime's Gather copies one contiguous
    run per index and pays per run; a stem's 3-channel pixels are 12-byte runs."""
    return b.wide_rows and plan.gathers_rows_first


def _window_row_tokens(b: _Builder, x: gs.Variable, plan: AttentionPlan, batch: Dim) -> gs.Variable:
    """The tokens of a rows-first plan (``_gathers_rows_first``): ``[B, Q1 * T2, C * k1]``,
    token ``(i, t)`` holding column ``t`` of block row ``i``'s k1 window rows, feature
    ``(c, a)``. The padded input's window rows are gathered along its height, NCHW, whole
    rows at a time, then moved channels-last in one Transpose."""
    padded = _padded(b, x, plan, batch)
    rows = window_coordinates(plan)[0]  # [Q1, k1]
    block_rows, window_rows = rows.shape
    channels, width = plan.in_dim, plan.axes[1].tokens_extent
    features = channels * window_rows
    gathered = b.op(
        "Gather",
        "window_rows/Gather",
        [padded, b.constant("window_rows/indices", rows.T)],
        [batch, channels, window_rows, block_rows, width],
        attrs={"axis": 2},
    )
    merged = b.reshape("window_rows/features", gathered, [batch, features, block_rows, width])
    moved = b.op(
        "Transpose",
        "window_rows/Transpose",
        [merged],
        [batch, block_rows, width, features],
        attrs={"perm": [0, 2, 3, 1]},
    )
    return b.reshape("window_rows/tokens", moved, [batch, block_rows * width, features])


def _window_columns(
    b: _Builder,
    plan: AttentionPlan,
    tokens: gs.Variable,
    weight: gs.Tensor,
    lead: list[Dim],
    g: list[int],
    bias: np.ndarray,
    blocks: slice,
) -> gs.Variable:
    """A rows-first plan's output ``[*lead, 1, D_out]``: each block's k2 window columns
    gathered out of its block row's window-row tokens (``_window_row_tokens``) and
    projected by ``weight``, the folded projection with rows (column, channel, row)."""
    rows, columns = window_coordinates(plan)  # [Q1, k1], [Q2, k2]
    width = plan.axes[1].tokens_extent
    starts = np.arange(len(rows))[:, None, None] * width
    indices = (starts + columns[None]).reshape(-1, columns.shape[1])[blocks]
    features = plan.in_dim * rows.shape[1]
    keys = b.op(
        "Gather",
        "Gather",
        [tokens, b.constant("window_indices", indices)],
        [*lead, columns.shape[1], features],
        attrs={"axis": 1},
    )
    flat = b.reshape("concat_heads", keys, [*lead, 1, columns.shape[1] * features])
    return _project(b, plan, flat, lead, g, weight, bias)


def _windows_side_by_side(b: _Builder, plan: AttentionPlan, blocks: int) -> int:
    """How many of ``blocks`` one-query windows of a folded depthwise plan sum their taps
    side by side (``WIDE_TAP_ROW``): the most that divide ``blocks`` and fit a row. Only
    one-pixel tokens and outputs with one feature per channel (a window's taps are then
    one channel-wide row each); 1 where rows stay one window wide."""
    spec = plan.spec
    one_pixel = math.prod(plan.in_patch) == 1 and math.prod(plan.patch) == 1
    if not (b.wide_rows and plan.depthwise and one_pixel and spec.out_channels == spec.group):
        return 1
    limit = max(WIDE_TAP_ROW // spec.in_channels, 1)
    return max(k for k in range(1, min(limit, blocks) + 1) if blocks % k == 0)


def _depthwise_side_by_side(
    b: _Builder,
    plan: AttentionPlan,
    tokens: gs.Variable,
    weight: gs.Tensor,
    lead: list[Dim],
    bias: np.ndarray,
    blocks: slice,
    side_by_side: int,
) -> gs.Variable:
    """A folded depthwise plan's output ``[*lead, 1, C]``, its windows summed k at a time:
    the Gather writes ``[.., n / k, taps, k, C]`` (indices ``[n / k, taps, k]``), each tap's
    k windows one row, times the taps' weights repeated k times along the row, summed over
    the taps. The same products and sums as ``_per_channel_sum``, in wider rows."""
    channels, taps, k = plan.spec.in_channels, plan.keys, side_by_side
    *outer, n = lead
    groups = n // k
    indices = window_indices(plan)[blocks].reshape(groups, k, taps).transpose(0, 2, 1)
    gathered = b.op(
        "Gather",
        "Gather",
        [tokens, b.constant("window_indices", np.ascontiguousarray(indices))],
        [*outer, groups, taps, k, channels],
        attrs={"axis": len(outer)},
    )
    rows = b.reshape("concat_heads", gathered, [*outer, groups, taps, k * channels])

    def repeated(layer: _Builder) -> gs.Variable:
        per_tap = layer.static_reshape(f"proj/side_by_side{k}/taps", weight, [taps, 1, channels])
        tiled = layer.op(
            "Tile",
            f"proj/side_by_side{k}/Tile",
            [per_tap, layer.int64(f"proj/side_by_side{k}/repeats", [1, k, 1])],
            [taps, k, channels],
        )
        return layer.static_reshape(f"proj/side_by_side{k}", tiled, [taps, k * channels])

    row_weight = b.once(f"proj/side_by_side{k}", repeated)
    product = b.op("Mul", "proj/Mul", [rows, row_weight], [*outer, groups, taps, k * channels])
    summed = b.reduce_sum(
        "proj/ReduceSum", product, len(outer) + 1, [*outer, groups, k * channels], "proj/axes"
    )
    shape = [*lead, 1, channels]
    flat = b.reshape("proj/merge", summed, shape)
    return _add_bias(b, flat, depthwise_bias_layout(plan, bias), shape)


def _key_windows(
    b: _Builder,
    plan: AttentionPlan,
    lead: list[Dim],
    group_axes: int,
    blocks: slice = slice(None),
) -> Callable[[gs.Variable, int], gs.Variable]:
    """Local attention: [B, (g,) N, dim] -> [B, (g,) blocks, K, dim], each block's keys
    and its halo, gathered (only the ``blocks`` of one tile); global attention attends to
    every token as it is."""
    if plan.attention is not Attention.LOCAL:
        return lambda values, dim, part="Gather": values
    indices = b.constant("window_indices", window_indices(plan)[blocks])

    def windows(values: gs.Variable, dim: int, part: str = "Gather") -> gs.Variable:
        return b.op(
            "Gather",
            part,
            [values, indices],
            [*lead, plan.keys, dim],
            attrs={"axis": group_axes + 1},
        )

    return windows


def _attend(
    b: _Builder,
    plan: AttentionPlan,
    attention: gs.Variable,
    values: gs.Variable,
    windows: Callable[[gs.Variable, int], gs.Variable],
    lead: list[Dim],
    dim: int,
) -> gs.Variable:
    """Attention ``[q * heads, K]`` times each block's keys: ``[*lead, q * heads, dim]``.

    A single-key plan (``AttentionPlan.single_key``; here a depthwise one: the others fold
    the attention into W_O, ``_single_key``) has one key per block, the block's own token,
    so its windows are the tokens in order: the ``[1, 1]`` attention multiplies every token
    in one product per batch item (and group), where a product per block would pay a call
    each (about 100 ns on the CPU, more than the product)."""
    rows = plan.block_queries * plan.heads
    if not plan.single_key:
        return b.op("MatMul", "MatMul", [attention, windows(values, dim)], [*lead, rows, dim])
    *outer, blocks = lead
    flat = b.reshape("attend/flat", values, [*outer, 1, blocks * dim])
    attended = b.op("MatMul", "MatMul", [attention, flat], [*outer, 1, blocks * dim])
    return b.reshape("attend/blocks", attended, [*lead, rows, dim])


def _attend_narrowed(
    b: _Builder,
    plan: AttentionPlan,
    attention: gs.Variable,
    tokens: gs.Variable,
    lead: list[Dim],
) -> gs.Variable:
    """``attend_narrowed`` over channels-last tokens [*lead, N, D_in]:
    ``[*lead, q, value_dim]``."""
    n, channels = plan.tokens, plan.spec.in_channels
    pixels = b.reshape("heads/pixels", tokens, [*lead, n, *plan.in_patch, channels])

    def values(part: str, sliced: gs.Variable, dim: int) -> gs.Variable:
        return b.reshape(part, sliced, [*lead, n, dim])

    attended = attend_narrowed(b, plan, attention, tokens, pixels, len(lead) + 1, values)
    attended.shape = [*lead, plan.queries, plan.value_dim]
    return attended


def attend_narrowed(
    b: _Builder,
    plan: AttentionPlan,
    attention: gs.Variable,
    tokens: gs.Variable,
    pixels: gs.Variable,
    first_pixel_axis: int,
    values: Callable[[str, gs.Variable, int], gs.Variable],
) -> gs.Variable:
    """Global attention whose heads hold only the pixels they read
    (``AttentionPlan.narrows_values``): per head, its rows of the attention ``[q, heads,
    N]`` times those pixels of every token, the heads concatenated along the last axis.
    ``pixels`` is ``tokens`` with each token's pixels on axes from ``first_pixel_axis``
    on; ``values(part, sliced, dim)`` lays a head's slice of it out as tokens of ``dim``
    features. The attention's rows per head are slices of constants (static sizes), which
    a runtime folds at load time."""
    rank = plan.spec.rank
    attended = []
    for head, (spans, dim) in enumerate(zip(plan.value_spans, plan.head_in_dims, strict=True)):
        if dim == 0:  # a dilated kernel's taps may skip a token entirely
            continue
        part = f"head{head}"
        index = b.scalar(f"{part}/index", np.array(head, dtype=np.int64))
        rows = b.op("Gather", f"{part}/attention", [attention, index], None, attrs={"axis": 1})
        keys = tokens
        if dim < plan.in_dim:  # the first head usually reads its whole key
            starts, stops = zip(*spans)
            inputs = [
                pixels,
                b.int64(f"{part}/starts", starts),
                b.int64(f"{part}/ends", stops),
                b.int64(f"{part}/axes", list(range(first_pixel_axis, first_pixel_axis + rank))),
            ]
            keys = values(f"{part}/values", b.op("Slice", f"{part}/Slice", inputs, None), dim)
        attended.append(b.op("MatMul", f"{part}/MatMul", [rows, keys], None, tokens.dtype))
    return b.op("Concat", "concat_heads", attended, None, tokens.dtype, attrs={"axis": -1})


def _attend_and_project(
    b: _Builder,
    plan: AttentionPlan,
    tokens: gs.Variable,
    attention: gs.Variable,
    windows: Callable[[gs.Variable, int], gs.Variable],
    lead: list[Dim],
    g: list[int],
    projection: np.ndarray,
    bias: np.ndarray,
) -> gs.Variable:
    """Attention and output projection in ``plan.order``, plus the bias: the output
    tokens [*lead, q, Dg_out]."""
    q, k, heads = plan.block_queries, plan.keys, plan.heads
    dim_in = plan.in_dim if plan.channels_last else plan.group_in_dim
    out_dim = plan.group_out_dim
    if plan.single_key:
        return _single_key(b, plan, tokens, attention, lead, g, projection, bias)
    if plan.narrows_values:
        heads_concat = _attend_narrowed(b, plan, attention, tokens, lead)
        return project_heads(b, plan, heads_concat, lead, g, projection, bias)
    if plan.order is Order.ATTEND_FIRST:
        # (query, head) rows: the heads of one query are adjacent, so concatenation is a Reshape.
        attended = _attend(b, plan, attention, tokens, windows, lead, dim_in)
        heads_concat = b.reshape("concat_heads", attended, [*lead, q, heads * dim_in])
        return project_heads(b, plan, heads_concat, lead, g, projection, bias)
    batch = lead[0]
    weight = b.constant(names.PROJECTION, projection.reshape(_weight_shape(plan, projection, g)))
    per_head = b.op(
        "MatMul", "proj/MatMul", [tokens, weight], [batch, *g, plan.tokens, heads * out_dim]
    )
    keys = windows(per_head, heads * out_dim)
    stacked = b.reshape("stack_heads", keys, [*lead, k * heads, out_dim])
    projected = b.op("MatMul", "MatMul", [attention, stacked], [*lead, q, out_dim])
    return add_bias(b, plan, projected, lead, g, bias)


def _single_key(
    b: _Builder,
    plan: AttentionPlan,
    tokens: gs.Variable,
    attention: gs.Variable,
    lead: list[Dim],
    g: list[int],
    projection: np.ndarray,
    bias: np.ndarray,
) -> gs.Variable:
    """A single-key plan (``AttentionPlan.single_key``) in either order: each query's one
    key is its block's own token, weighted by the softmax over that one key (exactly 1).
    That ``[1, 1]`` attention, a constant, multiplies W_O (``fold/Mul``, computed once at
    load time), and the tokens are projected as they are: no product by the attention,
    which would be a pass over every token."""
    # one head: W_O's rows are the input features in either order
    weight = b.weight(names.PROJECTION, projection.reshape(_weight_shape(plan, projection, g)))
    # named under the Softmax: what follows it up to the fold stays float32 (``names``)
    one = b.static_reshape(f"{names.SOFTMAX}/one", attention, [1] * len(weight.shape))
    folded = b.op("Mul", f"{names.FOLD}/Mul", [weight, one], list(weight.shape))
    dim_in = plan.in_dim if plan.channels_last else plan.group_in_dim
    queries = b.reshape("concat_heads", tokens, [*lead, plan.block_queries, dim_in])
    return _project(b, plan, queries, lead, g, folded, bias)


def _weight_shape(plan: AttentionPlan, projection: np.ndarray, g: list[int]) -> list[int]:
    """W_O as ``[g, rows, cols]``; g == 1 drops the group axis, and grouped local attention
    that projects [B, g, blocks, ..] (attending first, or a single key in either order)
    needs a broadcast axis for the blocks."""
    weight_shape = list(projection.shape) if g else list(projection.shape[1:])
    blocks_first = plan.order is Order.ATTEND_FIRST or plan.single_key
    if plan.attention is Attention.LOCAL and g and blocks_first:
        weight_shape.insert(1, 1)
    return weight_shape


def project_heads(
    b: _Builder,
    plan: AttentionPlan,
    heads_concat: gs.Variable,
    lead: list[Dim],
    g: list[int],
    projection: np.ndarray,
    bias: np.ndarray,
) -> gs.Variable:
    """The concatenated heads [*lead, q, heads * Dg_in] times W_O, plus the bias."""
    weight = b.weight(names.PROJECTION, projection.reshape(_weight_shape(plan, projection, g)))
    return _project(b, plan, heads_concat, lead, g, weight, bias)


def _project(
    b: _Builder,
    plan: AttentionPlan,
    features: gs.Variable,
    lead: list[Dim],
    g: list[int],
    weight: gs.Tensor,
    bias: np.ndarray,
) -> gs.Variable:
    """``features`` [*lead, q, rows] times ``weight`` [(g,) rows, Dg_out], plus the bias."""
    shape = [*lead, plan.block_queries, plan.group_out_dim]
    projected = b.op("MatMul", "proj/MatMul", [features, weight], shape)
    return add_bias(b, plan, projected, lead, g, bias)


def add_bias(
    b: _Builder,
    plan: AttentionPlan,
    projected: gs.Variable,
    lead: list[Dim],
    g: list[int],
    bias: np.ndarray,
) -> gs.Variable:
    out_dim = plan.group_out_dim
    local = plan.attention is Attention.LOCAL
    bias_shape = [g[0], *([1] if local else []), 1, out_dim] if g else [out_dim]
    return _add_bias(b, projected, bias.reshape(bias_shape), [*lead, plan.block_queries, out_dim])


def emit_attention(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    y: gs.Variable,
    plan: AttentionPlan,
    projection: np.ndarray,
    bias: np.ndarray,
    batch: Dim,
    tiles: int = 1,
    wide_rows: bool = False,
) -> list[gs.Node]:
    """Append the attention subgraph computing ``y`` from ``x`` to ``graph``.

    ``projection`` and ``bias`` come from ``weights.output_projection`` and
    ``weights.output_bias``; ``batch`` is the batch dimension (an int or a symbol);
    ``tiles``: split a tileable plan's blocks into this many tiles
    (``AttentionPlan.tiles``); ``wide_rows``: add the bias over rows of several tokens
    (``WIDE_BIAS_ROW``) and sum a folded depthwise plan's taps over rows of several
    windows (``WIDE_TAP_ROW``). The caller detaches the Conv that produced ``y``.
    """
    if tiles > 1 and not (plan.tileable and tiles <= plan.blocks):
        raise ValueError(
            f"{tiles} tiles for a plan with {plan.blocks} blocks (tileable: {plan.tileable})"
        )
    b = _Builder(graph, prefix, np.dtype(projection.dtype), wide_rows=wide_rows)
    rows_first = _gathers_rows_first(b, plan)
    tokens = (_window_row_tokens if rows_first else _tokens)(b, x, plan, batch)
    # One token holds every channel (channels-last), or one group's channels.
    g = [] if plan.channels_last or plan.spec.group == 1 else [plan.spec.group]
    # Local attention works on [B, g, blocks, ...]; global attention is one block.
    lead = [batch, *g, plan.blocks] if plan.attention is Attention.LOCAL else [batch, *g]
    attention = _attention_matrix(b, plan)
    if plan.folds_heads:
        attention = _folded_heads(b, plan, attention, projection, rows_first)
    if tiles == 1:
        projected = _blocks(b, plan, tokens, attention, lead, g, projection, bias)
    else:
        # Blocks are independent: each tile gathers, attends and projects its own, so
        # its intermediates stay in cache; the output tokens are the tiles' in order.
        bounds = np.linspace(0, plan.blocks, tiles + 1).astype(int)
        parts = [
            _blocks(
                b.tile(f"tile{index}"),
                plan,
                tokens,
                attention,
                [*lead[:-1], int(last - first)],
                g,
                projection,
                bias,
                slice(first, last),
            )
            for index, (first, last) in enumerate(itertools.pairwise(bounds))
        ]
        shape = [*lead, *parts[0].shape[len(lead) :]]
        projected = b.op("Concat", "tiles/Concat", parts, shape, attrs={"axis": len(lead) - 1})
    _unpatchify(b, projected, plan, batch, y)
    return b.nodes


def _blocks(
    b: _Builder,
    plan: AttentionPlan,
    tokens: gs.Variable,
    attention: gs.Variable,
    lead: list[Dim],
    g: list[int],
    projection: np.ndarray,
    bias: np.ndarray,
    blocks: slice = slice(None),
) -> gs.Variable:
    """The output tokens ``[*lead, q, Dg_out]`` of ``blocks`` (global: every token)."""
    if _gathers_rows_first(b, plan):  # ``attention`` holds the folded projection
        return _window_columns(b, plan, tokens, attention, lead, g, bias, blocks)
    if plan.folds_heads and isinstance(lead[-1], int):
        side_by_side = _windows_side_by_side(b, plan, lead[-1])
        if side_by_side > 1:  # ``attention`` holds the folded projection
            return _depthwise_side_by_side(
                b, plan, tokens, attention, lead, bias, blocks, side_by_side
            )
    windows = _key_windows(b, plan, lead, len(g), blocks)
    if plan.folds_heads:  # ``attention`` holds the folded projection
        keys = windows(tokens, plan.in_dim)
        if plan.depthwise:
            taps = plan.keys * math.prod(plan.in_patch)
            return _per_channel_sum(b, keys, plan, lead, taps, attention, bias)
        flat = b.reshape("concat_heads", keys, [*lead, 1, plan.keys * plan.in_dim])
        return _project(b, plan, flat, lead, g, attention, bias)
    if plan.depthwise:
        attended = _attend(b, plan, attention, tokens, windows, lead, plan.in_dim)
        return _depthwise_projection(b, attended, plan, lead, projection, bias)
    return _attend_and_project(b, plan, tokens, attention, windows, lead, g, projection, bias)
