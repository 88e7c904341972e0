"""Human-readable tables of a conversion report."""

from __future__ import annotations

from collections.abc import Sequence

from conv2attn.graph_pass import ConversionReport


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


def format_table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(row, widths, right)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def conversion_table(report: ConversionReport) -> str:
    """Per converted Conv: geometry, patch, heads, tokens and cost; totals at the bottom."""
    header = [
        "Conv",
        "kernel",
        "stride",
        "groups",
        "patch",
        "order",
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
                _dims(layer.patch),
                layer.order,
                str(layer.heads),
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
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            human(report.macs_before),
            f"{human(report.macs_after)} ({_ratio(report.macs_after, report.macs_before)})",
            human(report.params_before),
            f"{human(report.params_after)} ({_ratio(report.params_after, report.params_before)})",
        ]
    )
    right = [False, False, False, True, False, False, True, False, True, True, True, True]
    text = format_table(rows, right)
    if report.skipped:
        text += "\n\nnot converted:\n" + "\n".join(
            f"  {skip.name}: {skip.reason}" for skip in report.skipped
        )
    return text
