"""A converted ONNX model back in PyTorch (``torch_graph.load_trainable``), ready to train.

Equality at initialisation is checked to the parity tolerance of the ONNX path
(``helpers.assert_parity``: 1e-5 of the largest value plus 1e-6): the module runs the
same weights, read back out of W_O, through ``ConvAttention`` (float32 rounding only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional

import conv2attn
from conv2attn.errors import InputError
from conv2attn.torch_graph import load_trainable
from conv2attn.trainable import ConvAttention
from tests.helpers import assert_parity, chain_model, random_input, run, save_model_file
from tests.test_dynamic import dynamic

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def _torch_run(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(*(torch.from_numpy(v) for v in feeds.values()))
    return [out.numpy()]


@pytest.mark.parametrize("form", ["matmul", "attention"])
@pytest.mark.parametrize("attention", ["global", "local"])
def test_digits_model_round_trips_equal_at_initialisation(form, attention):
    original = onnx.load(str(DIGITS))
    converted, report = conv2attn.convert(original, attention=attention, form=form)
    module = load_trainable(converted)
    assert [name for name, _ in module.named_layers()] == [layer.name for layer in report.layers]
    assert all(isinstance(layer, ConvAttention) for _, layer in module.named_layers())
    feeds = random_input(original, batch=4)
    assert_parity(run(original, feeds), _torch_run(module, feeds))


@pytest.mark.parametrize("form", ["matmul", "attention"])
def test_torchvision_resnet18_round_trips(torchvision_model, tmp_path, form):
    path = torchvision_model("resnet18")
    converted, _ = conv2attn.convert(path, attention="local", form=form)
    saved = save_model_file(converted, tmp_path / "r18_attn.onnx", external=True)
    module = load_trainable(saved)  # from a file with external data
    assert len(module.named_layers()) == 20
    feeds = random_input(onnx.load(str(path)), batch=2)
    assert_parity(run(str(path), feeds), _torch_run(module, feeds))


@pytest.mark.parametrize("name, layers", [("shufflenet_v2_x0_5", 56), ("swin_t", 1)])
def test_torchvision_models_with_shape_arithmetic_round_trip(torchvision_model, name, layers):
    """shufflenet_v2 splits channels by Gather, Div and Slice of the tensor's Shape; swin_t
    pads, rolls and masks its windows with Range, Mod, Equal, Where and ScatterND."""
    path = torchvision_model(name)
    converted, _ = conv2attn.convert(path, attention="local")
    module = load_trainable(converted)
    assert len(module.named_layers()) == layers
    feeds = random_input(onnx.load(str(path)), batch=2)
    assert_parity(run(str(path), feeds), _torch_run(module, feeds))


def test_a_dynamic_model_round_trips_at_other_sizes():
    model = dynamic(chain_model())
    converted, _ = conv2attn.convert(model, attention="local")
    module = load_trainable(converted)
    rng = np.random.default_rng(0)
    for size in ((9, 11), (16, 20), (5, 7)):
        feeds = {"x": rng.standard_normal((2, 3, *size)).astype(np.float32)}
        assert_parity(run(model, feeds), _torch_run(module, feeds))


def test_a_dynamic_global_layer_builds_indices_only_for_the_sizes_it_runs_at():
    """Planned for the nominal 224x224 on 2x2 patches, the stem's global attention has
    12769 tokens: its [queries, keys] indices take 1.3 GB per axis (20 GB on one-pixel
    patches). The module builds them only for the sizes it is given."""
    model = dynamic(chain_model())
    converted, report = conv2attn.convert(
        model, attention="global", patch=2, include=["stem"], max_param_growth=1e9
    )
    assert report.layers[0].tokens == 113 * 113
    module = load_trainable(converted)
    stem = module.layer("stem")
    assert stem.bias_index is None
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 12, 10)).astype(np.float32)}
    assert_parity(run(model, feeds), _torch_run(module, feeds))
    assert stem.bias_index is None  # built for 12x10 alone


def test_the_round_tripped_model_fine_tunes():
    original = onnx.load(str(DIGITS))
    converted, _ = conv2attn.convert(original, attention="local")
    module = load_trainable(converted).train()
    x = torch.from_numpy(random_input(original, batch=8)["image"])
    labels = torch.arange(8) % 10
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    before = module(x).detach().clone()
    functional.cross_entropy(module(x), labels).backward()
    for _, layer in module.named_layers():
        assert layer.w_o.grad.abs().max() > 0
        # a window of one key (a 1x1 Conv's block) leaves nothing for content to choose
        assert (layer.gate.grad.abs().max() > 0) == (layer.plan.keys > 1)
    assert all(p.grad is not None for p in module.parameters_by_name.values())  # the head
    optimizer.step()
    assert (module(x).detach() - before).abs().max() > 1e-4


def test_what_cannot_round_trip_is_refused_with_the_reason():
    original = onnx.load(str(DIGITS))
    with pytest.raises(InputError, match="no conv2attn record"):
        load_trainable(original)
    converted, report = conv2attn.convert(original)
    edited = onnx.ModelProto()
    edited.CopyFrom(converted)
    name = f"{report.layers[0].name}/attn/W_O"
    tensor = next(t for t in edited.graph.initializer if t.name == name)
    values = onnx.numpy_helper.to_array(tensor).copy()
    values[values == 0] = 0.5  # an entry the construction keeps at zero
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, name))
    with pytest.raises(InputError, match="W_O does not have the construction's structure"):
        load_trainable(edited)
    unsupported = onnx.ModelProto()
    unsupported.CopyFrom(converted)
    relu = next(n for n in unsupported.graph.node if n.op_type == "Relu")
    relu.op_type = "Selu"
    with pytest.raises(InputError, match=f"node '{relu.name}': Selu has no PyTorch equivalent"):
        load_trainable(unsupported)
