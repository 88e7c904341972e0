"""Train the shipped example model: a small residual CNN on scikit-learn's digits.

Writes ``digits_cnn.onnx`` (single file, opset 18, dynamic batch, input ``image``
[N, 1, 32, 32], output ``logits`` [N, 10]) and the held-out split ``digits_test.npz``
(``image``, ``labels``) next to this script. Deterministic: seeded, one thread.

    python models/train_digits.py

The network covers what a converter must handle: 3x3 Convs with stride 1 and 2, a 1x1
projection shortcut, BatchNorm, a grouped and a depthwise Conv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
SIZE = 32


def conv_bn(
    cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class Block(nn.Module):
    """Residual block; a 1x1 projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = conv_bn(cout, cout, groups=groups)
        self.shortcut = (
            conv_bn(cin, cout, stride, kernel=1) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        return F.relu(self.conv2(y) + self.shortcut(x))


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.block1 = Block(16, 32, stride=2, groups=4)  # grouped 3x3
        self.block2 = Block(32, 32, stride=2, groups=32)  # depthwise 3x3
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.head(x.mean(dim=(2, 3)))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).numpy()
    return train_test_split(
        images,
        digits.target.astype(np.int64),
        test_size=0.25,
        random_state=SEED,
        stratify=digits.target,
    )


def train(epochs: int) -> tuple[DigitsNet, np.ndarray, np.ndarray, float]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x_train, x_test, y_train, y_test = load_split()
    model = DigitsNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=epochs * (len(x_train) + 63) // 64
    )
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            # Small random shifts: the data set is tiny.
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(inputs[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(1).numpy()
    return model, x_test, y_test, float((predicted == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    start = time.perf_counter()
    model, x_test, y_test, accuracy = train(args.epochs)
    seconds = time.perf_counter() - start
    print(f"trained in {seconds:.1f} s, test accuracy {accuracy:.4f} ({len(y_test)} samples)")
    if accuracy < 0.95:
        raise SystemExit(f"test accuracy {accuracy:.4f} is below 0.95")
    onnx_path = args.out / "digits_cnn.onnx"
    example = torch.from_numpy(x_test[:1])
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        opset_version=18,
        external_data=False,
    )
    program.save(str(onnx_path), external_data=False)
    np.savez_compressed(args.out / "digits_test.npz", image=x_test, labels=y_test)
    print(f"wrote {onnx_path} and {args.out / 'digits_test.npz'}")


if __name__ == "__main__":
    main()
