"""Consecutive Reshapes become one (design section 6, "Reshapes in a row").

Emission reshapes a layer's tokens several times on their way to the next layer (its
projection's rows, its output grid, the next layer's tokens and heads), each Reshape
a step that reads well in Netron. onnxruntime runs each one as a node, a few
microseconds apiece, hundreds of them in a converted mobilenet_v2. A Reshape of a
Reshape's output that nothing else reads is the same as reshaping the first one's input:
the values keep their order, only the shape changes. The tensors a caller keeps (a
layer's output, which ``check --per-layer`` and the PyTorch import read, and its input,
which the PyTorch import reads in the layout the record gives) are never skipped.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def collapse_reshapes(graph: gs.Graph, keep: frozenset[str] = frozenset()) -> int:
    """Make each Reshape whose input another Reshape writes for it alone read that
    Reshape's input instead (``graph``, the main graph, in place); the number skipped.
    ``keep``: tensor names never skipped. The caller cleans up the graph afterwards."""
    outputs = {id(t) for t in graph.outputs}
    skipped = 0
    for node in graph.nodes:
        while node.op == "Reshape" and _skippable(node, keep, outputs):
            first = node.inputs[0].inputs[0]
            node.inputs[0] = first.inputs[0]
            # nothing reads the first one now: its input loses a reader at once, so
            # that a Reshape before it can be skipped in turn
            first.inputs.clear()
            first.outputs.clear()
            skipped += 1
    return skipped


def _skippable(node: gs.Node, keep: frozenset[str], graph_outputs: set[int]) -> bool:
    """Whether Reshape ``node`` can read its input Reshape's input: that Reshape's output
    is read by ``node`` alone and not kept, both shapes are constants, neither Reshape
    takes a 0 literally (``allowzero``), and wherever ``node`` copies a dimension (a 0)
    the first Reshape copied it from its own input, so it is the same there. A Reshape
    already skipped reads nothing (the graph may be unsorted)."""
    if not node.inputs:
        return False
    middle = node.inputs[0]
    if len(middle.inputs) != 1 or middle.inputs[0].op != "Reshape":
        return False
    first = middle.inputs[0]
    if middle.name in keep or id(middle) in graph_outputs or len(middle.outputs) != 1:
        return False
    shapes = [reshape.inputs[1] for reshape in (first, node)]
    if not all(isinstance(shape, gs.Constant) for shape in shapes):
        return False
    if first.attrs.get("allowzero", 0) or node.attrs.get("allowzero", 0):
        return False
    before, after = (shape.values.reshape(-1) for shape in shapes)
    return all(
        index < len(before) and before[index] == 0 for index, size in enumerate(after) if size == 0
    )
