"""Every runtime backend of ``conv2attn profile``, one entry each.

The CLI's ``--backend`` and ``--precision`` choices, their help, the option checks and
``tools/bench.py`` all read this table. Adding a backend is one module that provides
``prepare`` and ``create_runner`` (see ``base``) and one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from conv2attn.errors import InputError

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
# GPU options (``GpuOptions`` fields) a backend may take.
ENGINE_CACHE, WORKSPACE, CUDA_GRAPH, COMPILE = "engine_cache", "workspace", "cuda_graph", "compile"


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str  # one line for --help
    runtime: str  # what runs the model
    needs: str  # what to install, for the README and the messages
    module: str  # the implementing module, imported on first use
    gpu: bool
    precisions: tuple[str, ...]
    fp16_by_default: bool = False  # default fp16 where the GPU runs it fast
    per_layer: bool = False
    takes: frozenset[str] = frozenset()  # GPU options it uses

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)


BACKENDS = {
    b.name: b
    for b in (
        Backend(
            "ort-cpu",
            "onnxruntime, CPU (default)",
            "onnxruntime, CPU execution provider",
            "nothing extra",
            "conv2attn.runtime.ort",
            gpu=False,
            precisions=("fp32",),
            per_layer=True,
        ),
        Backend(
            "ort-cuda",
            "onnxruntime-gpu, CUDA execution provider",
            "onnxruntime-gpu, CUDA execution provider",
            "pip uninstall -y onnxruntime && pip install onnxruntime-gpu",
            "conv2attn.runtime.ort",
            gpu=True,
            precisions=("fp32", "tf32"),
        ),
        Backend(
            "ort-trt",
            "onnxruntime-gpu, TensorRT execution provider",
            "onnxruntime-gpu, TensorRT execution provider",
            "onnxruntime-gpu as for ort-cuda, and TensorRT's libraries on the library path",
            "conv2attn.runtime.ort",
            gpu=True,
            precisions=("fp32", "fp16"),
            fp16_by_default=True,
            takes=frozenset({ENGINE_CACHE, WORKSPACE}),
        ),
        Backend(
            "trt",
            "TensorRT 10+ Python API (engines built here; CUDA events via torch)",
            "TensorRT 10 or newer, Python API; CUDA memory and events through PyTorch",
            'pip install "conv2attn[trt]" (tensorrt and a CUDA build of torch)',
            "conv2attn.runtime.tensorrt",
            gpu=True,
            precisions=PRECISIONS,
            fp16_by_default=True,
            per_layer=True,
            takes=frozenset({ENGINE_CACHE, WORKSPACE, CUDA_GRAPH}),
        ),
        Backend(
            "torch-cuda",
            "PyTorch on a CUDA GPU, the graph imported with onnx2torch",
            "PyTorch on a CUDA GPU, the ONNX graph imported by onnx2torch",
            'pip install "conv2attn[torch]" (a CUDA build of torch, and onnx2torch)',
            "conv2attn.runtime.torch_cuda",
            gpu=True,
            precisions=PRECISIONS,
            fp16_by_default=True,
            takes=frozenset({CUDA_GRAPH, COMPILE}),
        ),
    )
}


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise InputError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def names(where=lambda b: True) -> list[str]:
    """Backend names, in table order, of the entries ``where`` accepts."""
    return [b.name for b in BACKENDS.values() if where(b)]


def require(name: str):
    """Check that everything backend ``name`` needs is here (BackendUnavailable says what
    is missing); returns the ``Device`` it runs on."""
    entry = backend(name)
    return entry.implementation().prepare(entry)


def resolve_precision(name: str, precision: str | None, torch_module=None) -> str:
    """``--precision`` for backend ``name``: the given one if it runs it, else its default
    (fp16 on GPUs that run it fast, for backends that default to it)."""
    entry = backend(name)
    if precision is None:
        from conv2attn.runtime.base import fast_fp16

        return "fp16" if entry.fp16_by_default and fast_fp16(torch_module) else "fp32"
    if precision not in entry.precisions:
        raise InputError(
            f"--precision {precision}: --backend {name} runs {', '.join(entry.precisions)}"
            + (" (the model's own types)" if not entry.gpu else "")
        )
    return precision


def help_text() -> str:
    """The backends part of ``profile --help``."""
    width = max(len(name) for name in BACKENDS)
    return "\n".join(f"  {b.name.ljust(width)}  {b.summary}" for b in BACKENDS.values())
