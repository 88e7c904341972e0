"""The ``conv2attn`` command line: argument parsing, logging, exit codes.

Exit codes: 0 success, 2 usage or input error (one line on stderr), 3 internal error
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from conv2attn import __version__
from conv2attn.errors import Conv2AttnError, InputError

log = logging.getLogger("conv2attn")

CONVERT_EPILOG = """\
examples:
  conv2attn convert resnet18.onnx -o resnet18_attn.onnx
  conv2attn convert model.onnx -o out.onnx --patch 2x2 --report layers.json
  conv2attn convert detector.onnx -o out.onnx --input-shape images:1x3x640x640
  conv2attn convert model.onnx -o out.onnx --exclude '/backbone/stem*'
"""


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    verbosity = group.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print progress details")
    group.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conv2attn",
        description="Replace the Conv nodes of an ONNX CNN by exactly equivalent multi-head "
        "self-attention with relative positional encoding.",
    )
    parser.add_argument("--version", action="version", version=f"conv2attn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="replace every Conv by multi-head self-attention",
        description="Replace every Conv of an ONNX model by an exactly equivalent multi-head "
        "self-attention subgraph, check the result and write it.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("model", type=Path, help="input .onnx file (external data is read too)")
    convert.add_argument(
        "-o",
        "--output",
        type=Path,
        help="output .onnx file (default: <model>_attn.onnx next to the input)",
    )
    convert.add_argument(
        "--patch",
        default="auto",
        metavar="auto|N|NxM",
        help="output patch per Conv: auto (cost model, default), N, or NxM",
    )
    convert.add_argument(
        "--max-param-growth",
        type=float,
        default=4.0,
        metavar="X",
        help="with --patch auto: converted Conv parameters at most X times the original "
        "(whole model; default 4)",
    )
    convert.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="convert only Conv nodes whose name matches (repeatable)",
    )
    convert.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave Conv nodes whose name matches (repeatable)",
    )
    convert.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help="pin a graph input's shape, e.g. input:1x3x224x224 (repeatable)",
    )
    convert.add_argument(
        "--report", type=Path, metavar="FILE.json", help="write the per-layer report"
    )
    convert.add_argument("--force", action="store_true", help="overwrite an existing output")
    _common(convert)
    convert.set_defaults(run=run_convert)
    return parser


def _write_json_atomic(path: Path, data: dict) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def run_convert(args: argparse.Namespace) -> int:
    from conv2attn.graph_pass import convert
    from conv2attn.modelio import check_output_path, load_model, save_model
    from conv2attn.report import conversion_table

    source = args.model
    output = args.output or source.with_name(f"{source.stem}_attn.onnx")
    check_output_path(output, [source], args.force)
    if args.report is not None:
        check_output_path(args.report, [source, output], force=True)

    start = time.perf_counter()
    model = load_model(source)
    converted, report = convert(
        model,
        patch=args.patch,
        max_param_growth=args.max_param_growth,
        include=args.include,
        exclude=args.exclude,
        input_shapes=args.input_shape,
    )
    written = save_model(converted, output)
    elapsed = time.perf_counter() - start
    if args.report is not None:
        _write_json_atomic(args.report, report.to_dict())
    if not args.quiet:
        print(conversion_table(report))
        files = " + ".join(str(p) for p in written)
        print(f"\nwrote {files} ({elapsed:.1f} s)")
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
