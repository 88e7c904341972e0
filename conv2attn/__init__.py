"""conv2attn: turn the Conv nodes of a trained CNN into exactly equivalent attention.

Each Conv of an ONNX model becomes multi-head self-attention with a relative
positional encoding (Li et al., arXiv:2111.01353; Cordonnier et al., ICLR 2020).
"""

__version__ = "0.1.0"

from conv2attn.graph_pass import ConversionReport, ConvertOptions, convert
from conv2attn.modelio import load_model, save_model

__all__ = [
    "ConversionReport",
    "ConvertOptions",
    "__version__",
    "convert",
    "load_model",
    "save_model",
]
