"""What ``convert`` would do to a model, without doing it (``conv2attn inspect``).

The pass's own stages run up to the plan (opset check, shapes, Conv naming, selection,
the cost model's choice); nothing is emitted and nothing is written. Unlike ``convert``,
a Conv that is invalid or whose size is unknown does not stop the survey: it is listed
with the reason, so one run describes every Conv.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import onnx
import onnx_graphsurgeon as gs

from conv2attn.graph.constants import fold_batchnorms
from conv2attn.graph.options import ConvertOptions
from conv2attn.graph.rewrite import check_opset, plan, prepare_shapes
from conv2attn.graph.select import name_convs, select_convs
from conv2attn.graph.shapes import graphs
from conv2attn.graph.stretches import find_stretches
from conv2attn.inputs import graph_inputs
from conv2attn.modelio import load_model
from conv2attn.record import ConversionReport, LayerReport


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: str
    dims: list[int | str | None]  # a symbol's name, or None where the model names none

    @property
    def dynamic(self) -> list[bool]:
        return [not isinstance(d, int) for d in self.dims]


@dataclass(frozen=True)
class ConvInfo:
    """A Conv-like node as the model states it, and what ``convert`` would do with it."""

    name: str
    op: str
    graph: str
    input_shape: list[int | str | None] | None
    attributes: dict
    converts: bool
    reason: str | None


@dataclass
class Inspection:
    model: str
    opset: int
    inputs: list[InputInfo]
    convs: list[ConvInfo]
    plan: ConversionReport
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "opset": self.opset,
            "inputs": [{**asdict(i), "dynamic": i.dynamic} for i in self.inputs],
            "convs": [asdict(c) for c in self.convs],
            "plan": self.plan.to_dict(),
            "notes": self.notes,
        }


CONV_LIKE = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv")


def _inputs(model: onnx.ModelProto) -> list[InputInfo]:
    declared = {value.name: value for value in model.graph.input}
    found = []
    for graph_input in graph_inputs(model):
        dims = declared[graph_input.name].type.tensor_type.shape.dim
        shown = [
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
            for d in dims
        ]
        found.append(InputInfo(graph_input.name, str(graph_input.dtype), shown))
    return found


def _attributes(node: gs.Node) -> dict:
    wanted = ("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad")
    shown = {}
    for name in wanted:
        if name in node.attrs:
            value = node.attrs[name]
            shown[name] = value.decode() if isinstance(value, bytes) else value
    return shown


def inspect_model(
    model: onnx.ModelProto | str | os.PathLike, options: ConvertOptions
) -> Inspection:
    """Describe ``model``'s inputs and Convs and the plan ``convert`` would choose."""
    name = "the model" if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    opset = check_opset(model)
    inputs = _inputs(model)
    strict, nominal = prepare_shapes(model, options.input_shapes, options.nominal_shapes)
    graph = gs.import_onnx(model)
    folded = fold_batchnorms(graph) if options.fold_bn else []
    name_convs(graph)
    selection = select_convs(graph, options.include, options.exclude, survey=True, nominal=nominal)
    candidates = selection.candidates
    chosen = plan(candidates, options, find_stretches(graph, candidates)) if candidates else None
    reasons = {skip.name: skip.reason for skip in selection.skipped}
    convs = []
    for path, body in graphs(graph):
        for node in body.nodes:
            if node.op not in CONV_LIKE:
                continue
            label = node.name or node.outputs[0].name
            shape = node.inputs[0].shape if node.inputs else None
            convs.append(
                ConvInfo(
                    label,
                    node.op,
                    path,
                    None if shape is None else list(shape),
                    _attributes(node),
                    label not in reasons,
                    reasons.get(label),
                )
            )
    layers = []
    if chosen is not None:
        for candidate, layer_plan, considered in zip(
            selection.candidates, chosen.plans, chosen.considered, strict=True
        ):
            layers.append(
                LayerReport.from_plan(
                    candidate.node.name,
                    candidate.node.outputs[0].name,
                    candidate.path,
                    candidate.spec,
                    layer_plan,
                    considered,
                    None if candidate.quantization is None else candidate.quantization.op,
                    candidate.dynamic,
                )
            )
    report = ConversionReport(
        layers=layers,
        skipped=selection.skipped,
        patch=options.patch_text,
        max_param_growth=options.max_param_growth,
        param_budget_met=True if chosen is None else chosen.budget_met,
        attention=options.attention.value,
        block=options.block_text,
        strict_checked=strict,
        folded_batchnorms=folded,
        grid=options.grid.value,
        queries=options.queries.value,
    )
    notes = []
    if not convs:
        notes.append("the model has no Conv node; convert would have nothing to do")
    elif not layers:
        notes.append("no Conv would be converted; convert would stop with an error")
    return Inspection(name, opset, inputs, convs, report, notes)
