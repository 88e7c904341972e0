"""Alias of ``conv2attn.trainable``, where the PyTorch layer lives.

The first release published the layer as ``conv2attn.torch``; scripts that import it from there keep
working. New code should import ``conv2attn.trainable``, whose name does not read as the
``torch`` package it builds on.
"""

from conv2attn.trainable import ConvAttention, conv_spec, convert_module, plan_for

__all__ = ["ConvAttention", "conv_spec", "convert_module", "plan_for"]
