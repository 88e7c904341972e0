"""Section 1's geometry computed in the graph, for Convs whose spatial size is dynamic.

The weights do not depend on the input size (``docs/design.md`` section 7); the pads of
SAME ``auto_pad``, the output size, the patch grid, the blocks of local attention, the
token grid and the crop and pad amounts do. ``AxisSizes`` holds them per axis, each an
``int`` when it is known at conversion time or an int64 tensor of shape [1] computed from
``Shape(x)`` at run time; ``ShapeMath`` folds ints and emits nodes only where a value is
dynamic, so a static axis costs nothing. A runtime size plus a constant stays symbolic
(``Offset``) through sums, differences, and products and divisions by 1, so the geometry of
a stride-1 Conv on one-pixel tokens (most layers of a ResNet or a MobileNet) resolves its
pads to ints and its crops to the size itself: no nodes, and no copy for a crop that
keeps everything. The formulas are ``geometry.plan_axis``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn.core.geometry import AttentionPlan, AutoPad, ConvSpec


@dataclass(frozen=True)
class Offset:
    """``base + offset``: a runtime size (``base``, an int64 tensor of shape [1], at least
    ``least``) plus a constant, kept symbolic so that it can cancel or compare."""

    base: gs.Variable
    offset: int
    least: int  # the smallest value ``base`` takes

    @property
    def smallest(self) -> int:
        return self.least + self.offset


Size = int | gs.Variable | Offset


class ShapeMath:
    """Integer arithmetic on sizes: Python ints fold, tensors become nodes named
    ``<prefix>/shape/<op>_<n>``. Only opset-11 ops (Less/Where stand in for Min/Max)."""

    def __init__(self, builder):
        self.b = builder
        self.count = 0
        self._materialised: dict[tuple[int, int], gs.Variable] = {}

    def _name(self, op: str) -> str:
        self.count += 1
        return f"shape/{op}_{self.count}"

    def tensor(self, value: Size) -> gs.Tensor:
        if isinstance(value, int):
            return self.b.int64(self._name("const"), [value])
        if isinstance(value, Offset):
            if value.offset == 0:
                return value.base
            key = (id(value.base), value.offset)
            if key not in self._materialised:
                shift = self.b.int64(self._name("const"), [value.offset])
                self._materialised[key] = self.b.op(
                    "Add", self._name("Add"), [value.base, shift], [1], np.dtype(np.int64)
                )
            return self._materialised[key]
        return value

    def runtime(self, size: gs.Variable, least: int) -> Offset:
        """A size known only at run time, at least ``least``."""
        return Offset(size, 0, least)

    def same(self, x: Size, y: Size) -> bool:
        """Whether ``x`` and ``y`` are equal at every size (False where that is unknown)."""
        if isinstance(x, Offset) and isinstance(y, Offset):
            return x.base is y.base and x.offset == y.offset
        if isinstance(x, int) and isinstance(y, int):
            return x == y
        return x is y

    def _binary(self, op: str, x: Size, y: Size, fold) -> Size:
        if isinstance(x, int) and isinstance(y, int):
            return fold(x, y)
        return self.b.op(
            op, self._name(op), [self.tensor(x), self.tensor(y)], [1], np.dtype(np.int64)
        )

    def add(self, x: Size, y: Size) -> Size:
        if isinstance(x, int) and isinstance(y, Offset):
            x, y = y, x
        if isinstance(x, Offset) and isinstance(y, int):
            return Offset(x.base, x.offset + y, x.least)
        return self._binary("Add", x, y, lambda a, c: a + c)

    def sub(self, x: Size, y: Size) -> Size:
        if isinstance(x, Offset) and isinstance(y, int):
            return Offset(x.base, x.offset - y, x.least)
        if isinstance(x, Offset) and isinstance(y, Offset) and x.base is y.base:
            return x.offset - y.offset
        return self._binary("Sub", x, y, lambda a, c: a - c)

    def mul(self, x: Size, y: Size) -> Size:
        if isinstance(x, Offset) and isinstance(y, int) and y == 1:
            return x
        if isinstance(y, Offset) and isinstance(x, int) and x == 1:
            return y
        return self._binary("Mul", x, y, lambda a, c: a * c)

    def div(self, x: Size, y: int) -> Size:
        """Floor division of a size that is never negative (ONNX Div truncates)."""
        if isinstance(x, Offset) and y == 1:
            return x
        return self._binary("Div", x, y, lambda a, c: a // c)

    def ceil_div(self, x: Size, y: int) -> Size:
        return self.div(self.add(x, y - 1), y)

    def _pick(self, x: Size, y: Size, smaller: bool) -> Size:
        if isinstance(x, int) and isinstance(y, int):
            return min(x, y) if smaller else max(x, y)
        order = self._order(x, y)  # -1: x <= y at every size, 1: x >= y, None: unknown
        if order is not None:
            return x if (order < 0) == smaller else y
        tx, ty = self.tensor(x), self.tensor(y)
        less = self.b.op("Less", self._name("Less"), [tx, ty], [1], np.dtype(np.bool_))
        chosen = [tx, ty] if smaller else [ty, tx]
        return self.b.op("Where", self._name("Where"), [less, *chosen], [1], np.dtype(np.int64))

    @staticmethod
    def _order(x: Size, y: Size) -> int | None:
        if isinstance(x, Offset) and isinstance(y, Offset) and x.base is y.base:
            return -1 if x.offset <= y.offset else 1
        if isinstance(x, Offset) and isinstance(y, int):
            return 1 if x.smallest >= y else None
        if isinstance(x, int) and isinstance(y, Offset):
            return -1 if x <= y.smallest else None
        return None

    def min(self, x: Size, y: Size) -> Size:
        return self._pick(x, y, smaller=True)

    def max(self, x: Size, y: Size) -> Size:
        return self._pick(x, y, smaller=False)

    def product(self, values: Sequence[Size]) -> Size:
        total: Size = 1
        for value in values:
            total = self.mul(total, value)
        return total

    def shape(self, dims: Sequence[Size]) -> gs.Tensor:
        """A Reshape/Expand target: a constant when every dim is an int."""
        if all(isinstance(d, int) for d in dims):
            return self.b.int64(self._name("target"), list(dims))
        return self.b.op(
            "Concat",
            self._name("Concat"),
            [self.tensor(d) for d in dims],
            [len(dims)],
            np.dtype(np.int64),
            attrs={"axis": 0},
        )

    def scalar(self, value: Size) -> gs.Tensor:
        """A 0-d tensor (Range takes scalars)."""
        if isinstance(value, int):
            return self.b.scalar(self._name("scalar"), np.array(value, dtype=np.int64))
        target = self.b.int64(self._name("scalar_shape"), [])
        return self.b.op(
            "Reshape", self._name("Reshape"), [self.tensor(value), target], [],
            np.dtype(np.int64),
        )  # fmt: skip


@dataclass(frozen=True)
class AxisSizes:
    """Section 1 along one axis, each size an int or a runtime tensor."""

    size: Size  # input size along the axis (after any subsampling)
    pad_begin: Size  # the Conv's begin pad (before subsampling; SAME may make it dynamic)
    pad_end: Size
    output: Size
    grid: Size  # output patches G
    blocks: Size  # blocks of queries (global: 1)
    block: Size  # queries per block (global: G)
    queries: Size  # G rounded up to whole blocks
    tokens: Size  # T = queries + R (strided queries: step * (queries - 1) + 1 + R)
    extent: Size  # T * P
    zeros_before: Size
    kept: Size  # input elements on the token grid
    zeros_after: Size


def _same_pads(m: ShapeMath, n: Size, k: int, s: int, d: int, mode: AutoPad) -> tuple:
    out = m.ceil_div(n, s)
    total = m.max(0, m.sub(m.add(m.mul(m.sub(out, 1), s), d * (k - 1) + 1), n))
    small = m.div(total, 2)
    large = m.sub(total, small)
    return (small, large) if mode is AutoPad.SAME_UPPER else (large, small)


def axis_sizes(
    m: ShapeMath,
    n: Size,
    axis: int,
    source: ConvSpec,
    auto_pad: AutoPad,
    plan: AttentionPlan,
    local: bool,
) -> AxisSizes:
    """The sizes along ``axis`` for an input of size ``n`` (an int or a tensor)."""
    k, s, d = source.kernel[axis], source.strides[axis], source.dilations[axis]
    if auto_pad in (AutoPad.SAME_UPPER, AutoPad.SAME_LOWER):
        pad_begin, pad_end = _same_pads(m, n, k, s, d, auto_pad)
    else:
        pad_begin, pad_end = source.pads_begin[axis], source.pads_end[axis]
    output = m.add(m.div(m.sub(m.add(m.add(n, pad_begin), pad_end), d * (k - 1) + 1), s), 1)
    plan_axis = plan.axes[axis]
    subsampled = plan.input_steps is not None and plan.input_steps[axis] > 1
    size, begin = (output, 0) if subsampled else (n, pad_begin)
    grid = m.ceil_div(output, plan_axis.patch)
    if local:
        block = plan_axis.block
        blocks = m.ceil_div(grid, block)
        queries = m.mul(blocks, block)
    else:
        block, blocks, queries = grid, 1, grid
    step = plan_axis.step
    if step == 1:
        tokens = m.add(queries, plan_axis.reach)
    else:  # strided queries: the last query sits at step * (queries - 1)
        tokens = m.add(m.mul(queries, step), plan_axis.reach + 1 - step)
    extent = m.mul(tokens, plan_axis.in_patch)
    # the fixed grid's phase is planned from a begin pad that does not depend on the size
    zeros_before = m.min(m.add(begin, plan_axis.phase), extent)
    kept = m.max(0, m.min(size, m.sub(extent, zeros_before)))
    zeros_after = m.sub(m.sub(extent, zeros_before), kept)
    return AxisSizes(
        size, pad_begin, pad_end, output, grid, blocks, block, queries, tokens, extent,
        zeros_before, kept, zeros_after,
    )  # fmt: skip


def input_sizes(m: ShapeMath, x: gs.Variable, rank: int) -> list[Size]:
    """The spatial sizes of ``x``: ints where its shape fixes them, else from ``Shape``."""
    shape = x.shape or [None] * (rank + 2)
    sizes: list[Size] = []
    whole = None
    for axis in range(rank):
        value = shape[2 + axis]
        if isinstance(value, (int, np.integer)) and value >= 0:
            sizes.append(int(value))
            continue
        if whole is None:
            whole = m.b.op("Shape", m._name("Shape"), [x], [rank + 2], np.dtype(np.int64))
        size = m.b.op(
            "Slice",
            m._name("Slice"),
            [whole, m.tensor(2 + axis), m.tensor(3 + axis), m.tensor(0)],
            [1],
            np.dtype(np.int64),
        )
        sizes.append(m.runtime(size, least=1))  # an image has a pixel along every axis
    return sizes
