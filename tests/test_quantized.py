"""Integer Convs (ConvInteger, QLinearConv) become integer attention, bit-identical.

Random integer Convs (the property test's Conv table, with random types, zero points,
scales and biases) are compared with the ONNX definition, computed independently: a
float64 convolution of the centred integers (exact), then QLinearConv's requantisation
in numpy. Where onnxruntime runs the operator the definition is checked against it too.
Real models are quantized with onnxruntime's own tools and compared output for output.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import conv2attn
from conv2attn.cli import main
from conv2attn.record import converted_layers
from conv2attn.validate import Samples, check, default_tolerance, exact_integer_convs
from tests.helpers import assert_same_arithmetic, conv_model, save_model_file
from tests.test_property import check_queries, conv_configs, onnxruntime_deviates

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "150"))
DIGITS = os.path.join(os.path.dirname(__file__), "..", "models", "digits_cnn.onnx")
DIGITS_DATA = os.path.join(os.path.dirname(__file__), "..", "models", "digits_test.npz")


def run(model: onnx.ModelProto, feeds: dict, optimize: bool = False) -> list[np.ndarray]:
    """onnxruntime's outputs, integer Convs over uint8 as the check runs them
    (``exact_integer_convs``: the ONNX definition on any x86 CPU)."""
    model = exact_integer_convs(model)
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)


def integer_conv(config: dict, draw_values: dict) -> tuple[onnx.ModelProto, dict]:
    """The float Conv of ``config`` as ``draw_values['op']``, with integer weights."""
    m = config["model"]
    v = draw_values
    rng = np.random.default_rng(v["seed"])
    x_type, w_type = np.dtype(v["x_type"]), np.dtype(v["w_type"])
    float_model = conv_model(**{**m, "bias": False})
    conv = float_model.graph.node[0]
    shape = numpy_helper.to_array(float_model.graph.initializer[0]).shape
    out_channels = shape[0]
    w_info = np.iinfo(w_type)
    weight = rng.integers(w_info.min, w_info.max + 1, shape).astype(w_type)
    x_zero = np.array(rng.integers(0, 20) if x_type.kind == "u" else rng.integers(-10, 10))
    x_zero = x_zero.astype(x_type)
    if v["per_channel"]:
        w_zero = rng.integers(0, 4, out_channels).astype(w_type)
    else:
        w_zero = np.array(rng.integers(0, 4)).astype(w_type)
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    const = numpy_helper.from_array
    initializers = [const(weight, "w"), const(x_zero, "x_zero"), const(w_zero, "w_zero")]
    if v["op"] == "ConvInteger":
        inputs, y_type = ["x", "w", "x_zero", "w_zero"], np.dtype(np.int32)
    else:
        y_type = x_type
        w_scale = rng.uniform(0.001, 0.02, out_channels if v["per_channel"] else ())
        initializers += [
            const(np.array(rng.uniform(0.005, 0.05), np.float32), "x_scale"),
            const(np.asarray(w_scale, np.float32), "w_scale"),
            const(np.array(rng.uniform(0.05, 2.0), np.float32), "y_scale"),
            const(np.array(rng.integers(0, 30)).astype(y_type), "y_zero"),
        ]
        inputs = ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]
        if v["bias"]:
            bias = rng.integers(-3000, 3000, out_channels).astype(np.int32)
            initializers.append(const(bias, "bias"))
            inputs.append("bias")
    node = helper.make_node(v["op"], inputs, ["y"], name="qconv", **attrs)
    x_dims = [config["batch"], *float_model.graph.input[0].type.tensor_type.shape.dim[1:]]
    graph = helper.make_graph(
        [node],
        "integer_conv",
        [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x_type), None)],
        [
            helper.make_tensor_value_info(
                "y", helper.np_dtype_to_tensor_dtype(y_type), [None] * len(shape)
            )
        ],
        initializers,
    )
    dims = [d if isinstance(d, int) else d.dim_value for d in x_dims]
    graph.input[0].type.tensor_type.shape.dim.extend(
        [onnx.TensorShapeProto.Dimension(dim_value=d) for d in dims]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x_info = np.iinfo(x_type)
    feeds = {"x": rng.integers(x_info.min, x_info.max + 1, dims).astype(x_type)}
    return model, feeds


def definition(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """The operator's output as ONNX defines it (pads hold the input zero point)."""
    node = model.graph.node[0]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = dict(zip(("x", "w", "x_zero", "w_zero"), ("x", "w", "x_zero", "w_zero")))
    weight, w_zero = values[names["w"]], values["w_zero"]
    centred_w = weight.astype(np.float64) - w_zero.astype(np.float64).reshape(
        -1, *([1] * (weight.ndim - 1))
    )
    centred_x = feeds["x"].astype(np.float64) - values["x_zero"].astype(np.float64)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], **{
        a.name: helper.get_attribute_value(a) for a in node.attribute
    })  # fmt: skip
    graph = helper.make_graph(
        [conv], "definition",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None)],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
        [numpy_helper.from_array(centred_w, "w")],
    )  # fmt: skip
    reference = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    accumulated = ReferenceEvaluator(reference).run(None, {"x": centred_x})[0]
    accumulated = np.rint(accumulated).astype(np.int64)  # exact: integers below 2^53
    if node.op_type == "ConvInteger":
        return accumulated.astype(np.int32)
    if "bias" in values:
        accumulated = accumulated + values["bias"].reshape(1, -1, *([1] * (weight.ndim - 2)))
    w_scale = np.broadcast_to(values["w_scale"], (weight.shape[0],))
    multiplier = (values["x_scale"] * w_scale / values["y_scale"]).astype(np.float32)
    scaled = accumulated.astype(np.float32) * multiplier.reshape(1, -1, *[1] * (weight.ndim - 2))
    y_zero = values["y_zero"]
    info = np.iinfo(y_zero.dtype)
    return np.clip(np.rint(scaled) + int(y_zero), info.min, info.max).astype(y_zero.dtype)


@st.composite
def integer_configs(draw, ranks=(2,)):
    config = draw(conv_configs(ranks=ranks))
    x_type = draw(st.sampled_from(["uint8", "int8"]))
    values = {
        "op": draw(st.sampled_from(["ConvInteger", "QLinearConv"])),
        "x_type": x_type,
        "w_type": draw(st.sampled_from(["int8", "uint8"])) if x_type == "uint8" else "int8",
        "per_channel": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 999)),
    }
    return config, values


def check_integer(config: dict, values: dict) -> None:
    model, feeds = integer_conv(config, values)
    expected = definition(model, feeds)
    converted, report = conv2attn.convert(
        model,
        patch=config["patch"],
        attention=config["attention"],
        block=config["block"],
        queries=config["queries"],
    )
    assert [layer.integer for layer in report.layers] == [values["op"]]
    check_queries(config, report.layers[0])
    assert values["op"] not in [n.op_type for n in converted.graph.node]
    (actual,) = run(converted, feeds)
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)
    onnxruntime_runs_it = not (values["op"] == "ConvInteger" and values["per_channel"])
    if onnxruntime_runs_it and not onnxruntime_deviates(config["model"]):
        np.testing.assert_array_equal(run(model, feeds)[0], expected)  # the definition holds


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(integer_configs())
def test_random_integer_convs_are_bit_identical(case):
    config, values = case
    check_integer(config, values)


@settings(
    max_examples=max(EXAMPLES // 3, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(integer_configs(ranks=(1, 3)))
def test_random_1d_and_3d_integer_convs_are_bit_identical(case):
    config, values = case
    assume(values["op"] == "QLinearConv" or config["model"]["kernel"])
    check_integer(config, values)


# -- models quantized by onnxruntime's own tools --------------------------------------------


def quantized(source: str, folder, kind: str, samples: np.ndarray, name: str) -> str:
    """``source`` quantized: ``dynamic`` (ConvInteger), ``static`` or ``static-per-channel``
    (QLinearConv, QOperator format, calibrated on ``samples``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    target = str(folder / f"{kind}.onnx")
    if kind == "dynamic":
        quantize_dynamic(source, target, op_types_to_quantize=["Conv"], weight_type=QuantType.QInt8)
        return target

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: samples[i : i + 1]} for i in range(len(samples))])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        source,
        target,
        Reader(),
        quant_format=QuantFormat.QOperator,
        per_channel=kind == "static-per-channel",
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return target


def integer_conv_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("ConvInteger", "QLinearConv") for n in model.graph.node)


def assert_bit_identical(source: str, attention: str, feeds: dict) -> None:
    original = onnx.load(source)
    converted, report = conv2attn.convert(original, attention=attention)
    count = integer_conv_count(original)
    assert count and len(report.layers) == count and not report.skipped
    assert integer_conv_count(converted) == 0
    # every integer Conv's output, not only the model's (read channels-last where the
    # converted model keeps it so, and compared as NCHW)
    layers = report.layers
    original.graph.output.extend(onnx.ValueInfoProto(name=layer.output) for layer in layers)
    converted.graph.output.extend(
        onnx.ValueInfoProto(name=layer.output_channels_last or layer.output) for layer in layers
    )
    outputs = len(original.graph.output) - len(layers)
    last = [False] * outputs + [bool(layer.output_channels_last) for layer in layers]
    for optimize in (False, True):
        expected, actual = run(original, feeds, optimize), run(converted, feeds, optimize)
        for index, (a, b, moved) in enumerate(zip(expected, actual, last)):
            if optimize and index < outputs:
                # the model's own outputs: float layers after the integer ones may read a
                # channels-last tensor through a Transpose, which onnxruntime's optimiser
                # moves past a ReduceMean, summing in another order
                assert_same_arithmetic([a], [b])
                continue
            np.testing.assert_array_equal(a, b.transpose(0, 3, 1, 2) if moved else b)


@pytest.mark.parametrize("kind", ["dynamic", "static", "static-per-channel"])
@pytest.mark.parametrize("attention", ["global", "local"])
def test_quantized_digits_model_is_bit_identical_on_its_test_split(kind, attention, tmp_path):
    images = np.load(DIGITS_DATA)["image"]
    source = quantized(DIGITS, tmp_path, kind, images[:16], "image")
    rng = np.random.default_rng(0)
    assert_bit_identical(source, attention, {"image": images})  # real inputs
    random = rng.standard_normal((4, *images.shape[1:])).astype(np.float32)
    assert_bit_identical(source, attention, {"image": random})


def photos(size: int) -> np.ndarray:
    """scikit-image's sample photographs, resized and normalised like ImageNet inputs."""
    from skimage import data, transform

    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    batch = np.stack([transform.resize(i, (size, size), anti_aliasing=True) for i in images])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((batch - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("kind", ["dynamic", "static-per-channel"])
def test_quantized_torchvision_models_are_bit_identical(name, kind, tmp_path):
    pytest.importorskip("torchvision")
    from tools.torchvision_models import export

    source = export(name, tmp_path / f"{name}.onnx", dynamo=False)
    images = photos(224)
    model = quantized(str(source), tmp_path, kind, images[:2], "input")
    attention = "local" if name == "mobilenet_v2" else "global"  # depthwise: local's form
    random = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    for feeds in ({"input": images}, {"input": random}):
        assert_bit_identical(model, attention, feeds)


def extreme_integer_conv(op: str) -> onnx.ModelProto:
    """uint8 inputs against int8 weights of 127 and -128 over 16 input channels: the
    products of one pair of channels pass 16 bits (2 x 255 x 127 > 32767)."""
    weight = np.where(np.arange(16 * 9 * 4).reshape(4, 16, 3, 3) % 3, 127, -128).astype(np.int8)
    zeros = [numpy_helper.from_array(np.array(0, np.uint8), "x_zero")]
    zeros.append(numpy_helper.from_array(np.array(0, np.int8), "w_zero"))
    inits = [numpy_helper.from_array(weight, "w"), *zeros]
    if op == "ConvInteger":
        node = helper.make_node(op, ["x", "w", "x_zero", "w_zero"], ["y"], "conv", pads=[1] * 4)
        out = TensorProto.INT32
    else:
        scales = {"x_scale": 0.5, "w_scale": 0.25, "y_scale": 4096.0}
        inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scales.items()]
        inits.append(numpy_helper.from_array(np.array(128, np.uint8), "y_zero"))
        inputs = ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]
        node = helper.make_node(op, inputs, ["y"], "conv", pads=[1] * 4)
        out = TensorProto.UINT8
    graph = helper.make_graph(
        [node],
        "extreme",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 16, 5, 5])],
        [helper.make_tensor_value_info("y", out, [1, 4, 5, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("op", ["ConvInteger", "QLinearConv"])
def test_uint8_inputs_by_int8_weights_stay_exact_at_the_extremes(op):
    """Where onnxruntime's uint8-by-int8 kernels saturate (x86 CPUs without VNNI), the
    converted model holds W_O as uint8 and gives the ONNX definition, and so does the
    check's run of the original (``exact_integer_convs``)."""
    model = extreme_integer_conv(op)
    feeds = {"x": np.full((1, 16, 5, 5), 255, np.uint8)}
    (expected,) = ReferenceEvaluator(model).run(None, feeds)
    for attention in ("global", "local"):
        converted, _ = conv2attn.convert(model, attention=attention)
        products = [n for n in converted.graph.node if n.op_type == "MatMulInteger"]
        weights = {t.name: t for t in converted.graph.initializer}
        assert products and all(
            weights[n.input[1]].data_type == TensorProto.UINT8 for n in products
        )
        np.testing.assert_array_equal(run(converted, feeds)[0], expected)
    exact = exact_integer_convs(model)
    assert exact is not model and model.graph.initializer[0].data_type == TensorProto.INT8
    np.testing.assert_array_equal(
        ort.InferenceSession(exact.SerializeToString()).run(None, feeds)[0], expected
    )
    result = check(model, conv2attn.convert(model)[0], Samples(feeds, None, "given"))
    assert result.passed


# -- what check, convert and report say about integer layers ------------------------------


def test_integer_outputs_are_held_to_exact_equality(tmp_path, capsys):
    assert default_tolerance(np.dtype(np.int32)) == (0.0, 0.0)
    assert default_tolerance(np.dtype(np.uint8)) == (0.0, 0.0)
    config = {"model": {"in_channels": 2, "out_channels": 3, "kernel": (3, 3), "strides": None,
                        "dilations": None, "pads": [1, 1, 1, 1], "auto_pad": None, "group": 1,
                        "size": (6, 6), "bias": False, "seed": 0},
              "batch": 1, "patch": "auto", "attention": "global", "block": "auto"}  # fmt: skip
    values = {"op": "ConvInteger", "x_type": "uint8", "w_type": "int8", "per_channel": False,
              "bias": False, "seed": 3}  # fmt: skip
    model, _ = integer_conv(config, values)
    original = save_model_file(model, tmp_path / "q.onnx")
    converted, report = conv2attn.convert(model)
    path = save_model_file(converted, tmp_path / "q_attn.onnx")
    assert main(["check", str(original), str(path), "--json", str(tmp_path / "c.json")]) == 0
    assert "0*max+0" in capsys.readouterr().out
    # one unit off in a single value is a failure
    off = onnx.load(str(path))
    last = off.graph.output[0].name
    for node in off.graph.node:
        node.output[:] = [f"{o}_exact" if o == last else o for o in node.output]
    one = numpy_helper.from_array(np.array(1, np.int32), "one")
    off.graph.initializer.append(one)
    off.graph.node.append(helper.make_node("Add", [f"{last}_exact", "one"], [last]))
    broken = save_model_file(off, tmp_path / "off.onnx")
    assert main(["check", str(original), str(broken), "-q"]) == 1
    json_report = __import__("json").loads((tmp_path / "c.json").read_text())
    assert json_report["outputs"][0]["rtol"] == 0 and json_report["outputs"][0]["max_abs"] == 0
    assert [layer["integer"] for layer in report.to_dict()["layers"]] == ["ConvInteger"]
    assert converted_layers(converted)[0]["integer"] == "ConvInteger"


def test_convert_table_marks_integer_layers(tmp_path, capsys):
    images = np.load(DIGITS_DATA)["image"]
    source = quantized(DIGITS, tmp_path, "static", images[:4], "image")
    assert main(["convert", source, "-o", str(tmp_path / "out.onnx")]) == 0
    table = capsys.readouterr().out
    assert "integer" in table.splitlines()[0]
    assert table.count("QLinearConv") == 7


def test_integer_convs_without_an_exact_form_are_left_with_the_reason():
    config = {"model": {"in_channels": 2, "out_channels": 3, "kernel": (3, 3), "strides": None,
                        "dilations": None, "pads": None, "auto_pad": None, "group": 1,
                        "size": (6, 6), "bias": False, "seed": 0},
              "batch": 1, "patch": "auto", "attention": "global", "block": "auto"}  # fmt: skip
    values = {"op": "QLinearConv", "x_type": "uint8", "w_type": "int8", "per_channel": True,
              "bias": True, "seed": 3}  # fmt: skip
    model, _ = integer_conv(config, values)
    # a weight scale fed at runtime: the per-channel requantisation cannot be built
    scale = next(t for t in model.graph.initializer if t.name == "w_scale")
    model.graph.initializer.remove(scale)
    model.graph.input.append(helper.make_tensor_value_info("w_scale", TensorProto.FLOAT, [3]))
    with pytest.raises(conv2attn.errors.InputError, match="weight scale is computed at runtime"):
        conv2attn.convert(model)
    # beside a Conv that converts, it is left in place with its reason
    combined = helper.make_model(
        helper.make_graph(
            [*model.graph.node, helper.make_node("Cast", ["y"], ["yf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["yf", "wf"], ["z"], name="float_conv")],
            "mixed", list(model.graph.input),
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None] * 4)],
            [*model.graph.initializer,
             numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "wf")],
        ),
        opset_imports=[helper.make_opsetid("", 13)],
    )  # fmt: skip
    _, report = conv2attn.convert(combined)
    assert [s.reason for s in report.skipped] == [
        "weight scale is computed at runtime; the requantisation needs it per channel"
    ]


def test_profile_attributes_time_to_every_integer_conv_in_both_models(tmp_path):
    images = np.load(DIGITS_DATA)["image"]
    source = quantized(DIGITS, tmp_path, "static-per-channel", images[:4], "image")
    converted = tmp_path / "static_attn.onnx"
    assert main(["convert", source, "-o", str(converted), "-q"]) == 0
    report = tmp_path / "profile.json"
    args = [source, str(converted), "--per-layer", "--iterations", "4", "--warmup", "0"]
    assert main(["profile", *args, "--json", str(report), "-q"]) == 0
    measured = __import__("json").loads(report.read_text())
    layers = {layer["name"] for layer in converted_layers(onnx.load(str(converted)))}
    for model in measured["models"]:  # the original's QLinearConv nodes are found too
        assert layers <= {row["name"] for row in model["layers"]}, model["path"]
