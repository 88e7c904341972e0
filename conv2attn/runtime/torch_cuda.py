"""Running an ONNX model through PyTorch (``--backend torch-cuda``).

The graph is imported with onnx2torch, which implements operators up to opset 17. Newer
models are first rewritten to opset 17 where the two opsets mean the same thing (the
Reduce operators take ``axes`` as an input from opset 18; most later versions only add
types); anything else is refused with the node's name. Reduced precision uses
``torch.autocast``, which keeps Softmax and reductions in float32 (the attention logits
need that: ``docs/design.md`` section 2).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import ModuleType

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conv2attn.errors import InputError
from conv2attn.runtime.base import Device, RunnerRequest, cuda_torch, device_name, import_module
from conv2attn.runtime.registry import BACKENDS, Backend

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


def onnx2torch(backend: str = "torch-cuda") -> ModuleType:
    return import_module("onnx2torch", backend, BACKENDS[backend].needs)


def prepare(backend: Backend) -> Device:
    """Checks onnx2torch and a CUDA torch."""
    onnx2torch(backend.name)
    torch_module = cuda_torch(backend.name)
    return Device(device_name(True, torch_module), torch_module)


def create_runner(request: RunnerRequest) -> tuple[TorchRunner, None]:
    options = request.options
    runner = TorchRunner(
        request.device.torch,
        request.model,
        request.feed,
        request.precision,
        "cuda",
        options.cuda_graph,
        options.compile,
    )
    return runner, None


def _attr(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def for_onnx2torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` at opset 17 or older, meaning the same; a copy when it changes."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset <= IMPORT_OPSET:
        return model
    model = copy.deepcopy(model)
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        since = onnx.defs.get_schema(node.op_type, opset, node.domain).since_version
        if since <= IMPORT_OPSET:
            continue
        inputs = list(node.input)
        if node.op_type in REDUCE_OPS:
            if len(inputs) > 1 and inputs[1]:
                if inputs[1] not in constants:
                    raise _refusal(node, "its axes are computed at runtime")
                axes = numpy_helper.to_array(constants[inputs[1]]).astype(int).tolist()
                del node.input[1:]
                node.attribute.append(helper.make_attribute("axes", axes))
            continue
        if node.op_type not in SAME_MEANING:
            raise _refusal(node, f"{node.op_type} changed after opset {IMPORT_OPSET}")
        uses_new = NEW_FEATURES.get(node.op_type)
        if uses_new is not None and uses_new(node, inputs):
            raise _refusal(node, f"it uses a feature {node.op_type} gained after opset 17")
        for attribute in list(node.attribute):
            if node.op_type == "Cast" and attribute.name == "saturate":
                node.attribute.remove(attribute)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = IMPORT_OPSET
    return model


def _refusal(node: onnx.NodeProto, why: str) -> InputError:
    return InputError(
        f"--backend torch-cuda: onnx2torch imports opset <= {IMPORT_OPSET}; node "
        f"'{node.name or node.output[0]}' ({node.op_type}) cannot be moved there: {why}"
    )


def import_model(model: onnx.ModelProto):
    """The ONNX model as a torch ``nn.Module`` (onnx2torch), with clear refusals."""
    converter = onnx2torch()
    try:
        return converter.convert(for_onnx2torch(model))
    except NotImplementedError as error:  # onnx2torch's answer for an operator it lacks
        raise InputError(f"--backend torch-cuda: onnx2torch cannot import it: {error}") from None


class TorchRunner:
    """An imported model on ``device`` with its inputs there, run under the precision.

    ``fp32`` disables TF32 math, ``tf32`` enables it, ``fp16``/``bf16`` run under
    ``torch.autocast``. ``compile`` wraps the module in ``torch.compile``; ``cuda_graph``
    replays a captured graph (CUDA only)."""

    def __init__(
        self,
        torch: ModuleType,
        model: onnx.ModelProto,
        feeds: Mapping[str, np.ndarray],
        precision: str = "fp32",
        device: str = "cuda",
        cuda_graph: bool = False,
        compile: bool = False,
    ):
        self.torch = torch
        self.device = device
        self.precision = precision
        self.module = import_model(model).eval().to(device)
        if compile:
            self.module = torch.compile(self.module)
        names = [value.name for value in model.graph.input if value.name in feeds]
        self.inputs = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names]
        self.result = None
        if device == "cuda":
            tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            from conv2attn.runtime.cuda_timing import CudaTimer

            self.timer = CudaTimer(torch, self._forward, cuda_graph)
        else:
            self.timer = None

    def _forward(self) -> None:
        torch = self.torch
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with (
            torch.no_grad(),
            torch.autocast(
                self.device if self.device != "cuda" else "cuda",
                dtype=dtype,
                enabled=dtype is not None,
            ),
        ):
            self.result = self.module(*self.inputs)

    def run(self) -> None:
        if self.timer is not None:
            self.timer.run()
        else:
            self._forward()

    def timed_block(self, count: int) -> list[float]:
        if self.timer is not None:
            return self.timer.timed_block(count)
        import time

        times = []
        for _ in range(count):
            start = time.perf_counter()
            self._forward()
            times.append(time.perf_counter() - start)
        return times

    def outputs(self) -> list[np.ndarray]:
        self.run()
        result = self.result
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        return [r.detach().float().cpu().numpy() for r in results]
