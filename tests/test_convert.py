"""The graph pass on ONNX models: parity with onnxruntime's Conv, and what the output holds."""

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.backend.test.case.node import collect_testcases

import conv2attn
from conv2attn.errors import InputError
from conv2attn.record import METADATA_KEY, converted_layers, recorded_plan
from conv2attn.report import conversion_table
from tests.helpers import assert_parity, chain_model, conv_model, random_input, run


def convert_and_compare(model, batch=2, **options):
    converted, report = conv2attn.convert(model, **options)
    feeds = random_input(model, batch=batch)
    assert_parity(run(model, feeds), run(converted, feeds))
    return converted, report


def ops(model):
    return [node.op_type for node in model.graph.node]


def conformance_cases():
    return [pytest.param(case, id=case.name) for case in collect_testcases("Conv")]


@pytest.mark.parametrize("attention", ["global", "local"])
@pytest.mark.parametrize("case", conformance_cases())
def test_onnx_conformance_case(case, attention):
    """The Conv cases shipped with onnx: weights become initializers, outputs must match."""
    inputs, expected = case.data_sets[0]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    graph = model.graph
    weights = {v.name: array for v, array in zip(graph.input, inputs)}
    data_name = graph.node[0].input[0]
    for value in list(graph.input):
        if value.name != data_name:
            graph.initializer.append(numpy_helper.from_array(weights[value.name], value.name))
            graph.input.remove(value)
    converted, report = conv2attn.convert(model, attention=attention)
    assert "Conv" not in ops(converted) and len(report.layers) == 1
    assert report.layers[0].attention == attention
    (got,) = run(converted, {data_name: weights[data_name]})
    assert_parity(expected, [got])


# kernel, strides, dilations, pads, auto_pad, group, (in, out), size, bias, patch
ATTRIBUTE_TABLE = {
    "square-3x3": ((3, 3), None, None, [1, 1, 1, 1], None, 1, (4, 6), (9, 11), True, "auto"),
    "rectangular-kernel": ((3, 5), None, None, [1, 2, 1, 2], None, 1, (4, 6), (9, 11), True, "2x3"),
    "rectangular-patch": ((3, 3), None, None, [1, 1, 1, 1], None, 1, (4, 6), (9, 11), True, "1x4"),
    "stride-2": ((3, 3), [2, 2], None, [1, 1, 1, 1], None, 1, (4, 6), (10, 11), True, "2"),
    "stride-gt-kernel": ((2, 2), [3, 4], None, None, None, 1, (3, 5), (13, 14), False, "auto"),
    "dilation": ((3, 3), None, [2, 3], [2, 3, 2, 3], None, 1, (4, 6), (12, 13), True, "2"),
    "asymmetric-pads": ((3, 3), [2, 1], None, [0, 2, 1, 0], None, 1, (4, 6), (9, 11), True, "auto"),
    "same-upper": ((4, 3), [2, 2], None, None, "SAME_UPPER", 1, (4, 6), (9, 11), True, "auto"),
    "same-lower": ((4, 3), [2, 2], None, None, "SAME_LOWER", 1, (4, 6), (9, 11), True, "2x1"),
    "valid": ((3, 3), [2, 1], None, None, "VALID", 1, (4, 6), (9, 11), True, "auto"),
    "groups": ((3, 3), None, None, [1, 1, 1, 1], None, 2, (4, 6), (9, 11), True, "2"),
    "depthwise": ((3, 3), [2, 2], None, [1, 1, 1, 1], None, 8, (8, 8), (12, 12), True, "2"),
    "depthwise-multiplier": (
        (5, 5),
        None,
        None,
        [2, 2, 2, 2],
        None,
        4,
        (4, 8),
        (9, 9),
        False,
        "auto",
    ),
    "pointwise": ((1, 1), None, None, None, None, 1, (6, 5), (7, 8), True, "auto"),
    "pointwise-stride-2": ((1, 1), [2, 2], None, None, None, 1, (6, 5), (7, 8), False, "1"),
    "no-bias": ((3, 3), None, None, [1, 1, 1, 1], None, 1, (4, 6), (9, 11), False, "auto"),
    "patch-beyond-output": ((3, 3), [2, 2], None, [1, 1, 1, 1], None, 1, (2, 3), (5, 5), True, "4"),
    "kernel-equals-input": ((5, 5), None, None, None, None, 1, (2, 3), (5, 5), True, "auto"),
    "one-pixel": ((3, 3), None, None, [1, 1, 1, 1], None, 1, (2, 3), (1, 1), True, "auto"),
}


ATTENTION_MODES = {
    "global": {"attention": "global"},
    "local-auto": {"attention": "local"},
    "local-block-2": {"attention": "local", "block": "2"},
    "local-block-1x3": {"attention": "local", "block": "1x3"},
}


@pytest.mark.parametrize("mode", ATTENTION_MODES.values(), ids=ATTENTION_MODES.keys())
@pytest.mark.parametrize("config", ATTRIBUTE_TABLE.values(), ids=ATTRIBUTE_TABLE.keys())
def test_every_conv_attribute_matches_onnxruntime(config, mode):
    kernel, strides, dilations, pads, auto_pad, group, (cin, cout), size, bias, patch = config
    model = conv_model(cin, cout, kernel, strides, dilations, pads, auto_pad, group, size, bias)
    converted, report = convert_and_compare(model, batch=3, patch=patch, **mode)
    assert "Conv" not in ops(converted)
    assert ops(converted).count("Softmax") == 1
    if patch != "auto":
        sizes = tuple(int(v) for v in patch.split("x"))
        assert report.layers[0].patch == (sizes * 2 if len(sizes) == 1 else sizes)


def test_head_count_in_the_graph_is_four_for_3x3_with_patch_2():
    converted, report = convert_and_compare(conv_model(size=(12, 12)), patch="2")
    assert report.layers[0].heads == 4
    offsets = numpy_helper.to_array(
        next(
            i
            for i in converted.graph.initializer
            if i.name == "conv/attn/logits/axis0/head_offsets"
        )
    )
    assert offsets.size == 4


def test_depthwise_uses_a_grouped_projection():
    model = conv_model(8, 8, group=8, size=(12, 12))

    def projection(converted):
        return next(i for i in converted.graph.initializer if i.name == "conv/attn/W_O")

    # Global attention: per-channel tokens and one small projection per channel, batched.
    converted, _ = convert_and_compare(model, patch="2")
    assert list(projection(converted).dims) == [8, 4 * 4, 4]  # dense would be [128, 32]
    # Local attention: one attention shared by all channels, then the per-channel
    # projection as a broadcast Mul and a ReduceSum; still no zero blocks.
    converted, _ = convert_and_compare(model, patch="2", attention="local")
    assert list(projection(converted).dims) == [4 * 4, 4, 8, 1]
    kinds = ops(converted)
    # one product: the shared attention's, or (one query per block) the fold's
    assert "ReduceSum" in kinds and kinds.count("MatMul") + kinds.count("Gemm") == 1


@pytest.mark.parametrize("patch", ["1", "1x2"])
def test_depthwise_blocks_of_one_query_fold_the_heads_into_w_o(patch):
    model = conv_model(8, 16, group=8, size=(12, 12), pads=[1, 1, 1, 1])  # multiplier 2
    options = dict(attention="local", patch=patch, block="1")
    converted, report = convert_and_compare(model, **options)
    (layer,) = report.layers
    assert layer.folded and converted_layers(converted)[0]["folded"] is True
    assert "1 layer(s) fold their heads into W_O" in conversion_table(report)
    # the attention is folded at load time: a run does only the per-tap products, on
    # pixel tokens exactly the Conv's multiply-adds (tokens of 1x2 pixels: each head's
    # 2 input pixels for each of the 2 output pixels and 2 outputs per channel)
    per_token = 1 * 2 if patch == "1" else 2 * 4
    assert layer.macs_after == layer.queries * layer.heads * per_token * 8
    if patch == "1":
        assert layer.macs_after == layer.macs_before
    nodes = {node.name: node for node in converted.graph.node}
    fold = nodes["conv/attn/fold/Gemm"]
    assert "MatMul" not in [n.op_type for n in converted.graph.node]  # no attention product
    assert fold.input[0] == "conv/attn/Softmax_output_0"
    # every folded weight row is one head's row of W_O, unmixed: a one-hot attention
    inspect = onnx.ModelProto()
    inspect.CopyFrom(converted)
    inspect.graph.output.append(onnx.ValueInfoProto(name=fold.output[0]))
    feeds = random_input(model, batch=1)
    folded = run(inspect, feeds)[-1]
    w_o = numpy_helper.to_array(
        next(i for i in converted.graph.initializer if i.name == "conv/attn/W_O")
    )
    heads = layer.heads
    rows = lambda a: sorted(map(tuple, a.reshape(heads, -1).tolist()))  # noqa: E731
    assert rows(folded) == rows(w_o)


def test_the_standard_operator_is_planned_without_folding_and_dynamic_sizes_fold():
    from tests.test_dynamic import dynamic

    model = conv_model(16, 16, size=(12, 12), pads=[1, 1, 1, 1])
    options = dict(attention="local", patch="1", check=False)
    folded, report = conv2attn.convert(model, **options)
    (layer,) = report.layers
    assert layer.block == (1, 1) and layer.macs_after == layer.macs_before
    assert any("/fold/" in node.name for node in folded.graph.node)
    # the standard operator computes the attention product: priced with it, its plan
    # takes larger blocks, and nothing is folded
    converted, other = conv2attn.convert(model, form="attention", **options)
    (explicit,) = other.layers
    assert explicit.block != (1, 1) and explicit.macs_after > layer.macs_after
    assert not explicit.folded and "folded" not in converted_layers(converted)[0]
    assert not any("/fold/" in node.name for node in converted.graph.node)
    # a dynamic size folds as a static one: the block pattern is one constant at any size
    converted, other = conv2attn.convert(dynamic(model), **options)
    (dynamic_layer,) = other.layers
    assert dynamic_layer.dynamic and dynamic_layer.folded
    # (planned for the nominal 224x224: the Conv's own multiply-adds there)
    assert dynamic_layer.block == layer.block
    assert dynamic_layer.macs_after == dynamic_layer.macs_before
    assert any("/fold/" in node.name for node in converted.graph.node)


def test_global_heads_hold_only_the_key_pixels_they_read():
    """A 3x3 Conv at patch 4 (tokens of 4x4 pixels, 2 x 2 heads): an output patch reads 6
    pixels per axis, 4 of its own token and 2 of the next, so the heads hold 4x4, 4x2,
    2x4 and 2x2 pixels, 36 of 64, each in a product of its own; W_O keeps their rows."""
    import torch

    from conv2attn.inputs import Samples
    from conv2attn.torch_graph import load_trainable
    from conv2attn.validate import check
    from tests.test_dynamic import dynamic

    model = conv_model(8, 16, size=(12, 12), pads=[1, 1, 1, 1])
    options = dict(attention="global", patch="4")
    converted, report = convert_and_compare(model, **options)
    (layer,) = report.layers
    assert layer.narrowed and converted_layers(converted)[0]["narrowed"] is True
    assert "1 layer(s) give each head only the pixels" in conversion_table(report)
    w_o = next(i for i in converted.graph.initializer if i.name == "conv/attn/W_O")
    assert list(w_o.dims) == [36 * 8, 16 * 16]
    nodes = {node.name for node in converted.graph.node}
    assert {f"conv/attn/head{h}/MatMul" for h in range(4)} <= nodes
    assert "conv/attn/head0/Slice" not in nodes  # the first head reads its whole key
    # 36 of 64 pixels: the product and the projection shrink alike
    whole = replace(recorded_plan(converted_layers(converted)[0])[1], narrow_values=False)
    assert layer.macs_after * 64 == whole.macs * 36 and layer.params_after * 64 == whole.params * 36
    # the standard operator's heads are alike: every head holds its whole key
    _, standard = conv2attn.convert(model, form="attention", **options)
    assert not standard.layers[0].narrowed
    # so are the GPU form's, where one product per head costs more than the pixels saved
    # (resnet18, global, fp16 on an H200: 1.85x the original at batch 1 narrowed, 1.42x
    # whole)
    for_gpu, gpu_report = conv2attn.convert(model, tiles=False, **options)
    assert not gpu_report.layers[0].narrowed
    assert not any(node.name.startswith("conv/attn/head") for node in for_gpu.graph.node)
    feeds = random_input(model, batch=2)
    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed and [checked.name for checked in result.layers] == ["conv"]
    # the trainable import reads the Conv back out of the narrowed W_O
    module = load_trainable(converted).eval()
    with torch.no_grad():
        got = module(torch.from_numpy(feeds["x"])).numpy()
    assert_parity(run(model, feeds), [got])
    # dynamic sizes narrow alike, over channel-major tokens
    flexible, other = conv2attn.convert(dynamic(model), nominal_shapes=["x:1x8x12x12"], **options)
    assert other.layers[0].dynamic and other.layers[0].narrowed
    rng = np.random.default_rng(1)
    for size in ((12, 12), (9, 15)):
        feeds = {"x": rng.standard_normal((2, 8, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), run(flexible, feeds))


def test_float16_model_converts_with_float16_precision():
    model = conv_model(8, 8, size=(12, 12), dtype=np.float16, pads=[1, 1, 1, 1])
    converted, _ = conv2attn.convert(model, patch="2")
    feeds = random_input(model, batch=2)
    (reference,) = run(model, feeds)
    (got,) = run(converted, feeds)
    assert got.dtype == np.float16
    # The attention copies values exactly; the projection sums the same products as the
    # Conv in another order: allow two float16 roundings (2 * 2**-10) of the largest output.
    assert_parity([reference], [got], rtol=2 * 2**-10, atol=0)
    softmax = next(n for n in converted.graph.node if n.op_type == "Softmax")
    assert softmax.name == "conv/attn/Softmax"
    cast = next(n for n in converted.graph.node if n.op_type == "Cast")
    assert cast.input[0] == softmax.output[0]  # logits and softmax stay in float32


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 21])
def test_model_opset_is_kept(opset):
    model = chain_model(opset=opset)
    converted, report = convert_and_compare(model)
    assert [o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert len(report.layers) == 3


def test_opset_10_is_refused_with_advice():
    model = conv_model(opset=10)
    with pytest.raises(InputError, match="opset 10 is older than 11; upgrade"):
        conv2attn.convert(model)


def test_output_structure_names_metadata_and_checks():
    model = chain_model()
    converted, report = convert_and_compare(model, layout="nchw")
    onnx.checker.check_model(converted, full_check=True)
    assert "Conv" not in ops(converted)
    assert ops(converted).count("Softmax") == 3
    for node in converted.graph.node:
        if node.op_type not in ("Relu", "Add") or node.name.startswith(("stem/", "down/", "skip/")):
            assert node.name.split("/attn/")[0] in {"stem", "down", "skip"}, node.name
    # the Conv outputs keep their names, so both models can be compared tensor by tensor
    produced = {out for node in converted.graph.node for out in node.output}
    assert {"c1", "c2", "c3"} <= produced
    # channels-last between the Convs: the Transposes they shared are gone, and what the
    # pass adds is named after the tensor it lays out
    flowing, _ = convert_and_compare(model)
    added = [n.name for n in flowing.graph.node if "/attn/" not in n.name]
    assert sorted(added) == ["add", "relu", "x/channels_last/Transpose", "y/Transpose"]
    record = json.loads(next(p.value for p in converted.metadata_props if p.key == METADATA_KEY))
    assert [layer["name"] for layer in record["layers"]] == ["stem", "down", "skip"]
    first = record["layers"][0]
    assert first["patch"] == list(report.layers[0].patch)
    assert first["heads"] == report.layers[0].heads
    assert first["token_grid"] == list(report.layers[0].token_grid)
    assert first["output"] == "c1"


def test_no_large_attention_constant_is_stored():
    model = conv_model(8, 8, size=(24, 24), pads=[1, 1, 1, 1])
    converted, report = conv2attn.convert(model, patch="1")
    n = report.layers[0].tokens
    sizes = {i.name: int(np.prod(i.dims)) for i in converted.graph.initializer}
    # Only the projection is large; the logits come from length-N coordinate vectors.
    assert max(size for name, size in sizes.items() if not name.endswith("W_O")) == n
    assert max(sizes.values()) < n * n


def test_symbolic_batch_is_preserved():
    converted, _ = conv2attn.convert(conv_model(batch="batch_size"))
    dim = converted.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch_size"
    out = converted.graph.output[0].type.tensor_type.shape.dim[0]
    assert out.dim_param == "batch_size"


def test_include_and_exclude_select_by_node_name():
    model = chain_model()
    converted, report = convert_and_compare(model, include=["s*"], exclude=["skip"])
    assert [layer.name for layer in report.layers] == ["stem"]
    assert ops(converted).count("Conv") == 2
    reasons = {skip.name: skip.reason for skip in report.skipped}
    assert reasons == {"down": "not matched by --include", "skip": "excluded by --exclude skip"}


def test_nothing_selected_is_an_error():
    with pytest.raises(InputError, match="none of the 3 Conv nodes"):
        conv2attn.convert(chain_model(), include=["nothing*"])


def test_model_without_conv_is_an_error():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(InputError, match="no Conv node"):
        conv2attn.convert(model)


def test_a_dynamic_size_stays_dynamic_unless_input_shape_pins_it():
    model = conv_model(size=("H", "W"))
    _, report = conv2attn.convert(model)
    assert report.layers[0].dynamic
    converted, report = conv2attn.convert(model, input_shapes=["x:2x4x9x11"])
    assert not report.layers[0].dynamic
    feeds = random_input(conv_model(size=(9, 11)), batch=2)
    assert_parity(run(conv_model(size=(9, 11)), feeds), run(converted, feeds))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (["y:1x4x9x11"], "no input 'y'"),
        (["x:1x4x9"], "3 dims given, the input has rank 4"),
        (["x:1x5x9x11"], "dim 1 is fixed to 4"),
        (["x=1x4"], "expected NAME:DIMS"),
    ],
)
def test_bad_input_shapes_are_refused(shapes, message):
    with pytest.raises(InputError, match=message):
        conv2attn.convert(conv_model(), input_shapes=shapes)


@pytest.mark.parametrize("patch", ["0", "2x", "ax2", "-1"])
def test_bad_patch_is_refused(patch):
    with pytest.raises(InputError, match="--patch"):
        conv2attn.convert(conv_model(), patch=patch)


def test_patch_with_wrong_rank_is_refused():
    with pytest.raises(InputError, match="has 3 sizes, Conv 'conv' has 2 spatial axes"):
        conv2attn.convert(conv_model(), patch="2x2x2")


def test_weights_behind_identity_and_cast_are_constants():
    """Exporters route shared initializers through Identity; Cast of a constant is a constant."""
    model = conv_model(bias=True)
    graph = model.graph
    graph.node[0].input[1] = "w_identity"
    graph.node[0].input[2] = "b_cast"
    w16 = numpy_helper.to_array(graph.initializer[1]).astype(np.float16)
    graph.initializer[1].CopyFrom(numpy_helper.from_array(w16, "b"))
    graph.node.insert(0, helper.make_node("Identity", ["w"], ["w_identity"]))
    graph.node.insert(1, helper.make_node("Cast", ["b"], ["b_cast"], to=TensorProto.FLOAT))
    converted, report = convert_and_compare(model)
    assert len(report.layers) == 1 and "Conv" not in ops(converted)


def test_runtime_weight_is_skipped_with_reason(caplog):
    model = chain_model()
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("w3_runtime", TensorProto.FLOAT, [8, 3, 1, 1]))
    graph.node[3].input[1] = "w3_runtime"
    converted, report = conv2attn.convert(model)
    assert [s.name for s in report.skipped] == ["skip"]
    assert "computed at runtime" in report.skipped[0].reason
    assert ops(converted).count("Conv") == 1
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("'skip' is not converted" in r.getMessage() for r in warned)


def test_unnamed_and_duplicate_conv_names_become_unique():
    model = chain_model()
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.name = "" if node.output[0] == "c1" else "same"
    converted, report = conv2attn.convert(model)
    feeds = random_input(model)
    assert_parity(run(chain_model(), feeds), run(converted, feeds))  # onnxruntime refuses `model`
    names = [layer.name for layer in report.layers]
    assert len(set(names)) == 3 and names[0] == "Conv_0"


def test_input_model_is_not_modified():
    model = chain_model()
    before = model.SerializeToString()
    conv2attn.convert(model)
    assert model.SerializeToString() == before


def test_conversion_is_deterministic():
    first, _ = conv2attn.convert(chain_model())
    second, _ = conv2attn.convert(chain_model())
    assert first.SerializeToString() == second.SerializeToString()


def test_invalid_conv_names_the_node():
    model = conv_model(kernel=(3, 3), size=(2, 2))  # no padding: kernel larger than input
    with pytest.raises(InputError, match=r"Conv .conv.: kernel .* larger than the padded input"):
        conv2attn.convert(model)


def test_conv_whose_input_rank_differs_from_its_weights_is_refused_by_name():
    """A Conv fed a vector (a mutated model: the Relu reads the previous Conv's bias)
    is invalid; it is refused naming the node, not converted into a crash."""
    model = conv_model(4, 4, pads=[1, 1, 1, 1])
    graph = model.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.ones(4, np.float32), "v"))
    graph.node.insert(0, onnx.helper.make_node("Relu", ["v"], ["r"], name="relu"))
    graph.node[1].input[0] = "r"
    with pytest.raises(InputError, match=r"Conv 'conv': its input 'r' has rank 1 and its weight"):
        conv2attn.convert(model)


def test_local_attention_gathers_windows_and_stores_no_large_constant():
    model = conv_model(8, 8, size=(24, 24), pads=[1, 1, 1, 1])
    converted, report = convert_and_compare(model, attention="local", patch="1", block="4")
    layer = report.layers[0]
    assert (layer.attention, layer.block, layer.heads) == ("local", (4, 4), 9)
    assert layer.keys == 6 * 6  # the block and a halo of R = 2 rows and columns
    assert ops(converted).count("Gather") == 1 and ops(converted).count("Softmax") == 1
    sizes = {i.name: int(np.prod(i.dims)) for i in converted.graph.initializer}
    assert sizes["conv/attn/window_indices"] == 36 * 36  # blocks x window
    assert max(sizes.values()) < layer.tokens**2
    record = json.loads(next(p.value for p in converted.metadata_props if p.key == METADATA_KEY))
    assert record["attention"] == "local" and record["layers"][0]["block"] == [4, 4]


def test_local_attention_costs_less_than_global():
    model = conv_model(16, 16, size=(32, 32), pads=[1, 1, 1, 1])
    _, global_report = conv2attn.convert(model, patch="1")
    _, local_report = conv2attn.convert(model, patch="1", attention="local")
    assert local_report.macs_after < global_report.macs_after / 10


def test_block_needs_local_attention():
    with pytest.raises(InputError, match="--block applies to --attention local or auto only"):
        conv2attn.convert(conv_model(), block="2")
    with pytest.raises(InputError, match="--attention"):
        conv2attn.convert(conv_model(), attention="windowed")


def test_report_lists_the_alternatives_the_cost_model_weighed():
    _, report = conv2attn.convert(chain_model(), max_param_growth=1e9)  # budget not binding
    for layer in report.layers:
        costs = [a["cost"] for a in layer.alternatives]
        assert 1 <= len(costs) <= 5 and costs == sorted(costs)
        assert all(
            {"patch", "order", "macs", "params", "cost"} <= set(a) for a in layer.alternatives
        )
        assert layer.cost <= costs[0]
        chosen = (list(layer.patch), layer.order, layer.grid)
        assert all((a["patch"], a["order"], a["grid"]) != chosen for a in layer.alternatives)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["alternatives"][0]["cost"] == report.layers[0].alternatives[0]["cost"]


def test_conv_like_nodes_left_alone_are_reported_with_reasons():
    model = chain_model()
    graph = model.graph
    weight = numpy_helper.from_array(np.ones((8, 2, 2, 2), np.float32), "wt")
    graph.initializer.append(weight)
    graph.node.append(
        helper.make_node("ConvTranspose", ["y", "wt"], ["up"], name="upsample", strides=[2, 2])
    )
    graph.output.append(helper.make_tensor_value_info("up", TensorProto.FLOAT, ["N", 2, 16, 16]))
    converted, report = conv2attn.convert(model)
    assert [(s.name, s.reason) for s in report.skipped] == [
        ("upsample", "ConvTranspose is not converted (only Conv is)")
    ]
    assert ops(converted).count("ConvTranspose") == 1 and ops(converted).count("Conv") == 0
    record = json.loads(next(p.value for p in converted.metadata_props if p.key == METADATA_KEY))
    assert record["skipped"] == [
        {"name": "upsample", "reason": "ConvTranspose is not converted (only Conv is)"}
    ]


def conv_bn_model(with_bias: bool) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu, with trained-like statistics."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32) * 0.1, "beta"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 6).astype(np.float32), "var"),
    ]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"))
        conv_inputs.append("b")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c", "gamma", "beta", "mean", "var"],
            ["n"],
            name="bn",
            epsilon=1e-3,
        ),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 9, 9])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_bn_folds_exactly_before_converting(with_bias):
    model = conv_bn_model(with_bias)
    converted, report = convert_and_compare(model, fold_bn=True)
    assert "BatchNormalization" not in ops(converted)
    assert report.folded_batchnorms == ["bn"]
    kept, report = convert_and_compare(model)  # without the option the BatchNorm stays
    assert ops(kept).count("BatchNormalization") == 1 and report.folded_batchnorms == []


def test_weights_from_dequantize_linear_and_qdq_activations():
    """A QDQ model: int8 weights dequantized per channel, activations through Q/DQ."""
    rng = np.random.default_rng(4)
    q_weight = rng.integers(-127, 128, (6, 4, 3, 3)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, 6).astype(np.float32)
    inits = [
        numpy_helper.from_array(q_weight, "wq"),
        numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(np.zeros(6, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="quant"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dequant"),
        helper.make_node(
            "DequantizeLinear", ["wq", "w_scale", "w_zero"], ["w"], name="wdq", axis=0
        ),
        helper.make_node("Conv", ["xd", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    converted, report = convert_and_compare(model)
    assert len(report.layers) == 1
    kinds = ops(converted)
    assert "Conv" not in kinds and kinds.count("QuantizeLinear") == 1  # the activation Q/DQ stays


def test_conv_without_kernel_shape_takes_it_from_the_weight():
    model = conv_model(kernel=(3, 2), pads=[1, 0, 1, 1])
    attribute = next(a for a in model.graph.node[0].attribute if a.name == "kernel_shape")
    model.graph.node[0].attribute.remove(attribute)
    _, report = convert_and_compare(model)
    assert report.layers[0].kernel == (3, 2)


def test_stale_value_info_does_not_mislead_the_geometry():
    """Exporters leave wrong shapes in value_info; the graph decides."""
    model = chain_model()
    stale = helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", 8, 8, 8])  # is 16x16
    model.graph.value_info.append(stale)
    converted, report = conv2attn.convert(model)
    assert report.layers[1].input_size == (16, 16)
    feeds = random_input(chain_model())
    assert_parity(run(chain_model(), feeds), run(converted, feeds))


def test_conv_output_with_several_consumers_and_a_graph_output():
    model = chain_model()
    graph = model.graph
    graph.node.append(helper.make_node("Sigmoid", ["c1"], ["s1"], name="sigmoid"))
    graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, ["N", 8, 16, 16]))
    graph.output.append(helper.make_tensor_value_info("s1", TensorProto.FLOAT, ["N", 8, 16, 16]))
    converted, report = convert_and_compare(model)
    assert [o.name for o in converted.graph.output] == ["y", "c1", "s1"]
    assert len(report.layers) == 3


def test_nhwc_input_transposed_before_the_conv():
    """tf2onnx's convention: the graph takes NHWC and transposes it for the Conv."""
    model = conv_model(4, 6, size=(9, 11))
    graph = model.graph
    graph.input[0].CopyFrom(
        helper.make_tensor_value_info("x_nhwc", TensorProto.FLOAT, ["N", 9, 11, 4])
    )
    graph.node.insert(
        0, helper.make_node("Transpose", ["x_nhwc"], ["x"], name="to_nchw", perm=[0, 3, 1, 2])
    )
    converted, report = convert_and_compare(model)
    assert report.layers[0].input_size == (9, 11) and "Transpose" in ops(converted)
