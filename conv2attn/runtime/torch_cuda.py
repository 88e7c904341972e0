"""Running an ONNX model through PyTorch (``--backend torch-cuda``).

The graph is imported by ``torch_import`` (onnx2torch). Reduced precision uses
``torch.autocast``, which keeps Softmax and reductions in float32 (the attention logits
need that: ``docs/design.md`` section 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import numpy as np
import onnx

from conv2attn.errors import InputError
from conv2attn.runtime.base import Device, RunnerRequest, cuda_torch, device_name
from conv2attn.runtime.registry import Backend
from conv2attn.runtime.torch_import import import_model, onnx2torch


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
        self.module = import_model(model).to(device)
        if compile:
            self.module = torch.compile(self.module)
        names = [value.name for value in model.graph.input if value.name in feeds]
        self.inputs = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names]
        self.result = None
        if device == "cuda":
            tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        self._first_run()
        if device == "cuda":
            from conv2attn.runtime.cuda_timing import CudaTimer

            self.timer = CudaTimer(torch, self._forward, cuda_graph)
        else:
            self.timer = None

    def _first_run(self) -> None:
        """One run, whose failure is the import's: onnx2torch builds some graphs into
        modules that do not run (torchvision's swin_t, original or converted, fails in
        its classifier's matrix product)."""
        try:
            self._forward()
        except RuntimeError as error:
            lines = str(error).strip().splitlines()
            raise InputError(
                "--backend torch-cuda: the module onnx2torch built from this model fails to "
                f"run ({lines[0] if lines else type(error).__name__}); onnx2torch does not "
                "import it faithfully: time it with --backend ort-cuda or trt"
            ) from None

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
