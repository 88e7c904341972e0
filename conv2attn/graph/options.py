"""What ``convert`` is asked to do: parsed, checked and frozen before any work starts."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from conv2attn.core.planning import AttentionChoice, GridChoice, QueryChoice, Sizes
from conv2attn.errors import InputError
from conv2attn.inputs import parse_input_shapes

# Kept as the name callers know; a patch or block option is "auto" or sizes.
Patch = Sizes
# How a converted Conv is written: Softmax and MatMul nodes (the fastest on every runtime
# measured), or the standard ONNX Attention operator (opset 23).
FORMS = ("matmul", "attention")
# What tensors between converted Convs look like: channels-last where that saves
# Transposes (graph/layout.py), or NCHW under the Conv's own output names.
LAYOUTS = ("channels-last", "nchw")


@dataclass(frozen=True)
class ConvertOptions:
    """What ``convert`` does; the CLI's options map onto these fields one to one."""

    patch: Patch = "auto"
    max_param_growth: float = 4.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    attention: AttentionChoice = AttentionChoice.GLOBAL
    block: Patch = "auto"
    fold_bn: bool = False
    # what the cost model plans dynamic sizes for (the graph computes the real ones)
    nominal_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    form: str = "matmul"
    grid: GridChoice = GridChoice.AUTO
    queries: QueryChoice = QueryChoice.AUTO
    layout: str = "channels-last"
    # the batch local attention's tiles are sized for where the model's batch is dynamic
    batch: int = 1
    # False: the GPU form, local attention emitted whole (a GPU runs each tile as its own
    # kernels) and global heads whole (a GPU runs one product per head slower)
    tiles: bool = True
    # False: every stretch runs the batch whole (``graph.per_item``)
    per_item: bool = True

    @property
    def patch_text(self) -> str:
        return _text(self.patch)

    @property
    def block_text(self) -> str:
        return _text(self.block)


def _text(sizes: Patch) -> str:
    return sizes if isinstance(sizes, str) else "x".join(map(str, sizes))


def parse_patch(text: str | int | Sequence[int], option: str = "--patch") -> Patch:
    """``auto``, ``N`` (every axis) or ``NxM`` (one size per spatial axis)."""
    if isinstance(text, int):
        text = str(text)
    if not isinstance(text, str):
        sizes = tuple(int(v) for v in text)
    elif text == "auto":
        return "auto"
    elif re.fullmatch(r"\d+(x\d+)*", text):
        sizes = tuple(int(v) for v in text.split("x"))
    else:
        raise InputError(f"{option} '{text}': expected auto, N or NxM (e.g. 2 or 2x4)")
    if not sizes or min(sizes) < 1:
        raise InputError(f"{option} {text}: sizes must be positive")
    return sizes


def convert_options(
    *,
    patch: str | int | Sequence[int],
    max_param_growth: float,
    include: Sequence[str],
    exclude: Sequence[str],
    input_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None,
    attention: str,
    block: str | int | Sequence[int],
    fold_bn: bool,
    nominal_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    form: str = "matmul",
    grid: str = "auto",
    layout: str = "channels-last",
    batch: int = 1,
    tiles: bool = True,
    queries: str = "auto",
    per_item: bool = True,
) -> ConvertOptions:
    """The options of ``convert``, checked; InputError names the option that is wrong."""
    shapes = _shapes(input_shapes)
    if max_param_growth <= 0:
        raise InputError(f"--max-param-growth {max_param_growth}: must be positive")
    if attention not in {a.value for a in AttentionChoice}:
        raise InputError(f"--attention {attention}: expected global, local or auto")
    if grid not in {g.value for g in GridChoice}:
        raise InputError(f"--grid {grid}: expected shifted, fixed or auto")
    if queries not in {q.value for q in QueryChoice}:
        raise InputError(f"--queries {queries}: expected patch, strided or auto")
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    if form not in FORMS:
        raise InputError(f"--form {form}: expected one of {', '.join(FORMS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"--batch {batch}: expected a positive whole number")
    if attention == AttentionChoice.GLOBAL.value and block != "auto":
        raise InputError("--block applies to --attention local or auto only")
    if attention == AttentionChoice.GLOBAL.value and queries == QueryChoice.STRIDED.value:
        raise InputError("--queries strided applies to --attention local or auto only")
    return ConvertOptions(
        fold_bn=bool(fold_bn),
        attention=AttentionChoice(attention),
        block=parse_patch(block, "--block"),
        patch=parse_patch(patch),
        max_param_growth=float(max_param_growth),
        include=tuple(include),
        exclude=tuple(exclude),
        input_shapes=shapes,
        nominal_shapes=_shapes(nominal_shapes),
        form=form,
        grid=GridChoice(grid),
        queries=QueryChoice(queries),
        layout=layout,
        batch=batch,
        tiles=bool(tiles),
        per_item=bool(per_item),
    )


def _shapes(given: Mapping[str, Sequence[int]] | Sequence[str] | None) -> dict:
    if isinstance(given, Mapping):
        return {name: tuple(int(d) for d in dims) for name, dims in given.items()}
    return parse_input_shapes(given or ())
