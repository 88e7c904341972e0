"""Geometry of a Conv expressed as patch-token attention, and its cost model.

Pure Python (no numpy, no onnx), so it can be unit tested and reused by every
other stage. Section numbers refer to ``docs/design.md``:

- section 1: patch grid, reach ``R``, heads, token grid and padding per axis;
- section 3: the two operation orders;
- section 4: multiply-adds and parameters, and the per-layer patch choice under a
  whole-model parameter-growth limit.

Every quantity is computed per spatial axis, so the same code serves 1-D, 2-D and
3-D Convs; the converter decides which ranks it emits.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class cached_property:
    """A figure computed on first use and stored on the instance, like
    ``functools.cached_property`` without the lock Python 3.11 takes on every first access:
    planning derives some thirty figures for each of thousands of candidate plans. Each
    figure is a pure function of a frozen plan, so two threads deriving it at once store
    equal values."""

    def __init__(self, compute):
        self.compute = compute
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


class GeometryError(ValueError):
    """A Conv whose attributes do not describe a valid convolution."""


# Width of each head's queries and keys: the standard form's W_Q/W_K (zero there) and the
# trainable layer's.
KEY_DIM = 16


class AutoPad(str, Enum):
    NOTSET = "NOTSET"
    SAME_UPPER = "SAME_UPPER"
    SAME_LOWER = "SAME_LOWER"
    VALID = "VALID"


class Grid(str, Enum):
    """Where the token grid lies (sections 1 and 8). ``shifted``: tokens start at the
    Conv's first padded position, so a window starts at a token boundary (4 heads for a
    3x3 Conv at patch >= 2). ``fixed``: tokens start at the first input pixel and output
    token I covers the same pixels as input token I, Li et al.'s ViT setting, so
    consecutive layers share one grid (9 heads for a 3x3 stride-1 Conv at any patch)."""

    SHIFTED = "shifted"
    FIXED = "fixed"


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

    @cached_property
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
    for name, values in (
        ("strides", strides),
        ("dilations", dilations),
        ("input size", input_size),
    ):
        if len(values) != rank:
            raise GeometryError(f"{name} has {len(values)} entries, kernel_shape has {rank}")
    if min(strides, default=1) < 1 or min(dilations, default=1) < 1:
        raise GeometryError(
            f"strides {list(strides)} and dilations {list(dilations)} must be positive"
        )
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


@functools.lru_cache(maxsize=4096)
def validate(spec: ConvSpec) -> None:
    """Raise GeometryError with the first thing that makes ``spec`` invalid (a valid
    spec is remembered: planning validates each Conv once per candidate plan)."""
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


@functools.lru_cache(maxsize=4096)
def subsampled(spec: ConvSpec) -> tuple[ConvSpec, tuple[int, ...]]:
    """An equivalent Conv on a strided subsample of the padded input, and the steps.

    Along an axis with kernel 1 and stride s > 1, output row y reads only padded row
    y * s: slicing every s-th padded row first leaves a kernel-1, stride-1 Conv with no
    padding there. The patches then hold no pixel the Conv never reads.
    """
    steps = tuple(s if k == 1 and s > 1 else 1 for k, s in zip(spec.kernel, spec.strides))
    if all(step == 1 for step in steps):
        return spec, steps

    def pick(values: tuple[int, ...], subsampled_value) -> tuple[int, ...]:
        return tuple(
            (subsampled_value(i) if step > 1 else v)
            for i, (v, step) in enumerate(zip(values, steps))
        )

    output = spec.output_size
    effective = ConvSpec(
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        group=spec.group,
        kernel=spec.kernel,
        strides=pick(spec.strides, lambda i: 1),
        dilations=pick(spec.dilations, lambda i: 1),
        pads_begin=pick(spec.pads_begin, lambda i: 0),
        pads_end=pick(spec.pads_end, lambda i: 0),
        input_size=pick(spec.input_size, lambda i: output[i]),
    )
    return effective, steps


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
    input_size: int = 0  # the input size along this axis (after any subsampling)
    # fixed grid: zeros added ahead of the begin pad so that a token boundary falls on the
    # first input pixel (0 on the shifted grid); outputs read ``phase`` pixels further on
    phase: int = 0
    # strided queries: tokens of one pixel, queries every ``step`` tokens (the stride)
    step: int = 1

    @property
    def tokens_extent(self) -> int:
        return self.tokens * self.in_patch

    @property
    def zeros_before(self) -> int:
        """Zeros ahead of the input on the token grid: the Conv's begin pad (plus the
        fixed grid's phase), or the whole grid when a window reads padding only (a begin
        pad beyond every output's reach)."""
        return min(self.pad_begin + self.phase, self.tokens_extent)

    @property
    def grid_offset(self) -> int:
        """Whole tokens of zeros ahead of the input: on the fixed grid, output token I
        covers the pixels of input token I, which sits at token I + grid_offset here."""
        return (self.pad_begin + self.phase) // self.in_patch

    @property
    def input_kept(self) -> int:
        """Input elements on the token grid; those after are never read."""
        return max(0, min(self.input_size, self.tokens_extent - self.zeros_before))

    @property
    def zeros_after(self) -> int:
        return self.tokens_extent - self.zeros_before - self.input_kept

    @property
    def blocks(self) -> int:
        return self.queries // self.block

    @property
    def window(self) -> int:
        """Keys one query block attends to: its own tokens and the one-sided halo (with
        strided queries, the tokens from its first query to its last query's reach)."""
        return self.step * (self.block - 1) + 1 + self.reach


def _patchify_layout(
    spec: ConvSpec, axes: tuple[AxisPlan, ...], channels_last: bool
) -> list[Rearrange]:
    rank = spec.rank
    if channels_last:
        extent = [a.tokens_extent for a in axes]
        patches = [size for a in axes for size in (a.tokens, a.in_patch)]
        return [
            Rearrange((1, spec.in_channels, *extent), (0, *range(2, 2 + rank), 1)),
            # [B, T1, P1, T2, P2, C] -> [B, T1, T2, P1, P2, C]
            Rearrange(
                (1, *patches, spec.in_channels),
                (
                    0,
                    *(1 + 2 * i for i in range(rank)),
                    *(2 + 2 * i for i in range(rank)),
                    1 + 2 * rank,
                ),
            ),
        ]
    group = spec.group
    patches = [size for a in axes for size in (a.tokens, a.in_patch)]
    # [B, g, Cg, T1, P1, T2, P2] -> [B, g, T1, T2, Cg, P1, P2]
    return [
        Rearrange(
            (1, group, spec.in_channels // group, *patches),
            (0, 1, *(3 + 2 * i for i in range(rank)), 2, *(4 + 2 * i for i in range(rank))),
        )
    ]


def _unpatchify_layout(
    spec: ConvSpec, axes: tuple[AxisPlan, ...], channels_last: bool
) -> list[Rearrange]:
    rank = spec.rank
    blocks = [a.blocks for a in axes]
    block = tuple(a.block for a in axes)
    patch = tuple(a.patch for a in axes)
    if channels_last:
        full = [a.queries * a.patch for a in axes]
        # [B, nb1, nb2, b1, b2, p1, p2, C] -> [B, nb1, b1, p1, nb2, b2, p2, C] = NHWC
        interleave = itertools.chain.from_iterable(
            (1 + i, 1 + rank + i, 1 + 2 * rank + i) for i in range(rank)
        )
        return [
            Rearrange(
                (1, *blocks, *block, *patch, spec.out_channels),
                (0, *interleave, 1 + 3 * rank),
            ),
            Rearrange((1, *spec.output_size, spec.out_channels), (0, 1 + rank, *range(1, 1 + rank)))
            if full != list(spec.output_size)
            else Rearrange((1, *full, spec.out_channels), (0, 1 + rank, *range(1, 1 + rank))),
        ]
    group = spec.group
    # [B, g, nb1, nb2, b1, b2, Cg_out, p1, p2] -> [B, g, Cg_out, nb1, b1, p1, nb2, b2, p2]
    interleave = itertools.chain.from_iterable(
        (2 + i, 2 + rank + i, 3 + 2 * rank + i) for i in range(rank)
    )
    return [
        Rearrange(
            (1, group, *blocks, *block, spec.out_channels // group, *patch),
            (0, 1, 2 + 2 * rank, *interleave),
        )
    ]


@functools.lru_cache(maxsize=16384)
def plan_axis(
    size: int,
    kernel: int,
    stride: int,
    dilation: int,
    pad_begin: int,
    output: int,
    patch: int,
    block: int | None = None,
    grid_kind: Grid = Grid.SHIFTED,
    strided: bool = False,
) -> AxisPlan:
    """``block=None`` plans global attention, an int plans local attention. ``strided``
    (local attention, stride above 1): tokens of one pixel and a query every ``stride``
    tokens, so the kernel's taps are its heads (section 5)."""
    if patch < 1:
        raise GeometryError(f"patch size {patch} must be positive")
    step = stride if strided else 1
    if step > 1:
        if patch != 1:
            raise GeometryError(f"strided queries take output patch 1, not {patch}")
        in_patch, phase, reach = 1, 0, dilation * (kernel - 1)
    else:
        in_patch = stride * patch
        phase = fixed_grid_phase(pad_begin, in_patch) if grid_kind is Grid.FIXED else 0
        reach = axis_reach(kernel, stride, dilation, in_patch, phase)
    grid = -(-output // patch)
    if block is None:
        block = queries = grid
    else:
        if block < 1:
            raise GeometryError(f"block size {block} must be positive")
        block = min(block, grid)
        queries = -(-grid // block) * block
    tokens = step * (queries - 1) + 1 + reach
    pad_end = tokens * in_patch - pad_begin - phase - size
    return AxisPlan(
        patch, in_patch, grid, reach, block, queries, tokens, pad_begin, pad_end, output, size,
        phase, step,
    )  # fmt: skip


def axis_reach(kernel: int, stride: int, dilation: int, in_patch: int, phase: int) -> int:
    """R of section 1 (and 8): the last input patch an output patch reads, from its own."""
    return (phase + in_patch - stride + dilation * (kernel - 1)) // in_patch


def fixed_grid_phase(pad_begin: int, in_patch: int) -> int:
    """Zeros to add ahead of a begin pad so that the first input pixel starts a token."""
    return -pad_begin % in_patch


def grid_tokens_to_channels_first(rank: int) -> list[int]:
    """The permutation [B, T1, .., P1, .., C] -> [B, C, T1, P1, T2, P2, ..]: patch tokens on
    a grid (tokens kept between layers) laid out as NCHW once the pairs are merged."""
    return [0, 1 + 2 * rank, *(axis for i in range(rank) for axis in (1 + i, 1 + rank + i))]


def channels_first_to_grid_tokens(rank: int) -> list[int]:
    """The permutation [B, C, T1, P1, T2, P2, ..] -> [B, T1, .., P1, .., C]."""
    return [0, *(2 + 2 * i for i in range(rank)), *(3 + 2 * i for i in range(rank)), 1]


def pixels_shape_of(shape: Sequence[int], rank: int) -> list[int]:
    """[B, C, T1, P1, T2, P2, ..] -> [B, C, T1·P1, ..]: the NCHW shape of tokens laid out by
    ``grid_tokens_to_channels_first``."""
    return [*shape[:2], *(shape[2 + 2 * i] * shape[3 + 2 * i] for i in range(rank))]


def tokens_shape_of(shape: Sequence[int], patch: Sequence[int]) -> list[int]:
    """[B, C, T1·P1, ..] -> [B, C, T1, P1, ..]: NCHW with each axis split into tokens and
    patch, ready for ``channels_first_to_grid_tokens``."""
    split = [size for n, p in zip(shape[2:], patch) for size in (n // p, p)]
    return [*shape[:2], *split]


def _fixed_grid_reach(axis: AxisPlan, kernel: int, stride: int, dilation: int, pad: int) -> int:
    """R on the fixed grid for the axis's patch; one-pixel tokens (strided queries) have
    no phase, so their reach is the kernel's."""
    if axis.step > 1:
        return axis.reach
    return axis_reach(kernel, stride, dilation, axis.in_patch, fixed_grid_phase(pad, axis.in_patch))


class Attention(str, Enum):
    """Section 2's global attention (every token attends to every token) or section 5's."""

    GLOBAL = "global"
    LOCAL = "local"


# Elements moved by padding, Transposes and Gathers cost about this many multiply-adds
# each on a CPU, so layout work is not free. Measured with onnxruntime, fp32, 2 cores:
# ~110 GMAC/s in MatMul over the projection shapes of resnet18/50, mobilenet_v2 and
# efficientnet_b0 (from [12544, 36] x [36, 32] to [49, 4608] x [4608, 512]: 98-112),
# against ~12 G elements/s copied in runs of 64 floats or more (Gather, Transpose).
TRAFFIC_COST = 10
# Transposes that move runs shorter than this many elements are much slower (measured:
# 0.2-0.5 G elements/s), except a plain swap of two blocks such as NCHW <-> NHWC (~5).
SHORT_RUN = 16
SHORT_RUN_FACTOR = 25
# A Gather of local key windows pays ~4 ns per gathered row up to ~48 floats and moves
# longer rows at the copy rate (onnxruntime, fp32, 2 cores, windows of 3x3 keys: 0.7, 1.9,
# 3.5, 6.9 and 11.7 G elements/s for rows of 3, 8, 16, 32 and 64 floats): a row costs
# at least this many elements moved.
GATHER_ROW_MOVES = 48
# Tokens of at most this many features are gathered window rows first where emission
# lays rows out for the CPU (``AttentionPlan.gathers_rows_first``, design section 6). A
# stem's keys are pixels of a few channels (12-byte runs for RGB), and gathering them
# pixel by pixel paid per pixel: 0.53 of mobilenet_v2's 0.66 ms of stem gathering (batch
# 1, fp32, 2 cores, per-node profile). Gathered rows first, the window Gather copies runs
# as many times longer as the window has rows: mobilenet_v2's stem alone (Pad to its
# Clip) took 0.47 ms against 0.80 at batch 1, 4.7 against 6.8 ms at batch 8 (best of
# 100 runs).
ROWS_FIRST_FEATURES = 4
SWAP_FACTOR = 2
DEPTHWISE_PRODUCT_MOVES = 5
# A plan that folds its heads (``AttentionPlan.folds_heads``) multiplies the gathered
# windows themselves, tile by tile in cache: no attended heads are written, and each
# product is written and read back. Measured on depthwise layers between converted
# pointwise Convs (onnxruntime, fp32, 2 cores, 30-40 blocks of 10 runs, best blocks):
# 96 channels 7x7 at 56x56 took 4.2 ms folded on pixel tokens, 5.0 ms folded on 1x2
# patches (fewer keys gathered, 14% more products) and 3.7 ms with global attention;
# 240 channels 5x5 at 28x28 2.2 ms folded against 2.9 ms global. At 3 moves per product
# the cost model orders each of these pairs as measured (at 2 it took the patches).
FOLDED_PRODUCT_MOVES = 3
# Grouped Convs with channel-major tokens attend in one small product per group: each
# re-reads the attention matrix (few output columns to share each read with) and pays a
# fixed call cost. Measured per layer on torchvision mobilenet_v2 and convnext_tiny
# (onnxruntime, fp32, 2 cores): ~0.19 ns per attention element read (2 elements moved
# each). The call: ~2.5 us per group (0.4 M multiply-adds), from twelve depthwise layers
# of efficientnet_b0's, convnext_tiny's and mobilenet_v2's shapes, each timed alone in
# its global and local forms side by side: with it the cost model picks the faster form
# on eleven and a tie on the twelfth; with 1.3 us, a first per-layer estimate, it took
# global attention on three 14x14 and 7x7 layers where that measured 1.2-1.9x slower.
GROUPED_ATTENTION_READ_MOVES = 2
GROUP_PRODUCT_MACS = 400_000
# Channel-major tokens between channels-last neighbours (the pointwise Convs around a
# depthwise one): a depthwise Conv's global attention, timed against its local attention
# between two converted pointwise Convs, measured 0.3-1.3 ms slower relative to it than
# the two forms timed alone (fifteen depthwise shapes of efficientnet_b0, convnext_tiny and
# mobilenet_v2; onnxruntime, fp32, 2 cores). Pricing the layer's input and output as
# moved at the short-run rate fits every one of them (any factor from 9 to 33 does).
CHANNEL_MAJOR_NEIGHBOUR_MOVES = SHORT_RUN_FACTOR
# Local attention multiplies each block's keys in its own small product, each paying a
# call: ~100 ns measured (onnxruntime MatMul broadcast over blocks, fp32, 2 cores; from
# [1, 1] x [1, 16] to [18, 12] x [12, 144] per block), ~16 k multiply-adds.
BLOCK_PRODUCT_MACS = 16_000
# Local attention's widest intermediate (the heads' attended tokens, or a depthwise Conv's
# per-tap products) is written once and read back: past the last-level cache that costs
# time the multiply-adds do not show (torchvision resnet18, local attention, batch 8:
# 2.05x the original's latency against 1.6x at batch 1). Emission splits the blocks into
# tiles whose intermediates stay under this many bytes at the batch the model is converted
# for (measured on that model at batch 8, onnxruntime, 2 cores, 32 MiB L3: tiles of 1, 2,
# 4 and 8 MiB gave 1.97, 1.92, 1.77 and 1.79x).
TILE_BYTES = 4 * 2**20
# A squeeze-excitation gate scales a map by a factor per channel computed from the whole
# map: the map is written, read by the pool, read again by the scale, and the result by
# the next projection. Where the map at the batch the model is converted for is past
# TILE_BYTES, each pass reads it from memory; one batch item at a time
# (``graph.per_item``) it stays in cache, for the price of running the stretch's nodes
# once per item. So the stretch up to the last gate whose map is at least GATE_ITEM_BYTES
# per item (the high-resolution stages) and past TILE_BYTES at that batch runs per item.
# Measured (onnxruntime, 2 cores, 32 MiB L3, batch 8, converted/original, best blocks,
# interleaved): torchvision efficientnet_b0 whole 2.36-2.43x; per item up to its gate of
# 1.8 MB per item 2.22-2.28x, of 0.75 MB 2.15-2.18x, of 0.53 MB 2.17-2.22x.
# mobilenet_v3_large (gates of 0.2-0.5 MB per item) whole 3.41x; per item up to its
# first gate 3.39x, its third 3.46x, its fifth 3.57x: small maps gain nothing and pay the
# stretch's nodes once per item, so the floor keeps the stretch to the large maps.
GATE_ITEM_BYTES = 2**20
# A pooling layer between channels-last tensors either runs on NCHW (a Transpose on each
# side, which onnxruntime turns into the reorders of its blocked layout) or channels-last,
# as the same pooling over one axis more (the channels, window 1), which onnxruntime runs
# one batch item per thread. Measured (fp32, 2 cores, 32 MiB L3, best of 10 blocks; NCHW
# against channels-last): MaxPool 3x3/2 on 64x112x112 at batch 1, 2, 4 and 8: 0.18/0.41,
# 0.29/0.52, 1.67/0.81 and 5.09/2.55 ms; on 64x224x224 at batch 1 1.28/1.15 ms;
# AveragePool 2x2/2 on 128x56x56 at batch 1, 2, 4 and 8: 0.08/0.12, 0.12/0.23, 0.27/0.40
# and 1.84/1.12 ms; MaxPool 3x3/1 on 256x28x28 at batch 8: 2.11/2.42 ms. Channels-last
# wins from about this many input bytes, where the reorders leave the cache.
POOL_CHANNELS_LAST_BYTES = 8 * 2**20
# A matrix product's kernel computes this many output columns at a time (onnxruntime's
# MLAS, fp32): an attention product with fewer value columns costs as many as this.
# Measured on local attention's per-block products ([36, 16] x [16, D] over 784 blocks and
# [108, 72] x [72, D] over 1064): the same time for every D from 3 to 16, and steps at 32
# and 48 columns. Tokens of a three-channel image's pixels (a stem's 3 or 12 features) pay
# 5x or 1.3x their multiply-adds.
PRODUCT_COLUMNS = 16


def padded_columns(columns: int) -> int:
    """The output columns a matrix product computes for ``columns`` (``PRODUCT_COLUMNS``)."""
    return -(-columns // PRODUCT_COLUMNS) * PRODUCT_COLUMNS


def bias_channel_gain(
    writers: Sequence[tuple[int, int, int]], readers: Sequence[tuple[int, int]]
) -> int:
    """What a constant channel that carries biases saves, in the cost's multiply-adds
    (``graph.bias_channel``; negative: it costs). ``writers``: (tokens, rows, columns) of
    each product that appends the channel as one more column, which costs its rows where
    the kernel's column blocks (``PRODUCT_COLUMNS``) grow; ``readers``: (tokens, columns)
    of each product that reads it as one more row, which saves its bias Add, a pass over
    its output (``TRAFFIC_COST`` each element)."""
    added = sum(t * r * (padded_columns(c + 1) - padded_columns(c)) for t, r, c in writers)
    added += sum(t * padded_columns(c) for t, c in readers)
    return sum(TRAFFIC_COST * t * c for t, c in readers) - added


@dataclass(frozen=True)
class Rearrange:
    """Reshape to ``split`` (batch axis first), permute by ``perm``: one layout step."""

    split: tuple[int, ...]
    perm: tuple[int, ...]

    def compact(self) -> tuple[list[int], list[int]]:
        """``split`` and ``perm`` without size-1 axes (the batch axis always stays)."""
        kept = [axis for axis, size in enumerate(self.split) if axis == 0 or size != 1]
        position = {axis: index for index, axis in enumerate(kept)}
        return [self.split[a] for a in kept], [position[a] for a in self.perm if a in position]

    @property
    def is_identity(self) -> bool:
        _, perm = self.compact()
        return perm == sorted(perm)

    def moved(self, batch: int = 1) -> float:
        """Elements moved, weighted by how fast onnxruntime moves runs of this length."""
        return _rearrange_moved(self, batch)

    def _moved(self, batch: int) -> float:
        if self.is_identity:
            return 0.0
        shape, perm = self.compact()
        elements = batch * math.prod(shape[1:])
        # Merge source axes that stay adjacent; count the innermost run that stays put.
        groups: list[list[int]] = []
        for axis in perm:
            if groups and groups[-1][-1] + 1 == axis:
                groups[-1].append(axis)
            else:
                groups.append([axis])
        last = groups[-1]
        run = math.prod(shape[a] for a in last) if last[-1] == len(shape) - 1 else 1
        if run >= SHORT_RUN:
            return float(elements)
        if len(groups) <= 3 and groups[0] == [0]:  # [B, X, Y] -> [B, Y, X]
            return SWAP_FACTOR * elements
        return SHORT_RUN_FACTOR * elements


@functools.lru_cache(maxsize=16384)
def _layouts_moved(
    spec: ConvSpec, axes: tuple[AxisPlan, ...], channels_last: bool, patchify: bool = True
) -> float:
    """The patchify (unless ``patchify`` is false) and unpatchify steps'
    ``Rearrange.moved``, once for the plans that share them (both orders of a patch and
    block)."""
    steps = _patchify_layout(spec, axes, channels_last) if patchify else []
    steps += _unpatchify_layout(spec, axes, channels_last)
    return sum(step.moved() for step in steps)


@functools.lru_cache(maxsize=65536)
def _rearrange_moved(step: Rearrange, batch: int) -> float:
    """``Rearrange.moved``, once per distinct layout step: the plan search meets the same
    steps for every block size it tries."""
    return step._moved(batch)


@dataclass(frozen=True)
class AttentionPlan:
    """How one Conv becomes multi-head self-attention: geometry, order and cost.

    Queries are the tokens whose output is kept (rows and columns beyond the output grid
    would only be cropped, so they are not computed); keys are every token for global
    attention and a block's window for local attention.
    """

    spec: ConvSpec  # the Conv the attention computes (after any subsampling)
    axes: tuple[AxisPlan, ...]
    order: Order = Order.ATTEND_FIRST
    attention: Attention = Attention.GLOBAL
    source: ConvSpec | None = None  # the Conv node's own attributes
    input_steps: tuple[int, ...] | None = None  # subsampling steps (see ``subsampled``)
    grid: Grid = Grid.SHIFTED
    # local attention on pixel tokens with a query every stride tokens (section 5)
    strided_queries: bool = False
    # whether emission folds the heads into W_O where the plan allows (``folds_heads``):
    # the standard operator form and integer Convs keep the attention
    fold_heads: bool = True
    # whether each head's value may hold only the key pixels its rows of W_O read, where
    # the plan allows (``narrows_values``); the standard operator's heads are all alike
    narrow_values: bool = True
    # whether emission gathers window rows first where the plan allows
    # (``gathers_rows_first``): the CPU emission of a static shape does
    rows_first: bool = True

    @property
    def channels_last(self) -> bool:
        """Token features ``(pixel, channel)`` over all channels: ungrouped and depthwise
        Convs (see ``weights``); other grouped Convs use per-group channel-major tokens."""
        return self.spec.group == 1 or self.depthwise

    @property
    def depthwise(self) -> bool:
        """One input channel per group, local attention attending first: one attention is
        shared by all channels and only the projection is per channel. (Per-group
        attention would be thousands of tiny matrix products per block; global attention
        and project-first keep per-group channel-major tokens, whose batched products
        measure faster there.)"""
        return (
            self.spec.group > 1
            and self.spec.in_channels == self.spec.group
            and self.order is Order.ATTEND_FIRST
            and self.attention is Attention.LOCAL
        )

    @property
    def folds_heads(self) -> bool:
        """Local attention attending first on channels-last tokens (ungrouped or depthwise)
        with one query per block and several heads: the block's window is exactly the
        heads' keys, so each head's one-hot attention folds into its rows of W_O (design
        section 3). The fold reads only constants and is computed at load time; a run
        projects the gathered windows themselves, with no attention product."""
        return (
            self.fold_heads
            and self.attention is Attention.LOCAL
            and self.order is Order.ATTEND_FIRST
            and self.channels_last
            and self.block_queries == 1
            and self.heads > 1
        )

    @cached_property
    def gathers_rows_first(self) -> bool:
        """A 2-D plan that folds its heads over one-pixel tokens of at most
        ``ROWS_FIRST_FEATURES`` features, with windows of more than one row: emission for
        the CPU gathers each block row's window rows first, whole rows at a time, then
        each block's window columns in runs of (channel, row) features (design section
        6, "Window rows first")."""
        return (
            self.rows_first
            and self.folds_heads
            and not self.depthwise
            and self.spec.rank == 2
            and math.prod(self.in_patch) == 1
            and self.in_dim <= ROWS_FIRST_FEATURES
            and self.axes[0].window > 1
        )

    @cached_property
    def value_spans(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per head (in ``head_offsets`` order) and axis, the ``[start, stop)`` of its key
        token's input pixels that any output pixel of the query's patch reads (section
        3's ``phase + u * stride + dilation * k == a * in_patch + y``). The last head along
        an axis usually reads only the first few pixels of its token: an output patch
        reaches ``stride * (p - 1) + dilation * (kernel - 1) + 1`` pixels, not
        ``(reach + 1) * in_patch``."""
        spec = self.spec
        per_axis = []
        for axis, kernel, stride, dilation in zip(
            self.axes, spec.kernel, spec.strides, spec.dilations
        ):
            read: dict[int, list[int]] = {}
            for u in range(axis.patch):
                for tap in range(kernel):
                    head, pixel = divmod(axis.phase + u * stride + dilation * tap, axis.in_patch)
                    read.setdefault(head, []).append(pixel)
            per_axis.append(
                [(min(read[a]), max(read[a]) + 1) if a in read else (0, 0)
                 for a in range(axis.reach + 1)]
            )  # fmt: skip
        return tuple(itertools.product(*per_axis))

    @cached_property
    def narrows_values(self) -> bool:
        """Global attention attending first on an ungrouped Conv's tokens, where some head
        reads only part of its key token (``value_spans``): each head attends over
        the pixels it reads, not the whole token, and W_O keeps only their rows. The rows
        dropped are zero in W_O (section 3), so the sums are the same, bit for bit, with
        fewer multiply-adds: resnet18's 7x7 stem on 8x8-pixel tokens reads 13 of the 16
        pixels of its two heads per axis."""
        return (
            self.narrow_values
            and self.attention is Attention.GLOBAL
            and self.order is Order.ATTEND_FIRST
            and self.spec.group == 1
            and any(
                (start, stop) != (0, axis.in_patch)
                for head in self.value_spans
                for (start, stop), axis in zip(head, self.axes)
            )
        )

    @cached_property
    def head_in_dims(self) -> tuple[int, ...]:
        """Features of each head's value per group: its key token's (``group_in_dim``), or
        with ``narrows_values`` the channels of the pixels it reads."""
        if not self.narrows_values:
            return (self.group_in_dim,) * self.heads
        channels = self.spec.in_channels // self.group
        return tuple(
            channels * math.prod(stop - start for start, stop in head) for head in self.value_spans
        )

    @cached_property
    def value_dim(self) -> int:
        """The heads' values side by side, per group: the rows of W_O."""
        return sum(self.head_in_dims)

    @property
    def phase(self) -> tuple[int, ...]:
        return tuple(a.phase for a in self.axes)

    @property
    def grid_offset(self) -> tuple[int, ...]:
        return tuple(a.grid_offset for a in self.axes)

    @cached_property
    def fixed_grid_heads(self) -> int:
        """Heads this patch needs on the fixed grid (section 8): Li et al.'s count, the
        number to compare the heads used with."""
        spec = self.spec
        return math.prod(
            _fixed_grid_reach(a, k, s, d, pb) + 1
            for a, pb, s, d, k in zip(
                self.axes, spec.pads_begin, spec.strides, spec.dilations, spec.kernel
            )
        )

    @property
    def grid_aligned(self) -> bool:
        """The begin pads are whole input patches: the shifted and the fixed grid are one
        and the same computation (no phase)."""
        return all(
            pb % a.in_patch == 0 for pb, a in zip(self.spec.pads_begin, self.axes, strict=True)
        )

    @property
    def gives_grid_tokens(self) -> bool:
        """Its output tokens tile the output exactly (no extra queries to crop), over all
        channels and above one pixel: a following Conv on the same grid can read them as
        they are (design section 8, "Tokens that flow")."""
        return (
            self.spec.group == 1
            and max(self.patch) > 1
            and all(a.queries * a.patch == a.output for a in self.axes)
        )

    @property
    def takes_grid_tokens(self) -> bool:
        """Its input tokens are whole patches of its input, over all channels and above
        one pixel: its padding is whole tokens and it keeps every input pixel, so it can
        read a previous Conv's output tokens of its input patch instead of patchifying."""
        return (
            self.spec.group == 1
            and not self.subsamples
            and max(self.in_patch) > 1
            and all(
                a.input_kept == a.input_size
                and a.input_size % a.in_patch == 0
                and a.zeros_before % a.in_patch == 0
                and a.zeros_after % a.in_patch == 0
                for a in self.axes
            )
        )

    @cached_property
    def grid_head_offsets(self) -> tuple[tuple[int, ...], ...]:
        """Each head's key token relative to the query's own token: on the fixed grid
        symmetric around 0 (-1, 0, 1 per axis for a 3x3 Conv), on the shifted grid from 0."""
        return tuple(
            tuple(a - c for a, c in zip(offset, self.grid_offset))
            if self.grid is Grid.FIXED
            else offset
            for offset in self.head_offsets
        )

    @property
    def single_key(self) -> bool:
        """Local attention with one head and one query per block, so one key per block:
        the block's own token (kernel-1 Convs, and kernels no larger than their stride).
        Its attention is one product over every token, not one per block."""
        return self.attention is Attention.LOCAL and self.heads == 1 and self.block_queries == 1

    @property
    def tileable(self) -> bool:
        """Local attention whose blocks emission can split into tiles (``tiles``): attend
        first, more than one key per block. Project-first plans project every token before
        the windows are gathered, so a tile would not hold their widest intermediate."""
        return (
            self.attention is Attention.LOCAL
            and self.order is Order.ATTEND_FIRST
            and not self.single_key
        )

    @cached_property
    def widest_intermediate(self) -> int:
        """Elements per batch item of the largest tensor between the input tokens and the
        output tokens of an attend-first plan: the gathered windows, the heads' attended
        tokens, or (depthwise) the per-tap products summed by the projection."""
        windows = self.blocks * self.keys * self.in_dim
        attended = self.queries * self.heads * self.in_dim
        widest = max(windows, attended, self.queries * self.out_dim)
        if self.depthwise:
            multiplier = self.spec.out_channels // self.spec.group
            taps = self.heads * math.prod(self.in_patch) * math.prod(self.patch)
            widest = max(widest, self.queries * taps * self.spec.in_channels * multiplier)
        return widest

    def tiles(self, batch: int, itemsize: int) -> int:
        """How many tiles of blocks keep each tile's intermediates under ``TILE_BYTES`` at
        ``batch`` items of ``itemsize`` bytes (1: emitted whole)."""
        if not self.tileable:
            return 1
        needed = math.ceil(batch * itemsize * self.widest_intermediate / TILE_BYTES)
        return max(1, min(self.blocks, needed))

    @property
    def subsamples(self) -> bool:
        return self.input_steps is not None and max(self.input_steps) > 1

    @cached_property
    def patch(self) -> tuple[int, ...]:
        return tuple(a.patch for a in self.axes)

    @cached_property
    def query_steps(self) -> tuple[int, ...]:
        """Tokens between consecutive queries per axis: the stride with strided queries,
        else 1."""
        return tuple(a.step for a in self.axes)

    @cached_property
    def in_patch(self) -> tuple[int, ...]:
        return tuple(a.in_patch for a in self.axes)

    @cached_property
    def reach(self) -> tuple[int, ...]:
        return tuple(a.reach for a in self.axes)

    @cached_property
    def token_grid(self) -> tuple[int, ...]:
        return tuple(a.tokens for a in self.axes)

    @cached_property
    def tokens(self) -> int:
        return math.prod(self.token_grid)

    @cached_property
    def query_grid(self) -> tuple[int, ...]:
        return tuple(a.queries for a in self.axes)

    @cached_property
    def queries(self) -> int:
        return math.prod(self.query_grid)

    @cached_property
    def block(self) -> tuple[int, ...]:
        return tuple(a.block for a in self.axes)

    @property
    def block_queries(self) -> int:
        return math.prod(self.block)

    @cached_property
    def blocks(self) -> int:
        return math.prod(a.blocks for a in self.axes)

    @cached_property
    def window_grid(self) -> tuple[int, ...]:
        return tuple(a.window for a in self.axes)

    @cached_property
    def keys(self) -> int:
        """Keys each query attends to."""
        if self.attention is Attention.GLOBAL:
            return self.tokens
        return math.prod(self.window_grid)

    @cached_property
    def head_offsets(self) -> tuple[tuple[int, ...], ...]:
        """One head per offset of the key patch relative to the query patch."""
        return tuple(itertools.product(*(range(r + 1) for r in self.reach)))

    @cached_property
    def heads(self) -> int:
        return math.prod(r + 1 for r in self.reach)

    @property
    def group(self) -> int:
        return self.spec.group

    @cached_property
    def group_in_dim(self) -> int:
        """Token features of one group: input channels of the group times the patch."""
        return self.spec.in_channels // self.group * math.prod(self.in_patch)

    @cached_property
    def group_out_dim(self) -> int:
        return self.spec.out_channels // self.group * math.prod(self.patch)

    @cached_property
    def in_dim(self) -> int:
        return self.group_in_dim * self.group

    @cached_property
    def out_dim(self) -> int:
        return self.group_out_dim * self.group

    @cached_property
    def projection_macs(self) -> int:
        # Attend first projects the queries; project first must project every key.
        rows = self.queries if self.order is Order.ATTEND_FIRST else self.tokens
        return rows * self.value_dim * self.group_out_dim * self.group

    @cached_property
    def attention_macs(self) -> int:
        if self.order is Order.ATTEND_FIRST:
            return self.queries * self.keys * self.value_dim * self.group
        return self.heads * self.queries * self.keys * self.out_dim

    @cached_property
    def macs(self) -> int:
        """Multiply-adds per batch item (section 4)."""
        return self.attention_macs + self.projection_macs

    @cached_property
    def query_key_macs(self) -> int:
        """What the standard form (design section 11) adds per batch item: queries and
        keys projected to KEY_DIM per head, and their product for every query-key pair."""
        folded = 1 if self.channels_last else self.spec.group  # groups share one operator
        dim = self.in_dim if self.channels_last else self.group_in_dim
        kv_heads = self.heads if self.order is Order.PROJECT_FIRST and not self.depthwise else 1
        key_rows = self.tokens if self.attention is Attention.GLOBAL else self.blocks * self.keys
        per_group = (
            self.queries * dim * self.heads
            + key_rows * dim * kv_heads
            + self.heads * self.queries * self.keys
        )
        return folded * per_group * KEY_DIM

    def patchify_layout(self) -> list[Rearrange]:
        """Padded input [B, C, T1*P1, ..] -> tokens [B, (g,) N, Dg_in]; see ``weights``."""
        return _patchify_layout(self.spec, self.axes, self.channels_last)

    def unpatchify_layout(self) -> list[Rearrange]:
        """Output tokens [B, (g,) (blocks,) q, Dg_out] -> [B, C_out, ..] (before the crop)."""
        return _unpatchify_layout(self.spec, self.axes, self.channels_last)

    @cached_property
    def moved(self) -> float:
        """Elements copied per batch item by padding, layout changes and gathers, weighted
        by how fast onnxruntime copies them (see ``Rearrange.moved``)."""
        moved = float(self.spec.in_channels * math.prod(a.tokens_extent for a in self.axes))
        if self.subsamples:
            moved += self.spec.in_channels * math.prod(self.spec.input_size)
        if self.gathers_rows_first:
            # the window rows gathered whole (NCHW) and moved channels-last in one swap,
            # in place of the patchify; each block's window columns are then one row each
            rows, width = self.axes[0], self.axes[1].tokens_extent
            gathered = self.in_dim * rows.blocks * rows.window * width
            moved += (1 + SWAP_FACTOR) * gathered
            moved += _layouts_moved(self.spec, self.axes, self.channels_last, patchify=False)
            row = max(self.in_dim * rows.window, GATHER_ROW_MOVES)
            moved += self.blocks * self.axes[1].window * row
        else:
            moved += _layouts_moved(self.spec, self.axes, self.channels_last)
        if self.attention is Attention.LOCAL and not (self.single_key or self.gathers_rows_first):
            dim = self.in_dim if self.order is Order.ATTEND_FIRST else self.heads * self.out_dim
            # the Gather copies one token's features (of one group) per key, each row
            # costing at least GATHER_ROW_MOVES
            groups = 1 if self.channels_last else self.spec.group
            row = max(dim // groups, GATHER_ROW_MOVES)
            moved += self.blocks * self.keys * groups * row
        if self.narrows_values:
            # each narrowed head's pixels are sliced out of the tokens (runs of its pixels
            # along the last axis), and the heads' results are concatenated
            channels = self.spec.in_channels
            for head, dim in zip(self.value_spans, self.head_in_dims):
                if dim < self.in_dim:
                    start, stop = head[-1]
                    run = channels * (stop - start)
                    factor = SHORT_RUN_FACTOR if run < SHORT_RUN else 1
                    moved += factor * self.tokens * dim
            moved += self.queries * self.value_dim
        if self.depthwise:
            # The per-channel projection is a broadcast Mul and a ReduceSum: each product is
            # written and read back (measured ~2 G elements/s, ~80 MatMul multiply-adds).
            per_product = FOLDED_PRODUCT_MOVES if self.folds_heads else DEPTHWISE_PRODUCT_MOVES
            moved += per_product * self.projection_macs
        if self._per_group_products:
            reads = self.spec.group * self.heads * self.queries * self.keys
            moved += GROUPED_ATTENTION_READ_MOVES * reads
            spec = self.spec
            volume = spec.in_channels * math.prod(spec.input_size)
            volume += spec.out_channels * math.prod(spec.output_size)
            moved += CHANNEL_MAJOR_NEIGHBOUR_MOVES * volume
        return moved

    @property
    def _per_group_products(self) -> bool:
        """Channel-major tokens of a grouped Conv: one attention product per group."""
        return self.spec.group > 1 and not self.channels_last

    @cached_property
    def cost(self) -> int:
        """What the patch choice minimises: multiply-adds plus weighted data movement,
        plus the fixed cost of each per-group and per-block product."""
        calls = self.spec.group * GROUP_PRODUCT_MACS if self._per_group_products else 0
        if self.attention is Attention.LOCAL and not (self.single_key or self.folds_heads):
            groups = 1 if self.channels_last else self.spec.group
            calls += groups * self.blocks * BLOCK_PRODUCT_MACS
        return int(self.projection_macs + self._attention_cost + TRAFFIC_COST * self.moved + calls)

    @property
    def _attention_cost(self) -> int:
        """The attention product's multiply-adds with its value columns rounded up to
        whole kernel widths (``PRODUCT_COLUMNS``); per-group products are priced by their
        calls instead (``GROUP_PRODUCT_MACS``); a plan that folds its heads
        (``folds_heads``) runs none, nor does a single-key plan that is not depthwise
        (its attention, exactly 1, multiplies W_O at load time: ``emit._single_key``)."""
        if self._per_group_products:
            return self.attention_macs
        if self.folds_heads or (self.single_key and not self.depthwise):
            return 0
        if self.narrows_values:  # one product per head
            columns = sum(-(-d // PRODUCT_COLUMNS) * PRODUCT_COLUMNS for d in self.head_in_dims)
            return self.queries * self.keys * columns
        dim = self.in_dim if self.order is Order.ATTEND_FIRST else self.out_dim
        padded = -(-dim // PRODUCT_COLUMNS) * PRODUCT_COLUMNS
        return self.attention_macs * padded // dim

    @cached_property
    def rank_key(self) -> tuple:
        """What ``best_plan`` sorts by, kept: planning compares each plan many times."""
        shifted = self.grid is Grid.SHIFTED
        return (
            self.cost, self.params, self.patch, self.order.value, self.block, shifted,
            self.strided_queries,
        )  # fmt: skip

    @cached_property
    def params(self) -> int:
        """Output projection weights; the grouped projection stores no zero blocks, nor
        the narrowed heads' (``narrows_values``) zero rows."""
        return self.value_dim * self.group_out_dim * self.group


def pools_channels_last(elements: int, itemsize: int) -> bool:
    """Whether a pooling layer whose input holds ``elements`` values of ``itemsize`` bytes
    (the whole batch) runs faster channels-last (``POOL_CHANNELS_LAST_BYTES``)."""
    return elements * itemsize >= POOL_CHANNELS_LAST_BYTES


def plan_attention(
    spec: ConvSpec,
    patch: Sequence[int],
    order: Order = Order.ATTEND_FIRST,
    attention: Attention = Attention.GLOBAL,
    block: Sequence[int] | None = None,
    grid: Grid = Grid.SHIFTED,
    strided_queries: bool = False,
    fold_heads: bool = True,
    narrow_values: bool = True,
    rows_first: bool = True,
) -> AttentionPlan:
    """The plan for one patch; local attention needs ``block`` (clamped to the grid).
    ``strided_queries``: local attention on one-pixel tokens along the strided axes (after
    any subsampling), a query every stride tokens; those axes take patch 1.
    ``fold_heads``: whether emission may fold the heads into W_O (``folds_heads``);
    ``narrow_values``: whether heads may hold only the pixels they read (``narrows_values``);
    ``rows_first``: whether emission may gather window rows first (``gathers_rows_first``)."""
    validate(spec)
    source = spec
    spec, steps = subsampled(spec)
    attention, grid = Attention(attention), Grid(grid)
    if strided_queries:
        if attention is not Attention.LOCAL:
            raise GeometryError("strided queries need local attention")
        if max(spec.strides) == 1:
            raise GeometryError("strided queries need a stride above 1 (on a kernel above 1)")
    if len(patch) != spec.rank:
        raise GeometryError(f"patch {list(patch)} has {len(patch)} axes, the Conv has {spec.rank}")
    if attention is Attention.LOCAL:
        if block is None or len(block) != spec.rank:
            raise GeometryError(f"local attention needs a block size per axis, got {block}")
        blocks: Sequence[int | None] = block
    else:
        blocks = [None] * spec.rank
    axes = tuple(
        plan_axis(n, k, s, d, pb, out, p, b, grid, strided_queries)
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
    return AttentionPlan(
        spec,
        axes,
        Order(order),
        attention,
        source,
        steps,
        grid,
        strided_queries,
        fold_heads,
        narrow_values,
        rows_first,
    )


def flow_saving(producer: AttentionPlan, consumer: AttentionPlan) -> float:
    """Elements moved (weighted as in ``AttentionPlan.moved``) that are saved when
    ``consumer`` reads ``producer``'s output tokens (through elementwise operations only)
    instead of their pixels: its patchify shuffle, and the producer's un-patchify where
    its tokens are already in grid order (global attention, or one local block). 0 where
    the two plans do not share a token grid."""
    if not (producer.gives_grid_tokens and consumer.takes_grid_tokens):
        return 0.0
    if consumer.in_patch != producer.patch:
        return 0.0
    saved = consumer.patchify_layout()[-1].moved()
    if producer.attention is Attention.GLOBAL or max(a.blocks for a in producer.axes) == 1:
        saved += producer.unpatchify_layout()[0].moved()
    return saved


MAX_AUTO_PATCH = 8
MAX_AUTO_BLOCK = 8


def _rank_key(plan: AttentionPlan) -> tuple:
    return plan.rank_key


def best_plan(candidates: Sequence[AttentionPlan]) -> AttentionPlan:
    """Lowest cost; ties go to fewer parameters, then the smaller patch, and between the
    two grids (the same computation where the phase is 0) to the fixed one."""
    return min(candidates, key=_rank_key)


def auto_patches(spec: ConvSpec, max_patch: int = MAX_AUTO_PATCH) -> list[tuple[int, ...]]:
    """The patches ``--patch auto`` tries: up to ``max_patch`` per axis, never beyond the
    output."""
    return list(itertools.product(*(range(1, min(max_patch, out) + 1) for out in spec.output_size)))


def has_phase(spec: ConvSpec, patch: Sequence[int]) -> bool:
    """Whether ``patch``'s shifted grid differs from its fixed one: some begin pad is not
    whole input patches (``AttentionPlan.grid_aligned`` false). Without a phase the two
    grids plan the same computation."""
    effective, _ = subsampled(spec)
    return any(pb % (s * p) for pb, s, p in zip(effective.pads_begin, effective.strides, patch))


def candidate_plans(
    spec: ConvSpec,
    attention: Attention = Attention.GLOBAL,
    patches: Sequence[Sequence[int]] | None = None,
    block: Sequence[int] | None = None,
    max_patch: int = MAX_AUTO_PATCH,
    grid: Grid = Grid.SHIFTED,
    fold_heads: bool = True,
    narrow_values: bool = True,
    rows_first: bool = True,
) -> list[AttentionPlan]:
    """Plans to choose from: every patch up to ``max_patch`` per axis (never beyond the
    output) unless ``patches`` is given, both orders, and for local attention the best
    block per patch and order (up to ``MAX_AUTO_BLOCK`` per axis) unless ``block`` is;
    ``fold_heads`` and ``rows_first`` as ``plan_attention``, and for global plans its
    ``narrow_values`` (both restructure the heads, which an explicit attention keeps
    whole) where ``narrow_values`` allows it.

    Plans are immutable and depend on these arguments only, so the candidates of a Conv
    that repeats another's attributes (a ResNet's identical blocks) are computed once."""
    validate(spec)
    return list(
        _candidates(
            spec,
            Attention(attention),
            None if patches is None else tuple(tuple(p) for p in patches),
            None if block is None else tuple(block),
            max_patch,
            Grid(grid),
            fold_heads,
            fold_heads and narrow_values,
            rows_first,
        )
    )


@functools.lru_cache(maxsize=1024)
def _candidates(
    spec: ConvSpec,
    attention: Attention,
    patches: tuple[tuple[int, ...], ...] | None,
    block: tuple[int, ...] | None,
    max_patch: int,
    grid: Grid,
    fold_heads: bool,
    narrow_values: bool,
    rows_first: bool,
) -> tuple[AttentionPlan, ...]:
    if patches is None:
        patches = auto_patches(spec, max_patch)
    # Depthwise Convs share one attention across channels only when attending first.
    orders = (
        [Order.ATTEND_FIRST] if spec.group > 1 and spec.in_channels == spec.group else list(Order)
    )
    global _cached_plans
    if attention is Attention.LOCAL and block is None:
        found = _local_candidates(spec, patches, orders, grid, fold_heads, rows_first)
        _cached_plans += len(found)
        return found
    plans = []
    strided_axes = _strided_axes(spec)
    for patch in patches:
        for order in orders:
            if attention is Attention.GLOBAL:
                plans.append(
                    plan_attention(spec, patch, order, grid=grid, narrow_values=narrow_values)
                )
                continue
            for strided in _query_kinds(strided_axes, patch):
                plans.append(
                    plan_attention(
                        spec,
                        patch,
                        order,
                        attention,
                        block,
                        grid,
                        strided,
                        fold_heads,
                        rows_first=rows_first,
                    )
                )
    _cached_plans += len(plans)
    return tuple(plans)


def _strided_axes(spec: ConvSpec) -> list[int]:
    """The axes with a stride above 1 after subsampling: where queries can be strided."""
    return [i for i, s in enumerate(subsampled(spec)[0].strides) if s > 1]


def _query_kinds(strided_axes: Sequence[int], patch: Sequence[int]) -> tuple[bool, ...]:
    """Local attention's query layouts for ``patch``: queries on patch tokens, and strided
    queries where the Conv has strided axes and ``patch`` is 1 along every one."""
    if strided_axes and all(patch[i] == 1 for i in strided_axes):
        return (False, True)
    return (False,)


# Candidate plans the cache may hold across models: each keeps its derived figures (about
# 15 kB), and one ResNet plans thousands.
CACHED_PLANS_LIMIT = 4000
_cached_plans = 0


def trim_plan_cache(limit: int = CACHED_PLANS_LIMIT) -> None:
    """Forget the cached candidates (``candidate_plans``) once they are more than
    ``limit`` plans: small models converted again and again keep theirs, a large model's
    tens of MB go as soon as it is planned."""
    global _cached_plans
    if _cached_plans > limit:
        _candidates.cache_clear()
        _cached_plans = 0


def _local_candidates(
    spec: ConvSpec,
    patches: Sequence[Sequence[int]],
    orders: list[Order],
    grid: Grid,
    fold_heads: bool,
    rows_first: bool = True,
) -> tuple[AttentionPlan, ...]:
    """Local attention's best block for every patch and order, searched cheapest-first.

    No block has fewer multiply-adds than 1 x 1 (queries round up to whole blocks, windows
    grow), and a plan that does not fold its heads costs at least its multiply-adds; so
    a patch whose 1 x 1 plan has more multiply-adds than the cheapest plan found so far
    costs more with any larger block. It stays a candidate at 1 x 1 (for the parameter
    budget and the report, and folded, possibly the cheapest) without a search. The
    cheapest plan is the one an exhaustive search finds."""
    rank = spec.rank
    strided_axes = _strided_axes(spec)
    starts = [
        plan_attention(
            spec,
            patch,
            order,
            Attention.LOCAL,
            (1,) * rank,
            grid,
            strided,
            fold_heads,
            rows_first=rows_first,
        )
        for patch in patches
        for order in orders
        for strided in _query_kinds(strided_axes, patch)
    ]
    plans, best = [], None
    for start in sorted(starts, key=lambda plan: (plan.macs, _rank_key(plan))):
        if best is not None and start.macs > best.cost:
            plans.append(start)
            continue
        plan = _best_block(
            spec, start.patch, start.order, grid, start.strided_queries, fold_heads, rows_first
        )
        plans.append(plan)
        if best is None or _rank_key(plan) < _rank_key(best):
            best = plan
    return tuple(plans)


def _best_block(
    spec: ConvSpec,
    patch: Sequence[int],
    order: Order,
    grid: Grid = Grid.SHIFTED,
    strided: bool = False,
    fold_heads: bool = True,
    rows_first: bool = True,
) -> AttentionPlan:
    """Local attention's cheapest block for one patch and order, by descent from 1 x 1.

    Each step tries every block one larger or smaller along one axis (up to
    ``MAX_AUTO_BLOCK`` and the patch grid) and moves while the cost falls.
    """
    grids = [-(-out // p) for out, p in zip(spec.output_size, patch)]
    limits = [min(MAX_AUTO_BLOCK, g) for g in grids]
    seen: dict[tuple[int, ...], AttentionPlan] = {}

    def plan(block: tuple[int, ...]) -> AttentionPlan:  # each block once: descents revisit
        if block not in seen:
            seen[block] = plan_attention(
                spec,
                patch,
                order,
                Attention.LOCAL,
                block,
                grid,
                strided,
                fold_heads,
                rows_first=rows_first,
            )
        return seen[block]

    current = plan((1,) * spec.rank)
    while True:
        neighbours = []
        for axis, limit in enumerate(limits):
            for step in (1, -1):
                block = list(current.block)
                block[axis] += step
                if 1 <= block[axis] <= limit:
                    neighbours.append(plan(tuple(block)))
        best = min([current, *neighbours], key=_rank_key)
        if best is current:
            return current
        current = best


def choose_plans(
    candidates_per_layer: Sequence[Sequence[AttentionPlan]],
    original_params: int,
    max_param_growth: float,
    start: Sequence[AttentionPlan] | None = None,
) -> tuple[list[AttentionPlan], bool]:
    """Per-layer plans minimising the total cost under a whole-model parameter budget.

    Starts from ``start`` (by default each layer's cheapest plan); while the converted
    layers' parameters exceed ``max_param_growth * original_params``, applies the single
    switch that saves parameters at the smallest cost increase per parameter saved.
    Returns the plans and whether the budget was met (when even the smallest plans
    exceed it, it is not).
    """
    layers = [sorted(c, key=_rank_key) for c in candidates_per_layer]
    chosen = [c[0] for c in layers] if start is None else list(start)
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
