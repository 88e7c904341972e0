"""A converted ONNX model as a PyTorch module of trainable attention layers.

``load_trainable(path)`` reads a model written by ``conv2attn convert`` (either form,
static or dynamic sizes) and returns an ``nn.Module`` that computes the same function:
each converted Conv becomes a ``trainable.ConvAttention`` built from the layer's record
(geometry) and its converted weights, and every other node runs as the matching torch
operation, its float initializers trainable parameters. So an ONNX-converted CNN can be
fine-tuned as a ViT in PyTorch.

The Conv weight a layer started from is read back out of W_O: every entry of W_O is a
copy of one Conv weight or zero (``weights.output_projection``), so projecting the
weights' own indices gives, for every W_O entry, the weight it holds. That the whole W_O
has exactly that structure is checked, so an edited or foreign W_O is refused rather
than misread.

Requires torch (``pip install conv2attn[torch]``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional

from conv2attn import names
from conv2attn.core.geometry import (
    AttentionPlan,
    channels_first_to_grid_tokens,
    grid_tokens_to_channels_first,
    pixels_shape_of,
    tokens_shape_of,
)
from conv2attn.core.weights import (
    depthwise_bias_layout,
    depthwise_layout,
    emitted_channels_last,
    output_bias,
    output_projection,
)
from conv2attn.errors import InputError
from conv2attn.items import inline_per_item
from conv2attn.modelio import load_model
from conv2attn.record import converted_layers, recorded_plan
from conv2attn.trainable import ConvAttention

__all__ = ["OnnxAttentionModel", "load_trainable", "source_conv"]


@dataclass(frozen=True)
class _LayerStep:
    """Run converted layer ``name`` on tensor ``x``, producing ``y``; either may be
    channels-last in the graph (``--layout channels-last``), the layer itself is NCHW."""

    name: str
    x: str
    y: str
    output: str  # the Conv's NCHW output tensor (the same as ``y`` unless channels-last)
    x_channels_last: bool = False
    y_channels_last: bool = False
    # patch tokens on a grid [B, T1, T2, P1, P2, C] (``graph.tokens``), of this patch
    x_patch: tuple[int, ...] = ()
    y_patch: tuple[int, ...] = ()
    # channels-last tokens [B, N + 1, C] whose last token is the zero token of the next
    # layer's padding (``graph.zero_token``); the grid of the N others
    x_zero_token: tuple[int, ...] = ()
    y_zero_token: tuple[int, ...] = ()
    # tiles (``graph.tiles``): the layer reads the tensors ``x_tiles``, joined along their
    # rows, as channels-last input of this grid; it writes its channels-last output as
    # the tensors ``y_tiles`` (name, rows), split along its rows
    x_tiles: tuple[str, ...] = ()
    x_grid: tuple[int, ...] = ()
    y_tiles: tuple[tuple[str, int], ...] = ()


def _read_back(indexed: np.ndarray, stored: np.ndarray, size: int, what: str) -> np.ndarray:
    """Values ``v`` with ``stored == v[indexed - 1]`` where ``indexed > 0`` and ``stored ==
    0`` elsewhere (``indexed`` holds 1-based indices, as float64)."""
    indexed, stored = indexed.reshape(-1), stored.reshape(-1).astype(np.float64)
    if indexed.size != stored.size:
        raise InputError(f"{what} has {stored.size} values, the construction {indexed.size}")
    used = indexed > 0
    positions = indexed[used].astype(np.int64) - 1
    values = np.zeros(size, dtype=np.float64)
    values[positions] = stored[used]
    if not np.array_equal(values[positions], stored[used]) or stored[~used].any():
        raise InputError(f"{what} does not have the construction's structure (edited?)")
    return values


def source_conv(
    layer: dict, projection: np.ndarray, bias: np.ndarray
) -> tuple[AttentionPlan, np.ndarray, np.ndarray]:
    """The plan of recorded ``layer`` and the Conv weight and bias held by its W_O and
    bias initializers (in either emitted layout)."""
    spec, plan = recorded_plan(layer)
    channels_last = emitted_channels_last(plan, bool(layer.get("dynamic")))
    shape = (spec.out_channels, spec.in_channels // spec.group, *spec.kernel)
    indices = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float64).reshape(shape)
    indexed = output_projection(plan, indices, channels_last=channels_last)
    bias_indices = np.arange(1, spec.out_channels + 1, dtype=np.float64)
    indexed_bias = output_bias(plan, bias_indices, np.float64, channels_last=channels_last)
    if plan.depthwise and channels_last:
        indexed = depthwise_layout(plan, indexed)
        indexed_bias = depthwise_bias_layout(plan, indexed_bias)
    where = f"layer '{layer['name']}': W_O"
    weight = _read_back(indexed, projection, indices.size, where).reshape(shape)
    if bias.size:
        conv_bias = _read_back(indexed_bias, bias, spec.out_channels, f"{where[:-4]} bias")
    else:  # a zero bias, not kept
        conv_bias = np.zeros(spec.out_channels)
    return plan, weight.astype(projection.dtype), conv_bias.astype(projection.dtype)


def _grid_tokens_as_nchw(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    nchw = x.permute(*grid_tokens_to_channels_first(len(patch)))
    return nchw.reshape(pixels_shape_of(list(nchw.shape), len(patch)))


def _nchw_as_grid_tokens(y: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    split = y.reshape(tokens_shape_of(list(y.shape), patch))
    return split.permute(*channels_first_to_grid_tokens(len(patch)))


def _scope_input(nodes: list[onnx.NodeProto], scope: str, constants: set[str]) -> str:
    """The tensor a layer's nodes read from outside the layer: its Conv's input. A
    dynamic layer's ``Shape`` may read the same values in the other layout (the layout
    pass moves it to whichever is made): sizes only, not the input."""
    produced = {out for node in nodes for out in node.output}
    outside = {
        name
        for node in nodes
        if node.op_type != "Shape"
        for name in node.input
        if name and name not in produced and name not in constants
    }
    if len(outside) != 1:
        raise InputError(f"layer '{scope}': expected one input tensor, found {sorted(outside)}")
    return outside.pop()


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _pool_padding(node: onnx.NodeProto, rank: int) -> tuple[list[int], bool]:
    pads = list(_attribute(node, "pads", [0] * 2 * rank))
    return pads, pads[:rank] == pads[rank:]


def _max_pool(node, x):
    rank = x.dim() - 2
    kernel = list(_attribute(node, "kernel_shape"))
    pads, symmetric = _pool_padding(node, rank)
    if not symmetric:
        flat = [p for axis in reversed(range(rank)) for p in (pads[axis], pads[rank + axis])]
        x, pads = functional.pad(x, flat, value=float("-inf")), [0] * 2 * rank
    pool = {1: functional.max_pool1d, 2: functional.max_pool2d, 3: functional.max_pool3d}[rank]
    return pool(
        x,
        kernel,
        list(_attribute(node, "strides", [1] * rank)),
        pads[:rank],
        list(_attribute(node, "dilations", [1] * rank)),
        bool(_attribute(node, "ceil_mode", 0)),
    )


def _average_pool(node, x):
    rank = x.dim() - 2
    pads, _ = _pool_padding(node, rank)
    pool = {1: functional.avg_pool1d, 2: functional.avg_pool2d, 3: functional.avg_pool3d}[rank]
    return pool(
        x,
        list(_attribute(node, "kernel_shape")),
        list(_attribute(node, "strides", [1] * rank)),
        pads[:rank],
        bool(_attribute(node, "ceil_mode", 0)),
        bool(_attribute(node, "count_include_pad", 0)),
    )


def _gemm(node, a, b, c=None):
    a = a.t() if _attribute(node, "transA", 0) else a
    b = b.t() if _attribute(node, "transB", 0) else b
    out = _attribute(node, "alpha", 1.0) * (a @ b)
    return out if c is None else out + _attribute(node, "beta", 1.0) * c


def _flatten(node, x):
    axis = _attribute(node, "axis", 1) % max(x.dim(), 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _axes(node, given, rank: int) -> list[int] | None:
    axes = _attribute(node, "axes") if given is None else given.tolist()
    return None if axes is None else [a % rank for a in axes]


def _reduce(op):
    def reduce(node, x, axes=None):
        axes = _axes(node, axes, x.dim())
        keep = bool(_attribute(node, "keepdims", 1))
        if axes is None:
            axes = list(range(x.dim()))
        return op(x, dim=axes, keepdim=keep)

    return reduce


def _clip(node, x, low=None, high=None):
    low = _attribute(node, "min") if low is None else low
    high = _attribute(node, "max") if high is None else high
    return torch.clamp(x, low, high)


def _batch_norm(node, x, scale, bias, mean, var):
    return functional.batch_norm(
        x, mean, var, scale, bias, False, 0.0, _attribute(node, "epsilon", 1e-5)
    )


def _conv(node, x, weight, bias=None):
    rank = x.dim() - 2
    pads = list(_attribute(node, "pads", [0] * 2 * rank))
    flat = [p for axis in reversed(range(rank)) for p in (pads[axis], pads[rank + axis])]
    conv = {1: functional.conv1d, 2: functional.conv2d, 3: functional.conv3d}[rank]
    return conv(
        functional.pad(x, flat),
        weight,
        bias,
        list(_attribute(node, "strides", [1] * rank)),
        0,
        list(_attribute(node, "dilations", [1] * rank)),
        _attribute(node, "group", 1),
    )


def _reshape(node, x, shape):
    target = [int(d) for d in shape.tolist()]
    if not _attribute(node, "allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _unsqueeze(node, x, axes=None):
    given = _attribute(node, "axes") if axes is None else axes.tolist()
    for axis in sorted(a % (x.dim() + len(given)) for a in given):
        x = x.unsqueeze(axis)
    return x


def _squeeze(node, x, axes=None):
    axes = _axes(node, axes, x.dim())
    return x.squeeze() if axes is None else x.squeeze(axes)


def _div(node, a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # integer Div, as onnxruntime's


def _gather(node, data, indices):
    axis = _attribute(node, "axis", 0) % data.dim()
    size = data.shape[axis]
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + size, flat)  # negative indices count from the end
    picked = data.index_select(axis, flat)
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def _slice(node, data, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset 1-9: attributes
        starts, ends = _attribute(node, "starts"), _attribute(node, "ends")
        axes = _attribute(node, "axes")
    else:
        starts, ends = starts.tolist(), ends.tolist()
        axes = None if axes is None else axes.tolist()
        steps = None if steps is None else steps.tolist()
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= data.dim()
        # ONNX clamps starts and ends as numpy does, and so does Python's slice
        kept = range(*slice(start, end, step).indices(data.shape[axis]))
        if kept.step == 1:
            data = data.narrow(axis, kept.start, len(kept))
        else:
            data = data.index_select(axis, torch.tensor(list(kept), dtype=torch.long))
    return data


def _pad_indices(size: int, begin: int, end: int, mode: str) -> torch.Tensor:
    """Source position of each position of one axis padded by ``mode``."""
    positions = torch.arange(-begin, size + end)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions.remainder(size)
    period = max(2 * (size - 1), 1)  # reflect: mirrored without repeating the edge
    folded = positions.remainder(period)
    return torch.where(folded < size, folded, period - folded)


def _pad(node, x, pads=None, value=None, axes=None):
    rank = x.dim()
    pads = list(_attribute(node, "pads")) if pads is None else pads.tolist()  # opset < 11
    value = _attribute(node, "value", 0.0) if value is None else float(value.reshape(-1)[0])
    mode = (_attribute(node, "mode", b"constant") or b"constant").decode()
    axes = list(range(rank)) if axes is None else [a % rank for a in axes.tolist()]
    begins, ends = pads[: len(axes)], pads[len(axes) :]
    if mode == "constant":
        flat = [0] * 2 * rank  # torch lists the last axis first
        for axis, begin, end in zip(axes, begins, ends, strict=True):
            flat[2 * (rank - 1 - axis)], flat[2 * (rank - 1 - axis) + 1] = begin, end
        return functional.pad(x, flat, value=value)
    for axis, begin, end in zip(axes, begins, ends, strict=True):
        # negative pads crop before the rest is padded
        crop_begin, crop_end = max(-begin, 0), max(-end, 0)
        x = x.narrow(axis, crop_begin, x.shape[axis] - crop_begin - crop_end)
        x = x.index_select(axis, _pad_indices(x.shape[axis], max(begin, 0), max(end, 0), mode))
    return x


def _scatter_nd(node, data, indices, updates):
    out = data.clone()
    out[tuple(indices[..., i].long() for i in range(indices.shape[-1]))] = updates
    return out


def _constant_of_shape(node, shape):
    value = _attribute(node, "value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return torch.full(shape.tolist(), fill.reshape(-1)[0].item(), dtype=_TORCH_TYPES[fill.dtype])


def _range(node, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _cast(node, x):
    return x.to(_TORCH_TYPES[onnx.helper.tensor_dtype_to_np_dtype(_attribute(node, "to"))])


def _layer_norm(node, x, scale, bias=None):
    axis = _attribute(node, "axis", -1) % x.dim()
    shape = x.shape[axis:]
    return functional.layer_norm(
        x,
        shape,
        scale.expand(shape),
        None if bias is None else bias.expand(shape),
        _attribute(node, "epsilon", 1e-5),
    )


_TORCH_TYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}


OPS: dict[str, Callable] = {
    "Add": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Div": _div,
    "MatMul": lambda node, a, b: a @ b,
    "Relu": lambda node, x: torch.relu(x),
    "LeakyRelu": lambda node, x: functional.leaky_relu(x, _attribute(node, "alpha", 0.01)),
    "Sigmoid": lambda node, x: torch.sigmoid(x),
    "Tanh": lambda node, x: torch.tanh(x),
    "HardSigmoid": lambda node, x: torch.clamp(
        _attribute(node, "alpha", 0.2) * x + _attribute(node, "beta", 0.5), 0, 1
    ),
    "HardSwish": lambda node, x: functional.hardswish(x),
    "Erf": lambda node, x: torch.erf(x),
    "Sqrt": lambda node, x: torch.sqrt(x),
    "Pow": lambda node, x, y: torch.pow(x, y),
    "Clip": _clip,
    "Identity": lambda node, x: x,
    "Dropout": lambda node, x, *rest: x,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": lambda node, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda node, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "BatchNormalization": _batch_norm,
    "Conv": _conv,
    "Concat": lambda node, *xs: torch.cat(xs, dim=_attribute(node, "axis")),
    "Reshape": _reshape,
    "Transpose": lambda node, x: x.permute(*(_attribute(node, "perm") or reversed(range(x.dim())))),
    "Softmax": lambda node, x: torch.softmax(x, dim=_attribute(node, "axis", -1)),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Shape": lambda node, x: torch.tensor(x.shape, dtype=torch.int64),
    "Gather": _gather,
    "Slice": _slice,
    "Pad": _pad,
    "Cast": _cast,
    "Einsum": lambda node, *xs: torch.einsum(_attribute(node, "equation").decode(), *xs),
    "LayerNormalization": _layer_norm,
    "Expand": lambda node, x, shape: x.expand(
        torch.broadcast_shapes(tuple(x.shape), tuple(shape.tolist()))
    ),
    "Mod": lambda node, a, b: torch.fmod(a, b) if _attribute(node, "fmod", 0) else a % b,
    "ScatterND": _scatter_nd,
    "Where": lambda node, condition, a, b: torch.where(condition.bool(), a, b),
    "Not": lambda node, x: torch.logical_not(x),
    "Equal": lambda node, a, b: torch.eq(a, b),
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Exp": lambda node, x: torch.exp(x),
    "ReduceL2": _reduce(torch.linalg.vector_norm),
}


def _unsupported(node: onnx.NodeProto) -> str | None:
    """Why ``OPS`` cannot run ``node`` as its attributes ask, or None: checked when the
    model loads, so a model is refused at once rather than at its first forward."""
    op = node.op_type
    if op not in OPS:
        return f"{op} has no PyTorch equivalent here; supported: {', '.join(sorted(OPS))}"
    auto_pad = _attribute(node, "auto_pad", b"NOTSET") or b"NOTSET"
    if op in ("Conv", "MaxPool", "AveragePool") and auto_pad not in (b"NOTSET", b"VALID"):
        return f"{op} with auto_pad {auto_pad.decode()} is not supported here"
    if op == "AveragePool":
        pads = list(_attribute(node, "pads", []))
        if pads[: len(pads) // 2] != pads[len(pads) // 2 :]:
            return "AveragePool with asymmetric pads is not supported here"
    if op == "Pad":
        mode = (_attribute(node, "mode", b"constant") or b"constant").decode()
        if mode not in ("constant", "reflect", "edge", "wrap"):
            return f"Pad mode {mode} is not supported here"
    if op == "ScatterND" and (_attribute(node, "reduction", b"none") or b"none") != b"none":
        return "ScatterND with a reduction is not supported here"
    if op == "Cast":
        target = onnx.helper.tensor_dtype_to_np_dtype(_attribute(node, "to"))
        if target not in _TORCH_TYPES:
            return f"Cast to {target} is not supported here"
    if op == "ConstantOfShape" and _attribute(node, "value") is not None:
        fill = numpy_helper.to_array(_attribute(node, "value")).dtype
        if fill not in _TORCH_TYPES:
            return f"ConstantOfShape of {fill} is not supported here"
    return None


class OnnxAttentionModel(nn.Module):
    """An ONNX graph run in torch, with converted Convs as ``ConvAttention`` modules
    (``layers``, by Conv name) and float initializers as trainable ``parameters``."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        model = inline_per_item(model)  # torch runs the batch whole
        graph = model.graph
        records = converted_layers(model)
        if not records:
            raise InputError("the model has no conv2attn record: convert it first")
        self.input_names = [
            v.name for v in graph.input if v.name not in {t.name for t in graph.initializer}
        ]
        self.output_names = [v.name for v in graph.output]
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                initializers[node.output[0]] = numpy_helper.to_array(_attribute(node, "value"))
        scoped: dict[str, list[onnx.NodeProto]] = {record["name"]: [] for record in records}
        prefixes = {names.owner_prefix(conv): conv for conv in scoped}
        others, owners = [], []
        for node in graph.node:
            owner = names.owner(node.name, prefixes)
            owners.append(owner)
            if owner is not None:
                scoped[owner].append(node)
            elif node.op_type != "Constant":
                others.append(node)
        self.layers = nn.ModuleDict()
        self._layer_names: dict[str, str] = {}
        steps: dict[str, _LayerStep] = {}
        for record in records:
            self._add_layer(record, scoped[record["name"]], initializers, steps)
        # one step per node in graph order; a layer runs where its output is produced
        self._steps: list[onnx.NodeProto | _LayerStep] = []
        placed: set[int] = set()
        for node, owner in zip(graph.node, owners):
            if owner is not None:
                for step in [steps[out] for out in node.output if out in steps]:
                    if id(step) not in placed:
                        placed.add(id(step))
                        self._steps.append(step)
            elif node.op_type != "Constant":
                refusal = _unsupported(node)
                if refusal:
                    raise InputError(f"node '{node.name}': {refusal}")
                self._steps.append(node)
        used = {name for node in others for name in node.input}
        self.parameters_by_name = nn.ParameterDict()
        self._tensor_keys: dict[str, str] = {}
        for name, values in initializers.items():
            if name not in used:
                continue
            key = f"p{len(self._tensor_keys)}"
            self._tensor_keys[name] = key
            tensor = torch.from_numpy(np.array(values))
            if tensor.is_floating_point():
                self.parameters_by_name[key] = nn.Parameter(tensor)
            else:
                self.register_buffer(key, tensor)

    def _add_layer(
        self,
        record: dict,
        nodes: list[onnx.NodeProto],
        initializers: dict[str, np.ndarray],
        steps: dict[str, _LayerStep],
    ) -> None:
        name = record["name"]
        if record.get("integer"):
            raise InputError(
                f"layer '{name}' is an integer {record['integer']}: integer attention is not "
                "trainable; convert the float model"
            )
        if record.get("graph"):
            raise InputError(f"layer '{name}' is inside a {record['graph']} body: not supported")
        if len(record["kernel"]) != 2:
            raise InputError(f"layer '{name}': only 2-D Convs become ConvAttention layers")
        if record.get("auto_pad"):
            raise InputError(
                f"layer '{name}': auto_pad {record['auto_pad']} with a dynamic input size pads "
                "by the size; convert with --input-shape to fix the size first"
            )
        projection_name, bias_name = names.layer_weights(name)
        projection, bias = initializers.get(projection_name), initializers.get(bias_name)
        if projection is None:
            raise InputError(f"layer '{name}': no {projection_name} initializer")
        if bias is None:  # a zero bias is not added, and not kept
            bias = np.zeros(0, dtype=projection.dtype)
        plan, weight, conv_bias = source_conv(record, projection, bias)
        key = f"layer{len(self.layers)}"
        self.layers[key] = ConvAttention(plan, weight, conv_bias)
        self._layer_names[name] = key
        x_tiles = tuple(record.get("input_tiles", ()))
        x = "" if x_tiles else _scope_input(nodes, name, set(initializers))
        y = record.get("output_channels_last") or record["output"]
        y_tiles = tuple((tile, rows) for tile, rows in record.get("output_tiles", ()))
        step = _LayerStep(
            name,
            x,
            y,
            record["output"],
            bool(record.get("input_channels_last")),
            bool(record.get("output_channels_last")),
            tuple(record.get("input_patch", ())),
            tuple(record.get("output_patch", ())),
            tuple(record["input_size"]) if record.get("input_zero_token") else (),
            tuple(record.get("output_zero_token", ())),
            x_tiles,
            tuple(record["input_size"]),
            y_tiles,
        )
        # a layer runs where its output is made: where its first tile is, if tiles hold it
        for made in [tile for tile, _ in y_tiles] or [y]:
            steps[made] = step

    def layer(self, conv: str) -> ConvAttention:
        """The attention layer that replaced Conv ``conv``."""
        return self.layers[self._layer_names[conv]]

    def named_layers(self) -> list[tuple[str, ConvAttention]]:
        """``(Conv name, layer)`` in graph order."""
        return [(name, self.layers[key]) for name, key in self._layer_names.items()]

    def _tensor(self, name: str) -> torch.Tensor:
        key = self._tensor_keys[name]
        if key in self.parameters_by_name:
            return self.parameters_by_name[key]
        return getattr(self, key)

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs ({self.input_names})")
        values = dict(zip(self.input_names, inputs))
        for step in self._steps:
            if isinstance(step, _LayerStep):
                if step.x_tiles:  # channels-last rows, tile after tile
                    tiles = [values[tile] for tile in step.x_tiles]
                    rows = [t.reshape(t.shape[0], -1, t.shape[-1]) for t in tiles]
                    x = torch.cat(rows, dim=1).reshape(rows[0].shape[0], *step.x_grid, -1)
                else:
                    x = values[step.x]
                if step.x_zero_token:  # the grid's tokens, without the zero token
                    x = x[:, :-1].reshape(x.shape[0], *step.x_zero_token, x.shape[-1])
                if step.x_patch:
                    x = _grid_tokens_as_nchw(x, step.x_patch)
                elif step.x_channels_last:
                    x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
                y = self.layer(step.name)(x)
                values[step.output] = y
                if step.y_patch:
                    values[step.y] = _nchw_as_grid_tokens(y, step.y_patch)
                elif step.y_channels_last:
                    values[step.y] = y.permute(0, *range(2, y.dim()), 1)
                if step.y_zero_token:  # as tokens, with the next layer's zero token
                    tokens = values[step.y].reshape(y.shape[0], -1, y.shape[1])
                    zero = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])
                    values[step.y] = torch.cat([tokens, zero], dim=1)
                if step.y_tiles:  # channels-last rows, split into the tiles
                    rows = values[step.y].reshape(y.shape[0], -1, y.shape[1])
                    sizes = [count for _, count in step.y_tiles]
                    for (tile, _), part in zip(step.y_tiles, rows.split(sizes, dim=1)):
                        values[tile] = part
                continue
            args = [
                None if not name else values[name] if name in values else self._tensor(name)
                for name in step.input
            ]
            while args and args[-1] is None:
                args.pop()
            result = OPS[step.op_type](step, *args)
            values[step.output[0]] = result
        outputs = [values[name] for name in self.output_names]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load_trainable(model: onnx.ModelProto | str | os.PathLike) -> OnnxAttentionModel:
    """The converted model ``model`` (a path or ModelProto; external data is read) as a
    trainable ``nn.Module`` that equals it at initialisation."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    return OnnxAttentionModel(model)
