"""Latency of models side by side on a backend, and where the time goes.

Models are timed in one process, alternating in blocks of runs; the first run of each
block is dropped, so a large model evicting a small one's weights from the caches does
not count against the small one (strict A/B interleaving skews ratios that way). Besides
the median, each model's *best block* (the median of its fastest block) is reported: on a
shared machine whose speed drifts in phases lasting many runs (other tenants' memory
traffic slows memory-bound models most), the median depends on how the phases fell, while
the fastest block measures the model at the machine's full speed.
Backends come from ``runtime.registry``: each builds a ``Runner`` per model; GPU runs are
timed with CUDA events (``runtime.cuda_timing``) and their outputs compared with
onnxruntime's CPU float32 outputs under a bound set by the precision.

``--per-layer`` asks the runner (a ``LayerProfiler``) for the kernel time of every source
Conv: onnxruntime's node profile on the CPU, TensorRT's layer profiler with ``trt``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from conv2attn.errors import InputError
from conv2attn.inputs import fill_dims, graph_inputs, random_samples
from conv2attn.record import converted_layers
from conv2attn.runtime.base import (
    GpuOptions,
    LayerProfiler,
    LayerTime,
    Runner,
    RunnerRequest,
)
from conv2attn.runtime.registry import BACKENDS, COMPILE, CUDA_GRAPH, backend, names
from conv2attn.runtime.registry import resolve_precision as resolve_precision
from conv2attn.validate import compare, session

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


@dataclass(frozen=True)
class LatencyStats:
    """Per-run latency of one model; ``throughput`` is samples per second at the median;
    ``best_block_ms``: the median of the fastest block of runs (0 when not in blocks)."""

    runs: int
    batch: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float
    p95_ms: float = 0.0
    max_ms: float = 0.0
    best_block_ms: float = 0.0


def latency_stats(seconds: Sequence[float], batch: int, kept_per_block: int = 0) -> LatencyStats:
    """Statistics of ``seconds``; ``kept_per_block``: the runs each block contributed, in
    order (``time_runners`` keeps all but the first of each block), for ``best_block_ms``."""
    if not seconds:
        raise ValueError("no timed runs")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    best_block = 0.0
    if kept_per_block > 0:
        best_block = min(
            float(np.median(ms[start : start + kept_per_block]))
            for start in range(0, len(ms), kept_per_block)
        )
    return LatencyStats(
        runs=len(ms),
        batch=batch,
        median_ms=median,
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        throughput=batch * 1e3 / median,
        p95_ms=float(np.percentile(ms, 95)),
        max_ms=float(ms.max()),
        best_block_ms=best_block,
    )


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
    """One model's timing; ``ratio`` and ``best_block_ratio`` are against the first model's
    median and best block."""

    path: str
    stats: LatencyStats
    ratio: float
    layers: list[LayerTime] | None = None
    numerics: Numerics | None = None
    engine_cached: bool | None = None
    best_block_ratio: float = 0.0


@dataclass
class ProfileReport:
    backend: str
    threads: int
    models: list[ModelProfile]
    precision: str = "fp32"
    device: str = "cpu"
    # how a GPU backend issued each run: "eager", "torch.compile", "CUDA graph", ...
    execution: str | None = None
    # the models whose local attention runs in tiles (``convert --batch``; sized for a
    # CPU's caches, while a GPU runs each tile as kernels of its own)
    tiled: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def model_feeds(
    model: onnx.ModelProto,
    batch: int,
    shapes: Mapping[str, Sequence[int]],
    seed: int = 0,
    others: Sequence[onnx.ModelProto] = (),
) -> dict[str, np.ndarray]:
    """Random inputs with a batch of ``batch`` (``--input-shape`` pins other dims; a dim
    the model leaves dynamic and one of ``others`` fixes takes that size)."""
    inputs = fill_dims(graph_inputs(model), *(graph_inputs(other) for other in others))
    fixed = {i.name: i.dims[0] for i in graph_inputs(model) if i.dims and i.dims[0] is not None}
    for name, size in fixed.items():
        if size != batch and name not in shapes:
            raise InputError(
                f"input '{name}' has a fixed batch of {size}; --batch {batch} cannot apply"
            )
    return random_samples(inputs, batch if not fixed else 1, seed, shapes).feeds


def served_batch(
    models: Sequence[onnx.ModelProto],
    batch: int | None,
    shapes: Mapping[str, Sequence[int]],
) -> tuple[int, dict[str, tuple[int, ...]]]:
    """The samples each run holds, and the shapes to draw one sample with. An input
    whose dynamic batch ``--input-shape`` pins above 1 (trtexec's ``input:8x3x224x224``,
    or ``--opt-shapes``) runs at that batch; ``--batch`` may repeat the number, or
    multiply a pinned batch of 1, and nothing else."""
    shapes = {name: tuple(dims) for name, dims in shapes.items()}
    pinned: dict[str, int] = {}
    for model in models:
        for graph_input in graph_inputs(model):
            dims = shapes.get(graph_input.name)
            if dims and graph_input.dims and graph_input.dims[0] is None and dims[0] != 1:
                pinned[graph_input.name] = dims[0]
    if not pinned:
        return (1 if batch is None else batch), shapes
    (name, size), *others = pinned.items()
    for other, other_size in others:
        if other_size != size:
            raise InputError(
                f"--input-shape gives '{name}' a batch of {size} and '{other}' one of "
                f"{other_size}: every input of a run holds the same batch"
            )
    if batch not in (None, size):
        shown = "x".join(map(str, shapes[name]))
        raise InputError(
            f"--input-shape {name}:{shown} runs a batch of {size} and --batch asks for "
            f"{batch}: give the batch once"
        )
    for pinned_name in pinned:
        shapes[pinned_name] = (1, *shapes[pinned_name][1:])
    return size, shapes


def time_runners(
    runners: Sequence[Runner],
    *,
    iterations: int,
    duration: float | None,
    block: int,
    warmup: float,
    progress: Callable[[int, int, str], None] | None = None,
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
        if progress is not None:
            if duration is not None:
                progress(int(min(spent, duration)), int(duration), "seconds")
            else:
                progress(min(min(len(t) for t in times), iterations), iterations, "runs")
        if duration is not None:
            if spent >= duration:
                return times
        elif min(len(t) for t in times) >= iterations:
            return times


def _numerics(
    path: Path, feed: Mapping[str, np.ndarray], runner: Runner, precision: str
) -> Numerics:
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


def _check_options(name: str, batch: int, iterations: int, per_layer: bool, gpu: GpuOptions):
    """Refuse options that do not apply to backend ``name``, naming those they apply to."""
    if batch < 1:
        raise InputError(f"--batch {batch}: must be at least 1")
    if iterations < 1:
        raise InputError(f"--iterations {iterations}: must be at least 1")
    entry = backend(name)
    if per_layer and not entry.per_layer:
        where = " or ".join(names(lambda b: b.per_layer))
        raise InputError(f"--per-layer: measured with --backend {where}, not {name}")
    if not entry.gpu and (
        gpu.precision not in (None, "fp32") or gpu.engine_cache or gpu.cuda_graph or gpu.compile
    ):
        raise InputError(
            "--precision, --engine-cache, --cuda-graph and --compile apply to GPU backends "
            f"({', '.join(names(lambda b: b.gpu))})"
        )
    if gpu.workspace_mb is not None and gpu.workspace_mb < 1:
        raise InputError(f"--workspace {gpu.workspace_mb}: must be at least 1 (MB)")
    if gpu.engine_cache is not None and gpu.engine_cache.exists() and not gpu.engine_cache.is_dir():
        raise InputError(f"--engine-cache {gpu.engine_cache}: exists and is not a folder")
    for flag, option in ((COMPILE, "--compile"), (CUDA_GRAPH, "--cuda-graph")):
        if getattr(gpu, flag) and flag not in entry.takes:
            where = " and ".join(names(lambda b, flag=flag: flag in b.takes))
            raise InputError(f"{option} applies to --backend {where}")


def _layer_times(
    runner: Runner, record: list[dict], known: list[dict], model: onnx.ModelProto, runs: int
) -> list[LayerTime] | None:
    """Per-layer times of one model; a model without a conversion record (the original)
    is attributed through another model's record."""
    if not (record or known) or not isinstance(runner, LayerProfiler):
        return None
    return runner.layer_times(runs, record or known, None if record else model)


def profile(
    paths: Sequence[str | os.PathLike],
    models: Sequence[onnx.ModelProto],
    *,
    backend: str = "ort-cpu",
    batch: int | None = None,
    threads: int = 0,
    iterations: int = 50,
    duration: float | None = None,
    block: int = 6,
    warmup: float = 1.0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    per_layer: bool = False,
    gpu: GpuOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ProfileReport:
    """Time ``paths`` (their loaded ``models`` give inputs and metadata) side by side on
    ``backend``, ``batch`` samples a run (default 1, or the batch ``input_shapes`` pins:
    ``served_batch``). Raises ``BackendUnavailable`` (an InputError) when the backend
    cannot run here, saying what to install."""
    gpu = gpu or GpuOptions()
    batch, shapes = served_batch(models, batch, input_shapes or {})
    _check_options(backend, batch, iterations, per_layer, gpu)
    entry = BACKENDS[backend]
    device = entry.implementation().prepare(entry)
    precision = resolve_precision(backend, gpu.precision, device.torch)
    threads = threads or os.cpu_count() or 1
    feeds = [model_feeds(model, batch, shapes, others=models) for model in models]
    built = []
    for p, m, f in zip(paths, models, feeds):
        request = RunnerRequest(backend, Path(p), m, f, precision, threads, gpu, per_layer, device)
        try:
            built.append(entry.implementation().create_runner(request))
        except InputError as error:  # several models run side by side: say which one
            message = str(error)
            if message.startswith(str(p)):
                raise
            raise type(error)(f"{p}: {message}") from None
    times = time_runners(
        [runner for runner, _ in built],
        iterations=iterations,
        duration=duration,
        block=block,
        warmup=warmup,
        progress=progress,
    )
    stats = [latency_stats(t, batch, kept_per_block=block - 1) for t in times]
    records = [converted_layers(model) for model in models]
    known = next((record for record in records if record), [])
    results = []
    for (runner, cached), path, model, feed, stat, record in zip(
        built, paths, models, feeds, stats, records
    ):
        runs = max(5, min(iterations, 20))
        layers = _layer_times(runner, record, known, model, runs) if per_layer else None
        numerics = None
        if entry.gpu and gpu.check_numerics:
            numerics = _numerics(Path(path), feed, runner, precision)
        results.append(
            ModelProfile(
                str(path),
                stat,
                stat.median_ms / stats[0].median_ms,
                layers,
                numerics,
                cached,
                best_block_ratio=stat.best_block_ms / stats[0].best_block_ms,
            )
        )
    return ProfileReport(
        backend=backend,
        threads=threads,
        models=results,
        precision=precision,
        device=device.name,
        execution=execution(backend, gpu),
        tiled=[
            str(path)
            for path, record in zip(paths, records)
            if any(layer.get("tiles", 1) > 1 for layer in record)
        ],
    )


def execution(backend: str, gpu: GpuOptions) -> str | None:
    """How each timed run is issued on a GPU backend (None on the CPU)."""
    if backend == "torch-cuda":
        parts = ["torch.compile"] * gpu.compile + ["CUDA graph"] * gpu.cuda_graph
        return ", ".join(parts) or "eager"
    if backend == "trt" and gpu.cuda_graph:
        return "CUDA graph"
    return None
