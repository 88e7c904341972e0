"""Emission of the attention subgraph that replaces one Conv (onnx-graphsurgeon).

The only module that builds ONNX nodes. Every node and tensor is named
``<conv name>/attn/<part>`` so a converted graph reads well in Netron and diffs
cleanly. Only ops of opset 11 are used (Slice, Pad, Reshape, Transpose, Sub, Mul,
Add, Softmax, MatMul, Cast), with the forms that are identical in later opsets.

Dataflow (2-D shown, ``g`` is the group count; the group axis and every size-1 axis
are left out of the emitted shapes):

    x [B, C, H, W] -> crop/pad to the token grid -> [B, C, T1*P1, T2*P2]
      -> patchify     [B, g, N, Dg_in]                          (one Transpose)
      -> attention    softmax(-ALPHA * |d - offset_h|^2) @ tokens, heads interleaved
                      into the rows, so heads concatenate without a Transpose
      -> projection   MatMul with W_O (one per group) + bias    [B, g, N, Dg_out]
      -> un-patchify  [B, C_out, T1*p1, T2*p2]                  (one Transpose)
      -> crop         [B, C_out, Ho, Wo] = y
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from conv2attn.geometry import Attention, AttentionPlan, Order
from conv2attn.weights import (
    ALPHA,
    head_offset_coordinates,
    key_coordinates,
    query_coordinates,
    window_indices,
)

Dim = int | str | None


class _Builder:
    """Appends named nodes to a graph and tracks the static shape of what it makes."""

    def __init__(self, graph: gs.Graph, prefix: str, dtype: np.dtype):
        self.graph = graph
        self.prefix = prefix
        self.dtype = dtype
        self.nodes: list[gs.Node] = []

    def constant(self, part: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{part}", np.ascontiguousarray(values))

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
        if output is None:
            output = gs.Variable(
                f"{name}_output_0", dtype=dtype or self.dtype, shape=list(shape) if shape else None
            )
        node = gs.Node(op, name=name, attrs=attrs or {}, inputs=inputs, outputs=[output])
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return output

    def reshape(self, part: str, x: gs.Variable, shape: Sequence[Dim]) -> gs.Variable:
        """Reshape whose target copies the batch dimension (``0``), so it may stay symbolic."""
        if x.shape is not None and list(x.shape) == list(shape):
            return x
        target = [0, *shape[1:]]
        return self.op("Reshape", part, [x, self.int64(f"{part}/shape", target)], shape, x.dtype)

    def static_reshape(self, part: str, x: gs.Tensor, shape: Sequence[int]) -> gs.Variable:
        """Reshape of a tensor without a batch axis (the attention constants)."""
        return self.op("Reshape", part, [x, self.int64(f"{part}/shape", shape)], shape, x.dtype)


def _compact(shape: Sequence[Dim], perm: Sequence[int]) -> tuple[list[Dim], list[int]]:
    """Drop size-1 axes (never the batch axis) from a reshape target and its permutation."""
    kept = [axis for axis, size in enumerate(shape) if axis == 0 or size != 1]
    position = {axis: index for index, axis in enumerate(kept)}
    return [shape[a] for a in kept], [position[a] for a in perm if a in position]


def _rearrange(
    b: _Builder,
    part: str,
    x: gs.Variable,
    split: Sequence[Dim],
    perm: Sequence[int],
    merged: Sequence[Dim],
) -> gs.Variable:
    """Reshape to ``split``, permute, reshape to ``merged``: the patchify idiom."""
    split, perm = _compact(split, perm)
    if perm != sorted(perm):
        x = b.reshape(f"{part}/split", x, split)
        x = b.op(
            "Transpose", f"{part}/Transpose", [x], [split[p] for p in perm], attrs={"perm": perm}
        )
    return b.reshape(f"{part}/merge", x, merged)


def _attention_matrix(b: _Builder, plan: AttentionPlan) -> gs.Variable:
    """Softmax of the quadratic relative logits, built in-graph from coordinate vectors.

    For the ``q`` queries and ``K`` keys of one block (global: the kept queries and every
    token). Attend-first: ``[q * heads, K]``, row ``(query, head)``. Project-first:
    ``[q, K * heads]``, column ``(key, head)``. Each row is one-hot (section 2). Computed
    in float32 (differences first, then squares) and cast at the end, so nothing
    overflows in float16; its inputs are constants, so runtimes fold it at load time.
    """
    q, k, heads = len(query_coordinates(plan)[0]), plan.keys, plan.heads
    squared = None
    for axis, (queries, keys, offsets) in enumerate(
        zip(query_coordinates(plan), key_coordinates(plan), head_offset_coordinates(plan))
    ):
        tag = f"logits/axis{axis}"
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
    scale = b.constant("logits/scale", np.array(-ALPHA, dtype=np.float32))
    logits = b.op("Mul", "logits/Mul", [squared, scale], [q, heads, k], np.float32)
    rows = b.static_reshape("logits/rows", logits, [q * heads, k])
    probs = b.op("Softmax", "Softmax", [rows], [q * heads, k], np.float32, attrs={"axis": 1})
    if plan.order is Order.PROJECT_FIRST:
        grouped = b.static_reshape("Softmax/by_head", probs, [q, heads, k])
        keys_first = b.op(
            "Transpose",
            "Softmax/Transpose",
            [grouped],
            [q, k, heads],
            np.float32,
            {"perm": [0, 2, 1]},
        )
        probs = b.static_reshape("Softmax/key_head", keys_first, [q, k * heads])
    if b.dtype != np.float32:
        to = helper.np_dtype_to_tensor_dtype(b.dtype)
        probs = b.op("Cast", "Softmax/Cast", [probs], probs.shape, attrs={"to": to})
    return probs


def emit_attention(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    y: gs.Variable,
    plan: AttentionPlan,
    projection: np.ndarray,
    bias: np.ndarray,
    batch: Dim,
) -> list[gs.Node]:
    """Append the attention subgraph computing ``y`` from ``x`` to ``graph``.

    ``projection`` and ``bias`` come from ``weights.output_projection`` and
    ``weights.output_bias``; ``batch`` is the batch dimension (an int or a symbol).
    The caller detaches the Conv that produced ``y``.
    """
    spec = plan.spec
    rank = spec.rank
    dtype = np.dtype(projection.dtype)
    b = _Builder(graph, prefix, dtype)
    group = spec.group
    g = [group] if group > 1 else []
    local = plan.attention is Attention.LOCAL

    # Crop what no output reads, pad with the Conv's zeros up to the token grid.
    extent = [a.tokens_extent for a in plan.axes]
    if any(a.pad_end < 0 for a in plan.axes):
        kept = [n + min(a.pad_end, 0) for n, a in zip(spec.input_size, plan.axes)]
        x = b.op(
            "Slice",
            "crop_input/Slice",
            [
                x,
                b.int64("crop_input/starts", [0] * rank),
                b.int64("crop_input/ends", kept),
                b.int64("crop_input/axes", list(range(2, 2 + rank))),
            ],
            [batch, spec.in_channels, *kept],
        )
    pads_begin = [a.pad_begin for a in plan.axes]
    pads_end = [max(a.pad_end, 0) for a in plan.axes]
    if any(pads_begin) or any(pads_end):
        x = b.op(
            "Pad",
            "pad/Pad",
            [x, b.int64("pad/pads", [0, 0, *pads_begin, 0, 0, *pads_end])],
            [batch, spec.in_channels, *extent],
            attrs={"mode": "constant"},
        )

    # [B, g, Cg, T1, P1, T2, P2] -> [B, g, T1, T2, Cg, P1, P2] -> [B, g, N, Dg_in]
    split = [batch, group, spec.in_channels // group]
    for a in plan.axes:
        split += [a.tokens, a.in_patch]
    perm = [0, 1, *(3 + 2 * i for i in range(rank)), 2, *(4 + 2 * i for i in range(rank))]
    n = plan.tokens
    tokens = _rearrange(b, "patchify", x, split, perm, [batch, *g, n, plan.group_in_dim])

    # Local attention works on [B, g, blocks, ...]; global attention is one block.
    q, k, heads = plan.block_queries, plan.keys, plan.heads
    lead = [batch, *g, plan.blocks] if local else [batch, *g]
    attention = _attention_matrix(b, plan)
    if local:
        indices = b.constant("window_indices", window_indices(plan))

        def windows(values: gs.Variable, dim: int) -> gs.Variable:
            # [B, g, N, dim] -> [B, g, blocks, K, dim]: each block's keys and its halo
            return b.op(
                "Gather", "Gather", [values, indices], [*lead, k, dim], attrs={"axis": len(g) + 1}
            )

    # projection: [g, rows, cols]; g == 1 drops the group axis, and grouped local
    # attention projects [B, g, blocks, ..] so needs a broadcast axis for the blocks.
    weight_shape = list(projection.shape) if g else list(projection.shape[1:])
    if local and g and plan.order is Order.ATTEND_FIRST:
        weight_shape.insert(1, 1)
    weight = b.constant("W_O", projection.reshape(weight_shape))
    if plan.order is Order.ATTEND_FIRST:
        keys = windows(tokens, plan.group_in_dim) if local else tokens
        # (query, head) rows: the heads of one query are adjacent, so concatenation is a Reshape.
        attended = b.op(
            "MatMul", "MatMul", [attention, keys], [*lead, q * heads, plan.group_in_dim]
        )
        heads_concat = b.reshape("concat_heads", attended, [*lead, q, heads * plan.group_in_dim])
        projected = b.op(
            "MatMul", "proj/MatMul", [heads_concat, weight], [*lead, q, plan.group_out_dim]
        )
    else:
        per_head = b.op(
            "MatMul", "proj/MatMul", [tokens, weight], [batch, *g, n, heads * plan.group_out_dim]
        )
        keys = windows(per_head, heads * plan.group_out_dim) if local else per_head
        stacked = b.reshape("stack_heads", keys, [*lead, k * heads, plan.group_out_dim])
        projected = b.op("MatMul", "MatMul", [attention, stacked], [*lead, q, plan.group_out_dim])
    bias_shape = (
        [group, *([1] if local else []), 1, plan.group_out_dim] if g else [plan.group_out_dim]
    )
    bias_const = b.constant("bias", bias.reshape(bias_shape))
    projected = b.op("Add", "proj/Add", [projected, bias_const], [*lead, q, plan.group_out_dim])

    # [B, g, nb1, nb2, b1, b2, Cg_out, p1, p2] -> [B, g, Cg_out, nb1, b1, p1, nb2, b2, p2]
    #   -> [B, C_out, nb1*b1*p1, nb2*b2*p2]   (global: nb = 1, b = the query grid)
    blocks = [a.blocks for a in plan.axes]
    split = [batch, group, *blocks, *plan.block, spec.out_channels // group, *plan.patch]
    perm = [
        0,
        1,
        2 + 2 * rank,
        *itertools.chain.from_iterable(
            (2 + i, 2 + rank + i, 3 + 2 * rank + i) for i in range(rank)
        ),
    ]
    full = [a.queries * a.patch for a in plan.axes]
    out_size = list(spec.output_size)
    merged = _rearrange(b, "unpatchify", projected, split, perm, [batch, spec.out_channels, *full])
    if full != out_size:
        b.op(
            "Slice",
            "crop_output/Slice",
            [
                merged,
                b.int64("crop_output/starts", [0] * rank),
                b.int64("crop_output/ends", out_size),
                b.int64("crop_output/axes", list(range(2, 2 + rank))),
            ],
            None,
            output=y,
        )
    else:
        # Route the last node's output to y so everything downstream stays connected.
        b.nodes[-1].outputs = [y]
    return b.nodes
