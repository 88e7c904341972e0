"""Two-phase training at small scale: does a CNN converted into attention make a better
attention model than training the attention from scratch when data is scarce?

Data: scikit-learn's digits (1797 images, 8x8, upsampled to --size), a fixed stratified
75/25 split; the training set is subsampled to each fraction (stratified, per seed).
For each fraction and seed:

  (a) cnn          the CNN trained from scratch (phase 1)
  (b) attn-random  the same network with every Conv2d replaced by ConvAttention, all of
                   its parameters re-initialised at random, trained from scratch
  (c) attn-from-cnn  (a) converted by conv2attn.trainable.convert_module (equal to (a) at
                   that moment), then fine-tuned (phase 2)
  (d) attn-frozen  (c) with every ``attention_parameters()`` frozen (W_Q, W_K, the
                   gates and the position biases: only the value / output projections,
                   biases, BatchNorm and the classifier train)

Every run uses the same optimiser (AdamW, cosine schedule) and a fixed number of steps,
so the smaller fractions see each image many times. Prints a table of test accuracy,
mean and spread (sample standard deviation) over seeds, and one of how far the attention
of (c) moved per layer (mean |gate|, share of attention mass off the convolution's
positions on the test images); writes every run as JSON, and with --report the trained
attention of the first seed's (c) at the largest fraction as an HTML page.

    python tools/two_phase.py --json two_phase.json --report two_phase.html  # ~20 min
    python tools/two_phase.py --seeds 1 --fractions 0.1 --steps 50   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conv2attn.core.weights import TRAINABLE_ALPHA  # noqa: E402
from conv2attn.modelio import write_json  # noqa: E402
from conv2attn.trainable import ConvAttention, attention_summary, convert_module  # noqa: E402
from conv2attn.trained_report import write_trained_report  # noqa: E402

VARIANTS = ("cnn", "attn-random", "attn-from-cnn", "attn-frozen")


class SmallCnn(nn.Module):
    """Three Conv-BN-ReLU stages (the middle one strided), global average pool, linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_data(size: int):
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    return train_test_split(
        images, torch.tensor(digits.target), test_size=0.25, random_state=0, stratify=digits.target
    )


def subset(x, y, fraction: float, seed: int):
    if fraction >= 1:
        return x, y
    keep, _ = train_test_split(
        np.arange(len(y)), train_size=fraction, random_state=seed, stratify=y.numpy()
    )
    keep = torch.from_numpy(np.sort(keep))
    return x[keep], y[keep]


def train(model: nn.Module, x, y, steps: int, lr: float, seed: int, batch: int = 32) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(y), (min(batch, len(y)),), generator=generator)
        shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
        images = torch.roll(x[index], shifts=shift, dims=(2, 3))  # tiny data: small shifts
        loss = F.cross_entropy(model(images), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(fraction: float, seed: int, args, data) -> dict:
    x_train, x_test, y_train, y_test = data
    x, y = subset(x_train, y_train, fraction, seed)
    torch.manual_seed(seed)
    cnn = SmallCnn()
    train(cnn, x, y, args.steps, args.lr, seed)
    results = {"cnn": accuracy(cnn, x_test, y_test)}

    example = x_test[:1]
    converted = convert_module(cnn, example, attention=args.attention, alpha=args.alpha)
    at_conversion = accuracy(converted, x_test, y_test)

    torch.manual_seed(seed)
    random_attention = convert_module(SmallCnn(), example, attention=args.attention)
    generator = torch.Generator().manual_seed(seed)
    for module in random_attention.modules():
        if isinstance(module, ConvAttention):
            module.reset_parameters(generator)
    train(random_attention, x, y, args.steps, args.lr, seed)
    results["attn-random"] = accuracy(random_attention, x_test, y_test)

    frozen = convert_module(cnn, example, attention=args.attention, alpha=args.alpha)
    train(converted, x, y, args.finetune_steps, args.finetune_lr, seed + 1)
    results["attn-from-cnn"] = accuracy(converted, x_test, y_test)
    for module in frozen.modules():
        if isinstance(module, ConvAttention):
            for parameter in module.attention_parameters():
                parameter.requires_grad_(False)
    train(frozen, x, y, args.finetune_steps, args.finetune_lr, seed + 1)
    results["attn-frozen"] = accuracy(frozen, x_test, y_test)
    summary = attention_summary(converted, x_test[:128])
    return {
        "fraction": fraction,
        "seed": seed,
        "train_images": len(y),
        "accuracy": results,
        "converted_at_init": at_conversion,
        "attention_moved": [
            {
                "layer": layer["name"],
                "gates": layer["gates"],
                "off_convolution": layer["off_convolution"],
            }
            for layer in summary
        ],
    }, summary


def table(rows: list[dict]) -> str:
    lines = [
        "| train fraction (images) | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for fraction in sorted({r["fraction"] for r in rows}):
        group = [r for r in rows if r["fraction"] == fraction]
        cells = []
        for variant in VARIANTS:
            values = [100 * r["accuracy"][variant] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        label = f"{fraction:.0%} ({group[0]['train_images']})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def movement_table(rows: list[dict]) -> str:
    """Per fraction and layer: mean |gate| and the attention mass off the convolution's
    positions (mean over heads), mean ± standard deviation over seeds."""
    layers = [entry["layer"] for entry in rows[0]["attention_moved"]]
    lines = [
        "| train fraction | " + " | ".join(f"{name}: mean abs gate / off-conv %" for name in layers)
        + " |",
        "|---|" + "---|" * len(layers),
    ]  # fmt: skip
    for fraction in sorted({r["fraction"] for r in rows}):
        group = [r for r in rows if r["fraction"] == fraction]
        cells = []
        for index in range(len(layers)):
            entries = [r["attention_moved"][index] for r in group]
            gates = [statistics.mean(abs(g) for g in e["gates"]) for e in entries]
            off = [100 * statistics.mean(e["off_convolution"]) for e in entries]
            cells.append(f"{_spread(gates, 2)} / {_spread(off, 1)}")
        lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spread(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=16, help="image side after upsampling")
    parser.add_argument("--steps", type=int, default=600, help="phase 1 and (b) steps")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=TRAINABLE_ALPHA, help="initial sharpness")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--attention", choices=("global", "local"), default="global")
    parser.add_argument("--json", type=Path, help="write every run here")
    parser.add_argument("--report", type=Path, help="write the trained attention page here")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    data = load_data(args.size)
    rows = []
    start = time.perf_counter()
    for fraction in args.fractions:
        for seed in range(args.seeds):
            row, summary = run(fraction, seed, args, data)
            rows.append(row)
            if args.report and seed == 0 and fraction == max(args.fractions):
                title = f"two-phase: fine-tuned attention, {fraction:.0%} of the data, seed 0"
                write_trained_report(summary, args.report, title)
            print(json.dumps(row), flush=True)
            if args.json:
                write_json(args.json, rows, indent=1)
    print(
        f"\n{len(rows)} runs in {time.perf_counter() - start:.0f} s; test accuracy, %, "
        f"mean ± standard deviation over {args.seeds} seeds, {len(data[3])} test images\n"
    )
    print(table(rows))
    print("\nHow far the attention of attn-from-cnn moved:\n")
    print(movement_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
