"""The stretch up to a large squeeze-excitation gate runs one batch item at a time
(``graph.per_item``, design section 6).

The test model is efficientnet's first block in small: a stem Conv, a depthwise Conv and a
squeeze-excitation gate on a 16x128x128 map (1 MiB per item, ``GATE_ITEM_BYTES``), then a
projection and a classifier. At batch 8 its map is past ``TILE_BYTES``, so the stretch up
to the gate runs per item; at batch 1, without tiles, or on smaller maps, it does not.
Outputs are compared with the original to the parity bound (``helpers.assert_parity``)
and with the whole-batch conversion by ``assert_same_arithmetic`` (the same products; a
MatMul over one item's rows may sum in another order).
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import conv2attn
from conv2attn.core.geometry import GATE_ITEM_BYTES, TILE_BYTES
from conv2attn.items import inline_per_item, per_item_scan
from conv2attn.record import converted_layers
from conv2attn.report import conversion_table
from conv2attn.torch_graph import load_trainable
from conv2attn.validate import Samples, check
from tests.helpers import assert_parity, assert_same_arithmetic, run

GATE = "/gate/Mul"


class GatedBlock(nn.Module):
    def __init__(self, channels: int = 16, across: bool = False):
        super().__init__()
        self.across = across
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.squeeze = nn.Conv2d(channels, 4, 1)
        self.excite = nn.Conv2d(4, channels, 1)
        self.project = nn.Conv2d(channels, 8, 1)
        self.head = nn.Conv2d(8, 10, 3, stride=2, padding=1)

    def forward(self, x):
        x = nn.functional.silu(self.stem(x))
        if self.across:  # the items in reverse order: not a computation per item
            x = x.flip(0)
        x = nn.functional.silu(self.depthwise(x))
        factor = torch.sigmoid(
            self.excite(nn.functional.silu(self.squeeze(x.mean((2, 3), keepdim=True))))
        )
        x = self.project(x * factor)
        return self.head(x).mean((2, 3))


def gated_model(size: int, across: bool = False) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = GatedBlock(across=across).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        torch.zeros(1, 3, size, size),
        buffer,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load_from_string(buffer.getvalue())
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:  # the gate, named as the tests look for it
        factors = [producers.get(name) for name in node.input]
        if node.op_type == "Mul" and any(
            f is not None
            and f.op_type == "Sigmoid"
            and producers[f.input[0]].name == "/excite/Conv"
            for f in factors
        ):
            node.name = GATE
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return gated_model(128)


@pytest.fixture(scope="module")
def per_item(model):
    return conv2attn.convert(model, attention="local", batch=8)


def image(batch: int, size: int = 128) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"image": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def test_the_gated_map_is_what_the_rule_is_about():
    assert GATE_ITEM_BYTES == 16 * 128 * 128 * 4
    assert 8 * GATE_ITEM_BYTES > TILE_BYTES >= 2 * GATE_ITEM_BYTES


def test_batch_8_runs_the_stretch_to_the_gate_per_item(model, per_item):
    converted, report = per_item
    scan = per_item_scan(converted.graph)
    assert scan is not None
    assert report.per_item_gate == GATE
    inside = {layer.name for layer in report.layers if layer.per_item}
    # the gate's squeeze and excite Convs are before it; the projection and head after
    assert inside == {"/stem/Conv", "/depthwise/Conv", "/squeeze/Conv", "/excite/Conv"}
    assert {r["name"] for r in converted_layers(converted) if r.get("per_item")} == inside
    # the batch stays dynamic, and every batch size gives the original's outputs
    assert converted.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for batch in (1, 3, 8):
        assert_parity(run(model, image(batch)), run(converted, image(batch)))


def test_per_item_is_the_whole_batch_computed_item_by_item(model, per_item):
    converted, _ = per_item
    whole, report = conv2attn.convert(model, attention="local", batch=1)
    assert per_item_scan(whole.graph) is None and report.per_item_gate is None
    feeds = image(5)
    assert_same_arithmetic(run(whole, feeds), run(converted, feeds))
    # inlined, the same nodes run on the whole batch: the PyTorch import's graph
    inlined = inline_per_item(converted)
    assert per_item_scan(inlined.graph) is None
    onnx.checker.check_model(inlined)
    assert_same_arithmetic(run(converted, feeds), run(inlined, feeds))


def test_check_per_layer_reads_the_layers_inside_the_scan(model, per_item):
    converted, report = per_item
    before = converted.SerializeToString()
    samples = Samples(image(6), None, "random")
    result = check(model, converted, samples, per_layer=True, batch_size=4)
    assert result.passed
    assert [layer.name for layer in result.layers] == [layer.name for layer in report.layers]
    assert all(layer.within for layer in result.layers)
    assert not result.notes
    assert converted.SerializeToString() == before  # the model is left as it was


def test_the_pytorch_import_runs_the_batch_whole(model, per_item):
    converted, _ = per_item
    module = load_trainable(converted)
    feeds = image(3)
    with torch.no_grad():
        got = module(torch.from_numpy(feeds["image"])).numpy()
    assert_parity(run(model, feeds), [got])


@pytest.mark.parametrize(
    "size, batch, options",
    [
        (128, 8, {"tiles": False}),  # --no-tiles: the emission for GPUs runs the batch whole
        (128, 8, {"per_item": False}),  # --no-per-item
        (128, 2, {}),  # 2 MiB at batch 2: in cache
        (64, 32, {}),  # 256 KiB per item: a low-resolution gate, whose stretch would pay
        # its nodes per item for nothing (mobilenet_v3_large)
    ],
)
def test_the_batch_runs_whole_where_per_item_gains_nothing(size, batch, options):
    converted, report = conv2attn.convert(
        gated_model(size), attention="local", batch=batch, **options
    )
    assert per_item_scan(converted.graph) is None
    assert report.per_item_gate is None and not any(layer.per_item for layer in report.layers)


def test_a_fixed_batch_runs_whole(model):
    fixed, report = conv2attn.convert(
        model, attention="local", batch=8, input_shapes=["image:8x3x128x128"]
    )
    assert per_item_scan(fixed.graph) is None and report.per_item_gate is None


def test_the_conversion_table_says_which_layers_run_per_item(per_item):
    _, report = per_item
    text = conversion_table(report)
    assert f"4 layer(s), up to the gate {GATE}, run one batch item at a time" in text
    assert report.to_dict()["per_item_gate"] == GATE


def test_a_stretch_that_may_reach_across_the_batch_runs_whole():
    model = gated_model(128, across=True)
    converted, report = conv2attn.convert(model, attention="local", batch=8)
    assert per_item_scan(converted.graph) is None and report.per_item_gate is None
    assert_parity(run(model, image(3)), run(converted, image(3)))
