"""The ONNX graph as a PyTorch module (onnx2torch), ready to run on a GPU.

onnx2torch implements operators up to opset 17. Newer models are first rewritten to
opset 17 where the two opsets mean the same thing (the Reduce operators take ``axes`` as
an input from opset 18; most later versions only add types); anything else is refused
with the node's name.

Four changes to the imported module keep the GPU from waiting on the host. onnx2torch
reads the values of some inputs in Python (a Reshape's shape, a Pad's pads, a Slice's
bounds, a Range's limits); a constant there lives in host memory, so reading it does not
copy from the GPU and wait for every kernel queued before it. A model that keeps dynamic
sizes computes its shape arithmetic in host memory too, from the tensors' shapes, which
the host knows without reading a value, once per shape; data made from such a shape (a
constant expanded to the batch) is made on the device. A Gather by one constant index
selects by a Python integer, where onnx2torch's would read the index back. And every
node whose inputs are all constants is computed once, at import, rather than launched on
every run.
"""

from __future__ import annotations

import copy
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conv2attn.errors import InputError
from conv2attn.items import inline_per_item
from conv2attn.modelio import PROTOBUF_LIMIT, model_size
from conv2attn.runtime.base import import_module
from conv2attn.runtime.registry import BACKENDS

if TYPE_CHECKING:
    from torch.fx import GraphModule

IMPORT_OPSET = 17
# From opset 18 these take `axes` as an input instead of an attribute.
REDUCE_OPS = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}
# Versions after 17 whose changes a float model does not use: new element types
# (float8, int4, ...) or attributes checked below.
SAME_MEANING = {
    "Pad",  # 18: optional `axes` input; 19: `wrap` mode
    "Split",  # 18: `num_outputs`
    "Resize",  # 18/19: `antialias`, `axes`, `keep_aspect_ratio_policy`, half_pixel_symmetric
    "AveragePool",  # 19: `dilations`
    "Cast",  # 19: `saturate` (float8 only)
    "CastLike",
    "Constant",
    "ConstantOfShape",
    "DequantizeLinear",
    "QuantizeLinear",
    "Equal",
    "Flatten",
    "Identity",
    "If",
    "Loop",
    "Scan",
    "Reshape",
    "Shape",
    "Size",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Gather",
}
NEW_FEATURES = {
    "Pad": lambda node, inputs: (
        (len(inputs) > 3 and bool(inputs[3])) or _attr(node, "mode") == b"wrap"
    ),
    "Split": lambda node, inputs: _attr(node, "num_outputs") is not None,
    "Resize": lambda node, inputs: (
        any(
            _attr(node, name) is not None
            for name in ("antialias", "axes", "keep_aspect_ratio_policy")
        )
        or _attr(node, "coordinate_transformation_mode") == b"half_pixel_symmetric"
    ),
    "AveragePool": lambda node, inputs: any(d != 1 for d in (_attr(node, "dilations") or [])),
}


# The inputs that onnx2torch's modules read on the host, by module class and argument
# position (shapes, pads, slice bounds, axes, repeats, split sizes).
HOST_ARGUMENTS = {
    "OnnxReshape": (1,),
    "OnnxPadDynamic": (1, 2),
    "OnnxSlice": (1, 2, 3, 4),
    "OnnxExpand": (1,),
    "OnnxTile": (1,),
    "OnnxSplit13": (1,),
    "OnnxUnsqueezeDynamicAxes": (1,),
    "OnnxSqueezeDynamicAxes": (1,),
    "OnnxReduceSumDynamicAxes": (1,),
    "OnnxConstantOfShape": (0,),
    "OnnxRange": (0, 1, 2),
}
# Modules whose result is on their own device whatever device their inputs are on.
DEVICE_RESULTS = {"OnnxRange", "OnnxConstantOfShape"}
# A host value used as data on the device is written there element by element; one
# larger than this (no vector of sizes is) is copied instead, which a CUDA graph cannot
# capture.
LARGEST_FILLED = 64
# Input shapes whose shape arithmetic a dynamic model's imported module keeps.
KEPT_SHAPES = 16


def onnx2torch(backend: str = "torch-cuda") -> ModuleType:
    """The onnx2torch module, or BackendUnavailable saying how to install it."""
    return import_module("onnx2torch", backend, BACKENDS[backend].needs)


def _attr(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def for_onnx2torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as onnx2torch imports it, meaning the same: constants that reach nodes
    through Identity or Constant nodes become initializers (onnx2torch reads a Conv's
    weight and bias only from initializers; torch's exporter routes shared weights
    through Identity nodes), ``allowzero`` goes where it changes nothing, and the opset
    is 17 or older (Gelu spelled out in older operators). A copy when anything changes."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    allowing_zero = [
        n for n in model.graph.node if n.op_type == "Reshape" and _attr(n, "allowzero")
    ]
    if opset <= IMPORT_OPSET and not allowing_zero and not _constant_nodes(model.graph):
        return model
    model = copy.deepcopy(model)
    _constants_as_initializers(model.graph)
    _reshapes_without_allowzero(model.graph)
    if opset > IMPORT_OPSET:
        _to_import_opset(model, opset)
    return model


def _reshapes_without_allowzero(graph: onnx.GraphProto) -> None:
    """Drops ``allowzero=1`` (which onnx2torch refuses) from Reshapes whose shape is a
    constant without zeros: there it changes nothing."""
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or not _attr(node, "allowzero"):
            continue
        shape = constants.get(node.input[1])
        if shape is not None and 0 not in numpy_helper.to_array(shape).tolist():
            for attribute in list(node.attribute):
                if attribute.name == "allowzero":
                    node.attribute.remove(attribute)


def _constant_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Identity nodes of initializers and Constant nodes of plain tensor values, in order
    (an Identity of an earlier one's output counts too)."""
    known = {t.name for t in graph.initializer}
    outputs = {value.name for value in graph.output}
    found = []
    for node in graph.node:
        if node.output[0] in outputs:
            continue
        of_initializer = node.op_type == "Identity" and node.input[0] in known
        if of_initializer or (node.op_type == "Constant" and _constant_value(node) is not None):
            found.append(node)
            known.add(node.output[0])
    return found


def _constant_value(node: onnx.NodeProto):
    """A Constant node's value as a numpy array, or None for sparse and string values."""
    attribute = node.attribute[0] if len(node.attribute) == 1 else None
    if attribute is None:
        return None
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return numpy_helper.to_array(value)
    dtype = {"value_float": np.float32, "value_floats": np.float32}.get(attribute.name)
    if dtype is None and attribute.name in ("value_int", "value_ints"):
        dtype = np.int64
    return None if dtype is None else np.asarray(value, dtype)


def _constants_as_initializers(graph: onnx.GraphProto) -> None:
    tensors = {t.name: t for t in graph.initializer}
    for node in _constant_nodes(graph):
        if node.op_type == "Identity":
            tensor = copy.copy(tensors[node.input[0]])
        else:
            tensor = numpy_helper.from_array(_constant_value(node))
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        tensors[tensor.name] = tensor
        graph.node.remove(node)


def _to_import_opset(model: onnx.ModelProto, opset: int) -> None:
    constants = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        since = onnx.defs.get_schema(node.op_type, opset, node.domain).since_version
        if since <= IMPORT_OPSET:
            continue
        inputs = list(node.input)
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            nodes[-1:] = _gelu_of_opset_17(model.graph, node)
            continue
        if node.op_type in REDUCE_OPS:
            if len(inputs) > 1 and inputs[1]:
                if inputs[1] not in constants:
                    raise _refusal(node, "its axes are computed at runtime")
                axes = numpy_helper.to_array(constants[inputs[1]]).astype(int).tolist()
                del node.input[1:]
                node.attribute.append(helper.make_attribute("axes", axes))
            continue
        if node.op_type not in SAME_MEANING:
            if not onnx.defs.has(node.op_type, IMPORT_OPSET, node.domain):
                raise _refusal(node, f"{node.op_type} is new in opset {since}")
            raise _refusal(node, f"{node.op_type} changed after opset {IMPORT_OPSET}")
        uses_new = NEW_FEATURES.get(node.op_type)
        if uses_new is not None and uses_new(node, inputs):
            raise _refusal(node, f"it uses a feature {node.op_type} gained after opset 17")
        for attribute in list(node.attribute):
            if node.op_type == "Cast" and attribute.name == "saturate":
                node.attribute.remove(attribute)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = IMPORT_OPSET


def _gelu_of_opset_17(graph: onnx.GraphProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Gelu (opset 20) as the opset-17 operators of its definition: x/2 (1 + erf(x/sqrt 2)),
    or with ``approximate="tanh"`` x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    (x,), (y,) = node.input, node.output
    name = node.name or y
    dtype = helper.tensor_dtype_to_np_dtype(_element_type(graph, x))

    def constant(label: str, value: float) -> str:
        tensor = numpy_helper.from_array(np.array(value, dtype), f"{name}/{label}")
        graph.initializer.append(tensor)
        return tensor.name

    def op(kind: str, label: str, *inputs: str, output: str | None = None) -> str:
        out = output or f"{name}/{label}_output"
        nodes.append(helper.make_node(kind, list(inputs), [out], name=f"{name}/{label}"))
        return out

    nodes: list[onnx.NodeProto] = []
    if _attr(node, "approximate") in (b"tanh", "tanh"):
        cube = op("Mul", "cube", op("Mul", "square", x, x), x)
        inner = op("Add", "inner", x, op("Mul", "cubic", cube, constant("c", 0.044715)))
        scaled = op("Mul", "scaled", inner, constant("k", np.sqrt(2 / np.pi)))
        curve = op("Tanh", "tanh", scaled)
    else:
        curve = op("Erf", "erf", op("Div", "div", x, constant("sqrt2", np.sqrt(2))))
    gate = op("Add", "gate", curve, constant("one", 1.0))
    op("Mul", "half", op("Mul", "times", x, gate), constant("half", 0.5), output=y)
    return nodes


def _element_type(graph: onnx.GraphProto, name: str) -> int:
    """The element type the graph declares for ``name``; float where it declares none."""
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.name == name and value.type.tensor_type.elem_type:
            return value.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def _refusal(node: onnx.NodeProto, why: str) -> InputError:
    return InputError(
        f"--backend torch-cuda: onnx2torch imports opset <= {IMPORT_OPSET}; node "
        f"'{node.name or node.output[0]}' ({node.op_type}) cannot be moved there: {why}"
    )


def import_model(model: onnx.ModelProto) -> GraphModule:
    """The ONNX model as a torch ``torch.fx.GraphModule`` in eval mode, with its constant
    nodes computed and its host-read constants in host memory (module docstring); an
    operator onnx2torch lacks is refused with a clear message."""
    model = inline_per_item(model)  # onnx2torch has no Scan; the GPU runs the batch whole
    converter = onnx2torch()
    size = model_size(model)
    if size >= PROTOBUF_LIMIT:  # onnx2torch serialises the model for shape inference
        raise InputError(
            f"--backend torch-cuda: onnx2torch cannot import a model of {size / 2**30:.1f} GB "
            "(protobuf holds at most 2 GB): time it with --backend ort-cuda or trt"
        )
    try:
        module = converter.convert(for_onnx2torch(model))
    except NotImplementedError as error:  # onnx2torch's answer for an operator it lacks
        raise InputError(f"--backend torch-cuda: onnx2torch cannot import it: {error}") from None
    module.eval()
    fold_constants(module)
    select_scalar_gathers(module)
    keep_host_arguments_on_host(module)
    keep_shapes_on_host(module)
    return module


def fold_constants(module: GraphModule) -> int:
    """Replaces each node whose inputs are all constants by its value; the count."""
    import torch

    graph = module.graph
    constants = _graph_constants(module)
    values = {}
    folded = 0
    for node in list(graph.nodes):
        if node.op == "get_attr":
            values[node] = _constant(module, node.target)
            continue
        if node.op != "call_module" or not node.users:
            continue
        arguments = [*node.args, *node.kwargs.values()]
        if not all(_known(a, values) for a in arguments) or not any(
            isinstance(a, torch.fx.Node) for a in arguments
        ):
            continue
        args = torch.fx.node.map_arg(node.args, values.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, values.__getitem__)
        with torch.no_grad():
            value = module.get_submodule(node.target)(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        name = f"folded_constant_{folded}"
        module.register_buffer(name, value)
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
        values[constant] = value
        folded += 1
    if folded:
        _drop_unused(module, constants)
    return folded


def select_scalar_gathers(module: GraphModule) -> int:
    """Turns each Gather by one constant index (a 0-d tensor, as a converted global
    attention picks a head's rows) into a select by a Python integer; the count.
    onnx2torch indexes with the tensor, which torch reads back as an integer: on a GPU,
    a wait for every queued kernel that a CUDA graph cannot capture."""
    graph = module.graph
    constants = _graph_constants(module)
    selected = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or _class_name(module, node) != "OnnxGather":
            continue
        data, indices = node.args[:2]
        if getattr(indices, "op", None) != "get_attr":
            continue
        index = _constant(module, indices.target)
        gather = module.get_submodule(node.target)
        axis = getattr(gather, "_axis", getattr(gather, "axis", None))  # by release
        if index.dim() != 0 or axis is None:
            continue
        name = f"select_{selected}"
        module.add_submodule(name, _select(axis, int(index)))
        with graph.inserting_after(node):
            select = graph.call_module(name, (data,))
        node.replace_all_uses_with(select)
        graph.erase_node(node)
        selected += 1
    if selected:
        _drop_unused(module, constants)
    return selected


def keep_host_arguments_on_host(module: GraphModule) -> int:
    """Gives each constant that a module reads on the host (``HOST_ARGUMENTS``) a copy in
    a submodule, ``host``, that ``module.to(device)`` leaves in host memory; the count of
    constants copied."""
    graph = module.graph
    constants = _graph_constants(module)
    moved: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        for position in _host_read_positions(module, node):
            if position >= len(node.args):
                continue
            argument = node.args[position]
            if getattr(argument, "op", None) == "get_attr":
                node.update_arg(position, _host_copy(module, argument, moved))
    if moved:
        _drop_unused(module, constants)
    return len(moved)


def keep_shapes_on_host(module: GraphModule) -> int:
    """Computes shape arithmetic in host memory; the count of nodes computed there.

    Each Shape gives a host tensor, and every node computed from shapes and constants
    alone (not a Range or ConstantOfShape, whose results are on the device) runs on the
    host with host copies of its constants. Where such a value is used as data on the
    device, it is written there by one fill per element: a fill takes its value as a
    kernel argument, so a CUDA graph can capture it, where a copy from pageable host
    memory cannot be captured."""
    import torch

    graph = module.graph
    shapes = [
        node
        for node in graph.nodes
        if node.op == "call_module" and _class_name(module, node) == "OnnxShape"
    ]
    if not shapes:
        return 0
    constants = _graph_constants(module)
    for node in shapes:
        owner, _, attribute = node.target.rpartition(".")
        # setattr on the owner, not Module.set_submodule: torch 2.4 has none
        setattr(
            module.get_submodule(owner),
            attribute,
            _host_shape(*shape_axes(module.get_submodule(node.target))),
        )
    on_host = set(shapes)
    for node in graph.nodes:
        if node in on_host or not _runs_where_its_inputs_are(module, node):
            continue
        inputs = node.all_input_nodes
        if all(a in on_host or a.op == "get_attr" for a in inputs) and _reads_as_data(
            module, node, on_host
        ):
            on_host.add(node)
    moved: dict[str, str] = {}
    copies = 0
    for node in [n for n in graph.nodes if n in on_host]:
        for argument in node.all_input_nodes:
            if argument.op == "get_attr":
                node.replace_input_with(argument, _host_copy(module, argument, moved))
        device_copy = None
        for user in [u for u in node.users if u not in on_host]:
            reads = set(_host_read_positions(module, user)) if user.op == "call_module" else set()
            positions = [i for i, a in enumerate(user.args) if i not in reads and _uses(a, node)]
            if not positions and not any(_uses(a, node) for a in user.kwargs.values()):
                continue
            if device_copy is None:
                name = f"to_device_{copies}"
                copies += 1
                module.add_submodule(name, _device_copy())
                with graph.inserting_after(node):
                    device_copy = graph.call_module(name, (node,))

            def swap(argument, copy=device_copy, node=node):
                return copy if argument is node else argument

            for position in positions:
                user.update_arg(position, torch.fx.node.map_arg(user.args[position], swap))
            for key, value in user.kwargs.items():
                user.update_kwarg(key, torch.fx.node.map_arg(value, swap))
    _compute_once_per_shape(module, shapes, on_host)
    _drop_unused(module, constants)
    return len(on_host)


def _compute_once_per_shape(module: GraphModule, shapes: list, on_host: set) -> None:
    """Replaces the host nodes computed from one Shape alone by one submodule that runs
    them once per shape of that Shape's input and keeps the results: a model that keeps
    dynamic sizes has hundreds of them (resnet18, local attention: 511 from 20 Shapes),
    and eager PyTorch pays a Python call for each on every run."""
    import operator

    import torch

    graph = module.graph
    source: dict = {}  # host node -> the one Shape it is computed from, or None
    for node in graph.nodes:
        if node in shapes:
            source[node] = node
        elif node in on_host:
            found = {source.get(a) for a in node.all_input_nodes if a.op != "get_attr"}
            source[node] = found.pop() if len(found) == 1 else None
    for index, shape in enumerate(shapes):
        members = [n for n in graph.nodes if source.get(n) is shape]
        inside = set(members)
        results = [n for n in members if any(u not in inside for u in n.users)]
        function = torch.fx.Graph()
        values = {shape.args[0]: function.placeholder("tensor")}
        for node in members:
            for argument in node.all_input_nodes:
                if argument.op == "get_attr" and argument not in values:
                    values[argument] = function.get_attr(argument.target)
            values[node] = function.node_copy(node, values.__getitem__)
        function.output(tuple(values[n] for n in results))
        name = f"shape_function_{index}"
        module.add_submodule(name, _per_shape(torch.fx.GraphModule(module, function)))
        with graph.inserting_after(shape):
            call = graph.call_module(name, (shape.args[0],))
        with graph.inserting_after(call):
            items = [graph.call_function(operator.getitem, (call, i)) for i in range(len(results))]
        for node, item in zip(results, items):
            for user in list(node.users):
                if user not in inside:
                    user.replace_input_with(node, item)
        for node in reversed(members):
            graph.erase_node(node)


def _per_shape(function):
    """``function`` of a tensor's shape alone, kept in host memory, its results kept for
    the last ``KEPT_SHAPES`` shapes it saw."""
    from torch import nn

    class PerShape(nn.Module):
        def __init__(self):
            super().__init__()
            self.function = function
            self.results: dict[tuple, tuple] = {}

        def _apply(self, fn, recurse=True):
            return self  # host arithmetic: neither moved nor cast

        def forward(self, tensor):
            key = tuple(tensor.shape)
            if key not in self.results:
                if len(self.results) >= KEPT_SHAPES:
                    del self.results[next(iter(self.results))]
                self.results[key] = self.function(tensor)
            return self.results[key]

    return PerShape()


def shape_axes(onnx_shape) -> tuple[int, int | None]:
    """The axes an onnx2torch Shape module returns, ``start`` and ``end`` (named so in
    onnx2torch 1.5.0, ``_start`` and ``_end`` in later releases)."""
    for start, end in (("_start", "_end"), ("start", "end")):
        if hasattr(onnx_shape, start):
            return getattr(onnx_shape, start) or 0, getattr(onnx_shape, end, None)
    raise InputError(
        "--backend torch-cuda: this onnx2torch's Shape module keeps its axes under names "
        "conv2attn does not know; install onnx2torch 1.5.15"
    )


def _class_name(module: GraphModule, node) -> str:
    return type(module.get_submodule(node.target)).__name__


def _host_read_positions(module: GraphModule, node) -> tuple[int, ...]:
    return HOST_ARGUMENTS.get(_class_name(module, node), ())


def _reads_as_data(module: GraphModule, node, on_host: set) -> bool:
    """Whether ``node`` takes a host value as data, not only where onnx2torch reads it on
    the host: an Expand of a constant to a shape computed there makes device data (a
    batch of fill tokens, a class token per image), which the host would have to copy."""
    reads = set(_host_read_positions(module, node)) if node.op == "call_module" else set()
    hosted = [a for a in node.all_input_nodes if a in on_host]
    return any(
        _uses(argument, value)
        for position, argument in enumerate(node.args)
        if position not in reads
        for value in hosted
    ) or any(_uses(argument, value) for argument in node.kwargs.values() for value in hosted)


def _runs_where_its_inputs_are(module: GraphModule, node) -> bool:
    """Whether ``node`` computes on its inputs' device: a module without tensors of its
    own (which ``.to(device)`` would move) and not one of ``DEVICE_RESULTS``."""
    if node.op == "call_function":
        return True
    if node.op != "call_module" or _class_name(module, node) in DEVICE_RESULTS:
        return False
    submodule = module.get_submodule(node.target)
    return next(submodule.parameters(), None) is None and next(submodule.buffers(), None) is None


def _uses(argument, node) -> bool:
    if isinstance(argument, (tuple, list)):
        return any(_uses(a, node) for a in argument)
    return argument is node


def _host_copy(module: GraphModule, constant, moved: dict[str, str]):
    """A ``get_attr`` node reading the copy of ``constant`` in the ``host`` submodule
    (one copy per constant: ``moved`` maps each constant to its copy)."""
    if constant.target.startswith("host."):
        return constant
    if not hasattr(module, "host"):
        module.add_submodule("host", _host_memory_module())
    if constant.target not in moved:
        name = f"constant_{len(module.host._buffers)}"
        module.host.register_buffer(name, _constant(module, constant.target).detach().cpu())
        moved[constant.target] = f"host.{name}"
    with module.graph.inserting_after(constant):
        return module.graph.get_attr(moved[constant.target])


def _select(axis: int, index: int):
    """ONNX Gather by one index: the slice at ``index`` along ``axis``, that axis dropped."""
    import torch
    from torch import nn

    class Select(nn.Module):
        def forward(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.select(axis, index)

    return Select()


def _host_shape(start: int, end: int | None):
    """Shape as a host tensor: a tensor's shape is known on the host without a read."""
    import torch
    from torch import nn

    class HostShape(nn.Module):
        def forward(self, tensor: torch.Tensor) -> torch.Tensor:
            return torch.tensor(tensor.shape[start:end], dtype=torch.int64)

    return HostShape()


def _device_copy():
    """A module writing a host value to the module's device, one fill per element."""
    import torch
    from torch import nn

    class DeviceCopy(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("marker", torch.empty(0), persistent=False)

        def forward(self, value: torch.Tensor) -> torch.Tensor:
            device = self.marker.device
            if value.device == device:
                return value
            if value.numel() > LARGEST_FILLED:
                return value.to(device)
            result = torch.empty(value.shape, dtype=value.dtype, device=device)
            flat = result.view(-1)
            for index, element in enumerate(value.reshape(-1).tolist()):
                flat[index].fill_(element)
            return result

    return DeviceCopy()


def _host_memory_module():
    """A module whose buffers stay where they are (host memory) when the module holding
    it moves to a device or changes precision."""
    from torch import nn

    class HostMemory(nn.Module):
        def _apply(self, fn, recurse=True):
            return self

    return HostMemory()


def _known(argument, values) -> bool:
    import torch

    if isinstance(argument, torch.fx.Node):
        return argument in values
    if isinstance(argument, (tuple, list)):
        return all(_known(a, values) for a in argument)
    return True


def _constant(module: GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _drop_unused(module: GraphModule, constants: set[str]) -> None:
    """Erases dead nodes, then those of the graph's ``constants`` (``get_attr`` targets)
    and the submodules that nothing uses any more. Buffers that modules use inside their
    own ``forward`` (a BatchNorm's statistics, say) are never graph constants."""
    graph = module.graph
    graph.eliminate_dead_code()
    used = {node.target for node in graph.nodes if node.op == "get_attr"}
    for qualified in constants - used:
        owner, _, name = qualified.rpartition(".")
        delattr(module.get_submodule(owner) if owner else module, name)
    module.delete_all_unused_submodules()
    module.recompile()


def _graph_constants(module: GraphModule) -> set[str]:
    return {node.target for node in module.graph.nodes if node.op == "get_attr"}
