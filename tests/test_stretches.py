"""Stretches (design section 8): ``--grid auto`` picks one token grid per stretch of
consecutive Convs, the grid whose plans cost least together, counting the shuffles that
tokens flowing between them save. A stretch is found on the graph: Convs joined through
elementwise operations only, or reading one feature map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import conv2attn
from conv2attn.core.geometry import ConvSpec, Grid, best_plan, flow_saving, plan_attention
from conv2attn.core.planning import Stretches, plan_layers
from conv2attn.graph.rewrite import prepare_shapes
from conv2attn.graph.select import name_convs, select_convs
from conv2attn.graph.stretches import find_stretches
from conv2attn.record import converted_layers, recorded_plan
from tests.helpers import assert_parity, random_input, run

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def _stretches_of(model: onnx.ModelProto) -> tuple[list[str], Stretches]:
    prepare_shapes(model, {})
    graph = gs.import_onnx(model)
    name_convs(graph)
    candidates = select_convs(graph, [], []).candidates
    return [c.node.name for c in candidates], find_stretches(graph, candidates)


def _branching_model() -> onnx.ModelProto:
    """a -> per-channel Mul -> Relu -> b -> Add(x) -> c (stride 2); MaxPool -> d; a
    spatial mask (not per channel) -> e."""
    rng = np.random.default_rng(0)
    weights = {
        name: rng.standard_normal((4, 4, k, k)).astype(np.float32)
        for name, k in (("wa", 3), ("wb", 3), ("wc", 3), ("wd", 1), ("we", 1))
    }
    constants = {
        "scale": rng.standard_normal((4, 1, 1)).astype(np.float32),
        "mask": rng.standard_normal((1, 1, 12, 12)).astype(np.float32),
    }
    same = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ya"], name="a", **same),
        helper.make_node("Mul", ["ya", "scale"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["yb"], name="b", **same),
        helper.make_node("Add", ["yb", "x"], ["sum"]),
        helper.make_node("Conv", ["sum", "wc"], ["yc"], name="c", strides=[2, 2], **same),
        helper.make_node("MaxPool", ["sum"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pooled", "wd"], ["yd"], name="d", kernel_shape=[1, 1]),
        helper.make_node("Mul", ["sum", "mask"], ["masked"]),
        helper.make_node("Conv", ["masked", "we"], ["ye"], name="e", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "branching",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            for name in ("yc", "yd", "ye")
        ],
        [numpy_helper.from_array(v, k) for k, v in {**weights, **constants}.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_links_follow_elementwise_operations_and_per_channel_constants_only():
    names, stretches = _stretches_of(_branching_model())
    index = {name: i for i, name in enumerate(names)}
    a, b, c, d, e = (index[n] for n in "abcde")
    # a's output reaches b through a per-channel Mul and a Relu; b's reaches c through
    # the residual Add; the MaxPool and the spatial mask end the feature map
    assert sorted(stretches.links) == sorted([(a, b), (b, c)])
    # a reads the graph input, which the residual Add joins to c's feature map
    assert stretches.of[a] == stretches.of[b] == stretches.of[c]
    assert len({stretches.of[a], stretches.of[d], stretches.of[e]}) == 3


def test_a_residual_network_is_one_stretch():
    names, stretches = _stretches_of(onnx.load(str(DIGITS)))
    assert len(names) == 7 and len(set(stretches.of)) == 1
    # stem -> block1 conv1 and shortcut; both -> block2's conv1 and shortcut
    assert (0, 1) in stretches.links and (0, 3) in stretches.links
    assert {(3, 4), (3, 6), (2, 4), (2, 6)} <= set(stretches.links)


def _conv(channels_out: int, stride: int, size: int = 12) -> ConvSpec:
    return ConvSpec(8, channels_out, 1, (3, 3), (stride,) * 2, (1, 1), (1, 1), (1, 1), (size,) * 2)


def _on(plan, grid: Grid) -> bool:
    return plan.grid is grid or plan.grid_aligned


def test_auto_takes_one_grid_per_stretch():
    """Two 3x3 Convs and a strided one reading the same feature map: per Conv, global
    attention puts the 3x3s on the shifted grid (4 heads) and the strided one on the
    fixed grid (a tie, which goes to fixed); as one stretch they share one grid, the one
    whose plans cost least together. A Conv in a stretch of its own keeps its choice."""
    specs = [_conv(8, 1), _conv(8, 1), _conv(16, 2), _conv(16, 2)]
    names = ["a", "b", "c", "alone"]
    alone = plan_layers(specs, names, attention="global").plans
    grids = {p.grid for p in alone[:3] if not p.grid_aligned}
    assert grids == {Grid.SHIFTED, Grid.FIXED}  # what the stretch has to settle

    stretches = Stretches(of=[0, 0, 0, 1], links=[(0, 1), (1, 2), (0, 2)])
    together = plan_layers(specs, names, attention="global", stretches=stretches).plans
    totals = {}
    for grid in Grid:
        options = [
            [p for p in plan_layers([s], ["x"], attention="global", grid=grid).considered[0]]
            for s in specs[:3]
        ]
        totals[grid] = sum(best_plan(o).cost for o in options)
    cheaper = min(Grid, key=lambda grid: (totals[grid], grid is Grid.SHIFTED))
    assert all(_on(plan, cheaper) for plan in together[:3])
    assert sum(p.cost for p in together[:3]) == totals[cheaper]
    assert together[3] == alone[3] and together[3].grid is Grid.FIXED


def test_flow_saving_needs_a_shared_token_grid():
    spec = ConvSpec(8, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (12, 12))
    producer = plan_attention(spec, (2, 2), grid=Grid.FIXED)
    fixed = plan_attention(spec, (2, 2), grid=Grid.FIXED)
    shifted = plan_attention(spec, (2, 2), grid=Grid.SHIFTED)  # pads 1: half a token
    other_patch = plan_attention(spec, (1, 2), grid=Grid.FIXED)
    pixels = plan_attention(spec, (1, 1), grid=Grid.FIXED)
    assert producer.gives_grid_tokens and fixed.takes_grid_tokens
    saved = flow_saving(producer, fixed)
    # the consumer's patchify and, global tokens being in grid order, the un-patchify
    assert saved == fixed.patchify_layout()[-1].moved() + producer.unpatchify_layout()[0].moved()
    assert saved > 0
    assert not shifted.takes_grid_tokens and flow_saving(producer, shifted) == 0
    assert flow_saving(producer, other_patch) == 0
    assert not pixels.gives_grid_tokens and flow_saving(pixels, pixels) == 0


@pytest.mark.parametrize("attention", ["global", "local"])
def test_a_converted_model_keeps_one_grid_per_stretch(attention):
    model = onnx.load(str(DIGITS))
    converted, report = conv2attn.convert(model, attention=attention)
    plans = [recorded_plan(layer)[1] for layer in converted_layers(converted)]
    phased = {plan.grid for plan in plans if not plan.grid_aligned}
    assert len(phased) <= 1, [(layer.name, layer.grid) for layer in report.layers]
    feeds = random_input(model, batch=2)
    assert_parity(run(model, feeds), run(converted, feeds))
