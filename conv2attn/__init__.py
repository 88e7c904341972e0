"""conv2attn: turn the Conv nodes of a trained CNN into exactly equivalent attention.

Each Conv of an ONNX model becomes multi-head self-attention with a relative
positional encoding (Li et al., arXiv:2111.01353; Cordonnier et al., ICLR 2020).

The public API is imported on first use, so that ``import conv2attn.validate`` or
``conv2attn.profile`` does not load the graph pass (and onnx-graphsurgeon).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "ConversionReport": "conv2attn.record",
    "ConvertOptions": "conv2attn.graph.options",
    "convert": "conv2attn.graph.rewrite",
    "load_model": "conv2attn.modelio",
    "save_model": "conv2attn.modelio",
}

__all__ = [
    "ConversionReport",
    "ConvertOptions",
    "__version__",
    "convert",
    "load_model",
    "save_model",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'conv2attn' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
