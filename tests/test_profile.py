"""`conv2attn profile`: statistics, block scheduling, per-layer attribution, bad input."""

import json

import numpy as np
import onnx
import pytest

import conv2attn
from conv2attn.cli import main
from conv2attn.errors import InputError
from conv2attn.profile import latency_stats, time_runners
from tests.helpers import chain_model, conv_model


def test_latency_statistics():
    seconds = [i / 1000 for i in range(1, 101)]  # 1 .. 100 ms
    stats = latency_stats(seconds, batch=8)
    assert stats.runs == 100
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.mean_ms == pytest.approx(50.5) and stats.min_ms == pytest.approx(1.0)
    assert stats.throughput == pytest.approx(8 * 1000 / 50.5)


def test_best_block_is_the_median_of_the_fastest_block():
    # three blocks of 5 kept runs: a slow phase, a fast one with an outlier, a middling one
    blocks = [[30, 31, 29, 30, 32], [10, 11, 40, 10, 12], [20, 21, 20, 22, 19]]
    stats = latency_stats([m / 1000 for b in blocks for m in b], batch=1, kept_per_block=5)
    assert stats.best_block_ms == pytest.approx(11.0)  # the fast block's median, not its min
    assert stats.min_ms == pytest.approx(10.0)
    assert latency_stats([0.001] * 4, batch=1).best_block_ms == 0.0  # not timed in blocks


class RecordingRunner:
    """Stands in for a backend's runner: records the order of runs."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def run(self):
        self.log.append(self.name)

    def timed_block(self, count):
        for _ in range(count):
            self.run()
        return [0.001] * count


def test_models_alternate_in_blocks_and_each_block_drops_its_first_run():
    log = []
    runners = [RecordingRunner("a", log), RecordingRunner("b", log)]
    times = time_runners(runners, iterations=10, duration=None, block=6, warmup=0)
    warmup = log[:6]
    assert warmup == ["a"] * 3 + ["b"] * 3  # three warm-up runs each, then timing
    timed = log[6:]
    assert timed[:12] == ["a"] * 6 + ["b"] * 6
    assert len(timed) == 2 * 6 * 2  # two rounds of a block each to reach 10 kept runs
    assert [len(t) for t in times] == [10, 10]  # 5 kept per block of 6


def test_block_of_one_run_is_refused():
    with pytest.raises(InputError, match="at least 2"):
        time_runners([RecordingRunner("a", [])], iterations=1, duration=None, block=1, warmup=0)


@pytest.fixture
def pair(tmp_path):
    original = tmp_path / "chain.onnx"
    onnx.save(chain_model(), str(original))
    converted = tmp_path / "chain_attn.onnx"
    onnx.save(conv2attn.convert(chain_model())[0], str(converted))
    return original, converted


def test_profile_reports_every_model_with_ratio_to_the_first(pair, tmp_path, capsys):
    original, converted = pair
    out = tmp_path / "p.json"
    args = [
        "profile",
        str(original),
        str(converted),
        "--iterations",
        "5",
        "--warmup",
        "0",
        "--batch",
        "2",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "ratio" in printed
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    first, second = report["models"]
    assert first["ratio"] == 1.0
    assert second["ratio"] == pytest.approx(
        second["stats"]["median_ms"] / first["stats"]["median_ms"]
    )
    assert second["best_block_ratio"] == pytest.approx(
        second["stats"]["best_block_ms"] / first["stats"]["best_block_ms"]
    )
    assert "best block ms" in printed and "ratio best block" in printed
    for model in report["models"]:
        stats = model["stats"]
        assert stats["runs"] >= 5 and stats["batch"] == 2
        assert stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
        assert stats["min_ms"] <= stats["best_block_ms"] <= stats["max_ms"]


def test_per_layer_attributes_kernel_time_to_source_convs(pair, tmp_path):
    _, converted = pair
    out = tmp_path / "p.json"
    args = [
        "profile",
        str(converted),
        "--iterations",
        "3",
        "--warmup",
        "0",
        "--per-layer",
        "--json",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    layers = json.loads(out.read_text())["models"][0]["layers"]
    names = [layer["name"] for layer in layers]
    assert {"stem", "down", "skip"} <= set(names)
    assert set(names) <= {"stem", "down", "skip", "(not converted)"}
    assert sum(layer["share"] for layer in layers) == pytest.approx(1.0)
    assert all(layer["ms"] > 0 for layer in layers)


def test_fixed_batch_conflicts_with_batch_option(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(conv_model(batch=1), str(path))
    assert main(["profile", str(path), "--batch", "4", "-q"]) == 2


def test_a_batch_given_in_the_input_shape_is_the_batch_timed(tmp_path, capsys, monkeypatch):
    """trtexec's ``--input-shape x:4x3x16x16`` means batch 4: each run feeds 4 samples and
    the report (batch, samples/s) says 4, whether or not --batch repeats it; a pinned
    batch of 1 is multiplied by --batch; two different batches are refused in one line."""
    import conv2attn.profile as profiling

    path = tmp_path / "chain.onnx"
    onnx.save(chain_model(), str(path))
    fed = []
    draw = profiling.model_feeds

    def recorded(*args, **kwargs):
        feeds = draw(*args, **kwargs)
        fed.append(feeds["x"].shape)
        return feeds

    monkeypatch.setattr(profiling, "model_feeds", recorded)
    timing = ["--iterations", "2", "--warmup", "0", "-q", "--json"]
    for options, batch in [
        (["--input-shape", "x:4x3x16x16"], 4),
        (["--input-shape", "x:4x3x16x16", "--batch", "4"], 4),
        (["--input-shape", "x:1x3x16x16", "--batch", "3"], 3),
        ([], 1),
    ]:
        fed.clear()
        report = tmp_path / "p.json"
        assert main(["profile", str(path), *options, *timing, str(report)]) == 0
        assert fed == [(batch, 3, 16, 16)]
        assert json.loads(report.read_text())["models"][0]["stats"]["batch"] == batch
    capsys.readouterr()
    assert main(["profile", str(path), "--input-shape", "x:4x3x16x16", "--batch", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert "x:4x3x16x16" in error and "--batch" in error and len(error.splitlines()) == 1
    assert main(["profile", str(path), "--batch", "0"]) == 2
    assert "--batch 0: must be at least 1" in capsys.readouterr().err


def test_a_model_that_cannot_be_run_is_named(pair, monkeypatch, capsys):
    """With several models side by side, a runner's refusal names the model it is about."""
    from conv2attn.runtime import ort

    original, converted = pair
    real = ort.create_runner

    def refuse_the_converted(request):
        if request.path == converted:
            raise InputError("cannot run it here")
        return real(request)

    monkeypatch.setattr(ort, "create_runner", refuse_the_converted)
    assert main(["profile", str(original), str(converted), "--iterations", "2"]) == 2
    assert f"{converted}: cannot run it here" in capsys.readouterr().err


def test_profile_of_a_missing_model_is_an_input_error(tmp_path, capsys):
    assert main(["profile", str(tmp_path / "none.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_random_feeds_follow_the_batch():
    from conv2attn.profile import model_feeds

    feeds = model_feeds(chain_model(), batch=3, shapes={})
    assert feeds["x"].shape == (3, 3, 16, 16) and feeds["x"].dtype == np.float32


def test_gpu_tables_say_how_runs_were_issued_and_warn_of_eager_launches():
    """An eager torch-cuda time includes a Python call per node (resnet18 local on an
    H200: 11.4x eager against 5.2x as a CUDA graph), so the table says so."""
    from conv2attn.profile import ModelProfile, ProfileReport, execution
    from conv2attn.report import profile_table
    from conv2attn.runtime.base import GpuOptions

    assert execution("torch-cuda", GpuOptions()) == "eager"
    assert execution("torch-cuda", GpuOptions(cuda_graph=True)) == "CUDA graph"
    both = GpuOptions(cuda_graph=True, compile=True)
    assert execution("torch-cuda", both) == "torch.compile, CUDA graph"
    assert execution("trt", GpuOptions(cuda_graph=True)) == "CUDA graph"
    assert execution("trt", GpuOptions()) is None and execution("ort-cpu", GpuOptions()) is None
    stats = latency_stats([0.002] * 10, batch=1)
    models = [ModelProfile("a.onnx", stats, 1.0, None, None, None)]
    eager = ProfileReport("torch-cuda", 0, models, "fp16", "GPU", "eager")
    text = profile_table(eager)
    assert text.splitlines()[0] == "torch-cuda, fp16, GPU, eager"
    assert "--cuda-graph (or --compile) times the GPU's work alone" in text
    graphed = ProfileReport("torch-cuda", 0, models, "fp16", "GPU", "CUDA graph")
    assert "launches every node" not in profile_table(graphed)
    assert profile_table(graphed).splitlines()[0] == "torch-cuda, fp16, GPU, CUDA graph"
    assert json.loads(json.dumps(graphed.to_dict()))["execution"] == "CUDA graph"


def test_a_gpu_table_says_which_models_run_in_tiles(tmp_path):
    """Tiles keep a CPU's caches warm; on a GPU each tile is kernels of its own (resnet18
    local at batch 32 on an H200: 14.0 ms tiled, 4.9 ms with --no-tiles), so a GPU table
    names the tiled models and the option, and a CPU table does not."""
    from conv2attn.profile import ModelProfile, ProfileReport
    from conv2attn.report import profile_table

    model = conv_model(16, 16, pads=[1, 1, 1, 1], size=(96, 96))
    paths = [tmp_path / "tiled.onnx", tmp_path / "whole.onnx"]
    for path, tiles in zip(paths, [True, False]):
        converted, report = conv2attn.convert(model, attention="local", batch=8, tiles=tiles)
        assert (report.layers[0].tiles > 1) == tiles
        onnx.save(converted, str(path))
    timing = ["--iterations", "2", "--warmup", "0", "-q", "--json"]
    out = tmp_path / "p.json"
    assert main(["profile", *map(str, paths), "--batch", "8", *timing, str(out)]) == 0
    recorded = json.loads(out.read_text())
    assert recorded["tiled"] == [str(paths[0])]
    stats = latency_stats([0.002] * 10, batch=1)
    models = [ModelProfile(str(p), stats, 1.0) for p in paths]
    cpu = ProfileReport("ort-cpu", 2, models, tiled=recorded["tiled"])
    gpu = ProfileReport("torch-cuda", 0, models, "fp16", "GPU", "CUDA graph", recorded["tiled"])
    assert "--no-tiles" not in profile_table(cpu)
    note = profile_table(gpu).splitlines()[-1]
    assert note.startswith(f"{paths[0]}: local attention in tiles") and "--no-tiles" in note
    assert str(paths[1]) not in note
