"""Coverage over the torchvision classification zoo: does every Conv convert, with parity?

For each model torchvision builds offline (random weights with trained-like BatchNorm
statistics, eval mode, 224x224 or the model's own input size): export to ONNX, convert,
check parity against the original with onnxruntime (fp32, the converter's bound), and
print one row: Convs found, converted, skipped with reasons, parity, conversion time.
Each model runs in its own process, so one that fails (or runs out of memory) is
reported and the rest go on.

    python tools/zoo.py                                  # every classification model
    python tools/zoo.py --models resnet18 convnext_tiny --attention global
    python tools/zoo.py --json zoo.json --markdown       # README table
    python tools/zoo.py --form attention                 # the standard Attention operator
    python tools/zoo.py --grid fixed --layout nchw       # convert's --grid and --layout
    python tools/zoo.py --queries strided                # convert's --queries
    python tools/zoo.py --batch 8                        # tiles sized for batch 8
    python tools/zoo.py --torch      # also through the torch-cuda import, on the CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conv2attn.modelio import write_json  # noqa: E402

# Models whose architecture expects another input size than 224x224.
INPUT_SIZE = {"inception_v3": 299}
CI_SUBSET = (
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "densenet121",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "convnext_tiny",
    "googlenet",
)


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


# The second size a model exported with dynamic height and width is checked at.
SECOND_SIZE = (160, 192)


def run_model(
    name: str,
    folder: Path,
    attention: str = "local",
    seed: int = 0,
    dynamic: bool = False,
    form: str = "matmul",
    grid: str = "auto",
    layout: str = "channels-last",
    batch: int = 1,
    torch_import: bool = False,
    queries: str = "auto",
) -> dict:
    """Export, convert and check one model; the row of the coverage table. ``dynamic``:
    export with dynamic height and width, convert once, check at two sizes; ``form``,
    ``grid``, ``layout``, ``batch``, ``queries``: convert's options (the check runs at
    batch 1, or 2 when converted for a larger batch: tiles sized for any batch run at
    every batch, and a stretch run per item stacks and merges the items). ``torch_import``: also run
    the conversion through the torch-cuda backend's import, on the CPU in fp32, at the
    first size."""
    import numpy as np
    import onnx

    from conv2attn.graph.rewrite import convert
    from conv2attn.modelio import save_model
    from conv2attn.validate import ATOL, RTOL, compare, session
    from tools.torchvision_models import export

    size = INPUT_SIZE.get(name, 224)
    row: dict = {"model": name, "input": f"{size}x{size}", "attention": attention, "form": form}
    row |= {"grid": grid, "layout": layout, "batch": batch, "queries": queries}
    source = folder / f"{name}.onnx"
    start = time.perf_counter()
    # opset 17: the vision transformers' attention needs 14 or newer
    try:
        export(name, source, dynamo=False, seed=seed, size=size, opset=17, dynamic_size=dynamic)
    except Exception:  # TorchScript cannot export some models with dynamic sizes (alexnet's
        if not dynamic:  # adaptive pooling); the dynamo exporter can
            raise
        export(name, source, dynamo=True, seed=seed, size=size, dynamic_size=True)
        row["exporter"] = "dynamo"
    row["export_s"] = round(time.perf_counter() - start, 1)
    original = onnx.load(str(source), load_external_data=False)
    row["convs"] = sum(node.op_type == "Conv" for node in _all_nodes(original.graph))
    del original

    start = time.perf_counter()
    options = dict(
        attention=attention, form=form, grid=grid, layout=layout, batch=batch, queries=queries
    )
    converted, report = convert(source, check=False, **options)
    row["convert_s"] = round(time.perf_counter() - start, 2)
    row["transposes"] = sum(node.op_type == "Transpose" for node in converted.graph.node)
    row["fixed_grid_layers"] = sum(layer.grid == "fixed" for layer in report.layers)
    row["strided_query_layers"] = sum(layer.strided_queries for layer in report.layers)
    row["tiled_layers"] = sum(layer.tiles > 1 for layer in report.layers)
    row["per_item_layers"] = sum(layer.per_item for layer in report.layers)
    row["converted"] = len(report.layers)
    row["skipped"] = [f"{s.name}: {s.reason}" for s in report.skipped]
    row["macs_x"] = round(report.macs_after / max(report.macs_before, 1), 2)
    target = folder / f"{name}_attn.onnx"
    save_model(converted, target)
    del converted

    rng = np.random.default_rng(seed)
    errors = []
    original_session, converted_session = session(str(source)), session(str(target))
    sizes = [(size, size), *([SECOND_SIZE] if dynamic else [])]
    row["sizes_checked"] = []
    checked = []
    for height, width in sizes:
        shape = (min(batch, 2), 3, height, width)
        feeds = {"input": rng.standard_normal(shape).astype(np.float32)}
        try:
            reference = original_session.run(None, feeds)
        except Exception:  # the original itself takes only its export size (a ViT, say)
            continue
        actual = converted_session.run(None, feeds)
        errors += [compare(str(i), r, a) for i, (r, a) in enumerate(zip(reference, actual))]
        row["sizes_checked"].append(f"{height}x{width}")
        checked.append((feeds, reference))
    if torch_import:
        del converted_session
        row |= _through_torch(target, *checked[0])
    row["dynamic_layers"] = sum(layer.dynamic for layer in report.layers)
    worst = max(errors, key=lambda e: e.max_rel)
    row["max_abs"] = float(worst.max_abs)
    row["max_rel"] = float(worst.max_rel)
    row["max_ref"] = float(worst.max_reference)
    row["parity"] = all(e.within(RTOL, ATOL) for e in errors)
    return row


def _through_torch(target: Path, feeds: dict, reference: list) -> dict:
    """The converted model through the torch-cuda backend's import (onnx2torch), run on
    the CPU in fp32: parity with the original's onnxruntime outputs, or why it is refused."""
    import onnx
    import torch

    from conv2attn.errors import InputError
    from conv2attn.runtime.torch_cuda import TorchRunner
    from conv2attn.validate import ATOL, RTOL, compare

    try:
        runner = TorchRunner(torch, onnx.load(str(target)), feeds, "fp32", device="cpu")
        outputs = runner.outputs()
    except InputError as error:
        return {"torch": f"refused: {error}"}
    except Exception as error:  # onnx2torch's own failure: the row keeps the rest
        return {"torch": f"error: {type(error).__name__}: {error}"}
    errors = [compare(str(i), r, a) for i, (r, a) in enumerate(zip(reference, outputs))]
    parity = all(e.within(RTOL, ATOL) for e in errors)
    return {"torch": "parity" if parity else "off", "torch_max_rel": max(e.max_rel for e in errors)}


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _all_nodes(attribute.g)


def _run_isolated(name: str, args: argparse.Namespace) -> dict:
    """``run_model`` in a child process; a crash, an error or a timeout becomes the row."""
    timeout = args.timeout
    with tempfile.TemporaryDirectory(prefix=f"zoo_{name}_") as folder:
        out = Path(folder) / "row.json"
        command = [sys.executable, __file__, "--one", name, "--attention", args.attention]
        command += ["--row", str(out), "--folder", folder]
        command += ["--dynamic"] if args.dynamic else []
        command += ["--form", args.form, "--grid", args.grid, "--layout", args.layout]
        command += ["--queries", args.queries]
        command += ["--batch", str(args.batch)] + ["--torch"] * args.torch
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "error": f"took longer than {timeout:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        tail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        if result.returncode < 0:
            tail = f"killed by signal {-result.returncode} (out of memory?)"
        return {"model": name, "error": tail}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | input | Convs | converted | skipped | parity (max rel) | convert s | MACs x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | | | | | failed: {row['error']} | | |")
            continue
        skipped = "; ".join(row["skipped"]) or "0"
        parity = f"{'yes' if row['parity'] else 'NO'} ({row['max_rel']:.1e})"
        lines.append(
            f"| {row['model']} | {row['input']} | {row['convs']} | {row['converted']} | "
            f"{skipped} | {parity} | {row['convert_s']:.1f} | {row['macs_x']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="default: every classification model")
    parser.add_argument("--ci-subset", action="store_true", help="the models CI runs")
    parser.add_argument("--attention", choices=("global", "local", "auto"), default="local")
    parser.add_argument("--grid", choices=("shifted", "fixed", "auto"), default="auto")
    parser.add_argument("--queries", choices=("patch", "strided", "auto"), default="auto")
    parser.add_argument("--layout", choices=("channels-last", "nchw"), default="channels-last")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="export with dynamic height and width, convert once, check at two sizes",
    )
    parser.add_argument("--form", choices=("matmul", "attention"), default="matmul")
    parser.add_argument("--batch", type=int, default=1, help="convert --batch")
    parser.add_argument(
        "--torch",
        action="store_true",
        help="also run each conversion through the torch-cuda import (onnx2torch), on the CPU",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # the child process of _run_isolated
        try:
            row = run_model(
                args.one,
                args.folder,
                args.attention,
                dynamic=args.dynamic,
                form=args.form,
                grid=args.grid,
                layout=args.layout,
                batch=args.batch,
                torch_import=args.torch,
                queries=args.queries,
            )
        except Exception as error:  # the row says what went wrong; the parent goes on
            traceback.print_exc()
            row = {"model": args.one, "error": f"{type(error).__name__}: {error}"}
        write_json(args.row, row)
        return 0

    names = args.models or (list(CI_SUBSET) if args.ci_subset else classification_models())
    rows = []
    for name in names:
        row = _run_isolated(name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            write_json(args.json, rows, indent=1)
    if args.markdown:
        print(markdown(rows))
    failed = [r["model"] for r in rows if "error" in r or r["skipped"] or not r["parity"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} models: every Conv converted with parity")
    if failed:
        print("not fully converted with parity: " + ", ".join(failed))
    if args.torch:
        through = [r for r in rows if r.get("torch") == "parity"]
        print(f"through the torch-cuda import: {len(through)} of {len(rows)} with parity")
        for row in rows:
            if row.get("torch") != "parity":
                print(f"  {row['model']}: {row.get('torch', row.get('error', 'not run'))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
