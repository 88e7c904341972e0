"""Graph conventions of other exporters: an ultralytics-YOLO-style detector exported by
torch with dynamic height and width, and a Paddle2ONNX-style graph (opset 11, initializers
listed as graph inputs, Clip with min/max inputs, dotted parameter names)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conv2attn.graph.rewrite import convert
from tests.helpers import assert_parity, run

torch = pytest.importorskip("torch")
nn = torch.nn


class ConvBnSiLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class C2f(nn.Module):
    """Split, a residual bottleneck on one half, concatenate everything, project."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.half = cout // 2
        self.cv1 = ConvBnSiLU(cin, cout)
        self.m = nn.Sequential(
            ConvBnSiLU(self.half, self.half, 3), ConvBnSiLU(self.half, self.half, 3)
        )
        self.cv2 = ConvBnSiLU(cout + self.half, cout)

    def forward(self, x):
        a, b = self.cv1(x).split(self.half, 1)
        return self.cv2(torch.cat([a, b, b + self.m(b)], 1))


class SPPF(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvBnSiLU(channels, channels // 2)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBnSiLU(channels * 2, channels)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class TinyYolo(nn.Module):
    """Backbone with stride-2 3x3 Convs, SPPF, an upsampling neck, a two-level head and
    the distribution-focal decoding Conv (fixed arange weights) of YOLOv8."""

    def __init__(self, bins: int = 8, classes: int = 3):
        super().__init__()
        self.bins = bins
        self.stem = ConvBnSiLU(3, 8, 3, 2)
        self.down1 = ConvBnSiLU(8, 16, 3, 2)
        self.c2f1 = C2f(16, 16)
        self.down2 = ConvBnSiLU(16, 32, 3, 2)
        self.sppf = SPPF(32)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(48, 16)
        self.heads = nn.ModuleList(
            nn.Sequential(ConvBnSiLU(c, 16, 3), nn.Conv2d(16, 4 * bins + classes, 1))
            for c in (16, 32)
        )
        self.dfl = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)

    def forward(self, x):
        p3 = self.c2f1(self.down1(self.stem(x)))
        p4 = self.sppf(self.down2(p3))
        n3 = self.neck(torch.cat([self.up(p4), p3], 1))
        levels = [head(f).flatten(2) for head, f in zip(self.heads, (n3, p4))]
        out = torch.cat(levels, 2)
        box, cls = out.split((4 * self.bins, out.shape[1] - 4 * self.bins), 1)
        b, _, anchors = box.shape
        dist = box.view(b, 4, self.bins, anchors).transpose(2, 1).softmax(1)
        return torch.cat([self.dfl(dist).view(b, 4, anchors), cls.sigmoid()], 1)


def export_yolo(path, dynamic: bool):
    torch.manual_seed(0)
    model = TinyYolo().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.75, 1.25)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 64, 64),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes=axes,
        )
    return onnx.load(str(path))


@pytest.mark.parametrize("attention", ["global", "local"])
def test_yolo_style_detector_with_dynamic_or_pinned_size(tmp_path, attention):
    model = export_yolo(tmp_path / "yolo.onnx", dynamic=True)
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    kept, report = convert(model, attention=attention)  # one model for every size
    assert len(report.layers) == convs and all(layer.dynamic for layer in report.layers)
    rng = np.random.default_rng(1)
    for size in ((64, 64), (96, 128)):
        feeds = {"images": rng.standard_normal((1, 3, *size), np.float32)}
        assert_parity(run(model, feeds), run(kept, feeds))
    converted, report = convert(model, attention=attention, input_shapes=["images:1x3x64x64"])
    assert len(report.layers) == convs and not report.skipped  # the decoding Conv too
    assert "dfl" in " ".join(layer.name for layer in report.layers).lower()
    assert not [node for node in converted.graph.node if node.op_type == "Conv"]
    dims = converted.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 64, 64]
    feeds = {"images": np.random.default_rng(0).standard_normal((1, 3, 64, 64), np.float32)}
    assert_parity(run(model, feeds), run(converted, feeds))


def test_yolo_style_detector_static_export_keeps_batch_free(tmp_path):
    model = export_yolo(tmp_path / "yolo.onnx", dynamic=False)
    converted, report = convert(model)
    assert report.skipped == []
    feeds = {"images": np.random.default_rng(1).standard_normal((1, 3, 64, 64), np.float32)}
    assert_parity(run(model, feeds), run(converted, feeds))


def paddle_style_model() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Clip(0, 6) -> depthwise Conv -> Conv, as Paddle2ONNX
    writes MobileNet blocks: opset 11, every parameter also listed as a graph input (the
    IR 3 convention), dotted names, explicit NOTSET auto_pad and zero pads."""
    rng = np.random.default_rng(3)

    def param(name, shape, low=None):
        values = rng.standard_normal(shape) if low is None else rng.uniform(low, 1.5, shape)
        return numpy_helper.from_array(values.astype(np.float32), name)

    params = [
        param("conv2d_0.w_0", [8, 3, 3, 3]),
        param("batch_norm_0.w_0", [8], 0.5),
        param("batch_norm_0.b_0", [8]),
        param("batch_norm_0.w_1", [8]),
        param("batch_norm_0.w_2", [8], 0.5),
        param("depthwise_conv2d_0.w_0", [8, 1, 3, 3]),
        param("conv2d_1.w_0", [12, 8, 1, 1]),
        param("conv2d_1.b_0", [12]),
        numpy_helper.from_array(np.array(0, np.float32), "p2o.clip.min"),
        numpy_helper.from_array(np.array(6, np.float32), "p2o.clip.max"),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "conv2d_0.w_0"],
            ["conv2d_0.tmp_0"],
            name="p2o.Conv.0",
            auto_pad="NOTSET",
            pads=[1, 1, 1, 1],
            strides=[2, 2],
            dilations=[1, 1],
            group=1,
        ),
        helper.make_node(
            "BatchNormalization",
            ["conv2d_0.tmp_0", *[p.name for p in params[1:5]]],
            ["batch_norm_0.tmp_2"],
            name="p2o.BatchNormalization.0",
            epsilon=1e-5,
        ),
        helper.make_node(
            "Clip", ["batch_norm_0.tmp_2", "p2o.clip.min", "p2o.clip.max"], ["relu6_0.tmp_0"]
        ),
        helper.make_node(
            "Conv",
            ["relu6_0.tmp_0", "depthwise_conv2d_0.w_0"],
            ["depthwise_conv2d_0.tmp_0"],
            name="p2o.Conv.1",
            auto_pad="NOTSET",
            pads=[1, 1, 1, 1],
            group=8,
        ),
        helper.make_node(
            "Conv",
            ["depthwise_conv2d_0.tmp_0", "conv2d_1.w_0", "conv2d_1.b_0"],
            ["save_infer_model/scale_0.tmp_0"],
            name="p2o.Conv.2",
            pads=[0, 0, 0, 0],
        ),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 32, 32])]
    inputs += [
        helper.make_tensor_value_info(p.name, TensorProto.FLOAT, list(p.dims)) for p in params
    ]
    graph = helper.make_graph(
        nodes,
        "paddle",
        inputs,
        [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_0", TensorProto.FLOAT, None)],
        params,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    model.producer_name = "PaddlePaddle"
    return model


@pytest.mark.parametrize("fold_bn", [False, True])
def test_paddle_style_graph_converts_with_parity(fold_bn):
    model = paddle_style_model()
    converted, report = convert(model, fold_bn=fold_bn, attention="local")
    assert sorted(layer.name for layer in report.layers) == [
        "p2o.Conv.0",
        "p2o.Conv.1",
        "p2o.Conv.2",
    ]
    assert report.folded_batchnorms == (["p2o.BatchNormalization.0"] if fold_bn else [])
    assert converted.producer_name == "PaddlePaddle"
    assert converted.opset_import[0].version == 11
    assert [value.name for value in converted.graph.input] == ["x"]  # parameters stay constants
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 3, 32, 32), np.float32)}
    assert_parity(run(model, feeds), run(converted, feeds))


def test_a_negative_batch_is_dynamic_in_every_command(tmp_path):
    """Older Paddle2ONNX exports declare the batch as ``dim_value: -1``."""
    import json

    from conv2attn.cli import main

    source = tmp_path / "paddle.onnx"
    model = paddle_style_model()
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    output = model.graph.output[0].type.tensor_type
    for size in (-1, 12, 16, 16):  # the exporter's batch here too
        output.shape.dim.add().dim_value = size
    onnx.save(model, str(source))
    converted = tmp_path / "paddle_attn.onnx"
    assert main(["convert", str(source), "-o", str(converted), "-q"]) == 0
    batch = onnx.load(str(converted)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # a symbol now, not -1
    assert main(["check", str(source), str(converted), "--samples", "3", "-q"]) == 0
    timing = ["--batch", "2", "--iterations", "2", "--warmup", "0", "-q"]
    assert main(["profile", str(source), str(converted), *timing]) == 0
    if __import__("importlib").util.find_spec("matplotlib"):
        page = tmp_path / "paddle.html"
        assert main(["report", str(source), str(converted), "-o", str(page), "-q"]) == 0
    described = tmp_path / "inspect.json"
    assert main(["inspect", str(source), "--json", str(described), "-q"]) == 0
    assert json.loads(described.read_text())["inputs"][0]["dynamic"] == [True, False, False, False]


def shared_weight_model() -> onnx.ModelProto:
    """Two Convs read one weight initializer (a Siamese pair); their outputs are added."""
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["a", "w"], ["ya"], name="left", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w"], ["yb"], name="right", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ya", "yb"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 10, 10]) for n in "ab"]
    graph = helper.make_graph(
        nodes,
        "siamese",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("exclude", [[], ["right"]], ids=["both", "one-excluded"])
def test_two_convs_sharing_one_weight(exclude):
    model = shared_weight_model()
    converted, report = convert(model, exclude=exclude)
    assert [layer.name for layer in report.layers] == ["left", "right"][: 2 - len(exclude)]
    remaining = [node for node in converted.graph.node if node.op_type == "Conv"]
    assert [node.name for node in remaining] == exclude
    rng = np.random.default_rng(6)
    feeds = {n: rng.standard_normal((1, 3, 10, 10), np.float32) for n in "ab"}
    assert_parity(run(model, feeds), run(converted, feeds))


class ChannelSplit(nn.Module):
    """shufflenet's unit: chunk the channels in two (sizes computed from Shape in the
    export), a Conv on one half, concatenate, shuffle the channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        left, right = self.stem(x).chunk(2, dim=1)
        y = torch.cat([left, self.branch(right)], 1)
        b, c, h, w = y.shape
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def test_sizes_computed_from_shape_with_a_symbolic_batch(tmp_path):
    """onnx's inference leaves the split halves without a shape; symbolic shape
    inference finds them, and the batch stays symbolic."""
    torch.manual_seed(0)
    path = tmp_path / "split.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ChannelSplit().eval(),
            (torch.randn(1, 3, 12, 12),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    branch = next(n for n in model.graph.node if n.op_type == "Conv" and "branch" in n.name)
    typed = {v.name: v for v in inferred.graph.value_info}
    dims = typed[branch.input[0]].type.tensor_type.shape.dim
    assert not any(d.HasField("dim_value") for d in dims[2:])  # the case at hand
    converted, report = convert(model)
    assert len(report.layers) == 2
    batch = converted.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    feeds = {"x": np.random.default_rng(7).standard_normal((3, 3, 12, 12), np.float32)}
    assert_parity(run(model, feeds), run(converted, feeds))
