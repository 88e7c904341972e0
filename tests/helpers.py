"""Small ONNX models built in tests, and the parity assertion."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conv2attn.validate import ATOL, RTOL, compare, exact_integer_convs, session


def random_initializers(seed: int = 0) -> Callable[[str, Sequence[int]], TensorProto]:
    """``weight(name, shape)``: a standard-normal float32 initializer, drawn in call order
    from one generator seeded with ``seed`` (so a model builder's weights are fixed)."""
    rng = np.random.default_rng(seed)

    def weight(name: str, shape: Sequence[int]) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    return weight


def conv_model(
    in_channels: int = 4,
    out_channels: int = 6,
    kernel: Sequence[int] = (3, 3),
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    auto_pad: str | None = None,
    group: int = 1,
    size: Sequence[int] = (9, 11),
    bias: bool = True,
    dtype: type = np.float32,
    batch: int | str = "N",
    opset: int = 13,
    seed: int = 0,
    name: str = "conv",
) -> onnx.ModelProto:
    """One Conv node with constant weights; ``None`` attributes are left out of the node."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_channels, in_channels // group, *kernel)).astype(dtype)
    attrs: dict = {"kernel_shape": list(kernel), "group": group}
    if strides is not None:
        attrs["strides"] = list(strides)
    if dilations is not None:
        attrs["dilations"] = list(dilations)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    elif pads is not None:
        attrs["pads"] = list(pads)
    inputs = ["x", "w"]
    initializers = [numpy_helper.from_array(weight, "w")]
    if bias:
        inputs.append("b")
        initializers.append(
            numpy_helper.from_array(rng.standard_normal(out_channels).astype(dtype), "b")
        )
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], name=name, **attrs)],
        "single_conv",
        [helper.make_tensor_value_info("x", elem, [batch, in_channels, *size])],
        [helper.make_tensor_value_info("y", elem, [batch, out_channels, *([None] * len(kernel))])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def chain_model(opset: int = 13) -> onnx.ModelProto:
    """Conv -> Relu -> Conv (stride 2) -> Add(with a third Conv of the input) -> output."""
    rng = np.random.default_rng(1)

    def init(name: str, shape: Sequence[int]) -> TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node(
            "Conv", ["r1", "w2"], ["c2"], name="down", strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Conv", ["x", "w3"], ["c3"], name="skip", strides=[2, 2]),
        helper.make_node("Add", ["c2", "c3"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [
            init("w1", [8, 3, 3, 3]),
            init("b1", [8]),
            init("w2", [8, 8, 3, 3]),
            init("w3", [8, 3, 1, 1]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def random_input(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else batch
            for d in value.type.tensor_type.shape.dim
        ]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's outputs of ``model``; integer Convs over uint8 as the check runs them
    (``exact_integer_convs``: the ONNX definition on any x86 CPU)."""
    if isinstance(model, onnx.ModelProto):
        model = exact_integer_convs(model)
    return session(model).run(None, feeds)


def assert_parity(
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    rtol: float = RTOL,
    atol: float = ATOL,
) -> None:
    """Every output within ``rtol * max|reference| + atol``; the message shows the worst."""
    assert len(reference) == len(actual), f"{len(reference)} outputs vs {len(actual)}"
    for index, (ref, got) in enumerate(zip(reference, actual)):
        error = compare(str(index), ref, got)
        assert error.within(rtol, atol), (
            f"output {index}: max |diff| {error.max_abs:.3g} exceeds "
            f"{rtol:g} * {error.max_reference:.3g} + {atol:g} (max rel {error.max_rel:.3g})"
        )


def assert_same_arithmetic(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> None:
    """Outputs of the same products with the tensors laid out or split otherwise: equal
    but where sums run in another order (a global pool channels-last; a MatMul over a
    tile's rows, which onnxruntime may sum in another order than over all rows), float32
    rounding carried through the layers after them: up to 3.6e-7 of the largest output
    seen (mobilenet_v3_large; efficientnet_b0 1.6e-7, the test models 1.4e-7); 1e-6
    allowed."""
    assert len(reference) == len(actual), f"{len(reference)} outputs vs {len(actual)}"
    for ref, got in zip(reference, actual):
        assert ref.shape == got.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))


def save_model_file(model: onnx.ModelProto, path, external: bool = False):
    """Save ``model`` (left unchanged), every tensor in ``<name>.data`` when ``external``."""
    import copy

    model = copy.deepcopy(model)  # onnx moves the tensors out of the proto it saves
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def assert_checked_and_rebuilt(
    model: onnx.ModelProto,
    converted: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    layers: Sequence[str],
):
    """``check --per-layer`` passes and compares exactly ``layers`` (Conv names, in order),
    and the PyTorch import of ``converted`` keeps parity with ``model``; returns the
    check's report."""
    import torch

    from conv2attn.inputs import Samples
    from conv2attn.torch_graph import load_trainable
    from conv2attn.validate import check

    result = check(model, converted, Samples(feeds, None, "random"), per_layer=True)
    assert result.passed
    assert [layer.name for layer in result.layers] == list(layers)
    module = load_trainable(converted)
    with torch.no_grad():
        (name,) = feeds  # one graph input
        rebuilt = module.eval()(torch.from_numpy(feeds[name])).numpy()
    assert_parity(run(model, feeds), [rebuilt])
    return result
