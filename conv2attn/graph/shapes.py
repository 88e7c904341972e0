"""Shapes the pass needs: pinned inputs, inferred sizes, and the graphs to walk.

A Conv's spatial size decides its plan, so the pass first pins what the user gave
(``--input-shape``), then infers every other shape on a weightless copy of the model (a
*skeleton*), falling back to onnxruntime's symbolic inference for sizes that onnx's own
inference leaves open. The walks over control-flow bodies (``If``, ``Loop``, ``Scan``)
live here too, for protobuf graphs and onnx-graphsurgeon graphs alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping

import onnx
import onnx_graphsurgeon as gs

from conv2attn.errors import InputError
from conv2attn.modelio import copy_fields, tensor_size
from conv2attn.record import CONVERTED_OPS

log = logging.getLogger(__name__)


def negative_dims_dynamic(model: onnx.ModelProto) -> list[str]:
    """Make every negative size in the declared shapes a symbol: older exporters (Paddle2ONNX)
    write a dynamic batch as ``dim_value: -1``, which no ONNX tool reads as dynamic. Returns
    the names of the values changed."""
    changed = []
    for graph in graph_protos(model.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            dims = value.type.tensor_type.shape.dim
            for axis, dim in enumerate(dims):
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.Clear()
                    dim.dim_param = f"{value.name}_dim{axis}"
                    changed.append(value.name)
    return sorted(set(changed))


def pin_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
    inputs = {value.name: value for value in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            known = ", ".join(sorted(inputs)) or "none"
            raise InputError(f"--input-shape: the model has no input '{name}' (inputs: {known})")
        tensor_type = inputs[name].type.tensor_type
        current = tensor_type.shape.dim
        if tensor_type.HasField("shape") and len(current) != len(dims):
            raise InputError(
                f"--input-shape {name}: {len(dims)} dims given, the input has rank {len(current)}"
            )
        fixed = [d.dim_value if d.HasField("dim_value") else None for d in current]
        for index, (fixed_size, size) in enumerate(zip(fixed, dims)):
            if fixed_size is not None and fixed_size != size:
                raise InputError(
                    f"--input-shape {name}: dim {index} is fixed to {fixed_size} in the model, "
                    f"{size} given"
                )
        del tensor_type.shape.dim[:]
        for size in dims:
            tensor_type.shape.dim.add().dim_value = size


# Initializers larger than this are left out of skeletons; smaller ones (shapes, axes)
# stay, since shape inference reads their values.
SKELETON_MAX_BYTES = 4096


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the data of its large initializers (marked external).

    Shape inference needs only their dims, so it runs on the skeleton without copying
    the weights; the skeleton is never saved.
    """
    copied = onnx.ModelProto()
    copy_fields(copied, model, skip=("graph",))
    copy_fields(copied.graph, model.graph, skip=("initializer",))
    for tensor in model.graph.initializer:
        if tensor_size(tensor) <= SKELETON_MAX_BYTES:
            copied.graph.initializer.append(tensor)
            continue
        stub = copied.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "not-loaded"
    return copied


def infer_shapes(model: onnx.ModelProto, bare: onnx.ModelProto) -> None:
    """Fill ``value_info`` (and graph output types) of ``model`` by inference on its
    skeleton ``bare``, whose stored ``value_info`` has been removed: exporters leave stale
    entries, and the graph itself is the truth. Stored entries fill in only tensors that
    inference cannot type (custom ops, say)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    except Exception as error:  # onnx raises several types; the stored shapes still serve
        log.warning("shape inference failed (%s); using the shapes stored in the model", error)
        return
    for graph, typed_graph in zip(graph_protos(model.graph), graph_protos(inferred.graph)):
        known = {value.name for value in typed_graph.value_info}
        stored = [value for value in graph.value_info if value.name not in known]
        del graph.value_info[:]
        graph.value_info.extend(typed_graph.value_info)
        graph.value_info.extend(stored)
        for original, typed in zip(graph.output, typed_graph.output):
            if typed.type.HasField("tensor_type") and typed.type.tensor_type.HasField("shape"):
                original.type.CopyFrom(typed.type)


def spatial_known(value: onnx.ValueInfoProto | None) -> bool:
    """Whether ``value`` has a rank above 2 and every spatial size fixed."""
    if value is None or not value.type.tensor_type.HasField("shape"):
        return False
    dims = value.type.tensor_type.shape.dim
    return len(dims) > 2 and all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims[2:])


def _unsized_conv_inputs(model: onnx.ModelProto) -> set[str]:
    """Inputs of the main graph's Convs whose spatial size is not known."""
    typed = {v.name: v for v in (*model.graph.input, *model.graph.value_info)}
    return {
        node.input[0]
        for node in model.graph.node
        if node.op_type in CONVERTED_OPS
        and node.input
        and not spatial_known(typed.get(node.input[0]))
    }


def sizes_open(model: onnx.ModelProto) -> bool:
    """Whether a graph input leaves a size beyond the batch dynamic: then inference on the
    model itself cannot find spatial sizes, and only ``nominal_sizes`` can plan them."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return any(
        not (dim.HasField("dim_value") and dim.dim_value >= 0)
        for value in model.graph.input
        if value.name not in initializers
        for dim in value.type.tensor_type.shape.dim[1:]
    )


def nominal_sizes(
    model: onnx.ModelProto, bare: onnx.ModelProto, nominal: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Spatial sizes, at nominal input shapes, of the Conv inputs whose size the model
    leaves dynamic: what the cost model plans those Convs for (their graphs compute the
    real sizes at run time). ``nominal`` gives shapes per input; other dynamic inputs
    take a suggested one (batch 1, image-sized spatial dims)."""
    from conv2attn.inputs import graph_inputs, suggested_dims

    unknown = _unsized_conv_inputs(model)
    if not unknown:
        return {}
    shapes = {
        i.name: nominal.get(i.name) or tuple(int(d) for d in suggested_dims(i).split("x"))
        for i in graph_inputs(model)
        if i.name in nominal or any(d is None for d in i.dims)
    }
    pinned = onnx.ModelProto()
    pinned.CopyFrom(bare)
    for body in graph_protos(pinned.graph):
        del body.value_info[:]
    try:
        pin_input_shapes(pinned, shapes)
    except InputError:
        return {}
    infer_shapes(pinned, pinned)
    resolve_spatial_sizes(pinned, pinned)
    found = {}
    for value in (*pinned.graph.input, *pinned.graph.value_info):
        if value.name in unknown and spatial_known(value):
            dims = value.type.tensor_type.shape.dim[2:]
            found[value.name] = tuple(d.dim_value for d in dims)
    return found


def resolve_spatial_sizes(model: onnx.ModelProto, bare: onnx.ModelProto) -> list[str]:
    """Conv inputs of the main graph whose spatial size onnx's inference left unknown,
    resolved by onnxruntime's symbolic shape inference. Returns the names resolved.

    Exporters compute channel splits and window partitions from ``Shape`` of a tensor
    with a symbolic batch (shufflenet's channel split, maxvit's windows); onnx's data
    propagation stops there, even with the batch pinned, while symbolic inference
    carries the batch as a symbol and finds the spatial sizes."""
    typed = {v.name: v for v in (*model.graph.input, *model.graph.value_info)}
    unknown = _unsized_conv_inputs(model)
    if not unknown:
        return []
    # The skeleton's weights have no data; as graph inputs they keep their shapes and
    # the inference does not try to read them.
    weightless = onnx.ModelProto()
    copy_fields(weightless, bare, skip=("graph",))
    copy_fields(weightless.graph, bare.graph, skip=("initializer",))
    for tensor in bare.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            weightless.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
        else:
            weightless.graph.initializer.append(tensor)
    inferred = _symbolic_inference(weightless)
    if inferred is None:
        return []
    resolved = []
    for value in inferred.graph.value_info if inferred is not None else ():
        if value.name not in unknown or not spatial_known(value):
            continue
        known = typed.get(value.name)
        if known is None:
            model.graph.value_info.append(value)
        else:
            known.type.CopyFrom(value.type)
        resolved.append(value.name)
    return resolved


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference; when it meets operators it does not know
    (quantized models' com.microsoft operators, say), once more with their output rank
    taken from their first input, as element-wise operators have it."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    for guess in (False, True):
        try:
            with _scratch_folder():
                return SymbolicShapeInference.infer_shapes(
                    model, auto_merge=True, guess_output_rank=guess
                )
        except Exception as error:  # the Conv's own error later says what to do
            log.info("symbolic shape inference failed%s: %s", " (ranks guessed)" * guess, error)
    return None


@contextlib.contextmanager
def _scratch_folder() -> Iterator[None]:
    """Run in a temporary working folder, removed afterwards: onnxruntime's symbolic
    inference saves what it found, when incomplete, as sym_shape_infer_temp.onnx and
    external data files in the working folder, which must not litter the user's."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="conv2attn-shapes-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(previous)


def graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every control-flow body inside it, depth first, in node order."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from graph_protos(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for body in attribute.graphs:
                    yield from graph_protos(body)


def graphs(graph: gs.Graph, path: str = "") -> Iterator[tuple[str, gs.Graph]]:
    """``graph`` and every control-flow body inside it, each with its path
    (``""`` for the main graph, ``"<node>/<attribute>"`` below it)."""
    yield path, graph
    for node in graph.nodes:
        for attribute, value in node.attrs.items():
            bodies = value if isinstance(value, list) else [value]
            for index, body in enumerate(bodies):
                if isinstance(body, gs.Graph):
                    where = f"{node.name or node.op}/{attribute}"
                    where += f"[{index}]" if isinstance(value, list) else ""
                    yield from graphs(body, f"{path}/{where}" if path else where)
