"""Latency of models side by side on a backend, and where the time goes.

Models are timed in one process, alternating in blocks of runs; the first run of each
block is dropped, so a large model evicting a small one's weights from the caches does
not count against the small one (strict A/B interleaving skews ratios that way).
Backends (``backends.BACKENDS``): onnxruntime on the CPU (full graph optimisations, as a
deployment would), onnxruntime's CUDA and TensorRT providers (inputs and outputs bound
on the device), TensorRT engines (``tensorrt_engine``) and PyTorch (``torch_runtime``);
GPU runs are timed with CUDA events (``cuda_timing``) and their outputs compared with
onnxruntime's CPU float32 outputs under a bound set by the precision.

``--per-layer`` adds up the kernel time of every node of a converted Conv (nodes named
``<conv>/attn/...``, listed in the conversion metadata): from onnxruntime's node profile
on the CPU, from TensorRT's layer profiler with ``trt``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from conv2attn import backends
from conv2attn.errors import InputError
from conv2attn.inputs import graph_inputs, random_samples
from conv2attn.validate import compare, converted_layers, session

# max|engine - onnxruntime CPU fp32| <= rtol * max|reference| + atol, per precision.
# fp32: another summation order and other kernels (cuDNN's Winograd among them), so
# 10x the converter's own CPU bound. tf32 and fp16 keep 10-11 mantissa bits (one
# rounding ~5e-4 relative) and bf16 8 (~4e-3); a network's layers add them up.
PRECISION_TOLERANCE = {
    "fp32": (1e-4, 1e-5),
    "tf32": (1e-2, 1e-3),
    "fp16": (2e-2, 2e-3),
    "bf16": (1e-1, 1e-2),
}
BACKEND_PRECISIONS = {
    "ort-cpu": ("fp32",),
    "ort-cuda": ("fp32", "tf32"),
    "ort-trt": ("fp32", "fp16"),
    "trt": backends.PRECISIONS,
    "torch-cuda": backends.PRECISIONS,
}


@dataclass(frozen=True)
class LatencyStats:
    """Per-run latency of one model; ``throughput`` is samples per second at the median."""

    runs: int
    batch: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float


def latency_stats(seconds: Sequence[float], batch: int) -> LatencyStats:
    if not seconds:
        raise ValueError("no timed runs")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    return LatencyStats(
        runs=len(ms),
        batch=batch,
        median_ms=median,
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        throughput=batch * 1e3 / median,
    )


@dataclass(frozen=True)
class LayerTime:
    """Kernel time of one converted Conv's nodes (or of everything else)."""

    name: str
    ms: float
    share: float


@dataclass(frozen=True)
class Numerics:
    """A GPU run's outputs against onnxruntime's CPU float32 outputs, worst output."""

    reference: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    within: bool


@dataclass
class ModelProfile:
    path: str
    stats: LatencyStats
    ratio: float
    layers: list[LayerTime] | None = None
    numerics: Numerics | None = None
    engine_cached: bool | None = None


@dataclass
class ProfileReport:
    backend: str
    threads: int
    models: list[ModelProfile]
    precision: str = "fp32"
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


def model_feeds(
    model: onnx.ModelProto, batch: int, shapes: Mapping[str, Sequence[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs with a batch of ``batch`` (``--input-shape`` pins other dims)."""
    inputs = graph_inputs(model)
    fixed = {i.name: i.dims[0] for i in inputs if i.dims and i.dims[0] is not None}
    for name, size in fixed.items():
        if size != batch and name not in shapes:
            raise InputError(
                f"input '{name}' has a fixed batch of {size}; --batch {batch} cannot apply"
            )
    return random_samples(inputs, batch if not fixed else 1, seed, shapes).feeds


class OrtRunner:
    """An onnxruntime session with its inputs; on a GPU provider the inputs and outputs
    are bound on the device, so a timed run copies nothing to or from the host."""

    def __init__(
        self,
        path: str | os.PathLike,
        feed: Mapping[str, np.ndarray],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,
        provider_options: Sequence[dict] | None = None,
    ):
        self.feed = dict(feed)
        self.session = session(
            path,
            list(providers),
            optimize=True,
            threads=threads,
            provider_options=provider_options,
        )
        self.binding = None
        if providers[0] != "CPUExecutionProvider":
            self.binding = self.session.io_binding()
            for name, array in self.feed.items():
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                self.binding.bind_ortvalue_input(name, value)
            for output in self.session.get_outputs():
                self.binding.bind_output(output.name, "cuda")

    def run(self) -> None:
        if self.binding is None:
            self.session.run(None, self.feed)
        else:
            self.session.run_with_iobinding(self.binding)

    def timed_block(self, count: int) -> list[float]:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.run()  # returns when the outputs are ready, on any provider
            times.append(time.perf_counter() - start)
        return times

    def outputs(self) -> list[np.ndarray]:
        if self.binding is None:
            return self.session.run(None, self.feed)
        self.run()
        return self.binding.copy_outputs_to_cpu()


def time_runners(
    runners: Sequence,
    *,
    iterations: int,
    duration: float | None,
    block: int,
    warmup: float,
) -> list[list[float]]:
    """Seconds per run of each runner: blocks of ``block`` runs per runner in turn, the
    first run of each block dropped, until each has ``iterations`` runs or ``duration``
    seconds are spent. A runner has ``run()`` and ``timed_block(count)``."""
    if block < 2:
        raise InputError(f"--block-runs {block}: must be at least 2 (the first is dropped)")
    for runner in runners:
        start = time.perf_counter()
        runs = 0
        while runs < 3 or time.perf_counter() - start < warmup:
            runner.run()
            runs += 1
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    while True:
        for index, runner in enumerate(runners):
            times[index].extend(runner.timed_block(block)[1:])
        spent = time.perf_counter() - start
        if duration is not None:
            if spent >= duration:
                return times
        elif min(len(t) for t in times) >= iterations:
            return times


# Activations onnxruntime fuses into a preceding Conv; the fused node is then named
# after the activation's output.
FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish"}


def original_node_owners(model: onnx.ModelProto, layers: Sequence[dict]) -> dict[str, str]:
    """onnxruntime node names of each converted layer's original Conv, to its layer name.

    A Conv is found by its output tensor (kept by the conversion). onnxruntime may keep
    the node's name, or rename it after its output (``<output>_nchwc``), or after the
    output of an activation it fused.
    """
    by_output = {layer["output"]: layer["name"] for layer in layers}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    owners = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.output[0] not in by_output:
            continue
        layer = by_output[node.output[0]]
        names = [node.name, node.output[0]]
        following = consumers.get(node.output[0], [])
        if len(following) == 1 and following[0].op_type in FUSED_ACTIVATIONS:
            names.append(following[0].output[0])
        owners.update({key: layer for key in (node.name, *(f"{n}_nchwc" for n in names[1:]))})
    return owners


def layer_times(
    path: str | os.PathLike,
    layers: Sequence[str],
    feed: Mapping[str, np.ndarray],
    threads: int,
    runs: int,
    owners: Mapping[str, str] | None = None,
) -> list[LayerTime]:
    """Kernel time per converted Conv, plus one row for the rest.

    Nodes of a converted model are found by their name prefix ``<conv>/attn/``; nodes of
    an original model through ``owners`` (``original_node_owners``).
    """
    with tempfile.TemporaryDirectory(prefix="conv2attn-profile-") as folder:
        profiled = session(
            path, optimize=True, threads=threads, profile_prefix=str(Path(folder) / "profile")
        )
        for _ in range(runs + 1):
            profiled.run(None, dict(feed))
        events = json.loads(Path(profiled.end_profiling()).read_text())
    # Longest names first, so "a/b" does not claim the nodes of "a/b_1".
    prefixes = sorted(((f"{name}/attn/", name) for name in layers), key=lambda p: -len(p[0]))
    rest = "(not converted)" if owners is None else "(other nodes)"
    totals: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        seen[node] += 1
        if seen[node] == 1:
            continue  # the first run does one-off work (allocation, prepacking)
        if owners is not None:
            owner = owners.get(node)
        else:
            owner = next((name for prefix, name in prefixes if node.startswith(prefix)), None)
        totals[owner if owner is not None else rest] += event["dur"]
    total = sum(totals.values()) or 1
    return [
        LayerTime(name, totals[name] / runs / 1e3, totals[name] / total)
        for name in [*layers, rest]
        if name in totals
    ]


@dataclass(frozen=True)
class GpuOptions:
    """Options of the GPU backends; the CLI's flags map onto these one to one."""

    precision: str | None = None  # None: the backend's default for this GPU
    workspace_mb: int | None = None
    engine_cache: Path | None = None
    cuda_graph: bool = False
    compile: bool = False
    check_numerics: bool = True


def resolve_precision(backend: str, precision: str | None, torch_module=None) -> str:
    allowed = BACKEND_PRECISIONS[backend]
    if precision is None:
        if backend in ("trt", "torch-cuda", "ort-trt"):
            return backends.default_precision(backend, torch_module)
        return "fp32"
    if precision not in allowed:
        raise InputError(
            f"--precision {precision}: --backend {backend} runs {', '.join(allowed)}"
            + (" (the model's own types)" if backend == "ort-cpu" else "")
        )
    return precision


def _device_name(backend: str, torch_module) -> str:
    """The GPU by name and compute capability; the CPU by architecture."""
    if torch_module is None:
        return f"{platform.machine()} CPU" if backend == "ort-cpu" else "CUDA GPU"
    index = torch_module.cuda.current_device()
    major, minor = torch_module.cuda.get_device_capability(index)
    return f"{torch_module.cuda.get_device_name(index)} (sm_{major}{minor})"


def _runner(
    backend: str,
    path: Path,
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    precision: str,
    threads: int,
    options: GpuOptions,
    per_layer: bool,
    torch_module,
):
    """The runner of one model on ``backend``, and whether its engine came from the cache."""
    if backend.startswith("ort-"):
        providers = backends.ort_provider(backend)
        provider_options = None
        if backend == "ort-cuda":
            provider_options = [{"use_tf32": int(precision == "tf32")}, {}]
        elif backend == "ort-trt":
            trt_options = {"trt_fp16_enable": precision == "fp16"}
            if options.engine_cache is not None:
                trt_options["trt_engine_cache_enable"] = True
                trt_options["trt_engine_cache_path"] = str(options.engine_cache)
            if options.workspace_mb:
                trt_options["trt_max_workspace_size"] = options.workspace_mb << 20
            provider_options = [trt_options, {}, {}]
        return OrtRunner(path, feed, providers, threads, provider_options), None
    if backend == "trt":
        from conv2attn import tensorrt_engine as engines

        trt = backends.tensorrt(backend)
        settings = engines.EngineSettings(
            precision, options.workspace_mb, engines.optimization_shapes(model, feed)
        )
        serialized, cached = engines.load_or_build(
            trt,
            path,
            settings,
            options.engine_cache,
            _device_name(backend, torch_module),
            per_layer,
        )
        runner = engines.TrtRunner(trt, torch_module, serialized, feed, options.cuda_graph)
        return runner, cached
    from conv2attn.torch_runtime import TorchRunner

    runner = TorchRunner(
        torch_module, model, feed, precision, "cuda", options.cuda_graph, options.compile
    )
    return runner, None


def _numerics(path: Path, feed: Mapping[str, np.ndarray], runner, precision: str) -> Numerics:
    """The runner's outputs against onnxruntime CPU float32 on the same inputs."""
    reference = session(path).run(None, dict(feed))
    actual = runner.outputs()
    if len(actual) != len(reference):
        raise InputError(
            f"{path}: {len(actual)} outputs from the backend, {len(reference)} from onnxruntime"
        )
    rtol, atol = PRECISION_TOLERANCE[precision]
    errors = [compare(str(i), r, a) for i, (r, a) in enumerate(zip(reference, actual))]
    worst = max(errors, key=lambda e: e.max_rel)
    return Numerics(
        "ort-cpu fp32",
        float(worst.max_abs),
        float(worst.max_rel),
        rtol,
        atol,
        all(e.within(rtol, atol) for e in errors),
    )


def _trt_layer_times(
    runner, record: list[dict], model: onnx.ModelProto, runs: int, original: bool
) -> list[LayerTime]:
    from conv2attn.tensorrt_engine import layer_owner, layer_prefixes

    prefixes = layer_prefixes(record, model if original else None)
    rest = "(other layers)"
    totals: Counter[str] = Counter()
    for layer, ms in runner.layer_times(runs).items():
        totals[layer_owner(layer, prefixes) or rest] += ms
    total = sum(totals.values()) or 1
    return [
        LayerTime(name, ms, ms / total)
        for name, ms in sorted(totals.items(), key=lambda item: -item[1])
    ]


def profile(
    paths: Sequence[str | os.PathLike],
    models: Sequence[onnx.ModelProto],
    *,
    backend: str = "ort-cpu",
    batch: int = 1,
    threads: int = 0,
    iterations: int = 50,
    duration: float | None = None,
    block: int = 6,
    warmup: float = 1.0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    per_layer: bool = False,
    gpu: GpuOptions | None = None,
) -> ProfileReport:
    """Time ``paths`` (their loaded ``models`` give inputs and metadata) side by side on
    ``backend``. Raises ``backends.BackendUnavailable`` (an InputError) when the backend
    cannot run here, saying what to install."""
    if batch < 1:
        raise InputError(f"--batch {batch}: must be at least 1")
    if iterations < 1:
        raise InputError(f"--iterations {iterations}: must be at least 1")
    gpu = gpu or GpuOptions()
    if backend not in backends.BACKENDS:
        raise InputError(f"--backend {backend}: expected one of {', '.join(backends.BACKENDS)}")
    if per_layer and backend not in ("ort-cpu", "trt"):
        raise InputError(f"--per-layer: measured with --backend ort-cpu or trt, not {backend}")
    if not backends.BACKENDS[backend].gpu and (
        gpu.precision not in (None, "fp32") or gpu.engine_cache or gpu.cuda_graph or gpu.compile
    ):
        raise InputError(
            "--precision, --engine-cache, --cuda-graph and --compile apply to GPU backends "
            "(ort-cuda, ort-trt, trt, torch-cuda)"
        )
    if gpu.workspace_mb is not None and gpu.workspace_mb < 1:
        raise InputError(f"--workspace {gpu.workspace_mb}: must be at least 1 (MB)")
    if gpu.engine_cache is not None and gpu.engine_cache.exists() and not gpu.engine_cache.is_dir():
        raise InputError(f"--engine-cache {gpu.engine_cache}: exists and is not a folder")
    if gpu.compile and backend != "torch-cuda":
        raise InputError("--compile applies to --backend torch-cuda")
    if gpu.cuda_graph and backend not in ("trt", "torch-cuda"):
        raise InputError("--cuda-graph applies to --backend trt and torch-cuda")
    backends.require(backend)
    torch_module = backends.cuda_torch(backend) if backend in ("trt", "torch-cuda") else None
    precision = resolve_precision(backend, gpu.precision, torch_module)
    threads = threads or os.cpu_count() or 1
    shapes = dict(input_shapes or {})
    feeds = [model_feeds(model, batch, shapes) for model in models]
    built = [
        _runner(backend, Path(p), m, f, precision, threads, gpu, per_layer, torch_module)
        for p, m, f in zip(paths, models, feeds)
    ]
    runners = [runner for runner, _ in built]
    times = time_runners(
        runners, iterations=iterations, duration=duration, block=block, warmup=warmup
    )
    stats = [latency_stats(t, batch) for t in times]
    # A model without a conversion record is attributed through the others' records.
    records = [converted_layers(model) for model in models]
    known = next((record for record in records if record), [])
    results = []
    for (runner, cached), path, model, feed, stat, record in zip(
        built, paths, models, feeds, stats, records
    ):
        layers = None
        if per_layer and (record or known):
            runs = max(5, min(iterations, 20))
            names = [layer["name"] for layer in record or known]
            if backend == "trt":
                layers = _trt_layer_times(runner, record or known, model, runs, not record)
            elif record:
                layers = layer_times(path, names, feed, threads, runs)
            else:
                owners = original_node_owners(model, known)
                layers = layer_times(path, names, feed, threads, runs, owners)
        numerics = None
        if backends.BACKENDS[backend].gpu and gpu.check_numerics:
            numerics = _numerics(Path(path), feed, runner, precision)
        results.append(
            ModelProfile(
                str(path), stat, stat.median_ms / stats[0].median_ms, layers, numerics, cached
            )
        )
    return ProfileReport(
        backend=backend,
        threads=threads,
        models=results,
        precision=precision,
        device=_device_name(backend, torch_module),
    )
