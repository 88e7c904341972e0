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
constant indices, and nothing else reading either tensor. A static batch gets the fill
token as a constant; a dynamic one expands it to the input's batch size (``Shape``,
``Slice``, ``Concat``, ``Expand``: four small nodes). The new nodes carry the
Pad's scope, so they belong to its layer (profiles, the PyTorch import).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn.graph.layout import unique_name


def pads_as_zero_tokens(graph: gs.Graph) -> int:
    """Rewrite ``graph`` (the main graph, in place) as the module docstring says; the
    number of Pads replaced. The caller cleans up and sorts the graph afterwards."""
    taken = {t.name for t in graph.tensors().values()} | {n.name for n in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    replaced = 0
    for pad in [node for node in graph.nodes if node.op == "Pad"]:
        match = _match(pad, outputs)
        if match is not None:
            _rewrite(graph, pad, *match, taken)
            replaced += 1
    return replaced


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


def _rewrite(
    graph: gs.Graph,
    pad: gs.Node,
    reshape: gs.Node,
    gathers: list[gs.Node],
    pads: np.ndarray,
    fill: np.ndarray,
    taken: set[str],
) -> None:
    x, table = pad.inputs[0], reshape.outputs[0]
    rank, dtype = len(x.shape), x.dtype
    grid, width, batch = list(x.shape[1:-1]), x.shape[-1], x.shape[0]
    begin, end = pads[1 : rank - 1], pads[rank + 1 : 2 * rank - 1]
    scope = f"{pad.name.removesuffix('/Pad')}/zero_token"

    def constant(part: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(f"{scope}/{part}", taken), values)

    def node(op: str, part: str, inputs: list[gs.Tensor], shape: list, dtype, **attrs):
        name = unique_name(f"{scope}/{part}", taken)
        out = gs.Variable(unique_name(f"{name}_output_0", taken), dtype=dtype, shape=shape)
        graph.nodes.append(gs.Node(op, name, attrs, inputs, [out]))
        return out

    count = math.prod(grid)
    unpadded = constant("shape", np.array([reshape.inputs[1].values[0], count, width]))
    tokens = node("Reshape", "Reshape", [x, unpadded], [batch, count, width], dtype)
    value = fill.reshape(1).astype(dtype)
    if isinstance(batch, int):
        token = constant("token", np.full((batch, 1, width), value[0], dtype))
    else:  # [batch, 1, width], the batch read off the input; an Expand, whose data a
        # module importer moves to a GPU with the rest (a ConstantOfShape's fill would be
        # read back from it on every run)
        sizes = node("Shape", "batch/Shape", [x], [rank], np.int64)
        first = [
            constant(f"batch/{part}", np.array([v], np.int64))
            for part, v in (("starts", 0), ("ends", 1))
        ]
        size = node("Slice", "batch/Slice", [sizes, *first], [1], np.int64)
        row = constant("token/row", np.array([1, width], np.int64))
        shape = node("Concat", "token/shape", [size, row], [3], np.int64, axis=0)
        one = constant("token/one", np.full((1, 1, width), value[0], dtype))
        token = node("Expand", "token/Expand", [one, shape], [batch, 1, width], dtype)
    graph.nodes.append(
        gs.Node(
            "Concat", unique_name(f"{scope}/Concat", taken), {"axis": 1}, [tokens, token], [table]
        )
    )
    table.shape, table.dtype = [batch, count + 1, width], dtype
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
