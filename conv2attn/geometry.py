"""Geometry of a Conv expressed as patch-token attention, and its cost model.

Pure Python (no numpy, no onnx), so it can be unit tested and reused by every
other stage. Section numbers refer to the design note ``construction.md``:

- section 1: patch grid, reach ``R``, heads, token grid and padding per axis;
- section 3: the two operation orders;
- section 4: multiply-adds and parameters, and the per-layer patch choice under a
  whole-model parameter-growth limit.

Every quantity is computed per spatial axis, so the same code serves 1-D, 2-D and
3-D Convs; the converter decides which ranks it emits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class GeometryError(ValueError):
    """A Conv whose attributes do not describe a valid convolution."""


class AutoPad(str, Enum):
    NOTSET = "NOTSET"
    SAME_UPPER = "SAME_UPPER"
    SAME_LOWER = "SAME_LOWER"
    VALID = "VALID"


class Order(str, Enum):
    """Operation order of section 3."""

    ATTEND_FIRST = "attend-first"
    PROJECT_FIRST = "project-first"


@dataclass(frozen=True)
class ConvSpec:
    """A Conv node's attributes with ``auto_pad`` resolved into explicit pads."""

    in_channels: int
    out_channels: int
    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    input_size: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.kernel)

    @property
    def output_size(self) -> tuple[int, ...]:
        return tuple(
            (n + pb + pe - d * (k - 1) - 1) // s + 1
            for n, pb, pe, k, s, d in zip(
                self.input_size,
                self.pads_begin,
                self.pads_end,
                self.kernel,
                self.strides,
                self.dilations,
            )
        )

    @property
    def macs(self) -> int:
        """Multiply-adds of the Conv itself, per batch item."""
        return (
            math.prod(self.output_size)
            * self.out_channels
            * (self.in_channels // self.group)
            * math.prod(self.kernel)
        )

    @property
    def params(self) -> int:
        """Weights of the Conv (bias excluded, as for the converted layer)."""
        return self.out_channels * (self.in_channels // self.group) * math.prod(self.kernel)


def resolve_pads(
    auto_pad: AutoPad | str,
    input_size: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Explicit (begin, end) pads per axis, following the ONNX Conv definition.

    ``pads`` is the ONNX attribute ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]``.
    """
    rank = len(kernel)
    mode = AutoPad(auto_pad)
    if mode is AutoPad.NOTSET:
        pads = list(pads) if pads else [0] * (2 * rank)
        if len(pads) != 2 * rank:
            raise GeometryError(f"pads has {len(pads)} entries, expected {2 * rank}")
        return tuple(pads[:rank]), tuple(pads[rank:])
    if mode is AutoPad.VALID:
        return (0,) * rank, (0,) * rank
    begin, end = [], []
    for n, k, s, d in zip(input_size, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - n)
        small, large = total // 2, total - total // 2
        if mode is AutoPad.SAME_UPPER:
            begin.append(small)
            end.append(large)
        else:
            begin.append(large)
            end.append(small)
    return tuple(begin), tuple(end)


def validate(spec: ConvSpec) -> None:
    """Raise GeometryError with the first thing that makes ``spec`` invalid."""
    rank = spec.rank
    for name in ("strides", "dilations", "pads_begin", "pads_end", "input_size"):
        if len(getattr(spec, name)) != rank:
            raise GeometryError(f"{name} has {len(getattr(spec, name))} entries, kernel has {rank}")
    if min(spec.kernel) < 1:
        raise GeometryError(f"kernel_shape {list(spec.kernel)} must be positive")
    if min(spec.strides) < 1:
        raise GeometryError(f"strides {list(spec.strides)} must be positive")
    if min(spec.dilations) < 1:
        raise GeometryError(f"dilations {list(spec.dilations)} must be positive")
    if min(spec.pads_begin + spec.pads_end) < 0:
        raise GeometryError(f"pads {list(spec.pads_begin + spec.pads_end)} must not be negative")
    if min(spec.input_size) < 1:
        raise GeometryError(f"input spatial size {list(spec.input_size)} must be positive")
    if spec.group < 1 or spec.in_channels % spec.group or spec.out_channels % spec.group:
        raise GeometryError(
            f"group {spec.group} must divide input channels {spec.in_channels} "
            f"and output channels {spec.out_channels}"
        )
    if min(spec.output_size) < 1:
        raise GeometryError(
            f"kernel {list(spec.kernel)} with dilation {list(spec.dilations)} is larger "
            f"than the padded input {list(spec.input_size)}"
        )


@dataclass(frozen=True)
class AxisPlan:
    """Section 1 (and section 5's blocks) along one spatial axis."""

    patch: int  # output patch p
    in_patch: int  # input patch P = s * p
    grid: int  # output patch grid G = ceil(out / p)
    reach: int  # R: output patch I reads input patches I .. I + R
    block: int  # local attention: query tokens per block (global: the whole grid)
    queries: int  # query tokens computed: G, or G rounded up to whole blocks
    tokens: int  # token grid T = queries + R
    pad_begin: int  # zeros before the input (the Conv's own begin pad)
    pad_end: int  # zeros after the input; negative means crop
    output: int  # Conv output size along this axis

    @property
    def tokens_extent(self) -> int:
        return self.tokens * self.in_patch

    @property
    def blocks(self) -> int:
        return self.queries // self.block

    @property
    def window(self) -> int:
        """Keys one query block attends to: its own tokens and the one-sided halo."""
        return self.block + self.reach


def plan_axis(
    size: int,
    kernel: int,
    stride: int,
    dilation: int,
    pad_begin: int,
    output: int,
    patch: int,
    block: int | None = None,
) -> AxisPlan:
    """``block=None`` plans global attention, an int plans local attention."""
    if patch < 1:
        raise GeometryError(f"patch size {patch} must be positive")
    in_patch = stride * patch
    grid = -(-output // patch)
    reach = (in_patch - stride + dilation * (kernel - 1)) // in_patch
    if block is None:
        block = queries = grid
    else:
        if block < 1:
            raise GeometryError(f"block size {block} must be positive")
        block = min(block, grid)
        queries = -(-grid // block) * block
    tokens = queries + reach
    pad_end = tokens * in_patch - pad_begin - size
    return AxisPlan(
        patch, in_patch, grid, reach, block, queries, tokens, pad_begin, pad_end, output
    )


class Attention(str, Enum):
    """Section 2's global attention (every token attends to every token) or section 5's."""

    GLOBAL = "global"
    LOCAL = "local"


# Elements moved by padding, Transposes and Gathers cost about this many multiply-adds
# each on a CPU (onnxruntime, fp32: ~70 GMAC/s in MatMul against a few G elements/s
# copied); the cost model adds them so that layout work is not free.
TRAFFIC_COST = 16


@dataclass(frozen=True)
class AttentionPlan:
    """How one Conv becomes multi-head self-attention: geometry, order and cost.

    Queries are the tokens whose output is kept (rows and columns beyond the output grid
    would only be cropped, so they are not computed); keys are every token for global
    attention and a block's window for local attention.
    """

    spec: ConvSpec
    axes: tuple[AxisPlan, ...]
    order: Order = Order.ATTEND_FIRST
    attention: Attention = Attention.GLOBAL

    @property
    def patch(self) -> tuple[int, ...]:
        return tuple(a.patch for a in self.axes)

    @property
    def in_patch(self) -> tuple[int, ...]:
        return tuple(a.in_patch for a in self.axes)

    @property
    def reach(self) -> tuple[int, ...]:
        return tuple(a.reach for a in self.axes)

    @property
    def token_grid(self) -> tuple[int, ...]:
        return tuple(a.tokens for a in self.axes)

    @property
    def tokens(self) -> int:
        return math.prod(self.token_grid)

    @property
    def query_grid(self) -> tuple[int, ...]:
        return tuple(a.queries for a in self.axes)

    @property
    def queries(self) -> int:
        return math.prod(self.query_grid)

    @property
    def block(self) -> tuple[int, ...]:
        return tuple(a.block for a in self.axes)

    @property
    def block_queries(self) -> int:
        return math.prod(self.block)

    @property
    def blocks(self) -> int:
        return math.prod(a.blocks for a in self.axes)

    @property
    def window_grid(self) -> tuple[int, ...]:
        return tuple(a.window for a in self.axes)

    @property
    def keys(self) -> int:
        """Keys each query attends to."""
        if self.attention is Attention.GLOBAL:
            return self.tokens
        return math.prod(self.window_grid)

    @property
    def head_offsets(self) -> tuple[tuple[int, ...], ...]:
        """One head per offset of the key patch relative to the query patch."""
        return tuple(itertools.product(*(range(r + 1) for r in self.reach)))

    @property
    def heads(self) -> int:
        return math.prod(r + 1 for r in self.reach)

    @property
    def group(self) -> int:
        return self.spec.group

    @property
    def group_in_dim(self) -> int:
        """Token features of one group: input channels of the group times the patch."""
        return self.spec.in_channels // self.group * math.prod(self.in_patch)

    @property
    def group_out_dim(self) -> int:
        return self.spec.out_channels // self.group * math.prod(self.patch)

    @property
    def in_dim(self) -> int:
        return self.group_in_dim * self.group

    @property
    def out_dim(self) -> int:
        return self.group_out_dim * self.group

    @property
    def projection_macs(self) -> int:
        # Attend first projects the queries; project first must project every key.
        rows = self.queries if self.order is Order.ATTEND_FIRST else self.tokens
        return rows * self.heads * self.group_in_dim * self.group_out_dim * self.group

    @property
    def attention_macs(self) -> int:
        dim = self.in_dim if self.order is Order.ATTEND_FIRST else self.out_dim
        return self.heads * self.queries * self.keys * dim

    @property
    def macs(self) -> int:
        """Multiply-adds per batch item (section 4)."""
        return self.attention_macs + self.projection_macs

    @property
    def moved(self) -> int:
        """Elements copied per batch item by padding, patchify, gathers and un-patchify."""
        padded = self.spec.in_channels * math.prod(a.tokens_extent for a in self.axes)
        moved = 2 * padded + self.queries * self.out_dim
        if self.attention is Attention.LOCAL:
            dim = self.in_dim if self.order is Order.ATTEND_FIRST else self.heads * self.out_dim
            moved += self.blocks * self.keys * dim
        return moved

    @property
    def cost(self) -> int:
        """What the patch choice minimises: multiply-adds plus weighted data movement."""
        return self.macs + TRAFFIC_COST * self.moved

    @property
    def params(self) -> int:
        """Output projection weights; the grouped projection stores no zero blocks."""
        return self.heads * self.group_in_dim * self.group_out_dim * self.group


def plan_attention(
    spec: ConvSpec,
    patch: Sequence[int],
    order: Order = Order.ATTEND_FIRST,
    attention: Attention = Attention.GLOBAL,
    block: Sequence[int] | None = None,
) -> AttentionPlan:
    """The plan for one patch; local attention needs ``block`` (clamped to the grid)."""
    validate(spec)
    attention = Attention(attention)
    if len(patch) != spec.rank:
        raise GeometryError(f"patch {list(patch)} has {len(patch)} axes, the Conv has {spec.rank}")
    if attention is Attention.LOCAL:
        if block is None or len(block) != spec.rank:
            raise GeometryError(f"local attention needs a block size per axis, got {block}")
        blocks: Sequence[int | None] = block
    else:
        blocks = [None] * spec.rank
    axes = tuple(
        plan_axis(n, k, s, d, pb, out, p, b)
        for n, k, s, d, pb, out, p, b in zip(
            spec.input_size,
            spec.kernel,
            spec.strides,
            spec.dilations,
            spec.pads_begin,
            spec.output_size,
            patch,
            blocks,
        )
    )
    return AttentionPlan(spec, axes, Order(order), attention)


MAX_AUTO_PATCH = 8
MAX_AUTO_BLOCK = 8


def _rank_key(plan: AttentionPlan) -> tuple:
    return (plan.cost, plan.params, plan.patch, plan.order.value, plan.block)


def best_plan(candidates: Sequence[AttentionPlan]) -> AttentionPlan:
    """Lowest cost; ties go to fewer parameters, then the smaller patch."""
    return min(candidates, key=_rank_key)


def candidate_plans(
    spec: ConvSpec,
    attention: Attention = Attention.GLOBAL,
    patches: Sequence[Sequence[int]] | None = None,
    block: Sequence[int] | None = None,
    max_patch: int = MAX_AUTO_PATCH,
) -> list[AttentionPlan]:
    """Plans to choose from: every patch up to ``max_patch`` per axis (never beyond the
    output) unless ``patches`` is given, both orders, and for local attention the best
    block per patch and order (up to ``MAX_AUTO_BLOCK`` per axis) unless ``block`` is."""
    validate(spec)
    attention = Attention(attention)
    if patches is None:
        ranges = [range(1, min(max_patch, out) + 1) for out in spec.output_size]
        patches = list(itertools.product(*ranges))
    plans = []
    for patch in patches:
        for order in Order:
            if attention is Attention.GLOBAL:
                plans.append(plan_attention(spec, patch, order))
                continue
            if block is not None:
                plans.append(plan_attention(spec, patch, order, attention, block))
                continue
            grids = [-(-out // p) for out, p in zip(spec.output_size, patch)]
            block_ranges = [range(1, min(MAX_AUTO_BLOCK, g) + 1) for g in grids]
            plans.append(
                best_plan(
                    [
                        plan_attention(spec, patch, order, attention, b)
                        for b in itertools.product(*block_ranges)
                    ]
                )
            )
    return plans


def choose_plans(
    candidates_per_layer: Sequence[Sequence[AttentionPlan]],
    original_params: int,
    max_param_growth: float,
) -> tuple[list[AttentionPlan], bool]:
    """Per-layer plans minimising the total cost under a whole-model parameter budget.

    Starts from each layer's cheapest plan; while the converted layers' parameters exceed
    ``max_param_growth * original_params``, applies the single switch that saves
    parameters at the smallest cost increase per parameter saved. Returns the plans and
    whether the budget was met (when even the smallest plans exceed it, it is not).
    """
    layers = [sorted(c, key=_rank_key) for c in candidates_per_layer]
    chosen = [c[0] for c in layers]
    budget = max_param_growth * original_params
    total = sum(p.params for p in chosen)
    while total > budget:
        best: tuple[float, int, AttentionPlan] | None = None
        for index, (current, options) in enumerate(zip(chosen, layers)):
            for option in options:
                saved = current.params - option.params
                if saved <= 0:
                    continue
                price = (option.cost - current.cost) / saved
                if best is None or price < best[0]:
                    best = (price, index, option)
        if best is None:
            return chosen, False
        _, index, option = best
        total -= chosen[index].params - option.params
        chosen[index] = option
    return chosen, True
