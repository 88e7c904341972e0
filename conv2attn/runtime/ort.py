"""onnxruntime backends: ``ort-cpu``, ``ort-cuda`` and ``ort-trt``.

The CPU runs with full graph optimisations, as a deployment would. On a GPU provider the
inputs and outputs are bound on the device (IO binding), so a timed run copies nothing to
or from the host. ``--per-layer`` (CPU) reads onnxruntime's node profile and adds up the
kernel time of each converted Conv's nodes (``names.owner_prefix``), or, in an original
model, of each Conv node however onnxruntime renamed it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from conv2attn import names
from conv2attn.record import CONVERTED_OPS
from conv2attn.runtime.base import (
    BackendUnavailable,
    Device,
    LayerTime,
    RunnerRequest,
    device_name,
    installed,
)
from conv2attn.runtime.registry import Backend
from conv2attn.validate import run_session, session

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
# Activations onnxruntime fuses into a preceding Conv; the fused node is then named
# after the activation's output.
LAYOUT_RENAMED = re.compile(r"_token_\d+$")
FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish"}


def ort_provider(backend: str) -> list[str]:
    """onnxruntime providers for ``ort-*`` backends, or why they are not available."""
    wanted = PROVIDERS[backend]
    available = ort.get_available_providers()
    if wanted[0] in available:
        return wanted
    if installed("onnxruntime") and installed("onnxruntime-gpu"):
        raise BackendUnavailable(
            f"--backend {backend}: onnxruntime and onnxruntime-gpu are both installed and the "
            f"CPU package hides the GPU providers; run: pip uninstall -y onnxruntime "
            f"onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    if not installed("onnxruntime-gpu"):
        raise BackendUnavailable(
            f"--backend {backend}: {wanted[0]} needs onnxruntime-gpu; run: pip uninstall -y "
            f"onnxruntime && pip install onnxruntime-gpu"
        )
    raise BackendUnavailable(
        f"--backend {backend}: onnxruntime-gpu is installed but offers only "
        f"{', '.join(available)}; check the CUDA/cuDNN (and for ort-trt, TensorRT) libraries "
        f"it needs are on the library path"
    )


def prepare(backend: Backend) -> Device:
    ort_provider(backend.name)
    return Device(device_name(backend.gpu, None))


def create_runner(request: RunnerRequest) -> tuple[OrtRunner, None]:
    providers = ort_provider(request.backend)
    provider_options = None
    options = request.options
    if request.backend == "ort-cuda":
        provider_options = [{"use_tf32": int(request.precision == "tf32")}, {}]
    elif request.backend == "ort-trt":
        trt_options = {"trt_fp16_enable": request.precision == "fp16"}
        if options.engine_cache is not None:
            trt_options["trt_engine_cache_enable"] = True
            trt_options["trt_engine_cache_path"] = str(options.engine_cache)
        if options.workspace_mb:
            trt_options["trt_max_workspace_size"] = options.workspace_mb << 20
        provider_options = [trt_options, {}, {}]
    runner = OrtRunner(request.path, request.feed, providers, request.threads, provider_options)
    return runner, None


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
        self.path = path
        self.threads = threads
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
            run_session(self.session, None, self.feed, str(self.path))
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
            return run_session(self.session, None, self.feed, str(self.path))
        self.run()
        return self.binding.copy_outputs_to_cpu()

    def layer_times(
        self, runs: int, layers: Sequence[dict], original: onnx.ModelProto | None
    ) -> list[LayerTime]:
        owners = None if original is None else original_node_owners(original, layers)
        return layer_times(
            self.path,
            [layer["name"] for layer in layers],
            self.feed,
            self.threads,
            runs,
            owners,
        )


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
        if node.op_type not in CONVERTED_OPS or node.output[0] not in by_output:
            continue
        layer = by_output[node.output[0]]
        renamed = [node.name, node.output[0]]
        following = consumers.get(node.output[0], [])
        if len(following) == 1 and following[0].op_type in FUSED_ACTIVATIONS:
            renamed.append(following[0].output[0])
        owners.update({key: layer for key in (node.name, *(f"{n}_nchwc" for n in renamed[1:]))})
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

    Nodes of a converted model are found by their name prefix (``names.owner_prefix``);
    nodes of an original model through ``owners`` (``original_node_owners``).
    """
    with tempfile.TemporaryDirectory(prefix="conv2attn-profile-") as folder:
        profiled = session(
            path, optimize=True, threads=threads, profile_prefix=str(Path(folder) / "profile")
        )
        for _ in range(runs + 1):
            profiled.run(None, dict(feed))
        events = json.loads(Path(profiled.end_profiling()).read_text())
    # Longest names first, so "a/b" does not claim the nodes of "a/b_1".
    prefixes = sorted(((names.owner_prefix(n), n) for n in layers), key=lambda p: -len(p[0]))
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
            # the NHWC layout transformer renames the nodes it moves "<name>_token_<n>"
            owner = owners.get(node) or owners.get(LAYOUT_RENAMED.sub("", node))
        else:
            owner = next((name for prefix, name in prefixes if node.startswith(prefix)), None)
        totals[owner if owner is not None else rest] += event["dur"]
    total = sum(totals.values()) or 1
    return [
        LayerTime(name, totals[name] / runs / 1e3, totals[name] / total)
        for name in [*layers, rest]
        if name in totals
    ]
