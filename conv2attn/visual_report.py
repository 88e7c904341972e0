"""A one-page, self-contained HTML report of a conversion.

Summary, a sortable per-layer table, the construction of one layer (its token grid, each
head's attention map next to the Conv kernel it reproduces) and charts. Everything is
computed from the two model files: the conversion record in the converted model's
metadata, per-layer parity by running both models, and the attention maps by running the
converted graph and fetching the layer's Softmax output. Charts are matplotlib SVGs,
inlined; styles and scripts are inline too, so the file opens from disk with no network.
"""

from __future__ import annotations

import copy
import html
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from conv2attn import names
from conv2attn.errors import InputError
from conv2attn.inputs import Samples
from conv2attn.modelio import staged_file
from conv2attn.record import converted_layers, recorded_plan
from conv2attn.report import human
from conv2attn.validate import CheckReport, check, run_session, session


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise InputError(
            "the report needs matplotlib: pip install 'conv2attn[report]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "conv2attn"})
    return plt


def _file_size(path: Path) -> int:
    """The model file and its external data files."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


@dataclass
class AttentionPicture:
    """What one converted layer's heads attend to, for its centre query."""

    layer: str
    heads: int
    key_grid: tuple[int, ...]
    query: tuple[int, ...]  # position of the centre query in the key grid
    maps: np.ndarray  # [heads, *key_grid], each summing to 1
    offsets: list[tuple[int, ...]]  # per head: argmax key position minus the query position
    kernel: np.ndarray  # mean |w| over channels, [kh, kw]
    token_grid: tuple[int, ...] = ()  # the layer's whole token grid
    block: tuple[int, ...] | None = None  # local attention: the query block shown

    def describe(self) -> str:
        """What the picture shows, in the layer's own terms."""
        grid = "x".join(map(str, self.token_grid))
        keys = "x".join(map(str, self.key_grid))
        if self.block is None:
            return (
                f"Global attention over the layer's {grid} token grid: the centre query "
                f"{self.query} attends to all {keys} tokens."
            )
        block = "x".join(map(str, self.block))
        return (
            f"Local attention: the layer's {grid} token grid is split into blocks of {block} "
            f"queries, and each block attends to a {keys} window (the block and its halo). "
            f"Shown: one block's centre query, at {self.query} in its window."
        )


def _query_steps(layer: dict) -> tuple[int, ...]:
    """Tokens between queries per axis: the stride with strided queries (design section
    5), else 1."""
    if not layer.get("strided_queries"):
        return (1,) * len(layer["kernel"])
    return recorded_plan(layer)[1].query_steps


def _grid_offset(layer: dict) -> tuple[int, ...]:
    """Whole zero tokens ahead of the input per axis (design section 8): on the fixed grid
    output token I covers the pixels of the token I + offset of its key grid."""
    if layer.get("grid") != "fixed":
        return (0,) * len(layer["kernel"])
    return recorded_plan(layer)[1].grid_offset


def attention_picture(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    layer: dict,
    feeds: Mapping[str, np.ndarray],
) -> AttentionPicture:
    """Run the converted graph, fetch the layer's softmax and take the centre query's row."""
    probe = copy.deepcopy(converted)
    heads = layer["heads"]
    if layer.get("form") == "attention":
        softmax = _expose_operator_softmax(probe, layer["name"])
    else:
        softmax = names.softmax_output(layer["name"])
    probe.graph.output.append(onnx.ValueInfoProto(name=softmax))
    probs = run_session(session(probe), [softmax], dict(feeds), "the converted model")[0]
    if probs.ndim == 4:  # the operator's [B', heads, q, K]: the first batch item and block
        probs = probs[0].transpose(1, 0, 2).reshape(-1, probs.shape[-1])
    reach = layer["reach"]
    steps = _query_steps(layer)
    if layer.get("block"):
        query_grid = layer["block"]
        key_grid = [s * (b - 1) + 1 + r for b, r, s in zip(layer["block"], reach, steps)]
    else:
        query_grid, key_grid = layer["query_grid"], layer["token_grid"]
    queries = int(np.prod(query_grid))
    if probs.shape != (queries * heads, int(np.prod(key_grid))):
        raise InputError(
            f"layer '{layer['name']}': softmax shape {list(probs.shape)} does not match "
            f"the recorded geometry"
        )
    centre = tuple(n // 2 for n in query_grid)
    row = int(np.ravel_multi_index(centre, query_grid))
    maps = probs.reshape(queries, heads, *key_grid)[row]
    # the query's own token among the keys: on the fixed grid, behind the zero tokens
    own = tuple(c * s + z for c, s, z in zip(centre, steps, _grid_offset(layer)))
    offsets = []
    for head in range(heads):
        position = np.unravel_index(int(np.argmax(maps[head])), key_grid)
        offsets.append(tuple(int(p - c) for p, c in zip(position, own)))
    return AttentionPicture(
        layer["name"],
        heads,
        tuple(key_grid),
        own,
        maps,
        offsets,
        _kernel(original, layer),
        tuple(layer["token_grid"]),
        tuple(layer["block"]) if layer.get("block") else None,
    )


def _expose_operator_softmax(probe: onnx.ModelProto, conv: str) -> str:
    """Make ``conv``'s Attention node output its softmax (``qk_matmul_output_mode`` 3,
    the operator's fourth output) and return that output's name."""
    node = next(
        (n for n in probe.graph.node if n.name == names.attention_node(conv)),
        None,
    )
    if node is None:
        raise InputError(f"layer '{conv}': no {names.attention_node(conv)} node in the model")
    while len(node.output) < 4:
        node.output.append("")
    node.output[3] = names.output_of(f"{node.name}/probabilities")
    kept = [a for a in node.attribute if a.name != "qk_matmul_output_mode"]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute("qk_matmul_output_mode", 3)])
    return node.output[3]


def _kernel(original: onnx.ModelProto, layer: dict) -> np.ndarray:
    """The source Conv's weights, mean magnitude over channels, [kh, kw] (or [k] for 1-D)."""
    producers = {out: node for node in original.graph.node for out in node.output}
    initializers = {t.name: t for t in original.graph.initializer}
    conv = producers.get(layer["output"])
    if conv is None or conv.op_type != "Conv":
        return np.zeros(layer["kernel"])
    name = conv.input[1]
    while (
        name not in initializers
        and name in producers
        and producers[name].op_type in ("Identity", "Cast")
    ):
        name = producers[name].input[0]
    if name not in initializers:
        return np.zeros(layer["kernel"])
    weight = numpy_helper.to_array(initializers[name]).astype(np.float64)
    return np.abs(weight).mean(axis=(0, 1))


@dataclass
class ReportData:
    original: Path
    converted: Path
    record: dict
    layers: list[dict]
    parity: CheckReport
    sizes: tuple[int, int]
    picture: AttentionPicture | None
    latency: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    parity_source: str = ""  # where the parity figures come from


def _latency(profile: dict, layers: Sequence[dict]) -> dict[str, tuple[float | None, float | None]]:
    """Per layer (original ms, converted ms) from ``conv2attn profile --per-layer --json``."""
    models = [m for m in profile.get("models", []) if m.get("layers")]
    if not models:
        raise InputError(
            "--profile: the file has no per-layer times; run conv2attn profile --per-layer --json"
        )
    names = {layer["name"] for layer in layers}

    def times(model: dict) -> dict[str, float]:
        return {t["name"]: t["ms"] for t in model["layers"] if t["name"] in names}

    converted = next(
        (m for m in models if "(not converted)" in {t["name"] for t in m["layers"]}), models[-1]
    )
    original = next((m for m in models if m is not converted), None)
    conv_times = times(converted)
    orig_times = times(original) if original else {}
    return {name: (orig_times.get(name), conv_times.get(name)) for name in names}


def gather(
    original_path: Path,
    converted_path: Path,
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    samples: Samples,
    layer_name: str | None = None,
    profile: dict | None = None,
    checked: tuple[Path, dict] | None = None,
) -> ReportData:
    """Everything the page shows. Parity is computed here on ``samples`` unless
    ``checked`` gives the path and content of a ``conv2attn check --json`` file."""
    layers = converted_layers(converted)
    if not layers:
        raise InputError(
            f"{converted_path}: no conversion record in its metadata; "
            f"was it made by conv2attn convert?"
        )
    record = next(json.loads(p.value) for p in converted.metadata_props if p.key == "conv2attn")
    if checked is None:
        parity = check(
            original,
            converted,
            samples,
            per_layer=True,
            names=(str(original_path), str(converted_path)),
        )
        source = (
            f"computed for this report: {parity.samples} samples, {parity.source}, "
            f"onnxruntime {parity.provider}, graph optimisations off"
        )
    else:
        path, data = checked
        try:
            parity = CheckReport.from_dict(data)
        except (KeyError, TypeError) as error:
            raise InputError(f"{path}: not the JSON of conv2attn check ({error})") from None
        source = (
            f"from {path} (conv2attn check of {parity.converted} against {parity.original}): "
            f"{parity.samples} samples, {parity.source}, onnxruntime {parity.provider}"
        )
    # Integer layers select their tokens with a Gather: there is no Softmax to read.
    pictured = [layer for layer in layers if not layer.get("integer")]
    chosen = (
        next(iter(pictured), None)
        if layer_name is None
        else next((layer for layer in layers if layer["name"] == layer_name), None)
    )
    if layer_name is not None and chosen is None:
        raise InputError(
            f"--layer {layer_name}: no converted Conv of that name (first: {layers[0]['name']})"
        )
    if chosen is not None and chosen.get("integer"):
        raise InputError(
            f"--layer {layer_name}: an integer layer ({chosen['integer']}) selects its tokens "
            f"with a Gather and has no attention map to picture; choose a float layer"
        )
    first_batch = next(samples.batches(1))
    picture = (
        None if chosen is None else attention_picture(original, converted, chosen, first_batch)
    )
    sizes = (_file_size(original_path), _file_size(converted_path))
    latency = _latency(profile, layers) if profile else {}
    return ReportData(
        original_path, converted_path, record, layers, parity, sizes, picture, latency, source
    )


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _legend_outside(ax) -> None:
    """The legend right of the axes, where it cannot cover a bar (the SVG's tight box
    grows to hold it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)


def charts(data: ReportData) -> dict[str, object]:
    """matplotlib figures by chart name (latency only when a profile was given)."""
    plt = _matplotlib()
    names = [layer["name"] for layer in data.layers]
    x = np.arange(len(names))
    labels = [n if len(n) <= 28 else "..." + n[-25:] for n in names]
    width = max(6.0, 0.28 * len(names) + 2)
    figures = {}

    errors = [max(layer.max_rel, 1e-12) for layer in data.parity.layers or []]
    fig, ax = plt.subplots(figsize=(width, 3.2))
    ax.bar(x, errors, color="#3b6ea5")
    ax.set_yscale("log")
    ax.axhline(1e-5, color="#b03a2e", linestyle="--", linewidth=1, label="fp32 parity bound (rtol)")
    ax.set_ylabel("max |diff| / max |Conv output|")
    ax.set_title("Per-layer parity error")
    ax.set_xticks(x, labels, rotation=90)
    _legend_outside(ax)
    figures["parity"] = fig

    fig, ax = plt.subplots(figsize=(width, 3.2))
    macs = [layer["macs_after"] / max(layer["macs_before"], 1) for layer in data.layers]
    params = [layer["params_after"] / max(layer["params_before"], 1) for layer in data.layers]
    ax.bar(x - 0.2, macs, 0.4, label="multiply-adds", color="#3b6ea5")
    ax.bar(x + 0.2, params, 0.4, label="parameters", color="#d68910")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_ylabel("converted / original")
    ax.set_title("Per-layer growth")
    ax.set_xticks(x, labels, rotation=90)
    _legend_outside(ax)
    figures["growth"] = fig

    if data.latency:
        fig, ax = plt.subplots(figsize=(width, 3.2))
        original = [data.latency.get(n, (None, None))[0] or 0 for n in names]
        converted = [data.latency.get(n, (None, None))[1] or 0 for n in names]
        ax.bar(x - 0.2, original, 0.4, label="original Conv", color="#7f8c8d")
        ax.bar(x + 0.2, converted, 0.4, label="attention", color="#3b6ea5")
        ax.set_ylabel("ms per run")
        ax.set_title("Per-layer latency (onnxruntime profile)")
        ax.set_xticks(x, labels, rotation=90)
        _legend_outside(ax)
        figures["latency"] = fig

    picture = data.picture
    if picture is not None:
        columns = picture.heads + 2
        fig, axes = plt.subplots(1, columns, figsize=(2.0 * columns, 2.4))
        grid = np.zeros(picture.key_grid if len(picture.key_grid) == 2 else (1, *picture.key_grid))
        grid.flat[np.ravel_multi_index(picture.query, picture.key_grid)] = 1
        axes[0].imshow(grid, cmap="Greys", vmin=0, vmax=1.5)
        what = "window" if picture.block is not None else "tokens"
        axes[0].set_title(f"{what} {'x'.join(map(str, picture.key_grid))}\nquery marked")
        kernel = picture.kernel if picture.kernel.ndim == 2 else picture.kernel[None]
        axes[1].imshow(kernel, cmap="viridis")
        axes[1].set_title("Conv kernel\nmean |w|")
        for head in range(picture.heads):
            image = picture.maps[head] if picture.maps[head].ndim == 2 else picture.maps[head][None]
            axes[2 + head].imshow(image, cmap="magma", vmin=0, vmax=1)
            axes[2 + head].set_title(f"head {head}\noffset {picture.offsets[head]}")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        figures["attention"] = fig
    return figures


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1200px;
color:#1c2833;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d5d8dc}
table{border-collapse:collapse;font-size:.85rem}
td,th{padding:.25rem .6rem;border-bottom:1px solid #eaeded;white-space:nowrap;
text-align:right}td:first-child,th:first-child{text-align:left}th{cursor:pointer;background:#f4f6f7;
position:sticky;top:0}th.sorted-asc::after{content:" \\25B2"}
th.sorted-desc::after{content:" \\25BC"}
.summary td{text-align:left;white-space:normal}.summary td:first-child{font-weight:600;
white-space:nowrap}td:first-child{white-space:normal;overflow-wrap:anywhere}.n{white-space:nowrap}
.bad{color:#b03a2e;font-weight:600}figure{margin:1rem 0}
figure svg{max-width:100%;height:auto}.note{color:#5d6d7e;font-size:.85rem}
"""

# Counts script errors into data-js-errors so a headless browser can check the page.
ERROR_COUNTER = """
(function(){var root=document.documentElement;function count(){root.setAttribute('data-js-errors',
String(Number(root.getAttribute('data-js-errors')||0)+1));}window.addEventListener('error',count);
var original=console.error;
console.error=function(){count();return original.apply(console,arguments);};})();
"""

SORTER = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th,index){
    th.addEventListener('click',function(){
      var body=table.tBodies[0],rows=Array.from(body.rows);
      var ascending=!th.classList.contains('sorted-asc');
      table.querySelectorAll('th').forEach(function(h){h.classList.remove('sorted-asc','sorted-desc');});
      th.classList.add(ascending?'sorted-asc':'sorted-desc');
      rows.sort(function(a,b){
        var x=a.cells[index].dataset.value,y=b.cells[index].dataset.value;
        var nx=parseFloat(x),ny=parseFloat(y);
        var c=(isNaN(nx)||isNaN(ny))?String(x).localeCompare(String(y)):nx-ny;
        return ascending?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def _cell(text: str, value: object | None = None, css: str = "") -> str:
    value = text if value is None else value
    cls = f' class="{css}"' if css else ""
    return f'<td data-value="{html.escape(str(value))}"{cls}>{html.escape(text)}</td>'


def _grids(layers: list[dict]) -> str:
    """How many layers are on each token grid, with the heads Li et al.'s fixed grid needs
    where the layers use fewer (design section 8)."""
    fixed = sum(layer.get("grid") == "fixed" for layer in layers)
    text = f"fixed (Li et al.) {fixed}, shifted {len(layers) - fixed}"
    used = sum(layer["heads"] for layer in layers)
    needed = sum(layer.get("fixed_grid_heads") or layer["heads"] for layer in layers)
    if needed != used:
        text += f"; {used} heads where the fixed grid would need {needed}"
    return text


def _summary_rows(data: ReportData) -> str:
    """The summary table's rows: what was converted, costs before and after, parity."""
    record, parity = data.record, data.parity
    total_before = sum(layer["macs_before"] for layer in data.layers)
    total_after = sum(layer["macs_after"] for layer in data.layers)
    params_before = sum(layer["params_before"] for layer in data.layers)
    params_after = sum(layer["params_after"] for layer in data.layers)
    worst = max(parity.outputs, key=lambda o: o.max_rel)
    skipped = record.get("skipped", [])
    summary = [
        ("model", f"{data.original.name} -> {data.converted.name}"),
        ("Convs converted", str(len(data.layers))),
        (
            "Convs not converted",
            str(len(skipped)) + "".join(f"; {s['name']}: {s['reason']}" for s in skipped),
        ),
        ("attention", record.get("attention", "global")),
        ("token grid", _grids(data.layers)),
        ("heads in total", str(sum(layer["heads"] for layer in data.layers))),
        ("tokens in total", human(sum(int(np.prod(layer["token_grid"])) for layer in data.layers))),
        (
            "multiply-adds (Convs)",
            f"{human(total_before)} -> {human(total_after)} "
            f"({total_after / max(total_before, 1):.2f}x)",
        ),
        (
            "parameters (Convs)",
            f"{human(params_before)} -> {human(params_after)} "
            f"({params_after / max(params_before, 1):.2f}x)",
        ),
        (
            "file size",
            f"{human(data.sizes[0])}B -> {human(data.sizes[1])}B "
            f"({data.sizes[1] / data.sizes[0]:.2f}x)",
        ),
        (
            "parity",
            f"{'PASS' if parity.passed else 'FAIL'}: worst output {worst.name}, "
            f"max rel {worst.max_rel:.3g}; {data.parity_source}",
        ),
    ]
    return "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_unbroken_numbers(html.escape(v))}</td></tr>"
        for k, v in summary
    )


# A number as the report writes it: 1.2e-07, 147.46k, 2.05x, 98.89%, 12.1MB.
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]\d+)?(?:[kMG]?B|[kMG]|x|%)?(?![\w.])")


def _unbroken_numbers(text: str) -> str:
    """Each number in a span that does not wrap (a line may break between numbers, never
    inside one: "1.2e-" / "07")."""
    return NUMBER.sub(lambda m: f'<span class="n">{m.group(0)}</span>', text)


def _layer_table(data: ReportData) -> str:
    """The sortable per-layer table."""
    errors = {layer.name: layer for layer in data.parity.layers or []}
    header = [
        "source Conv",
        "kernel",
        "stride",
        "dilation",
        "groups",
        "patch",
        "tokens",
        "heads",
        "MACs",
        "MACs attn",
        "params",
        "params attn",
        "parity (max rel)",
    ]
    if data.latency:
        header += ["ms original", "ms attention", "latency share"]
    total_latency = sum(v[1] or 0 for v in data.latency.values()) or 1
    body = []
    for layer in data.layers:
        error = errors.get(layer["name"])
        cells = [
            _cell(layer["name"]),
            _cell("x".join(map(str, layer["kernel"]))),
            _cell("x".join(map(str, layer["strides"]))),
            _cell("x".join(map(str, layer["dilations"]))),
            _cell(str(layer["groups"]), layer["groups"]),
            _cell(
                "x".join(map(str, layer["patch"]))
                + (", strided queries" if layer.get("strided_queries") else "")
            ),
            _cell("x".join(map(str, layer["token_grid"])), int(np.prod(layer["token_grid"]))),
            _cell(str(layer["heads"]), layer["heads"]),
            _cell(human(layer["macs_before"]), layer["macs_before"]),
            _cell(human(layer["macs_after"]), layer["macs_after"]),
            _cell(human(layer["params_before"]), layer["params_before"]),
            _cell(human(layer["params_after"]), layer["params_after"]),
            _cell(
                f"{error.max_rel:.2e}" if error else "-",
                error.max_rel if error else "",
                "" if error is None or error.within else "bad",
            ),
        ]
        if data.latency:
            before, after = data.latency.get(layer["name"], (None, None))
            cells += [
                _cell("-" if before is None else f"{before:.3f}", before or 0),
                _cell("-" if after is None else f"{after:.3f}", after or 0),
                _cell("-" if after is None else f"{100 * after / total_latency:.1f}%", after or 0),
            ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        '<table id="layer-table" class="sortable"><thead><tr>'
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )


def _figures_html(data: ReportData, figures: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """The attention picture's section and the charts."""
    sections = []
    picture = data.picture
    if picture is not None and "attention" in figures:
        offsets = ", ".join(f"head {h}: {o}" for h, o in enumerate(picture.offsets))
        sections.append(
            f'<section id="construction"><h2>How {html.escape(picture.layer)} attends</h2>'
            f'<p class="note">Computed by running the converted graph and reading '
            f"<code>{html.escape(f'{names.scope(picture.layer)}/{names.SOFTMAX}')}</code>. "
            f"{html.escape(picture.describe())} Each head puts "
            f"its whole weight on one neighbouring patch ({html.escape(offsets)}); together they "
            f"cover the patches the Conv kernel reads.</p>"
            f'<figure id="chart-attention">{_svg(figures["attention"])}</figure></section>'
        )
    chart_html = []
    for name, title in (
        ("parity", "Parity per layer"),
        ("growth", "Growth per layer"),
        ("latency", "Latency per layer"),
    ):
        if name in figures:
            chart_html.append(
                f'<figure id="chart-{name}"><figcaption>{title}</figcaption>'
                f"{_svg(figures[name])}</figure>"
            )
    if "latency" not in figures:
        chart_html.append(
            '<p class="note">Per-layer latency: pass --profile with the JSON of '
            "<code>conv2attn profile ORIGINAL CONVERTED --per-layer --json FILE</code>.</p>"
        )
    return sections, chart_html


def render(data: ReportData, figures: Mapping[str, object]) -> str:
    """The HTML page."""
    rows = _summary_rows(data)
    table = _layer_table(data)
    sections, chart_html = _figures_html(data, figures)
    title = f"conv2attn report: {data.converted.name}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en" data-js-errors="0"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script>{ERROR_COUNTER}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<section id="summary"><h2>Summary</h2><table class="summary">{rows}</table></section>'
        '<section id="layers"><h2>Layers</h2><p class="note">Click a column to sort.</p>'
        f"{table}</section>"
        + "".join(sections)
        + f'<section id="charts"><h2>Charts</h2>{"".join(chart_html)}</section>'
        f"<script>{SORTER}</script></body></html>\n"
    )


def write_report(data: ReportData, output: Path, png_dir: Path | None = None) -> list[Path]:
    """Write the page (atomically) and, with ``png_dir``, every chart as a PNG."""
    plt = _matplotlib()
    figures = charts(data)
    page = render(data, figures)
    written = []
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            path = png_dir / f"{name}.png"
            figure.savefig(path, format="png", dpi=150, bbox_inches="tight")
            written.append(path)
    for figure in figures.values():
        plt.close(figure)
    with staged_file(output) as staged:
        staged.write_text(page, encoding="utf-8")
    return [output, *written]
