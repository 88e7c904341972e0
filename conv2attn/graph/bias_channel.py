"""A constant channel that carries biases into the products that follow (design section 6,
"Biases in the product").

A converted Conv adds its bias in a pass of its own over its output, where onnxruntime's
Conv kernels add it as they write: on wide layers past the caches that pass costs as much
as the product. Where a 1x1 Conv reads a feature map that only converted Convs write,
through Relu, Clip, MaxPool and residual Adds, each of those writers can append one
channel that holds a constant (a row of zero weights and a bias of 1, or 0 on one side
of a residual Add so that the sum holds 1), and the 1x1 Conv reads its bias as that
channel's weight: its bias Add goes, and the writer's costs one output channel more.

The pass runs on the graph as imported (NCHW), before planning: it widens the Convs'
weights and the feature maps' channel axes, so that planning and emission see Convs with
one channel more. It is exact up to rounding: ``0 * x`` sums to 0, ``1 * b`` is ``b``,
and the bias is added inside the product's sum instead of after it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn.core.geometry import bias_channel_gain
from conv2attn.graph.constants import constant_values
from conv2attn.graph.select import Candidate
from conv2attn.graph.tokens import UnionFind

# operations that map a channel holding 0 or 1 everywhere to the same values
_PASS_THROUGH = {"Relu", "Clip", "MaxPool"}


@dataclasses.dataclass(frozen=True)
class BiasChannel:
    """What the pass did to one Conv: it reads its bias from a constant last input
    channel (``reads``), and it writes ``writes`` (0 or 1) in an appended last output
    channel (``None``: no such channel)."""

    reads: bool = False
    writes: int | None = None


def add_bias_channels(
    graph: gs.Graph, candidates: Sequence[Candidate]
) -> tuple[list[Candidate], list[BiasChannel]]:
    """``candidates`` with the constant channel added where it pays (see the module
    docstring), and what was done to each; the graph's feature maps are widened in place."""
    readers = {id(c.node): i for i, c in enumerate(candidates) if _reads_bias(c, graph)}
    writers = {id(c.node.outputs[0]): i for i, c in enumerate(candidates) if _writable(c, graph)}
    outputs = {id(t) for t in graph.outputs}
    channels = [BiasChannel() for _ in candidates]
    written = [candidates[i].node.outputs[0] for i in writers.values()]
    for tensors, nodes in _feature_maps(graph, written):
        values = _constant_values(tensors, nodes, writers, readers, outputs)
        if values is None or _gain(tensors, candidates, writers, readers) <= 0:
            continue
        for tensor in tensors:
            index = writers.get(id(tensor))
            if index is not None:
                channels[index] = dataclasses.replace(channels[index], writes=values[id(tensor)])
            for node in tensor.outputs:
                if id(node) in readers and node.inputs[0] is tensor:
                    reader = readers[id(node)]
                    channels[reader] = dataclasses.replace(channels[reader], reads=True)
            shape = list(tensor.shape)
            shape[1] += 1
            tensor.shape = shape
    widened = [_widen(c, channel) for c, channel in zip(candidates, channels)]
    return widened, channels


def _gain(
    tensors: list[gs.Variable],
    candidates: Sequence[Candidate],
    writers: dict[int, int],
    readers: dict[int, int],
) -> int:
    """``geometry.bias_channel_gain`` of one feature map, from the Convs as one-pixel
    token products: each output pixel's row of ``Cin / group x taps`` features."""
    written, read = [], []
    for tensor in tensors:
        if id(tensor) in writers:
            spec = candidates[writers[id(tensor)]].spec
            rows = spec.in_channels // spec.group * math.prod(spec.kernel)
            written.append((math.prod(spec.output_size), rows, spec.out_channels))
        for node in tensor.outputs:
            if id(node) in readers and node.inputs[0] is tensor:
                spec = candidates[readers[id(node)]].spec
                read.append((math.prod(spec.output_size), spec.out_channels))
    return bias_channel_gain(written, read)


def _writable(candidate: Candidate, graph: gs.Graph) -> bool:
    """A dense float32 Conv of the main graph with static sizes: one more output channel
    is one more row of W_O."""
    return (
        candidate.graph is graph
        and not candidate.dynamic
        and candidate.quantization is None
        and candidate.spec.group == 1
        and candidate.weight is not None
        and candidate.weight.dtype == np.float32
    )


def _reads_bias(candidate: Candidate, graph: gs.Graph) -> bool:
    """A dense float32 1x1 Conv without padding: every output reads the constant channel
    of one input pixel, so its weight there is the bias."""
    spec = candidate.spec
    return (
        _writable(candidate, graph)
        and all(k == 1 for k in spec.kernel)
        and not any(spec.pads_begin)
        and not any(spec.pads_end)
    )


def _feature_maps(
    graph: gs.Graph, written: list[gs.Variable]
) -> list[tuple[list[gs.Variable], list[gs.Node]]]:
    """Tensors joined by the operations the constant channel passes through (every
    ``written`` tensor in one set at least), each set with those operations in graph
    order."""
    joined = UnionFind()
    members: dict[int, gs.Variable] = {id(t): t for t in written}
    passing = [node for node in graph.nodes if _passes_through(node)]
    for node in passing:
        for tensor in [*_data_inputs(node), node.outputs[0]]:
            members[id(tensor)] = tensor
            joined.join(id(tensor), id(node.outputs[0]))
    maps: dict[int, tuple[list[gs.Variable], list[gs.Node]]] = {}
    for key, tensor in members.items():
        maps.setdefault(joined.find(key), ([], []))[0].append(tensor)
    for node in passing:
        maps[joined.find(id(node.outputs[0]))][1].append(node)
    return list(maps.values())


def _passes_through(node: gs.Node) -> bool:
    """Relu, Clip whose range holds 0 and 1, MaxPool (its padding never wins), and the Add
    of two feature maps of one shape: a channel of 0s and 1s stays one (an Add's is the
    sum, which the writers' values keep at 0 or 1)."""
    if len(node.outputs) != 1 or node.outputs[0].shape is None:
        return False
    shape = list(node.outputs[0].shape)
    if len(shape) < 3 or not all(isinstance(d, int) for d in shape[1:]):
        return False
    if node.op == "Add":
        inputs = node.inputs
        return (
            len(inputs) == 2
            and all(isinstance(t, gs.Variable) for t in inputs)
            and all(t.shape is not None and list(t.shape) == shape for t in inputs)
        )
    source = node.inputs[0].shape if node.op in _PASS_THROUGH else None
    if source is None or len(source) != len(shape):
        return False
    if node.op == "MaxPool":  # pools within each channel, whatever the window
        return list(source[:2]) == shape[:2]
    if node.op == "Clip":
        return list(source) == shape and _clip_holds_zero_and_one(node)
    return list(source) == shape


def _clip_holds_zero_and_one(node: gs.Node) -> bool:
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if len(node.inputs) <= index or not node.inputs[index].name:
            bounds.append(default)
            continue
        value = constant_values(node.inputs[index])
        if value is None or value.size != 1:
            return False
        bounds.append(float(value.reshape(())))
    if node.attrs.get("min") is not None:
        bounds[0] = float(node.attrs["min"])
    if node.attrs.get("max") is not None:
        bounds[1] = float(node.attrs["max"])
    return bounds[0] <= 0 and bounds[1] >= 1


def _data_inputs(node: gs.Node) -> list[gs.Variable]:
    return list(node.inputs) if node.op == "Add" else [node.inputs[0]]


def _constant_values(
    tensors: list[gs.Variable],
    nodes: list[gs.Node],
    writers: dict[int, int],
    readers: dict[int, int],
    outputs: set[int],
) -> dict[int, int] | None:
    """The constant channel's value in each tensor of one feature map, or None where the
    map cannot hold one: a tensor made by anything but a writer or the operations it
    passes through, read by anything else but a 1x1 Conv that takes its bias from it, or
    a graph output; a map no Conv reads its bias from; or no way to keep every value at
    0 or 1 with 1 wherever a Conv reads it."""
    inside = {id(t) for t in tensors}
    made_inside = {id(n.outputs[0]) for n in nodes}
    bias_reads = 0
    for tensor in tensors:
        if id(tensor) not in made_inside and id(tensor) not in writers:
            return None
        if id(tensor) in outputs or tensor.shape is None:
            return None
        for node in tensor.outputs:
            if id(node) in readers and node.inputs[0] is tensor:
                bias_reads += 1
            elif not (_passes_through(node) and id(node.outputs[0]) in inside):
                return None
    if not bias_reads:
        return None
    # A writer's value is free until an Add fixes it: the other side of an Add holding 1
    # makes it 0; two free sides, the one that only this Add reads becomes 0.
    source: dict[int, int] = {id(t): id(t) for t in tensors if id(t) in writers}
    fixed: dict[int, int] = {}

    def value(tensor: gs.Variable) -> int | tuple[str, int]:
        """The value where fixed, else ("free", the writer's output it is)."""
        origin = source[id(tensor)]
        return fixed.get(origin, ("free", origin))

    for node in nodes:
        out = node.outputs[0]
        if node.op != "Add":
            source[id(out)] = source[id(node.inputs[0])]
            continue
        a, b = (value(t) for t in node.inputs)
        if isinstance(a, tuple) and isinstance(b, tuple):
            if a[1] == b[1]:
                return None
            only_here = [t for t in node.inputs if id(t) in writers and len(t.outputs) == 1] or [
                node.inputs[1]
            ]
            zero = source[id(only_here[0])]
            fixed[zero] = 0
            fixed[b[1] if zero == a[1] else a[1]] = 1
        elif isinstance(a, tuple):
            fixed[a[1]] = 1 - b
        elif isinstance(b, tuple):
            fixed[b[1]] = 1 - a
        total = _resolved(node.inputs[0], source, fixed) + _resolved(node.inputs[1], source, fixed)
        if total not in (0, 1):
            return None
        fixed[id(out)] = total
        source[id(out)] = id(out)
    values = {id(t): _resolved(t, source, fixed) for t in tensors}
    if any(v not in (0, 1) for v in values.values()):
        return None
    for tensor in tensors:
        for node in tensor.outputs:
            if id(node) in readers and node.inputs[0] is tensor and values[id(tensor)] != 1:
                return None
    return {key: values[key] for key in writers if key in values}


def _resolved(tensor: gs.Variable, source: dict[int, int], fixed: dict[int, int]) -> int:
    origin = source[id(tensor)]
    return fixed.get(origin, 1)


def _widen(candidate: Candidate, channel: BiasChannel) -> Candidate:
    """The Conv with its constant channels: the input's last channel weighs the bias (and
    the bias goes), the appended output channel weighs nothing and adds ``writes`` (or,
    reading a constant channel of 1, weighs ``writes`` there)."""
    if not channel.reads and channel.writes is None:
        return candidate
    weight, spec = candidate.weight, candidate.spec
    out_channels = spec.out_channels
    bias = np.zeros(out_channels, weight.dtype) if candidate.bias is None else candidate.bias
    if channel.reads:
        column = bias.astype(weight.dtype).reshape(out_channels, 1, *weight.shape[2:])
        weight = np.concatenate([weight, column], axis=1)
        bias = np.zeros_like(bias)
    if channel.writes is not None:
        row = np.zeros((1, *weight.shape[1:]), weight.dtype)
        if channel.reads:
            row.reshape(-1)[-1] = channel.writes  # a 1x1 kernel: the constant channel's tap
            bias = np.append(bias, 0).astype(weight.dtype)
        else:
            bias = np.append(bias, channel.writes).astype(weight.dtype)
        weight = np.concatenate([weight, row], axis=0)
    widened = dataclasses.replace(
        spec,
        in_channels=spec.in_channels + int(channel.reads),
        out_channels=out_channels + int(channel.writes is not None),
    )
    return dataclasses.replace(candidate, spec=widened, weight=weight, bias=bias)
