"""The stretch of the graph up to a squeeze-excitation gate runs one batch item at a time
(design section 6, "One batch item at a time").

A gate (``Mul`` of a map by a factor per channel that a global pool of the same map
leads to: efficientnet's and mobilenet_v3's squeeze-excitation) needs the whole map
before it can scale any of it, so the map is read once by the pool and once more by
the scale, and the next projection reads the result. Where the map at the batch the
model is converted for is past ``geometry.TILE_BYTES``, those passes read it from
memory; a batch item's map alone stays in cache. So the stretch from the graph input to
the last such gate on a map of at least ``geometry.GATE_ITEM_BYTES`` per item (the
high-resolution stages) goes into a ``Scan`` over the batch: its body is the same nodes,
running on one item (local attention's tiles sized for one item), and each tensor the
rest of the graph reads from it is stacked by the Scan and reshaped back.

Exact: every node of an inference CNN computes each batch item on its own, and the
stretch's nodes are emitted for any batch (the model's batch is dynamic), so one item at
a time gives the same values. The model keeps its dynamic batch.

``per_item_gate`` picks the gate on the source graph (its shapes known), so that the
stretch's Convs are emitted with tiles for one item; ``run_per_item`` wraps the emitted
stretch. ``conv2attn.items`` reads such a model: ``check --per-layer`` fetches tensors
inside the body, and the PyTorch import runs the stretch on the whole batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from conv2attn import names
from conv2attn.core.geometry import GATE_ITEM_BYTES, TILE_BYTES
from conv2attn.graph.shapes import skeleton

log = logging.getLogger(__name__)

# What a squeeze-excitation gate's pool is, and how far back from the scale it is sought.
_POOLS = {"GlobalAveragePool", "ReduceMean", "GlobalMaxPool", "ReduceMax"}
_GATE_DEPTH = 16
# Source operators that compute each batch item on its own whatever their attributes: a
# stretch of these (and of reductions that keep the batch axis) gives the same values
# one item at a time, as do Concats and Pads that leave the batch axis alone. Anything
# else before the gate (a Reshape, a Shape, a Gather) might reach across the batch, and
# the batch then runs whole.
_ITEMWISE = {
    "Conv", "ConvInteger", "QLinearConv", "BatchNormalization", "InstanceNormalization",
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log",
    "Sqrt", "Reciprocal", "Neg", "Abs", "Clip", "Identity", "Dropout", "Add", "Sub", "Mul",
    "Div", "Pow", "Max", "Min", "Sum", "Mean", "GlobalAveragePool", "GlobalMaxPool",
    "AveragePool", "MaxPool", "LpPool", "GlobalLpPool", "QuantizeLinear",
    "DequantizeLinear",
}  # fmt: skip
_REDUCTIONS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2"}


@dataclass(frozen=True)
class PerItemGate:
    """The gate that ends the per-item stretch, and the Convs before it (their tiles are
    sized for one batch item)."""

    gate: str
    convs: frozenset[str]
    map_bytes: int  # the gated map's bytes at the batch the model is converted for


def per_item_gate(graph: gs.Graph, convs: Sequence[gs.Node], batch: int) -> PerItemGate | None:
    """On the source ``graph`` (shapes inferred), the last gate whose map is at least
    ``GATE_ITEM_BYTES`` per item and past ``TILE_BYTES`` at ``batch`` items, if the graph
    input's batch is dynamic and the gate depends on that one input; None otherwise."""
    if batch <= 1:
        return None
    chosen = None
    for node in graph.nodes:
        per_item = _gated_map_bytes(node)
        if per_item and per_item >= GATE_ITEM_BYTES and batch * per_item > TILE_BYTES:
            chosen = (node, per_item)
    if chosen is None:
        return None
    gate, per_item = chosen
    if not gate.name or sum(node.name == gate.name for node in graph.nodes) > 1:
        return None  # found again by its name in the converted graph
    ancestors = _ancestors(gate)
    sources = [t for t in graph.inputs if any(t in n.inputs for n in ancestors)]
    if len(sources) != 1 or not sources[0].shape or isinstance(sources[0].shape[0], int):
        return None
    crossing = next((n for n in ancestors if not _itemwise(n)), None)
    if crossing is not None:
        log.info(
            "per item: '%s' (%s) before the gate '%s' may reach across the batch; the batch "
            "runs whole",
            crossing.name,
            crossing.op,
            gate.name,
        )
        return None
    inside = {id(n) for n in ancestors}
    return PerItemGate(
        gate.name, frozenset(c.name for c in convs if id(c) in inside), batch * per_item
    )


def _gated_map_bytes(node: gs.Node) -> int | None:
    """Bytes per batch item of the map ``node`` scales, if it is a gate."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    for x, factor in (node.inputs, node.inputs[::-1]):
        if isinstance(x, gs.Constant) or isinstance(factor, gs.Constant):
            continue
        if x.shape is None or len(x.shape) < 3 or x.dtype is None:
            continue
        dims = x.shape[1:]
        if all(isinstance(d, int) for d in dims) and _pooled_from(factor, x):
            return math.prod(dims) * np.dtype(x.dtype).itemsize
    return None


def _pooled_from(factor: gs.Tensor, x: gs.Tensor) -> bool:
    """Whether ``factor`` comes from a global pool of ``x`` (within ``_GATE_DEPTH`` nodes)."""
    seen, frontier = set(), [factor]
    for _ in range(_GATE_DEPTH):
        following = []
        for tensor in frontier:
            if id(tensor) in seen or tensor is x or not tensor.inputs:
                continue
            seen.add(id(tensor))
            producer = tensor.inputs[0]
            if producer.op in _POOLS and producer.inputs and producer.inputs[0] is x:
                return True
            following += [t for t in producer.inputs if not isinstance(t, gs.Constant)]
        frontier = following
    return False


def _itemwise(node: gs.Node) -> bool:
    """Whether ``node`` computes each batch item on its own: an ``_ITEMWISE`` operator, a
    Concat along another axis than the batch, a Pad that pads no batch items, or a
    reduction over given axes, none of them the batch."""
    if node.op in _ITEMWISE:
        return True
    rank = len(node.inputs[0].shape or ()) if node.inputs else 0
    if node.op == "Concat":  # along any axis but the batch
        return rank > 0 and node.attrs.get("axis", 0) % rank != 0
    if node.op == "Pad":  # with no pads on the batch axis
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            pads = node.inputs[1].values.tolist()
        return bool(pads) and len(pads) == 2 * rank and pads[0] == pads[rank] == 0
    if node.op not in _REDUCTIONS:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = node.inputs[1].values.tolist()
    return bool(axes) and rank > 0 and all(axis % rank != 0 for axis in axes)


def _ancestors(node: gs.Node) -> list[gs.Node]:
    """``node`` and every node it depends on."""
    found, stack = {id(node): node}, [node]
    while stack:
        for tensor in stack.pop().inputs:
            for producer in tensor.inputs:
                if id(producer) not in found:
                    found[id(producer)] = producer
                    stack.append(producer)
    return list(found.values())


def run_per_item(model: onnx.ModelProto, gate: str) -> frozenset[str]:
    """Move the data-dependent nodes that ``gate`` depends on into a Scan over the batch
    (``model``'s main graph, in place; shapes inferred on it). The names of the nodes
    moved; empty, and ``model`` unchanged, where the stretch cannot run per item (logged)."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    data_inputs = [i for i in graph.input if i.name not in weights]
    # by position: node names need not be unique, or given
    dependent, reached = set(), {i.name for i in data_inputs}
    for index, node in enumerate(graph.node):
        if any(name in reached for name in node.input):
            dependent.add(index)
            reached.update(node.output)
    producers = {out: index for index in dependent for out in graph.node[index].output}
    gates = [index for index in dependent if graph.node[index].name == gate]
    if len(gates) != 1:
        log.info("per item: gate '%s' is not in the converted graph; the batch runs whole", gate)
        return frozenset()
    stretch, stack = set(gates), list(gates)
    while stack:
        for name in graph.node[stack.pop()].input:
            producer = producers.get(name)
            if producer is not None and producer not in stretch:
                stretch.add(producer)
                stack.append(producer)
    moved = [node for index, node in enumerate(graph.node) if index in stretch]
    made = {out for n in moved for out in n.output}
    if any(a.type == onnx.AttributeProto.GRAPH for n in moved for a in n.attribute):
        log.info("per item: the stretch to '%s' holds control flow; the batch runs whole", gate)
        return frozenset()
    sources = [i for i in data_inputs if any(i.name in n.input for n in moved)]
    if len(sources) != 1:
        log.info(
            "per item: the stretch to '%s' reads more than one input; the batch runs whole", gate
        )
        return frozenset()
    (source,) = sources
    read_after = [
        name
        for index, node in enumerate(graph.node)
        if index not in stretch
        for name in [*node.input, *_body_reads(node)]
        if name in made
    ]
    read_after += [o.name for o in graph.output if o.name in made]
    boundary = list(dict.fromkeys(read_after))
    types = _inferred_types(model)
    if any(name not in types for name in boundary):
        log.info("per item: a tensor after '%s' has no inferred type; the batch runs whole", gate)
        return frozenset()
    item = f"{source.name}/item"
    batched = f"{item}/batched"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 11)
    unsqueeze = _unsqueeze(item, batched, opset)
    for node in moved:
        node.input[:] = [batched if name == source.name else name for name in node.input]
    source_dims = source.type.tensor_type.shape.dim[1:]
    body_input = helper.make_tensor_value_info(
        item,
        source.type.tensor_type.elem_type,
        [d.dim_value or d.dim_param or None for d in source_dims],
    )
    inner_info = [v for v in graph.value_info if v.name in made and v.name not in boundary]
    body = helper.make_graph(
        [unsqueeze[0], *moved],
        names.PER_ITEM,
        [body_input],
        [helper.make_tensor_value_info(name, types[name], None) for name in boundary],
        initializer=unsqueeze[1],
        value_info=inner_info,
    )
    scan = helper.make_node(
        "Scan",
        [source.name],
        [names.items_of(name) for name in boundary],
        name=names.per_item_node("Scan"),
        body=body,
        num_scan_inputs=1,
    )
    wrapping = [scan]
    for index, name in enumerate(boundary):
        wrapping += _merge_items(graph, names.items_of(name), name, f"{index}")
    kept_info = [v for v in graph.value_info if not (v.name in made and v.name not in boundary)]
    before = [n for index, n in enumerate(graph.node) if index not in dependent]
    after = [n for index, n in enumerate(graph.node) if index in dependent - stretch]
    del graph.node[:]
    graph.node.extend([*before, *wrapping, *after])
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return frozenset(node.name for node in moved)


def _body_reads(node: onnx.NodeProto) -> list[str]:
    """The outer tensors that ``node``'s subgraphs read (they name them directly)."""
    reads = []
    for attribute in node.attribute:
        bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
        for body in bodies:
            for inner in body.node:
                reads += [*inner.input, *_body_reads(inner)]
    return reads


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type per tensor of the main graph, as onnx's shape inference finds it."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    infos = [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    return {v.name: v.type.tensor_type.elem_type for v in infos if v.type.tensor_type.elem_type}


def _unsqueeze(
    item: str, batched: str, opset: int
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A batch of one from the Scan's item: opset 13 moved Unsqueeze's axes to an input."""
    name = names.per_item_node("Unsqueeze")
    if opset < 13:
        return helper.make_node("Unsqueeze", [item], [batched], name=name, axes=[0]), []
    axes = helper.make_tensor(f"{name}/axes", onnx.TensorProto.INT64, [1], [0])
    return helper.make_node("Unsqueeze", [item, axes.name], [batched], name=name), [axes]


def _merge_items(
    graph: onnx.GraphProto, stacked: str, merged: str, index: str
) -> list[onnx.NodeProto]:
    """``merged`` from the Scan's ``stacked`` [B, d1, d2, ...]: [B * d1, d2, ...], the tensor
    at the whole batch (d1 is the batch of one, or rows that hold it)."""
    prefix = names.per_item_node(f"merge{index}")
    constants = [
        helper.make_tensor(f"{prefix}/start", onnx.TensorProto.INT64, [1], [2]),
        helper.make_tensor(f"{prefix}/end", onnx.TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
        helper.make_tensor(f"{prefix}/rows", onnx.TensorProto.INT64, [1], [-1]),
    ]
    graph.initializer.extend(constants)
    start, end, rows = (c.name for c in constants)
    return [
        helper.make_node("Shape", [stacked], [f"{prefix}/shape"], name=f"{prefix}/Shape"),
        helper.make_node(
            "Slice",
            [f"{prefix}/shape", start, end],
            [f"{prefix}/item_dims"],
            name=f"{prefix}/Slice",
        ),
        helper.make_node(
            "Concat",
            [rows, f"{prefix}/item_dims"],
            [f"{prefix}/dims"],
            name=f"{prefix}/Concat",
            axis=0,
        ),
        helper.make_node(
            "Reshape", [stacked, f"{prefix}/dims"], [merged], name=f"{prefix}/Reshape"
        ),
    ]
