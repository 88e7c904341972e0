"""Emission of the standard form: each Conv as one ONNX ``Attention`` operator (opset 23).

The same construction as ``emit`` (tokens, heads, W_O and bias are identical), written
so that a runtime or a reader sees multi-head self-attention with queries and keys:

    tokens [B, (g,) N, D]
      -> queries  Gather of each block's query tokens, times W_Q   [B', q, heads * KEY_DIM]
      -> keys     every token (local: the block's window), times W_K [B', K, kv * KEY_DIM]
      -> values   the tokens (attend-first, one value head shared by every query head)
                  or the tokens times W_O (project-first, one value head per head)
      -> Attention(Q, K, V, mask) with the relative-position logits as the additive
                  per-head mask [1, heads, q, K]   -> [B', q, heads * Dv]
      -> attend-first: W_O and bias; project-first: sum over heads and bias
      -> un-patchify, crop -> y

``B'`` folds the batch, the groups and local attention's blocks into the operator's batch
axis (its 3-D form). W_Q and W_K are zero in the exact construction, so ``q . k = 0`` and
the softmax is the one of section 2; they are real initializers, so the model can be
trained or edited as attention. In float16 the mask is computed in float32 (``logits/``,
which TensorRT keeps in float32) and clipped to -30000 before the cast (``mask/Cast``):
``exp(-30000)`` is 0 in every precision, and nothing overflows.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from conv2attn import names
from conv2attn.core.geometry import KEY_DIM, Attention, AttentionPlan, AutoPad, Order
from conv2attn.core.weights import query_indices
from conv2attn.graph.emit import (
    Dim,
    _Builder,
    _depthwise_projection,
    _key_windows,
    _tokens,
    _unpatchify,
    add_bias,
    project_heads,
    relative_logits,
)
from conv2attn.graph.emit_dynamic import _reshape, _slice_to, _window_indices, runtime_axes
from conv2attn.graph.emit_dynamic import _tokens as dynamic_tokens
from conv2attn.graph.emit_dynamic import _unpatchify as dynamic_unpatchify
from conv2attn.graph.emit_dynamic import relative_logits as dynamic_relative_logits

ATTENTION_OPSET = 23
# Where the mask is clipped before a cast to a reduced precision (see the module doc).
MASK_FLOOR = -30000.0


def attention_mask(b: _Builder, logits: gs.Variable, heads: int, shape: list[Dim]) -> gs.Variable:
    """Logits [q, heads, K] (float32) as the operator's mask [1, heads, q, K] in the
    model's type."""
    by_head = b.op(
        "Transpose", f"{names.LOGITS}/by_head", [logits], None, np.float32, {"perm": [1, 0, 2]}
    )
    mask = b.op(
        "Unsqueeze",
        f"{names.LOGITS}/mask",
        [by_head, b.int64(f"{names.LOGITS}/mask/axes", [0])],
        None,
        np.float32,
    )
    if b.dtype == np.float32:
        return mask
    floor = b.constant(f"{names.LOGITS}/floor", np.array(MASK_FLOOR, dtype=np.float32))
    clipped = b.op("Max", f"{names.LOGITS}/clip", [mask, floor], None, np.float32)
    to = helper.np_dtype_to_tensor_dtype(b.dtype)
    # outside logits/: a runtime keeps the logits in float32 and this cast in the model's type
    return b.op("Cast", "mask/Cast", [clipped], shape, b.dtype, {"to": to})


def folded(b: _Builder, part: str, x: gs.Variable, tail: list[int]) -> gs.Variable:
    """[..., *tail] -> [-1, *tail]: the leading axes as the operator's batch."""
    target = b.int64(f"{part}/shape", [-1, *tail])
    return b.op("Reshape", part, [x, target], None, x.dtype)


def attention_node(
    b: _Builder,
    queries: gs.Variable,
    keys: gs.Variable,
    values: gs.Variable,
    mask: gs.Variable,
    plan: AttentionPlan,
    kv_heads: int,
    token_dim: int,
) -> gs.Variable:
    """One ``Attention`` over folded queries [B', q, D], keys [B', K, D] and values
    [B', K, kv_heads * Dv]; W_Q and W_K [D, heads * KEY_DIM] are zero. [B', q, heads * Dv]."""
    w_q = b.constant("W_Q", np.zeros((token_dim, plan.heads * KEY_DIM), dtype=b.dtype))
    w_k = b.constant("W_K", np.zeros((token_dim, kv_heads * KEY_DIM), dtype=b.dtype))
    q = b.op("MatMul", "query/MatMul", [queries, w_q], None)
    k = b.op("MatMul", "key/MatMul", [keys, w_k], None)
    return b.op(
        "Attention",
        "Attention",
        [q, k, values, mask],
        None,
        attrs={"q_num_heads": plan.heads, "kv_num_heads": kv_heads},
    )


def _heads_output(
    b: _Builder,
    plan: AttentionPlan,
    attended: gs.Variable,
    lead: list[Dim],
    g: list[int],
    projection: np.ndarray,
    bias: np.ndarray,
) -> gs.Variable:
    """The operator's output [B', q, heads * Dv] as output tokens [*lead, q, Dg_out]."""
    q, heads = plan.block_queries, plan.heads
    inner = [int(d) for d in lead[1:]]
    if plan.depthwise:
        rows = b.op("Reshape", "Attention/rows", [attended, b.int64(
            "Attention/rows/shape", [-1, *inner, q * heads, plan.in_dim])], None)  # fmt: skip
        return _depthwise_projection(b, rows, plan, lead, projection, bias)
    if plan.order is Order.ATTEND_FIRST:
        dim_in = plan.in_dim if plan.channels_last else plan.group_in_dim
        concat = b.op("Reshape", "concat_heads", [attended, b.int64(
            "concat_heads/shape", [-1, *inner, q, heads * dim_in])], None)  # fmt: skip
        return project_heads(b, plan, concat, lead, g, projection, bias)
    out_dim = plan.group_out_dim
    split = b.op("Reshape", "split_heads", [attended, b.int64(
        "split_heads/shape", [-1, *inner, q, heads, out_dim])], None)  # fmt: skip
    summed = b.op(
        "ReduceSum",
        "sum_heads",
        [split, b.int64("sum_heads/axes", [-2])],
        [*lead, q, out_dim],
        attrs={"keepdims": 0},
    )
    return add_bias(b, plan, summed, lead, g, bias)


def emit_standard_attention(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    y: gs.Variable,
    plan: AttentionPlan,
    projection: np.ndarray,
    bias: np.ndarray,
    batch: Dim,
) -> list[gs.Node]:
    """``emit.emit_attention``'s subgraph with the attention as one ``Attention`` node."""
    b = _Builder(graph, prefix, np.dtype(projection.dtype))
    tokens = _tokens(b, x, plan, batch)
    g = [] if plan.channels_last or plan.spec.group == 1 else [plan.spec.group]
    local = plan.attention is Attention.LOCAL
    lead = [batch, *g, plan.blocks] if local else [batch, *g]
    dim_in = plan.in_dim if plan.channels_last else plan.group_in_dim
    token_axis = len(g) + 1
    windows = _key_windows(b, plan, lead, len(g))
    indices = query_indices(plan) if local else query_indices(plan)[0]
    query_tokens = b.op(
        "Gather",
        "query/Gather",
        [tokens, b.constant("query/indices", indices)],
        [*lead, plan.block_queries, dim_in],
        attrs={"axis": token_axis},
    )
    project_first = plan.order is Order.PROJECT_FIRST and not plan.depthwise
    if project_first:
        width = plan.heads * plan.group_out_dim
        weight = projection.reshape(projection.shape if g else projection.shape[1:])
        per_head = b.op(
            "MatMul",
            "proj/MatMul",
            [tokens, b.constant(names.PROJECTION, weight)],
            [batch, *g, plan.tokens, width],
        )
    keys = windows(tokens, dim_in)
    if project_first:
        values = windows(per_head, width, "value/Gather")
        kv_heads, value_dim = plan.heads, plan.group_out_dim
    else:
        values, kv_heads, value_dim = keys, 1, dim_in
    logits = relative_logits(b, plan)
    mask = attention_mask(b, logits, plan.heads, [1, plan.heads, plan.block_queries, plan.keys])
    folded_keys = folded(b, "key/fold", keys, [plan.keys, dim_in])
    attended = attention_node(
        b,
        folded(b, "query/fold", query_tokens, [plan.block_queries, dim_in]),
        folded_keys,
        folded_keys
        if values is keys
        else folded(b, "value/fold", values, [plan.keys, kv_heads * value_dim]),
        mask,
        plan,
        kv_heads,
        dim_in,
    )
    projected = _heads_output(b, plan, attended, lead, g, projection, bias)
    _unpatchify(b, projected, plan, batch, y)
    return b.nodes


def _first_positions(
    b: _Builder, m, part: str, x: gs.Variable, extents: list, counts: list, lead: list, dim: int
) -> gs.Variable:
    """Tokens [*lead, prod(extents), dim] laid out row-major over ``extents``: the first
    ``counts`` positions of each axis, [*lead, prod(counts), dim]."""
    grid = _reshape(b, m, f"{part}/grid", x, [*lead, *extents, dim])
    first_axis = len(lead)
    sliced = _slice_to(b, m, f"{part}/first", grid, counts, first_axis)
    return _reshape(b, m, f"{part}/merge", sliced, [*lead, m.product(counts), dim])


def emit_dynamic_standard_attention(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    y: gs.Variable,
    plan: AttentionPlan,
    auto_pad: AutoPad,
    projection: np.ndarray,
    bias: np.ndarray,
    batch: Dim,
) -> list[gs.Node]:
    """``emit_dynamic.emit_dynamic_attention``'s subgraph with the attention as one
    ``Attention`` node: sizes from ``Shape(x)``, channel-major tokens [B, g, N, Dg].

    Queries are the first positions of the runtime token grid (global) or of each key
    window (local: a window starts at its block's first query)."""
    b = _Builder(graph, prefix, np.dtype(projection.dtype))
    m, axes = runtime_axes(b, x, plan, auto_pad)
    spec, heads = plan.spec, plan.heads
    local = plan.attention is Attention.LOCAL
    group, dim_in, dim_out = spec.group, plan.group_in_dim, plan.group_out_dim
    tokens = dynamic_tokens(b, m, x, plan, axes)  # [B, g, N, Dg]
    if local:
        indices = _window_indices(b, m, plan, axes)

        def windows(values: gs.Variable, part: str = "Gather") -> gs.Variable:
            return b.op("Gather", part, [values, indices], None, values.dtype, {"axis": 2})

        keys = windows(tokens)  # [B, g, blocks, K, Dg]
        lead: list = [0, group, -1]
        extents, counts = [a.window for a in plan.axes], [a.block for a in plan.axes]
    else:
        keys, lead = tokens, [0, group]
        extents, counts = [a.tokens for a in axes], [a.grid for a in axes]
    q = m.product(counts)
    query_tokens = _first_positions(b, m, "query", keys, extents, counts, lead, dim_in)
    if plan.order is Order.PROJECT_FIRST:
        weight = b.constant(names.PROJECTION, projection)  # [g, Dg_in, heads * Dg_out]
        per_head = b.op("MatMul", "proj/MatMul", [tokens, weight], None)
        values = windows(per_head, "value/Gather") if local else per_head
        kv_heads, value_dim = heads, dim_out
    else:
        values, kv_heads, value_dim = keys, 1, dim_in
    logits, _, k = dynamic_relative_logits(b, m, plan, axes)
    mask = attention_mask(b, logits, heads, None)
    folded_keys = _reshape(b, m, "key/fold", keys, [-1, k, dim_in])
    attended = attention_node(
        b,
        _reshape(b, m, "query/fold", query_tokens, [-1, q, dim_in]),
        folded_keys,
        folded_keys
        if values is keys
        else _reshape(b, m, "value/fold", values, [-1, k, kv_heads * value_dim]),
        mask,
        plan,
        kv_heads,
        dim_in,
    )
    blocks = [m.product([a.blocks for a in axes])] if local else []
    per_block = [1] if local else []
    if plan.order is Order.PROJECT_FIRST:
        split = _reshape(b, m, "split_heads", attended, [-1, group, *blocks, q, heads, dim_out])
        out = b.op(
            "ReduceSum",
            "sum_heads",
            [split, b.int64("sum_heads/axes", [-2])],
            None,
            attrs={"keepdims": 0},
        )
    else:
        concat = _reshape(b, m, "concat_heads", attended, [-1, group, *blocks, q, heads * dim_in])
        weight = projection.reshape(group, *per_block, *projection.shape[1:])
        out = b.op("MatMul", "proj/MatMul", [concat, b.constant(names.PROJECTION, weight)], None)
    bias_const = b.constant(names.BIAS, bias.reshape(group, *per_block, 1, dim_out))
    out = b.op("Add", "proj/Add", [out, bias_const], None)
    dynamic_unpatchify(b, m, out, plan, axes, y)
    return b.nodes
