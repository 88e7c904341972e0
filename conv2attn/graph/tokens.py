"""Patch tokens between converted Convs on one token grid (design section 8, "Tokens
that flow").

After ``layout`` a converted Conv with output patches above one pixel still turns its
output tokens ``[B, N, P1·P2·C]`` into channels-last pixels (the un-patchify shuffle),
and the next one turns pixels back into tokens (the patchify shuffle). Where the two
share a token grid (the second one's input patch is the first one's output patch and its
padding is whole tokens, as on the fixed grid of section 8) and only elementwise
operations lie between them (activations, gates, residual ``Add``, per-channel scales),
both shuffles can go: the tensors between them are held as tokens ``[B, T1, T2, P1, P2,
C]``, the elementwise operations act on them unchanged (their constants are per channel,
the last axis in both layouts), and the second Conv's padding becomes whole tokens. Local
attention's output tokens come block by block: one reorder to grid order replaces their
un-patchify, so there only the next Conv's shuffle is saved.

The pass works on *regions*: tensors joined by such operations, all of one shape. Its
sources are a Conv's output pixels (the Conv's tokens are read instead, for free) or any
other tensor (a patchify shuffle is added); its readers are Convs on the same grid (their
shuffle goes) or any other node or a graph output (an un-patchify shuffle is added, under
the tensor's own name). A region is rewritten only when that removes more shuffles (one
Transpose each) than it adds. Tensors held as tokens are named ``<name>/tokens``.

Exact: only where values sit in memory changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn.core.geometry import Attention, AttentionPlan, channels_first_to_grid_tokens
from conv2attn.graph.layout import (
    BINARY,
    SUFFIX,
    UNARY,
    to_channels_last,
    transpose_perm,
    unique_name,
)

TOKENS = "/tokens"
# elementwise operations whose extra inputs, if any, are per-channel or scalar constants
_ELEMENTWISE = (UNARY | BINARY) - {"Where"}


@dataclass(frozen=True)
class ConvertedConv:
    """A converted Conv as this pass sees it: the prefix of its nodes and its plan."""

    scope: str
    plan: AttentionPlan


@dataclass
class TokenResult:
    """What the pass changed, for the conversion record: per converted Conv (by scope),
    the token tensor now holding its output and the patch of the tokens it now reads."""

    outputs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    removed: int = 0
    added: int = 0


@dataclass
class _Producer:
    """A Conv whose output tokens ``values`` [B, (blocks,) q, D] are un-patchified into
    ``pixels``; local attention's tokens come block by block (``blocks`` per axis)."""

    scope: str
    values: gs.Variable
    merge: gs.Node
    pixels: gs.Variable
    patch: tuple[int, ...]
    grid: tuple[int, ...]
    blocks: tuple[int, ...]
    block: tuple[int, ...]

    @property
    def in_grid_order(self) -> bool:
        """One block: the tokens already lie on the grid, and un-patchifying them was a
        shuffle saved; several need one reorder (block order -> grid order) instead."""
        return max(self.blocks) == 1


@dataclass
class _Consumer:
    """A Conv that pads ``pixels`` (``pad``, or none) and patchifies them (``merge`` makes
    its tokens from the shuffled pixels)."""

    scope: str
    pixels: gs.Variable
    pad: gs.Node | None
    merge: gs.Node
    entry: gs.Node  # the node that reads ``pixels``
    patch: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]


def _node(nodes: dict[str, gs.Node], name: str, op: str) -> gs.Node | None:
    node = nodes.get(name)
    return node if node is not None and node.op == op and len(node.outputs) == 1 else None


def _made_by(tensor: gs.Tensor, node: gs.Node | None) -> bool:
    return node is not None and bool(tensor.inputs) and tensor.inputs[0] is node


def _shuffle(nodes: dict[str, gs.Node], part: str) -> tuple[gs.Node, gs.Node] | None:
    """The emitted Reshape -> Transpose -> Reshape of ``part``: its split and merge."""
    split = _node(nodes, f"{part}/split", "Reshape")
    shuffle = _node(nodes, f"{part}/Transpose", "Transpose")
    merge = _node(nodes, f"{part}/merge", "Reshape")
    if merge is None or shuffle is None or split is None:
        return None
    if not (_made_by(merge.inputs[0], shuffle) and _made_by(shuffle.inputs[0], split)):
        return None
    return split, merge


def _producer(layer: ConvertedConv, nodes: dict[str, gs.Node]) -> _Producer | None:
    plan = layer.plan
    axes = plan.axes
    if not plan.gives_grid_tokens:
        return None
    full = [a.queries * a.patch for a in axes]
    scope = layer.scope
    chain = _shuffle(nodes, f"{scope}/unpatchify")
    if chain is None:
        return None
    split, merge = chain
    pixels = merge.outputs[0]
    shape = [*full, plan.spec.out_channels]
    if pixels.shape is None or list(pixels.shape[1:]) != shape:
        return None
    grid = tuple(a.queries for a in axes)
    if plan.attention is Attention.GLOBAL:
        blocks, block = (1,) * len(axes), grid
    else:
        blocks, block = tuple(a.blocks for a in axes), plan.block
    return _Producer(scope, split.inputs[0], merge, pixels, plan.patch, grid, blocks, block)


def _consumer(layer: ConvertedConv, nodes: dict[str, gs.Node]) -> _Consumer | None:
    plan = layer.plan
    spec, axes = plan.spec, plan.axes
    if not plan.takes_grid_tokens:
        return None
    scope = layer.scope
    chain = _shuffle(nodes, f"{scope}/patchify")
    if chain is None:
        return None
    split, merge = chain
    pad = _node(nodes, f"{scope}/pad/Pad", "Pad")
    # a Pad that the layout pass left in NCHW reaches the split through a Transpose
    if pad is not None and _made_by(split.inputs[0], pad):
        if len(pad.inputs) > 2 and pad.inputs[2].name:  # an integer Conv's zero point
            return None
        pixels = pad.inputs[0]
    elif not any(a.zeros_before or a.zeros_after for a in axes):
        pad, pixels = None, split.inputs[0]
    else:
        return None
    if pixels.shape is None or list(pixels.shape[1:]) != [*spec.input_size, spec.in_channels]:
        return None
    return _Consumer(
        scope,
        pixels,
        pad,
        merge,
        pad or split,
        plan.in_patch,
        tuple(a.zeros_before // a.in_patch for a in axes),
        tuple(a.zeros_after // a.in_patch for a in axes),
    )


def per_channel(tensor: gs.Tensor, rank: int, channel_axis: int) -> bool:
    """A constant that varies along ``channel_axis`` of rank-``rank`` data at most (its
    shape read without loading its values)."""
    if not isinstance(tensor, gs.Constant):
        return False
    shape = tensor.shape
    if shape is None or len(shape) > rank:
        return False
    aligned = (1,) * (rank - len(shape)) + tuple(shape)
    channel = channel_axis % rank
    return all(size == 1 for axis, size in enumerate(aligned) if axis != channel)


def elementwise(node: gs.Node, channel_axis: int = -1) -> bool:
    """An elementwise node on data of rank 3 or more whose output has the shape of a
    variable input, and whose other inputs are variables of that shape, scalars, or
    constants per channel (``channel_axis``: -1 for channels-last data and tokens, 1 for
    NCHW): values move with their channel, so it acts the same on any layout of pixels."""
    if node.op not in _ELEMENTWISE or len(node.outputs) != 1:
        return False
    shape = node.outputs[0].shape
    if shape is None or len(shape) < 3:
        return False
    for tensor in node.inputs:
        if not tensor.name:
            continue
        if isinstance(tensor, gs.Variable):
            if tensor.shape is None or list(tensor.shape) not in (list(shape), []):
                return False
        elif not per_channel(tensor, len(shape), channel_axis):
            return False
    return any(isinstance(t, gs.Variable) and t.shape == shape for t in node.inputs)


class UnionFind:
    """Union-find over integer keys (tensor ids, layer indices)."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, key: int) -> int:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass
class _Region:
    tensors: list[gs.Variable]
    nodes: list[gs.Node]
    producers: list[_Producer]
    consumers: list[_Consumer]
    patch: tuple[int, ...]
    grid: tuple[int, ...]
    # tensors made outside the region (not by a producer): one patchify each
    sources: list[gs.Variable]
    # tensors read outside the region or graph outputs: one un-patchify each
    kept: list[gs.Variable]

    @property
    def removed(self) -> int:
        return sum(p.in_grid_order for p in self.producers) + len(self.consumers)

    @property
    def added(self) -> int:
        return len(self.sources) + len(self.kept)


def keep_tokens(graph: gs.Graph, layers: list[ConvertedConv]) -> TokenResult:
    """Rewrite ``graph`` (the main graph, in place, after ``layout.keep_channels_last``)
    so that tokens flow between converted Convs that share a token grid; see the module
    docstring. The caller cleans up and sorts the graph afterwards."""
    result = TokenResult()
    # the layout pass leaves Transposes nobody reads: they would count as readers
    graph.cleanup(remove_unused_graph_inputs=False)
    nodes = {node.name: node for node in graph.nodes}
    producers = [p for p in (_producer(layer, nodes) for layer in layers) if p is not None]
    consumers = [c for c in (_consumer(layer, nodes) for layer in layers) if c is not None]
    if not producers or not consumers:
        return result
    taken = {t.name for t in graph.tensors().values()} | set(nodes)
    for region in _regions(graph, producers, consumers):
        if region.removed > region.added:
            _apply(graph, region, result, taken)
    return result


def _regions(
    graph: gs.Graph, producers: list[_Producer], consumers: list[_Consumer]
) -> list[_Region]:
    union = UnionFind()
    tensors: dict[int, gs.Variable] = {}
    members = [n for n in graph.nodes if elementwise(n)]
    for seed in [p.pixels for p in producers] + [c.pixels for c in consumers]:
        tensors[id(seed)] = seed
        union.find(id(seed))
    for node in members:
        variables = [t for t in [*node.inputs, *node.outputs] if _joined(t, node)]
        for tensor in variables:
            tensors[id(tensor)] = tensor
            union.join(id(tensor), id(node.outputs[0]))
    grouped: dict[int, list[gs.Variable]] = {}
    for key, tensor in tensors.items():
        grouped.setdefault(union.find(key), []).append(tensor)
    by_pixels_p = {id(p.pixels): p for p in producers}
    readers: dict[int, list[_Consumer]] = {}
    for consumer in consumers:
        readers.setdefault(id(consumer.pixels), []).append(consumer)
    regions = []
    graph_outputs = {id(t) for t in graph.outputs}
    for group in grouped.values():
        shapes = {tuple(t.shape) for t in group}
        if len(shapes) != 1:
            continue
        ids = {id(t) for t in group}
        nodes = [n for n in members if id(n.outputs[0]) in ids]
        flowing_p = [by_pixels_p[id(t)] for t in group if id(t) in by_pixels_p]
        flowing_c = [c for t in group for c in readers.get(id(t), [])]
        if not flowing_p and not flowing_c:
            continue
        first = (flowing_p or flowing_c)[0]
        patch = first.patch
        size = list(group[0].shape[1:-1])
        if any(n % p for n, p in zip(size, patch)):
            continue
        grid = tuple(n // p for n, p in zip(size, patch))
        flowing_p = [p for p in flowing_p if p.patch == patch and p.grid == grid]
        flowing_c = [c for c in flowing_c if c.patch == patch]
        made = {id(p.pixels) for p in flowing_p} | {id(n.outputs[0]) for n in nodes}
        inside = {id(n) for n in nodes} | {id(c.entry) for c in flowing_c}
        sources = [t for t in group if id(t) not in made]
        kept = [
            t
            for t in group
            if id(t) in made
            and (id(t) in graph_outputs or any(id(r) not in inside for r in t.outputs))
        ]
        regions.append(_Region(group, nodes, flowing_p, flowing_c, patch, grid, sources, kept))
    return regions


def _joined(tensor: gs.Tensor, node: gs.Node) -> bool:
    return isinstance(tensor, gs.Variable) and tensor.shape == node.outputs[0].shape


def _base(name: str) -> str:
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def _int64(name: str, values: list[int], taken: set[str]) -> gs.Constant:
    return gs.Constant(unique_name(name, taken), np.array(values, dtype=np.int64))


def _pixel_split(grid: tuple[int, ...], patch: tuple[int, ...], channels: int) -> list[int]:
    """[B, T1, P1, T2, P2, .., C]: pixels with each axis split into tokens and patch."""
    return [-1, *(size for pair in zip(grid, patch) for size in pair), channels]


def _to_tokens_perm(rank: int) -> list[int]:
    """[B, T1, P1, T2, P2, .., C] -> [B, T1, T2, .., P1, P2, .., C]."""
    return [0, *(1 + 2 * i for i in range(rank)), *(2 + 2 * i for i in range(rank)), 1 + 2 * rank]


def _patchify_source(
    graph: gs.Graph,
    tensor: gs.Variable,
    target: gs.Variable,
    grid: tuple[int, ...],
    patch: tuple[int, ...],
    taken: set[str],
) -> None:
    """``target``: channels-last pixels ``tensor`` as tokens, in one shuffle; read from
    the NCHW tensor where ``tensor`` is only its channels-last Transpose."""
    rank, channels = len(patch), tensor.shape[-1]
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and transpose_perm(producer) == to_channels_last(rank + 2):
        source = producer.inputs[0]
        split_shape = [-1, channels, *(n for pair in zip(grid, patch) for n in pair)]
        perm = channels_first_to_grid_tokens(rank)
    else:
        source = tensor
        split_shape = _pixel_split(grid, patch, channels)
        perm = _to_tokens_perm(rank)
    _split_and_permute(
        graph, f"{_base(tensor.name)}{TOKENS}", source, split_shape, perm, target, taken
    )


def _split_and_permute(
    graph: gs.Graph,
    name: str,
    source: gs.Variable,
    split_shape: list[int],
    perm: list[int],
    target: gs.Variable,
    taken: set[str],
) -> None:
    """``target`` = Transpose(Reshape(``source``, ``split_shape``), ``perm``), as nodes
    ``<name>/split`` and ``<name>/Transpose``."""
    split = gs.Variable(unique_name(f"{name}/split_output_0", taken), source.dtype)
    shape = _int64(f"{name}/split/shape", split_shape, taken)
    graph.nodes.append(
        gs.Node(
            "Reshape", unique_name(f"{name}/split", taken), inputs=[source, shape], outputs=[split]
        )
    )
    graph.nodes.append(
        gs.Node(
            "Transpose", unique_name(f"{name}/Transpose", taken), {"perm": perm}, [split], [target]
        )
    )


def _lay_on_grid(
    graph: gs.Graph, producer: _Producer, target: gs.Variable, channels: int, taken: set[str]
) -> None:
    """``target`` [B, T1, T2, P1, P2, C]: the Conv's own output tokens on the grid. One
    block is a view (no data moves); blocks [B, nb1, nb2, b1, b2, P1, P2, C] are reordered
    to [B, nb1, b1, nb2, b2, P1, P2, C] first, moving whole (b2, P1, P2, C) runs."""
    name = f"{producer.scope}/unpatchify/tokens"
    grid, patch, rank = producer.grid, producer.patch, len(producer.patch)
    values = producer.values
    if not producer.in_grid_order:
        split = [-1, *producer.blocks, *producer.block, *patch, channels]
        perm = [0, *(axis for i in range(rank) for axis in (1 + i, 1 + rank + i))]
        perm += list(range(1 + 2 * rank, 2 + 3 * rank))
        ordered = gs.Variable(unique_name(f"{name}/Transpose_output_0", taken), values.dtype)
        _split_and_permute(graph, name, values, split, perm, ordered, taken)
        values = ordered
    shape = _int64(f"{name}/shape", [-1, *grid, *patch, channels], taken)
    graph.nodes.append(
        gs.Node("Reshape", unique_name(name, taken), inputs=[values, shape], outputs=[target])
    )


def _apply(graph: gs.Graph, region: _Region, result: TokenResult, taken: set[str]) -> None:
    grid, patch = region.grid, region.patch
    rank = len(patch)
    channels = region.tensors[0].shape[-1]
    batch = region.tensors[0].shape[0]
    token_shape = [batch, *grid, *patch, channels]
    # a Conv's own tokens are named after the node that lays them on the grid
    named = {id(p.pixels): f"{p.scope}/unpatchify/tokens_output_0" for p in region.producers}
    tokens: dict[int, gs.Variable] = {}
    for tensor in region.tensors:
        name = unique_name(named.get(id(tensor), f"{_base(tensor.name)}{TOKENS}"), taken)
        tokens[id(tensor)] = gs.Variable(name, dtype=tensor.dtype, shape=token_shape)
    to_tokens = _to_tokens_perm(rank)
    to_pixels = [to_tokens.index(axis) for axis in range(len(to_tokens))]
    for producer in region.producers:
        target = tokens[id(producer.pixels)]
        _lay_on_grid(graph, producer, target, channels, taken)
        producer.merge.outputs.clear()
        result.outputs[producer.scope] = (target.name, patch)
    for tensor in region.sources:
        _patchify_source(graph, tensor, tokens[id(tensor)], grid, patch, taken)
    for node in region.nodes:
        node.inputs = [tokens.get(id(t), t) for t in node.inputs]
        node.outputs = [tokens[id(node.outputs[0])]]
    for consumer in region.consumers:
        source = tokens[id(consumer.pixels)]
        if consumer.pad is None:
            consumer.merge.inputs[0] = source
        else:
            pad = consumer.pad
            zeros = [0] * (rank + 1)
            pads = [0, *consumer.pads_begin, *zeros, 0, *consumer.pads_end, *zeros]
            extent = [t + b + e for t, b, e in zip(grid, consumer.pads_begin, consumer.pads_end)]
            padded = gs.Variable(
                unique_name(f"{pad.name}{TOKENS}", taken),
                source.dtype,
                [batch, *extent, *patch, channels],
            )
            pad.inputs = [source, _int64(f"{pad.name}/pads{TOKENS}", pads, taken)]
            pad.outputs = [padded]
            consumer.merge.inputs[0] = padded
        result.inputs[consumer.scope] = patch
    for tensor in region.kept:
        # the pixels, under their own name, for the readers outside the region
        base = _base(tensor.name)
        moved = gs.Variable(unique_name(f"{base}{TOKENS}/unshuffled", taken), tensor.dtype)
        graph.nodes.append(
            gs.Node(
                "Transpose",
                unique_name(f"{base}{TOKENS}/to_pixels", taken),
                {"perm": to_pixels},
                [tokens[id(tensor)]],
                [moved],
            )
        )
        shape = [-1, *(g * p for g, p in zip(grid, patch)), channels]
        if tensor.inputs:  # a producer's un-patchify, replaced by this one
            tensor.inputs[0].outputs.clear()
        graph.nodes.append(
            gs.Node(
                "Reshape",
                unique_name(f"{base}{TOKENS}/merge", taken),
                inputs=[moved, _int64(f"{base}{TOKENS}/merge/shape", shape, taken)],
                outputs=[tensor],
            )
        )
    result.removed += region.removed
    result.added += region.added
