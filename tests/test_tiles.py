"""Local attention in tiles of blocks (``convert --batch``, design section 6).

A local plan's blocks are independent, so emission may split them into tiles that each
gather, attend and project their own blocks; the tiles are sized so that their widest
intermediate stays in cache at the batch the model is converted for. Tiles change where
values are computed, not what: parity is the same bound as untiled conversions
(``helpers.assert_parity``), and tiled outputs are compared with untiled ones to 1e-6
relative (the same products; only the projection's matrix rows are split).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import conv2attn
from conv2attn.cli import main
from conv2attn.core.geometry import TILE_BYTES, Attention, ConvSpec, Grid, Order, plan_attention
from conv2attn.errors import InputError
from conv2attn.graph import rewrite
from conv2attn.graph.tiles import SunkTiles
from conv2attn.record import converted_layers
from conv2attn.torch_graph import load_trainable
from conv2attn.validate import Samples, check
from tests.helpers import (
    assert_checked_and_rebuilt,
    assert_parity,
    assert_same_arithmetic,
    conv_model,
    random_input,
    run,
)
from tests.test_channels_last import residual_block

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
# Enough batch items to give every block its own tile.
EVERY_BLOCK = 10**9


def layer1_plan(**changes):
    """resnet18's layer1 Conv (64 channels, 3x3, 56x56) as local attention plans it."""
    spec = ConvSpec(64, 64, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (56, 56))
    options = dict(attention=Attention.LOCAL, block=(2, 2), grid=Grid.FIXED)
    return plan_attention(spec, (1, 1), **{**options, **changes})


def test_tiles_keep_the_widest_intermediate_under_the_budget():
    plan = layer1_plan()
    # 784 blocks of 2x2 queries, 9 heads each over 64 channels: the attended heads
    assert plan.widest_intermediate == 56 * 56 * 9 * 64
    for batch, itemsize in [(1, 4), (8, 4), (8, 2), (64, 4)]:
        tiles = plan.tiles(batch, itemsize)
        per_tile = batch * itemsize * plan.widest_intermediate / tiles
        assert per_tile <= TILE_BYTES
        # and no more tiles than that takes
        assert tiles == 1 or batch * itemsize * plan.widest_intermediate / (tiles - 1) > TILE_BYTES
    assert plan.tiles(8, 4) == 14
    assert plan.tiles(8, 2) == 7
    assert plan.tiles(EVERY_BLOCK, 4) == plan.blocks


def test_plans_without_tiles():
    """Global attention is one block; project-first projects every token before the
    windows are gathered; a single-key plan's intermediate is its input."""
    assert layer1_plan(attention=Attention.GLOBAL, block=None).tiles(EVERY_BLOCK, 4) == 1
    assert layer1_plan(order=Order.PROJECT_FIRST).tiles(EVERY_BLOCK, 4) == 1
    pointwise = ConvSpec(64, 64, 1, (1, 1), (1, 1), (1, 1), (0, 0), (0, 0), (56, 56))
    single = plan_attention(pointwise, (1, 1), attention=Attention.LOCAL, block=(1, 1))
    assert single.single_key and single.tiles(EVERY_BLOCK, 4) == 1


def test_depthwise_tiles_count_the_per_tap_products():
    spec = ConvSpec(32, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (56, 56))
    plan = plan_attention(spec, (1, 2), attention=Attention.LOCAL, block=(2, 2))
    assert plan.depthwise
    taps = plan.heads * math.prod(plan.in_patch) * math.prod(plan.patch)
    assert plan.widest_intermediate == plan.queries * taps * 32


CONVS = {
    "dense": dict(in_channels=4, out_channels=6, kernel=(3, 3), pads=[1, 1, 1, 1]),
    # at patch 1 it projects first (no tiles); at patch 2 it attends first
    "strided": dict(in_channels=4, out_channels=6, kernel=(3, 3), strides=[2, 2], pads=[1] * 4),
    # 16 channels per group: with 3 its gathered rows are too short and it projects first
    "grouped": dict(in_channels=32, out_channels=32, kernel=(3, 3), group=2, pads=[1, 0, 1, 2]),
    "depthwise": dict(in_channels=4, out_channels=8, kernel=(3, 3), group=4, pads=[1] * 4),
    "1-D": dict(in_channels=3, out_channels=5, kernel=(5,), pads=[2, 2], size=(17,)),
    "3-D": dict(in_channels=2, out_channels=3, kernel=(3, 2, 3), pads=[1] * 6, size=(5, 6, 7)),
}


@pytest.mark.parametrize("layout", ["channels-last", "nchw"])
@pytest.mark.parametrize("name", list(CONVS))
def test_every_block_in_its_own_tile_matches_the_conv(name, layout):
    model = conv_model(**CONVS[name])
    options = dict(attention="local", patch=2 if name == "strided" else 1, layout=layout)
    whole, whole_report = conv2attn.convert(model, **options)
    tiled, report = conv2attn.convert(model, batch=EVERY_BLOCK, **options)
    layer = report.layers[0]
    blocks = math.prod(q // b for q, b in zip(layer.query_grid, layer.block))
    assert whole_report.layers[0].tiles == 1
    assert layer.tiles == blocks > 1
    names = [node.name for node in tiled.graph.node]
    assert f"conv/attn/tile{blocks - 1}/Gather" in names and "conv/attn/tiles/Concat" in names
    # one projection however many tiles read it
    assert [t.name for t in tiled.graph.initializer].count("conv/attn/W_O") == 1
    assert converted_layers(tiled)[0]["tiles"] == blocks
    feeds = random_input(model, batch=3)
    got = run(tiled, feeds)
    assert_parity(run(model, feeds), got)
    np.testing.assert_allclose(got[0], run(whole, feeds)[0], rtol=1e-6, atol=1e-6)


def test_a_dynamic_batch_stays_dynamic():
    model = conv_model(in_channels=8, out_channels=8, size=(32, 32), pads=[1] * 4)
    converted, report = conv2attn.convert(model, attention="local", patch=1, batch=64)
    assert report.layers[0].tiles > 1
    batch = converted.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "N"
    for size in (1, 5):
        feeds = random_input(model, batch=size)
        assert_parity(run(model, feeds), run(converted, feeds))


def test_a_fixed_batch_sizes_the_tiles_itself():
    """A model whose batch is fixed is tiled for that batch; ``batch`` is for dynamic ones."""
    model = conv_model(in_channels=8, out_channels=8, size=(32, 32), pads=[1] * 4, batch=64)
    fixed, report = conv2attn.convert(model, attention="local", patch=1, batch=1)
    _, dynamic_report = conv2attn.convert(
        conv_model(in_channels=8, out_channels=8, size=(32, 32), pads=[1] * 4),
        attention="local",
        patch=1,
        batch=64,
    )
    assert report.layers[0].tiles == dynamic_report.layers[0].tiles > 1
    feeds = random_input(model, batch=64)
    assert_parity(run(model, feeds), run(fixed, feeds))


def test_per_layer_check_and_round_trip_of_a_tiled_model():
    model = residual_block()
    converted, report = conv2attn.convert(model, patch=1, attention="local", batch=EVERY_BLOCK)
    assert all(layer.tiles > 1 for layer in report.layers if layer.block != (1, 1))
    feeds = random_input(model, batch=2)
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed
    assert [layer.name for layer in result.layers] == ["conv1", "conv2", "conv3"]
    module = load_trainable(converted)
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(feeds["x"])).numpy()
    assert_parity(run(model, feeds), [got])


def test_bad_batch_is_refused():
    for batch in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="--batch"):
            conv2attn.convert(conv_model(), attention="local", batch=batch)


def test_cli_batch_option(tmp_path, capsys):
    out, report = tmp_path / "tiled.onnx", tmp_path / "tiled.json"
    args = ["convert", str(DIGITS), "-o", str(out), "--attention", "local", "--json"]
    assert main([*args, str(report), "--batch", "4096"]) == 0
    text = capsys.readouterr().out
    assert "tiles of blocks" in text and "at batch 4096" in text
    written = json.loads(report.read_text())
    assert written["options"]["batch"] == 4096
    tiled = [layer for layer in written["layers"] if layer["tiles"] > 1]
    assert tiled
    record = {entry["name"]: entry for entry in converted_layers(onnx.load(out))}
    assert all(record[layer["name"]]["tiles"] == layer["tiles"] for layer in tiled)
    inputs = str(DIGITS.parent / "digits_test.npz")
    assert main(["check", str(DIGITS), str(out), "--inputs", inputs, "--per-layer"]) == 0
    with pytest.raises(SystemExit) as refused:
        main(["convert", str(DIGITS), "-o", str(out), "--batch", "many", "--force"])
    assert refused.value.code == 2 and "--batch" in capsys.readouterr().err
    assert main(["convert", str(DIGITS), "-o", str(out), "--batch", "0", "--force"]) != 0
    assert "--batch 0" in capsys.readouterr().err


def test_no_tiles_emits_local_attention_whole_at_any_batch(tmp_path, capsys):
    """``--no-tiles`` (for GPU runtimes): the same conversion as tiles for batch 1 where
    nothing needs tiles, one product per layer where tiles would be cut."""
    tiled, tiled_report = conv2attn.convert(DIGITS, attention="local", batch=EVERY_BLOCK)
    whole, whole_report = conv2attn.convert(
        DIGITS, attention="local", batch=EVERY_BLOCK, tiles=False
    )
    assert any(layer.tiles > 1 for layer in tiled_report.layers)
    assert all(layer.tiles == 1 for layer in whole_report.layers)
    assert not any("/tile" in node.name for node in whole.graph.node)
    assert whole_report.to_dict()["options"]["tiles"] is False
    feeds = {"image": np.random.default_rng(7).standard_normal((3, 1, 32, 32), np.float32)}
    np.testing.assert_allclose(run(whole, feeds)[0], run(tiled, feeds)[0], rtol=1e-6, atol=1e-6)
    out, report = tmp_path / "whole.onnx", tmp_path / "whole.json"
    args = ["convert", str(DIGITS), "-o", str(out), "--attention", "local", "--batch", "4096"]
    assert main([*args, "--no-tiles", "--json", str(report)]) == 0
    assert "tiles of blocks" not in capsys.readouterr().out
    written = json.loads(report.read_text())
    assert written["options"]["tiles"] is False
    assert all(layer["tiles"] == 1 for layer in written["layers"])


def inverted_residual(projected: int) -> onnx.ModelProto:
    """mobilenet_v2's block: a 1x1 Conv widening 4 channels to 24, ReLU6, a depthwise 3x3
    Conv, ReLU6 (its bounds made by Constant nodes, as torch exports them), a 1x1 Conv to
    ``projected`` channels."""
    rng = np.random.default_rng(4)

    def init(name, shape):
        return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def bound(name, value):
        tensor = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value])
        return onnx.helper.make_node("Constant", [], [name], name=name, value=tensor)

    make = onnx.helper.make_node
    nodes = [
        make("Conv", ["x", "w1", "b1"], ["e"], "expand", kernel_shape=[1, 1]),
        make("Clip", ["e", "", "six"], ["er"], "expand/Clip"),
        bound("zero", 0.0),
        bound("six", 6.0),
        make("Conv", ["er", "w2", "b2"], ["d"], "depthwise", kernel_shape=[3, 3], pads=[1] * 4,
             group=24),
        make("Clip", ["d", "zero", "six"], ["dr"], "depthwise/Clip"),
        make("Conv", ["dr", "w3", "b3"], ["y"], "project", kernel_shape=[1, 1]),
    ]  # fmt: skip
    graph = onnx.helper.make_graph(
        nodes,
        "inverted_residual",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 12, 10])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", projected, 12, 10])],
        [
            init("w1", (24, 4, 1, 1)),
            init("b1", (24,)),
            init("w2", (24, 1, 3, 3)),
            init("b2", (24,)),
            init("w3", (projected, 24, 1, 1)),
            init("b3", (projected,)),
        ],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


def test_tiles_go_on_into_a_projection_that_narrows(monkeypatch):
    """The depthwise Conv's tiles pass its ReLU6 and the projection one by one, and the
    narrower projected tiles are joined: the same products as joining first; the check
    and the PyTorch import join the tiles themselves."""
    model = inverted_residual(projected=6)
    options = dict(attention="local", patch=1, batch=EVERY_BLOCK)
    converted, report = conv2attn.convert(model, **options)
    layers = {layer.name: layer for layer in report.layers}
    tiles = layers["depthwise"].output_tiles
    assert len(tiles) == layers["depthwise"].tiles > 1
    assert sum(rows for _, rows in tiles) == 12 * 10
    assert len(layers["project"].input_tiles) == len(tiles)
    assert layers["project"].input_channels_last
    record = {entry["name"]: entry for entry in converted_layers(converted)}
    assert [tuple(t) for t in record["depthwise"]["output_tiles"]] == list(tiles)
    assert record["project"]["input_tiles"] == list(layers["project"].input_tiles)
    nodes = {node.name: node for node in converted.graph.node}
    assert "depthwise/attn/tiles/Concat" not in nodes
    assert nodes["project/attn/proj/tiles/Concat"].input[-1].startswith("project/attn/proj/")
    assert sum(n.op_type == "Clip" and n.name.startswith("depthwise/Clip/tile") for n in
               converted.graph.node) == len(tiles)  # fmt: skip
    monkeypatch.setattr(rewrite, "sink_tile_concats", lambda graph, *_: SunkTiles())
    joined_first, _ = conv2attn.convert(model, **options)
    for batch in (1, 3):
        feeds = random_input(model, batch=batch)
        assert_same_arithmetic(run(joined_first, feeds), run(converted, feeds))
    assert_checked_and_rebuilt(model, converted, feeds, ["expand", "depthwise", "project"])


def test_tiles_are_joined_first_where_the_projection_widens():
    """A projection to more channels than the tiles hold moves more once projected: the
    tiles are joined before it, as emitted."""
    model = inverted_residual(projected=48)
    converted, report = conv2attn.convert(model, attention="local", patch=1, batch=EVERY_BLOCK)
    layers = {layer.name: layer for layer in report.layers}
    assert layers["depthwise"].tiles > 1 and not layers["depthwise"].output_tiles
    assert not layers["project"].input_tiles
    assert "depthwise/attn/tiles/Concat" in {node.name for node in converted.graph.node}
    feeds = random_input(model, batch=2)
    assert_checked_and_rebuilt(model, converted, feeds, ["expand", "depthwise", "project"])
