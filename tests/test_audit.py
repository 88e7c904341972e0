"""What an independent audit and a first-time user found: each behaviour, pinned down.

Correctness first (a wrong or invalid file is never written with exit 0, inputs to the API
are never changed), then the conventions users bring from trtexec, Polygraphy and onnxsim,
then ``inspect`` and the HTML report.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.cli import build_parser, main
from conv2attn.graph import rewrite
from conv2attn.inputs import graph_inputs, parse_input_shapes
from conv2attn.inputs import random_samples as make_samples
from conv2attn.profile import time_runners
from conv2attn.validate import check, compare
from tests.helpers import assert_parity, chain_model, conv_model, run, save_model_file

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "models" / "digits_test.npz"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conv2attn", *map(str, args)], capture_output=True, text=True
    )


def one_line(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# -- 1. the written file is checked --------------------------------------------------------


def test_a_file_that_fails_the_check_is_exit_3_and_never_written(tmp_path, monkeypatch, capsys):
    source = save_model_file(chain_model(), tmp_path / "chain.onnx")
    emit = rewrite.emit_attention

    def invalid_softmax(*args, **kwargs):
        nodes = emit(*args, **kwargs)
        for node in nodes:
            if node.op == "Softmax":
                node.attrs["axis"] = 5  # beyond the rank: strict shape inference refuses it
        return nodes

    monkeypatch.setattr(rewrite, "emit_attention", invalid_softmax)
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(source), "-o", str(tmp_path / "out.onnx")]) == 3
    assert "fails onnx.checker" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before  # no output, no staging leftovers


def test_a_model_in_memory_that_fails_the_check_itself_is_bad_input_not_a_bug():
    """``convert`` takes a ModelProto unchecked (a file is checked as it loads); where the
    result fails the checker as the input already did, the input is named, not the tool."""
    model = conv_model()
    cast = helper.make_node("Cast", [model.graph.output[0].name], ["cast"], to=TensorProto.BFLOAT16)
    model.graph.node.append(cast)
    del model.graph.output[:]
    # declared float, made bfloat16: the checker refuses the output's type
    model.graph.output.append(helper.make_tensor_value_info("cast", TensorProto.FLOAT, None))
    with pytest.raises(
        conv2attn.errors.InputError, match=r"the input model fails onnx\.checker before"
    ):
        conv2attn.convert(model)


# -- 2. a window that reads padding only ---------------------------------------------------


def padding_only_model() -> onnx.ModelProto:
    """Input [1,1,1,4], kernel 3x2, strides 3x1, top pad 4: the one output row reads the
    padding only, so it holds the bias."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 2)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "b")
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], name="c", kernel_shape=[3, 2], strides=[3, 1],
        pads=[4, 0, 0, 0],
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "padding_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 1, 3])],
        [weight, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("attention", ["global", "local"])
@pytest.mark.parametrize("patch", ["auto", 1, 2, 3, "1x3", "2x1"])
def test_a_window_over_padding_only_converts_exactly(attention, patch):
    model = padding_only_model()
    converted, _ = conv2attn.convert(model, attention=attention, patch=patch)
    onnx.checker.check_model(converted, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 1, 1, 4)).astype(np.float32)}
    (expected,), (actual,) = run(model, feeds), run(converted, feeds)
    bias = numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_array_equal(
        expected, np.broadcast_to(bias[None, :, None, None], (1, 2, 1, 3))
    )
    np.testing.assert_array_equal(actual, expected)  # a copy of the bias: exact


def test_the_pytorch_layer_handles_windows_over_padding_only():
    torch = pytest.importorskip("torch")
    from conv2attn.trainable import ConvAttention

    conv = torch.nn.Conv2d(1, 2, (3, 2), stride=(3, 1), padding=(4, 0))
    x = torch.randn(2, 1, 1, 4)
    for patch in (1, 2):
        layer = ConvAttention.from_conv(conv, (1, 4), patch=patch)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)


# -- 3. generated names never collide with the model's own ---------------------------------


def test_names_of_the_model_are_never_reused():
    rng = np.random.default_rng(0)
    taken = "c/attn/pad/Pad_output_0"  # exactly what the Conv's Pad would be called
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], [taken], name="c/attn/Relu"),
            helper.make_node("Conv", [taken, "w"], ["y"], name="c", pads=[1, 1, 1, 1]),
        ],
        "collision",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for attention in ("global", "local"):
        converted, report = conv2attn.convert(model, attention=attention)
        onnx.checker.check_model(converted, full_check=True)
        node_names = [n.name for n in converted.graph.node]
        outputs = [o for n in converted.graph.node for o in n.output]
        assert len(set(node_names)) == len(node_names) and len(set(outputs)) == len(outputs)
        assert report.layers[0].name != "c"  # renamed, since the model uses c/attn
        feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
        assert_parity(run(model, feeds), run(converted, feeds))


# -- 4. the API never changes its inputs ---------------------------------------------------


def test_check_leaves_the_callers_models_as_they_were():
    original = onnx.load(str(DIGITS))
    converted, _ = conv2attn.convert(original)
    before = [o.SerializeToString() for o in (original, converted)]
    samples = make_samples(graph_inputs(original), 2, 0, {})
    for _ in range(2):
        report = check(original, converted, samples, per_layer=True)
        assert len(report.outputs) == 1 and len(report.layers) == 7
    assert [o.SerializeToString() for o in (original, converted)] == before


# -- 5. an output path the system refuses --------------------------------------------------


@pytest.mark.parametrize("folder", ["/proc", "/sys"])
def test_an_output_the_system_refuses_is_bad_input(folder, tmp_path):
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder} here")
    target = Path(folder) / "conv2attn-out"
    one_line(cli("convert", DIGITS, "-o", f"{target}.onnx"), 2, "cannot write")
    result = cli("convert", DIGITS, "-o", tmp_path / "d.onnx", "--json", f"{target}.json")
    one_line(result, 2, "cannot write")
    one_line(cli("check", DIGITS, DIGITS, "--json", f"{target}.json"), 2, "cannot write")
    assert not list(tmp_path.iterdir())


# -- 6. Inf and NaN ------------------------------------------------------------------------


def test_non_finite_values_are_counted_not_turned_into_error_figures():
    same = compare("y", np.array([1.0, np.inf, np.nan]), np.array([1.0, np.inf, np.nan]))
    assert same.within() and same.max_abs == 0 and same.nonfinite_reference == 2
    spread = compare("y", np.array([1.0, 2.0, 3.0]), np.array([1.0, np.nan, 3.0]))
    assert not spread.within() and spread.mismatched == 1 and spread.max_abs == 0
    signs = compare("y", np.array([np.inf]), np.array([-np.inf]))
    assert signs.mismatched == 1


def test_check_reports_non_finite_inputs_and_outputs(tmp_path, capsys):
    data = np.load(DIGITS_DATA)
    image = data["image"][:4].copy()
    image[0, 0, 5, 5] = np.inf
    inputs = tmp_path / "inf.npz"
    np.savez(inputs, image=image)
    converted = tmp_path / "digits_attn.onnx"
    assert main(["convert", str(DIGITS), "-o", str(converted), "-q"]) == 0
    report = tmp_path / "check.json"
    options = ["--inputs", str(inputs), "--per-layer", "--json", str(report)]
    main(["check", str(DIGITS), str(converted), *options])
    printed = capsys.readouterr().out
    assert "Inf/NaN orig/conv" in printed and "the inputs hold 1 Inf/NaN values" in printed
    result = json.loads(report.read_text())
    first = result["layers"][0]
    assert 0 < first["nonfinite_original"] < first["nonfinite_converted"]
    assert not first["within"] and np.isfinite(first["max_abs"])


# -- 7. dynamic sizes in check and profile -------------------------------------------------


@pytest.fixture
def dynamic_pair(tmp_path):
    model = conv_model(size=("H", "W"))
    original = save_model_file(model, tmp_path / "dyn.onnx")
    converted, _ = conv2attn.convert(model, input_shapes=["x:1x4x9x11"])
    return original, save_model_file(converted, tmp_path / "dyn_attn.onnx")


def test_check_and_profile_take_the_converted_size_and_refuse_a_bad_one(dynamic_pair):
    original, converted = dynamic_pair
    assert cli("check", original, converted).returncode == 0
    assert cli("profile", original, converted, "--iterations", "2", "--warmup", "0").returncode == 0
    one_line(cli("check", original, converted, "--input-shape", "x:1x1x1x1"), 2, "refused")
    result = cli("profile", original, converted, "--input-shape", "x:1x1x1x1", "--warmup", "0")
    one_line(result, 2, "refused the inputs")


# -- 8. unknown input names ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "check", "profile", "report", "inspect"])
def test_an_unknown_input_name_is_an_error_everywhere(command, tmp_path):
    args = {
        "convert": [DIGITS, "-o", tmp_path / "o.onnx"],
        "check": [DIGITS, DIGITS],
        "profile": [DIGITS, "--iterations", "2"],
        "report": [DIGITS, DIGITS, "-o", tmp_path / "r.html"],
        "inspect": [DIGITS],
    }[command]
    result = cli(command, *args, "--input-shape", "imge:1x1x32x32")
    one_line(result, 2, "no input 'imge' (inputs: image)")


# -- 9. input shapes as trtexec, onnxsim and Polygraphy write them -------------------------


def test_input_shapes_in_every_common_spelling():
    for text in ("x:1x3x224x224", "x:1,3,224,224", "x:[1,3,224,224]"):
        assert parse_input_shapes([text]) == {"x": (1, 3, 224, 224)}
    assert parse_input_shapes(["a:1x2,b:[3,4] c:5,6"]) == {"a": (1, 2), "b": (3, 4), "c": (5, 6)}
    assert parse_input_shapes(["input:0:1x3"]) == {"input:0": (1, 3)}  # TensorFlow names
    with pytest.raises(conv2attn.errors.InputError, match=r"'x:1x3,y:\[1,2': .*input:1,3,224,224"):
        parse_input_shapes(["x:1x3,y:[1,2"])


@pytest.mark.parametrize("alias", ["--input-shape", "--input-shapes", "--shapes"])
def test_input_shape_aliases(alias):
    parsed = build_parser().parse_args(["check", "a.onnx", "b.onnx", alias, "x:1,3"])
    assert parsed.input_shape == ["x:1,3"]


# -- 10. onnxsim's positional output; no abbreviations --------------------------------------


def test_positional_output_and_no_abbreviated_options(tmp_path):
    output = tmp_path / "positional.onnx"
    assert cli("convert", DIGITS, output, "-q").returncode == 0 and output.is_file()
    one_line(cli("convert", DIGITS, output, "-o", tmp_path / "o.onnx"), 2, "give one")
    result = cli("check", DIGITS, DIGITS, "--input", "image:1x1x32x32")
    assert result.returncode == 2 and "unrecognized arguments: --input" in result.stderr


# -- 11. JSON to stdout --------------------------------------------------------------------


def test_json_to_stdout_is_the_only_thing_on_stdout(tmp_path):
    converted = tmp_path / "d.onnx"
    runs = {
        "convert": cli("convert", DIGITS, "-o", converted, "--json", "-"),
        "check": cli("check", DIGITS, converted, "--json", "-"),
        "profile": cli("profile", DIGITS, "--iterations", "2", "--warmup", "0", "--json", "-"),
        "inspect": cli("inspect", DIGITS, "--json", "-"),
    }
    for command, result in runs.items():
        assert result.returncode == 0, (command, result.stderr)
        assert isinstance(json.loads(result.stdout), dict), command
    assert not (Path.cwd() / "-").exists()


# -- 12. profile: results with -q, the whole distribution, warm-up units, progress ----------


def test_profile_quiet_still_prints_results_with_min_p95_max(tmp_path):
    result = cli("profile", DIGITS, "--iterations", "4", "--warmup", "50ms", "-q", "--json",
                 tmp_path / "p.json")  # fmt: skip
    assert result.returncode == 0 and result.stderr == ""
    for column in ("median ms", "min ms", "p95 ms", "max ms"):
        assert column in result.stdout
    stats = json.loads((tmp_path / "p.json").read_text())["models"][0]["stats"]
    assert stats["min_ms"] <= stats["median_ms"] <= stats["p95_ms"] <= stats["max_ms"]


def test_warmup_takes_a_unit_and_refuses_a_trtexec_millisecond_count():
    parsed = build_parser().parse_args(["profile", "m.onnx", "--warmup", "200ms"])
    assert parsed.warmup == pytest.approx(0.2)
    assert build_parser().parse_args(["profile", "m.onnx", "--warmup", "2s"]).warmup == 2.0
    assert build_parser().parse_args(["profile", "m.onnx", "--warmup", "1.5"]).warmup == 1.5
    result = cli("profile", "m.onnx", "--warmup", "200")
    assert result.returncode == 2 and "write 200ms or 200s" in result.stderr


def test_timing_reports_progress():
    class Runner:
        def run(self):
            pass

        def timed_block(self, count):
            return [1e-3] * count

    seen = []
    time_runners([Runner(), Runner()], iterations=10, duration=None, block=3, warmup=0,
                 progress=lambda done, total, label: seen.append((done, total, label)))  # fmt: skip
    assert seen[-1] == (10, 10, "runs") and [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)


# -- 13. demo -o creates its folder; the README's outputs are ignored by git ----------------


def test_demo_creates_its_output_folder(tmp_path):
    target = tmp_path / "new" / "demo_out"
    result = cli("demo", "-o", target, "-q")
    assert result.returncode == 0, result.stderr
    assert (target / "digits_cnn_attn.onnx").is_file()


def test_files_the_readme_writes_into_the_checkout_are_ignored():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    written = ["digits_attn.onnx", "digits_cnn_attn.onnx", "digits_cnn_report.html"]
    assert all(name in readme or "demo" in readme for name in written)
    result = subprocess.run(
        ["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True
    )
    assert sorted(result.stdout.split()) == sorted(written)


# -- 14. growth warning for a forced patch, tolerances, --version ---------------------------


def test_a_forced_patch_beyond_the_growth_budget_warns(caplog):
    with caplog.at_level(logging.WARNING):
        conv2attn.convert(onnx.load(str(DIGITS)), patch=8)
    assert any("with --patch 8 exceeds --max-param-growth 4" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        conv2attn.convert(onnx.load(str(DIGITS)), patch=1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("option", ["--rtol", "--atol"])
def test_negative_tolerances_are_refused(option):
    one_line(cli("check", DIGITS, DIGITS, f"{option}=-1e-5"), 2, "must be zero or positive")
    one_line(cli("check", DIGITS, DIGITS, option, "-0.1"), 2, "must be zero or positive")


@pytest.mark.parametrize("command", ["convert", "inspect", "check", "profile", "report", "demo"])
def test_every_command_has_version(command):
    result = cli(command, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"conv2attn {conv2attn.__version__}"


# -- 15. the HTML report -------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    folder = tmp_path_factory.mktemp("report")
    converted = folder / "digits_local.onnx"
    assert main(["convert", str(DIGITS), "-o", str(converted), "--attention", "local", "-q"]) == 0
    checked = folder / "check.json"
    main(["check", str(DIGITS), str(converted), "--inputs", str(DIGITS_DATA), "--per-layer",
          "--json", str(checked), "-q"])  # fmt: skip
    return folder, converted, checked


def test_report_describes_the_local_layers_real_grid_and_block(local_report):
    from conv2attn.visual_report import attention_picture

    _, converted, _ = local_report
    model = onnx.load(str(converted))
    layer = conv2attn.record.converted_layers(model)[0]
    feeds = make_samples(graph_inputs(model), 1, 0, {}).feeds
    picture = attention_picture(onnx.load(str(DIGITS)), model, layer, feeds)
    text = picture.describe()
    grid, block = "x".join(map(str, layer["token_grid"])), "x".join(map(str, layer["block"]))
    assert f"{grid} token grid" in text and f"blocks of {block} queries" in text


def text_of(page: Path) -> str:
    return re.sub(r"<[^>]+>", "", page.read_text())


def test_report_parity_says_where_it_comes_from(local_report):
    folder, converted, checked = local_report
    page = folder / "r.html"
    assert main(["report", str(DIGITS), str(converted), "-o", str(page), "-q"]) == 0
    assert "computed for this report: 2 samples, random (seed 0)" in text_of(page)
    assert main(["report", str(DIGITS), str(converted), "-o", str(page), "--force", "-q",
                 "--check", str(checked)]) == 0  # fmt: skip
    text = text_of(page)
    assert f"from {checked}" in text and "450 samples" in text
    one_line(cli("report", DIGITS, converted, "-o", folder / "x.html", "--check", DIGITS), 2,
             "not a readable check JSON")  # fmt: skip


def test_report_numbers_do_not_wrap_and_legends_do_not_cover_bars(local_report):
    from conv2attn.visual_report import NUMBER, STYLE, _unbroken_numbers, charts, gather

    _, converted, _ = local_report
    assert "white-space:nowrap" in STYLE.split("td,th{")[1].split("}")[0]
    wrapped = _unbroken_numbers("max rel 2.15e-07 (450 samples), 147.46k -> 1.27M (8.60x)")
    for number in ("2.15e-07", "450", "147.46k", "1.27M", "8.60x"):
        assert f'<span class="n">{number}</span>' in wrapped
    assert NUMBER.fullmatch("98.89%") and not NUMBER.search("node_Conv_105")

    original, model = onnx.load(str(DIGITS)), onnx.load(str(converted))
    samples = make_samples(graph_inputs(original), 2, 0, {})
    data = gather(DIGITS, converted, original, model, samples)
    for name, figure in charts(data).items():
        if name == "attention":
            continue
        figure.canvas.draw()
        ax = figure.axes[0]
        legend = ax.get_legend().get_window_extent()
        for bar in ax.patches:
            assert not legend.overlaps(bar.get_window_extent()), name


# -- 16. inspect ---------------------------------------------------------------------------


def test_inspect_describes_inputs_convs_and_plan_and_writes_nothing(tmp_path):
    model = conv_model(size=("H", "W"))
    path = save_model_file(model, tmp_path / "dyn.onnx")
    before = sorted(os.listdir(tmp_path))
    result = cli("inspect", path, "--json", "-")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert described["inputs"][0]["dims"] == ["N", 4, "H", "W"]
    assert described["inputs"][0]["dynamic"] == [True, False, True, True]
    (conv,) = described["convs"]
    assert conv["converts"] and conv["attributes"]["kernel_shape"] == [3, 3]
    (planned,) = described["plan"]["layers"]
    assert planned["dynamic"] and planned["input_size"] == [224, 224]  # the nominal size

    pinned = cli("inspect", path, "--input-shape", "x:1x4x9x11", "--attention", "local")
    assert pinned.returncode == 0
    for text in ("dynamic", "converts", "yes", "plan (what convert would do)", "heads"):
        assert text in pinned.stdout, text
    layer = json.loads(cli("inspect", path, "--input-shape", "x:1x4x9x11", "--json", "-").stdout)[
        "plan"
    ]["layers"][0]
    _, report = conv2attn.convert(model, input_shapes=["x:1x4x9x11"])
    assert layer["patch"] == list(report.layers[0].patch)
    assert layer["macs_after"] == report.layers[0].macs_after
    assert sorted(os.listdir(tmp_path)) == before


def test_shape_inference_leaves_nothing_in_the_working_folder(tmp_path, monkeypatch):
    """onnxruntime's symbolic inference saves an incomplete result (a model and external
    data files) into the working folder; the pass runs it in a scratch folder."""
    from conv2attn.graph.shapes import _symbolic_inference

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    unknown = onnx.helper.make_node("Mystery", ["x"], ["y"], domain="example.custom")
    graph = onnx.helper.make_graph([unknown], "g", [x], [y])
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", 13),
            onnx.helper.make_opsetid("example.custom", 1),
        ],
    )
    monkeypatch.chdir(tmp_path)
    _symbolic_inference(model)
    assert list(tmp_path.iterdir()) == []
    assert os.getcwd() == str(tmp_path)
