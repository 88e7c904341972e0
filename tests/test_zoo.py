"""The CI subset of tools/zoo.py: torchvision models, every Conv converted with parity."""

import pytest

from tools.zoo import CI_SUBSET, run_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", CI_SUBSET)
def test_every_conv_of_the_model_converts_with_parity(tmp_path, name):
    row = run_model(name, tmp_path)
    assert row["convs"] > 0
    assert row["skipped"] == []
    assert row["converted"] == row["convs"]
    assert row["max_ref"] > 0.1, "logits this small would make the parity bound absolute"
    assert row["parity"], f"max rel {row['max_rel']:.3g}"


def test_a_conversion_runs_through_the_torch_cuda_import_with_parity(tmp_path):
    """``zoo.py --torch``: the import the torch-cuda backend uses, on the CPU in fp32."""
    pytest.importorskip("onnx2torch")
    row = run_model("squeezenet1_0", tmp_path, torch_import=True)
    assert row["parity"] and row["torch"] == "parity", row.get("torch")
