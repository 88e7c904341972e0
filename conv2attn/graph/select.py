"""Selection: which Conv nodes the pass converts, and for every other one, why not.

A Conv converts when the user selected it (``--include``/``--exclude``), its weight and
bias are constants, its type is float32 or float16, and its spatial size is known. A Conv
that is not selected or cannot be read is skipped with its reason; a Conv whose attributes
describe no valid convolution makes the model invalid (InputError naming the node).
Conv-like operators the pass does not rewrite are listed with their reasons too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from conv2attn import names
from conv2attn.core.geometry import AutoPad, ConvSpec, GeometryError, resolve_pads, validate
from conv2attn.core.selection import selection_reason
from conv2attn.errors import InputError
from conv2attn.graph.constants import constant_values
from conv2attn.graph.shapes import graphs
from conv2attn.record import CONVERTED_OPS, SkippedConv

log = logging.getLogger(__name__)

# Conv-like operators left as they are, and why; the report lists every one.
UNCONVERTED_OPS = {
    "ConvTranspose": "ConvTranspose is not converted (only Conv is)",
    "DeformConv": "DeformConv reads input-dependent positions; no fixed attention pattern",
}
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# Integer Convs: their inputs by role (see the ONNX operators).
INTEGER_INPUTS = {
    "ConvInteger": {"x": 0, "w": 1, "x_zero_point": 2, "w_zero_point": 3},
    "QLinearConv": {
        "x": 0,
        "x_scale": 1,
        "x_zero_point": 2,
        "w": 3,
        "w_scale": 4,
        "w_zero_point": 5,
        "y_scale": 6,
        "y_zero_point": 7,
        "bias": 8,
    },
}
EIGHT_BIT = (np.dtype(np.int8), np.dtype(np.uint8))


@dataclass
class Quantization:
    """What an integer Conv adds to a float one. Weight zero points and scales are per
    output channel (a per-tensor value is repeated); the input's zero point and the
    scales of input and output may be computed at runtime (dynamic quantization)."""

    op: str
    x_dtype: np.dtype
    x_zero_point: gs.Tensor | None  # None: 0
    w_zero_point: np.ndarray
    x_scale: gs.Tensor | None = None
    w_scale: np.ndarray | None = None
    y_scale: gs.Tensor | None = None
    y_zero_point: gs.Tensor | None = None
    bias: np.ndarray | None = None  # int32, QLinearConv's


@dataclass
class Candidate:
    """A Conv the pass will replace: where it is, its geometry and its parameters."""

    node: gs.Node
    graph: gs.Graph
    path: str
    spec: ConvSpec
    weight: np.ndarray | None
    bias: np.ndarray | None
    batch: int | str | None
    quantization: Quantization | None = None
    # the spatial size is dynamic: ``spec`` holds a nominal size, the graph the real one
    dynamic: bool = False
    auto_pad: AutoPad = AutoPad.NOTSET

    @property
    def weight_input(self) -> gs.Tensor:
        if self.quantization is None:
            return self.node.inputs[1]
        return self.node.inputs[INTEGER_INPUTS[self.node.op]["w"]]


@dataclass
class Selection:
    candidates: list[Candidate]
    skipped: list[SkippedConv]


def _ints(node: gs.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in node.attrs.get(name, default))


def _weight(tensor: gs.Tensor, types: tuple[np.dtype, ...], refusal: str) -> np.ndarray | str:
    """A Conv's weight as an array, or why it cannot be read (``refusal`` when its type
    is not one of ``types``)."""
    weight = constant_values(tensor)
    if weight is None:
        return f"weight '{tensor.name}' is computed at runtime, not a constant"
    if weight.ndim < 3:
        return f"weight '{tensor.name}' has rank {weight.ndim}, expected 3 or more"
    if np.dtype(weight.dtype) not in types:
        return refusal.format(dtype=weight.dtype)
    return weight


def _parameters(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """The Conv's weight and bias as arrays, or why they cannot be read."""
    refusal = "dtype {dtype} is not supported (float32 and float16 are)"
    weight = _weight(node.inputs[1], SUPPORTED_DTYPES, refusal)
    if isinstance(weight, str):
        return weight
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_values(node.inputs[2])
        if bias is None:
            return f"bias '{node.inputs[2].name}' is computed at runtime, not a constant"
    x = node.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype) != np.dtype(weight.dtype):
        return f"input dtype {np.dtype(x.dtype)} differs from weight dtype {weight.dtype}"
    return weight, bias


def _conv_spec(
    node: gs.Node, weight: np.ndarray, bias: np.ndarray | None, shape: Sequence
) -> ConvSpec:
    """The node's attributes with pads resolved; GeometryError when they are invalid."""
    rank = weight.ndim - 2
    group = int(node.attrs.get("group", 1))
    kernel = _ints(node, "kernel_shape", weight.shape[2:])
    strides = _ints(node, "strides", (1,) * rank)
    dilations = _ints(node, "dilations", (1,) * rank)
    input_size = tuple(int(d) for d in shape[2:])
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if tuple(kernel) != tuple(weight.shape[2:]):
        raise GeometryError(
            f"kernel_shape {list(kernel)} does not match weight shape {list(weight.shape)}"
        )
    if auto_pad not in AutoPad.__members__:
        raise GeometryError(f"auto_pad '{auto_pad}' is not an ONNX auto_pad value")
    pads = node.attrs.get("pads")
    pads_begin, pads_end = resolve_pads(auto_pad, input_size, kernel, strides, dilations, pads)
    if auto_pad != "NOTSET" and pads is not None and list(pads) != [*pads_begin, *pads_end]:
        # ONNX forbids the pair, and runtimes differ in which of the two they follow
        raise GeometryError(
            f"auto_pad {auto_pad} and pads {list(pads)} are both set and disagree "
            f"({auto_pad} pads {[*pads_begin, *pads_end]} here); ONNX allows only one: "
            "remove the other"
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
    return spec


def _input(node: gs.Node, role: str) -> gs.Tensor | None:
    index = INTEGER_INPUTS[node.op][role]
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    return node.inputs[index]


def _per_channel(values: np.ndarray, channels: int, what: str) -> np.ndarray | str:
    if values.size == 1:
        return np.full(channels, values.reshape(()), values.dtype)
    if values.shape != (channels,):
        return f"{what} has shape {list(values.shape)}; expected one value or {channels}"
    return values


def _scalar(tensor: gs.Tensor | None, what: str) -> str | None:
    """Why ``tensor`` cannot be a per-tensor value, or None when it can."""
    if tensor is None or tensor.shape is None:
        return None
    if int(np.prod([d if isinstance(d, int) else 2 for d in tensor.shape])) != 1:
        return (
            f"{what} '{tensor.name}' has shape {tensor.shape}; only a per-tensor value has "
            f"an exact integer form"
        )
    return None


def _quantization(node: gs.Node, weight: np.ndarray) -> Quantization | str:
    """The zero points and scales of an integer Conv, or why no exact integer form exists."""
    channels = int(weight.shape[0])
    x = node.inputs[0]
    zero_point = _input(node, "x_zero_point")
    x_dtype = x.dtype if x.dtype is not None else getattr(zero_point, "dtype", None)
    if x_dtype is None or np.dtype(x_dtype) not in EIGHT_BIT:
        return f"input type {x_dtype} is not int8 or uint8"
    w_zero = _input(node, "w_zero_point")
    w_zero_values = np.zeros((), weight.dtype) if w_zero is None else constant_values(w_zero)
    if w_zero_values is None:
        return f"weight zero point '{w_zero.name}' is computed at runtime, not a constant"
    w_zero_values = _per_channel(w_zero_values.astype(weight.dtype), channels, "weight zero point")
    if isinstance(w_zero_values, str):
        return w_zero_values
    for role in ("x_zero_point", "x_scale", "y_scale", "y_zero_point"):
        if role in INTEGER_INPUTS[node.op]:
            reason = _scalar(_input(node, role), role.replace("_", " "))
            if reason:
                return reason
    quantization = Quantization(node.op, np.dtype(x_dtype), zero_point, w_zero_values)
    if node.op == "ConvInteger":
        return quantization
    w_scale = constant_values(_input(node, "w_scale"))
    if w_scale is None:
        return "weight scale is computed at runtime; the requantisation needs it per channel"
    w_scale = _per_channel(w_scale.astype(np.float32), channels, "weight scale")
    if isinstance(w_scale, str):
        return w_scale
    bias = None
    if _input(node, "bias") is not None:
        bias = constant_values(_input(node, "bias"))
        if bias is None:
            return f"bias '{_input(node, 'bias').name}' is computed at runtime, not a constant"
        if bias.shape != (channels,):
            return f"bias has shape {list(bias.shape)}, expected [{channels}]"
        bias = bias.astype(np.int32)
    y_zero = _input(node, "y_zero_point")
    if y_zero is None or y_zero.dtype is None or np.dtype(y_zero.dtype) not in EIGHT_BIT:
        return "the output zero point must be an int8 or uint8 tensor"
    quantization.x_scale = _input(node, "x_scale")
    quantization.w_scale = w_scale
    quantization.y_scale = _input(node, "y_scale")
    quantization.y_zero_point = y_zero
    quantization.bias = bias
    return quantization


def _integer_parameters(node: gs.Node) -> tuple[np.ndarray, Quantization] | str:
    weight = _weight(_input(node, "w"), EIGHT_BIT, "weight type {dtype} is not int8 or uint8")
    if isinstance(weight, str):
        return weight
    quantization = _quantization(node, weight)
    if isinstance(quantization, str):
        return quantization
    return weight, quantization


# Planned for when a dynamic size has no nominal value either (shape arithmetic that no
# inference resolves): the graph computes the real size; only the patch choice uses this.
FALLBACK_NOMINAL = 64


def inspect_conv(
    node: gs.Node,
    graph: gs.Graph,
    path: str,
    nominal: tuple[int, ...] | None = None,
) -> Candidate | str:
    """A convertible Conv (or integer Conv), or the reason it is not converted. A Conv
    whose spatial size is dynamic is planned for ``nominal``."""
    quantization = None
    if node.op in INTEGER_INPUTS:
        parameters = _integer_parameters(node)
        if isinstance(parameters, str):
            return parameters
        (weight, quantization), bias = parameters, None
    else:
        parameters = _parameters(node)
        if isinstance(parameters, str):
            return parameters
        weight, bias = parameters
    x = node.inputs[0]
    shape = x.shape
    rank = weight.ndim - 2
    if shape is not None and len(shape) != rank + 2:
        raise InputError(
            f"Conv '{node.name}': its input '{x.name}' has rank {len(shape)} and its weight "
            f"rank {weight.ndim}; they must be equal: the model is invalid"
        )
    dynamic = shape is None or not all(
        isinstance(d, (int, np.integer)) and d >= 0 for d in shape[2:]
    )
    if dynamic:
        known = list(shape) if shape is not None else [None, None]
        nominal = tuple(nominal or (FALLBACK_NOMINAL,) * rank)
        shape = [known[0], known[1], *nominal]
        log.info("Conv '%s': dynamic size, planned for %s", node.name, "x".join(map(str, nominal)))
    if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
        log.warning("Conv '%s': weights contain NaN or Inf; converted as they are", node.name)
    try:
        spec = _conv_spec(node, weight, bias, shape)
    except GeometryError as error:
        raise InputError(f"Conv '{node.name}': {error}; the model is invalid") from None
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = AutoPad(auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad)
    return Candidate(
        node, graph, path, spec, weight, bias, shape[0], quantization, dynamic, auto_pad
    )


def _scopes_in_use(existing: set[str]) -> set[str]:
    """Conv names whose ``<name>/attn`` scope some existing name already lies in."""
    marker = f"/{names.SCOPE}"
    owners = set()
    for name in existing:
        start = name.find(marker)
        while start > 0:
            end = start + len(marker)
            if end == len(name) or name[end] == "/":
                owners.add(name[:start])
            start = name.find(marker, start + 1)
    return owners


def name_convs(graph: gs.Graph) -> None:
    """Give every Conv a unique, deterministic name, unique across control-flow bodies
    too: the names of the attention nodes derive from it. A name whose ``<name>/attn``
    scope the model already uses for other nodes or tensors gets a suffix, so generated
    names never collide with the model's own."""
    bodies = [body for _, body in graphs(graph)]
    nodes = [node for body in bodies for node in body.nodes]
    used = {node.name for node in nodes if node.name}
    taken = _scopes_in_use(used | {name for body in bodies for name in body.tensors()})
    seen: set[str] = set()
    for index, node in enumerate(nodes):
        if node.op not in CONVERTED_OPS:
            continue
        name = node.name or f"{node.op}_{index}"
        if name in seen or (not node.name and name in used) or name in taken:
            suffix = 1
            while {f"{name}_{suffix}"} & (used | seen | taken):
                suffix += 1
            if name in taken:
                log.info(
                    "Conv '%s' is renamed '%s_%d': the model uses its scope", name, name, suffix
                )
            name = f"{name}_{suffix}"
        node.name = name
        seen.add(name)
        used.add(name)


def select_convs(
    graph: gs.Graph,
    include: Sequence[str],
    exclude: Sequence[str],
    survey: bool = False,
    nominal: dict[str, tuple[int, ...]] | None = None,
) -> Selection:
    """Every Conv of ``graph`` and its bodies: candidates in graph order, and the skipped
    ones (Conv-like operators included) with their reasons. InputError when a Conv is
    invalid or of unknown size, or when none can be converted; with ``survey``, those
    become reasons too, so every Conv is described."""
    bodies = list(graphs(graph))
    convs = [
        (path, body, node)
        for path, body in bodies
        for node in body.nodes
        if node.op in CONVERTED_OPS and node.domain in ("", "ai.onnx", None)
    ]
    if not convs and not survey:
        raise InputError("the model has no Conv node; nothing to convert")
    skipped = [
        SkippedConv(node.name or node.outputs[0].name, UNCONVERTED_OPS[node.op])
        for _, body in bodies
        for node in body.nodes
        if node.op in UNCONVERTED_OPS
    ]
    candidates = []
    for path, body, node in convs:
        reason = selection_reason(node.name, include, exclude)
        try:
            inspected = (
                inspect_conv(node, body, path, (nominal or {}).get(node.inputs[0].name))
                if reason is None
                else reason
            )
        except InputError as error:
            if not survey:
                raise
            inspected = str(error).removeprefix(f"Conv '{node.name}': ")
        if isinstance(inspected, str):
            skipped.append(SkippedConv(node.name, inspected))
            level = logging.INFO if reason is not None or survey else logging.WARNING
            log.log(level, "Conv '%s' is not converted: %s", node.name, inspected)
        else:
            candidates.append(inspected)
    if not candidates and not survey:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise InputError(f"none of the {len(convs)} Conv nodes can be converted ({reasons})")
    return Selection(candidates, skipped)
