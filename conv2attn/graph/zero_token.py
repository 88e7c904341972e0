"""Zero padding that only Gathers read becomes one zero token (design section 5, "Padding
as a zero token").

Local attention pads a layer's channels-last input ``[B, *grid, D]`` with the Conv's
zeros, flattens the padded grid into a token table ``[B, N, D]`` and gathers each
block's key windows out of it with constant indices. Every padded position holds the
same token, the fill, so the table needs it once: the unpadded tokens with one fill
token appended (``Concat``), and each index of a padded position pointing at that last
token. The Gathers read the same values, so the result is bit for bit the same, and the
table costs one contiguous copy instead of a ``Pad``, which onnxruntime runs on one
thread, position by position (design section 5).

The rewrite matches only ``Pad`` (constant mode, a constant fill or none, no ``axes``)
-> ``Reshape`` merging the padded grid -> ``Gather``s along the token axis with
constant indices, and nothing else reading either tensor; the Pad and the Gathers must be
one converted layer's. A Pad of the source model that pads a layer's input stays a Pad:
its zeros are the source's, not the layer's, and the layer (in the PyTorch import, in
``check --per-layer``) starts where that Pad's output is. A static batch gets the fill
token as a constant; a dynamic one expands it to the input's batch size (``Shape``,
``Slice``, ``Concat``, ``Expand``: four small nodes). The new nodes carry the
Pad's scope, so they belong to its layer (profiles, the PyTorch import).

Where the padded tensor is a converted layer's projection ``MatMul`` (finite weights,
no bias Add: its bias comes in the constant channel, ``graph.bias_channel``), reshaped
and passed through activations that keep 0 at 0 (Clip over a range holding 0, Relu,
LeakyRelu, HardSwish), the zero token is appended to the projection's input instead:
its row projects to 0 and stays 0, so the table is the same, and the copy that appends
it moves the projection's input features, not its (wider) output features. That
layer's channels-last output then holds its tokens and the zero token
(``ZeroTokens.moved``; the record's ``output_zero_token``, and the reading layer's
``input_zero_token``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn import names
from conv2attn.graph.layout import unique_name


@dataclass
class ZeroTokens:
    """What ``pads_as_zero_tokens`` did: the Pads it replaced, and for each zero token
    appended ahead of a projection, the tensor now holding it (a layer's channels-last
    output, flattened to tokens ``[B, N + 1, C]``) and the converted Conv whose padding
    that token is."""

    replaced: int = 0
    moved: dict[str, str] = field(default_factory=dict)


# Elementwise operators that map 0 to 0 (Clip only where its range holds 0).
ZERO_PRESERVING = ("Clip", "Relu", "LeakyRelu", "HardSwish")


def pads_as_zero_tokens(
    graph: gs.Graph, prefixes: Mapping[str, str], movable: Mapping[str, str] | None = None
) -> ZeroTokens:
    """Rewrite ``graph`` (the main graph, in place) as the module docstring says.
    ``prefixes``: each converted Conv's ``names.owner_prefix`` mapped to the Conv.
    ``movable``: the channels-last layer outputs whose producing projection may take
    the zero token, each with the name of that layer's projection weights, which must
    all be finite (a row of zeros times an infinite weight is not zero). The caller
    cleans up and sorts the graph afterwards."""
    tensors = graph.tensors()
    taken = set(tensors) | {n.name for n in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    movable = movable or {}

    def can_move(held: str) -> bool:
        weights = tensors.get(movable.get(held, ""))
        return isinstance(weights, gs.Constant) and bool(np.isfinite(weights.values).all())

    done = ZeroTokens()
    for pad in [node for node in graph.nodes if node.op == "Pad"]:
        match = _match(pad, outputs)
        layer = names.owner(pad.name, prefixes)
        if match is None or layer is None:
            continue
        if any(names.owner(gather.name, prefixes) != layer for gather in match[1]):
            continue
        held = _rewrite(graph, pad, *match, taken, can_move, outputs)
        done.replaced += 1
        if held is not None:
            done.moved[held] = layer
    return done


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    return tensor.values if isinstance(tensor, gs.Constant) else None


def _match(
    pad: gs.Node, graph_outputs: set[int]
) -> tuple[gs.Node, list[gs.Node], np.ndarray, np.ndarray] | None:
    """``(reshape, gathers, pads, fill)`` where ``pad`` has the shape the rewrite needs."""
    if pad.attrs.get("mode", "constant") != "constant" or len(pad.inputs) > 3:
        return None
    x, padded = pad.inputs[0], pad.outputs[0]
    pads = _constant(pad.inputs[1])
    fill = np.zeros((), x.dtype) if x.dtype is not None else None
    if len(pad.inputs) == 3 and pad.inputs[2].name:
        fill = _constant(pad.inputs[2])
    shape = x.shape
    if pads is None or fill is None or fill.size != 1 or shape is None or len(shape) < 3:
        return None
    rank = len(shape)
    if not all(isinstance(d, int) for d in shape[1:]) or pads.shape != (2 * rank,):
        return None
    begin, end = pads[:rank], pads[rank:]
    if begin[0] or end[0] or begin[-1] or end[-1] or (pads < 0).any() or not pads.any():
        return None
    if id(padded) in graph_outputs or len(padded.outputs) != 1:
        return None
    reshape = padded.outputs[0]
    target = _constant(reshape.inputs[1]) if reshape.op == "Reshape" else None
    tokens = math.prod(int(n + b + e) for n, b, e in zip(shape[1:-1], begin[1:-1], end[1:-1]))
    if target is None or reshape.attrs.get("allowzero", 0) or len(target) != 3:
        return None
    batch = shape[0]
    if list(target[1:]) != [tokens, shape[-1]] or not (
        target[0] == 0 or (isinstance(batch, int) and target[0] == batch)
    ):
        return None
    table = reshape.outputs[0]
    gathers = list(table.outputs)
    if id(table) in graph_outputs or not gathers:
        return None
    for gather in gathers:
        indices = _constant(gather.inputs[1]) if gather.op == "Gather" else None
        if gather.inputs[0] is not table or indices is None or indices.dtype.kind not in "iu":
            return None
        if gather.attrs.get("axis", 0) % 3 != 1 or indices.min() < 0 or indices.max() >= tokens:
            return None
    return reshape, gathers, pads, fill


class _Nodes:
    """New nodes and constants named under ``scope``, appended to ``graph``."""

    def __init__(self, graph: gs.Graph, scope: str, taken: set[str]) -> None:
        self.graph, self.scope, self.taken = graph, scope, taken

    def constant(self, part: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(f"{self.scope}/{part}", self.taken), values)

    def node(self, op: str, part: str, inputs: list[gs.Tensor], shape: list, dtype, **attrs):
        name = unique_name(f"{self.scope}/{part}", self.taken)
        out = gs.Variable(unique_name(f"{name}_output_0", self.taken), dtype=dtype, shape=shape)
        self.graph.nodes.append(gs.Node(op, name, attrs, inputs, [out]))
        return out

    def appended(self, tokens: gs.Tensor, fill: np.ndarray, output: gs.Variable | None = None):
        """``tokens`` ``[B, N, ..]`` with one more token of ``fill`` along axis 1. A
        static batch gets the token as a constant; a dynamic one expands it to the
        input's batch size (an Expand, whose data a module importer moves to a GPU with
        the rest: a ConstantOfShape's fill would be read back from it on every run)."""
        batch, rest, dtype = tokens.shape[0], list(tokens.shape[2:]), tokens.dtype
        value = fill.reshape(1).astype(dtype)[0]
        if isinstance(batch, int):
            token = self.constant("token", np.full((batch, 1, *rest), value, dtype))
        else:  # [batch, 1, ..], the batch read off the input
            sizes = self.node("Shape", "batch/Shape", [tokens], [len(tokens.shape)], np.int64)
            first = [
                self.constant(f"batch/{part}", np.array([v], np.int64))
                for part, v in (("starts", 0), ("ends", 1))
            ]
            size = self.node("Slice", "batch/Slice", [sizes, *first], [1], np.int64)
            row = self.constant("token/row", np.array([1, *rest], np.int64))
            shape = self.node(
                "Concat", "token/shape", [size, row], [len(tokens.shape)], np.int64, axis=0
            )
            one = self.constant("token/one", np.full((1, 1, *rest), value, dtype))
            token = self.node("Expand", "token/Expand", [one, shape], [batch, 1, *rest], dtype)
        shape = [batch, tokens.shape[1] + 1, *rest]
        if output is None:
            return self.node("Concat", "Concat", [tokens, token], shape, dtype, axis=1)
        name = unique_name(f"{self.scope}/Concat", self.taken)
        self.graph.nodes.append(gs.Node("Concat", name, {"axis": 1}, [tokens, token], [output]))
        output.shape, output.dtype = shape, dtype
        return output


def _rewrite(
    graph: gs.Graph,
    pad: gs.Node,
    reshape: gs.Node,
    gathers: list[gs.Node],
    pads: np.ndarray,
    fill: np.ndarray,
    taken: set[str],
    can_move: Callable[[str], bool] = lambda held: False,
    graph_outputs: set[int] | None = None,
) -> str | None:
    """Replace ``pad`` and ``reshape`` by a table of tokens plus one fill token; returns
    the layer output that took the zero token ahead of its projection, if one did."""
    x, table = pad.inputs[0], reshape.outputs[0]
    rank, dtype = len(x.shape), x.dtype
    grid, width, batch = list(x.shape[1:-1]), x.shape[-1], x.shape[0]
    begin, end = pads[1 : rank - 1], pads[rank + 1 : 2 * rank - 1]
    count = math.prod(grid)
    moved = None
    upstream = None if fill.any() else _projected_zeros(x, count, can_move, graph_outputs or set())
    if upstream is not None:
        projection, path = upstream
        held = path[0].outputs[0]
        # named in the projection's layer: the PyTorch import runs it as that layer
        nodes = _Nodes(graph, f"{projection.name.rsplit('/', 2)[0]}/zero_token", taken)
        projection.inputs[0] = nodes.appended(projection.inputs[0], fill)
        out = projection.outputs[0]
        out.shape = [out.shape[0], count + 1, *out.shape[2:]]
        flat = np.array([path[0].inputs[1].values[0], count + 1, width], np.int64)
        path[0].inputs[1] = nodes.constant("shape", flat)
        for step in path:
            step.outputs[0].shape = [batch, count + 1, width]
        for gather in gathers:
            gather.inputs[0] = x
        moved = held.name
    else:
        nodes = _Nodes(graph, f"{pad.name.removesuffix('/Pad')}/zero_token", taken)
        unpadded = nodes.constant("shape", np.array([reshape.inputs[1].values[0], count, width]))
        tokens = nodes.node("Reshape", "Reshape", [x, unpadded], [batch, count, width], dtype)
        nodes.appended(tokens, fill, output=table)
    reshape.outputs.clear()
    pad.outputs.clear()
    # each padded position's token: its place in the unpadded grid, or the fill (``count``)
    padded = [int(n + b + e) for n, b, e in zip(grid, begin, end)]
    position = np.indices(padded).reshape(len(padded), -1) - np.reshape(begin, (-1, 1))
    inside = ((position >= 0) & (position < np.reshape(grid, (-1, 1)))).all(axis=0)
    remap = np.where(inside, np.ravel_multi_index(np.where(inside, position, 0), grid), count)
    relaid: dict[int, gs.Constant] = {}  # one per indices constant, however many read it
    for gather in gathers:
        original = gather.inputs[1]
        if id(original) not in relaid:
            values = remap[original.values].astype(original.values.dtype)
            name = unique_name(f"{original.name}/zero_token", taken)
            relaid[id(original)] = gs.Constant(name, values)
        gather.inputs[1] = relaid[id(original)]
    return moved


def _projected_zeros(
    x: gs.Variable, count: int, can_move: Callable[[str], bool], graph_outputs: set[int]
) -> tuple[gs.Node, list[gs.Node]] | None:
    """``(projection, path)`` where ``x`` (read only by the Pad) is a layer's projection
    ``MatMul`` -> a ``Reshape`` to its channels-last output (one that ``can_move``) ->
    operators of ``ZERO_PRESERVING``, each tensor read only by the next, the MatMul's
    rows the ``count`` tokens of ``x`` in order; ``path`` is the Reshape and then the
    operators. None otherwise."""
    path: list[gs.Node] = []
    tensor = x
    while True:
        if len(tensor.outputs) != 1 or id(tensor) in graph_outputs or not tensor.inputs:
            return None
        producer = tensor.inputs[0]
        if producer.op == "Reshape":
            break
        if producer.op not in ZERO_PRESERVING or not _keeps_zero(producer):
            return None
        path.insert(0, producer)
        tensor = producer.inputs[0]
    reshape, held = producer, tensor
    if not isinstance(reshape.inputs[1], gs.Constant) or not can_move(held.name):
        return None
    if reshape.attrs.get("allowzero", 0) or not reshape.inputs[0].inputs:
        return None
    projected = reshape.inputs[0]
    projection = projected.inputs[0]
    shape = projected.shape
    if projection.op != "MatMul" or len(projected.outputs) != 1 or shape is None:
        return None
    if id(projected) in graph_outputs or projection.inputs[0].shape is None:
        return None
    rows = list(shape[1:-1])
    if rows not in ([count], [count, 1]) or shape[-1] != x.shape[-1] or shape[0] != x.shape[0]:
        return None
    if list(projection.inputs[0].shape[1:-1]) != rows:
        return None
    return projection, [reshape, *path]


def _keeps_zero(node: gs.Node) -> bool:
    """Whether elementwise ``node`` maps 0 to 0 (a Clip's range must hold 0)."""
    if node.op != "Clip":
        return len(node.inputs) == 1
    bounds = [node.attrs.get("min"), node.attrs.get("max")]  # before opset 11
    for index, tensor in enumerate(node.inputs[1:3]):
        if tensor.name:
            value = _constant(tensor)
            if value is None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
                held = tensor.inputs[0].attrs.get("value")  # as exported by torch
                value = held.values if isinstance(held, gs.Constant) else None
            if value is None or value.size != 1:
                return False
            bounds[index] = value.item()
    low, high = bounds
    return (low is None or low <= 0) and (high is None or high >= 0)
