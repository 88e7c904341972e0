"""Runtimes that run and time models: one module per backend behind one ``Runner``.

``registry`` lists the backends (what each needs, its precisions, whether it profiles per
layer, its module); ``base`` defines the ``Runner`` protocol and what the backends share;
``ort``, ``tensorrt`` and ``torch_cuda`` are the backends, imported only when used, so a
CPU-only install never loads GPU libraries. ``cuda_timing`` times GPU runs with CUDA events.
"""

from conv2attn.runtime.base import BackendUnavailable, GpuOptions, LayerTime, Runner
from conv2attn.runtime.registry import BACKENDS, PRECISIONS, Backend, require, resolve_precision

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendUnavailable",
    "GpuOptions",
    "LayerTime",
    "Runner",
    "require",
    "resolve_precision",
]
