"""TensorRT engines: build (or load from the cache), run on the GPU, per-layer times.

Written against TensorRT's Python API, version 10 and newer:

- TensorRT 10 builds with builder flags for the precision (``FP16``, ``BF16``, ``TF32``)
  and keeps the attention logits and Softmax of converted Convs in float32 with precision
  constraints (``docs/design.md`` section 2: fp16 logits would overflow).
- TensorRT 11 removed those flags and builds strongly typed networks, so for fp16/bf16 the
  model itself is cast first, with NVIDIA ModelOpt's AutoCast when installed (fp16 and
  bf16) or onnxruntime's float16 converter (fp16), keeping the logits and Softmax in fp32.

Engines may be cached in a folder, keyed by the model's bytes (external data included)
and everything that changes the engine: precision, workspace, input shapes, TensorRT
version, GPU. Device memory, streams and events come from PyTorch (``cuda_timing``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from conv2attn import names
from conv2attn.errors import InputError
from conv2attn.modelio import external_data_files, save_model, staged_file
from conv2attn.record import CONVERTED_OPS
from conv2attn.runtime.base import (
    BackendUnavailable,
    Device,
    LayerTime,
    RunnerRequest,
    cuda_torch,
    device_name,
    import_module,
)
from conv2attn.runtime.registry import BACKENDS, Backend

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max


def tensorrt(backend: str = "trt") -> ModuleType:
    """The tensorrt module (10 or newer), or why not."""
    trt = import_module("tensorrt", backend, BACKENDS[backend].needs)
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise BackendUnavailable(
            f"--backend {backend}: TensorRT {trt.__version__} is installed; 10 or newer is "
            f'needed: pip install -U "tensorrt>=10"'
        )
    return trt


def prepare(backend: Backend) -> Device:
    """Checks tensorrt and a CUDA torch (memory, streams and events come from it)."""
    tensorrt(backend.name)
    torch_module = cuda_torch(backend.name)
    return Device(device_name(True, torch_module), torch_module)


def create_runner(request: RunnerRequest) -> tuple[TrtRunner, bool]:
    """The engine of one model (built, or from ``--engine-cache``) ready to run."""
    trt = tensorrt(request.backend)
    torch_module = request.device.torch
    options = request.options
    settings = EngineSettings(
        request.precision,
        options.workspace_mb,
        optimization_shapes(request.model, request.feed, options.shape_ranges),
    )
    serialized, cached = load_or_build(
        trt,
        request.path,
        settings,
        options.engine_cache,
        request.device.name,
        request.per_layer,
    )
    return TrtRunner(trt, torch_module, serialized, request.feed, options.cuda_graph), cached


@dataclass(frozen=True)
class EngineSettings:
    """Everything besides the model that changes a built engine."""

    precision: str = "fp16"
    workspace_mb: int | None = None
    # per input: (min, opt, max) dims of the optimization profile
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )


def optimization_shapes(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    ranges: Mapping[str, ShapeRange] | None = None,
) -> dict[str, ShapeRange]:
    """One optimization profile for the dynamic inputs: ``ranges`` (trtexec's
    ``--minShapes/--optShapes/--maxShapes``) where given, else min = opt = max = the dims
    being timed. One engine then serves every size in the range."""
    shapes = {}
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value < 0 for d in dims):
            actual = tuple(int(d) for d in feeds[value.name].shape)
            shapes[value.name] = (ranges or {}).get(value.name, (actual, actual, actual))
    return shapes


def model_digest(path: str | os.PathLike) -> str:
    """sha256 of the model file and its external data files, in a fixed order."""
    path = Path(path)
    digest = hashlib.sha256()
    for part in [path, *external_data_files(path)]:
        digest.update(part.name.encode())
        with open(part, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(digest: str, settings: EngineSettings, trt_version: str, device: str) -> str:
    material = {
        "model": digest,
        "settings": asdict(settings),
        "tensorrt": trt_version,
        "device": device,
    }
    text = json.dumps(material, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def engine_cache_path(
    folder: str | os.PathLike,
    model_path: str | os.PathLike,
    settings: EngineSettings,
    trt_version: str,
    device: str,
) -> Path:
    """``<folder>/<model stem>-<precision>-<key>.engine``."""
    key = cache_key(model_digest(model_path), settings, trt_version, device)
    return Path(folder) / f"{Path(model_path).stem}-{settings.precision}-{key}.engine"


def describe_parser_errors(parser) -> str:
    """The parser's messages, each with the failing node when it names one."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = ""
        node_name = _call(error, "node_name")
        operator = _call(error, "node_operator")
        node = _call(error, "node")
        if node_name or operator:
            where = f"node '{node_name}' ({operator}): "
        elif node not in (None, -1):
            where = f"node #{node}: "
        lines.append(f"{where}{error.desc()}")
    return "; ".join(lines) or "the parser gave no message"


def _call(error, name: str):
    method = getattr(error, name, None)
    try:
        return method() if callable(method) else None
    except Exception:  # older parsers raise for fields they do not record
        return None


def tensorrt_major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def cast_for_strong_typing(path: Path, precision: str, folder: Path) -> Path:
    """The model cast to fp16/bf16 for TensorRT 11's strongly typed build, logits and
    Softmax kept in float32; written under ``folder``."""
    model = onnx.load(str(path))
    keep = [n.name for n in model.graph.node if names.keeps_float32(n.name)]
    target = folder / f"{path.stem}.{precision}.onnx"
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        convert_to_mixed_precision = None
    if convert_to_mixed_precision is not None:
        cast = convert_to_mixed_precision(
            onnx_path=str(path),
            low_precision_type=precision,
            keep_io_types=True,
            nodes_to_exclude=[re.escape(name) for name in keep],
            op_types_to_exclude=["Softmax"],
        )
    elif precision == "fp16":
        cast = cast_to_float16(model, keep)
    else:
        raise BackendUnavailable(
            "--precision bf16 on TensorRT 11 needs a bf16 model: pip install nvidia-modelopt "
            "(its AutoCast casts the model), or use --precision fp16"
        )
    save_model(cast, target)
    return target


def cast_to_float16(model: onnx.ModelProto, keep: Sequence[str] = ()) -> onnx.ModelProto:
    """fp16 weights and activations with fp32 inputs and outputs, by onnxruntime's
    converter; Softmax and the nodes named in ``keep`` stay float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    cast = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Softmax"],
        node_block_list=list(keep),
    )
    return without_repeated_nodes(cast)


def without_repeated_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each node that repeats an earlier one exactly dropped, and each
    repeated value_info with it.

    onnxruntime's float16 converter before 1.32 casts an fp16 tensor back to fp32 once
    per use by a node kept in fp32 (a square, ``Mul(d, d)``, uses it twice), and each of
    those Casts has the same name and output: a graph no runtime loads. They compute the
    same tensor, so one is kept."""
    graph = model.graph
    nodes = list(dict.fromkeys(n.SerializeToString(deterministic=True) for n in graph.node))
    values: dict[str, bytes] = {}
    for value in graph.value_info:
        values.setdefault(value.name, value.SerializeToString())
    if len(nodes) == len(graph.node) and len(values) == len(graph.value_info):
        return model
    del graph.node[:]
    graph.node.extend(onnx.NodeProto.FromString(node) for node in nodes)
    del graph.value_info[:]
    graph.value_info.extend(onnx.ValueInfoProto.FromString(value) for value in values.values())
    return model


def build_engine(
    trt: ModuleType,
    path: Path,
    settings: EngineSettings,
    per_layer: bool,
) -> bytes:
    """Parse ``path`` and build a serialized engine; errors name what failed."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = tensorrt_major(trt)
    # The parser owns the weights, and a cast model lives in the folder: both must
    # outlive the build.
    with tempfile.TemporaryDirectory(prefix="conv2attn-trt-") as folder:
        source = path
        if major >= 11 and settings.precision in ("fp16", "bf16"):
            source = cast_for_strong_typing(path, settings.precision, Path(folder))
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            raise InputError(f"{path}: TensorRT cannot parse it: {describe_parser_errors(parser)}")
        config = builder.create_builder_config()
        if settings.workspace_mb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
        if per_layer:
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if major < 11:
            _set_precision(trt, network, config, settings.precision)
        elif settings.precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
        if settings.shapes:
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in settings.shapes.items():
                profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        del parser
    if serialized is None:
        raise InputError(
            f"{path}: TensorRT could not build an engine at {settings.precision} (its log "
            f"above says why; try a larger --workspace or another --precision)"
        )
    return bytes(serialized)


def _set_precision(trt: ModuleType, network, config, precision: str) -> None:
    """TensorRT 10: precision flags, with converted Convs' logits pinned to float32."""
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
        return
    config.set_flag(trt.BuilderFlag.TF32)
    if precision == "tf32":
        return
    config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    floats = (trt.float32, trt.float16, trt.bfloat16)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if not names.keeps_float32(layer.name):
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in floats:
                layer.set_output_type(output, trt.float32)


def load_or_build(
    trt: ModuleType,
    path: Path,
    settings: EngineSettings,
    cache: Path | None,
    device: str,
    per_layer: bool,
) -> tuple[bytes, bool]:
    """The serialized engine and whether it came from the cache (written atomically)."""
    target = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        target = engine_cache_path(cache, path, settings, trt.__version__, device)
        if per_layer:
            target = target.with_name(target.stem + "-detailed.engine")
        if target.exists():
            return target.read_bytes(), True
    engine = build_engine(trt, path, settings, per_layer)
    if target is not None:
        with staged_file(target) as staged:
            staged.write_bytes(engine)
    return engine, False


def layer_owner(layer: str, prefixes: Sequence[tuple[str, str]]) -> str | None:
    """The converted Conv(s) a TensorRT layer belongs to, from the ONNX node names in its
    name (fused layers join several: ``a/attn/MatMul + a/attn/proj/Add``); None for
    layers of other nodes. ``prefixes`` pairs a name pattern with its source Conv,
    longest first, so a name never claims part of a longer one."""
    found: dict[str, int] = {}
    claimed: list[tuple[int, int]] = []
    for pattern, owner in prefixes:
        for match in re.finditer(re.escape(pattern), layer):
            start, end = match.span()
            if any(a <= start < b for a, b in claimed):
                continue
            before = layer[start - 1] if start else " "
            after = layer[end] if end < len(layer) else " "
            whole = pattern.endswith("/") or not (after.isalnum() or after in "_.")
            whole = whole and not (before.isalnum() or before in "_./")
            if whole:
                claimed.append((start, end))
                found.setdefault(owner, start)
    return " + ".join(sorted(found, key=found.get)) if found else None


def layer_prefixes(
    record: Sequence[dict], original: onnx.ModelProto | None = None
) -> list[tuple[str, str]]:
    """Name patterns of each converted Conv: ``<conv>/attn/`` in a converted model; in the
    original model, the Conv node's name and output tensor."""
    if original is None:
        pairs = [(names.owner_prefix(layer["name"]), layer["name"]) for layer in record]
    else:
        by_output = {layer["output"]: layer["name"] for layer in record}
        pairs = []
        for node in original.graph.node:
            if node.op_type in CONVERTED_OPS and node.output[0] in by_output:
                owner = by_output[node.output[0]]
                pairs += [(name, owner) for name in (node.name, node.output[0]) if name]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


class TrtRunner:
    """A built engine with its inputs and outputs on the GPU, timed on a CUDA stream."""

    def __init__(
        self,
        trt: ModuleType,
        torch: ModuleType,
        engine_bytes: bytes,
        feeds: Mapping[str, np.ndarray],
        cuda_graph: bool = False,
    ):
        from conv2attn.runtime.cuda_timing import CudaTimer

        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise InputError("TensorRT could not load the engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        self.tensors: dict[str, object] = {}
        self.output_names: list[str] = []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                value = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
                self.context.set_input_shape(name, tuple(value.shape))
                self.tensors[name] = value
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch_dtype(torch, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))))
            self.tensors[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.output_names.append(name)
        for name, tensor in self.tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.timer = CudaTimer(torch, self._enqueue, cuda_graph)

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.torch.cuda.current_stream().cuda_stream):
            raise InputError("TensorRT failed to run the engine")

    def run(self) -> None:
        self.timer.run()

    def timed_block(self, count: int) -> list[float]:
        return self.timer.timed_block(count)

    def outputs(self) -> list[np.ndarray]:
        self.timer.run()
        return [self.tensors[name].float().cpu().numpy() for name in self.output_names]

    def layer_times(
        self, runs: int, layers: Sequence[dict], original: onnx.ModelProto | None
    ) -> list[LayerTime]:
        """Time per source Conv, from TensorRT's layer profiler; a fused layer that spans
        several Convs is shown as ``a + b``."""
        prefixes = layer_prefixes(layers, original)
        rest = "(other layers)"
        totals: Counter[str] = Counter()
        for layer, ms in self.engine_layer_times(runs).items():
            totals[layer_owner(layer, prefixes) or rest] += ms
        total = sum(totals.values()) or 1
        return [
            LayerTime(name, ms, ms / total)
            for name, ms in sorted(totals.items(), key=lambda item: -item[1])
        ]

    def engine_layer_times(self, runs: int) -> dict[str, float]:
        """Milliseconds per run of each engine layer, from TensorRT's profiler."""
        trt = self.trt
        totals: dict[str, float] = {}

        class Profiler(trt.IProfiler):
            def __init__(self):
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                totals[layer_name] = totals.get(layer_name, 0.0) + ms

        self.context.profiler = Profiler()
        stream = self.timer.stream
        with self.torch.cuda.stream(stream):
            for _ in range(runs):
                self._enqueue()
                stream.synchronize()
        return {name: ms / runs for name, ms in totals.items()}


def torch_dtype(torch: ModuleType, dtype: np.dtype):
    return {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float16): torch.float16,
        np.dtype(np.int32): torch.int32,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.int8): torch.int8,
        np.dtype(np.bool_): torch.bool,
    }[np.dtype(dtype)]
