"""The HTML page for trained attention: what each head attends to after fine-tuning,
next to the Conv kernel it started as.

Input is ``trainable.attention_summary(model, x)``: per layer the gates, the share of
attention mass off the Conv's positions and the mean attention per relative position.
Each layer is one row of pictures: the source Conv's mean |weight| per tap, then one
panel per head, its starting offset framed. A head that still computes its convolution
shows all its mass in the frame; mass elsewhere is what the attention learned. The page
is self-contained (inline SVG) and written atomically.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conv2attn.modelio import staged_file
from conv2attn.visual_report import STYLE, _matplotlib, _svg

# Relative positions shown around the heads' starting offsets: farther mass is in the
# "off conv" share of each panel's title.
MARGIN = 2


def _crop(layer: dict) -> tuple[np.ndarray, list[int]]:
    """The maps cut to the heads' offsets plus ``MARGIN``; the first shown offsets."""
    offsets = np.array(layer["offsets"])
    lows = np.array(layer["lows"])
    maps = layer["maps"]
    start = np.maximum(offsets.min(axis=0) - MARGIN - lows, 0)
    stop = np.minimum(offsets.max(axis=0) + MARGIN + 1 - lows, maps.shape[1:])
    return maps[:, start[0] : stop[0], start[1] : stop[1]], list(lows + start)


def _layer_figure(plt, layer: dict):
    from matplotlib.colors import PowerNorm

    heads = layer["heads"]
    figure, axes = plt.subplots(1, heads + 1, figsize=(1.9 * (heads + 1), 2.3), squeeze=False)
    kernel_ax, head_axes = axes[0][0], axes[0][1:]
    kernel_ax.imshow(np.atleast_2d(layer["kernel"]), cmap="magma")
    kernel_ax.set_title("Conv |w| per tap", fontsize=8)
    maps, first = _crop(layer)
    extent = [first[1] - 0.5, first[1] + maps.shape[2] - 0.5, first[0] + maps.shape[1] - 0.5,
              first[0] - 0.5]  # fmt: skip
    # gamma < 1 makes small masses visible next to the one-hot start
    norm = PowerNorm(gamma=0.3, vmin=0, vmax=1)
    for head, ax in enumerate(head_axes):
        ax.imshow(np.clip(maps[head], 0, 1), cmap="viridis", norm=norm, extent=extent)
        row, col = layer["offsets"][head]
        frame = plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5)
        ax.add_patch(frame)
        ax.set_title(
            f"head {head}: g={layer['gates'][head]:+.2f}\n"
            f"off conv {100 * layer['off_convolution'][head]:.1f}%",
            fontsize=8,
        )
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    return figure


def render_trained(summary: Sequence[dict], title: str) -> str:
    """The page for ``summary`` (``trainable.attention_summary``)."""
    plt = _matplotlib()
    sections = []
    for layer in summary:
        figure = _layer_figure(plt, layer)
        picture = _svg(figure)
        plt.close(figure)
        off = 100 * float(np.mean(layer["off_convolution"]))
        gates = ", ".join(f"{g:+.2f}" for g in layer["gates"])
        patch = "x".join(map(str, layer["patch"]))
        if layer.get("strided_queries"):
            patch += " with strided queries"
        sections.append(
            f'<section class="layer"><h3><code>{html.escape(layer["name"])}</code></h3>'
            f'<p class="note">{layer["heads"]} heads, {layer["attention"]} attention, patch '
            f"{patch}; gates {gates}; {off:.1f}% of the attention mass off the convolution's "
            f"positions (mean over heads).</p>{picture}</section>"
        )
    intro = (
        "Each row: the Conv kernel a layer started from (mean |weight| over channels, per "
        "tap), then each head's mean attention over relative token positions (rows: "
        "vertical offset, columns: horizontal; one token is one patch), averaged over "
        "queries and inputs, shown within two positions of the heads' starting offsets on "
        "a colour scale with gamma 0.3, so that small masses show. The red frame is the "
        "position the head attended to at conversion (its kernel tap, or patch offset): "
        "all mass inside it means the head still computes its part of the convolution. "
        "g is the head's gate between positional (0) and content (1) attention."
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="note">{intro}</p>' + "".join(sections) + "</body></html>\n"
    )


def write_trained_report(summary: Sequence[dict], output: Path, title: str) -> Path:
    """Write ``render_trained``'s page to ``output`` atomically."""
    page = render_trained(summary, title)
    with staged_file(output) as staged:
        staged.write_text(page, encoding="utf-8")
    return output
