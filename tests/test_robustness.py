"""Trustworthiness: terminal output, determinism, every command's bad input, untrusted files."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conv2attn.report import format_table
from conv2attn.terminal import Progress
from tests.helpers import chain_model, conv_model

MODELS = Path(__file__).resolve().parent.parent / "models"
COMMANDS = ["convert", "check", "profile", "report", "demo"]


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "conv2attn", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_appears_on_a_terminal_only_after_a_second():
    now = [0.0]
    stream = FakeTerminal()
    progress = Progress("converting", stream=stream, clock=lambda: now[0])
    progress(1, 10, "conv1")
    assert stream.getvalue() == ""  # quick tasks print nothing
    now[0] = 1.5
    progress(5, 10, "conv5")
    assert "\rconverting [############............] 5/10 conv5" in stream.getvalue()
    progress.close()
    assert stream.getvalue().endswith("\r")
    piped = io.StringIO()  # not a terminal
    quiet = Progress("converting", stream=piped, clock=lambda: now[0], delay=0)
    quiet(1, 2)
    assert piped.getvalue() == ""


def test_colour_only_when_asked():
    rows = [["a", "within"], ["x", "NO"]]
    assert "\033[" not in format_table(rows, [False, False])
    coloured = format_table(rows, [False, False], colour=True)
    assert "\033[1m" in coloured and "\033[31mNO" in coloured


def test_pipes_get_plain_text_without_progress(tmp_path):
    source = tmp_path / "chain.onnx"
    onnx.save(chain_model(), str(source))
    result = cli("convert", source, "-o", tmp_path / "out.onnx")
    assert result.returncode == 0
    assert "\033[" not in result.stdout and "\r" not in result.stderr


def test_converting_twice_gives_byte_identical_files(tmp_path):
    source = tmp_path / "chain.onnx"
    onnx.save_model(chain_model(), str(source))
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        assert cli("convert", source, "-o", tmp_path / name, "-q").returncode == 0
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command):
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "example" in result.stdout
    assert cli("--version").stdout.startswith("conv2attn ")


def bad_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01garbage")
    return {"not ONNX": garbage, "missing": tmp_path / "missing.onnx", "directory": tmp_path}


@pytest.mark.parametrize("command", ["check", "profile", "report"])
def test_every_command_refuses_bad_models_in_one_line(tmp_path, command):
    good = tmp_path / "good.onnx"
    onnx.save(chain_model(), str(good))
    for label, bad in bad_files(tmp_path).items():
        if command == "profile":
            args = [command, bad]
        elif command == "report":
            args = [command, good, bad, "-o", tmp_path / "r.html"]
        else:
            args = [command, good, bad]
        result = cli(*args)
        assert result.returncode == 2, (label, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("conv2attn: error:"), (label, result.stderr)
        assert "Traceback" not in result.stderr


def single_conv(tmp_path, dtype, name="conv"):
    """A Conv whose input and weights have ``dtype`` (ONNX allows only float types)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weight = numpy_helper.from_array(np.ones((2, 2, 3, 3), dtype), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name=name, pads=[1] * 4)],
        "g",
        [helper.make_tensor_value_info("x", elem, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", elem, [1, 2, 5, 5])],
        [weight],
    )
    path = tmp_path / f"{np.dtype(dtype).name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize(("dtype", "message"), [(np.float64, "float64"), (np.int8, "int8")])
def test_unsupported_dtypes_are_named(tmp_path, dtype, message):
    result = cli("convert", single_conv(tmp_path, dtype), "-o", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert f"conv: dtype {message} is not supported (float32 and float16 are)" in result.stderr


def test_zero_sized_spatial_dims_are_refused(tmp_path):
    path = tmp_path / "empty.onnx"
    onnx.save(conv_model(size=(0, 5)), str(path))
    result = cli("convert", path, "-o", tmp_path / "out.onnx")
    assert result.returncode == 2
    assert "Conv 'conv': input spatial size [0, 5] must be positive" in result.stderr


def with_pads(model: onnx.ModelProto, pads: list[int]) -> onnx.ModelProto:
    model.graph.node[0].attribute.append(helper.make_attribute("pads", pads))
    return model


def test_auto_pad_and_pads_that_disagree_are_refused(tmp_path):
    """ONNX forbids auto_pad with pads, and runtimes differ in which they follow: the Conv
    is refused by name, nothing is written. Pads that say what auto_pad says convert."""
    path, out = tmp_path / "both.onnx", tmp_path / "out.onnx"
    onnx.save(with_pads(conv_model(auto_pad="SAME_LOWER"), [3, 1, 0, 0]), str(path))
    result = cli("convert", path, "-o", out)
    assert result.returncode == 2
    assert (
        "Conv 'conv': auto_pad SAME_LOWER and pads [3, 1, 0, 0] are both set and disagree "
        "(SAME_LOWER pads [1, 1, 1, 1] here)" in result.stderr
    )
    assert not out.exists()
    onnx.save(with_pads(conv_model(auto_pad="SAME_LOWER"), [1, 1, 1, 1]), str(path))
    result = cli("convert", path, "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.exists()


# Runs a command with an audit hook that reports every file the process opens.
WATCH_OPENS = """
import sys, runpy
watched = sys.argv.pop(1)
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and watched in str(args[0]):
        print("OPENED", args[0], file=sys.stderr)
sys.addaudithook(hook)
sys.argv = ["conv2attn", *sys.argv[1:]]
runpy.run_module("conv2attn", run_name="__main__")
"""


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_leading_outside_is_refused_before_reading(tmp_path, kind):
    work = tmp_path / "work"
    work.mkdir()
    secret = tmp_path / "secret.bin"  # outside the model's folder
    model = conv_model()
    weight = numpy_helper.to_array(model.graph.initializer[0])
    secret.write_bytes(weight.tobytes())
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[kind]
    if kind == "symlink":
        os.symlink(secret, work / "link.bin")
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = work / "model.onnx"
    path.write_bytes(model.SerializeToString())
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            WATCH_OPENS,
            "secret.bin",
            "convert",
            str(path),
            "-o",
            str(work / "out.onnx"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "refused" in result.stderr
    assert "OPENED" not in result.stderr  # not even opened
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_is_refused(tmp_path):
    source = tmp_path / "chain.onnx"
    onnx.save(chain_model(), str(source))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = cli("convert", source, "-o", locked / "out.onnx")
    assert result.returncode == 2 and "not writable" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["convert"],
        ["convert", "m.onnx", "--patch"],
        ["nonsense"],
        ["profile", "m.onnx", "--batch", "x"],
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args):
    result = cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], result.stderr
