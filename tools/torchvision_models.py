"""Export torchvision classification models to ONNX for the tests and benchmarks.

Weights are random (no downloads), with BatchNorm given trained-like statistics so that
activations stay of order one; exported at 224x224 (or a given size) with a dynamic batch
dimension, by the TorchScript exporter (one file) or the dynamo exporter (weights as external data).
"""

from __future__ import annotations

import warnings
from pathlib import Path


def build(name: str, seed: int):
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)().eval()
    # Random initialisation leaves BatchNorm at identity statistics and some classifiers at
    # tiny scale (mobilenet_v2's logits are ~1e-9), where any parity bound passes through
    # its absolute term. Trained-like statistics keep activations of order one.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
    return model


def export(
    name: str,
    path: Path,
    dynamo: bool,
    seed: int = 0,
    size: int = 224,
    opset: int = 13,
    dynamic_size: bool = False,
) -> Path:
    """Export a torchvision model at ``size`` x ``size`` with a dynamic batch dimension
    (and, with ``dynamic_size``, dynamic height and width: TorchScript exporter only)."""
    import torch

    model = build(name, seed)
    example = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            # The new exporter writes the weights as external data next to the model.
            dims = {0: torch.export.Dim("batch")}
            if dynamic_size:
                dims |= {
                    axis: torch.export.Dim(name, min=32, max=2048)
                    for axis, name in ((2, "height"), (3, "width"))
                }
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=["input"],
                dynamic_shapes={"x": dims},
            )
        else:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={
                    "input": {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})}
                },
                opset_version=opset,
            )
    return path
