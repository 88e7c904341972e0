"""Latency of models side by side with onnxruntime (CPU), and where the time goes.

Models are timed in one process, alternating in blocks of runs; the first run of each
block is dropped, so a large model evicting a small one's weights from the caches does
not count against the small one (strict A/B interleaving skews ratios that way).
Sessions use onnxruntime's full graph optimisations, as a deployment would.

``--per-layer`` reads onnxruntime's node profile and adds up the kernel time of every
node of a converted Conv (nodes named ``<conv>/attn/...``, listed in the conversion
metadata), so a user sees which converted layers cost most.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from conv2attn.errors import InputError
from conv2attn.inputs import graph_inputs, random_samples
from conv2attn.validate import converted_layers, session


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


@dataclass
class ModelProfile:
    path: str
    stats: LatencyStats
    ratio: float
    layers: list[LayerTime] | None = None


@dataclass
class ProfileReport:
    backend: str
    threads: int
    models: list[ModelProfile]

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


def time_models(
    sessions: Sequence[ort.InferenceSession],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    iterations: int,
    duration: float | None,
    block: int,
    warmup: float,
) -> list[list[float]]:
    """Seconds per run of each model: blocks of ``block`` runs per model in turn, the first
    run of each block dropped, until each model has ``iterations`` runs or ``duration``
    seconds are spent."""
    if block < 2:
        raise InputError(f"--block-runs {block}: must be at least 2 (the first is dropped)")
    for timed, feed in zip(sessions, feeds):
        start = time.perf_counter()
        runs = 0
        while runs < 3 or time.perf_counter() - start < warmup:
            timed.run(None, dict(feed))
            runs += 1
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while True:
        for index, (timed, feed) in enumerate(zip(sessions, feeds)):
            feed = dict(feed)
            for run in range(block):
                begin = time.perf_counter()
                timed.run(None, feed)
                elapsed = time.perf_counter() - begin
                if run:
                    times[index].append(elapsed)
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


def profile(
    paths: Sequence[str | os.PathLike],
    models: Sequence[onnx.ModelProto],
    *,
    batch: int = 1,
    threads: int = 0,
    iterations: int = 50,
    duration: float | None = None,
    block: int = 6,
    warmup: float = 1.0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    per_layer: bool = False,
) -> ProfileReport:
    """Time ``paths`` (their loaded ``models`` give inputs and metadata) side by side."""
    if batch < 1:
        raise InputError(f"--batch {batch}: must be at least 1")
    if iterations < 1:
        raise InputError(f"--iterations {iterations}: must be at least 1")
    threads = threads or os.cpu_count() or 1
    shapes = dict(input_shapes or {})
    feeds = [model_feeds(model, batch, shapes) for model in models]
    sessions = [session(path, optimize=True, threads=threads) for path in paths]
    times = time_models(
        sessions, feeds, iterations=iterations, duration=duration, block=block, warmup=warmup
    )
    stats = [latency_stats(t, batch) for t in times]
    # A model without a conversion record is attributed through the others' records.
    records = [converted_layers(model) for model in models]
    known = next((record for record in records if record), [])
    results = []
    for path, model, feed, stat, record in zip(paths, models, feeds, stats, records):
        layers = None
        if per_layer:
            runs = max(5, min(iterations, 20))
            if record:
                names = [layer["name"] for layer in record]
                layers = layer_times(path, names, feed, threads, runs)
            elif known:
                names = [layer["name"] for layer in known]
                owners = original_node_owners(model, known)
                layers = layer_times(path, names, feed, threads, runs, owners)
        results.append(ModelProfile(str(path), stat, stat.median_ms / stats[0].median_ms, layers))
    return ProfileReport(backend="onnxruntime-cpu", threads=threads, models=results)
