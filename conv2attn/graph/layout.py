"""Channels-last tensors between converted Convs (design section 8, "Tokens between layers").

Every converted Conv reads NCHW, turns it into channels-last tokens (``to_nhwc``) and
turns its output back (``to_nchw``). Where converted Convs follow each other through
operations that do not depend on the layout (elementwise activations and gates, residual
``Add``, per-channel constants, ``Pad``, ``Slice``, ``Concat``), the tensors between them
can stay channels-last: the pair of Transposes cancels.

Global pools join them where the map they pool has other readers too (a
squeeze-and-excitation gate scales the map it pools, between two converted Convs):
channels-last, a global pool is the same reduction over axes 1..rank-2 (a float32
average of known sizes as a MatMul of a row of 1/pixels with the pixels; ``ReduceMax``,
``ReduceMean``), its sums in another order. A pool that is its map's only reader (a
classifier's head) stays NCHW, and keeps its bits. A tensor of one pixel per channel (the
pooled values, the gate) holds its values in the same order in both layouts, so where a
region reads or hands out one in NCHW a Reshape moves it, not a Transpose.

Pooling layers join them where their input is large (``geometry.pools_channels_last``, at
the batch the model is converted for): channels-last, a pool over the spatial axes is the
same pool over one axis more, the channels with a window of 1, between an Unsqueeze and a
Squeeze that move no data.

The pass works on *regions*: connected sets of such nodes (joined by any tensor they
share). A region's inputs are either the output of a channels-last -> NCHW Transpose
(the region reads its input instead, for free) or another NCHW tensor (a Transpose to
channels-last is added); its outputs go to NCHW -> channels-last Transposes (dropped) or
to other nodes and graph outputs (a Transpose back to NCHW is added, under the tensor's
own name). A region is rewritten only when that removes more Transposes than it adds.
Constants are laid out anew, ``Pad`` and ``Slice`` get their axes permuted, and every
tensor the region now holds channels-last is renamed ``<name>/channels_last``, so no
tensor keeps a name from the original model in another layout. A ``Shape`` of such a
tensor (a dynamic Conv's geometry reads its input's sizes) takes the channels-last
tensor's shape and a Gather of its dims back into NCHW order, so it keeps no NCHW tensor
alive.

Exact: only where values sit in memory changes, but for the order in which a
channels-last global pool sums.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn import names
from conv2attn.core.geometry import pools_channels_last

SUFFIX = "/channels_last"

# One input, values mapped one by one (extra inputs, if any, are scalar constants).
UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Celu", "Gelu", "Mish", "Softplus", "Softsign", "Erf", "Neg", "Abs", "Exp",
    "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity", "Clip",
    "Cast",
}  # fmt: skip
# Elementwise with numpy broadcasting.
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where"}
# Pooling over the spatial axes, channels-last over one axis more (see the docstring).
POOLS = {"MaxPool", "AveragePool"}
# Global pools, and the reduction each is over the spatial axes of channels-last data.
GLOBAL_POOLS = {"GlobalAveragePool": "ReduceMean", "GlobalMaxPool": "ReduceMax"}


def to_channels_first(rank: int) -> list[int]:
    """The permutation [B, *spatial, C] -> [B, C, *spatial] (``rank`` axes in all)."""
    return [0, rank - 1, *range(1, rank - 1)]


def to_channels_last(rank: int) -> list[int]:
    """The permutation [B, C, *spatial] -> [B, *spatial, C]."""
    return [0, *range(2, rank), 1]


@dataclass
class LayoutResult:
    """What the pass changed, for the conversion record: NCHW tensors whose values other
    nodes now read channels-last (``outputs``: NCHW name -> that tensor; the input of a
    Transpose that made the NCHW one, or the tensor itself renamed inside a region; the
    NCHW tensor may be gone) and every tensor that is channels-last."""

    outputs: dict[str, str] = field(default_factory=dict)
    channels_last: set[str] = field(default_factory=set)
    removed: int = 0
    added: int = 0


def transpose_perm(node: gs.Node) -> list[int] | None:
    perm = node.attrs.get("perm") if node.op == "Transpose" else None
    return list(perm) if perm is not None else None


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return tensor.values
    return None


def _eligible(node: gs.Node, rank: int, pool_batch: int | None) -> bool:
    """Whether ``node`` computes the same on channels-last data once its constants and
    axes are permuted: every variable input and its output are rank ``rank``. Pools
    qualify where ``_pools_channels_last`` says so."""
    if len(node.outputs) != 1 or _rank(node.outputs[0]) != rank:
        return False
    if node.op in POOLS:
        return _pools_channels_last(node, rank, pool_batch)
    if node.op in GLOBAL_POOLS:
        source = node.inputs[0]
        return isinstance(source, gs.Variable) and _rank(source) == rank and len(source.outputs) > 1
    variables = [t for t in node.inputs if isinstance(t, gs.Variable)]
    # scalars (Clip's bounds from Constant nodes) broadcast the same in any layout
    if not any(_rank(t) == rank for t in variables):
        return False
    if any(_rank(t) not in (rank, 0) for t in variables):
        return False
    if node.op in UNARY:
        extra = node.inputs[1:]
        if node.op == "PRelu":
            return all(isinstance(t, gs.Constant) for t in extra)
        return all(isinstance(t, gs.Variable) or t.values.size == 1 for t in extra if t.name)
    if node.op in BINARY:
        return all(
            isinstance(t, gs.Variable) or (t.values.ndim <= rank) for t in node.inputs if t.name
        )
    if node.op == "Pad":
        pads = _constant_values(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None or (len(node.inputs) > 3 and node.inputs[3].name):  # axes input
            return False
        return all(not isinstance(t, gs.Variable) for t in node.inputs[2:3] if t.name)
    if node.op == "Slice":
        constant = all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name)
        return len(node.inputs) >= 4 and constant
    if node.op == "Concat":  # Inception's and GoogLeNet's joins, along any axis
        return all(isinstance(t, gs.Variable) and _rank(t) == rank for t in node.inputs)
    return False


def one_pixel(tensor: gs.Tensor) -> bool:
    """An NCHW tensor of one pixel per channel, its channels known: channels-last it holds
    its values in the same order, so a Reshape moves it between the layouts."""
    shape = tensor.shape
    return (
        shape is not None
        and len(shape) > 2
        and isinstance(shape[1], int)
        and all(d == 1 for d in shape[2:])
    )


def _pools_channels_last(node: gs.Node, rank: int, batch: int | None) -> bool:
    """A 1-D or 2-D float32 pool (channels-last it pools one axis more, and onnxruntime
    pools at most three; float32 is what was measured) with sizes known past the batch,
    large enough at ``batch`` items (its own batch where fixed) to run faster
    channels-last; ``batch`` None: none does."""
    source = node.inputs[0] if node.inputs else None
    if batch is None or rank > 4 or not isinstance(source, gs.Variable):
        return False
    if _rank(source) != rank or source.dtype is None:
        return False
    try:
        dtype = np.dtype(source.dtype)
    except TypeError:  # a type numpy does not name (bfloat16, float8)
        return False
    items, *sizes = source.shape
    if dtype != np.float32 or not all(isinstance(d, int) for d in sizes):
        return False
    items = items if isinstance(items, int) else batch
    return pools_channels_last(items * math.prod(sizes), dtype.itemsize)


class _Regions:
    """Union-find over eligible nodes, joined by every variable tensor they share."""

    def __init__(self, nodes: list[gs.Node]):
        self.parent = {id(n): id(n) for n in nodes}
        self.nodes = {id(n): n for n in nodes}

    def find(self, key: int) -> int:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: gs.Node, b: gs.Node) -> None:
        self.parent[self.find(id(a))] = self.find(id(b))

    def groups(self) -> list[list[gs.Node]]:
        grouped: dict[int, list[gs.Node]] = {}
        for key, node in self.nodes.items():
            grouped.setdefault(self.find(key), []).append(node)
        return list(grouped.values())


def keep_channels_last(
    graph: gs.Graph, converted: Collection[str] = (), pool_batch: int | None = None
) -> LayoutResult:
    """Rewrite ``graph`` (the main graph, in place) so that the tensors between converted
    Convs stay channels-last wherever that removes Transposes; see the module docstring.
    The weights of the Convs named in ``converted`` keep their emitted names and layouts
    (``names.layer_weights``: the PyTorch import reads each Conv back out of them), so
    the nodes reading them stay as they are. ``pool_batch``: the batch pools are judged
    at where the graph's batch is dynamic (None: pools stay NCHW). The caller cleans up
    and sorts the graph afterwards."""
    result = LayoutResult()
    # node names too: a node this pass adds is named after a tensor, which may share its
    # name with a node (exporters name nodes after their outputs)
    taken = {t.name for t in graph.tensors().values()} | {n.name for n in graph.nodes}
    weights = {name for conv in converted for name in names.layer_weights(conv)}
    for rank in sorted({len(t.shape) for t in graph.tensors().values() if t.shape} - {0, 1, 2}):
        _rewrite_rank(graph, rank, result, taken, weights, pool_batch)
    return result


def _cancel_pairs(graph: gs.Graph, rank: int, result: LayoutResult, taken: set[str]) -> None:
    """A channels-last -> NCHW Transpose read by an NCHW -> channels-last one (one
    converted Conv straight into the next): the second one's readers take the first
    one's input."""
    outputs = {t.name for t in graph.outputs}
    for second in graph.nodes:
        if transpose_perm(second) != to_channels_last(rank) or second.outputs[0].name in outputs:
            continue
        middle = second.inputs[0]
        first = middle.inputs[0] if middle.inputs else None
        if first is None or transpose_perm(first) != to_channels_first(rank):
            continue
        source, target = first.inputs[0], second.outputs[0]
        for consumer in list(target.outputs):
            _replace_input(consumer, target, source)
        second.inputs.clear()
        second.outputs.clear()
        result.removed += 1
        result.channels_last.add(source.name)
        result.outputs[middle.name] = source.name
        for reader in [c for c in middle.outputs if _reads_shape(c)]:
            _read_shape_channels_last(graph, reader, middle, source, rank, taken)
        if not middle.outputs and middle.name not in outputs:
            result.removed += 1


def _rewrite_rank(
    graph: gs.Graph,
    rank: int,
    result: LayoutResult,
    taken: set[str],
    weights: set[str],
    pool_batch: int | None,
) -> None:
    _cancel_pairs(graph, rank, result, taken)
    eligible = [
        n
        for n in graph.nodes
        if _eligible(n, rank, pool_batch) and not any(t.name in weights for t in n.inputs)
    ]
    if not eligible:
        return
    regions = _Regions(eligible)
    members = {id(n) for n in eligible}
    for node in eligible:
        for tensor in node.inputs + node.outputs:
            if not isinstance(tensor, gs.Variable):
                continue
            for other in [*tensor.inputs, *tensor.outputs]:
                if id(other) in members and other is not node:
                    regions.join(node, other)
    outputs = {t.name for t in graph.outputs}
    for region in regions.groups():
        plan = _RegionPlan.of(region, rank, outputs)
        if plan.removed > plan.added:
            plan.apply(graph, taken)
            result.removed += plan.removed
            result.added += plan.added
            result.outputs.update(plan.freed_outputs)
            result.channels_last.update(plan.channels_last)


@dataclass
class _RegionPlan:
    nodes: list[gs.Node]
    rank: int
    # region inputs that a channels-last -> NCHW Transpose produces, and the ones that need
    # a Transpose to channels-last
    free_inputs: list[gs.Variable]
    new_inputs: list[gs.Variable]
    # tensors the region produces: those read by NCHW -> channels-last Transposes, and
    # those other nodes or the graph outputs read in NCHW
    dropped: list[gs.Node]
    kept_nchw: list[gs.Variable]
    removed: int
    added: int
    # NCHW tensors made by a Transpose -> the channels-last tensor the region reads instead
    freed_outputs: dict[str, str] = field(default_factory=dict)
    channels_last: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, region: list[gs.Node], rank: int, graph_outputs: set[str]) -> _RegionPlan:
        inside = {id(n) for n in region}
        produced = {id(t) for n in region for t in n.outputs}
        free, new, seen = [], [], set()
        for node in region:
            for tensor in node.inputs:
                if not isinstance(tensor, gs.Variable) or id(tensor) in produced:
                    continue
                if _rank(tensor) == 0:  # a scalar reads the same in any layout
                    continue
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                producer = tensor.inputs[0] if tensor.inputs else None
                if producer is not None and transpose_perm(producer) == to_channels_first(rank):
                    free.append(tensor)
                else:
                    new.append(tensor)
        freed = sum(
            1
            for tensor in free
            if tensor.name not in graph_outputs
            and all(id(consumer) in inside for consumer in tensor.outputs)
        )
        read = {tensor.name: tensor.inputs[0].inputs[0].name for tensor in free}
        dropped, kept = [], []
        for node in region:
            tensor = node.outputs[0]
            outside = [c for c in tensor.outputs if id(c) not in inside]
            nchw_readers = False
            for consumer in outside:
                if (
                    transpose_perm(consumer) == to_channels_last(rank)
                    and consumer.outputs[0].name not in graph_outputs
                ):
                    dropped.append(consumer)
                elif not _reads_shape(consumer):
                    nchw_readers = True
            if nchw_readers or tensor.name in graph_outputs:
                kept.append(tensor)
        moved = [t for t in (*new, *kept) if not one_pixel(t)]  # one pixel: a Reshape
        removed, added = freed + len(dropped), len(moved)
        return cls(region, rank, free, new, dropped, kept, removed, added, read)

    def apply(self, graph: gs.Graph, taken: set[str]) -> None:
        rank = self.rank
        last, first = to_channels_last(rank), to_channels_first(rank)
        inside = {id(n) for n in self.nodes}
        for tensor in self.free_inputs:
            source = tensor.inputs[0].inputs[0]  # the channels-last tensor the Transpose read
            self._swap_input(tensor, source)
            self.channels_last.add(source.name)
        for tensor in self.new_inputs:
            name = unique_name(f"{tensor.name}{SUFFIX}", taken)
            moved = gs.Variable(name, dtype=tensor.dtype, shape=_permuted(tensor.shape, last))
            graph.nodes.append(_layout_change(tensor, moved, last, taken))
            self._swap_input(tensor, moved)
            self.channels_last.add(name)
        relaid: dict[int, gs.Constant] = {}
        for node in self.nodes:
            _relayout(node, rank, last, relaid, taken)
        kept = {id(t) for t in self.kept_nchw}
        for node in self.nodes:
            tensor = node.outputs[0]
            shape_readers = [c for c in tensor.outputs if id(c) not in inside and _reads_shape(c)]
            for reader in shape_readers:
                _read_shape_channels_last(graph, reader, tensor, tensor, rank, taken)
            nchw_name, nchw_shape = tensor.name, tensor.shape
            tensor.name = unique_name(f"{nchw_name}{SUFFIX}", taken)
            tensor.shape = _permuted(nchw_shape, last)
            self.channels_last.add(tensor.name)
            if id(tensor) not in kept:  # gone in NCHW (a converted Conv's crop may end here)
                self.freed_outputs[nchw_name] = tensor.name
            else:  # the NCHW tensor, under its own name, for other readers
                restored = gs.Variable(nchw_name, dtype=tensor.dtype, shape=nchw_shape)
                dropped = {id(d) for d in (*self.dropped, *shape_readers)}
                for consumer in list(tensor.outputs):
                    if id(consumer) not in inside and id(consumer) not in dropped:
                        _replace_input(consumer, tensor, restored)
                graph.outputs = [restored if t is tensor else t for t in graph.outputs]
                graph.nodes.append(_layout_change(tensor, restored, first, taken))
        for transpose in self.dropped:
            source, target = transpose.inputs[0], transpose.outputs[0]
            for consumer in list(target.outputs):
                _replace_input(consumer, target, source)
            transpose.outputs.clear()
            transpose.inputs.clear()
        for node in self.nodes:
            if node.op in POOLS:
                _pool_over_channels(graph, node, taken)
            elif node.op in GLOBAL_POOLS:
                _reduce_spatial_axes(graph, node, taken)

    def _swap_input(self, old: gs.Variable, new: gs.Variable) -> None:
        for node in self.nodes:
            _replace_input(node, old, new)


def _layout_change(
    source: gs.Variable, target: gs.Variable, perm: list[int], taken: set[str]
) -> gs.Node:
    """The node that makes ``target`` from ``source`` in the layout ``perm`` gives: a
    Reshape where the NCHW one of the two is one pixel per channel (the batch copied
    from the input, so it may be dynamic), else a Transpose."""
    nchw = source if perm == to_channels_last(len(perm)) else target
    if not one_pixel(nchw):
        name = unique_name(f"{target.name}/Transpose", taken)
        return gs.Node("Transpose", name, {"perm": perm}, [source], [target])
    name = unique_name(f"{target.name}/Reshape", taken)
    shape = np.array([0, *target.shape[1:]], np.int64)  # 0: the input's batch
    shape = gs.Constant(unique_name(f"{name}/shape", taken), shape)
    return gs.Node("Reshape", name, {}, [source, shape], [target])


def _reduce_spatial_axes(graph: gs.Graph, node: gs.Node, taken: set[str]) -> None:
    """``node``, a global pool whose input and output are now channels-last, as the same
    reduction over the spatial axes, keeping them (one pixel, as the pool leaves). A
    float32 average of known sizes is a MatMul of a row of 1/pixels with the pixels
    ``[B, pixels, C]``: onnxruntime's ReduceMean over the spatial axes of one batch item
    runs on one path for all of it, several times slower (design section 8)."""
    source, target = node.inputs[0], node.outputs[0]
    rank = len(target.shape)
    # the channels-last tensor a layer wrote may have no recorded shape (dynamic sizes)
    sizes = list(source.shape[1:]) if source.shape is not None else []
    if (
        node.op == "GlobalAveragePool"
        and _float32(source)
        and len(sizes) == rank - 1
        and all(isinstance(d, int) for d in sizes)
    ):
        pixels, channels = math.prod(sizes[:-1]), sizes[-1]

        def constant(part: str, values: np.ndarray) -> gs.Constant:
            return gs.Constant(unique_name(f"{node.name}/{part}", taken), values)

        def variable(part: str, shape: list) -> gs.Variable:
            return gs.Variable(unique_name(f"{node.name}/{part}", taken), np.float32, shape)

        rows = variable("pixels", [target.shape[0], pixels, channels])
        mean = variable("mean", [target.shape[0], 1, channels])
        weights = constant("weights", np.full((1, pixels), 1 / pixels, np.float32))
        shape = constant("pixels/shape", np.array([0, pixels, channels], np.int64))
        reshape = unique_name(f"{node.name}/pixels/Reshape", taken)
        graph.nodes.append(gs.Node("Reshape", reshape, {}, [source, shape], [rows]))
        product = unique_name(f"{node.name}/MatMul", taken)
        graph.nodes.append(gs.Node("MatMul", product, {}, [weights, rows], [mean]))
        node.op, node.attrs = "Reshape", {}
        node.inputs = [mean, constant("shape", np.array([0, *target.shape[1:]], np.int64))]
        return
    axes = list(range(1, rank - 1))
    node.op = GLOBAL_POOLS[node.op]
    node.attrs = {"keepdims": 1}
    if graph.opset >= 18:
        name = unique_name(f"{node.name}/axes", taken)
        node.inputs.append(gs.Constant(name, np.array(axes, np.int64)))
    else:  # before opset 18 the axes are an attribute
        node.attrs["axes"] = axes


def _float32(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32
    except TypeError:  # a type numpy does not name (bfloat16, float8)
        return False


def _pool_over_channels(graph: gs.Graph, node: gs.Node, taken: set[str]) -> None:
    """``node``, a pool whose input and output are now channels-last ``[B, *spatial, C]``,
    as the same pool over ``[B, 1, *spatial, C]`` with a window of 1 along the channels
    (no padding there, so every window and its count of values stay as they were), read
    through an Unsqueeze and written through a Squeeze."""
    source, target = node.inputs[0], node.outputs[0]
    spatial = len(source.shape) - 2

    def with_axis(tensor: gs.Variable, part: str) -> gs.Variable:
        name = unique_name(f"{node.name}/{part}", taken)
        return gs.Variable(name, dtype=tensor.dtype, shape=[tensor.shape[0], 1, *tensor.shape[1:]])

    wide_source, wide_target = with_axis(source, "channels_axis"), with_axis(target, "pooled")
    if graph.opset >= 13:
        axes = [gs.Constant(unique_name(f"{node.name}/axes", taken), np.array([1], np.int64))]
        attrs = {}
    else:  # before opset 13 the axes are an attribute
        axes, attrs = [], {"axes": [1]}
    unsqueeze = gs.Node(
        "Unsqueeze", f"{node.name}/Unsqueeze", dict(attrs), [source, *axes], [wide_source]
    )
    squeeze = gs.Node(
        "Squeeze", f"{node.name}/Squeeze", dict(attrs), [wide_target, *axes], [target]
    )
    graph.nodes.extend([unsqueeze, squeeze])
    node.inputs[0], node.outputs[0] = wide_source, wide_target
    for key in ("kernel_shape", "strides", "dilations"):
        if key in node.attrs:
            node.attrs[key] = [*node.attrs[key], 1]
    if "pads" in node.attrs:
        pads = list(node.attrs["pads"])
        node.attrs["pads"] = [*pads[:spatial], 0, *pads[spatial:], 0]


def _reads_shape(node: gs.Node) -> bool:
    """A ``Shape`` of the whole tensor: it reads the dims, which a channels-last tensor
    holds too, in another order."""
    return node.op == "Shape" and "start" not in node.attrs and "end" not in node.attrs


def _read_shape_channels_last(
    graph: gs.Graph,
    reader: gs.Node,
    nchw: gs.Tensor,
    channels_last: gs.Variable,
    rank: int,
    taken: set[str],
) -> None:
    """``reader`` (a ``Shape`` of ``nchw``) takes the shape of ``channels_last`` (the same
    values, channels-last) and a Gather puts its dims back in NCHW order, under the
    output's own name: the dynamic geometry of a converted Conv reads its input's sizes
    so, and the NCHW tensor need not be made for it."""
    (out,) = reader.outputs
    name = unique_name(f"{out.name}{SUFFIX}", taken)
    moved = gs.Variable(name, dtype=out.dtype, shape=out.shape)
    _replace_input(reader, nchw, channels_last)
    reader.outputs = [moved]
    order = gs.Constant(unique_name(f"{name}/order", taken), np.array(to_channels_first(rank)))
    gather = gs.Node("Gather", f"{out.name}/Gather", {"axis": 0}, [moved, order], [out])
    graph.nodes.append(gather)


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``.. if taken; the result is taken from then on."""
    candidate, count = name, 0
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    taken.add(candidate)
    return candidate


def _permuted(shape: Iterable | None, perm: list[int]) -> list | None:
    if shape is None:
        return None
    shape = list(shape)
    return [shape[p] for p in perm]


def _relayout(
    node: gs.Node, rank: int, perm: list[int], relaid: dict[int, gs.Constant], taken: set[str]
) -> None:
    """Constants and axes of an eligible node, for channels-last data; ``relaid`` keeps
    one new constant per original, however many nodes read it."""

    def replace(index: int, values: np.ndarray) -> None:
        original = node.inputs[index]
        if id(original) not in relaid:
            name = unique_name(f"{original.name}{SUFFIX}", taken)
            relaid[id(original)] = gs.Constant(name, np.ascontiguousarray(values))
        node.inputs[index] = relaid[id(original)]

    if node.op in BINARY or node.op == "PRelu":
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.values.ndim > 0:
                values = tensor.values
                values = values.reshape((1,) * (rank - values.ndim) + values.shape)
                replace(index, values.transpose(perm))
    elif node.op == "Pad":
        replace(1, node.inputs[1].values.reshape(2, rank)[:, perm].reshape(-1))
    elif node.op == "Slice":
        axes = node.inputs[3].values
        position = {source: target for target, source in enumerate(perm)}
        replace(3, np.array([position[a % rank] for a in axes], dtype=axes.dtype))
    elif node.op == "Concat":
        node.attrs["axis"] = perm.index(node.attrs["axis"] % rank)
