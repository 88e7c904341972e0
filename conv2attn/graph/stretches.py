"""Which Convs of a graph read one feature map, and which read another's output through
elementwise operations only: the stretches that grid ``auto`` picks one grid for, and
the links along which tokens can flow (``core.planning.Stretches``, design section 8).

Runs on the graph as imported (NCHW, before any Conv is replaced). Tensors of one shape
joined by activations, gates, residual ``Add`` and per-channel scales and shifts are one
feature map, as ``tokens`` would hold them. A Conv that reads the feature map another
one writes is linked to it (tokens could flow between them), and a stretch is the Convs
joined by links or by reading one feature map: consecutive layers that could share one
token grid. Only the Convs the token pass can join take part (static, in the main graph,
not integer); every other one is a stretch of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_graphsurgeon as gs

from conv2attn.core.planning import Stretches
from conv2attn.graph.select import Candidate
from conv2attn.graph.tokens import UnionFind, elementwise


def find_stretches(graph: gs.Graph, candidates: Sequence[Candidate]) -> Stretches:
    """The stretch of each candidate and the (producer, consumer) links between them."""
    feature_maps = UnionFind()
    for node in graph.nodes:
        if elementwise(node, channel_axis=1):
            for tensor in node.inputs:
                if isinstance(tensor, gs.Variable) and tensor.shape == node.outputs[0].shape:
                    feature_maps.join(id(tensor), id(node.outputs[0]))
    joinable = [
        index
        for index, candidate in enumerate(candidates)
        if candidate.graph is graph and not candidate.dynamic and candidate.quantization is None
    ]
    links = _links(candidates, joinable)
    stretches = UnionFind()
    readers: dict[int, int] = {}
    for index in joinable:
        feature_map = feature_maps.find(id(candidates[index].node.inputs[0]))
        stretches.join(index, readers.setdefault(feature_map, index))
    for producer, consumer in links:
        stretches.join(consumer, producer)
    return Stretches([stretches.find(index) for index in range(len(candidates))], links)


def _links(candidates: Sequence[Candidate], joinable: list[int]) -> list[tuple[int, int]]:
    """(producer, consumer) pairs: the consumer's input is the producer's output or
    follows from it through elementwise operations only. Forward only: a Conv that reads
    the residual stream before another one adds to it shares that feature map but does
    not read the other's output."""
    conv_of = {id(candidates[index].node): index for index in joinable}
    links = []
    for producer in joinable:
        reached = [candidates[producer].node.outputs[0]]
        seen = {id(reached[0])}
        while reached:
            tensor = reached.pop()
            for node in tensor.outputs:
                consumer = conv_of.get(id(node))
                if consumer is not None and node.inputs[0] is tensor:
                    links.append((producer, consumer))
                    continue
                if not elementwise(node, channel_axis=1) or node.outputs[0].shape != tensor.shape:
                    continue
                if id(node.outputs[0]) not in seen:
                    seen.add(id(node.outputs[0]))
                    reached.append(node.outputs[0])
    return links
