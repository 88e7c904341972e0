"""The trained-attention page: each head's learned attention next to its starting kernel."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import conv2attn
from conv2attn.torch_graph import load_trainable
from conv2attn.trainable import ConvAttention, attention_summary, convert_module
from conv2attn.trained_report import write_trained_report

pytest.importorskip("matplotlib")
DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"


def _model() -> nn.Module:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    return convert_module(cnn, torch.randn(1, 3, 8, 8), patch=1)


def test_summary_measures_how_far_each_head_moved():
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    start = attention_summary(model, x)
    assert [layer["name"] for layer in start] == ["0", "2"]
    assert all(max(layer["off_convolution"]) < 1e-6 for layer in start)
    layers = [m for m in model.modules() if isinstance(m, ConvAttention)]
    with torch.no_grad():
        layers[1].gate[3] = 0.5
    moved = attention_summary(model, x)[1]
    assert moved["gates"][3] == 0.5
    # half the mass follows content attention, which puts little on the Conv's one key
    assert 0.3 < moved["off_convolution"][3] <= 0.5
    assert max(v for h, v in enumerate(moved["off_convolution"]) if h != 3) < 1e-6


def test_page_shows_every_layer_and_head(tmp_path):
    model = _model()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ConvAttention):
                layer.gate.fill_(0.25)
    summary = attention_summary(model, torch.randn(2, 3, 8, 8))
    page = tmp_path / "trained.html"
    write_trained_report(summary, page, "fine-tuned")
    text = page.read_text()
    assert text.count('<section class="layer">') == 2 and text.count("<svg") == 2
    assert text.count("g=+0.25") == 2 * 9  # every head's panel title, in both layers
    assert [p.name for p in tmp_path.iterdir()] == ["trained.html"]  # nothing staged left


def test_layers_of_a_round_tripped_onnx_model_are_named_by_their_conv(tmp_path):
    converted, report = conv2attn.convert(onnx.load(str(DIGITS)), attention="local")
    module = load_trainable(converted)
    summary = attention_summary(module, torch.randn(2, 1, 32, 32))
    # in the order the model runs them, which a residual branch may change
    assert sorted(layer["name"] for layer in summary) == sorted(x.name for x in report.layers)
    write_trained_report(summary, tmp_path / "digits.html", "digits")
    assert report.layers[0].name in (tmp_path / "digits.html").read_text()
