"""Constant tensors as the pass reads them, and BatchNormalization folding.

Exporters do not always store a Conv's weight as a plain initializer: it may come from a
``Constant`` node, through ``Identity`` or ``Cast``, or from a ``DequantizeLinear`` of
constants (QDQ models). ``constant_values`` follows those chains; anything else is
computed at runtime and the Conv is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def constant_values(tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
    """Values of a tensor that is constant in the graph; None when computed at runtime.

    Follows ``Constant`` nodes and chains of ``Identity`` and ``Cast`` (exporters route
    deduplicated initializers through Identity).
    """
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) != 1 or depth > 16:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        value = producer.attrs.get("value")
        return np.asarray(value.values) if isinstance(value, gs.Constant) else None
    if producer.op in ("Identity", "Cast") and producer.inputs:
        values = constant_values(producer.inputs[0], depth + 1)
        if values is None or producer.op == "Identity":
            return values
        target = onnx.helper.tensor_dtype_to_np_dtype(int(producer.attrs["to"]))
        return values.astype(target)
    if producer.op == "DequantizeLinear" and producer.inputs:
        return _dequantized(producer, depth)
    return None


def _dequantized(node: gs.Node, depth: int) -> np.ndarray | None:
    """(x - zero_point) * scale of constant inputs, per tensor or along ``axis``, as the
    operator computes it in the scale's type (the difference of integers is exact)."""
    inputs = [t for t in node.inputs if t.name]
    parts = [constant_values(t, depth + 1) for t in inputs]
    if any(p is None for p in parts) or len(parts) < 2:
        return None
    x, scale = parts[0], parts[1]
    zero = parts[2] if len(parts) > 2 else np.zeros((), x.dtype)
    if scale.ndim > 1 or (scale.ndim == 1 and scale.size > 1 and "block_size" in node.attrs):
        return None  # blocked quantization: left at runtime
    shape = [1] * x.ndim
    if scale.ndim == 1 and scale.size > 1:
        axis = int(node.attrs.get("axis", 1)) % x.ndim
        shape[axis] = scale.size
    dtype = scale.dtype
    try:
        zero = zero.astype(np.float64).reshape(shape if zero.size > 1 else ())
        difference = (x.astype(np.float64) - zero).astype(dtype)
        return (difference * scale.reshape(shape if scale.size > 1 else ())).astype(dtype)
    except ValueError:  # shapes that do not fit: not a weight this pass can read
        return None


def fold_batchnorms(graph: gs.Graph) -> list[str]:
    """Fold each BatchNormalization that directly follows a Conv (its only consumer) into
    that Conv, exactly in float64 and then cast: w' = w * s, b' = (b - mean) * s + beta,
    s = gamma / sqrt(var + epsilon). Returns the names of the folded nodes."""
    folded = []
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.inputs) != 5 or len(bn.outputs) != 1:
            continue
        x = bn.inputs[0]
        if (
            len(x.inputs) != 1
            or x.inputs[0].op != "Conv"
            or len(x.outputs) != 1
            or x in graph.outputs
        ):
            continue
        conv = x.inputs[0]
        gamma, beta, mean, var = (constant_values(t) for t in bn.inputs[1:])
        weight = constant_values(conv.inputs[1])
        bias = (
            constant_values(conv.inputs[2])
            if len(conv.inputs) > 2 and conv.inputs[2].name
            else None
        )
        if any(v is None for v in (gamma, beta, mean, var, weight)) or (
            len(conv.inputs) > 2 and conv.inputs[2].name and bias is None
        ):
            continue
        if not all(v.shape == (weight.shape[0],) for v in (gamma, beta, mean, var)):
            continue
        epsilon = float(bn.attrs.get("epsilon", 1e-5))
        factor = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
        new_weight = weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))
        old_bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        new_bias = (old_bias - mean.astype(np.float64)) * factor + beta.astype(np.float64)
        name = conv.name or conv.outputs[0].name
        conv.inputs = [
            conv.inputs[0],
            gs.Constant(f"{name}/folded_bn/weight", new_weight.astype(weight.dtype)),
            gs.Constant(f"{name}/folded_bn/bias", new_bias.astype(weight.dtype)),
        ]
        output = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs = [output]
        folded.append(bn.name or output.name)
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folded
