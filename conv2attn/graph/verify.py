"""The last stage of the pass: the converted model must pass onnx's checks.

``onnx.checker`` always; strict shape inference too whenever the input passed it (an
input with custom operators, say, is held to the structural check only). A file of any
size is checked from disk, its shape inference run on a weightless skeleton.
"""

from __future__ import annotations

import os

import onnx

from conv2attn.errors import InternalError
from conv2attn.graph.shapes import skeleton


def passes_strict_inference(model: onnx.ModelProto) -> bool:
    """Whether strict shape inference accepts ``model`` (a skeleton is enough)."""
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return False
    return True


def verify(
    model: onnx.ModelProto | str | os.PathLike,
    strict: bool,
    in_memory: onnx.ModelProto | None = None,
) -> None:
    """Check a converted model: in memory, or a file (any size).

    ``strict``: also strict shape inference, which the output must pass whenever the
    input did; an input that fails it (custom ops, say) is held to the structural check
    only. For a file, ``in_memory`` (the same model) lets shape inference run on its
    weightless skeleton instead of on another full copy.
    """
    try:
        if isinstance(model, onnx.ModelProto):
            onnx.checker.check_model(model, full_check=strict)
            return
        onnx.checker.check_model(str(model))
        if strict:
            if in_memory is not None:
                onnx.shape_inference.infer_shapes(skeleton(in_memory), strict_mode=True)
            else:
                onnx.shape_inference.infer_shapes_path(str(model), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0]
        raise InternalError(f"converted model fails onnx.checker: {first}") from None
