"""The conversion record: what was converted, how, and at what cost.

``ConversionReport`` is what ``convert`` returns (``to_dict`` is the JSON of ``convert
--json``). A subset of it travels inside the converted model, as JSON in
``metadata_props["conv2attn"]``: each converted Conv's name, output tensor and geometry,
so that ``check --per-layer``, ``profile --per-layer`` and ``report`` can find the layers
of any converted file. ``write_record`` and ``converted_layers`` are the only writer and
reader of that entry. Imports onnx only: validation and profiling read records without
the pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import onnx

from conv2attn import __version__
from conv2attn.core.geometry import Attention, AttentionPlan, ConvSpec, Grid, Order, plan_attention
from conv2attn.errors import InputError

METADATA_KEY = "conv2attn"
# The operators the pass converts; readers find an original model's layers among these.
CONVERTED_OPS = ("Conv", "ConvInteger", "QLinearConv")


@dataclass(frozen=True)
class LayerReport:
    """One converted Conv."""

    name: str
    output: str
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    groups: int
    in_channels: int
    out_channels: int
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    patch: tuple[int, ...]
    order: str
    attention: str
    block: tuple[int, ...] | None
    heads: int
    reach: tuple[int, ...]
    token_grid: tuple[int, ...]
    query_grid: tuple[int, ...]
    tokens: int
    queries: int
    keys: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    cost: int = 0  # what --patch auto minimises: MACs plus weighted data movement
    alternatives: tuple[dict, ...] = ()
    graph: str = ""  # the control-flow subgraph holding the Conv, e.g. "If_0/then_branch"
    integer: str | None = None  # ConvInteger or QLinearConv: integer attention
    # the input size is dynamic: the plan is for the nominal ``input_size``; the graph
    # computes the real grid at run time
    dynamic: bool = False
    # "attention": the standard ONNX Attention operator; "matmul": Softmax and MatMul nodes
    form: str = "matmul"
    pads_begin: tuple[int, ...] = ()
    pads_end: tuple[int, ...] = ()
    # SAME_UPPER/SAME_LOWER of a dynamic layer: its pads depend on the run-time size
    auto_pad: str | None = None
    # where the token grid lies (section 8), and the heads this patch needs on the fixed
    # grid: Li et al.'s count, next to the heads used
    grid: str = "shifted"
    fixed_grid_heads: int = 0
    # ``--layout channels-last``: the tensor holding this Conv's output channels-last where
    # other nodes read it (the NCHW ``output`` may then be gone); whether the layer reads
    # channels-last input
    output_channels_last: str | None = None
    input_channels_last: bool = False
    # tokens between layers (``graph.tokens``): the output tensor above holds this Conv's
    # output as patch tokens [B, T1, T2, P1, P2, C] of this patch; the patch of the
    # tokens the layer reads
    output_patch: tuple[int, ...] = ()
    input_patch: tuple[int, ...] = ()
    # the padding of the layer that reads this one's output is a zero token appended
    # ahead of this layer's projection (``graph.zero_token``): the channels-last output
    # above is the tokens of this output grid and that token, [B, N + 1, C]; the layer
    # that reads it drops the last token to see its input
    output_zero_token: tuple[int, ...] = ()
    input_zero_token: bool = False
    # local attention split into this many tiles of blocks (``AttentionPlan.tiles``)
    tiles: int = 1
    # the tiles went on into the next layer's projection (``graph.tiles``): the output
    # above is never made; these tensors [B, ..rows.., C] (name, rows), joined along their
    # rows in this order, hold it; the tensors a reading layer's projection reads, one
    # per tile of the layer before, joined so its channels-last input
    output_tiles: tuple[tuple[str, int], ...] = ()
    input_tiles: tuple[str, ...] = ()
    # local attention on one-pixel tokens with a query every stride tokens (section 5)
    strided_queries: bool = False
    # one query per block, heads folded into W_O (``AttentionPlan.folds_heads``)
    folded: bool = False
    # each head's value holds only the key pixels it reads (``AttentionPlan.narrows_values``)
    narrowed: bool = False
    # a constant channel carries biases (``graph.bias_channel``): the layer reads its bias
    # from its input's last channel, and writes this value (0 or 1) in an appended last
    # output channel; ``in_channels`` and ``out_channels`` count them, the MACs and
    # parameters before are the Conv's own
    bias_channel_in: bool = False
    bias_channel_out: int | None = None
    # the layer is in the stretch that runs one batch item at a time (``graph.per_item``):
    # its tensors are inside the Scan's body
    per_item: bool = False

    @classmethod
    def from_plan(
        cls,
        name: str,
        output: str,
        graph: str,
        spec: ConvSpec,
        plan: AttentionPlan,
        considered: list[AttentionPlan],
        integer: str | None = None,
        dynamic: bool = False,
        form: str = "matmul",
        auto_pad: str | None = None,
        tiles: int = 1,
    ) -> LayerReport:
        """The report of Conv ``name`` (attributes ``spec``) converted with ``plan``,
        chosen from ``considered``; ``integer`` names an integer Conv's operator (its
        attention is a selection, so only the projection multiplies, as in a plan that
        folds its heads into W_O)."""
        return cls(
            name=name,
            output=output,
            kernel=spec.kernel,
            strides=spec.strides,
            dilations=spec.dilations,
            groups=spec.group,
            in_channels=spec.in_channels,
            out_channels=spec.out_channels,
            input_size=spec.input_size,
            output_size=spec.output_size,
            patch=plan.patch,
            order=plan.order.value,
            attention=plan.attention.value,
            block=plan.block if plan.attention is Attention.LOCAL else None,
            heads=plan.heads,
            reach=plan.reach,
            token_grid=plan.token_grid,
            query_grid=plan.query_grid,
            tokens=plan.tokens,
            queries=plan.queries,
            keys=plan.keys,
            macs_before=spec.macs,
            macs_after=(
                plan.projection_macs
                if integer or plan.folds_heads
                else plan.macs + (plan.query_key_macs if form == "attention" else 0)
            ),
            params_before=spec.params,
            params_after=plan.params,
            cost=plan.cost,
            alternatives=_alternatives(plan, considered),
            graph=graph,
            integer=integer,
            dynamic=dynamic,
            form=form,
            pads_begin=spec.pads_begin,
            pads_end=spec.pads_end,
            auto_pad=auto_pad,
            grid=plan.grid.value,
            fixed_grid_heads=plan.fixed_grid_heads,
            tiles=tiles,
            strided_queries=plan.strided_queries,
            folded=plan.folds_heads,
            narrowed=plan.narrows_values,
        )


def _summary(plan: AttentionPlan) -> dict:
    return {
        "patch": list(plan.patch),
        "order": plan.order.value,
        "block": list(plan.block) if plan.attention is Attention.LOCAL else None,
        "grid": plan.grid.value,
        "strided_queries": plan.strided_queries,
        "heads": plan.heads,
        "macs": plan.macs,
        "params": plan.params,
        "cost": plan.cost,
    }


ALTERNATIVES = 5


def shortlist(plan: AttentionPlan, candidates: list[AttentionPlan]) -> list[AttentionPlan]:
    """``plan`` and the cheapest plans that were not chosen: all the report needs of
    the candidates."""
    others = sorted((c for c in candidates if c != plan), key=lambda c: c.cost)
    return [plan, *others[:ALTERNATIVES]]


def _alternatives(plan: AttentionPlan, candidates: list[AttentionPlan]) -> tuple:
    """The cheapest plans that were not chosen, for the report."""
    return tuple(_summary(c) for c in shortlist(plan, candidates)[1:])


# The fields of a LayerReport that the converted model carries about itself.
RECORDED_FIELDS = (
    "name",
    "output",
    "patch",
    "heads",
    "token_grid",
    "query_grid",
    "reach",
    "order",
    "block",
    "kernel",
    "strides",
    "dilations",
    "groups",
    "queries",
    "keys",
    "macs_before",
    "macs_after",
    "params_before",
    "params_after",
    "graph",
    # the source Conv, so that a converted model can be rebuilt as trainable layers
    "in_channels",
    "out_channels",
    "input_size",
    "pads_begin",
    "pads_end",
    "grid",
    "fixed_grid_heads",
    "strided_queries",
)


@dataclass(frozen=True)
class SkippedConv:
    name: str
    reason: str


@dataclass
class ConversionReport:
    """What a conversion did, per Conv, with totals; ``to_dict`` is the JSON form."""

    layers: list[LayerReport]
    skipped: list[SkippedConv]
    patch: str
    max_param_growth: float
    param_budget_met: bool
    attention: str = Attention.GLOBAL.value
    block: str = "auto"
    strict_checked: bool = True  # the input passed strict shape inference, so must the output
    folded_batchnorms: list[str] = field(default_factory=list)
    form: str = "matmul"
    grid: str = "auto"
    queries: str = "auto"
    layout: str = "nchw"
    batch: int = 1
    tiles: bool = True  # False: convert --no-tiles
    per_item: bool = True  # False: convert --no-per-item
    # the gate that ends the stretch run one batch item at a time (``graph.per_item``)
    per_item_gate: str | None = None

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "conv2attn_version": __version__,
            "options": {
                "patch": self.patch,
                "attention": self.attention,
                "block": self.block,
                "max_param_growth": self.max_param_growth,
                "form": self.form,
                "grid": self.grid,
                "queries": self.queries,
                "layout": self.layout,
                "batch": self.batch,
                "tiles": self.tiles,
                "per_item": self.per_item,
            },
            "param_budget_met": self.param_budget_met,
            "folded_batchnorms": self.folded_batchnorms,
            "per_item_gate": self.per_item_gate,
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(skip) for skip in self.skipped],
            "totals": {
                "converted": len(self.layers),
                "skipped": len(self.skipped),
                "macs_before": self.macs_before,
                "macs_after": self.macs_after,
                "params_before": self.params_before,
                "params_after": self.params_after,
            },
        }

    def to_record(self) -> dict:
        """What the converted model keeps about itself (``metadata_props``)."""
        return {
            "version": __version__,
            "attention": self.attention,
            "layers": [_recorded(layer) for layer in self.layers],
            "skipped": [asdict(skip) for skip in self.skipped],
        }


def _recorded(layer: LayerReport) -> dict:
    entry = {name: getattr(layer, name) for name in RECORDED_FIELDS}
    if layer.integer:  # only integer layers carry it, so float records stay as they were
        entry["integer"] = layer.integer
    if layer.dynamic:
        entry["dynamic"] = True
    if layer.form != "matmul":
        entry["form"] = layer.form
    if layer.auto_pad:
        entry["auto_pad"] = layer.auto_pad
    if layer.output_channels_last:
        entry["output_channels_last"] = layer.output_channels_last
    if layer.input_channels_last:
        entry["input_channels_last"] = True
    if layer.output_patch:
        entry["output_patch"] = list(layer.output_patch)
    if layer.input_patch:
        entry["input_patch"] = list(layer.input_patch)
    if layer.output_zero_token:
        entry["output_zero_token"] = list(layer.output_zero_token)
    if layer.input_zero_token:
        entry["input_zero_token"] = True
    if layer.tiles > 1:
        entry["tiles"] = layer.tiles
    if layer.output_tiles:
        entry["output_tiles"] = [[name, rows] for name, rows in layer.output_tiles]
    if layer.input_tiles:
        entry["input_tiles"] = list(layer.input_tiles)
    if layer.folded:
        entry["folded"] = True
    if layer.narrowed:
        entry["narrowed"] = True
    if layer.bias_channel_in:
        entry["bias_channel_in"] = True
    if layer.bias_channel_out is not None:
        entry["bias_channel_out"] = layer.bias_channel_out
    if layer.per_item:
        entry["per_item"] = True
    return entry


def write_record(model: onnx.ModelProto, report: ConversionReport) -> None:
    """Store ``report``'s record in ``model``'s metadata, replacing an earlier one."""
    onnx.helper.set_model_props(
        model,
        {
            **{p.key: p.value for p in model.metadata_props if p.key != METADATA_KEY},
            METADATA_KEY: json.dumps(report.to_record(), sort_keys=True),
        },
    )


def converted_layers(model: onnx.ModelProto) -> list[dict]:
    """The conversion record: per converted Conv, its name and output tensor, in graph order."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)["layers"]
    return []


def recorded_plan(layer: dict) -> tuple[ConvSpec, AttentionPlan]:
    """The source Conv and the plan of a recorded layer, as the pass chose it (rebuilt by
    the geometry and checked against the recorded heads and token grid)."""
    needed = ("in_channels", "out_channels", "input_size", "pads_begin", "pads_end")
    missing = [key for key in needed if key not in layer]
    if missing:
        raise InputError(
            f"layer '{layer['name']}': the model's record lacks {', '.join(missing)} "
            "(written by an older conv2attn); convert the original model again"
        )
    spec = ConvSpec(
        in_channels=layer["in_channels"],
        out_channels=layer["out_channels"],
        group=layer["groups"],
        kernel=tuple(layer["kernel"]),
        strides=tuple(layer["strides"]),
        dilations=tuple(layer["dilations"]),
        pads_begin=tuple(layer["pads_begin"]),
        pads_end=tuple(layer["pads_end"]),
        input_size=tuple(layer["input_size"]),
    )
    attention = Attention.LOCAL if layer.get("block") else Attention.GLOBAL
    plan = plan_attention(
        spec,
        tuple(layer["patch"]),
        Order(layer["order"]),
        attention,
        layer.get("block"),
        Grid(layer.get("grid", Grid.SHIFTED.value)),  # records before the fixed grid: shifted
        bool(layer.get("strided_queries", False)),
        bool(layer.get("folded", False)),  # the graph has no attention product
        bool(layer.get("narrowed", False)),  # W_O holds only the rows its heads read
    )
    if plan.heads != layer["heads"] or list(plan.token_grid) != list(layer["token_grid"]):
        raise InputError(
            f"layer '{layer['name']}': the recorded geometry does not rebuild "
            f"({plan.heads} heads, grid {list(plan.token_grid)} vs the record's "
            f"{layer['heads']}, {layer['token_grid']})"
        )
    return spec, plan
