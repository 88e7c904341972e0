"""GPU runs of `conv2attn profile`: torch-cuda and trt on the shipped model, original and
converted, timed and compared with onnxruntime CPU fp32. Skipped where there is no CUDA
device (and trt where TensorRT is not installed), with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import conv2attn
from conv2attn.cli import main

pytestmark = pytest.mark.gpu
DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


needs_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU visible to torch")


@pytest.fixture
def pair(tmp_path):
    converted = tmp_path / "digits_attn.onnx"
    model, _ = conv2attn.convert(DIGITS)
    conv2attn.save_model(model, converted)
    return DIGITS, converted


def run_profile(pair, tmp_path, *options):
    report = tmp_path / "profile.json"
    args = ["profile", *map(str, pair), "--iterations", "20", "--warmup", "0.2"]
    code = main([*args, *options, "--json", str(report)])
    return code, json.loads(report.read_text())


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda-graph"])
def test_torch_cuda_times_both_models_within_the_precision_bound(
    pair, tmp_path, precision, cuda_graph
):
    pytest.importorskip("onnx2torch")
    options = ["--backend", "torch-cuda", "--precision", precision, "--batch", "8"]
    code, report = run_profile(pair, tmp_path, *options, *(["--cuda-graph"] * cuda_graph))
    assert code == 0
    assert report["backend"] == "torch-cuda" and report["precision"] == precision
    for model in report["models"]:
        assert model["stats"]["runs"] >= 20 and model["stats"]["median_ms"] > 0
        assert model["numerics"]["within"], model["numerics"]


@needs_cuda
@pytest.mark.skipif(not tensorrt_available(), reason="TensorRT is not installed")
def test_tensorrt_engine_is_built_cached_and_profiled_per_layer(pair, tmp_path):
    cache = tmp_path / "engines"
    options = ["--backend", "trt", "--precision", "fp16", "--engine-cache", str(cache)]
    code, first = run_profile(pair, tmp_path, *options, "--per-layer")
    assert code == 0
    assert [m["engine_cached"] for m in first["models"]] == [False, False]
    converted = first["models"][1]
    assert converted["numerics"]["within"]
    convs = {layer.name for layer in conv2attn.convert(DIGITS)[1].layers}
    attributed = {layer["name"] for layer in converted["layers"]} - {"(other layers)"}
    assert attributed and all(set(name.split(" + ")) <= convs for name in attributed)
    code, second = run_profile(pair, tmp_path, *options, "--per-layer")
    assert [m["engine_cached"] for m in second["models"]] == [True, True]


def dynamic_conversion(attention: str):
    """The chain test model with dynamic height and width, converted: its geometry is
    computed from Shape on every run."""
    from tests.helpers import chain_model
    from tests.test_dynamic import dynamic

    original = dynamic(chain_model())
    # onnx.helper writes the newest IR version, which older onnxruntime releases (1.30
    # among them) refuse to load; torch's exporter writes IR 10
    original.ir_version = 10
    return original, conv2attn.convert(original, attention=attention)[0]


@needs_cuda
@pytest.mark.parametrize("attention", ["global", "local"])
def test_dynamic_size_conversion_is_timed_as_a_cuda_graph(tmp_path, attention):
    """A conversion that keeps dynamic sizes computes its geometry on the host, so a run
    at a pinned size is captured as a CUDA graph (a copy from host memory inside it once
    made the capture fail), and its outputs match onnxruntime's."""
    pytest.importorskip("onnx2torch")
    original, converted = dynamic_conversion(attention)
    paths = (tmp_path / "chain.onnx", tmp_path / "chain_attn.onnx")
    conv2attn.save_model(original, paths[0])
    conv2attn.save_model(converted, paths[1])
    options = ["--backend", "torch-cuda", "--precision", "fp32", "--cuda-graph"]
    code, report = run_profile(paths, tmp_path, *options, "--input-shape", "x:8x3x45x38")
    assert code == 0
    for model in report["models"]:
        assert model["stats"]["batch"] == 8 and model["numerics"]["within"], model


@needs_cuda
@pytest.mark.parametrize("attention", ["global", "local"])
@pytest.mark.parametrize("sizes", ["static", "dynamic", "dynamic-stem"])
def test_converted_model_runs_on_the_gpu_without_waiting_for_the_host(attention, sizes):
    """torch's sync debug mode raises on any operation that makes the host wait for the
    GPU: the imported converted model has none (its host-read constants and its shape
    arithmetic stay on the host, a batch of zero tokens is expanded on the device, a
    strided stem's global heads are selected by a Python integer) and agrees with
    onnxruntime."""
    pytest.importorskip("onnx2torch")
    import numpy as np
    import torch

    from conv2attn.runtime.torch_import import import_model
    from tests.helpers import assert_parity, run

    rng = np.random.default_rng(5)
    if sizes == "static":
        converted, _ = conv2attn.convert(DIGITS, attention=attention)
        feeds = {"image": rng.standard_normal((8, 1, 32, 32), np.float32)}
    elif sizes == "dynamic":
        _, converted = dynamic_conversion(attention)
        feeds = {"x": rng.standard_normal((8, 3, 21, 34), np.float32)}
    else:
        from tests.helpers import conv_model
        from tests.test_dynamic import dynamic

        stem = dynamic(conv_model(3, 16, kernel=(7, 7), strides=(2, 2), pads=[3] * 4))
        stem.ir_version = 10  # as in dynamic_conversion
        converted, _ = conv2attn.convert(stem, attention=attention)
        feeds = {"x": rng.standard_normal((8, 3, 29, 38), np.float32)}
    module = import_model(converted).to("cuda")
    inputs = torch.from_numpy(next(iter(feeds.values()))).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            output = module(inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_parity(run(converted, feeds), [output.cpu().numpy()])
