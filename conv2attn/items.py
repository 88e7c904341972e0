"""A converted model's per-item stretch (``graph.per_item``: a Scan over the batch whose
body is the stretch up to a squeeze-excitation gate), for the readers of converted
models: ``check --per-layer`` fetches layer outputs inside the body (``expose_items``,
stacked per item, ``merge_items``), and the PyTorch imports run the same nodes on the
whole batch (``inline_per_item``). onnx only: validation and profiling do not load the
graph pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from conv2attn import names


def per_item_scan(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The per-item Scan of a converted main graph, if it has one."""
    scan = names.per_item_node("Scan")
    return next((n for n in graph.node if n.name == scan and n.op_type == "Scan"), None)


def body_of(scan: onnx.NodeProto) -> onnx.GraphProto:
    return next(a.g for a in scan.attribute if a.name == "body")


def expose_items(model: onnx.ModelProto, wanted: Iterable[str]) -> dict[str, str]:
    """Make the tensors of ``wanted`` that the per-item body computes fetchable: each goes
    out of the body and the Scan stacks it. The stacked output per tensor ([B, d1, ...],
    to merge as ``merge_items`` does); ``withdraw_items`` undoes it."""
    scan = per_item_scan(model.graph)
    if scan is None:
        return {}
    body = body_of(scan)
    made = {out for node in body.node for out in node.output}
    present = {o.name for o in body.output}
    exposed = {}
    for name in dict.fromkeys(wanted):
        if name in made and name not in present:
            body.output.append(onnx.ValueInfoProto(name=name, type=_body_type(body, name)))
            scan.output.append(names.items_of(name))
        if name in made:
            exposed[name] = names.items_of(name)
    return exposed


def _body_type(body: onnx.GraphProto, name: str) -> onnx.TypeProto:
    """The type of a body tensor about to be fetched: recorded where the body has it,
    else float (what a layer's output is)."""
    known = next((v.type for v in body.value_info if v.name == name), None)
    if known is not None:
        return known
    return helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)


def withdraw_items(
    model: onnx.ModelProto, exposed: dict[str, str], counts: tuple[int, int]
) -> None:
    """Undo ``expose_items``: the body and the Scan keep their first ``counts`` outputs."""
    scan = per_item_scan(model.graph)
    if scan is None or not exposed:
        return
    del body_of(scan).output[counts[0] :]
    del scan.output[counts[1] :]


def item_output_counts(model: onnx.ModelProto) -> tuple[int, int]:
    scan = per_item_scan(model.graph)
    return (0, 0) if scan is None else (len(body_of(scan).output), len(scan.output))


def merge_items(stacked: np.ndarray) -> np.ndarray:
    """A tensor at the whole batch from its per-item stack, as the graph merges it."""
    return stacked.reshape(stacked.shape[0] * stacked.shape[1], *stacked.shape[2:])


def inline_per_item(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a copy) with its per-item stretch running on the whole batch again: the
    same nodes in the main graph, the Scan and its merges gone."""
    scan = per_item_scan(model.graph)
    if scan is None:
        return model
    inlined = onnx.ModelProto()
    inlined.CopyFrom(model)
    graph = inlined.graph
    scan = per_item_scan(graph)
    body = body_of(scan)
    source = scan.input[0]
    unsqueeze = body.node[0]
    batched = unsqueeze.output[0]
    nodes = []
    for node in body.node[1:]:
        node.input[:] = [source if name == batched else name for name in node.input]
        nodes.append(node)
    wrapping = f"{names.PER_ITEM}/"
    kept = [n for n in graph.node if not n.name.startswith(wrapping)]
    first = next(i for i, n in enumerate(graph.node) if n.name == scan.name)
    before = [n for n in graph.node[:first] if not n.name.startswith(wrapping)]
    after = kept[len(before) :]
    graph.value_info.extend(body.value_info)
    del graph.node[:]
    graph.node.extend([*before, *nodes, *after])
    for index in reversed(range(len(graph.initializer))):  # a few, and no weight copied
        if graph.initializer[index].name.startswith(wrapping):
            del graph.initializer[index]
    return inlined
