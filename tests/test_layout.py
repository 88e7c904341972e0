"""What the package layout promises: which stage may import what, and that a runtime
backend is one module plus one registry entry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conv2attn.cli import build_parser, main
from conv2attn.runtime import registry
from conv2attn.runtime.base import Device, LayerTime, Runner
from conv2attn.runtime.registry import BACKENDS, PRECISIONS, Backend

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "models" / "digits_cnn.onnx")


def loaded_after(statement: str) -> set[str]:
    """Top-level and conv2attn modules loaded by ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return set(json.loads(result.stdout))


def test_validation_profiling_and_reports_load_neither_the_pass_nor_graphsurgeon():
    loaded = loaded_after(
        "import conv2attn.validate, conv2attn.profile, conv2attn.report, "
        "conv2attn.visual_report, conv2attn.runtime.ort"
    )
    assert not {m for m in loaded if m.startswith(("onnx_graphsurgeon", "conv2attn.graph"))}


def test_the_construction_core_needs_no_onnx_and_geometry_not_even_numpy():
    pure = loaded_after(
        "import conv2attn.core.geometry, conv2attn.core.planning, conv2attn.core.selection, "
        "conv2attn.names"
    )
    assert not {m for m in pure if m.split(".")[0] in ("onnx", "numpy", "torch")}
    weights = loaded_after("import conv2attn.core.weights")
    assert "numpy" in weights
    assert not {m for m in weights if m.split(".")[0] in ("onnx", "torch")}


def test_the_first_name_of_the_pytorch_layer_still_imports():
    pytest.importorskip("torch")
    from conv2attn import torch as alias
    from conv2attn import trainable

    assert alias.ConvAttention is trainable.ConvAttention
    assert alias.convert_module is trainable.convert_module


def test_cli_choices_and_help_come_from_the_registry(capsys):
    profile = build_parser()._subparsers._group_actions[0].choices["profile"]
    options = {a.dest: a for a in profile._actions}
    assert tuple(options["backend"].choices) == tuple(BACKENDS)
    assert tuple(options["precision"].choices) == PRECISIONS
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    help_text = capsys.readouterr().out
    assert all(f"{b.name}  " in help_text and b.summary in help_text for b in BACKENDS.values())


# -- a backend added as one module (this one) and one registry entry ------------------


class CountingRunner:
    """Runs nothing; counts runs and reports a fixed time per run."""

    def __init__(self, feed):
        self.feed, self.runs = feed, 0

    def run(self) -> None:
        self.runs += 1

    def timed_block(self, count: int) -> list[float]:
        self.runs += count
        return [1e-3] * count

    def outputs(self) -> list[np.ndarray]:
        return [np.zeros(1, np.float32)]

    def layer_times(self, runs, layers, original) -> list[LayerTime]:
        return [LayerTime(layer["name"], 1.0, 1.0 / len(layers)) for layer in layers]


def prepare(backend: Backend) -> Device:
    return Device(f"counter for {backend.name}")


def create_runner(request) -> tuple[CountingRunner, None]:
    assert request.device.name == "counter for counting"  # what prepare found
    return CountingRunner(request.feed), None


def test_a_backend_is_one_module_and_one_registry_entry(monkeypatch, tmp_path, capsys):
    entry = Backend(
        "counting",
        "counts runs (test)",
        "nothing",
        "nothing extra",
        __name__,
        gpu=False,
        precisions=("fp32",),
        per_layer=True,
    )
    monkeypatch.setitem(registry.BACKENDS, "counting", entry)
    assert isinstance(CountingRunner({}), Runner)
    report = tmp_path / "profile.json"
    options = ["--iterations", "4", "--warmup", "0", "--per-layer", "--json", str(report)]
    code = main(["profile", DIGITS, "--backend", "counting", *options])
    assert code == 0, capsys.readouterr().err
    measured = json.loads(report.read_text())
    assert measured["backend"] == "counting" and measured["device"] == "counter for counting"
    assert measured["models"][0]["stats"]["median_ms"] == pytest.approx(1.0)
    start = time.perf_counter()
    assert main(["profile", DIGITS, "--backend", "counting", "--cuda-graph"]) == 2
    assert "apply to GPU backends" in capsys.readouterr().err
    assert time.perf_counter() - start < 30
