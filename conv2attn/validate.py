"""Numerical parity of a converted model against its original, with onnxruntime.

The parity bound of the converter (fp32): ``max|diff| <= RTOL * max|reference| + ATOL``
on every output. Sessions run with onnxruntime's graph optimisations off unless asked
otherwise, so the runtime cannot hide or add differences.

``check`` runs both models on the same samples and reports, per output, the largest and
mean errors, the agreement of classifier outputs, accuracy against labels, and, per
converted Conv, the error of its replacement (the converted model keeps each Conv's
output tensor name, and records the mapping in its metadata).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from conv2attn.core.geometry import grid_tokens_to_channels_first, pixels_shape_of
from conv2attn.core.weights import unsigned_weights
from conv2attn.errors import InputError
from conv2attn.inputs import Samples, graph_inputs
from conv2attn.items import expose_items, item_output_counts, merge_items, withdraw_items
from conv2attn.modelio import PROTOBUF_LIMIT, model_size
from conv2attn.record import converted_layers

# One float32 rounding of the largest output, with headroom for a different summation
# order of the same products (the projection sums what the Conv sums, in another order).
RTOL = 1e-5
ATOL = 1e-6
# Float16 outputs of a whole network: each layer rounds to 11 bits, and a different
# summation order changes which way; the differences add up over the layers.
RTOL_FLOAT16 = 1e-2
ATOL_FLOAT16 = 1e-3


def default_tolerance(dtype: np.dtype) -> tuple[float, float]:
    """Float32: the converter's bound; float16: its own; integers (quantized models):
    none, since integer attention is bit-identical."""
    if np.dtype(dtype).kind in "iub":
        return 0.0, 0.0
    if np.dtype(dtype).itemsize <= 2:
        return RTOL_FLOAT16, ATOL_FLOAT16
    return RTOL, ATOL


@dataclass(frozen=True)
class ParityError:
    """Difference between one reference output and the converted model's."""

    name: str
    max_abs: float
    max_reference: float
    mean_abs: float
    # Inf and NaN are counted, not subtracted: the errors above are over the positions
    # finite in both outputs, and a position non-finite in one output only (or NaN in
    # one and Inf in the other) is a mismatch.
    nonfinite_reference: int = 0
    nonfinite_actual: int = 0
    mismatched: int = 0

    @property
    def max_rel(self) -> float:
        """Max absolute error relative to the output's largest magnitude."""
        return self.max_abs / self.max_reference if self.max_reference else self.max_abs

    def within(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        return self.mismatched == 0 and self.max_abs <= rtol * self.max_reference + atol


def session(
    model: onnx.ModelProto | str | os.PathLike,
    providers: list[str] | None = None,
    optimize: bool = False,
    threads: int = 0,
    profile_prefix: str | None = None,
    provider_options: list[dict] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for a file or a ModelProto (one of 2 GiB or more goes
    through a temporary file, since protobuf cannot serialise it). ``optimize``: the
    runtime's graph optimisations, off by default so it neither hides nor adds
    differences; ``threads``: intra-op threads (0: onnxruntime's default);
    ``profile_prefix``: record a node profile; ``provider_options``: one dict per
    provider. A model onnxruntime refuses is an InputError."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = providers or ["CPUExecutionProvider"]
    extra = {} if provider_options is None else {"provider_options": provider_options}
    name = "the model" if isinstance(model, onnx.ModelProto) else str(model)
    try:
        if not isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(str(model), options, providers=providers, **extra)
        if model_size(model) < PROTOBUF_LIMIT:
            return ort.InferenceSession(
                model.SerializeToString(), options, providers=providers, **extra
            )
        with tempfile.TemporaryDirectory(prefix="conv2attn-") as folder:
            path = Path(folder) / "model.onnx"
            onnx.save_model(
                copy.deepcopy(model),
                str(path),
                save_as_external_data=True,
                location="model.onnx.data",
            )
            return ort.InferenceSession(str(path), options, providers=providers, **extra)
    except Exception as error:  # onnxruntime raises its own exception types
        first = " ".join(str(error).split())[:300]
        raise InputError(f"{name}: onnxruntime cannot load it: {first}") from None


def compare(name: str, reference: np.ndarray, actual: np.ndarray) -> ParityError:
    if reference.shape != actual.shape:
        raise InputError(
            f"output '{name}': shapes differ, {list(reference.shape)} vs {list(actual.shape)}"
        )
    ref = reference.astype(np.float64)
    act = actual.astype(np.float64)
    finite_ref, finite_act = np.isfinite(ref), np.isfinite(act)
    both = finite_ref & finite_act
    same_nonfinite = ~finite_ref & ~finite_act & ((ref == act) | (np.isnan(ref) & np.isnan(act)))
    diff = np.abs(ref[both] - act[both])
    return ParityError(
        name=name,
        max_abs=float(diff.max(initial=0.0)),
        max_reference=float(np.abs(ref[finite_ref]).max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        nonfinite_reference=int((~finite_ref).sum()),
        nonfinite_actual=int((~finite_act).sum()),
        mismatched=int((~both & ~same_nonfinite).sum()),
    )


@dataclass(frozen=True)
class OutputCheck:
    """One model output: errors, the bound it is held to, and classifier agreement."""

    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    max_reference: float
    rtol: float
    atol: float
    within: bool
    top1_agreement: float | None = None
    topk_agreement: float | None = None
    k: int | None = None
    nonfinite_original: int = 0
    nonfinite_converted: int = 0


@dataclass(frozen=True)
class LayerCheck:
    """A converted Conv: its original output against its replacement's."""

    name: str
    output: str
    max_abs: float
    max_rel: float
    mean_abs: float
    within: bool
    nonfinite_original: int = 0
    nonfinite_converted: int = 0


@dataclass(frozen=True)
class Accuracy:
    output: str
    samples: int
    original: float
    converted: float
    changed: int


@dataclass
class CheckReport:
    """What ``check`` found; ``to_dict`` is the JSON form (``--json``)."""

    original: str
    converted: str
    source: str
    samples: int
    provider: str
    outputs: list[OutputCheck]
    layers: list[LayerCheck] | None = None
    accuracy: Accuracy | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.within for o in self.outputs)

    @property
    def first_failing_layer(self) -> LayerCheck | None:
        return next((layer for layer in self.layers or [] if not layer.within), None)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        failing = self.first_failing_layer
        data["first_failing_layer"] = failing.name if failing else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CheckReport:
        """The report back from ``to_dict`` (``check --json``); KeyError or TypeError when
        ``data`` is not one."""
        layers = data.get("layers")
        accuracy = data.get("accuracy")
        return cls(
            original=data["original"],
            converted=data["converted"],
            source=data["source"],
            samples=data["samples"],
            provider=data["provider"],
            outputs=[OutputCheck(**o) for o in data["outputs"]],
            layers=None if layers is None else [LayerCheck(**layer) for layer in layers],
            accuracy=None if accuracy is None else Accuracy(**accuracy),
            notes=list(data.get("notes", [])),
        )


@contextmanager
def _fetching(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """``model`` with ``names`` as extra outputs for the block, as it was afterwards:
    the caller's model is never left changed (and never copied: it may be large)."""
    existing = {o.name for o in model.graph.output}
    added = [name for name in dict.fromkeys(names) if name not in existing]
    count = len(model.graph.output)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in added)
    try:
        yield model
    finally:
        del model.graph.output[count:]


@contextmanager
def _fetching_items(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[list[str]]:
    """What to fetch for ``names``: each name, or where the per-item Scan's body computes
    it (``graph.per_item``), the Scan's stack of it, exposed for the block."""
    counts = item_output_counts(model)
    exposed = expose_items(model, names)
    try:
        yield [exposed.get(name, name) for name in names]
    finally:
        withdraw_items(model, exposed, counts)


def _classifier_agreement(reference: np.ndarray, actual: np.ndarray) -> tuple[float, float, int]:
    """Share of samples with the same top-1 class, and with the same top-k set (k <= 5)."""
    k = min(5, reference.shape[1])
    same_top1 = reference.argmax(1) == actual.argmax(1)
    top_ref = np.sort(np.argsort(-reference, axis=1, kind="stable")[:, :k], axis=1)
    top_act = np.sort(np.argsort(-actual, axis=1, kind="stable")[:, :k], axis=1)
    same_topk = (top_ref == top_act).all(axis=1)
    return float(same_top1.mean()), float(same_topk.mean()), k


def _describe(graph_input) -> str:
    dims = "x".join("?" if d is None else str(d) for d in graph_input.dims)
    return f"{graph_input.name} {graph_input.dtype} [{dims}]"


def _check_same_inputs(
    original: onnx.ModelProto, converted: onnx.ModelProto, names: tuple[str, str]
) -> None:
    """Both models must take the same inputs: names, dtypes and every fixed dim."""
    first = {i.name: i for i in graph_inputs(original)}
    second = {i.name: i for i in graph_inputs(converted)}

    def compatible(a, b) -> bool:
        return (
            a.dtype == b.dtype
            and len(a.dims) == len(b.dims)
            and all(x is None or y is None or x == y for x, y in zip(a.dims, b.dims))
        )

    if first.keys() != second.keys() or not all(compatible(first[n], second[n]) for n in first):
        raise InputError(
            f"the models do not match: {names[0]} takes "
            f"{', '.join(map(_describe, first.values()))}; {names[1]} takes "
            f"{', '.join(map(_describe, second.values()))}"
        )


# What onnxruntime raises when a model cannot run on the inputs it was given (its own
# exception types, which do not derive from RuntimeError).
_STATE = ort.capi.onnxruntime_pybind11_state
RUN_ERRORS = (
    _STATE.Fail,
    _STATE.InvalidArgument,
    _STATE.RuntimeException,
    _STATE.NotImplemented,
    _STATE.EPFail,
    RuntimeError,
)


def run_session(
    runner: ort.InferenceSession, fetch: list[str] | None, feeds: dict, name: str
) -> list:
    """``runner.run``; inputs the model cannot take are an InputError naming the model."""
    try:
        return runner.run(fetch, feeds)
    except RUN_ERRORS as error:
        first = " ".join(str(error).split())
        raise InputError(f"{name}: onnxruntime refused the inputs: {first}") from None


def _check_models_match(
    original: onnx.ModelProto, converted: onnx.ModelProto, names: tuple[str, str], provider: str
) -> None:
    _check_same_inputs(original, converted, names)
    if len(original.graph.output) != len(converted.graph.output):
        raise InputError(
            f"the models do not match: {names[0]} has {len(original.graph.output)} outputs, "
            f"{names[1]} has {len(converted.graph.output)}"
        )
    if provider not in ort.get_available_providers():
        available = ", ".join(ort.get_available_providers())
        raise InputError(f"--provider {provider} is not installed (available: {available})")


def _layers_to_compare(
    converted: onnx.ModelProto, per_layer: bool, name: str
) -> tuple[list[dict], list[str]]:
    """The recorded layers whose outputs can be fetched, and notes on the others."""
    layers = converted_layers(converted) if per_layer else []
    notes = []
    if per_layer and not layers:
        notes.append(f"{name} has no conversion record: no per-layer errors")
    nested = [layer for layer in layers if layer.get("graph")]
    if nested:
        # Tensors inside If/Loop/Scan bodies cannot be graph outputs; the model's
        # outputs cover those layers.
        layers = [layer for layer in layers if not layer.get("graph")]
        notes.append(
            f"{len(nested)} converted Conv(s) inside control-flow bodies "
            f"({', '.join(layer['name'] for layer in nested[:3])}"
            f"{', ...' if len(nested) > 3 else ''}) are checked through the model outputs only"
        )
    return layers, notes


# Integer Convs' inputs by position: x, its zero point, w, its zero point.
_INTEGER_CONV_INPUTS = {"ConvInteger": (0, 2, 1, 3), "QLinearConv": (0, 2, 3, 5)}


def exact_integer_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the int8 weights of its integer Convs over uint8 inputs held as
    uint8 (``weights.unsigned_weights``), or ``model`` itself where it has none: where
    onnxruntime's uint8-by-int8 kernels saturate, its run of the original departs from
    the ONNX definition. The check runs originals in this form, so that both models are
    held to the definition."""
    weights = {t.name: t for t in model.graph.initializer}
    uint8 = _uint8_tensors(model)
    indices = [
        index
        for index, node in enumerate(model.graph.node)
        if node.op_type in _INTEGER_CONV_INPUTS
        and _is_uint8_input(node, weights, uint8)
        and _holds_int8_weight(node, weights)
    ]
    if not indices:
        return model
    model = copy.deepcopy(model)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    for index in indices:
        node = graph.node[index]
        _, _, w_at, zero_at = _INTEGER_CONV_INPUTS[node.op_type]
        weight = onnx.numpy_helper.to_array(weights[node.input[w_at]])
        zero = (
            onnx.numpy_helper.to_array(weights[node.input[zero_at]])
            if len(node.input) > zero_at and node.input[zero_at] in weights
            else np.zeros((), np.int8)
        )
        for position, values in zip((w_at, zero_at), unsigned_weights(weight, zero)):
            name = f"{node.output[0]}/uint8_{position}"
            graph.initializer.append(onnx.numpy_helper.from_array(values, name))
            while len(node.input) <= position:
                node.input.append("")
            node.input[position] = name
    return model


def _uint8_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of tensors known to be uint8: typed inputs and values, and the outputs of
    the quantizers that make them."""
    names = {
        v.name
        for v in [*model.graph.input, *model.graph.value_info]
        if v.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    }
    for node in model.graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            names.add(node.output[0])
    return names


def _is_uint8_input(node: onnx.NodeProto, weights: dict, uint8: set[str]) -> bool:
    x_at, x_zero_at, _, _ = _INTEGER_CONV_INPUTS[node.op_type]
    if len(node.input) > x_zero_at and node.input[x_zero_at] in weights:
        return weights[node.input[x_zero_at]].data_type == onnx.TensorProto.UINT8
    return node.input[x_at] in uint8


def _holds_int8_weight(node: onnx.NodeProto, weights: dict) -> bool:
    """Whether the node's weight is int8 and held in the model (not as external data)."""
    tensor = weights.get(node.input[_INTEGER_CONV_INPUTS[node.op_type][2]])
    return (
        tensor is not None
        and tensor.data_type == onnx.TensorProto.INT8
        and tensor.data_location != onnx.TensorProto.EXTERNAL
    )


def _run_both(
    models: tuple[onnx.ModelProto, onnx.ModelProto],
    fetches: tuple[list[str], list[str]],
    samples: Samples,
    provider: str,
    batch_size: int,
    names: tuple[str, str],
    progress: Callable[[int, int, str], None] | None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Both models' fetched tensors over every sample, concatenated along the batch."""
    providers = (
        [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    )
    sessions = [session(exact_integer_convs(model), providers) for model in models]
    fixed = [
        i.dims[0]
        for model in models
        for i in graph_inputs(model)
        if i.dims and i.dims[0] is not None
    ]
    step = fixed[0] if fixed else batch_size
    results: list[list[list[np.ndarray]]] = [[[] for _ in fetch] for fetch in fetches]
    for done, feeds in enumerate(samples.batches(step)):
        if progress is not None:
            progress(done * step, samples.count, "samples")
        for store, runner, fetch, name in zip(results, sessions, fetches, names):
            for index, array in enumerate(run_session(runner, fetch, feeds, name)):
                store[index].append(array)
    reference, actual = ([np.concatenate(parts) for parts in store] for store in results)
    return reference, actual


def _tolerance(dtype: np.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    bound = default_tolerance(dtype)
    return (bound[0] if rtol is None else rtol), (bound[1] if atol is None else atol)


def _output_check(
    name: str, ref: np.ndarray, act: np.ndarray, rtol: float | None, atol: float | None
) -> OutputCheck:
    r, a = _tolerance(ref.dtype, rtol, atol)
    error = compare(name, ref, act)
    extra = {}
    if ref.ndim == 2 and ref.shape[1] >= 2:
        top1, topk, k = _classifier_agreement(ref, act)
        extra = {"top1_agreement": top1, "topk_agreement": topk, "k": k}
    return OutputCheck(
        name,
        error.max_abs,
        error.max_rel,
        error.mean_abs,
        error.max_reference,
        r,
        a,
        error.within(r, a),
        **extra,
        nonfinite_original=error.nonfinite_reference,
        nonfinite_converted=error.nonfinite_actual,
    )


def _held(layer: dict) -> list[str]:
    """The tensors of the converted model that hold a layer's output."""
    if layer.get("output_tiles"):
        return [name for name, _ in layer["output_tiles"]]
    return [layer.get("output_channels_last") or layer["output"]]


def _joined(layer: dict, arrays: list[np.ndarray], grid: Sequence[int]) -> np.ndarray:
    """A layer's output from the tensors ``_held`` names: the one, or its tiles
    ``[B, ..rows.., C]`` joined along their rows into channels-last ``[B, *grid, C]``
    (``grid``: the original Conv's output size)."""
    if not layer.get("output_tiles"):
        (values,) = arrays
        return values
    batch, channels = arrays[0].shape[0], arrays[0].shape[-1]
    rows = np.concatenate([a.reshape(batch, -1, channels) for a in arrays], axis=1)
    return rows.reshape(batch, *grid, channels)


def _as_nchw(layer: dict, values: np.ndarray) -> np.ndarray:
    """A layer's output as the original Conv's NCHW tensor (un-patchified here, in the
    check, when the converted model keeps it channels-last; without the zero token that
    the next layer's padding appended to it, and without the constant channel that
    carries biases onwards, where the layer writes one)."""
    nchw = values
    patch = layer.get("output_patch")
    grid = layer.get("output_zero_token")
    if grid:  # tokens [B, N + 1, C], the last one the next layer's zero token
        values = values[:, :-1].reshape(values.shape[0], *grid, values.shape[-1])
        nchw = values
    if layer.get("output_channels_last") and patch:  # [B, T1, T2, P1, P2, C] tokens
        nchw = values.transpose(grid_tokens_to_channels_first(len(patch)))
        nchw = nchw.reshape(pixels_shape_of(nchw.shape, len(patch)))
    elif layer.get("output_channels_last"):
        nchw = values.transpose(0, values.ndim - 1, *range(1, values.ndim - 1))
    if layer.get("bias_channel_out") is not None:
        nchw = nchw[:, :-1]
    return nchw


def _layer_check(
    layer: dict, ref: np.ndarray, act: np.ndarray, rtol: float | None, atol: float | None
) -> LayerCheck:
    error = compare(layer["output"], ref, act)
    within = error.within(*_tolerance(ref.dtype, rtol, atol))
    return LayerCheck(
        layer["name"],
        layer["output"],
        error.max_abs,
        error.max_rel,
        error.mean_abs,
        within,
        error.nonfinite_reference,
        error.nonfinite_actual,
    )


def _accuracy(
    outputs: list[OutputCheck],
    reference: list[np.ndarray],
    actual: list[np.ndarray],
    labels: np.ndarray,
    notes: list[str],
) -> Accuracy | None:
    """Both models' top-1 accuracy on the first classifier output, against ``labels``."""
    classifier = next((i for i, o in enumerate(outputs) if o.top1_agreement is not None), None)
    if classifier is None:
        notes.append("labels given, but no output is [batch, classes]: no accuracy")
        return None
    ref_pred = reference[classifier].argmax(1)
    act_pred = actual[classifier].argmax(1)
    if len(ref_pred) != len(labels):
        raise InputError(
            f"{len(labels)} labels for {len(ref_pred)} predictions of output "
            f"'{outputs[classifier].name}'"
        )
    return Accuracy(
        output=outputs[classifier].name,
        samples=len(labels),
        original=float((ref_pred == labels).mean()),
        converted=float((act_pred == labels).mean()),
        changed=int((ref_pred != act_pred).sum()),
    )


def _nonfinite_notes(samples: Samples, outputs: list[OutputCheck]) -> list[str]:
    """What Inf and NaN values in the inputs and outputs mean for the figures above."""
    notes = []
    bad = sum(int((~np.isfinite(a)).sum()) for a in samples.feeds.values() if a.dtype.kind == "f")
    if bad:
        notes.append(
            f"the inputs hold {bad} Inf/NaN values: attention multiplies every token by its "
            "(zero or one) weight, and 0 x Inf is NaN, so a non-finite input reaches every "
            "output of a converted layer where the Conv keeps it local (a limit of attention "
            "as a matrix product; see the README)"
        )
    for o in outputs:
        if o.nonfinite_original or o.nonfinite_converted:
            notes.append(
                f"output '{o.name}': {o.nonfinite_original} Inf/NaN values in the original, "
                f"{o.nonfinite_converted} in the converted model; the errors are over the "
                "values finite in both, and within needs the Inf/NaN values to match"
            )
    return notes


def check(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    samples: Samples,
    *,
    names: tuple[str, str] = ("original", "converted"),
    rtol: float | None = None,
    atol: float | None = None,
    provider: str = "CPUExecutionProvider",
    per_layer: bool = False,
    batch_size: int = 16,
    progress: Callable[[int, int, str], None] | None = None,
) -> CheckReport:
    """Run both models on ``samples`` and compare them; see the module docstring."""
    _check_models_match(original, converted, names, provider)
    output_names = [o.name for o in original.graph.output]
    converted_names = [o.name for o in converted.graph.output]
    layers, notes = _layers_to_compare(converted, per_layer, names[1])
    layer_tensors = [layer["output"] for layer in layers]
    # a layer whose output stays channels-last or patch tokens (--layout channels-last) is
    # read there, and one that exists only as tiles (graph.tiles) as its tiles
    held_by_layer = [_held(layer) for layer in layers]
    held = [name for tensors in held_by_layer for name in tensors]
    with (
        _fetching(original, layer_tensors),
        _fetching_items(converted, held) as fetched,
        _fetching(converted, fetched),
    ):
        reference, actual = _run_both(
            (original, converted),
            (output_names + layer_tensors, converted_names + fetched),
            samples,
            provider,
            batch_size,
            names,
            progress,
        )
    # tensors of the per-item stretch come stacked per item: merged as the graph does
    actual = [
        merge_items(array) if name != wanted else array
        for array, name, wanted in zip(actual, converted_names + fetched, converted_names + held)
    ]
    outputs = [
        _output_check(name, reference[index], actual[index], rtol, atol)
        for index, name in enumerate(output_names)
    ]
    first = len(output_names)
    layer_outputs, at = [], len(converted_names)
    for names_held in held_by_layer:
        layer_outputs.append(actual[at : at + len(names_held)])
        at += len(names_held)
    layer_checks = [
        _layer_check(
            layer,
            reference[first + offset],
            _as_nchw(layer, _joined(layer, held_arrays, reference[first + offset].shape[2:])),
            rtol,
            atol,
        )
        for offset, (layer, held_arrays) in enumerate(zip(layers, layer_outputs))
    ] or None
    accuracy = None
    if samples.labels is not None:
        accuracy = _accuracy(outputs, reference, actual, samples.labels, notes)
    notes += _nonfinite_notes(samples, outputs)
    return CheckReport(
        original=names[0],
        converted=names[1],
        source=samples.source,
        samples=samples.count,
        provider=provider,
        outputs=outputs,
        layers=layer_checks,
        accuracy=accuracy,
        notes=notes,
    )
