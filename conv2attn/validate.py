"""Numerical parity of a converted model against its original, with onnxruntime.

The parity bound of the converter (fp32): ``max|diff| <= RTOL * max|reference| + ATOL``
on every output. Sessions run with onnxruntime's graph optimisations off unless asked
otherwise, so the runtime cannot hide or add differences.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from conv2attn.errors import InputError

# One float32 rounding of the largest output, with headroom for a different summation
# order of the same products (the projection sums what the Conv sums, in another order).
RTOL = 1e-5
ATOL = 1e-6


@dataclass(frozen=True)
class ParityError:
    """Difference between one reference output and the converted model's."""

    name: str
    max_abs: float
    max_reference: float
    mean_abs: float

    @property
    def max_rel(self) -> float:
        """Max absolute error relative to the output's largest magnitude."""
        return self.max_abs / self.max_reference if self.max_reference else self.max_abs

    def within(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        return self.max_abs <= rtol * self.max_reference + atol


def session(
    model: onnx.ModelProto | str | os.PathLike,
    providers: list[str] | None = None,
    optimize: bool = False,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])


def compare(name: str, reference: np.ndarray, actual: np.ndarray) -> ParityError:
    if reference.shape != actual.shape:
        raise InputError(
            f"output '{name}': shapes differ, {list(reference.shape)} vs {list(actual.shape)}"
        )
    ref = reference.astype(np.float64)
    diff = np.abs(ref - actual.astype(np.float64))
    return ParityError(
        name=name,
        max_abs=float(diff.max(initial=0.0)),
        max_reference=float(np.abs(ref).max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
    )


def parity(
    original: onnx.ModelProto | str | os.PathLike,
    converted: onnx.ModelProto | str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    optimize: bool = False,
) -> list[ParityError]:
    """Run both models on ``feeds``; the error of every output, in graph order."""
    reference_session = session(original, optimize=optimize)
    converted_session = session(converted, optimize=optimize)
    names = [o.name for o in reference_session.get_outputs()]
    reference = reference_session.run(None, dict(feeds))
    actual = converted_session.run(names, dict(feeds))
    return [compare(n, r, a) for n, r, a in zip(names, reference, actual)]
