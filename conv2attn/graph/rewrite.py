"""The graph pass: every selected Conv of an ONNX model becomes exact attention.

Stages, in order, one function each:

1. ``prepare_shapes``: pin ``--input-shape``, infer every shape on a skeleton;
2. ``fold_batchnorms`` (with ``--fold-bn``) and ``name_convs``;
3. ``select_convs``: candidates, and every skipped Conv with its reason; then
   ``add_bias_channels`` (``graph.bias_channel``, CPU emission): a constant channel that
   carries biases into the 1x1 products that follow;
4. ``plan``: one plan per Conv (``core.planning``, the cost model);
5. ``_replace``: each Conv's node detached, its attention subgraph emitted in its place
   (``graph.emit``; ``graph.emit_integer`` for ConvInteger and QLinearConv), reusing the
   Conv's output tensor so every consumer stays wired;
6. ``keep_channels_last`` (``--layout channels-last``, ``graph.layout``): the tensors
   between converted Convs stay channels-last where that removes Transposes; then
   ``keep_tokens`` (``graph.tokens``): patch tokens stay tokens between Convs that share
   a token grid; ``_record_layouts`` notes where each layer's output now lives; then
   ``pads_as_zero_tokens`` (``graph.zero_token``, CPU emission): zero padding that only
   key-window Gathers read becomes one zero token (ahead of the projection that writes
   the table, where it can); ``sink_tile_concats`` (``graph.tiles``, CPU emission): a
   tiled layer's tiles go on through activations into the next projection where it
   narrows; ``collapse_reshapes`` (``graph.reshapes``): a Reshape of a Reshape reads the
   first one's input, a layer's input and output aside;
7. cleanup, toposort, and the export: ``_detach_projections`` before it and
   ``_attach_projections`` after it move the projections (most of the model) in one at
   a time; the loaded model itself is dropped as soon as the graph holds every constant
   (``_load_constants``), so it is not held next to what replaces it;
8. ``run_per_item`` (``graph.per_item``, CPU emission at ``--batch`` > 1): the stretch up
   to a large squeeze-excitation gate (picked on the source graph by ``per_item_gate``
   before emission, so that its Convs' tiles are sized for one item) runs in a Scan over
   the batch;
9. ``write_record`` and ``verify``: what was done goes into ``metadata_props``, and the
   result must pass onnx's checks.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter
from onnx_graphsurgeon.ir.tensor import LazyValues

from conv2attn import names
from conv2attn.core.geometry import AttentionPlan, AutoPad, ConvSpec
from conv2attn.core.planning import LayerPlans, PlanError, Stretches, plan_layers
from conv2attn.core.weights import emitted_channels_last, output_bias, output_projection
from conv2attn.errors import InputError
from conv2attn.graph.bias_channel import BiasChannel, add_bias_channels
from conv2attn.graph.constants import fold_batchnorms
from conv2attn.graph.emit import emit_attention
from conv2attn.graph.emit_dynamic import emit_dynamic_attention
from conv2attn.graph.emit_integer import (
    emit_dynamic_integer_attention,
    emit_integer_attention,
)
from conv2attn.graph.emit_standard import (
    ATTENTION_OPSET,
    emit_dynamic_standard_attention,
    emit_standard_attention,
)
from conv2attn.graph.layout import LayoutResult, keep_channels_last
from conv2attn.graph.options import ConvertOptions, convert_options
from conv2attn.graph.per_item import PerItemGate, per_item_gate, run_per_item
from conv2attn.graph.reshapes import collapse_reshapes
from conv2attn.graph.select import Candidate, name_convs, select_convs
from conv2attn.graph.shapes import (
    graph_protos,
    graphs,
    infer_shapes,
    negative_dims_dynamic,
    nominal_sizes,
    pin_input_shapes,
    resolve_spatial_sizes,
    sizes_open,
    skeleton,
)
from conv2attn.graph.stretches import find_stretches
from conv2attn.graph.tiles import SunkTiles, sink_tile_concats
from conv2attn.graph.tokens import ConvertedConv, TokenResult, keep_tokens
from conv2attn.graph.verify import passes_strict_inference, verify
from conv2attn.graph.zero_token import pads_as_zero_tokens
from conv2attn.modelio import (
    copy_fields,
    load_model,
    release_freed_memory,
)
from conv2attn.record import (
    METADATA_KEY,
    ConversionReport,
    LayerReport,
    shortlist,
    write_record,
)

log = logging.getLogger(__name__)

MIN_OPSET = 11
# Model fields that the exported graph does not carry over by itself.
HEADER_FIELDS = (
    "ir_version",
    "producer_name",
    "producer_version",
    "domain",
    "model_version",
    "doc_string",
)

Progress = Callable[[int, int, str], None]


def convert(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    patch: str | int | Sequence[int] = "auto",
    max_param_growth: float = 4.0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    attention: str = "global",
    block: str | int | Sequence[int] = "auto",
    fold_bn: bool = False,
    check: bool = True,
    progress: Progress | None = None,
    nominal_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    form: str = "matmul",
    grid: str = "auto",
    layout: str = "channels-last",
    batch: int = 1,
    tiles: bool = True,
    queries: str = "auto",
    per_item: bool = True,
) -> tuple[onnx.ModelProto, ConversionReport]:
    """Replace every selected Conv of ``model`` by exact multi-head self-attention.

    ``model`` is a ModelProto (left unchanged) or a path. ``patch`` and ``block`` are
    ``"auto"``, ``N`` or ``NxM``; ``attention`` is ``"global"`` (every token attends to
    every token, as in a ViT) or ``"local"`` (blocks of queries attend to their block
    plus a halo; ``docs/design.md``). ``fold_bn`` first folds BatchNormalization nodes
    that directly follow a Conv into it. ``input_shapes`` maps input names to dims, or is
    a list of ``NAME:1x3x224x224`` strings; a size the model leaves dynamic (and no
    ``input_shapes`` pins) stays dynamic, the graph computing its geometry at run time,
    planned for ``nominal_shapes`` (same forms; default batch 1 and 224x224 images).
    ``form`` is ``"matmul"`` (Softmax and MatMul nodes, the fastest) or ``"attention"``
    (the standard ``Attention`` operator; the model is upgraded to opset 23 first).
    ``grid`` is ``"shifted"`` (each Conv's tokens start at its padding: fewest heads),
    ``"fixed"`` (tokens start at the first pixel, one grid shared by consecutive layers,
    Li et al.'s ViT setting) or ``"auto"`` (one grid per stretch of consecutive Convs,
    the cheaper for the stretch; ``graph.stretches``). ``queries``: where a
    strided Conv's local attention puts its queries: ``"patch"`` (tokens of stride x patch
    pixels), ``"strided"`` (tokens of one pixel, a query every stride tokens) or
    ``"auto"`` (per Conv, the cheaper). ``layout``
    ``"channels-last"`` keeps the tensors between converted Convs channels-last where that
    removes Transposes (``graph.layout``); ``"nchw"`` leaves every Conv's output tensor
    NCHW under its own name. ``batch``: where the model's batch is dynamic, the batch
    size local attention's tiles are sized for (``AttentionPlan.tiles``); the model keeps
    its dynamic batch. ``tiles=False`` emits local attention whole at any batch (for GPU
    runtimes, where each tile is kernels of its own). ``per_item=False`` runs every
    stretch on the whole batch (``graph.per_item``). Returns the converted model and a
    report.
    ``check``: run ``onnx.checker`` (and strict shape inference where the input passed
    it) on the result (``graph.verify``). ``progress(done, total, name)`` is called as
    each Conv is replaced.
    Raises InputError for anything wrong with the model or the options.
    """
    options = convert_options(
        patch=patch,
        max_param_growth=max_param_growth,
        include=include,
        exclude=exclude,
        input_shapes=input_shapes,
        attention=attention,
        block=block,
        fold_bn=fold_bn,
        nominal_shapes=nominal_shapes,
        form=form,
        grid=grid,
        layout=layout,
        batch=batch,
        tiles=tiles,
        queries=queries,
        per_item=per_item,
    )
    converted, report = convert_model(model, options, progress)
    if check:
        verify(converted, report.strict_checked, source=model)
    return converted, report


def convert_model(
    source: onnx.ModelProto | str | os.PathLike,
    options: ConvertOptions,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, ConversionReport]:
    """Convert ``source`` (a path, or a model left unchanged), unchecked.

    The model is loaded (or copied) here, so that once the graph holds every weight it
    needs, the loaded protobuf can go: it would otherwise stay in memory, whole, next to
    the weights read out of it and the projections made from them."""
    model = copy.deepcopy(source) if isinstance(source, onnx.ModelProto) else load_model(source)
    check_opset(model)
    if options.form == "attention":
        model = upgrade_opset(model, ATTENTION_OPSET)
    strict, nominal = prepare_shapes(model, options.input_shapes, options.nominal_shapes)
    header = onnx.ModelProto()
    copy_fields(header, model, skip=("graph", "functions", "training_info"))
    graph = gs.import_onnx(model)
    folded = fold_batchnorms(graph) if options.fold_bn else []
    for name in folded:
        log.info("folded BatchNormalization '%s' into the Conv before it", name)
    name_convs(graph)
    selection = select_convs(graph, options.include, options.exclude, nominal=nominal)
    per_item = None
    if options.per_item and options.tiles and options.form == "matmul":  # for CPUs
        convs = [c.node for c in selection.candidates if c.graph is graph]
        per_item = per_item_gate(graph, convs, options.batch)
    _load_constants(graph)
    del model  # nothing refers into it now: its memory (a protobuf arena) goes at once
    release_freed_memory()
    originals = list(selection.candidates)
    bias_channels = [BiasChannel()] * len(originals)
    if options.tiles and options.form == "matmul":  # the emission for CPUs
        selection.candidates, bias_channels = add_bias_channels(graph, originals)
    layer_plans = plan(selection.candidates, options, find_stretches(graph, selection.candidates))
    # every candidate plan, thousands for a ResNet: the report names only a few
    shortlists = [shortlist(*pair) for pair in zip(layer_plans.plans, layer_plans.considered)]
    chosen, budget_met = layer_plans.plans, layer_plans.budget_met
    del layer_plans
    item_convs = per_item.convs if per_item else frozenset()
    layers = _replace(selection.candidates, chosen, shortlists, options, progress, item_convs)
    layers = [
        _with_bias_channel(layer, original.spec, channel)
        for layer, original, channel in zip(layers, originals, bias_channels, strict=True)
    ]
    del originals
    if options.layout == "channels-last":
        moved = keep_channels_last(
            graph,
            [candidate.node.name for candidate in selection.candidates],
            # channels-last pools are sized for a CPU's caches, as tiles are
            pool_batch=options.batch if options.tiles else None,
        )
        static = [
            ConvertedConv(names.scope(candidate.node.name), plan)
            for candidate, plan in zip(selection.candidates, chosen)
            if candidate.graph is graph and not candidate.dynamic and candidate.quantization is None
        ]
        layers = _record_layouts(graph, layers, moved, keep_tokens(graph, static))
    if options.tiles:  # the emission for CPUs, where a Pad runs on one thread
        movable = {
            layer.output_channels_last: names.layer_weights(layer.name)[0]
            for layer in layers
            if layer.output_channels_last and not layer.output_patch and not layer.integer
        }
        prefixes = {names.owner_prefix(layer.name): layer.name for layer in layers}
        zeros = pads_as_zero_tokens(graph, prefixes, movable)
        layers = _record_zero_tokens(layers, zeros.moved)
        tiled = {
            layer.name: layer.output_channels_last
            for layer in layers
            if layer.tiles > 1 and layer.output_channels_last and not layer.graph
            if not (layer.output_patch or layer.output_zero_token or layer.integer)
        }
        readers = [layer.name for layer in layers if not (layer.graph or layer.integer)]
        layers = _record_sunk_tiles(layers, sink_tile_concats(graph, tiled, readers))
    held = _layer_inputs(graph, layers) | {
        name for layer in layers for name in (layer.output, layer.output_channels_last) if name
    }
    held |= {name for layer in layers for name, _ in layer.output_tiles}
    log.info("%d Reshapes of a Reshape read its input instead", collapse_reshapes(graph, held))
    skipped = selection.skipped
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    projections = _detach_projections(graph)
    converted = gs.export_onnx(graph)
    _release_values(t for _, body in graphs(graph) for t in body.tensors().values())
    del graph, selection
    release_freed_memory()
    _attach_projections(converted, projections)
    if per_item is not None:
        layers = _run_per_item(converted, per_item, layers, options.batch)
    _copy_header(converted, header)
    report = ConversionReport(
        layers=layers,
        skipped=skipped,
        patch=options.patch_text,
        max_param_growth=options.max_param_growth,
        param_budget_met=budget_met,
        attention=options.attention.value,
        block=options.block_text,
        strict_checked=strict,
        folded_batchnorms=folded,
        form=options.form,
        grid=options.grid.value,
        queries=options.queries.value,
        layout=options.layout,
        batch=options.batch,
        tiles=options.tiles,
        per_item=options.per_item,
        per_item_gate=per_item.gate
        if per_item and any(layer.per_item for layer in layers)
        else None,
    )
    write_record(converted, report)
    return converted, report


def check_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise InputError("the model imports no default-domain opset; is it an ONNX model?")
    if versions[0] < MIN_OPSET:
        raise InputError(
            f"opset {versions[0]} is older than {MIN_OPSET}; upgrade the model first with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )
    return versions[0]


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` at default-domain opset ``target`` or later, by onnx's version converter
    (its adapters rewrite each changed operator exactly, or refuse)."""
    version = check_opset(model)
    if version >= target:
        return model
    bare = skeleton(model)
    stubs = {t.name for t in bare.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    try:
        # the converter serializes what it is given: the weights stay out (2 GB limit)
        upgraded = version_converter.convert_version(bare, target)
    except Exception as error:  # the converter raises bare RuntimeErrors and checker errors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"--form attention needs opset {target}, and onnx's version converter cannot "
            f"upgrade this model from opset {version}: {reason}; convert with --form matmul"
        ) from None
    log.info("upgraded the model from opset %d to %d for the Attention operator", version, target)
    return _with_weights(upgraded, model, stubs)


def _with_weights(
    upgraded: onnx.ModelProto, model: onnx.ModelProto, stubs: set[str]
) -> onnx.ModelProto:
    """``upgraded`` (from ``model``'s skeleton) with ``model``'s initializers back in
    place of the skeleton's ``stubs``. They are found by name: some onnx releases (1.18)
    return a stub as an empty tensor, no longer marked external."""
    originals = {tensor.name: tensor for tensor in model.graph.initializer}
    for tensor in upgraded.graph.initializer:
        if tensor.name not in stubs and tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if tensor.name not in originals:
            raise InputError(f"initializer '{tensor.name}' was lost in the upgrade")
        tensor.CopyFrom(originals[tensor.name])
    return upgraded


def prepare_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    nominal_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[bool, dict[str, tuple[int, ...]]]:
    """Pin and infer every shape of ``model`` in place. Returns whether the model passes
    strict shape inference (then so must its conversion), and the nominal spatial size of
    each Conv input the model leaves dynamic (``shapes.nominal_sizes``)."""
    for name in negative_dims_dynamic(model):
        log.info("'%s' declares a negative size: read as dynamic", name)
    pin_input_shapes(model, input_shapes)
    bare = skeleton(model)
    for body in graph_protos(bare.graph):
        del body.value_info[:]  # stale shapes must not decide; see infer_shapes
    strict = passes_strict_inference(bare)
    infer_shapes(model, bare)
    # Symbolic inference finds sizes hidden behind a symbolic batch; with open spatial
    # sizes it finds none (and takes long), so those go to the nominal-size pass.
    for name in [] if sizes_open(model) else resolve_spatial_sizes(model, bare):
        log.info("spatial size of '%s' found by symbolic shape inference", name)
    return strict, nominal_sizes(model, bare, nominal_shapes or {})


def _load_constants(graph: gs.Graph) -> None:
    """Read every constant the graph imported lazily into numpy (initializers and the
    tensors of Constant nodes and attributes), and copy the opset imports graphsurgeon
    keeps as a view into the model, so the graph no longer refers to the loaded
    protobuf. Types numpy cannot hold as they are (bfloat16, float8, ...) stay lazy,
    exported byte for byte as they came."""
    for _, body in graphs(graph):
        _own_opset_imports(body)
        tensors = list(body.tensors().values())
        tensors += [v for node in body.nodes for v in node.attrs.values()]
        for tensor in tensors:
            lazy = isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues)
            if lazy and tensor._values.tensor.data_type in PLAIN_NUMPY_TYPES:
                tensor.values  # noqa: B018  (the property loads and keeps the array)
    for function in graph.functions:
        _own_opset_imports(function)


def _release_values(tensors: Iterable[gs.Tensor]) -> None:
    """Drop the arrays of constants that are done with. graphsurgeon's tensors and nodes
    sit in reference cycles (each list points back to its owner), so without this their
    weights would wait for Python's cycle collector."""
    for tensor in tensors:
        if isinstance(tensor, gs.Constant):
            tensor.values = np.zeros(0, dtype=np.uint8)


def _own_opset_imports(body: gs.Graph) -> None:
    domains = getattr(body, "import_domains", None)
    if domains is not None:
        body.import_domains = [copy.deepcopy(domain) for domain in domains]


# ONNX element types whose numpy arrays export to the same TensorProto type.
PLAIN_NUMPY_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "BOOL",
    )
}


def plan(
    candidates: Sequence[Candidate], options: ConvertOptions, stretches: Stretches
) -> LayerPlans:
    """The plans of ``candidates`` under ``options``; ``stretches`` from
    ``stretches.find_stretches`` on the graph they are in."""
    try:
        chosen = plan_layers(
            [c.spec for c in candidates],
            [c.node.name for c in candidates],
            attention=options.attention,
            patch=options.patch,
            block=options.block,
            max_param_growth=options.max_param_growth,
            attend_first=[c.quantization is not None for c in candidates],
            grid=options.grid,
            fixed_grid_unfit=[_fixed_grid_unfit(c) for c in candidates],
            queries=options.queries,
            explicit_attention=[
                options.form == "attention" or c.quantization is not None for c in candidates
            ],
            stretches=stretches,
            narrow_values=options.tiles,
            # the CPU emission gathers window rows first; the dynamic one gathers pixels
            rows_first=[
                options.tiles and options.form == "matmul" and not c.dynamic for c in candidates
            ],
        )
    except PlanError as error:
        raise InputError(str(error)) from None
    if not chosen.budget_met:
        log.warning(
            "parameter growth %.2fx exceeds --max-param-growth %g even with the smallest "
            "patches; using them",
            chosen.growth,
            options.max_param_growth,
        )
    elif options.patch != "auto" and chosen.growth > options.max_param_growth:
        log.warning(
            "parameter growth %.2fx with --patch %s exceeds --max-param-growth %g; "
            "--patch auto keeps within it",
            chosen.growth,
            options.patch_text,
            options.max_param_growth,
        )
    return chosen


def _layer_inputs(graph: gs.Graph, layers: Sequence[LayerReport]) -> frozenset[str]:
    """The tensors layers' nodes read from outside their layer: a layer's input, which
    the PyTorch import finds so (``torch_graph``) and reads in the layout the record
    gives, so a Reshape that makes one must stay."""
    prefixes = {names.owner_prefix(layer.name): layer.name for layer in layers if not layer.graph}
    inputs = set()
    for node in graph.nodes:
        layer = names.owner(node.name, prefixes)
        if layer is None:
            continue
        for tensor in node.inputs:
            if isinstance(tensor, gs.Variable) and not (
                tensor.inputs and names.owner(tensor.inputs[0].name, prefixes) == layer
            ):
                inputs.add(tensor.name)
    return frozenset(inputs)


def _record_layouts(
    graph: gs.Graph, layers: list[LayerReport], moved: LayoutResult, tokens: TokenResult
) -> list[LayerReport]:
    """Each layer's record after ``keep_channels_last`` and ``keep_tokens``: the
    channels-last tensor (or tokens, with their patch) holding its output where the NCHW
    one is gone, and whether it reads channels-last input (or tokens)."""
    if not moved.channels_last and not tokens.outputs and not tokens.inputs:
        return layers
    updated = []
    for layer in layers:
        prefix = names.owner_prefix(layer.name)
        nodes = [n for n in graph.nodes if n.name.startswith(prefix)] if not layer.graph else []
        produced = {id(t) for n in nodes for t in n.outputs}
        reads = {  # a dynamic layer's Shape reads sizes, in either layout
            t.name
            for n in nodes
            if n.op != "Shape"
            for t in n.inputs
            if isinstance(t, gs.Variable) and id(t) not in produced
        }
        scope = names.scope(layer.name)
        output, output_patch = tokens.outputs.get(scope, (moved.outputs.get(layer.output), ()))
        input_patch = tokens.inputs.get(scope, ())
        updated.append(
            dataclasses.replace(
                layer,
                output_channels_last=output,
                input_channels_last=bool(reads & moved.channels_last) or bool(input_patch),
                output_patch=output_patch,
                input_patch=input_patch,
            )
        )
    log.info(
        "channels-last between converted Convs: %d Transposes removed, %d added",
        moved.removed,
        moved.added,
    )
    if tokens.removed:
        log.info(
            "tokens between converted Convs: %d patch shuffles removed, %d added",
            tokens.removed,
            tokens.added,
        )
    return updated


def _record_zero_tokens(layers: list[LayerReport], moved: dict[str, str]) -> list[LayerReport]:
    """Mark the layers whose channels-last output took a zero token ahead of their
    projection (``graph.zero_token``), and the layers whose padding that token is."""
    if not moved:
        return layers
    readers = set(moved.values())
    return [
        dataclasses.replace(
            layer,
            output_zero_token=layer.output_size if layer.output_channels_last in moved else (),
            input_zero_token=layer.name in readers,
        )
        for layer in layers
    ]


def _record_sunk_tiles(layers: list[LayerReport], sunk: SunkTiles) -> list[LayerReport]:
    """Mark the tiled layers whose tiles went on into the next projection
    (``graph.tiles``), and the layers that read them."""
    if not sunk.outputs:
        return layers
    log.info("%d tiled layers' tiles go on into the next projection", len(sunk.outputs))
    return [
        dataclasses.replace(
            layer,
            output_tiles=sunk.outputs.get(layer.name, ()),
            input_tiles=sunk.inputs.get(layer.name, ()),
            input_channels_last=layer.input_channels_last or layer.name in sunk.inputs,
        )
        for layer in layers
    ]


def _fixed_grid_unfit(candidate: Candidate) -> str | None:
    """Why a Conv has no fixed grid at every size: SAME padding with a stride above 1
    on a dynamic axis moves its begin pad (and so the grid's phase) with the size."""
    same = candidate.auto_pad in (AutoPad.SAME_UPPER, AutoPad.SAME_LOWER)
    if not candidate.dynamic or not same or max(candidate.spec.strides) == 1:
        return None
    strides = "x".join(map(str, candidate.spec.strides))
    return f"auto_pad {candidate.auto_pad.value} at stride {strides} moves its pads with the size"


def _replace(
    candidates: Sequence[Candidate],
    chosen: Sequence[AttentionPlan],
    shortlists: Sequence[list[AttentionPlan]],
    options: ConvertOptions,
    progress: Progress | None,
    item_convs: frozenset[str] = frozenset(),
) -> list[LayerReport]:
    """Detach each Conv and emit its attention in its place; the report of each.
    ``item_convs``: the Convs that will run one batch item at a time (``graph.per_item``),
    their tiles sized for one item."""
    standard = options.form == "attention"
    layers = []
    for index, (candidate, plan, considered) in enumerate(
        zip(candidates, chosen, shortlists, strict=True)
    ):
        node = candidate.node
        if progress is not None:
            progress(index, len(candidates), node.name)
        x, y, weight = node.inputs[0], node.outputs[0], candidate.weight_input
        node.inputs.clear()
        node.outputs.clear()
        if not weight.outputs:  # read into ``candidate.weight``, and by no other node
            _release_values([weight])
        quantization = candidate.quantization
        tiles = 1
        if candidate.dynamic and quantization is not None:
            emit_dynamic_integer_attention(
                candidate.graph,
                names.scope(node.name),
                x,
                y,
                plan,
                candidate.auto_pad,
                candidate.weight,
                quantization,
            )
        elif candidate.dynamic:
            layout = emitted_channels_last(plan, dynamic=True)
            arguments = (
                candidate.graph,
                names.scope(node.name),
                x,
                y,
                plan,
                candidate.auto_pad,
                output_projection(plan, candidate.weight, channels_last=layout),
                output_bias(plan, candidate.bias, candidate.weight.dtype, channels_last=layout),
                candidate.batch,
            )
            if standard:
                emit_dynamic_standard_attention(*arguments)
            else:
                # tiled as at the nominal shape the plan was made for
                tiles = _tile_count(plan, candidate, options, item_convs) if plan.folds_heads else 1
                emit_dynamic_attention(*arguments, tiles=tiles)
        elif quantization is None:
            projection = output_projection(plan, candidate.weight)
            bias = output_bias(plan, candidate.bias, candidate.weight.dtype)
            scope, batch = names.scope(node.name), candidate.batch
            if standard:
                emit_standard_attention(candidate.graph, scope, x, y, plan, projection, bias, batch)
            else:
                tiles = _tile_count(plan, candidate, options, item_convs)
                # tiles and wide rows shape the graph for onnxruntime's CPU kernels
                emit_attention(
                    candidate.graph,
                    scope,
                    x,
                    y,
                    plan,
                    projection,
                    bias,
                    batch,
                    tiles,
                    wide_rows=options.tiles,
                )
        else:
            emit_integer_attention(
                candidate.graph,
                names.scope(node.name),
                x,
                y,
                plan,
                candidate.weight,
                quantization,
                candidate.batch,
            )
        integer = None if quantization is None else quantization.op
        layer_form = "attention" if standard and quantization is None else "matmul"
        layers.append(
            LayerReport.from_plan(
                node.name,
                y.name,
                candidate.path,
                candidate.spec,
                plan,
                considered,
                integer,
                candidate.dynamic,
                layer_form,
                _size_dependent_padding(candidate),
                tiles,
            )
        )
        candidate.weight = candidate.bias = None  # the projection replaces them
    return layers


def _with_bias_channel(layer: LayerReport, spec: ConvSpec, channel: BiasChannel) -> LayerReport:
    """``layer`` with what the constant channel changed (``graph.bias_channel``); its
    MACs and parameters before are those of the Conv as it was."""
    if not channel.reads and channel.writes is None:
        return layer
    return dataclasses.replace(
        layer,
        macs_before=spec.macs,
        params_before=spec.params,
        bias_channel_in=channel.reads,
        bias_channel_out=channel.writes,
    )


def _tile_count(
    plan: AttentionPlan, candidate: Candidate, options: ConvertOptions, item_convs: frozenset[str]
) -> int:
    """Tiles for ``plan``'s blocks at the batch the model is converted for (its own fixed
    batch, else ``--batch``; one item in the per-item stretch); 1 with ``--no-tiles``."""
    if not options.tiles:
        return 1
    batch = candidate.batch if isinstance(candidate.batch, int) else options.batch
    if candidate.node.name in item_convs:
        batch = 1
    return plan.tiles(batch, candidate.weight.dtype.itemsize)


def _run_per_item(
    converted: onnx.ModelProto, per_item: PerItemGate, layers: list[LayerReport], batch: int
) -> list[LayerReport]:
    """The stretch up to ``per_item``'s gate into a Scan over the batch; the layers in it
    marked."""
    prefixes = {names.owner_prefix(layer.name): layer.name for layer in layers}
    owners = {names.owner(node, prefixes) for node in run_per_item(converted, per_item.gate)}
    inside = [layer for layer in layers if layer.name in owners]
    if inside:
        log.info(
            "%d converted Convs up to '%s' run one batch item at a time: its map is %.1f MiB "
            "at batch %d",
            len(inside),
            per_item.gate,
            per_item.map_bytes / 2**20,
            batch,
        )
    return [
        dataclasses.replace(layer, per_item=True) if layer.name in owners else layer
        for layer in layers
    ]


def _size_dependent_padding(candidate: Candidate) -> str | None:
    """SAME ``auto_pad`` of a dynamic Conv, whose pads the graph computes per size."""
    same = candidate.auto_pad.value.startswith("SAME")
    return candidate.auto_pad.value if candidate.dynamic and same else None


def _detach_projections(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Take the projections out of the graph before it is exported: exporting them with
    it would hold every one twice at once, plus copies."""
    projections: dict[str, np.ndarray] = {}
    for _, body in graphs(graph):
        for tensor in body.tensors().values():
            if isinstance(tensor, gs.Constant) and names.is_projection(tensor.name):
                projections.setdefault(tensor.name, tensor.values)
                tensor.values = np.zeros(0, dtype=projections[tensor.name].dtype)
    return projections


def _attach_projections(converted: onnx.ModelProto, projections: dict[str, np.ndarray]) -> None:
    """Move each projection into its initializer and release it at once, so at most one
    is held twice."""
    for initializer in (
        tensor for body in graph_protos(converted.graph) for tensor in body.initializer
    ):
        values = projections.pop(initializer.name, None)
        if values is not None:
            del initializer.dims[:]
            initializer.dims.extend(values.shape)
            initializer.raw_data = values.tobytes()
            del values


def _copy_header(converted: onnx.ModelProto, header: onnx.ModelProto) -> None:
    """The source model's own fields and metadata (an earlier conversion record aside)."""
    for field_name in HEADER_FIELDS:
        if header.HasField(field_name):
            setattr(converted, field_name, getattr(header, field_name))
    del converted.metadata_props[:]
    converted.metadata_props.extend(p for p in header.metadata_props if p.key != METADATA_KEY)
