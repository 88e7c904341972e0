"""The command line: options, output, and bad input (one line, exit 2, nothing lost)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.cli import main
from conv2attn.graph import rewrite
from tests.helpers import assert_parity, chain_model, conv_model, random_input, run

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def chain(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(chain_model(), str(path))
    return path


def snapshot(path: Path):
    return path.read_bytes(), path.stat().st_mtime_ns


def test_convert_writes_model_table_and_report(chain, tmp_path, capsys):
    before = snapshot(chain)
    out = tmp_path / "out.onnx"
    assert main(["convert", str(chain), "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    for column in (
        "Conv",
        "kernel",
        "stride",
        "groups",
        "patch",
        "heads",
        "tokens",
        "MACs",
        "params",
    ):
        assert column in printed
    assert "total (3 converted)" in printed
    assert snapshot(chain) == before
    report = json.loads((tmp_path / "r.json").read_text())
    layer = report["layers"][0]
    for key in (
        "name",
        "kernel",
        "strides",
        "groups",
        "patch",
        "heads",
        "tokens",
        "macs_before",
        "macs_after",
        "params_before",
        "params_after",
    ):
        assert key in layer
    assert report["totals"]["macs_after"] == sum(x["macs_after"] for x in report["layers"])
    feeds = random_input(chain_model())
    assert_parity(run(str(chain), feeds), run(str(out), feeds))


def test_default_output_name_and_force(chain):
    assert main(["convert", str(chain), "-q"]) == 0
    default = chain.with_name("chain_attn.onnx")
    assert default.exists()
    stamp = default.stat().st_mtime_ns
    assert main(["convert", str(chain), "-q"]) == 2  # exists: refused without --force
    assert default.stat().st_mtime_ns == stamp
    assert main(["convert", str(chain), "-q", "--force", "--patch", "1"]) == 0


def test_cli_options_reach_the_converter(chain, tmp_path):
    out = tmp_path / "out.onnx"
    code = main(
        [
            "convert",
            str(chain),
            "-o",
            str(out),
            "-q",
            "--patch",
            "1x2",
            "--exclude",
            "skip",
            "--input-shape",
            "x:2x3x16x16",
        ]
    )
    assert code == 0
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node].count("Conv") == 1
    record = json.loads(model.metadata_props[-1].value)
    assert {tuple(layer["patch"]) for layer in record["layers"]} == {(1, 2)}
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 16, 16]


def write_bytes(tmp_path, data: bytes) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    return path


def no_conv_model(tmp_path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


BAD_INPUTS = {
    "not-onnx": (
        lambda t: write_bytes(t, b"this is not a protobuf\xff\xfe"),
        "not a valid ONNX model",
    ),
    "truncated": (
        lambda t: write_bytes(t, chain_model().SerializeToString()[:300]),
        "not a valid ONNX model",
    ),
    "empty": (lambda t: write_bytes(t, b""), "file is empty"),
    "missing": (lambda t: t / "absent.onnx", "no such file"),
    "directory": (lambda t: t, "is a directory"),
    "no-conv": (no_conv_model, "no Conv node"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    make, message = case
    source = make(tmp_path)
    before = snapshot(source) if source.is_file() else None
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "conv2attn", "convert", str(source), "-o", str(out_dir / "o.onnx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(out_dir.iterdir()) == []
    if before is not None:
        assert snapshot(source) == before


def test_output_equal_to_input_is_refused(chain, capsys):
    before = snapshot(chain)
    assert main(["convert", str(chain), "-o", str(chain), "--force"]) == 2
    assert "output is the input model" in capsys.readouterr().err
    assert snapshot(chain) == before


def test_output_in_missing_folder_is_refused(chain, capsys):
    assert main(["convert", str(chain), "-o", str(chain.parent / "nope" / "o.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_dynamic_size_converts_and_stays_dynamic(tmp_path, capsys):
    path = tmp_path / "dynamic.onnx"
    onnx.save(conv_model(size=("H", "W")), str(path))
    assert main(["convert", str(path), "-o", str(tmp_path / "o.onnx")]) == 0
    out = capsys.readouterr().out
    assert "keep dynamic sizes" in out
    # the one layer's input at the default nominal input: what its plan is for
    assert "at the nominal input size (224x224; --nominal-shape to change it)" in out
    dims = onnx.load(str(tmp_path / "o.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["H", "W"]


def test_failure_while_writing_leaves_no_partial_file(chain, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    assert main(["convert", str(chain), "-o", str(out), "-q"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx"]


def test_internal_error_is_exit_3_with_debug_hint(chain, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(rewrite, "emit_attention", broken)
    assert main(["convert", str(chain), "-o", str(tmp_path / "o.onnx")]) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["convert", str(chain), "-o", str(tmp_path / "o.onnx"), "--debug"])


def test_help_version_and_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "conv2attn", "convert", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--input-shape" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "conv2attn", "--version"], capture_output=True, text=True
    )
    assert result.stdout.strip() == f"conv2attn {conv2attn.__version__}"


def test_shipped_digits_model_converts(tmp_path):
    out = tmp_path / "digits_attn.onnx"
    assert main(["convert", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "-q"]) == 0
    model = onnx.load(str(out))
    assert "Conv" not in [n.op_type for n in model.graph.node]


def test_non_finite_weights_convert_with_a_warning(tmp_path):
    model = conv_model()
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight[0, 0, 0, 0] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "w"))
    path = tmp_path / "inf.onnx"
    onnx.save(model, str(path))
    result = subprocess.run(
        [sys.executable, "-m", "conv2attn", "convert", str(path), "-o", str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert "Conv 'conv': weights contain NaN or Inf" in result.stderr
