"""The ``conv2attn`` command line: argument parsing, logging, exit codes.

Exit codes: 0 success, 2 usage or input error (one line on stderr), 3 internal error
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import sys
import time
from pathlib import Path

from conv2attn import __version__
from conv2attn.errors import Conv2AttnError, InputError
from conv2attn.modelio import check_output_path, write_json
from conv2attn.runtime.registry import BACKENDS, PRECISIONS, help_text
from conv2attn.terminal import Progress, use_colour

log = logging.getLogger("conv2attn")

CONVERT_EPILOG = """\
examples:
  conv2attn convert resnet18.onnx -o resnet18_attn.onnx
  conv2attn convert model.onnx -o out.onnx --patch 2x2 --report layers.json
  conv2attn convert resnet50.onnx -o resnet50_local.onnx --attention local
  conv2attn convert detector.onnx -o out.onnx --input-shape images:1x3x640x640
  conv2attn convert model.onnx -o out.onnx --exclude '/backbone/stem*'
"""


CHECK_EPILOG = """\
examples:
  conv2attn check resnet18.onnx resnet18_attn.onnx
  conv2attn check digits_cnn.onnx digits_attn.onnx --inputs digits_test.npz
  conv2attn check resnet18.onnx resnet18_attn.onnx --images photos/ --per-layer
  conv2attn check model.onnx model_attn.onnx --input-shape x:1x3x256x256 --samples 8 --json r.json

exit codes: 0 every output within tolerance, 1 not, 2 bad input, 3 internal error
"""

PROFILE_EPILOG = """\
examples:
  conv2attn profile resnet18.onnx resnet18_attn.onnx
  conv2attn profile resnet18.onnx resnet18_local.onnx --batch 8 --threads 2 --iterations 100
  conv2attn profile resnet18_attn.onnx --per-layer --json profile.json
  conv2attn profile r18.onnx r18_attn.onnx --backend trt --engine-cache engines/ --cuda-graph
  conv2attn profile resnet18.onnx resnet18_attn.onnx --backend torch-cuda --precision fp16

backends (what each needs is in the README):
{backends}
GPU backends also compare each model's outputs with onnxruntime CPU fp32.
"""

REPORT_EPILOG = """\
examples:
  conv2attn report resnet18.onnx resnet18_attn.onnx -o report.html
  conv2attn report resnet18.onnx resnet18_attn.onnx -o r.html --layer /layer1/layer1.0/conv1/Conv
  conv2attn profile resnet18.onnx resnet18_attn.onnx --per-layer --json p.json
  conv2attn report resnet18.onnx resnet18_attn.onnx -o report.html --profile p.json --png charts/
"""

INSPECT_EPILOG = """\
examples:
  conv2attn inspect resnet18.onnx
  conv2attn inspect detector.onnx --input-shape images:1x3x640x640 --attention local
  conv2attn inspect model.onnx --patch 2 --json -
"""

DEMO_EPILOG = """\
example:
  conv2attn demo -o demo_out/
"""

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that points to --help, exit code 2. Long options must be
    spelled out: an abbreviation (``--input`` for ``--input-shape``) is an error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _input_shape_option(parser, help: str) -> None:
    parser.add_argument(
        "--input-shape",
        "--input-shapes",
        "--shapes",
        dest="input_shape",
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help=f"{help}; NAME:1x3x224x224, NAME:1,3,224,224 or NAME:[1,3,224,224]",
    )


def _force_option(parser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    verbosity = group.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print progress details")
    group.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    group.add_argument("--version", action="version", version=f"conv2attn {__version__}")


def _json_option(parser, *names: str, dest: str = "json", help: str) -> None:
    parser.add_argument(
        *names, dest=dest, type=Path, metavar="FILE.json", help=f"{help} ('-': to stdout)"
    )


def _to_stdout(path: Path | None) -> bool:
    return path is not None and str(path) == "-"


def _write_report(path: Path | None, data: dict) -> None:
    """``--json``: to the file, or to stdout for ``-`` (then nothing else goes there)."""
    if _to_stdout(path):
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif path is not None:
        write_json(path, data)


def _check_json_path(path: Path | None, inputs: list[Path]) -> None:
    if path is not None and not _to_stdout(path):
        check_output_path(path, inputs, force=True)


def _duration(text: str) -> float:
    """Seconds from ``2s``, ``200ms`` or a bare number of seconds. A bare number above 30
    is refused: trtexec's ``--warmUp`` counts milliseconds, and ``--warmup 200`` would
    otherwise wait over three minutes."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(ms|s)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}': expected seconds, e.g. 1, 2s or 200ms")
    value, unit = float(match.group(1)), match.group(2)
    if unit is None and value > 30:
        raise argparse.ArgumentTypeError(
            f"'{text}' would be {value:g} seconds; write {text}ms or {text}s to say which"
        )
    return value / 1000 if unit == "ms" else value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="conv2attn",
        description="Replace the Conv nodes of an ONNX CNN by exactly equivalent multi-head "
        "self-attention with relative positional encoding.",
    )
    parser.add_argument("--version", action="version", version=f"conv2attn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_convert, _add_inspect, _add_check, _add_profile, _add_report, _add_demo):
        add(commands)
    return parser


def _command(commands, name: str, **texts: str) -> argparse.ArgumentParser:
    """A subcommand whose help keeps the epilog's examples as written."""
    return commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **texts)


def _plan_options(parser) -> None:
    """What the pass is asked to do: the options ``convert`` and ``inspect`` share."""
    _input_shape_option(parser, "pin a graph input's shape, e.g. input:1x3x224x224 (repeatable)")
    parser.add_argument(
        "--nominal-shape",
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help="the input shape the cost model plans dynamic sizes for, without pinning it "
        "(default: batch 1 and 224x224 images); the converted model keeps its dynamic sizes",
    )
    parser.add_argument(
        "--patch",
        default="auto",
        metavar="auto|N|NxM",
        help="output patch per Conv: auto (cost model, default), N, or NxM",
    )
    parser.add_argument(
        "--attention",
        choices=["global", "local", "auto"],
        default="global",
        help="global: every token attends to every token, as in a ViT (default); local: "
        "blocks of tokens attend to their block plus a halo (far cheaper, equally exact); "
        "auto: per Conv, whichever the cost model finds cheaper",
    )
    parser.add_argument(
        "--grid",
        choices=["shifted", "fixed", "auto"],
        default="auto",
        help="shifted: each Conv's tokens start at its own padding (fewest heads: 4 for a "
        "3x3 Conv at patch >= 2); fixed: tokens start at the first pixel and consecutive "
        "layers share one grid, Li et al.'s ViT setting (9 heads for a 3x3 Conv); auto: "
        "one grid per stretch of consecutive Convs, the cheaper for the stretch (default)",
    )
    parser.add_argument(
        "--queries",
        choices=["patch", "strided", "auto"],
        default="auto",
        help="where a strided Conv's local attention puts its queries: patch (tokens of "
        "stride x patch pixels, fewer heads), strided (tokens of one pixel, a query every "
        "stride tokens: the kernel's taps are the heads); auto: per Conv, the cheaper "
        "(default)",
    )
    parser.add_argument(
        "--block",
        default="auto",
        metavar="auto|N|NxM",
        help="with --attention local: query tokens per block (default: the cost model's choice)",
    )
    parser.add_argument(
        "--max-param-growth",
        type=float,
        default=4.0,
        metavar="X",
        help="with --patch auto: converted Conv parameters at most X times the original "
        "(whole model; default 4)",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="convert only Conv nodes whose name matches (repeatable)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave Conv nodes whose name matches (repeatable)",
    )
    parser.add_argument(
        "--fold-bn",
        action="store_true",
        help="first fold BatchNormalization nodes that directly follow a Conv into it",
    )


def _add_inspect(commands) -> None:
    inspect = _command(
        commands,
        "inspect",
        help="describe a model's inputs and Convs and the plan, without converting",
        description="Describe a model's inputs (dynamic dims marked), every Conv-like node "
        "with its attributes and whether (or why not) it would convert, and the plan the "
        "cost model would choose: patch, order, attention, heads, multiply-adds and "
        "parameters before and after. Writes nothing.",
        epilog=INSPECT_EPILOG,
    )
    inspect.add_argument("model", type=Path, help="the .onnx file to describe")
    _plan_options(inspect)
    _json_option(inspect, "--json", help="write the description as JSON")
    _common(inspect)
    inspect.set_defaults(run=run_inspect)


def _add_convert(commands) -> None:
    convert = _command(
        commands,
        "convert",
        help="replace every Conv by multi-head self-attention",
        description="Replace every Conv of an ONNX model by an exactly equivalent multi-head "
        "self-attention subgraph, check the result and write it.",
        epilog=CONVERT_EPILOG,
    )
    convert.add_argument("model", type=Path, help="input .onnx file (external data is read too)")
    convert.add_argument(
        "output_file",
        nargs="?",
        type=Path,
        metavar="OUT.onnx",
        help="output .onnx file, as with -o",
    )
    convert.add_argument(
        "-o",
        "--output",
        type=Path,
        help="output .onnx file (default: <model>_attn.onnx next to the input)",
    )
    _plan_options(convert)
    convert.add_argument(
        "--form",
        choices=["matmul", "attention"],
        default="matmul",
        help="matmul: Softmax and MatMul nodes (default, fastest); attention: the standard "
        "ONNX Attention operator with W_Q, W_K and the positions as its mask (opset 23; "
        "older models are upgraded)",
    )
    convert.add_argument(
        "--layout",
        choices=["channels-last", "nchw"],
        default="channels-last",
        help="channels-last: between converted Convs, through activations, residual Adds, "
        "per-channel constants and pads, tensors stay channels-last where that removes "
        "Transposes (default); nchw: every converted Conv reads and writes NCHW and keeps "
        "its output tensor's name",
    )
    convert.add_argument(
        "--batch",
        type=int,
        default=1,
        metavar="N",
        help="the batch size to run at where the model's batch is dynamic (default 1): "
        "local attention is split into tiles of blocks whose intermediates stay in cache "
        "at this batch, pools whose input leaves the cache run channels-last, and the "
        "stretch up to a large squeeze-excitation gate runs one batch item at a time (a "
        "Scan); the model keeps its dynamic batch",
    )
    convert.add_argument(
        "--no-tiles",
        dest="tiles",
        action="store_false",
        help="emit for GPU runtimes: local attention whole, one product per layer, at any "
        "batch (a GPU runs each tile as kernels of its own), biases added token by "
        "token, not over rows of several tokens (which onnxruntime's CPU Add prefers), "
        "global attention's heads whole, not cut to the key pixels each reads (fewer "
        "multiply-adds, more products), and pools left NCHW",
    )
    convert.add_argument(
        "--no-per-item",
        dest="per_item",
        action="store_false",
        help="run the whole batch through every layer: no stretch up to a squeeze-excitation "
        "gate one batch item at a time (that gains only where the process has the "
        "last-level cache to itself)",
    )
    _json_option(
        convert,
        "--report",
        "--json",
        dest="report",
        help="write the per-layer report as JSON (schema in the README)",
    )
    _force_option(convert)
    _common(convert)
    convert.set_defaults(run=run_convert)


def _add_check(commands) -> None:
    check = _command(
        commands,
        "check",
        help="prove parity: run both models on the same inputs and compare",
        description="Run the original and the converted model with onnxruntime on the same "
        "inputs and compare every output; with --per-layer, every converted Conv too.",
        epilog=CHECK_EPILOG,
    )
    check.add_argument("original", type=Path, help="the model before conversion")
    check.add_argument("converted", type=Path, help="the model after conversion")
    _add_input_options(check)
    check.add_argument(
        "--rtol", type=float, help="relative tolerance (default 1e-5; 1e-2 for fp16)"
    )
    check.add_argument(
        "--atol", type=float, help="absolute tolerance (default 1e-6; 1e-3 for fp16)"
    )
    check.add_argument(
        "--provider",
        default="CPUExecutionProvider",
        help="onnxruntime execution provider (default CPUExecutionProvider)",
    )
    check.add_argument(
        "--per-layer",
        action="store_true",
        help="also compare every converted Conv's output, in graph order",
    )
    _json_option(check, "--json", help="write the full report as JSON")
    _common(check)
    check.set_defaults(run=run_check)


def _shape_range_options(parser) -> None:
    """trtexec's --minShapes/--optShapes/--maxShapes, under both spellings."""
    for bound, trtexec, meaning in (
        ("min", "minShapes", "smallest"),
        ("opt", "optShapes", "timed (and TensorRT's optimum)"),
        ("max", "maxShapes", "largest"),
    ):
        parser.add_argument(
            f"--{bound}-shapes",
            f"--{trtexec}",
            dest=f"{bound}_shapes",
            action="append",
            default=[],
            metavar="NAME:DIMS",
            help=f"with the other two: the {meaning} shape of a dynamic input; TensorRT builds "
            "one engine for the range (trtexec's semantics)",
        )


def _add_profile(commands) -> None:
    profile = _command(
        commands,
        "profile",
        help="measure latency side by side (onnxruntime, TensorRT, PyTorch)",
        description="Time models side by side on a backend: warm-up, then blocks of runs "
        "per model in turn (each block's first run dropped), until every model has "
        "--iterations runs or --duration seconds are spent. Ratios are to the first model's "
        "median, and best block to best block (the median of each model's fastest block: "
        "steadier than the median where the machine's speed drifts). "
        "GPU runs are timed with CUDA events, inputs already on the device.",
        epilog=PROFILE_EPILOG.format(backends=help_text()),
    )
    profile.add_argument(
        "models", type=Path, nargs="+", help="models to time; the first is the baseline"
    )
    profile.add_argument(
        "--batch", type=int, help="batch size (default 1, or the batch --input-shape gives)"
    )
    profile.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (default: all cores)"
    )
    profile.add_argument(
        "--iterations", type=int, default=50, help="timed runs per model (default 50)"
    )
    profile.add_argument(
        "--duration", type=float, metavar="SECONDS", help="time budget instead of --iterations"
    )
    profile.add_argument(
        "--warmup",
        type=_duration,
        default=1.0,
        metavar="TIME",
        help="warm-up per model: seconds, or with a unit, 2s or 200ms (default 1)",
    )
    profile.add_argument(
        "--block-runs", type=int, default=6, help="runs per block, the first dropped (default 6)"
    )
    _input_shape_option(
        profile,
        "shape of an input with dynamic dims (repeatable); a batch above 1 there is the "
        "batch timed",
    )
    _shape_range_options(profile)
    profile.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        default="ort-cpu",
        help="runtime (default ort-cpu)",
    )
    profile.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="GPU backends: compute precision (default fp16 where the GPU has fast fp16)",
    )
    profile.add_argument(
        "--workspace", type=int, metavar="MB", help="TensorRT: builder workspace limit"
    )
    profile.add_argument(
        "--engine-cache",
        type=Path,
        metavar="DIR",
        help="TensorRT: keep built engines here, keyed by model hash and settings",
    )
    profile.add_argument(
        "--cuda-graph", action="store_true", help="trt, torch-cuda: replay a captured CUDA graph"
    )
    profile.add_argument(
        "--compile", action="store_true", help="torch-cuda: run under torch.compile"
    )
    profile.add_argument(
        "--no-numerics",
        action="store_true",
        help="GPU backends: skip comparing outputs with onnxruntime CPU fp32",
    )
    profile.add_argument("--per-layer", action="store_true", help="kernel time by source Conv")
    _json_option(profile, "--json", help="write the measurements as JSON")
    _common(profile)
    profile.set_defaults(run=run_profile)


def _add_report(commands) -> None:
    report = _command(
        commands,
        "report",
        help="write a one-page HTML report of a conversion",
        description="Write one self-contained HTML file: summary, a sortable per-layer table, "
        "how one layer's heads attend (computed by running the converted graph) next to "
        "the Conv kernel, and charts of parity, growth and (with --profile) latency.",
        epilog=REPORT_EPILOG,
    )
    report.add_argument("original", type=Path, help="the model before conversion")
    report.add_argument("converted", type=Path, help="the model after conversion")
    report.add_argument("-o", "--output", type=Path, required=True, help="the .html file to write")
    report.add_argument("--layer", help="the layer to picture (default: the first converted Conv)")
    report.add_argument(
        "--profile",
        type=Path,
        metavar="FILE.json",
        help="conv2attn profile --per-layer --json output",
    )
    report.add_argument(
        "--check",
        type=Path,
        metavar="FILE.json",
        help="take the parity figures from conv2attn check --json output (default: "
        "checked here on 2 random samples)",
    )
    report.add_argument(
        "--png", type=Path, metavar="DIR", help="also write every chart as a PNG into DIR"
    )
    _input_shape_option(
        report, "shape of an input with dynamic dims other than the batch (repeatable)"
    )
    _force_option(report)
    _common(report)
    report.set_defaults(run=run_report)


def _add_demo(commands) -> None:
    demo = _command(
        commands,
        "demo",
        help="convert and check the shipped digits model",
        description="Convert the shipped model (a residual CNN trained on scikit-learn's "
        "digits), check it on its held-out test split and write the HTML report.",
        epilog=DEMO_EPILOG,
    )
    demo.add_argument("--model", type=Path, default=REPO_MODELS / "digits_cnn.onnx")
    demo.add_argument("--data", type=Path, default=REPO_MODELS / "digits_test.npz")
    demo.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        default=Path("."),
        help="where the converted model goes (default: the current folder)",
    )
    _force_option(demo)
    _common(demo)
    demo.set_defaults(run=run_demo)


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inputs (random by default)")
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--inputs",
        type=Path,
        metavar="FILE.npz",
        help="arrays named after the graph inputs, optionally 'labels'",
    )
    source.add_argument(
        "--images", type=Path, metavar="DIR", help="a folder of .jpg/.png images (needs Pillow)"
    )
    group.add_argument("--samples", type=int, default=4, help="random samples (default 4)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _input_shape_option(
        group, "shape of a random input with dynamic dims, e.g. input:1x3x224x224 (repeatable)"
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="samples per run for models with a dynamic batch (default 16)",
    )
    group.add_argument("--size", type=int, help="with --images: resize to SIZE x SIZE")
    group.add_argument(
        "--mean",
        type=float,
        nargs="+",
        metavar="M",
        default=None,
        help="with --images: per-channel mean after scaling to [0, 1] (default ImageNet's)",
    )
    group.add_argument(
        "--std",
        type=float,
        nargs="+",
        metavar="S",
        default=None,
        help="with --images: per-channel standard deviation (default ImageNet's)",
    )


def run_convert(args: argparse.Namespace) -> int:
    from conv2attn.graph.rewrite import convert
    from conv2attn.graph.verify import verify
    from conv2attn.modelio import save_model
    from conv2attn.report import conversion_table

    source = args.model
    if args.output_file is not None and args.output is not None:
        raise InputError(f"two outputs given ({args.output_file} and -o {args.output}); give one")
    output = args.output or args.output_file or source.with_name(f"{source.stem}_attn.onnx")
    check_output_path(output, [source], args.force)
    _check_json_path(args.report, [source, output])

    start = time.perf_counter()
    progress = Progress("converting", enabled=not args.quiet)
    converted, report = convert(
        source,  # convert() loads it and may then consume it: no second copy
        patch=args.patch,
        max_param_growth=args.max_param_growth,
        include=args.include,
        exclude=args.exclude,
        input_shapes=args.input_shape,
        attention=args.attention,
        block=args.block,
        fold_bn=args.fold_bn,
        nominal_shapes=args.nominal_shape,
        form=args.form,
        grid=args.grid,
        queries=args.queries,
        layout=args.layout,
        batch=args.batch,
        tiles=args.tiles,
        per_item=args.per_item,
        check=False,  # checked below from the staged file: less memory, any size
        progress=progress,
    )
    progress.close()
    written = save_model(
        converted, output, verify=lambda staged: verify(staged, report.strict_checked, converted)
    )
    elapsed = time.perf_counter() - start
    _write_report(args.report, report.to_dict())
    if not args.quiet and not _to_stdout(args.report):
        print(conversion_table(report, use_colour()))
        files = " + ".join(str(p) for p in written)
        print(f"\nwrote {files} ({elapsed:.1f} s)")
    return 0


def _convert_options(args: argparse.Namespace):
    from conv2attn.graph.options import convert_options

    return convert_options(
        patch=args.patch,
        max_param_growth=args.max_param_growth,
        include=args.include,
        exclude=args.exclude,
        input_shapes=args.input_shape,
        attention=args.attention,
        block=args.block,
        fold_bn=args.fold_bn,
        nominal_shapes=args.nominal_shape,
        grid=args.grid,
        queries=args.queries,
    )


def run_inspect(args: argparse.Namespace) -> int:
    from conv2attn.graph.preview import inspect_model
    from conv2attn.report import inspection_table

    _check_json_path(args.json, [args.model])
    inspection = inspect_model(args.model, _convert_options(args))
    _write_report(args.json, inspection.to_dict())
    if not args.quiet and not _to_stdout(args.json):
        print(inspection_table(inspection, use_colour()))
    return 0


def _samples(args: argparse.Namespace, model, other, shapes: dict | None = None):
    """The samples ``check`` runs: from ``--inputs``, ``--images`` or random (at ``shapes``,
    default all of ``--input-shape``). Dynamic dims of ``model`` take the sizes ``other``
    (the converted model) fixes."""
    from conv2attn import inputs

    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
    graph_inputs = inputs.fill_dims(inputs.graph_inputs(model), inputs.graph_inputs(other))
    if shapes is None:
        shapes = inputs.parse_input_shapes(args.input_shape)
    inputs.check_shape_names(shapes, graph_inputs)
    if args.inputs is not None:
        return inputs.npz_samples(args.inputs, graph_inputs)
    if args.images is not None:
        channels = graph_inputs[0].dims[1] if graph_inputs and len(graph_inputs[0].dims) > 1 else 3
        gray = channels == 1
        mean = args.mean or ((0.5,) if gray else inputs.IMAGENET_MEAN)
        std = args.std or ((0.5,) if gray else inputs.IMAGENET_STD)
        return inputs.image_samples(args.images, graph_inputs, args.size, mean, std)
    return inputs.random_samples(graph_inputs, args.samples, args.seed, shapes)


def _check(args: argparse.Namespace, original_path: Path, converted_path: Path) -> int:
    from conv2attn.inputs import shape_sets
    from conv2attn.modelio import load_model
    from conv2attn.report import check_table
    from conv2attn.validate import check

    original = load_model(original_path)
    converted = load_model(converted_path)
    sets = shape_sets(args.input_shape)
    if len(sets) > 1 and (args.inputs is not None or args.images is not None):
        raise InputError("several --input-shape sets apply to random inputs, not --inputs/--images")
    reports = []
    for shapes in sets:
        samples = _samples(args, original, converted, shapes if len(sets) > 1 else None)
        progress = Progress("checking", enabled=not args.quiet)
        report = check(
            original,
            converted,
            samples,
            names=(str(original_path), str(converted_path)),
            rtol=args.rtol,
            atol=args.atol,
            provider=args.provider,
            per_layer=args.per_layer,
            batch_size=args.batch_size,
            progress=progress,
        )
        progress.close()
        reports.append((shapes, report))
        if not args.quiet and not _to_stdout(args.json):
            if len(sets) > 1:
                shown = " ".join(f"{n}:{'x'.join(map(str, d))}" for n, d in shapes.items())
                print(f"{chr(10) if len(reports) > 1 else ''}== at {shown}")
            print(check_table(report, use_colour()))
    if len(reports) == 1:
        _write_report(args.json, reports[0][1].to_dict())
    else:
        runs = [{"input_shapes": shapes, **report.to_dict()} for shapes, report in reports]
        _write_report(args.json, {"passed": all(r.passed for _, r in reports), "runs": runs})
    return 0 if all(report.passed for _, report in reports) else 1


def run_check(args: argparse.Namespace) -> int:
    for path in (args.original, args.converted):
        if not path.exists():
            raise InputError(f"{path}: no such file")
    for option, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if value is not None and not value >= 0:
            raise InputError(f"{option} {value}: must be zero or positive")
    _check_json_path(args.json, [args.original, args.converted])
    return _check(args, args.original, args.converted)


def run_profile(args: argparse.Namespace) -> int:
    from conv2attn.inputs import parse_input_shapes, shape_ranges
    from conv2attn.modelio import load_model
    from conv2attn.profile import profile
    from conv2attn.report import profile_table
    from conv2attn.runtime.base import GpuOptions

    _check_json_path(args.json, list(args.models))
    ranges = shape_ranges(args.min_shapes, args.opt_shapes, args.max_shapes)
    shapes = parse_input_shapes(args.input_shape)
    for name, (_, opt, _) in ranges.items():
        if shapes.setdefault(name, opt) != opt:
            raise InputError(f"--input-shape and --opt-shapes give '{name}' different shapes")
    models = [load_model(path) for path in args.models]
    progress = Progress("timing", enabled=not args.quiet)
    report = profile(
        args.models,
        models,
        batch=args.batch,
        threads=args.threads,
        iterations=args.iterations,
        duration=args.duration,
        block=args.block_runs,
        warmup=args.warmup,
        input_shapes=shapes,
        per_layer=args.per_layer,
        backend=args.backend,
        gpu=GpuOptions(
            precision=args.precision,
            workspace_mb=args.workspace,
            engine_cache=args.engine_cache,
            cuda_graph=args.cuda_graph,
            compile=args.compile,
            check_numerics=not args.no_numerics,
            shape_ranges=ranges,
        ),
        progress=progress,
    )
    progress.close()
    _write_report(args.json, report.to_dict())
    if not _to_stdout(args.json):  # the results, even with -q: it silences only chatter
        print(profile_table(report, colour=use_colour()))
    off = [m.path for m in report.models if m.numerics is not None and not m.numerics.within]
    if off:
        print(
            f"numerics: {', '.join(off)} beyond the {report.precision} bound against "
            "onnxruntime CPU fp32",
            file=sys.stderr,
        )
        return 1
    return 0


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable {what} JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not the JSON of conv2attn {what}")
    return data


def run_report(args: argparse.Namespace) -> int:
    from conv2attn import inputs
    from conv2attn.modelio import load_model
    from conv2attn.visual_report import gather, write_report

    check_output_path(args.output, [args.original, args.converted], args.force)
    profile = _read_json(args.profile, "profile") if args.profile is not None else None
    checked = None
    if args.check is not None:
        checked = (args.check, _read_json(args.check, "check"))
    original = load_model(args.original)
    converted = load_model(args.converted)
    graph_inputs = inputs.fill_dims(inputs.graph_inputs(original), inputs.graph_inputs(converted))
    samples = inputs.random_samples(graph_inputs, 2, 0, inputs.parse_input_shapes(args.input_shape))
    data = gather(
        args.original, args.converted, original, converted, samples, args.layer, profile, checked
    )
    written = write_report(data, args.output, args.png)
    if not args.quiet:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    for path in (args.model, args.data):
        if not path.is_file():
            raise InputError(
                f"{path}: not found; the demo uses the repository's models/ folder "
                f"(pass --model and --data to use other files)"
            )
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"{args.output_dir}: exists and is not a directory")
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"{args.output_dir}: cannot create the folder: {error.strerror or error}"
        ) from None
    output = args.output_dir / f"{args.model.stem}_attn.onnx"
    page = args.output_dir / f"{args.model.stem}_report.html"
    force = ["--force"] if args.force else []
    steps = [
        ["convert", str(args.model), "-o", str(output), *force],
        ["check", str(args.model), str(output), "--inputs", str(args.data), "--per-layer"],
    ]
    if importlib.util.find_spec("matplotlib") is not None:
        steps.append(["report", str(args.model), str(output), "-o", str(page), *force])
    elif not args.quiet:
        print("note: no HTML report: it needs matplotlib (pip install 'conv2attn[report]')")
    parser = build_parser()
    for index, step in enumerate(steps):
        if not args.quiet:
            print(f"{chr(10) if index else ''}== conv2attn {' '.join(step)}")
        step_args = parser.parse_args([*step, *(["-q"] if args.quiet else [])])
        code = step_args.run(step_args)
        if code:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        format="conv2attn: %(levelname)s: %(message)s",
        level=logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.WARNING,
    )
    try:
        return args.run(args)
    except Conv2AttnError as error:
        if args.debug:
            raise
        print(f"conv2attn: error: {error}", file=sys.stderr)
        if error.exit_code == 3:
            print("conv2attn: this is a bug; rerun with --debug for the traceback", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("conv2attn: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything unexpected is an internal error, never a traceback
        if args.debug:
            raise
        print(
            f"conv2attn: internal error: {type(error).__name__}: {error}; "
            f"rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return 3


__all__ = ["InputError", "build_parser", "main"]
