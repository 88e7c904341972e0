"""A tiled layer's tiles go on into the next layer's projection (design section 6, "Tiles
that flow").

Local attention split into tiles (``AttentionPlan.tiles``) computes each tile's output
tokens while its intermediates are in cache, then concatenates the tiles into the
layer's output. Where that output only passes through elementwise activations (their
other inputs scalars) and Reshapes on its way to another layer's projection ``MatMul``,
and that projection narrows the channels (mobilenet_v2's inverted residual blocks: a
depthwise Conv, ReLU6, a 1x1 Conv to a sixth of the channels), each tile goes on alone:
its activation and its rows of the projection run on the tile while it is in cache, and
the Concat joins the narrower projected tiles. Where the projection widens (resnet50's
bottleneck: 64 channels to 256), joining first moves less and the tiles stay as they are.

Exact: a MatMul computes each row of its input on its own, and an activation each value,
so the projected tiles joined are the same products. Every Reshape on the way keeps the
batch first and the channels last, and the tiles are joined along the axis right after
the batch, so a tile's rows are the same rows of every tensor on the way. onnxruntime
may sum a row in another order for a MatMul of fewer rows (float32 rounding; on
mobilenet_v2 the outputs were the same bits).

The tiled layer's output tensor is then never made: the record names its tiles and
their rows (``output_tiles``), and the reading layer's tiles (``input_tiles``), so that
``check --per-layer`` and the PyTorch import join them themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn import names
from conv2attn.graph.layout import UNARY, unique_name


@dataclass
class SunkTiles:
    """Per tiled layer whose tiles went on: its tiles (tensor, rows), and per reading
    layer the tensors its projection reads, one per tile."""

    outputs: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)


def sink_tile_concats(graph: gs.Graph, tiled: dict[str, str], readers: list[str]) -> SunkTiles:
    """Rewrite ``graph`` (the main graph, in place) so that each tiled layer's tiles go on
    into the projection that reads the layer's output, where the module docstring says.
    ``tiled``: tiled layer (Conv name) -> its output tensor; ``readers``: the Conv names
    whose projections may take tiles. The caller cleans up the graph afterwards."""
    sunk = SunkTiles()
    if not tiled:
        return sunk
    owners = {names.owner_prefix(conv): conv for conv in readers}
    nodes = {node.name: node for node in graph.nodes}
    taken = {t.name for t in graph.tensors().values()} | set(nodes)
    outputs = {id(t) for t in graph.outputs}
    for conv, output in tiled.items():
        concat = nodes.get(f"{names.scope(conv)}/tiles/Concat")
        if concat is None or concat.outputs[0].shape is None:
            continue
        path = _path_to_projection(concat, output, owners, outputs)
        if path is None:
            continue
        activations, projection, reader = path
        parts = list(concat.inputs)
        inputs = _sink(graph, concat, activations, projection, reader, taken)
        sunk.outputs[conv] = tuple((part.name, _rows(part)) for part in parts)
        sunk.inputs[reader] = tuple(t.name for t in inputs)
    return sunk


def _rows(tensor: gs.Tensor) -> int:
    """The rows of ``[B, ..rows.., C]``."""
    return math.prod(tensor.shape[1:-1])


def _path_to_projection(
    concat: gs.Node, output: str, owners: dict[str, str], graph_outputs: set[int]
) -> tuple[list[gs.Node], gs.Node, str] | None:
    """The activations between ``concat`` (a tiled layer's join, along the axis after
    the batch) and the projection MatMul that reads its values, that MatMul and its
    layer; None where the tiles cannot go on: another reader on the way, a graph output,
    a Reshape that moves the batch or the channels, a projection that does not narrow."""
    joined = concat.outputs[0]
    rank = len(joined.shape)
    if concat.attrs.get("axis") not in (1, 1 - rank) or rank < 3:
        return None
    batch, channels = joined.shape[0], joined.shape[-1]
    if not isinstance(channels, int) or not all(isinstance(d, int) for d in joined.shape[1:]):
        return None
    activations: list[gs.Node] = []
    tensor, seen_output = joined, False
    while True:
        seen_output = seen_output or tensor.name == output
        if id(tensor) in graph_outputs or len(tensor.outputs) != 1 or tensor.shape is None:
            return None
        if tensor.shape[0] != batch or tensor.shape[-1] != channels:
            return None
        (node,) = tensor.outputs
        if node.op == "Reshape" and isinstance(node.inputs[1], gs.Constant):
            tensor = node.outputs[0]
            continue
        if node.op in UNARY and _scalar_extras(node) and not names.owner(node.name, owners):
            activations.append(node)
            tensor = node.outputs[0]
            continue
        break
    reader = names.owner(node.name, owners)
    weight = node.inputs[1] if node.op == "MatMul" and len(node.inputs) == 2 else None
    if reader is None or not seen_output or node.inputs[0] is not tensor:
        return None
    # 2-D: the same weights for every row, whatever makes them (W_O, or a fold of it)
    if weight is None or weight.shape is None or len(weight.shape) != 2:
        return None
    if not isinstance(weight.shape[1], int):
        return None
    if weight.shape[1] >= channels:  # joining first moves less
        return None
    out = node.outputs[0]
    if out.shape is None or not all(isinstance(d, int) for d in out.shape[1:]):
        return None
    return activations, node, reader


def _scalar_extras(node: gs.Node) -> bool:
    """An activation (not a Cast: a tile's copy keeps the tile's type) whose inputs past
    the first are absent or scalars (Clip's bounds, constants or made by Constant
    nodes): every tile's copy reads the same ones."""
    if node.op == "Cast" or len(node.outputs) != 1:
        return False
    return all(not t.name or _scalar(t) for t in node.inputs[1:])


def _scalar(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return tensor.values.size == 1
    return tensor.shape is not None and math.prod(tensor.shape) == 1


def _sink(
    graph: gs.Graph,
    concat: gs.Node,
    activations: list[gs.Node],
    projection: gs.Node,
    reader: str,
    taken: set[str],
) -> list[gs.Variable]:
    """Each tile through ``activations`` and its own ``projection`` MatMul, the projected
    tiles joined and reshaped into the projection's output; the tensors the MatMuls read."""
    weight, projected = projection.inputs[1], projection.outputs[0]
    width = weight.shape[1]
    scope = f"{names.scope(reader)}/proj"
    read, parts = [], []
    for index, tile in enumerate(concat.inputs):
        tensor = tile
        for activation in activations:
            name = unique_name(f"{activation.name}/tile{index}", taken)
            out = gs.Variable(
                unique_name(names.output_of(name), taken), dtype=tile.dtype, shape=tile.shape
            )
            inputs = [tensor, *activation.inputs[1:]]
            graph.nodes.append(gs.Node(activation.op, name, dict(activation.attrs), inputs, [out]))
            tensor = out
        read.append(tensor)
        name = unique_name(f"{scope}/tile{index}/MatMul", taken)
        out = gs.Variable(
            unique_name(names.output_of(name), taken),
            dtype=projected.dtype,
            shape=[*tile.shape[:-1], width],
        )
        graph.nodes.append(gs.Node("MatMul", name, {}, [tensor, weight], [out]))
        parts.append(out)
    joined_shape = [*concat.outputs[0].shape[:-1], width]
    name = unique_name(f"{scope}/tiles/Concat", taken)
    joined = gs.Variable(
        unique_name(names.output_of(name), taken), dtype=projected.dtype, shape=joined_shape
    )
    graph.nodes.append(gs.Node("Concat", name, {"axis": 1}, parts, [joined]))
    shape = gs.Constant(
        unique_name(f"{scope}/tiles/merge/shape", taken),
        np.array([0, *projected.shape[1:]], np.int64),  # 0: the batch, which may be dynamic
    )
    projection.outputs.clear()
    projection.inputs.clear()
    name = unique_name(f"{scope}/tiles/merge", taken)
    graph.nodes.append(gs.Node("Reshape", name, {}, [joined, shape], [projected]))
    concat.outputs.clear()
    concat.inputs.clear()
    return read
