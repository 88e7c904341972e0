"""Emission for integer Convs: ``ConvInteger`` and ``QLinearConv`` as integer attention.

The geometry, tokens and un-patchify are the float path's (``emit``); what differs is
the arithmetic, which stays in integers so the result is bit-identical:

    x [B, C, H, W] (int8/uint8) -> pad with the input's zero point (what the Conv pads
      with), patchify                                    [B, (g,) N, D]
      -> select     Gather of the token each (query, head) attends to: the one-hot
                    attention of docs/design.md section 2, which needs no arithmetic
                                                         [B, (g,) (blocks,) q, heads * D]
      -> project    MatMulInteger with W_O and the zero points (int32 accumulation)
      -> QLinearConv: + bias (int32), * (x_scale * w_scale / y_scale) in float32, rounded
                    half to even and saturated by QuantizeLinear: the operator's own
                    requantisation, step for step
      -> un-patchify, crop                               y (int32, or QLinearConv's type)
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from conv2attn import names
from conv2attn.core.geometry import Attention, AttentionPlan, AutoPad
from conv2attn.core.weights import column_channels, integer_projection, selection_indices
from conv2attn.graph.emit import Dim, _Builder, _tokens, _unpatchify
from conv2attn.graph.emit_dynamic import _tokens as dynamic_tokens
from conv2attn.graph.emit_dynamic import _unpatchify as dynamic_unpatchify
from conv2attn.graph.emit_dynamic import runtime_axes
from conv2attn.graph.emit_dynamic import selection_indices as dynamic_selection_indices
from conv2attn.graph.select import Quantization


def _scalar(b: _Builder, part: str, tensor: gs.Tensor) -> gs.Tensor:
    """``tensor`` as a 0-d tensor, as Pad and MatMulInteger want a per-tensor value."""
    if tensor.shape is not None and len(tensor.shape) == 0:
        return tensor
    if isinstance(tensor, gs.Constant):
        return b.scalar(part, np.asarray(tensor.values))
    return b.op("Reshape", f"{part}/Reshape", [tensor, b.int64(f"{part}/shape", [])], [])


def _input_zero_point(b: _Builder, quantization: Quantization) -> gs.Tensor:
    """The input's zero point as a 0-d tensor, also what padding fills in: ConvInteger and
    QLinearConv pad with it."""
    if quantization.x_zero_point is None:
        b.pad_value = b.scalar("x_zero_point", np.zeros((), quantization.x_dtype))
    else:
        b.pad_value = _scalar(b, "x_zero_point", quantization.x_zero_point)
    return b.pad_value


def _select(
    b: _Builder, tokens: gs.Variable, plan: AttentionPlan, lead: list[Dim], g: list[int]
) -> gs.Variable:
    """[B, (g,) N, D] -> [*lead, q, heads * D]: each query's key token per head."""
    dim = plan.in_dim if plan.channels_last else plan.group_in_dim
    indices = b.constant("select/indices", selection_indices(plan))
    rows = len(indices.values)
    gathered = b.op(
        "Gather", "select/Gather", [tokens, indices], [lead[0], *g, rows, dim],
        attrs={"axis": len(g) + 1},
    )  # fmt: skip
    return b.reshape("select/concat_heads", gathered, [*lead, plan.block_queries, plan.heads * dim])


def _project(
    b: _Builder,
    selected: gs.Variable,
    plan: AttentionPlan,
    lead: list[Dim],
    g: list[int],
    weight: np.ndarray,
    quantization: Quantization,
    x_zero: gs.Tensor,
) -> gs.Variable:
    """MatMulInteger of the selected tokens with W_O: int32 [*lead, q, Dg_out], or for a
    depthwise Conv under local attention (one token holds every channel) the channels-last
    output patch [*lead, q, p * C * m]."""
    projection, column_zero = integer_projection(
        plan, weight, quantization.w_zero_point, x_dtype=quantization.x_dtype
    )
    local = plan.attention is Attention.LOCAL
    q = plan.block_queries
    if plan.depthwise:
        return _project_depthwise(b, selected, plan, lead, projection, column_zero, x_zero)
    if g:  # [g, K, N], broadcast over the blocks of local attention
        shape = [g[0], *([1] if local else []), *projection.shape[1:]]
        zero_shape = [g[0], *([1] if local else []), 1, projection.shape[2]]
    else:
        shape, zero_shape = list(projection.shape[1:]), [projection.shape[2]]
    weight_const = b.constant("W_O", projection.reshape(shape))
    zero_const = b.constant("W_O/zero_point", column_zero.reshape(zero_shape))
    return b.op(
        "MatMulInteger",
        "proj/MatMulInteger",
        [selected, weight_const, x_zero, zero_const],
        [*lead, q, plan.group_out_dim],
        np.int32,
    )


def _project_depthwise(
    b: _Builder,
    selected: gs.Variable,
    plan: AttentionPlan,
    lead: list[Dim],
    projection: np.ndarray,
    column_zero: np.ndarray,
    x_zero: gs.Tensor,
) -> gs.Variable:
    """Per channel: [.., q, heads * P * C] -> [.., C, q, heads * P] @ [C, heads * P, p * m]
    -> the channels-last output patch [.., q, p * C * m]."""
    spec = plan.spec
    channels, multiplier = spec.in_channels, spec.out_channels // spec.group
    taps = plan.heads * math.prod(plan.in_patch)
    pixels = math.prod(plan.patch)
    q = plan.block_queries
    extra = len(lead) - 1  # the blocks axis of local attention
    split = b.reshape("proj/split", selected, [*lead, q, taps, channels])
    channel_axis = 2 + extra + 1
    perm = [0, channel_axis, *range(1, channel_axis)]  # [B, C, (blocks,) q, taps]
    by_channel = b.op(
        "Transpose", "proj/by_channel", [split], [lead[0], channels, *lead[1:], q, taps],
        attrs={"perm": perm},
    )  # fmt: skip
    broadcast = [1] * extra
    weight_const = b.constant("W_O", projection.reshape(channels, *broadcast, taps, -1))
    zero_const = b.constant("W_O/zero_point", column_zero.reshape(channels, *broadcast, 1, -1))
    product = b.op(
        "MatMulInteger",
        "proj/MatMulInteger",
        [by_channel, weight_const, x_zero, zero_const],
        [lead[0], channels, *lead[1:], q, pixels * multiplier],
        np.int32,
    )
    unsplit = b.reshape(
        "proj/unsplit", product, [lead[0], channels, *lead[1:], q, pixels, multiplier]
    )
    rank = 2 + extra + 3  # B, C, (blocks,) q, p, m
    perm = [0, *range(2, rank - 1), 1, rank - 1]  # [B, (blocks,) q, p, C, m]
    back = b.op(
        "Transpose", "proj/channels_last", [unsplit],
        [*lead, q, pixels, channels, multiplier], attrs={"perm": perm},
    )  # fmt: skip
    return b.reshape("proj/merge", back, [*lead, q, plan.out_dim])


def _output_channels(plan: AttentionPlan) -> np.ndarray:
    """The output channel of every feature of the projected tokens: ``[g, Dg_out]``, or
    ``[p * C * m]`` for the depthwise form."""
    if not plan.depthwise:
        return column_channels(plan)
    spec = plan.spec
    multiplier = spec.out_channels // spec.group
    per_pixel = np.arange(spec.out_channels).reshape(spec.in_channels, multiplier)
    return np.broadcast_to(per_pixel, (math.prod(plan.patch), *per_pixel.shape)).reshape(-1)


def _feature_shape(plan: AttentionPlan, g: list[int]) -> list[int]:
    """How a per-feature constant broadcasts over [*lead, q, features]."""
    if g:
        return [g[0], *([1] if plan.attention is Attention.LOCAL else []), 1, -1]
    return [-1]


def _requantize(
    b: _Builder,
    accumulated: gs.Variable,
    plan: AttentionPlan,
    g: list[int],
    quantization: Quantization,
    channels: np.ndarray | None = None,
) -> gs.Variable:
    """QLinearConv's output from the int32 accumulator, as the operator computes it:
    ``saturate(round_half_even(float(acc + bias) * (x_scale * w_scale / y_scale)) + y_zp)``
    with the multiplier formed in float32 in that order."""
    shape = None if accumulated.shape is None else list(accumulated.shape)
    channels = _output_channels(plan) if channels is None else channels
    features = _feature_shape(plan, g)
    if quantization.bias is not None:
        bias = b.constant(names.BIAS, quantization.bias[channels].reshape(features))
        accumulated = b.op("Add", "proj/Add", [accumulated, bias], shape, np.int32)
    as_float = b.op(
        "Cast", "requant/Cast", [accumulated], shape, np.float32,
        attrs={"to": helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))},
    )  # fmt: skip
    w_scale = b.constant("requant/w_scale", quantization.w_scale[channels].reshape(features))
    scaled = b.op(
        "Mul", "requant/x_scale_w_scale", [quantization.x_scale, w_scale], None, np.float32
    )
    multiplier = b.op("Div", "requant/multiplier", [scaled, quantization.y_scale], None, np.float32)
    product = b.op("Mul", "requant/Mul", [as_float, multiplier], shape, np.float32)
    one = b.scalar("requant/unit_scale", np.array(1.0, dtype=np.float32))
    y_zero = _scalar(b, "requant/zero_point", quantization.y_zero_point)
    return b.op(
        "QuantizeLinear",
        "requant/QuantizeLinear",
        [product, one, y_zero],
        shape,
        np.dtype(quantization.y_zero_point.dtype),
    )


def emit_integer_attention(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    y: gs.Variable,
    plan: AttentionPlan,
    weight: np.ndarray,
    quantization: Quantization,
    batch: Dim,
) -> list[gs.Node]:
    """Append the integer attention computing ``y`` from ``x`` to ``graph``; the caller
    detaches the integer Conv that produced ``y``."""
    b = _Builder(graph, prefix, quantization.x_dtype)
    x_zero = _input_zero_point(b, quantization)
    tokens = _tokens(b, x, plan, batch)
    g = [] if plan.channels_last or plan.spec.group == 1 else [plan.spec.group]
    lead = [batch, *g, plan.blocks] if plan.attention is Attention.LOCAL else [batch, *g]
    selected = _select(b, tokens, plan, lead, g)
    out = _project(b, selected, plan, lead, g, weight, quantization, x_zero)
    if quantization.op == "QLinearConv":
        out = _requantize(b, out, plan, g, quantization)
    _unpatchify(b, out, plan, batch, y)
    return b.nodes


def emit_dynamic_integer_attention(
    graph: gs.Graph,
    prefix: str,
    x: gs.Variable,
    y: gs.Variable,
    plan: AttentionPlan,
    auto_pad: AutoPad,
    weight: np.ndarray,
    quantization: Quantization,
) -> list[gs.Node]:
    """``emit_integer_attention`` for any spatial size of ``x``: the geometry, the tokens
    (channel-major per group), the selection's indices and the un-patchify computed at run
    time as in ``emit_dynamic``; the arithmetic as in the static integer path."""
    b = _Builder(graph, prefix, quantization.x_dtype)
    x_zero = _input_zero_point(b, quantization)
    m, axes = runtime_axes(b, x, plan, auto_pad)
    spec, local = plan.spec, plan.attention is Attention.LOCAL
    tokens = dynamic_tokens(b, m, x, plan, axes)  # [B, g, N, Dg]
    group = spec.group
    indices = dynamic_selection_indices(b, m, plan, axes)
    gathered = b.op("Gather", "select/Gather", [tokens, indices], None, tokens.dtype, {"axis": 2})
    width = plan.heads * plan.group_in_dim
    lead = [0, group, -1, plan.block_queries] if local else [0, group, -1]
    selected = b.op(
        "Reshape", "select/concat_heads", [gathered, m.shape([*lead, width])], None, tokens.dtype
    )
    projection, column_zero = integer_projection(
        plan, weight, quantization.w_zero_point, channels_last=False, x_dtype=quantization.x_dtype
    )
    extra = [1] if local else []
    weight_const = b.constant("W_O", projection.reshape(group, *extra, *projection.shape[1:]))
    zero_const = b.constant("W_O/zero_point", column_zero.reshape(group, *extra, 1, -1))
    out = b.op(
        "MatMulInteger",
        "proj/MatMulInteger",
        [selected, weight_const, x_zero, zero_const],
        None,
        np.int32,
    )
    if quantization.op == "QLinearConv":
        channels = column_channels(plan, channels_last=False)
        out = _requantize(b, out, plan, [group], quantization, channels)
    dynamic_unpatchify(b, m, out, plan, axes, y)
    return b.nodes
