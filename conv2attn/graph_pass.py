"""The graph pass: select Conv nodes, resolve their shapes, replace each with attention.

Stages, in order: pin input shapes -> infer shapes -> select Convs (each refusal carries
a reason) -> plan patches with the cost model -> emit the attention subgraphs -> clean
up -> record what was done in ``metadata_props`` -> check the result.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from conv2attn import __version__
from conv2attn.emit import emit_attention
from conv2attn.errors import InputError, InternalError
from conv2attn.geometry import (
    Attention,
    AttentionPlan,
    AutoPad,
    ConvSpec,
    GeometryError,
    best_plan,
    candidate_plans,
    choose_plans,
    resolve_pads,
    validate,
)
from conv2attn.modelio import PROTOBUF_LIMIT, copy_fields, load_model, model_size
from conv2attn.weights import output_bias, output_projection

log = logging.getLogger(__name__)

METADATA_KEY = "conv2attn"
# Conv-like operators left as they are, and why; the report lists every one.
UNCONVERTED_OPS = {
    "ConvTranspose": "ConvTranspose is not converted (only Conv is)",
    "ConvInteger": "ConvInteger (quantized) is not converted",
    "QLinearConv": "QLinearConv (quantized) is not converted",
    "DeformConv": "DeformConv reads input-dependent positions; no fixed attention pattern",
}
MIN_OPSET = 11
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

Patch = tuple[int, ...] | str


@dataclass(frozen=True)
class ConvertOptions:
    """What ``convert`` does; the CLI's options map onto these fields one to one."""

    patch: Patch = "auto"
    max_param_growth: float = 4.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    attention: Attention = Attention.GLOBAL
    block: Patch = "auto"
    fold_bn: bool = False


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
            },
            "param_budget_met": self.param_budget_met,
            "folded_batchnorms": self.folded_batchnorms,
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


def parse_input_shapes(texts: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``NAME:1x3x224x224`` (trtexec syntax); several may be joined with commas."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts:
        for item in filter(None, text.split(",")):
            name, sep, dims = item.rpartition(":")
            if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
                raise InputError(
                    f"--input-shape '{item}': expected NAME:DIMS such as input:1x3x224x224"
                )
            shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def _pin_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
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
        if tensor.ByteSize() <= SKELETON_MAX_BYTES:
            copied.graph.initializer.append(tensor)
            continue
        stub = copied.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "not-loaded"
    return copied


def _infer_shapes(model: onnx.ModelProto, bare: onnx.ModelProto) -> None:
    """Fill ``value_info`` (and graph output types) of ``model`` by inference on its
    skeleton ``bare``, whose stored ``value_info`` has been removed: exporters leave stale
    entries, and the graph itself is the truth. Stored entries fill in only tensors that
    inference cannot type (custom ops, say)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    except Exception as error:  # onnx raises several types; the stored shapes still serve
        log.warning("shape inference failed (%s); using the shapes stored in the model", error)
        return
    for graph, typed_graph in zip(_graph_protos(model.graph), _graph_protos(inferred.graph)):
        known = {value.name for value in typed_graph.value_info}
        stored = [value for value in graph.value_info if value.name not in known]
        del graph.value_info[:]
        graph.value_info.extend(typed_graph.value_info)
        graph.value_info.extend(stored)
        for original, typed in zip(graph.output, typed_graph.output):
            if typed.type.HasField("tensor_type") and typed.type.tensor_type.HasField("shape"):
                original.type.CopyFrom(typed.type)


def _resolve_spatial_sizes(model: onnx.ModelProto, bare: onnx.ModelProto) -> list[str]:
    """Conv inputs of the main graph whose spatial size onnx's inference left unknown,
    resolved by onnxruntime's symbolic shape inference. Returns the names resolved.

    Exporters compute channel splits and window partitions from ``Shape`` of a tensor
    with a symbolic batch (shufflenet's channel split, maxvit's windows); onnx's data
    propagation stops there, even with the batch pinned, while symbolic inference
    carries the batch as a symbol and finds the spatial sizes."""
    typed = {v.name: v for v in (*model.graph.input, *model.graph.value_info)}

    def spatial_known(value: onnx.ValueInfoProto | None) -> bool:
        if value is None or not value.type.tensor_type.HasField("shape"):
            return False
        dims = value.type.tensor_type.shape.dim
        return len(dims) > 2 and all(d.HasField("dim_value") for d in dims[2:])

    unknown = {
        node.input[0]
        for node in model.graph.node
        if node.op_type == "Conv" and node.input and not spatial_known(typed.get(node.input[0]))
    }
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
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(weightless, auto_merge=True)
    except Exception as error:  # the Conv's own error below says what to do
        log.info("symbolic shape inference failed: %s", error)
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


def _graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every control-flow body inside it, depth first, in node order."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graph_protos(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for body in attribute.graphs:
                    yield from _graph_protos(body)


def _graphs(graph: gs.Graph, path: str = "") -> Iterator[tuple[str, gs.Graph]]:
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
                    yield from _graphs(body, f"{path}/{where}" if path else where)


def passes_strict_inference(model: onnx.ModelProto) -> bool:
    """Whether strict shape inference accepts ``model`` (a skeleton is enough)."""
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return False
    return True


def verify(
    model: onnx.ModelProto | str | os.PathLike,
    strict: bool,
    in_memory: onnx.ModelProto | None = None,
) -> None:
    """Check a converted model: in memory, or a file (any size).

    ``strict``: also strict shape inference, which the output must pass whenever the
    input did; an input that fails it (custom ops, say) is held to the structural check
    only. For a file, ``in_memory`` (the same model) lets shape inference run on its
    weightless skeleton instead of on another full copy.
    """
    try:
        if isinstance(model, onnx.ModelProto):
            onnx.checker.check_model(model, full_check=strict)
            return
        onnx.checker.check_model(str(model))
        if strict:
            if in_memory is not None:
                onnx.shape_inference.infer_shapes(skeleton(in_memory), strict_mode=True)
            else:
                onnx.shape_inference.infer_shapes_path(str(model), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0]
        raise InternalError(f"converted model fails onnx.checker: {first}") from None


def _constant_values(tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
    """Values of a tensor that is constant in the graph; None when computed at runtime.

    Follows ``Constant`` nodes and chains of ``Identity`` and ``Cast`` (exporters route
    deduplicated initializers through Identity).
    """
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) != 1 or depth > 16:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        value = producer.attrs.get("value")
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    if producer.op in ("Identity", "Cast") and producer.inputs:
        values = _constant_values(producer.inputs[0], depth + 1)
        if values is None or producer.op == "Identity":
            return values
        target = onnx.helper.tensor_dtype_to_np_dtype(int(producer.attrs["to"]))
        return values.astype(target)
    if producer.op == "DequantizeLinear" and producer.inputs:
        return _dequantized(producer, depth)
    return None


def _dequantized(node: gs.Node, depth: int) -> np.ndarray | None:
    """(x - zero_point) * scale of constant inputs, per tensor or along ``axis``, as the
    operator computes it in the scale's type (the difference of integers is exact)."""
    inputs = [t for t in node.inputs if t.name]
    parts = [_constant_values(t, depth + 1) for t in inputs]
    if any(p is None for p in parts) or len(parts) < 2:
        return None
    x, scale = parts[0], parts[1]
    zero = parts[2] if len(parts) > 2 else np.zeros((), x.dtype)
    if scale.ndim > 1 or (scale.ndim == 1 and scale.size > 1 and "block_size" in node.attrs):
        return None  # blocked quantization: left at runtime
    shape = [1] * x.ndim
    if scale.ndim == 1 and scale.size > 1:
        axis = int(node.attrs.get("axis", 1)) % x.ndim
        shape[axis] = scale.size
    dtype = scale.dtype
    try:
        zero = zero.astype(np.float64).reshape(shape if zero.size > 1 else ())
        difference = (x.astype(np.float64) - zero).astype(dtype)
        return (difference * scale.reshape(shape if scale.size > 1 else ())).astype(dtype)
    except ValueError:  # shapes that do not fit: not a weight this pass can read
        return None


def _ints(node: gs.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in node.attrs.get(name, default))


@dataclass
class _Candidate:
    node: gs.Node
    graph: gs.Graph
    path: str
    spec: ConvSpec
    weight: np.ndarray
    bias: np.ndarray | None
    batch: int | str | None


def _inspect_conv(node: gs.Node, graph: gs.Graph, path: str) -> _Candidate | str:
    """A convertible Conv, or the reason it is not converted."""
    x = node.inputs[0]
    weight = _constant_values(node.inputs[1])
    if weight is None:
        return f"weight '{node.inputs[1].name}' is computed at runtime, not a constant"
    rank = weight.ndim - 2
    if rank < 1:
        return f"weight '{node.inputs[1].name}' has rank {weight.ndim}, expected 3 or more"
    if np.dtype(weight.dtype) not in SUPPORTED_DTYPES:
        return f"dtype {weight.dtype} is not supported (float32 and float16 are)"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = _constant_values(node.inputs[2])
        if bias is None:
            return f"bias '{node.inputs[2].name}' is computed at runtime, not a constant"
    if x.dtype is not None and np.dtype(x.dtype) != np.dtype(weight.dtype):
        return f"input dtype {np.dtype(x.dtype)} differs from weight dtype {weight.dtype}"
    shape = x.shape
    if (
        shape is None
        or len(shape) != rank + 2
        or not all(isinstance(d, (int, np.integer)) for d in shape[2:])
    ):
        raise InputError(
            f"Conv '{node.name}': spatial size of input '{x.name}' is unknown "
            f"(shape {shape}); pass --input-shape NAME:1x3x224x224 for the model's inputs"
        )
    if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
        log.warning("Conv '%s': weights contain NaN or Inf; converted as they are", node.name)
    group = int(node.attrs.get("group", 1))
    kernel = _ints(node, "kernel_shape", weight.shape[2:])
    strides = _ints(node, "strides", (1,) * rank)
    dilations = _ints(node, "dilations", (1,) * rank)
    input_size = tuple(int(d) for d in shape[2:])
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    try:
        if tuple(kernel) != tuple(weight.shape[2:]):
            raise GeometryError(
                f"kernel_shape {list(kernel)} does not match weight shape {list(weight.shape)}"
            )
        if auto_pad not in AutoPad.__members__:
            raise GeometryError(f"auto_pad '{auto_pad}' is not an ONNX auto_pad value")
        pads_begin, pads_end = resolve_pads(
            auto_pad, input_size, kernel, strides, dilations, node.attrs.get("pads")
        )
        spec = ConvSpec(
            in_channels=int(weight.shape[1]) * group,
            out_channels=int(weight.shape[0]),
            group=group,
            kernel=kernel,
            strides=strides,
            dilations=dilations,
            pads_begin=pads_begin,
            pads_end=pads_end,
            input_size=input_size,
        )
        validate(spec)
        if bias is not None and bias.shape != (spec.out_channels,):
            raise GeometryError(
                f"bias has shape {list(bias.shape)}, expected [{spec.out_channels}] "
                f"(one per output channel)"
            )
        if isinstance(shape[1], (int, np.integer)) and shape[1] != spec.in_channels:
            raise GeometryError(
                f"input has {shape[1]} channels, weight expects {spec.in_channels} (group {group})"
            )
    except GeometryError as error:
        raise InputError(f"Conv '{node.name}': {error}; the model is invalid") from None
    return _Candidate(node, graph, path, spec, weight, bias, shape[0])


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    """None when selected, else the reason."""
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return "not matched by --include"
    for pattern in exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by --exclude {pattern}"
    return None


def fold_batchnorms(graph: gs.Graph) -> list[str]:
    """Fold each BatchNormalization that directly follows a Conv (its only consumer) into
    that Conv, exactly in float64 and then cast: w' = w * s, b' = (b - mean) * s + beta,
    s = gamma / sqrt(var + epsilon). Returns the names of the folded nodes."""
    folded = []
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.inputs) != 5 or len(bn.outputs) != 1:
            continue
        x = bn.inputs[0]
        if (
            len(x.inputs) != 1
            or x.inputs[0].op != "Conv"
            or len(x.outputs) != 1
            or x in graph.outputs
        ):
            continue
        conv = x.inputs[0]
        gamma, beta, mean, var = (_constant_values(t) for t in bn.inputs[1:])
        weight = _constant_values(conv.inputs[1])
        bias = (
            _constant_values(conv.inputs[2])
            if len(conv.inputs) > 2 and conv.inputs[2].name
            else None
        )
        if any(v is None for v in (gamma, beta, mean, var, weight)) or (
            len(conv.inputs) > 2 and conv.inputs[2].name and bias is None
        ):
            continue
        if not all(v.shape == (weight.shape[0],) for v in (gamma, beta, mean, var)):
            continue
        epsilon = float(bn.attrs.get("epsilon", 1e-5))
        factor = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
        new_weight = weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        old_bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        new_bias = (old_bias - mean.astype(np.float64)) * factor + beta.astype(np.float64)
        name = conv.name or conv.outputs[0].name
        conv.inputs = [
            conv.inputs[0],
            gs.Constant(f"{name}/folded_bn/weight", new_weight.astype(weight.dtype)),
            gs.Constant(f"{name}/folded_bn/bias", new_bias.astype(weight.dtype)),
        ]
        output = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs = [output]
        folded.append(bn.name or output.name)
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folded


def _name_nodes(graph: gs.Graph) -> None:
    """Give every Conv a unique, deterministic name, unique across control-flow bodies
    too: the names of the attention nodes derive from it."""
    nodes = [node for _, body in _graphs(graph) for node in body.nodes]
    used = {node.name for node in nodes if node.name}
    seen: set[str] = set()
    for index, node in enumerate(nodes):
        if node.op != "Conv":
            continue
        name = node.name or f"Conv_{index}"
        if name in seen or (not node.name and name in used):
            suffix = 1
            while f"{name}_{suffix}" in used or f"{name}_{suffix}" in seen:
                suffix += 1
            name = f"{name}_{suffix}"
        node.name = name
        seen.add(name)
        used.add(name)


def _per_axis(sizes: Patch, rank: int, option: str, node: str) -> tuple[int, ...] | None:
    if sizes == "auto":
        return None
    if len(sizes) == 1:
        return tuple(sizes) * rank
    if len(sizes) != rank:
        raise InputError(
            f"{option} {'x'.join(map(str, sizes))} has {len(sizes)} sizes, "
            f"Conv '{node}' has {rank} spatial axes"
        )
    return tuple(sizes)


def _plan(
    candidates: list[_Candidate], options: ConvertOptions
) -> tuple[list[AttentionPlan], list[list[AttentionPlan]], bool]:
    """Each layer's plan, the candidates it was chosen from, and whether the budget held."""
    per_layer = []
    for c in candidates:
        patch = _per_axis(options.patch, c.spec.rank, "--patch", c.node.name)
        block = _per_axis(options.block, c.spec.rank, "--block", c.node.name)
        per_layer.append(
            candidate_plans(
                c.spec, options.attention, patches=None if patch is None else [patch], block=block
            )
        )
    if options.patch != "auto":
        return [best_plan(layer) for layer in per_layer], per_layer, True
    original = sum(c.spec.params for c in candidates)
    plans, met = choose_plans(per_layer, original, options.max_param_growth)
    if not met:
        log.warning(
            "parameter growth %.2fx exceeds --max-param-growth %g even with the smallest "
            "patches; using them",
            sum(p.params for p in plans) / max(original, 1),
            options.max_param_growth,
        )
    return plans, per_layer, met


def _summary(plan: AttentionPlan) -> dict:
    return {
        "patch": list(plan.patch),
        "order": plan.order.value,
        "block": list(plan.block) if plan.attention is Attention.LOCAL else None,
        "macs": plan.macs,
        "params": plan.params,
        "cost": plan.cost,
    }


def _alternatives(plan: AttentionPlan, candidates: list[AttentionPlan], count: int = 5) -> tuple:
    """The cheapest plans that were not chosen, for the report."""
    others = sorted((c for c in candidates if c != plan), key=lambda c: c.cost)
    return tuple(_summary(c) for c in others[:count])


def _layer_report(
    c: _Candidate, plan: AttentionPlan, output: str, candidates: list[AttentionPlan]
) -> LayerReport:
    spec = c.spec
    return LayerReport(
        name=c.node.name,
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
        macs_after=plan.macs,
        params_before=spec.params,
        params_after=plan.params,
        cost=plan.cost,
        alternatives=_alternatives(plan, candidates),
        graph=c.path,
    )


def _check_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise InputError("the model imports no default-domain opset; is it an ONNX model?")
    if versions[0] < MIN_OPSET:
        raise InputError(
            f"opset {versions[0]} is older than {MIN_OPSET}; upgrade the model first with "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET})"
        )
    return versions[0]


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
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[onnx.ModelProto, ConversionReport]:
    """Replace every selected Conv of ``model`` by exact multi-head self-attention.

    ``model`` is a ModelProto (left unchanged) or a path. ``patch`` and ``block`` are
    ``"auto"``, ``N`` or ``NxM``; ``attention`` is ``"global"`` (every token attends to
    every token, as in a ViT) or ``"local"`` (blocks of queries attend to their block
    plus a halo, section 5). ``fold_bn`` first folds BatchNormalization nodes that directly
    follow a Conv into it. ``input_shapes`` maps input names to dims, or is a list of
    ``NAME:1x3x224x224`` strings. Returns the converted model and a report.
    ``check``: run ``onnx.checker`` on the result in memory (``verify`` checks a saved file
    instead, which needs less memory and works at any size). ``progress(done, total,
    name)`` is called as each Conv is replaced.
    Raises InputError for anything wrong with the model or the options.
    """
    if isinstance(input_shapes, Mapping):
        shapes = {name: tuple(int(d) for d in dims) for name, dims in input_shapes.items()}
    else:
        shapes = parse_input_shapes(input_shapes or ())
    if max_param_growth <= 0:
        raise InputError(f"--max-param-growth {max_param_growth}: must be positive")
    if attention not in {a.value for a in Attention}:
        raise InputError(f"--attention {attention}: expected global or local")
    if attention == Attention.GLOBAL.value and block != "auto":
        raise InputError("--block applies to --attention local only")
    options = ConvertOptions(
        fold_bn=bool(fold_bn),
        attention=Attention(attention),
        block=parse_patch(block, "--block"),
        patch=parse_patch(patch),
        max_param_growth=float(max_param_growth),
        include=tuple(include),
        exclude=tuple(exclude),
        input_shapes=shapes,
    )
    model = copy.deepcopy(model) if isinstance(model, onnx.ModelProto) else load_model(model)
    converted, report = _convert(model, options, progress)
    if check:
        if model_size(converted) < PROTOBUF_LIMIT:
            verify(converted, report.strict_checked)
        else:
            log.info("the converted model is too large to check in memory; verify() its file")
    return converted, report


def _convert(
    model: onnx.ModelProto,
    options: ConvertOptions,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[onnx.ModelProto, ConversionReport]:
    """Convert ``model`` (consumed: its graph is rewritten in place)."""
    _check_opset(model)
    _pin_input_shapes(model, options.input_shapes)
    bare = skeleton(model)
    for body in _graph_protos(bare.graph):
        del body.value_info[:]  # stale shapes must not decide; see _infer_shapes
    strict = passes_strict_inference(bare)
    _infer_shapes(model, bare)
    for name in _resolve_spatial_sizes(model, bare):
        log.info("spatial size of '%s' found by symbolic shape inference", name)
    del bare
    header = onnx.ModelProto()
    copy_fields(header, model, skip=("graph", "functions", "training_info"))
    graph = gs.import_onnx(model)
    folded = fold_batchnorms(graph) if options.fold_bn else []
    for name in folded:
        log.info("folded BatchNormalization '%s' into the Conv before it", name)
    _name_nodes(graph)

    bodies = list(_graphs(graph))
    convs = [
        (path, body, node)
        for path, body in bodies
        for node in body.nodes
        if node.op == "Conv" and node.domain in ("", "ai.onnx", None)
    ]
    if not convs:
        raise InputError("the model has no Conv node; nothing to convert")
    candidates: list[_Candidate] = []
    skipped: list[SkippedConv] = [
        SkippedConv(node.name or node.outputs[0].name, UNCONVERTED_OPS[node.op])
        for _, body in bodies
        for node in body.nodes
        if node.op in UNCONVERTED_OPS
    ]
    for path, body, node in convs:
        reason = _selected(node.name, options.include, options.exclude)
        inspected = _inspect_conv(node, body, path) if reason is None else reason
        if isinstance(inspected, str):
            skipped.append(SkippedConv(node.name, inspected))
            level = logging.INFO if reason is not None else logging.WARNING  # chosen or not
            log.log(level, "Conv '%s' is not converted: %s", node.name, inspected)
        else:
            candidates.append(inspected)
    if not candidates:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise InputError(f"none of the {len(convs)} Conv nodes can be converted ({reasons})")

    # numpy now holds the Conv weights (each gs constant keeps what it loaded); their
    # serialized copies in our working model are dropped so they are not held twice.
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for candidate in candidates:
        weight = candidate.node.inputs[1]
        if isinstance(weight, gs.Constant) and isinstance(weight.values, np.ndarray):
            source = initializers.get(weight.name)
            if source is not None:
                source.ClearField("raw_data")
    plans, considered, budget_met = _plan(candidates, options)
    layers = []
    for index, (candidate, plan, alternatives) in enumerate(
        zip(candidates, plans, considered, strict=True)
    ):
        node = candidate.node
        if progress is not None:
            progress(index, len(candidates), node.name)
        x, y = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        emit_attention(
            candidate.graph,
            f"{node.name}/attn",
            x,
            y,
            plan,
            output_projection(plan, candidate.weight),
            output_bias(plan, candidate.bias, candidate.weight.dtype),
            candidate.batch,
        )
        layers.append(_layer_report(candidate, plan, y.name, alternatives))
        candidate.weight = candidate.bias = None  # the projection replaces them
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    # The projections are most of the output. Exporting them with the graph would hold
    # every one twice at once, plus copies; instead each is moved in after the export
    # and released at once, so at most one is held twice.
    projections = {}
    for _, body in _graphs(graph):
        for tensor in body.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name.endswith("/attn/W_O"):
                projections.setdefault(tensor.name, tensor.values)
                tensor.values = np.zeros(0, dtype=projections[tensor.name].dtype)
    converted = gs.export_onnx(graph)
    del graph, candidates, bodies, convs
    for initializer in (
        tensor for body in _graph_protos(converted.graph) for tensor in body.initializer
    ):
        values = projections.pop(initializer.name, None)
        if values is not None:
            del initializer.dims[:]
            initializer.dims.extend(values.shape)
            initializer.raw_data = values.tobytes()
            del values
    for field_name in (
        "ir_version",
        "producer_name",
        "producer_version",
        "domain",
        "model_version",
        "doc_string",
    ):
        if header.HasField(field_name):
            setattr(converted, field_name, getattr(header, field_name))
    del converted.metadata_props[:]
    converted.metadata_props.extend(p for p in header.metadata_props if p.key != METADATA_KEY)
    report = ConversionReport(
        layers=layers,
        skipped=skipped,
        patch=options.patch
        if isinstance(options.patch, str)
        else "x".join(map(str, options.patch)),
        max_param_growth=options.max_param_growth,
        param_budget_met=budget_met,
        attention=options.attention.value,
        block=options.block
        if isinstance(options.block, str)
        else "x".join(map(str, options.block)),
        strict_checked=strict,
        folded_batchnorms=folded,
    )
    record = {
        "version": __version__,
        "attention": options.attention.value,
        "layers": [
            {
                "name": layer.name,
                "output": layer.output,
                "patch": list(layer.patch),
                "heads": layer.heads,
                "token_grid": list(layer.token_grid),
                "query_grid": list(layer.query_grid),
                "reach": list(layer.reach),
                "order": layer.order,
                "block": None if layer.block is None else list(layer.block),
                "kernel": list(layer.kernel),
                "strides": list(layer.strides),
                "dilations": list(layer.dilations),
                "groups": layer.groups,
                "queries": layer.queries,
                "keys": layer.keys,
                "macs_before": layer.macs_before,
                "macs_after": layer.macs_after,
                "params_before": layer.params_before,
                "params_after": layer.params_after,
                "graph": layer.graph,
            }
            for layer in layers
        ],
        "skipped": [asdict(s) for s in skipped],
    }
    onnx.helper.set_model_props(
        converted,
        {
            **{p.key: p.value for p in converted.metadata_props},
            METADATA_KEY: json.dumps(record, sort_keys=True),
        },
    )
    return converted, report
