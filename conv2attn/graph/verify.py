"""The last stage of the pass: the converted model must pass onnx's checks.

``onnx.checker`` always (on the model in memory, large weights checked one by one:
``modelio.check_model``); strict shape inference too whenever the input passed it (an
input with custom operators, say, is held to the structural check only), run on a
weightless skeleton.
"""

from __future__ import annotations

import os

import onnx

from conv2attn.errors import InputError, InternalError
from conv2attn.graph.shapes import skeleton
from conv2attn.modelio import check_model


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
    source: onnx.ModelProto | str | os.PathLike | None = None,
) -> None:
    """Check a converted model: in memory, or its file.

    ``strict``: also strict shape inference, which the output must pass whenever the
    input did; an input that fails it (custom ops, say) is held to the structural check
    only. For a file, ``in_memory`` is the model it was written from (``write_model``
    writes its exact bytes): that is checked instead, without parsing the file into a
    second copy (unless writing moved its weights to external data: then the files are
    checked). Shape inference runs on a weightless skeleton either way.

    ``source``: the model converted (a path or the caller's unchanged ModelProto; a
    file was checked when it was loaded, a ModelProto given to ``convert`` was not).
    Where the converted model fails with the very message that ``source`` fails the
    checker with, the fault came in with the input: InputError, not InternalError.
    """
    try:
        if isinstance(model, onnx.ModelProto):
            in_memory = model
        elif in_memory is not None and _moved_out(in_memory):
            in_memory = None  # written with external data: only the files hold it all
        if in_memory is not None:
            check_model(in_memory)
        else:
            onnx.checker.check_model(str(model))
        if strict:
            if in_memory is not None:
                onnx.shape_inference.infer_shapes(skeleton(in_memory), strict_mode=True)
            else:
                onnx.shape_inference.infer_shapes_path(str(model), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = _first_line(error)
        if source is not None and _structural_failure(source) == first:
            where = "the input model" if isinstance(source, onnx.ModelProto) else str(source)
            raise InputError(
                f"{where} fails onnx.checker before conversion too: {first} "
                "(fix or re-export it, then convert again)"
            ) from None
        raise InternalError(f"converted model fails onnx.checker: {first}") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def _structural_failure(source: onnx.ModelProto | str | os.PathLike) -> str | None:
    """The first line of what ``onnx.checker`` says of ``source``, or None if it passes."""
    try:
        if isinstance(source, onnx.ModelProto):
            check_model(source)
        else:
            onnx.checker.check_model(str(source))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return _first_line(error)
    return None


def _moved_out(model: onnx.ModelProto) -> bool:
    """Whether saving moved ``model``'s initializers into an external data file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
