"""GPU backends of `conv2attn profile`: everything that can be checked without a GPU.

The GPU runs themselves are in tests/test_gpu.py and skip where there is no CUDA device.
Absence of a library is simulated by hiding its module (``sys.modules[name] = None``
makes ``import name`` raise ImportError, exactly as when it is not installed).
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

import conv2attn
from conv2attn.cli import main
from conv2attn.errors import InputError
from conv2attn.profile import PRECISION_TOLERANCE, _numerics, profile
from conv2attn.runtime import ort
from conv2attn.runtime.base import BackendUnavailable, GpuOptions, cuda_torch
from conv2attn.runtime.ort import OrtRunner
from conv2attn.runtime.registry import resolve_precision
from conv2attn.runtime.tensorrt import (
    EngineSettings,
    cache_key,
    cast_to_float16,
    describe_parser_errors,
    engine_cache_path,
    layer_owner,
    layer_prefixes,
    load_or_build,
    model_digest,
    tensorrt,
)
from tests.helpers import assert_parity, chain_model, conv_model, run, save_model_file
from tests.test_dynamic import dynamic

DIGITS = str(Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx")


def fake_torch(cuda_build: str | None, devices: int = 0) -> types.ModuleType:
    module = types.ModuleType("torch")
    module.version = types.SimpleNamespace(cuda=cuda_build)
    module.cuda = types.SimpleNamespace(is_available=lambda: devices > 0)
    return module


# -- what is missing, in one line, exit code 2 ---------------------------------------------


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("trt", r"cannot import tensorrt .*pip install \"conv2attn\[trt\]\""),
        ("torch-cuda", r"cannot import onnx2torch .*pip install \"conv2attn\[torch\]\""),
    ],
)
def test_missing_module_is_one_line_with_the_install_command(monkeypatch, capsys, backend, message):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "onnx2torch", None)
    assert main(["profile", DIGITS, "--backend", backend]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_tensorrt_older_than_10_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(BackendUnavailable, match=r"TensorRT 8\.6\.1 .* 10 or newer"):
        tensorrt()


@pytest.mark.parametrize(
    ("cuda_build", "reason"),
    [(None, "CPU-only build"), ("12.8", r"torch \(CUDA 12\.8\) sees no GPU")],
)
def test_torch_without_a_gpu_says_why(monkeypatch, cuda_build, reason):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda_build))
    with pytest.raises(BackendUnavailable, match=reason):
        cuda_torch("torch-cuda")


def test_onnxruntime_and_onnxruntime_gpu_side_by_side_is_explained(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(ort, "installed", lambda name: True)
    with pytest.raises(BackendUnavailable, match=r"both installed .* hides the GPU"):
        ort.ort_provider("ort-cuda")
    monkeypatch.setattr(ort, "installed", lambda name: name == "onnxruntime-gpu")
    with pytest.raises(BackendUnavailable, match="offers only CPUExecutionProvider"):
        ort.ort_provider("ort-trt")


def test_gpu_provider_is_used_when_onnxruntime_offers_it(monkeypatch):
    import onnxruntime

    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: offered)
    assert ort.ort_provider("ort-trt") == offered
    assert ort.ort_provider("ort-cuda") == offered[1:]


# -- options ----------------------------------------------------------------------------


def test_precision_per_backend():
    assert resolve_precision("ort-cpu", None) == "fp32"
    assert resolve_precision("ort-cuda", "tf32") == "tf32"
    with pytest.raises(InputError, match="ort-cpu runs fp32"):
        resolve_precision("ort-cpu", "fp16")
    with pytest.raises(InputError, match="ort-cuda runs fp32, tf32"):
        resolve_precision("ort-cuda", "bf16")
    gpu = types.SimpleNamespace(cuda=types.SimpleNamespace(get_device_capability=lambda: (9, 0)))
    old = types.SimpleNamespace(cuda=types.SimpleNamespace(get_device_capability=lambda: (6, 1)))
    assert resolve_precision("trt", None, gpu) == "fp16"  # Hopper: fast fp16
    assert resolve_precision("torch-cuda", None, old) == "fp32"  # Pascal: no fast fp16
    assert resolve_precision("trt", "bf16", gpu) == "bf16"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp16"], "apply to GPU backends"),
        (["--cuda-graph"], "apply to GPU backends"),
        (["--backend", "ort-cuda", "--compile"], "--compile applies to --backend torch-cuda"),
        (["--backend", "ort-cuda", "--cuda-graph"], "--cuda-graph applies to --backend trt"),
        (["--backend", "torch-cuda", "--per-layer"], "--per-layer: measured with"),
        (["--backend", "trt", "--workspace", "0"], "--workspace 0: must be at least 1"),
        (["--backend", "trt", "--engine-cache", DIGITS], "exists and is not a folder"),
    ],
)
def test_options_that_do_not_apply_are_refused(capsys, args, message):
    assert main(["profile", DIGITS, *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", DIGITS, "--backend", "cuda"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cuda'" in capsys.readouterr().err


# -- engine cache -------------------------------------------------------------------------


def test_engine_cache_key_follows_model_bytes_and_every_setting(tmp_path):
    model = save_model_file(chain_model(), tmp_path / "chain.onnx")
    base = EngineSettings("fp16", None, {"x": ((1, 3, 16, 16),) * 3})
    first = engine_cache_path(tmp_path, model, base, "10.9.0", "NVIDIA H100 (sm_90)")
    assert first == engine_cache_path(tmp_path, model, base, "10.9.0", "NVIDIA H100 (sm_90)")
    assert first.name.startswith("chain-fp16-") and first.suffix == ".engine"
    variants = [
        (EngineSettings("fp32", None, base.shapes), "10.9.0", "NVIDIA H100 (sm_90)"),
        (EngineSettings("fp16", 1024, base.shapes), "10.9.0", "NVIDIA H100 (sm_90)"),
        (
            EngineSettings("fp16", None, {"x": ((8, 3, 16, 16),) * 3}),
            "10.9.0",
            "NVIDIA H100 (sm_90)",
        ),
        (base, "10.10.0", "NVIDIA H100 (sm_90)"),
        (base, "10.9.0", "NVIDIA A100 (sm_80)"),
    ]
    names = {engine_cache_path(tmp_path, model, *v).name for v in variants}
    assert len(names) == len(variants) and first.name not in names
    changed = chain_model()
    changed.graph.initializer[0].float_data[:] = []
    changed.graph.initializer[0].raw_data = np.zeros(8 * 3 * 9, np.float32).tobytes()
    save_model_file(changed, model)
    assert engine_cache_path(tmp_path, model, base, "10.9.0", "NVIDIA H100 (sm_90)") != first


def test_model_digest_covers_external_data(tmp_path):
    path = save_model_file(chain_model(), tmp_path / "chain.onnx", external=True)
    before = model_digest(path)
    data = path.with_name(path.name + ".data")
    payload = bytearray(data.read_bytes())
    payload[0] ^= 0xFF
    data.write_bytes(bytes(payload))
    assert model_digest(path) != before
    assert cache_key(before, EngineSettings(), "10", "gpu") != cache_key(
        model_digest(path), EngineSettings(), "10", "gpu"
    )


def test_cached_engine_is_reused_and_a_build_is_written_atomically(tmp_path, monkeypatch):
    from conv2attn.runtime import tensorrt as tensorrt_engine

    model = save_model_file(chain_model(), tmp_path / "chain.onnx")
    builds = []

    def fake_build(trt, path, settings, per_layer):
        builds.append(settings.precision)
        return b"serialized engine"

    monkeypatch.setattr(tensorrt_engine, "build_engine", fake_build)
    trt = types.SimpleNamespace(__version__="10.9.0")
    cache = tmp_path / "engines"
    engine, cached = load_or_build(trt, model, EngineSettings("fp16"), cache, "gpu", False)
    assert (engine, cached) == (b"serialized engine", False)
    engine, cached = load_or_build(trt, model, EngineSettings("fp16"), cache, "gpu", False)
    assert cached and builds == ["fp16"]
    assert [p.suffix for p in cache.iterdir()] == [".engine"]  # no temporary left behind


# -- TensorRT layer names to source Convs --------------------------------------------------


RECORD = [
    {"name": "conv1", "output": "c1"},
    {"name": "conv10", "output": "c10"},
    {"name": "/layer1/block/conv", "output": "/layer1/block/conv_output_0"},
    {"name": "/layer1/block/conv_1", "output": "/layer1/block/conv_1_output_0"},
]


@pytest.mark.parametrize(
    ("layer", "owner"),
    [
        ("conv1/attn/MatMul", "conv1"),
        ("conv10/attn/MatMul + conv10/attn/proj/Add", "conv10"),
        ("{ForeignNode[conv1/attn/logits/Sub...conv1/attn/Softmax]}", "conv1"),
        ("Reformatting CopyNode for Input Tensor 0 to conv10/attn/Gather", "conv10"),
        ("/layer1/block/conv_1/attn/proj/MatMul", "/layer1/block/conv_1"),
        ("/layer1/block/conv/attn/unpatchify/Transpose", "/layer1/block/conv"),
        ("conv1/attn/proj/Add + conv10/attn/pad/Pad", "conv1 + conv10"),
        ("/head/Gemm", None),
    ],
)
def test_converted_layer_names_map_to_their_conv(layer, owner):
    assert layer_owner(layer, layer_prefixes(RECORD)) == owner


def test_original_model_layer_names_map_through_conv_node_names():
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"),
                onnx.helper.make_node("Conv", ["c1", "w"], ["c10"], name="conv10"),
            ],
            "g",
            [],
            [],
        )
    )
    prefixes = layer_prefixes(RECORD[:2], model)
    assert layer_owner("conv10 + PWN(relu)", prefixes) == "conv10"
    assert layer_owner("conv1", prefixes) == "conv1"
    assert layer_owner("conv100", prefixes) is None


def test_parser_errors_name_the_failing_node():
    class Error:
        def __init__(self, desc, name="", op="", node=-1):
            self._desc, self._name, self._op, self._node = desc, name, op, node

        def desc(self):
            return self._desc

        def node_name(self):
            return self._name

        def node_operator(self):
            return self._op

        def node(self):
            return self._node

    parser = types.SimpleNamespace(
        num_errors=2,
        get_error=[
            Error("Unsupported dynamic Pad", "conv1/attn/pad/Pad", "Pad"),
            Error("weights missing", node=7),
        ].__getitem__,
    )
    text = describe_parser_errors(parser)
    assert text == (
        "node 'conv1/attn/pad/Pad' (Pad): Unsupported dynamic Pad; node #7: weights missing"
    )


# -- precision preparation and numerics ----------------------------------------------------


def test_fp16_cast_for_tensorrt_11_keeps_logits_and_softmax_in_float32():
    """The cast a strongly typed TensorRT build gets: run here by onnxruntime on the CPU,
    it stays within the fp16 bound of the fp32 model."""
    converted, _ = conv2attn.convert(chain_model(), patch="2")
    keep = [n.name for n in converted.graph.node if "/attn/logits/" in n.name]
    cast = cast_to_float16(converted, keep)
    types_by_output = {}
    for value in onnx.shape_inference.infer_shapes(cast).graph.value_info:
        types_by_output[value.name] = value.type.tensor_type.elem_type
    softmax = [n for n in cast.graph.node if n.op_type == "Softmax"]
    assert softmax and all(
        types_by_output.get(n.output[0]) == onnx.TensorProto.FLOAT for n in softmax
    )
    projections = [i for i in cast.graph.initializer if i.name.endswith("/attn/W_O")]
    assert projections and all(i.data_type == onnx.TensorProto.FLOAT16 for i in projections)
    assert cast.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16), np.float32)}
    assert_parity(run(converted, feeds), run(cast, feeds), *PRECISION_TOLERANCE["fp16"])


def test_fp16_cast_keeps_one_of_the_repeated_casts_older_converters_insert(monkeypatch):
    """onnxruntime's float16 converter before 1.32 inserts an fp32 Cast once per use of a
    tensor, each with the same name and output; the cast model must still load and agree."""
    import onnxruntime.transformers.float16 as float16

    convert = float16.convert_float_to_float16

    def repeating_casts(model, **options):
        cast = convert(model, **options)
        repeated = [n for n in cast.graph.node if n.op_type == "Cast"]
        cast.graph.node.extend(copy.deepcopy(n) for n in repeated)
        cast.graph.value_info.extend(copy.deepcopy(list(cast.graph.value_info)))
        return cast

    monkeypatch.setattr(float16, "convert_float_to_float16", repeating_casts)
    converted, _ = conv2attn.convert(chain_model(), patch="2")
    keep = [n.name for n in converted.graph.node if "/attn/logits/" in n.name]
    cast = cast_to_float16(converted, keep)
    names = [n.name for n in cast.graph.node]
    assert len(names) == len(set(names))
    assert any(n.op_type == "Cast" for n in cast.graph.node)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16), np.float32)}
    assert_parity(run(converted, feeds), run(cast, feeds), *PRECISION_TOLERANCE["fp16"])


def test_numerics_bound_depends_on_the_precision(tmp_path):
    path = save_model_file(chain_model(), tmp_path / "chain.onnx")
    feed = {"x": np.random.default_rng(1).standard_normal((1, 3, 16, 16), np.float32)}
    exact = run(chain_model(), feed)

    class Perturbed:
        def __init__(self, relative):
            self.relative = relative

        def outputs(self):
            scale = np.abs(exact[0]).max()
            return [exact[0] + self.relative * scale]

    assert _numerics(path, feed, Perturbed(1e-6), "fp32").within
    assert not _numerics(path, feed, Perturbed(1e-3), "fp32").within
    assert _numerics(path, feed, Perturbed(1e-3), "fp16").within
    assert not _numerics(path, feed, Perturbed(5e-2), "fp16").within
    assert _numerics(path, feed, Perturbed(5e-2), "bf16").within


def test_cpu_runner_timing_matches_the_profile_method(tmp_path):
    path = save_model_file(chain_model(), tmp_path / "chain.onnx")
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    runner = OrtRunner(path, feed)
    times = runner.timed_block(4)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert_parity(run(chain_model(), feed), runner.outputs())
    report = profile([path], [chain_model()], iterations=3, warmup=0, gpu=GpuOptions())
    assert report.backend == "ort-cpu" and report.precision == "fp32"
    assert report.models[0].numerics is None  # the CPU backend is the reference itself


# -- PyTorch import of the graph (the torch-cuda backend's model, run here on the CPU) -----


def test_opset_18_reductions_move_to_opset_17_for_onnx2torch():
    from conv2attn.runtime.torch_import import for_onnx2torch

    node = onnx.helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "axes")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    moved = for_onnx2torch(model)
    assert moved.opset_import[0].version == 17 and model.opset_import[0].version == 18
    assert list(moved.graph.node[0].input) == ["x"]
    onnx.checker.check_model(moved, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 4), np.float32)
    assert_parity(run(model, {"x": x}), run(moved, {"x": x}))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_allowzero_reshapes_reach_onnx2torch_meaning_the_same(approximate):
    """torch's dynamo exporter writes ViTs with Gelu (opset 20) and Reshapes with
    allowzero=1: Gelu becomes the opset-17 operators of its definition, and allowzero is
    dropped where the shape is a constant without zeros (there it changes nothing)."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime.torch_import import for_onnx2torch, import_model

    nodes = [
        onnx.helper.make_node("Gelu", ["x"], ["g"], name="gelu", approximate=approximate),
        onnx.helper.make_node("Reshape", ["g", "shape"], ["y"], name="flat", allowzero=1),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 12])],
        [onnx.numpy_helper.from_array(np.array([2, 12], np.int64), "shape")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    prepared = for_onnx2torch(model)
    assert "Gelu" not in {node.op_type for node in prepared.graph.node}
    assert all(not node.attribute for node in prepared.graph.node if node.op_type == "Reshape")
    onnx.checker.check_model(prepared, full_check=True)
    x = np.linspace(-4, 4, 24, dtype=np.float32).reshape(2, 3, 4)
    with torch.no_grad():
        result = import_model(model)(torch.from_numpy(x)).numpy()
    assert_parity(run(model, {"x": x}), [result])


def test_the_standard_form_is_refused_naming_its_attention_node():
    from conv2attn.runtime.torch_import import for_onnx2torch

    converted, _ = conv2attn.convert(DIGITS, form="attention")
    with pytest.raises(InputError, match=r"node '.*/attn/Attention' .*new in opset 23"):
        for_onnx2torch(converted)


def test_nodes_that_opset_17_cannot_express_are_refused_by_name():
    from conv2attn.runtime.torch_import import for_onnx2torch

    split = onnx.helper.make_node("Split", ["x"], ["a", "b"], name="halves", num_outputs=2)
    graph = onnx.helper.make_graph(
        [split],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in "ab"],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(InputError, match=r"node 'halves' \(Split\).*gained after opset 17"):
        for_onnx2torch(model)


@pytest.mark.parametrize("attention", ["global", "local"])
def test_converted_model_runs_through_pytorch_with_parity(tmp_path, attention):
    """The torch-cuda backend's import path, on the CPU: the shipped model (opset 18,
    dynamo export) converted, imported by onnx2torch, equal to onnxruntime."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime.torch_cuda import TorchRunner

    converted, _ = conv2attn.convert(DIGITS, attention=attention)
    feeds = {"image": np.random.default_rng(2).standard_normal((3, 1, 32, 32), np.float32)}
    reference = run(converted, feeds)
    fp32 = TorchRunner(torch, converted, feeds, "fp32", device="cpu")
    assert_parity(reference, fp32.outputs())
    bf16 = TorchRunner(torch, converted, feeds, "bf16", device="cpu")
    assert_parity(reference, bf16.outputs(), *PRECISION_TOLERANCE["bf16"])
    assert len(fp32.timed_block(3)) == 3


def test_conv_weights_behind_identity_and_constant_nodes_are_imported():
    """torch's exporter routes shared weights through Identity nodes (convnext_tiny's
    Conv biases); onnx2torch reads a Conv's weight and bias only from initializers."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime.torch_import import for_onnx2torch, import_model

    rng = np.random.default_rng(6)
    weight = rng.standard_normal((4, 3, 3, 3), np.float32)
    bias = rng.standard_normal(4, np.float32)
    nodes = [
        onnx.helper.make_node("Identity", ["w"], ["w_shared"]),
        onnx.helper.make_node("Constant", [], ["b"], value=onnx.numpy_helper.from_array(bias)),
        onnx.helper.make_node("Conv", ["x", "w_shared", "b"], ["y"], name="conv", pads=[1] * 4),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 8, 8])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    prepared = for_onnx2torch(model)
    assert [node.op_type for node in prepared.graph.node] == ["Conv"]
    assert [node.op_type for node in model.graph.node] == ["Identity", "Constant", "Conv"]
    onnx.checker.check_model(prepared, full_check=True)
    x = rng.standard_normal((2, 3, 8, 8), np.float32)
    with torch.no_grad():
        result = import_model(model)(torch.from_numpy(x)).numpy()
    assert_parity(run(model, {"x": x}), [result])


def host_to_device_copies():
    """A dispatch mode listing each operation that takes a host tensor with dims into a
    meta (device) result: a copy from host memory, which makes the host wait for the
    device and which a CUDA graph cannot capture (a scalar fill is neither)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class HostToDevice(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
            if any(t.device.type == "meta" for t in outputs) and any(
                t.device.type == "cpu" and t.dim() > 0 for t in inputs
            ):
                self.copies.append(str(func))
            return result

    return HostToDevice()


def run_on_meta(module, shape):
    """``module`` moved to the meta device and run on an empty input of ``shape``: its
    output and the copies from host memory it made (``host_to_device_copies``)."""
    import torch

    module.to("meta")
    copies = host_to_device_copies()
    with copies, torch.no_grad():
        output = module(torch.empty(shape, device="meta"))
    return output, copies.copies


@pytest.mark.parametrize("attention", ["global", "local"])
def test_imported_model_never_reads_values_on_the_device(attention):
    """On a GPU, a value read in Python waits for every kernel queued before it.
    On the meta device a tensor has no values, so a run there fails on any such read:
    the constants that onnx2torch reads (shapes, pads, slice bounds) must stay on the
    host when the module moves, and nothing else may be read. Nor is anything copied
    from the host: local attention's zero token is expanded to the batch (8 tokens of 16
    channels here) on the device, from the batch size the host computes."""
    pytest.importorskip("onnx2torch")

    from conv2attn.runtime.torch_import import import_model

    converted, _ = conv2attn.convert(DIGITS, attention=attention)
    module = import_model(converted).to("meta")
    host = {name for name, value in module.named_buffers() if value.device.type == "cpu"}
    # shape arithmetic (a zero token's batch size) keeps its constants in its own module
    assert host and all(
        name.startswith("host.") or (name.startswith("shape_function_") and ".host." in name)
        for name in host
    )
    output, copies = run_on_meta(module, (8, 1, 32, 32))
    assert output.shape == (8, 10) and output.device.type == "meta" and copies == []


@pytest.mark.parametrize("attention", ["global", "local"])
def test_a_dynamic_size_conversion_computes_its_geometry_on_the_host(attention):
    """A conversion that keeps dynamic sizes computes pads, crops and key windows from
    Shape on every run. On a GPU that arithmetic must stay in host memory: reading a
    device value waits for the GPU, and a copy from host memory to the device cannot be
    captured in a CUDA graph (both seen on an H200 before). On the meta device, where
    nothing has a value, the run completes with no operation taking a host tensor with
    dims into a device result; on the CPU it keeps parity at two sizes."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime.torch_import import import_model

    converted, report = conv2attn.convert(dynamic(chain_model()), attention=attention)
    assert all(layer.dynamic for layer in report.layers)
    module = import_model(converted)
    rng = np.random.default_rng(3)
    for size in [(16, 16), (13, 22)]:
        x = rng.standard_normal((2, 3, *size)).astype(np.float32)
        with torch.no_grad():
            result = module(torch.from_numpy(x)).numpy()
        assert_parity(run(converted, {"x": x}), [result])

    output, copies = run_on_meta(module, (2, 3, 13, 22))
    assert output.shape == (2, 8, 7, 11) and output.device.type == "meta" and copies == []


def test_a_dynamic_global_head_is_selected_without_reading_its_index():
    """A strided stem's global heads hold only the pixels they read, each taking its rows
    of the attention by a Gather with one constant index. onnx2torch indexes with that
    index as a tensor, which torch reads back (a wait for the GPU, and a CUDA graph
    capture failure on an H200); the import selects by a Python integer instead."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime.torch_import import import_model

    stem = dynamic(conv_model(3, 16, kernel=(7, 7), strides=(2, 2), pads=[3] * 4, size=(32, 32)))
    converted, _ = conv2attn.convert(stem, attention="global")
    scalar_gathers = [
        node
        for node in converted.graph.node
        if node.op_type == "Gather" and node.name.endswith("/attention")
    ]
    assert scalar_gathers
    module = import_model(converted)
    x = np.random.default_rng(6).standard_normal((2, 3, 19, 26)).astype(np.float32)
    with torch.no_grad():
        result = module(torch.from_numpy(x)).numpy()
    assert_parity(run(converted, {"x": x}), [result])
    output, copies = run_on_meta(module, (8, 3, 19, 26))
    assert output.shape == (8, 16, 10, 13) and copies == []


def test_shape_axes_are_read_under_either_of_onnx2torchs_names():
    """onnx2torch 1.5.0 keeps a Shape's axes as ``start``/``end``, later releases as
    ``_start``/``_end``; a module with neither is refused in one line."""
    from types import SimpleNamespace

    from conv2attn.runtime.torch_import import shape_axes

    assert shape_axes(SimpleNamespace(_start=1, _end=None)) == (1, None)
    assert shape_axes(SimpleNamespace(start=None, end=3)) == (0, 3)
    with pytest.raises(InputError, match=r"onnx2torch 1\.5\.15"):
        shape_axes(SimpleNamespace())


@pytest.mark.parametrize("attention", ["global", "local"])
def test_a_dynamic_size_conversion_runs_its_shape_arithmetic_once_per_input_size(attention):
    """Eager PyTorch pays a Python call per node on every run, and a dynamic conversion's
    shape arithmetic is hundreds of nodes (resnet18, local attention: 511 from 20
    Shapes). Each Shape's arithmetic is one submodule that runs once per shape it reads
    and keeps the results; runs that alternate sizes stay exact."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime.torch_import import import_model

    converted, _ = conv2attn.convert(dynamic(chain_model()), attention=attention)
    module = import_model(converted)
    functions = [m for m in module.modules() if type(m).__name__ == "PerShape"]
    assert functions and len(functions) == sum(n.op_type == "Shape" for n in converted.graph.node)
    calls = []
    for function in functions:
        function.function.register_forward_hook(lambda *_: calls.append(1))
    rng = np.random.default_rng(4)
    for size in [(16, 16), (16, 16), (13, 22), (16, 16)]:
        x = rng.standard_normal((2, 3, *size)).astype(np.float32)
        with torch.no_grad():
            result = module(torch.from_numpy(x)).numpy()
        assert_parity(run(converted, {"x": x}), [result])
    assert len(calls) == 2 * len(functions)  # 16x16 once, 13x22 once


@pytest.mark.parametrize("attention", ["global", "local"])
def test_buffers_that_modules_use_themselves_survive_the_import(attention):
    """Only the graph's own constants are dropped once unused: a BatchNormalization's
    statistics and the device marker of onnx2torch's Range (which a conversion for
    dynamic sizes uses) are buffers its modules read inside ``forward``."""
    pytest.importorskip("onnx2torch")
    from conv2attn.runtime.torch_cuda import TorchRunner

    model = conv_model(8, 8, pads=[1, 1, 1, 1], size=("H", "W"))
    rng = np.random.default_rng(8)
    statistics = {
        "scale": rng.uniform(0.5, 2, 8),
        "shift": rng.standard_normal(8),
        "mean": rng.standard_normal(8),
        "var": rng.uniform(0.5, 2, 8),
    }
    graph = model.graph
    graph.initializer.extend(
        onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in statistics.items()
    )
    graph.node[0].output[0] = "conv_out"
    graph.node.append(
        onnx.helper.make_node("BatchNormalization", ["conv_out", *statistics], ["y"], name="bn")
    )
    converted, report = conv2attn.convert(model, attention=attention)
    assert report.layers[0].dynamic
    feeds = {"x": rng.standard_normal((2, 8, 12, 10)).astype(np.float32)}
    import torch

    runner = TorchRunner(torch, converted, feeds, "fp32", device="cpu")
    assert_parity(run(converted, feeds), runner.outputs())


def test_a_module_that_onnx2torch_builds_wrongly_is_refused_at_its_first_run(monkeypatch):
    """onnx2torch imports torchvision's swin_t (original and converted alike) into a
    module whose classifier fails with a shape error; that is one line naming the
    backend, not a traceback."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime import torch_cuda

    class Miswired(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.linear(x.flatten(1)[:, :1], torch.zeros(10, 768))

    monkeypatch.setattr(torch_cuda, "import_model", lambda model: Miswired())
    feeds = {"image": np.zeros((1, 1, 32, 32), np.float32)}
    model = onnx.load(DIGITS)
    with pytest.raises(InputError, match=r"onnx2torch built .* fails to run \(mat1 and mat2"):
        torch_cuda.TorchRunner(torch, model, feeds, "fp32", device="cpu")


def test_a_model_over_2_gb_is_refused_before_onnx2torch_fails_on_it(monkeypatch):
    """onnx2torch serialises the model for shape inference, which protobuf cannot do at
    2 GB (regnet_y_128gf's conversion: an EncodeError from deep inside)."""
    pytest.importorskip("onnx2torch")
    from conv2attn.runtime import torch_import

    monkeypatch.setattr(torch_import, "model_size", lambda model: 2_800_000_000)
    with pytest.raises(InputError, match=r"cannot import a model of 2\.6 GB"):
        torch_import.import_model(onnx.load(DIGITS))


def test_every_module_named_as_reading_on_the_host_is_one_of_onnx2torch():
    """``HOST_ARGUMENTS`` names onnx2torch's classes by name: a renamed class would
    silently leave its constants on the device."""
    pytest.importorskip("onnx2torch")
    import importlib
    import pkgutil

    import onnx2torch.node_converters as converters

    from conv2attn.runtime.torch_import import HOST_ARGUMENTS

    classes = set()
    for info in pkgutil.iter_modules(converters.__path__):
        module = importlib.import_module(f"{converters.__name__}.{info.name}")
        classes |= {name for name, value in vars(module).items() if isinstance(value, type)}
    assert set(HOST_ARGUMENTS) <= classes, set(HOST_ARGUMENTS) - classes


def test_nodes_of_constants_are_computed_once_at_import():
    """A node whose inputs are all constants runs at import, not on every run; the
    result still matches onnxruntime."""
    pytest.importorskip("onnx2torch")
    import torch

    from conv2attn.runtime.torch_import import import_model

    converted, _ = conv2attn.convert(DIGITS)
    constant_only = [
        node.name
        for node in converted.graph.node
        if node.op_type != "Constant"
        and all(name in {t.name for t in converted.graph.initializer} for name in node.input)
    ]
    assert constant_only, "the converted digits model has nodes of constants to fold"
    module = import_model(converted)
    for node in module.graph.nodes:
        if node.op == "call_module":
            assert any(getattr(a, "op", None) != "get_attr" for a in node.args), node.name
    feeds = {"image": np.random.default_rng(4).standard_normal((2, 1, 32, 32), np.float32)}
    with torch.no_grad():
        result = module(torch.from_numpy(feeds["image"])).numpy()
    assert_parity(run(converted, feeds), [result])


class FakeCuda:
    """Records what CudaTimer asks of torch.cuda, in order."""

    def __init__(self):
        self.log = []
        fake = self

        class Stream:
            def synchronize(self):
                fake.log.append("sync")

        class Event:
            def __init__(self, enable_timing):
                assert enable_timing

            def record(self, stream):
                fake.log.append("event")

            def elapsed_time(self, end):
                return 2.5

        class Graph:
            def replay(self):
                fake.log.append("replay")

        class Context:
            def __init__(self, *args, **kwargs):
                pass

            def __enter__(self):
                fake.log.append("capture" if self.__class__.__name__ == "graph" else "stream")

            def __exit__(self, *exc):
                return False

        graph = type("graph", (Context,), {})
        stream = type("stream", (Context,), {})
        self.cuda = types.SimpleNamespace(
            Stream=Stream, Event=Event, CUDAGraph=Graph, graph=graph, stream=stream
        )


def test_a_run_that_cannot_be_captured_is_refused_with_the_reason():
    from conv2attn.runtime.cuda_timing import CudaTimer

    fake = FakeCuda()
    runs = []

    def run():
        runs.append(1)
        if "capture" in fake.log:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(InputError, match=r"--cuda-graph: .*not permitted when stream is captur"):
        CudaTimer(fake, run, cuda_graph=True)
    assert len(runs) == 2  # the eager run succeeded; the captured one raised


def test_cuda_timer_brackets_each_run_with_events_and_synchronises_once_per_block():
    from conv2attn.runtime.cuda_timing import CudaTimer

    fake = FakeCuda()
    timer = CudaTimer(fake, lambda: fake.log.append("run"))
    assert timer.timed_block(3) == [0.0025] * 3
    assert fake.log == ["stream"] + ["event", "run", "event"] * 3 + ["sync"]


def test_cuda_graph_is_captured_after_one_eager_run_and_then_replayed():
    from conv2attn.runtime.cuda_timing import CudaTimer

    fake = FakeCuda()
    timer = CudaTimer(fake, lambda: fake.log.append("run"), cuda_graph=True)
    assert fake.log == ["stream", "run", "sync", "capture", "run"]
    fake.log.clear()
    timer.timed_block(2)
    assert fake.log == ["stream", "event", "replay", "event", "event", "replay", "event", "sync"]
