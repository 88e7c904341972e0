"""Human-readable tables of a conversion report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from conv2attn.record import ConversionReport
from conv2attn.runtime.registry import BACKENDS
from conv2attn.terminal import BOLD, GREEN, RED, paint

if TYPE_CHECKING:  # onnxruntime, which they import, is not needed to print a conversion
    from conv2attn.profile import ProfileReport
    from conv2attn.validate import CheckReport


def human(count: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def _dims(values: Sequence[int]) -> str:
    return "x".join(str(v) for v in values)


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def format_table(rows: Sequence[Sequence[str]], right: Sequence[bool], colour: bool = False) -> str:
    """Aligned columns; with ``colour``, a bold header and red "NO" cells."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = []
        for cell, width, align in zip(row, widths, right):
            text = cell.rjust(width) if align else cell.ljust(width)
            if index == 0:
                text = paint(text, BOLD, colour)
            elif cell == "NO":
                text = paint(text, RED, colour)
            cells.append(text)
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def conversion_table(report: ConversionReport, colour: bool = False) -> str:
    """Per converted Conv: geometry, patch, heads, tokens and cost; totals at the bottom."""
    local = any(layer.block for layer in report.layers)
    header = [
        "Conv",
        "kernel",
        "stride",
        "groups",
        "patch",
        "order",
        "block",
        "heads",
        "tokens",
        "MACs",
        "MACs attn",
        "params",
        "params attn",
    ]
    rows = [header]
    for layer in report.layers:
        rows.append(
            [
                layer.name,
                _dims(layer.kernel),
                _dims(layer.strides),
                str(layer.groups),
                _dims(layer.patch) + ("*" if layer.strided_queries else ""),
                layer.order,
                _dims(layer.block) if layer.block else "",
                _heads(layer),
                _dims(layer.token_grid),
                human(layer.macs_before),
                human(layer.macs_after),
                human(layer.params_before),
                human(layer.params_after),
            ]
        )
    rows.append(
        [
            f"total ({len(report.layers)} converted)",
            *[""] * 8,
            human(report.macs_before),
            f"{human(report.macs_after)} ({_ratio(report.macs_after, report.macs_before)})",
            human(report.params_before),
            f"{human(report.params_after)} ({_ratio(report.params_after, report.params_before)})",
        ]
    )
    right = [False, False, False, True, False, False, False, True, False, True, True, True, True]
    if not local:  # drop the empty block column
        rows = [row[:6] + row[7:] for row in rows]
        right = right[:6] + right[7:]
    if report.attention == "auto":  # each layer's own choice
        kinds = ["attention", *(layer.attention for layer in report.layers), ""]
        rows = [[*row[:6], kind, *row[6:]] for row, kind in zip(rows, kinds)]
        right = [*right[:6], False, *right[6:]]
    if report.grid == "auto":  # each layer's own grid
        at = rows[0].index("heads")
        kinds = ["grid", *(layer.grid for layer in report.layers), ""]
        rows = [[*row[:at], kind, *row[at:]] for row, kind in zip(rows, kinds)]
        right = [*right[:at], False, *right[at:]]
    if any(layer.integer for layer in report.layers):  # which layers are integer attention
        kinds = ["integer", *(layer.integer or "" for layer in report.layers), ""]
        rows = [[*row[:1], kind, *row[1:]] for row, kind in zip(rows, kinds)]
        right = [right[0], False, *right[1:]]
    text = format_table(rows, right, colour)
    if any(_heads(layer) != str(layer.heads) for layer in report.layers):
        text += (
            "\n\nheads (n): the same patch needs n heads on Li et al.'s fixed token grid "
            "(--grid fixed)"
        )
    if any(layer.strided_queries for layer in report.layers):
        text += (
            "\n\npatch n*: strided queries: tokens of one pixel, a query every stride tokens "
            "(the kernel's taps are the heads)"
        )
    tiled = [layer.tiles for layer in report.layers if layer.tiles > 1]
    if tiled:
        counts = f"{min(tiled)}-{max(tiled)}" if min(tiled) < max(tiled) else str(tiled[0])
        text += (
            f"\n\n{len(tiled)} layer(s) attend in tiles of blocks ({counts} tiles each) whose "
            f"intermediates stay in cache at batch {report.batch} (--batch to change it)"
        )
    per_item = sum(layer.per_item for layer in report.layers)
    if per_item:
        text += (
            f"\n\n{per_item} layer(s), up to the gate {report.per_item_gate}, run one batch "
            f"item at a time (a Scan over the batch): at batch {report.batch} the gate's map "
            "would leave the cache between its passes (design section 6)"
        )
    for count, what in (
        (
            sum(layer.folded for layer in report.layers),
            "fold their heads into W_O: one query per block, so each query's gathered "
            "window is projected directly, with no attention product (design section 3)",
        ),
        (
            sum(layer.narrowed for layer in report.layers),
            "give each head only the pixels of its key tokens that it reads (global "
            "attention): W_O's rows for the others are zero, so they are left out (design "
            "section 3)",
        ),
        (
            sum(bool(layer.input_patch) for layer in report.layers),
            "read patch tokens straight from the Convs before them: they share a token "
            "grid, so nothing between them is un-patchified and patchified again (design "
            "section 8)",
        ),
    ):
        if count:
            text += f"\n\n{count} layer(s) {what}"
    dynamic = [layer for layer in report.layers if layer.dynamic]
    if dynamic:
        sizes = sorted(
            {tuple(layer.input_size) for layer in dynamic}, key=lambda s: (-math.prod(s), s)
        )
        shown = [_dims(s) for s in sizes]
        seen = ", ".join(shown) if len(shown) <= 2 else f"{shown[0]} down to {shown[-1]}"
        text += (
            f"\n\n{len(dynamic)} layer(s) keep dynamic sizes: their graphs compute the token "
            f"grid at run time; patches, tokens and costs above are for the sizes they see "
            f"at the nominal input size ({seen}; --nominal-shape to change it)"
        )
    if report.skipped:
        text += "\n\nnot converted:\n" + "\n".join(
            f"  {skip.name}: {skip.reason}" for skip in report.skipped
        )
    return text


def _heads(layer) -> str:
    """Heads used, and the fixed grid's count for the same patch where it differs."""
    fixed = layer.fixed_grid_heads
    return str(layer.heads) if fixed in (0, layer.heads) else f"{layer.heads} ({fixed})"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _nonfinite(checks) -> bool:
    return any(c.nonfinite_original or c.nonfinite_converted for c in checks)


def check_table(report: CheckReport, colour: bool = False) -> str:
    """Per output errors and agreement, per-layer errors, accuracy, and the verdict; an
    Inf/NaN column (original/converted) appears when either model produced any."""
    lines = [
        f"inputs: {report.samples} samples, {report.source}; onnxruntime {report.provider}",
        "",
    ]
    counts = _nonfinite(report.outputs)
    rows = [["output", "max abs", "max rel", "mean abs", "top-1", "top-k", "tolerance", "within"]]
    rows[0] += ["Inf/NaN orig/conv"] if counts else []
    for o in report.outputs:
        rows.append(
            [
                o.name,
                f"{o.max_abs:.3g}",
                f"{o.max_rel:.3g}",
                f"{o.mean_abs:.3g}",
                _percent(o.top1_agreement),
                "-" if o.k is None else f"{_percent(o.topk_agreement)} (k={o.k})",
                f"{o.rtol:g}*max+{o.atol:g}",
                "yes" if o.within else "NO",
            ]
            + ([f"{o.nonfinite_original}/{o.nonfinite_converted}"] if counts else [])
        )
    right = [False, True, True, True, True, True, False, False] + [True] * counts
    lines.append(format_table(rows, right, colour))
    if report.layers is not None:
        counts = _nonfinite(report.layers)
        rows = [["converted Conv", "output tensor", "max abs", "max rel", "mean abs", "within"]]
        rows[0] += ["Inf/NaN orig/conv"] if counts else []
        for layer in report.layers:
            rows.append(
                [
                    layer.name,
                    layer.output,
                    f"{layer.max_abs:.3g}",
                    f"{layer.max_rel:.3g}",
                    f"{layer.mean_abs:.3g}",
                    "yes" if layer.within else "NO",
                ]
                + ([f"{layer.nonfinite_original}/{layer.nonfinite_converted}"] if counts else [])
            )
        right = [False, False, True, True, True, False] + [True] * counts
        lines += ["", format_table(rows, right, colour)]
        failing = report.first_failing_layer
        if failing is not None:
            lines.append(
                f"first layer over tolerance: {failing.name} (max rel {failing.max_rel:.3g})"
            )
    if report.accuracy is not None:
        a = report.accuracy
        lines += [
            "",
            f"accuracy on {a.samples} labelled samples ({a.output}): "
            f"{report.original} {_percent(a.original)}, "
            f"{report.converted} {_percent(a.converted)}, predictions changed: {a.changed}",
        ]
    lines += [f"note: {note}" for note in report.notes]
    worst = max(report.outputs, key=lambda o: o.max_rel)
    verdict = paint("PASS", GREEN, colour) if report.passed else paint("FAIL", RED, colour)
    lines += [
        "",
        f"parity: {verdict} (worst output {worst.name}: max rel {worst.max_rel:.3g}, "
        f"bound {worst.rtol:g} * max|ref| + {worst.atol:g})",
    ]
    return "\n".join(lines)


def profile_table(report: ProfileReport, top: int = 15, colour: bool = False) -> str:
    """Latency per model with the ratio to the first; the numerics of GPU runs against
    onnxruntime CPU fp32; per-layer shares when measured."""
    numerics = any(m.numerics is not None for m in report.models)
    header = ["model", "batch", "median ms", "best block ms", "min ms", "p90 ms", "p95 ms"]
    header += ["p99 ms", "max ms", "mean ms", "samples/s", "ratio", "ratio best block", "runs"]
    if numerics:
        header += ["max rel vs fp32 CPU", "bound"]
    rows = [header]
    for m in report.models:
        s = m.stats
        row = [
            m.path,
            str(s.batch),
            f"{s.median_ms:.2f}",
            f"{s.best_block_ms:.2f}",
            f"{s.min_ms:.2f}",
            f"{s.p90_ms:.2f}",
            f"{s.p95_ms:.2f}",
            f"{s.p99_ms:.2f}",
            f"{s.max_ms:.2f}",
            f"{s.mean_ms:.2f}",
            f"{s.throughput:.1f}",
            f"{m.ratio:.2f}x",
            f"{m.best_block_ratio:.2f}x",
            str(s.runs),
        ]
        if numerics:
            n = m.numerics
            row += (
                ["-", "-"]
                if n is None
                else [
                    f"{n.max_rel:.2e}",
                    f"{n.rtol:g}*max+{n.atol:g} {'ok' if n.within else 'EXCEEDED'}",
                ]
            )
        rows.append(row)
    threads = f", {report.threads} threads" if report.backend.startswith("ort-") else ""
    execution = f", {report.execution}" if report.execution else ""
    lines = [
        f"{report.backend}, {report.precision}, {report.device}{threads}{execution}",
        "",
        format_table(rows, [False] + [True] * (len(header) - 1), colour),
    ]
    if report.backend == "torch-cuda" and report.execution == "eager":
        lines += [
            "",
            "eager PyTorch launches every node from Python and these times include that; "
            "--cuda-graph (or --compile) times the GPU's work alone",
        ]
    if report.tiled and BACKENDS[report.backend].gpu:
        lines += [
            "",
            f"{', '.join(report.tiled)}: local attention in tiles sized for a CPU's caches, "
            "which a GPU runs as kernels of their own; convert with --no-tiles for a GPU",
        ]
    for m in report.models:
        if not m.layers:
            continue
        ranked = sorted(m.layers, key=lambda layer: -layer.ms)
        rows = [["layer (source Conv)", "ms", "share"]]
        rows += [
            [layer.name, f"{layer.ms:.3f}", f"{100 * layer.share:.1f}%"] for layer in ranked[:top]
        ]
        lines += ["", f"{m.path}: kernel time by source Conv (top {min(top, len(ranked))})"]
        lines.append(format_table(rows, [False, True, True], colour))
    return "\n".join(lines)


def _shape(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) if dims is not None else "?"


def inspection_table(inspection, colour: bool = False) -> str:
    """``conv2attn inspect``: inputs, Conv-like nodes with attributes and verdicts, and
    the plan as ``convert`` would print it."""
    lines = [f"{inspection.model}: opset {inspection.opset}", ""]
    rows = [["input", "dtype", "dims", "dynamic"]]
    for i in inspection.inputs:
        dynamic = [str(index) for index, flag in enumerate(i.dynamic) if flag]
        rows.append([i.name, i.dtype, _shape(i.dims), ", ".join(dynamic) or "-"])
    lines.append(format_table(rows, [False, False, False, False], colour))
    rows = [["node", "op", "input", "kernel", "stride", "pads", "dilation", "groups", "converts"]]
    for c in inspection.convs:
        a = c.attributes
        pads = a.get("auto_pad") if a.get("auto_pad", "NOTSET") != "NOTSET" else a.get("pads")
        rows.append(
            [
                c.name,
                c.op,
                _shape(c.input_shape),
                _dims(a["kernel_shape"]) if "kernel_shape" in a else "-",
                _dims(a["strides"]) if "strides" in a else "1",
                pads if isinstance(pads, str) else _dims(pads) if pads else "0",
                _dims(a["dilations"]) if "dilations" in a else "1",
                str(a.get("group", 1)),
                "yes" if c.converts else "NO",
            ]
        )
    if len(rows) > 1:
        lines += ["", format_table(rows, [False] * 7 + [True, False], colour)]
    if inspection.plan.layers or inspection.plan.skipped:
        lines += ["", "plan (what convert would do):", conversion_table(inspection.plan, colour)]
    lines += [f"note: {note}" for note in inspection.notes]
    return "\n".join(lines)
