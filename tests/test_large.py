"""A conversion whose output exceeds protobuf's 2 GB: external data, bounded memory, parity."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import assert_parity, run
from tools.bench import run_with_peak

pytestmark = pytest.mark.slow


def two_wide_convs(path):
    """Two 512 -> 512 3x3 Convs on 8x8: 19 MB in, 2.15 GB out at patch 4."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for i in range(2):
        weight = (rng.standard_normal((512, 512, 3, 3)) * 0.02).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(
            helper.make_node(
                "Conv", [f"x{i}", f"w{i}"], [f"x{i + 1}"], name=f"conv{i}", pads=[1] * 4
            )
        )
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 512, 8, 8])],
        [helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 512, 8, 8])],
        weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_output_over_2gb_is_saved_with_external_data_in_bounded_memory(tmp_path):
    source = tmp_path / "wide.onnx"
    two_wide_convs(source)
    output = tmp_path / "wide_attn.onnx"
    result, peak = run_with_peak("convert", source, "-o", output, "--patch", "4", "-q")
    assert result.returncode == 0, result.stderr
    data = tmp_path / "wide_attn.onnx.data"
    size = output.stat().st_size + data.stat().st_size
    assert data.stat().st_size > 2**31  # protobuf could not hold it in one file
    assert output.stat().st_size < 1_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "wide.onnx",
        "wide_attn.onnx",
        "wide_attn.onnx.data",
    ]
    assert peak < 3 * size, f"peak {peak / 2**30:.2f} GiB for {size / 2**30:.2f} GiB written"

    onnx.checker.check_model(str(output), full_check=True)
    model = onnx.load(str(source))
    feeds = {"x0": np.random.default_rng(1).standard_normal((1, 512, 8, 8)).astype(np.float32)}
    assert_parity(run(model, feeds), run(str(output), feeds))
    # check loads both into memory; the 2 GB one reaches onnxruntime through a file
    result, _ = run_with_peak("check", source, output, "--samples", "1", "-q")
    assert result.returncode == 0, result.stderr
