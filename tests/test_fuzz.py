"""Fuzzing `convert`: mutated files and arbitrary Conv attributes.

Whatever it is given, the tool either converts with parity or exits 2 with one line
naming the problem; never an internal error (exit 3, a traceback) and never a hang
(hypothesis' deadline). CI runs a bounded number of cases; FUZZ_EXAMPLES raises it.
"""

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from conv2attn.cli import main
from conv2attn.validate import ATOL, RTOL, compare
from tests.helpers import assert_parity, chain_model, random_input, run

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=30_000,  # a hang is a failure
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
SEED_BYTES = chain_model().SerializeToString()


def convert_file(path, out) -> tuple[int, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["convert", str(path), "-o", str(out), "-q", "--force"])
    return code, stderr.getvalue()


def traceback_of(path, out) -> str:
    """The traceback that --debug shows, for the failure message."""
    import traceback

    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            main(["convert", str(path), "-o", str(out), "-q", "--force", "--debug"])
    except Exception:
        return traceback.format_exc()
    return "(no exception with --debug)"


def assert_converted_or_refused(path, out) -> None:
    code, err = convert_file(path, out)
    if code not in (0, 2) and os.environ.get("FUZZ_DUMP"):  # keep the case for a replay
        dump = Path(os.environ["FUZZ_DUMP"])
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"case-{len(list(dump.iterdir()))}.onnx").write_bytes(Path(path).read_bytes())
    assert code in (0, 2), f"exit {code}: {err}\n{traceback_of(path, out)}"
    assert "Traceback" not in err
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("conv2attn: error:")]
        assert len(lines) == 1, err
        assert not out.exists()
        return
    original = onnx.load(str(path))
    weights = [numpy_helper.to_array(t) for t in original.graph.initializer]
    if not all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
        return  # converted with a warning; with Inf or NaN weights there is no parity to hold
    feeds = random_input(original)
    try:
        reference = run(original, feeds)
    except Exception:  # onnxruntime may refuse what the checker accepts; nothing to compare
        return
    if not all(np.isfinite(r).all() for r in reference):
        return  # the original overflows (a weight near the float limit): no parity to hold
    # One Conv in float16: its outputs round to 11 bits, and a different summation order
    # may round one the other way, by one unit in the last place: at most 2**-10 of the
    # largest output.
    rtol = 2**-10 if reference[0].dtype == np.float16 else RTOL
    converted = run(str(out), feeds)
    if any(same_padding(node) for node in original.graph.node):
        # Where SAME asks for negative padding, onnxruntime departs from the ONNX
        # definition, which conv2attn follows (README, "One difference from onnxruntime").
        try:
            defined = ReferenceEvaluator(original).run(None, feeds)
        except Exception:  # attributes the reference refuses: onnxruntime's is the one
            defined = reference
        if compare("0", defined[0], converted[0]).within(rtol, ATOL):
            reference = defined
    assert_parity(reference, converted, rtol=rtol)


def same_padding(node: onnx.NodeProto) -> bool:
    return any(
        a.name == "auto_pad" and a.s.decode(errors="replace").startswith("SAME")
        for a in node.attribute
    )


@st.composite
def mutated_bytes(draw):
    data = bytearray(SEED_BYTES)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "splice" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 64))]
    return bytes(data)


@SETTINGS
@given(data=mutated_bytes())
def test_mutated_model_files(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "model.onnx"
    path.write_bytes(data)
    assert_converted_or_refused(path, folder / "out.onnx")
    assert path.read_bytes() == data  # the input is never touched


small = st.integers(-2, 6)


@st.composite
def conv_nodes(draw):
    """A Conv with arbitrary attributes: valid, invalid, or missing."""
    rank = draw(st.sampled_from([1, 2, 2, 3]))
    cin = draw(st.integers(1, 6))
    cout = draw(st.integers(1, 6))
    w_in = draw(st.integers(1, 6))
    kernel = [draw(st.integers(1, 5)) for _ in range(rank)]
    size = [draw(st.integers(0, 9)) for _ in range(rank)]  # zero-sized dims too
    attrs = {}
    if draw(st.booleans()):
        attrs["kernel_shape"] = draw(st.lists(small, min_size=max(1, rank - 1), max_size=rank + 1))
    if draw(st.booleans()):
        attrs["strides"] = draw(st.lists(small, min_size=rank, max_size=rank))
    if draw(st.booleans()):
        attrs["dilations"] = draw(st.lists(small, min_size=rank, max_size=rank))
    if draw(st.booleans()):
        attrs["pads"] = draw(st.lists(st.integers(-3, 4), min_size=2 * rank - 1, max_size=2 * rank))
    if draw(st.booleans()):
        attrs["auto_pad"] = draw(
            st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", "BOGUS"])
        )
    if draw(st.booleans()):
        attrs["group"] = draw(st.integers(-1, 7))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float16, np.float64]))
    weight = np.random.default_rng(0).standard_normal((cout, w_in, *kernel)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = ["x", "w"]
    initializers = [numpy_helper.from_array(weight, "w")]
    if draw(st.booleans()):
        bias_len = draw(st.sampled_from([cout, cout + 1]))
        initializers.append(numpy_helper.from_array(np.ones(bias_len, dtype), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "fuzz",
        [helper.make_tensor_value_info("x", elem, ["N", cin, *size])],
        [helper.make_tensor_value_info("y", elem, ["N", None, *([None] * rank)])],
        initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", draw(st.sampled_from([11, 13, 21])))]
    )


@SETTINGS
@given(model=conv_nodes())
def test_arbitrary_conv_attributes(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("fuzz_attrs")
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    assert_converted_or_refused(path, folder / "out.onnx")


def test_fuzz_inputs_include_the_interesting_cases():
    """The attribute strategy reaches invalid Convs, or the fuzz test proves little."""
    seen = set()

    @settings(max_examples=300, database=None, deadline=None)
    @given(conv_nodes())
    def collect(model):
        node = model.graph.node[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if any(p < 0 for p in attrs.get("pads", [])):
            seen.add("negative pads")
        if 0 in attrs.get("strides", []):
            seen.add("zero stride")
        if attrs.get("group", 1) not in (1,) and attrs.get("group", 1) > 1:
            seen.add("groups")
        if model.graph.initializer[0].data_type == TensorProto.DOUBLE:
            seen.add("double")
        dims = model.graph.input[0].type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            seen.add("zero-sized")

    collect()
    assert seen == {"negative pads", "zero stride", "groups", "double", "zero-sized"}
