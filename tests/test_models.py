"""Real CNNs: torchvision models exported to ONNX, converted by the command line tool."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conv2attn.record import METADATA_KEY
from tests.helpers import assert_parity, random_input, run

pytestmark = pytest.mark.slow


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "conv2attn", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("name", "dynamo", "convs", "attention"),
    [
        ("resnet18", False, 20, "global"),
        ("resnet18", False, 20, "local"),
        ("mobilenet_v2", True, 52, "global"),
        ("mobilenet_v2", True, 52, "local"),
    ],
    ids=[
        "resnet18-legacy-export-global",
        "resnet18-legacy-export-local",
        "mobilenet_v2-dynamo-external-data-global",
        "mobilenet_v2-dynamo-external-data-local",
    ],
)
def test_torchvision_model_converts_completely_with_parity(
    torchvision_model, tmp_path, name, dynamo, convs, attention
):
    source = torchvision_model(name, dynamo)
    if dynamo:
        assert source.with_name(source.name + ".data").exists()  # weights as external data
    original = onnx.load(str(source))
    assert sum(n.op_type == "Conv" for n in original.graph.node) == convs

    output = tmp_path / f"{name}_attn.onnx"
    report_path = tmp_path / "report.json"
    result = cli("convert", source, "-o", output, "--report", report_path, "--attention", attention)
    assert result.returncode == 0, result.stderr
    assert f"total ({convs} converted)" in result.stdout

    converted = onnx.load(str(output))
    onnx.checker.check_model(str(output), full_check=True)
    op_types = [n.op_type for n in converted.graph.node]
    assert op_types.count("Conv") == 0
    assert op_types.count("Softmax") == convs
    record = json.loads(next(p.value for p in converted.metadata_props if p.key == METADATA_KEY))
    assert len(record["layers"]) == convs and record["attention"] == attention
    report = json.loads(report_path.read_text())
    assert report["totals"]["converted"] == convs and report["skipped"] == []

    feeds = random_input(original, batch=2, seed=1)
    reference = run(str(source), feeds)
    assert np.abs(reference[0]).max() > 0.1  # the bound below is then mostly relative
    assert_parity(reference, run(converted, feeds))
