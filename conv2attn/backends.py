"""Which runtime each ``profile --backend`` needs, and a one-line answer when it is missing.

Nothing heavy is imported here at module load: each check imports what it checks, so
the CPU path never pays for (or fails on) GPU libraries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from types import ModuleType

from conv2attn.errors import InputError


class BackendUnavailable(InputError):
    """A backend cannot run on this machine; the message says what is missing and the fix."""


@dataclass(frozen=True)
class Backend:
    name: str
    runtime: str  # what runs the model
    needs: str  # what to install, for the README and the messages
    gpu: bool


BACKENDS = {
    b.name: b
    for b in (
        Backend("ort-cpu", "onnxruntime, CPU execution provider", "nothing extra", False),
        Backend(
            "ort-cuda",
            "onnxruntime-gpu, CUDA execution provider",
            "pip uninstall -y onnxruntime && pip install onnxruntime-gpu",
            True,
        ),
        Backend(
            "ort-trt",
            "onnxruntime-gpu, TensorRT execution provider",
            "onnxruntime-gpu as for ort-cuda, and TensorRT's libraries on the library path",
            True,
        ),
        Backend(
            "trt",
            "TensorRT 10 or newer, Python API; CUDA memory and events through PyTorch",
            'pip install "conv2attn[trt]" (tensorrt and a CUDA build of torch)',
            True,
        ),
        Backend(
            "torch-cuda",
            "PyTorch on a CUDA GPU, the ONNX graph imported by onnx2torch",
            'pip install "conv2attn[torch]" (a CUDA build of torch, and onnx2torch)',
            True,
        ),
    )
}
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


def _import(name: str, backend: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise BackendUnavailable(
            f"--backend {backend}: cannot import {name} ({error}); {install}"
        ) from None


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def ort_provider(backend: str) -> list[str]:
    """onnxruntime providers for ``ort-*`` backends, or why they are not available."""
    import onnxruntime

    wanted = {
        "ort-cpu": ["CPUExecutionProvider"],
        "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }[backend]
    available = onnxruntime.get_available_providers()
    if wanted[0] in available:
        return wanted
    if installed("onnxruntime") and installed("onnxruntime-gpu"):
        raise BackendUnavailable(
            f"--backend {backend}: onnxruntime and onnxruntime-gpu are both installed and the "
            f"CPU package hides the GPU providers; run: pip uninstall -y onnxruntime "
            f"onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    if not installed("onnxruntime-gpu"):
        raise BackendUnavailable(
            f"--backend {backend}: {wanted[0]} needs onnxruntime-gpu; run: pip uninstall -y "
            f"onnxruntime && pip install onnxruntime-gpu"
        )
    raise BackendUnavailable(
        f"--backend {backend}: onnxruntime-gpu is installed but offers only "
        f"{', '.join(available)}; check the CUDA/cuDNN (and for ort-trt, TensorRT) libraries "
        f"it needs are on the library path"
    )


def cuda_torch(backend: str) -> ModuleType:
    """torch with a usable CUDA device, or why not."""
    torch = _import("torch", backend, BACKENDS[backend].needs)
    if not torch.cuda.is_available():
        build = torch.version.cuda
        reason = (
            "this torch is a CPU-only build"
            if build is None
            else f"torch (CUDA {build}) sees no GPU: no device, or no driver"
        )
        raise BackendUnavailable(
            f"--backend {backend}: needs a CUDA GPU; {reason}. Use --backend ort-cpu here"
        )
    return torch


def tensorrt(backend: str = "trt") -> ModuleType:
    """The tensorrt module (10 or newer), or why not."""
    trt = _import("tensorrt", backend, BACKENDS[backend].needs)
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise BackendUnavailable(
            f"--backend {backend}: TensorRT {trt.__version__} is installed; 10 or newer is "
            f'needed: pip install -U "tensorrt>=10"'
        )
    return trt


def onnx2torch(backend: str = "torch-cuda") -> ModuleType:
    return _import("onnx2torch", backend, BACKENDS[backend].needs)


def require(backend: str) -> None:
    """Raise ``BackendUnavailable`` unless everything ``backend`` needs is here."""
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend.startswith("ort-"):
        ort_provider(backend)
        return
    if backend == "trt":
        tensorrt(backend)
    if backend == "torch-cuda":
        onnx2torch(backend)
    cuda_torch(backend)


def default_precision(backend: str, torch_module: ModuleType | None = None) -> str:
    """fp16 where the GPU runs it fast (compute capability 7.0 or newer), else fp32; the
    CPU backend is fp32."""
    if not BACKENDS[backend].gpu or torch_module is None:
        return "fp32"
    major, _ = torch_module.cuda.get_device_capability()
    return "fp16" if major >= 7 else "fp32"
