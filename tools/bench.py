"""Benchmark: torchvision CNNs against their global and local attention conversions.

For each model (224x224, random weights with trained-like BatchNorm statistics): export,
convert with ``--attention global`` and ``--attention local`` in fresh processes
(conversion time: the median of ``--convert-runs`` processes, 3 by default, since one
process's time on a shared machine varies by a fifth; peak memory: the largest), then
time the original and both conversions side by side with onnxruntime on the CPU at each
batch size, alternating in blocks of runs with each block's first run dropped. The batch
sizes take turns in ``--rounds`` rounds (4 by default, every other one timing the models
in reverse order), so that a phase of the machine's speed falls on all of them alike; a
ratio is taken within a round and the median over rounds reported. Each batch size times
the conversions made for it (``convert --batch``, which sizes local attention's tiles;
conversion time, memory and sizes are from the first batch's). On GPU backends the
conversions are made with ``--no-tiles``: tiles keep a CPU's caches warm, and a GPU runs
each tile as kernels of its own. Prints one table; its Transposes column counts them in
the original, in the conversion with NCHW between layers (``--layout nchw``) and in the
one timed (channels-last between layers, the default); latency ratios are of medians and
of best blocks (``conv2attn.profile``: the median of each model's fastest block of runs,
steadier where the machine's speed drifts).

    python tools/bench.py                       # resnet18, resnet50, mobilenet_v2
    python tools/bench.py --models resnet18 --batches 1 --iterations 20
    python tools/bench.py --backend torch-cuda --precision fp16 --batches 1 32
    python tools/bench.py --backend trt --precision fp16 --cuda-graph --engine-cache engines/
    python tools/bench.py --forms matmul attention   # the standard Attention operator too
    python tools/bench.py --attentions global local auto   # auto: per Conv by the cost model

GPU backends also report each model's worst output error against onnxruntime CPU fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import conv2attn  # noqa: E402
from conv2attn.errors import InputError  # noqa: E402
from conv2attn.modelio import write_json  # noqa: E402
from conv2attn.profile import profile  # noqa: E402
from conv2attn.report import format_table  # noqa: E402
from conv2attn.runtime import BACKENDS, PRECISIONS, GpuOptions, require  # noqa: E402
from tools.torchvision_models import export  # noqa: E402

# Runs the CLI and prints the process's peak resident memory (VmHWM starts afresh at
# exec; ru_maxrss of a child would include the parent's own memory at fork).
CONVERT_AND_REPORT_PEAK = """
import atexit, runpy, sys
def peak():
    status = open("/proc/self/status").read()
    print("peak_kb", status.split("VmHWM:")[1].split()[0], file=sys.stderr)
atexit.register(peak)
sys.argv = ["conv2attn", *sys.argv[1:]]
runpy.run_module("conv2attn", run_name="__main__")
"""


def run_with_peak(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """``conv2attn ARGS`` in a fresh process: the result and its peak memory in bytes."""
    result = subprocess.run(
        [sys.executable, "-c", CONVERT_AND_REPORT_PEAK, *map(str, args)],
        capture_output=True,
        text=True,
    )
    peak = result.stderr.rsplit("peak_kb", 1)[-1].split()
    return result, int(peak[0]) * 1024 if peak else 0


def convert(
    source: Path,
    output: Path,
    attention: str,
    form: str = "matmul",
    batch: int = 1,
    tiles: bool = True,
    runs: int = 1,
) -> dict:
    """Run ``conv2attn convert`` ``runs`` times, each in its own process: the median wall
    time and the largest peak resident memory."""
    report = output.with_suffix(".json")
    seconds, peak = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        _, run_peak = _convert_once(source, output, attention, form, batch, tiles, report)
        seconds.append(time.perf_counter() - start)
        peak = max(peak, run_peak)
    totals = json.loads(report.read_text())["totals"]
    size = output.stat().st_size + sum(
        p.stat().st_size for p in output.parent.glob(output.name + ".data")
    )
    return {
        "seconds": statistics.median(seconds),
        "peak_mb": peak / 2**20,
        "transposes": transposes(onnx.load(str(output), load_external_data=False)),
        "size": size,
        "mac_ratio": totals["macs_after"] / totals["macs_before"],
        "param_ratio": totals["params_after"] / totals["params_before"],
    }


def _convert_once(
    source: Path, output: Path, attention: str, form: str, batch: int, tiles: bool, report: Path
) -> tuple[subprocess.CompletedProcess, int]:
    """One ``conv2attn convert`` process: its result and peak memory; exits on failure."""
    result, peak = run_with_peak(
        "convert",
        source,
        "-o",
        output,
        "--attention",
        attention,
        "--form",
        form,
        "--batch",
        batch,
        "--report",
        report,
        "--force",
        "-q",
        *([] if tiles else ["--no-tiles"]),
    )
    if result.returncode != 0:
        raise SystemExit(f"conversion failed: {result.stderr}")
    return result, peak


@dataclass
class RoundTiming:
    """One round at one batch size, per model (the original first): median and best block,
    in ms."""

    median_ms: list[float]
    best_block_ms: list[float]


@dataclass
class RoundsSummary:
    """Per model over the rounds: the median of its round medians, its fastest block, the
    median of its round ratios (each against the original's median in the same round)
    and its fastest block against the original's."""

    median_ms: list[float]
    best_block_ms: list[float]
    ratios: list[float]
    best_block_ratios: list[float]


def summarise_rounds(rounds: list[RoundTiming]) -> RoundsSummary:
    """Combine rounds: a ratio is taken within its round (side by side), then the median
    over rounds, so a round in a slow phase of the machine counts once, not its runs."""
    if not rounds:
        raise ValueError("no rounds")
    models = range(len(rounds[0].median_ms))
    best = [min(r.best_block_ms[i] for r in rounds) for i in models]
    return RoundsSummary(
        median_ms=[statistics.median(r.median_ms[i] for r in rounds) for i in models],
        best_block_ms=best,
        ratios=[statistics.median(r.median_ms[i] / r.median_ms[0] for r in rounds) for i in models],
        best_block_ratios=[b / best[0] for b in best],
    )


def round_order(models: int, round_index: int) -> list[int]:
    """The order the models are timed in, in round ``round_index``: as given, and reversed
    every other round. A model timed right after a similar one measures faster: the same
    graph (efficientnet_b0's local and auto conversions) timed second ran 2-3% faster at
    batch 1, round after round; reversing the order every other round cancels that."""
    order = list(range(models))
    return order[::-1] if round_index % 2 else order


def auto_against_uniform(rounds: list[RoundTiming], auto: int, uniform: list[int]) -> list[float]:
    """Per round, ``--attention auto``'s median against the faster of the uniform modes'
    (indexes into each round's models) in that round: above 1 where auto was slower."""
    return [r.median_ms[auto] / min(r.median_ms[i] for i in uniform) for r in rounds]


def transposes(model: onnx.ModelProto) -> int:
    """Layout changes left in a model: its Transpose nodes."""
    return sum(node.op_type == "Transpose" for node in model.graph.node)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument(
        "--batches", nargs="+", type=int, help="default: 1 8 on the CPU, 1 32 on a GPU"
    )
    parser.add_argument("--iterations", type=int, default=30, help="timed runs per model and batch")
    parser.add_argument("--block-runs", type=int, default=6, help="runs per block, first dropped")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    parser.add_argument(
        "--backend",
        default="ort-cpu",
        choices=tuple(BACKENDS),
        help="runtime for the latency columns (conversion always runs on the CPU)",
    )
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--cuda-graph", action="store_true", help="trt, torch-cuda")
    parser.add_argument("--engine-cache", type=Path, help="trt: keep built engines here")
    parser.add_argument(
        "--attentions",
        nargs="+",
        choices=("global", "local", "auto"),
        default=["global", "local"],
        help="convert --attention of each conversion (default: global local)",
    )
    parser.add_argument(
        "--forms",
        nargs="+",
        choices=("matmul", "attention"),
        default=["matmul"],
        help="convert --form of each conversion (default: matmul)",
    )
    parser.add_argument(
        "--convert-runs",
        type=int,
        default=3,
        help="fresh-process conversions per model and mode; convert s is their median",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds that time every batch size in turn, --iterations split among them; "
        "every other round times the models in reverse order",
    )
    parser.add_argument("--json", type=Path, help="write all measurements as JSON")
    return parser


def measure(name: str, folder: Path, args: argparse.Namespace, gpu: GpuOptions) -> dict:
    """Export ``name``, convert it both ways, and time all three at every batch size:
    per attention mode, the conversion's figures and the latency ratios; the heading of
    the runtime; the worst output error of each model on GPU backends."""
    source = export(name, folder / f"{name}.onnx", dynamo=False)
    original_size = source.stat().st_size
    conversions: dict = {}
    variants = [(attention, form) for form in args.forms for attention in args.attentions]
    worst, heading = {}, ""
    paths_by_batch = {}
    for batch_index, batch in enumerate(args.batches):
        # each batch size runs the conversion made for it (convert --batch: local
        # attention's tiles sized for that batch); the figures are the first batch's
        paths = [source]
        for attention, form in variants:
            output = folder / f"{name}_{attention}_{form}_b{batch}.onnx"
            tiles = not BACKENDS[args.backend].gpu
            runs = args.convert_runs if batch_index == 0 else 1  # figures: the first batch's
            figures = convert(source, output, attention, form, batch, tiles, runs)
            if (attention, form) not in conversions:
                # the same conversion with NCHW between layers: the Transposes saved
                nchw, _ = conv2attn.convert(
                    source, attention=attention, form=form, layout="nchw", check=False
                )
                conversions[attention, form] = figures | {"transposes_nchw": transposes(nchw)}
            paths.append(output)
        paths_by_batch[batch] = paths
    # rounds of every batch size in turn: a phase of the machine's speed lasting minutes
    # then falls on both batch sizes alike, and their ratios can be compared
    timings: dict[int, list[RoundTiming]] = {batch: [] for batch in args.batches}
    per_round = max(args.block_runs - 1, -(-args.iterations // args.rounds))
    for round_index in range(args.rounds):
        order = round_order(len(paths_by_batch[args.batches[0]]), round_index)
        for batch in args.batches:
            paths = [paths_by_batch[batch][i] for i in order]
            report = profile(
                paths,
                [onnx.load(str(p)) for p in paths],
                batch=batch,
                threads=args.threads,
                iterations=per_round,
                block=args.block_runs,
                backend=args.backend,
                gpu=gpu,
            )
            heading = f"{report.backend}, {report.precision}, {report.device}"
            for m in report.models:
                if m.numerics is not None:
                    worst[m.path] = max(worst.get(m.path, 0.0), m.numerics.max_rel)
            timed = [report.models[order.index(i)].stats for i in range(len(order))]
            timings[batch].append(
                RoundTiming([t.median_ms for t in timed], [t.best_block_ms for t in timed])
            )
    latency, best = {}, {}
    labels = ", ".join(["original", *(f"{a} {f}" for a, f in variants)])
    for batch in args.batches:
        summary = summarise_rounds(timings[batch])
        latency[batch], best[batch] = summary.ratios, summary.best_block_ratios
        medians = ", ".join(f"{ms:.2f}" for ms in summary.median_ms)
        blocks = ", ".join(f"{ms:.2f}" for ms in summary.best_block_ms)
        print(
            f"{name} batch {batch}: median ms ({labels}) = {medians}; best block ms = {blocks}",
            flush=True,
        )
    auto_against = {}
    for form in args.forms:
        modes = {a: i for i, (a, f) in enumerate(variants, start=1) if f == form}
        if not {"auto", "global", "local"} <= set(modes):
            continue
        uniform = [modes["global"], modes["local"]]
        for batch in args.batches:
            paired = auto_against_uniform(timings[batch], modes["auto"], uniform)
            auto_against[form, batch] = paired
            listed = ", ".join(f"{r:.3f}" for r in paired)
            print(f"{name} batch {batch}: {form} auto / faster uniform mode, per round: {listed}")
    transposes_before = transposes(onnx.load(str(source), load_external_data=False))
    results = [
        {
            "model": name,
            "attention": attention,
            "form": form,
            **conversions[attention, form],
            "size_ratio": conversions[attention, form]["size"] / original_size,
            "transposes_before": transposes_before,
            "latency_ratio": {str(b): latency[b][index] for b in args.batches},
            "rounds": args.rounds,
            "best_block_ratio": {str(b): best[b][index] for b in args.batches},
            **(
                {"auto_against_uniform": {str(b): auto_against[form, b] for b in args.batches}}
                if attention == "auto" and (form, args.batches[0]) in auto_against
                else {}
            ),
        }
        for index, (attention, form) in enumerate(variants, start=1)
    ]
    return {"results": results, "worst": worst, "heading": heading}


def _row(result: dict, batches: list[int]) -> list[str]:
    return [
        result["model"],
        result["attention"],
        result["form"],
        f"{result['seconds']:.1f}",
        f"{result['peak_mb']:.0f}",
        f"{result['peak_mb'] * 2**20 / result['size']:.1f}",
        f"{result['size_ratio']:.2f}",
        f"{result['mac_ratio']:.2f}",
        f"{result['param_ratio']:.2f}",
        f"{result['transposes_before']}/{result['transposes_nchw']}/{result['transposes']}",
        *[f"{result['latency_ratio'][str(b)]:.2f}" for b in batches],
        *[f"{result['best_block_ratio'][str(b)]:.2f}" for b in batches],
    ]


def main() -> None:
    args = _parser().parse_args()
    try:
        require(args.backend)  # before minutes of exporting and converting
    except InputError as error:
        raise SystemExit(f"bench: {error}") from None
    if args.batches is None:
        args.batches = [1, 32] if BACKENDS[args.backend].gpu else [1, 8]
    if args.rounds < 1:
        raise SystemExit(f"bench: --rounds {args.rounds}: must be at least 1")
    gpu = GpuOptions(
        precision=args.precision, cuda_graph=args.cuda_graph, engine_cache=args.engine_cache
    )
    header = ["model", "attention", "form", "convert s", "peak MB", "peak/size", "size x"]
    header.append("MACs x")
    header += ["params x", "Transposes o/n/c"]
    header += [f"latency x b{b}" for b in args.batches]
    rows = [[*header, *[f"best block x b{b}" for b in args.batches]]]
    results, worst, heading = [], {}, ""
    with tempfile.TemporaryDirectory(prefix="conv2attn-bench-") as folder:
        for name in args.models:
            measured = measure(name, Path(folder), args, gpu)
            results += measured["results"]
            worst.update(measured["worst"])
            heading = measured["heading"]
            rows += [_row(result, args.batches) for result in measured["results"]]
    print()
    if not BACKENDS[args.backend].gpu:
        machine = platform.processor() or platform.machine()
        heading = f"onnxruntime CPU, fp32, {args.threads or os.cpu_count()} threads, {machine}"
    print(heading)
    print(format_table(rows, [False, False, False, *[True] * (len(rows[0]) - 3)]))
    if worst:
        print("\nworst output error against onnxruntime CPU fp32 (max rel):")
        for path, error in worst.items():
            print(f"  {Path(path).name}: {error:.2e}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
