"""What every runtime backend shares: the Runner protocol, the options, the answers for
what is missing.

A backend module (``ort``, ``tensorrt``, ``torch_cuda``) provides ``prepare(backend)``,
which checks that everything the backend needs is here and returns the ``Device`` it runs
on, and ``create_runner(request)``, which builds the ``Runner`` of one model. The registry
(``registry.BACKENDS``) names each backend's module.

Nothing heavy is imported here at module load: each check imports what it checks, so the
CPU path never pays for (or fails on) GPU libraries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np
import onnx

from conv2attn.errors import InputError


class BackendUnavailable(InputError):
    """A backend cannot run on this machine; the message says what is missing and the fix."""


@runtime_checkable
class Runner(Protocol):
    """One model, ready to run on a backend with its inputs in place."""

    def run(self) -> None:
        """One inference, returning when its outputs are ready."""

    def timed_block(self, count: int) -> list[float]:
        """Seconds of each of ``count`` back-to-back runs."""

    def outputs(self) -> list[np.ndarray]:
        """The outputs of one run, on the host."""


@dataclass(frozen=True)
class LayerTime:
    """Kernel time of one converted Conv's nodes (or of everything else)."""

    name: str
    ms: float
    share: float


@runtime_checkable
class LayerProfiler(Protocol):
    """A runner that can attribute its time to source Convs (``profile --per-layer``)."""

    def layer_times(
        self, runs: int, layers: Sequence[dict], original: onnx.ModelProto | None
    ) -> list[LayerTime]:
        """Time per source Conv over ``runs`` runs. ``layers`` is a conversion record;
        ``original`` is the model itself when it is the unconverted one (its Convs are
        then found through the record's output tensors)."""


@dataclass(frozen=True)
class GpuOptions:
    """Options of the GPU backends; the CLI's flags map onto these one to one."""

    precision: str | None = None  # None: the backend's default for this GPU
    workspace_mb: int | None = None
    engine_cache: Path | None = None
    cuda_graph: bool = False
    compile: bool = False
    check_numerics: bool = True
    # per input (min, opt, max) dims: TensorRT's optimization profile; runs at opt
    shape_ranges: Mapping[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Device:
    """Where a backend runs, as ``prepare`` found it."""

    name: str  # the GPU by name and compute capability, or the CPU by architecture
    torch: ModuleType | None = None  # PyTorch, for backends that use its CUDA memory and events


@dataclass(frozen=True)
class RunnerRequest:
    """Everything ``create_runner`` gets: one model and how to run it."""

    backend: str
    path: Path
    model: onnx.ModelProto
    feed: Mapping[str, np.ndarray]
    precision: str
    threads: int
    options: GpuOptions
    per_layer: bool
    device: Device


def import_module(name: str, backend: str, install: str) -> ModuleType:
    """``name`` imported, or BackendUnavailable saying how to install it."""
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


def cuda_torch(backend: str, install: str | None = None) -> ModuleType:
    """torch with a usable CUDA device, or why not (``install``: what to install when torch
    is missing; by default what the registry says ``backend`` needs)."""
    if install is None:
        from conv2attn.runtime.registry import BACKENDS

        install = BACKENDS[backend].needs
    torch = import_module("torch", backend, install)
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


def fast_fp16(torch_module: ModuleType | None) -> bool:
    """Whether the GPU runs fp16 fast (compute capability 7.0 or newer)."""
    if torch_module is None:
        return False
    major, _ = torch_module.cuda.get_device_capability()
    return major >= 7


def device_name(gpu: bool, torch_module: ModuleType | None) -> str:
    """The GPU by name and compute capability; the CPU by architecture."""
    if torch_module is None:
        return "CUDA GPU" if gpu else f"{platform.machine()} CPU"
    index = torch_module.cuda.current_device()
    major, minor = torch_module.cuda.get_device_capability(index)
    return f"{torch_module.cuda.get_device_name(index)} (sm_{major}{minor})"
