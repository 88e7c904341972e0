"""Model inputs: ``--input-shape`` parsing, and feeds for checking and profiling
(random, from an ``.npz`` file, or from images).

Every source yields the same thing: a dict of arrays named after the graph inputs, with
the model's dtypes and a leading batch axis, plus optional integer labels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from conv2attn.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Refuse images larger than this many pixels before decoding them (decompression bombs).
# Checked from the image header; Pillow's own, larger guard stays as it is.
MAX_IMAGE_PIXELS = 100_000_000


@dataclass(frozen=True)
class GraphInput:
    """A graph input: name, numpy dtype and dims (ints, or None where symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


@dataclass
class Samples:
    """Inputs for ``count`` samples, batched along axis 0; ``labels`` when known.
    Scalar inputs (an ``If`` condition, say) have no batch axis and go with every batch."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    @property
    def count(self) -> int:
        batched = [array for array in self.feeds.values() if array.ndim]
        return len(batched[0]) if batched else 1

    def batches(self, size: int):
        for start in range(0, self.count, size):
            yield {
                name: array[start : start + size] if array.ndim else array
                for name, array in self.feeds.items()
            }


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs a caller must feed (initializers listed as inputs excluded)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        # A negative size (older Paddle2ONNX exports write the batch as -1) is dynamic.
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
            for d in tensor_type.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        found.append(GraphInput(value.name, dtype, dims))
    return found


SHAPE_FORMS = "input:1x3x224x224, input:1,3,224,224 or input:[1,3,224,224]"


def parse_input_shapes(texts: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Input shapes as users write them for trtexec (``x:1x3x224x224``), onnxsim
    (``x:1,3,224,224``) or Polygraphy (``x:[1,3,224,224]``). One value may hold several,
    separated by commas or spaces; a name may itself contain ``:`` (the last one splits)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts:
        specs: list[tuple[str, list[str]]] = []  # (name, the dims' pieces)
        for token in filter(None, re.split(r"[,\s]+", text)):
            if ":" in token:
                name, _, dims = token.rpartition(":")
                if not name:
                    raise _shape_error(text)
                specs.append((name, [dims]))
            elif specs:
                specs[-1][1].append(token)  # the next dim of "x:1,3,224,224"
            else:
                raise _shape_error(text)
        shapes.update((name, _dims(parts, text)) for name, parts in specs)
    return shapes


def shape_ranges(
    low: Iterable[str], opt: Iterable[str], high: Iterable[str]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """trtexec's ``--minShapes/--optShapes/--maxShapes``: per input, min <= opt <= max
    in every dim, all three given."""
    lows, opts, highs = (parse_input_shapes(texts) for texts in (low, opt, high))
    if not lows.keys() == opts.keys() == highs.keys():
        raise InputError(
            "--min-shapes, --opt-shapes and --max-shapes must name the same inputs "
            f"(min: {sorted(lows)}, opt: {sorted(opts)}, max: {sorted(highs)})"
        )
    ranges = {}
    for name, dims in opts.items():
        trio = (lows[name], dims, highs[name])
        if len({len(d) for d in trio}) != 1 or not all(a <= b <= c for a, b, c in zip(*trio)):
            shown = " <= ".join("x".join(map(str, d)) for d in trio)
            raise InputError(f"shape range of '{name}' is not min <= opt <= max: {shown}")
        ranges[name] = trio
    return ranges


def shape_sets(texts: Iterable[str]) -> list[dict[str, tuple[int, ...]]]:
    """``--input-shape`` values as successive sets: naming an input a second time starts
    the next set, so ``x:1x3x224x224 x:1x3x160x192`` is two runs of one model."""
    sets: list[dict[str, tuple[int, ...]]] = [{}]
    for text in texts:
        for name, dims in parse_input_shapes([text]).items():
            if name in sets[-1]:
                sets.append({})
            sets[-1][name] = dims
    return sets


def _dims(parts: list[str], text: str) -> tuple[int, ...]:
    joined = ",".join(parts)
    bracketed = re.fullmatch(r"\[([\d,]*)\]", joined)
    if bracketed:
        joined = bracketed.group(1)
    elif "[" in joined or "]" in joined:
        raise _shape_error(text)
    pieces = re.split(r"[x,]", joined) if joined else []
    if not pieces or not all(re.fullmatch(r"\d+", piece) for piece in pieces):
        raise _shape_error(text)
    return tuple(int(piece) for piece in pieces)


def _shape_error(text: str) -> InputError:
    return InputError(f"--input-shape '{text}': expected NAME:DIMS such as {SHAPE_FORMS}")


def check_shape_names(shapes: Mapping[str, Sequence[int]], inputs: Sequence[GraphInput]) -> None:
    """Every name in ``--input-shape`` must be an input of the model."""
    known = [i.name for i in inputs]
    for name in shapes:
        if name not in known:
            raise InputError(
                f"--input-shape: the model has no input '{name}' (inputs: "
                f"{', '.join(known) or 'none'})"
            )


def fill_dims(inputs: Sequence[GraphInput], *others: Sequence[GraphInput]) -> list[GraphInput]:
    """``inputs`` with each dynamic dim taken from the same input of ``others`` where one
    of them fixes it: a converted model with pinned sizes tells the sizes its original,
    dynamic, model is compared or timed at."""
    filled = []
    for graph_input in inputs:
        dims = list(graph_input.dims)
        for other in (o for group in others for o in group if o.name == graph_input.name):
            if len(other.dims) == len(dims):
                dims = [d if d is not None else o for d, o in zip(dims, other.dims)]
        filled.append(GraphInput(graph_input.name, graph_input.dtype, tuple(dims)))
    return filled


def suggested_dims(graph_input: GraphInput) -> str:
    """A shape to suggest for an input with dynamic dims: batch 1, the fixed dims as they
    are, and image-sized spatial dims (224 for images, 256 along other axes)."""
    dims = list(graph_input.dims)
    spatial = 224 if len(dims) == 4 else 256
    values = [d if d is not None else (1 if i == 0 else spatial) for i, d in enumerate(dims)]
    return "x".join(map(str, values))


def resolve_dims(
    graph_input: GraphInput, shapes: Mapping[str, Sequence[int]], batch: int
) -> tuple[int, ...]:
    """Concrete dims: ``--input-shape`` first, else the model's, with a free batch axis."""
    if graph_input.name in shapes:
        return tuple(shapes[graph_input.name])
    dims = list(graph_input.dims)
    if dims and dims[0] is None:
        dims[0] = batch
    if any(d is None for d in dims):
        shown = ["?" if d is None else d for d in graph_input.dims]
        raise InputError(
            f"input '{graph_input.name}' has dynamic dims {shown}; pass a shape the model "
            f"takes, e.g. --input-shape {graph_input.name}:{suggested_dims(graph_input)}"
        )
    return tuple(dims)


def random_samples(
    inputs: Sequence[GraphInput],
    count: int,
    seed: int,
    shapes: Mapping[str, Sequence[int]],
) -> Samples:
    """Standard normal floats; integers in [0, 16); booleans either way."""
    if count < 1:
        raise InputError(f"--samples {count}: must be at least 1")
    check_shape_names(shapes, inputs)
    rng = np.random.default_rng(seed)
    feeds = {}
    for graph_input in inputs:
        # A dynamic batch holds `count` samples; a fixed batch B is repeated `count` times.
        dims = resolve_dims(graph_input, shapes, batch=1)
        dims = (dims[0] * count, *dims[1:]) if dims else dims
        kind = graph_input.dtype.kind
        if kind == "f":
            array = rng.standard_normal(dims)
        elif kind == "b":
            array = rng.integers(0, 2, dims)
        elif kind in "iu":
            array = rng.integers(0, 16, dims)
        else:
            raise InputError(f"input '{graph_input.name}': cannot make random {graph_input.dtype}")
        feeds[graph_input.name] = array.astype(graph_input.dtype)
    return Samples(feeds, None, f"random (seed {seed})")


def npz_samples(path: str | os.PathLike, inputs: Sequence[GraphInput]) -> Samples:
    """Arrays named after the graph inputs, and optionally ``labels``; no pickles."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as error:
        raise InputError(f"{path}: refused: {error} (object arrays are not loaded)") from None
    except (OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npz file ({error})") from None
    feeds = {}
    for graph_input in inputs:
        if graph_input.name not in arrays:
            names = ", ".join(sorted(arrays)) or "none"
            raise InputError(
                f"{path}: no array named '{graph_input.name}' for the model input of that name "
                f"(arrays: {names})"
            )
        array = arrays[graph_input.name]
        expected = graph_input.dims
        if array.ndim != len(expected) or any(
            e is not None and e != a for e, a in zip(expected[1:], array.shape[1:])
        ):
            raise InputError(
                f"{path}: array '{graph_input.name}' has shape {list(array.shape)}, the model "
                f"expects {[d if d is not None else '?' for d in expected]}"
            )
        if array.dtype.kind != graph_input.dtype.kind and not (
            array.dtype.kind in "iu" and graph_input.dtype.kind in "iu"
        ):
            raise InputError(
                f"{path}: array '{graph_input.name}' is {array.dtype}, the model expects "
                f"{graph_input.dtype}"
            )
        feeds[graph_input.name] = array.astype(graph_input.dtype, copy=False)
    counts = {len(a) for a in feeds.values()}
    if len(counts) != 1:
        raise InputError(f"{path}: arrays have different sample counts {sorted(counts)}")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != counts.pop():
            raise InputError(
                f"{path}: 'labels' must be one integer per sample, got {labels.dtype} "
                f"{list(labels.shape)}"
            )
        labels = labels.astype(np.int64)
    return Samples(feeds, labels, str(path))


def image_samples(
    folder: str | os.PathLike,
    inputs: Sequence[GraphInput],
    size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Samples:
    """Every .jpg/.png in ``folder`` (sorted by name), resized, scaled to [0, 1], normalised.

    The model must have one image input [N, C, H, W] with C of 1 or 3. Images are resized
    to ``size`` x ``size`` (default: the input's own H and W) with bilinear filtering.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError(
            "--images needs Pillow: pip install 'conv2attn[images]' (or pip install pillow)"
        ) from None
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory of images")
    if len(inputs) != 1 or len(inputs[0].dims) != 4 or inputs[0].dims[1] not in (1, 3):
        described = ", ".join(f"{i.name} {list(i.dims)}" for i in inputs)
        raise InputError(
            f"--images needs a model with one [N, 1|3, H, W] input; this one has {described}"
        )
    graph_input = inputs[0]
    channels = graph_input.dims[1]
    height, width = graph_input.dims[2], graph_input.dims[3]
    if size is not None:
        height = width = size
    if height is None or width is None:
        raise InputError(f"input '{graph_input.name}' has a dynamic size; pass --size")
    if len(mean) != channels or len(std) != channels:
        raise InputError(f"--mean and --std need {channels} values each for '{graph_input.name}'")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no images (.jpg or .png) in the directory")
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        f"{path}: {image.width}x{image.height} pixels is over the limit of "
                        f"{MAX_IMAGE_PIXELS}; refused"
                    )
                image = image.convert("RGB" if channels == 3 else "L")
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except Image.DecompressionBombError:
            raise InputError(
                f"{path}: over the limit of {MAX_IMAGE_PIXELS} pixels; refused "
                f"(a decompression bomb or a very large image)"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            reason = "not an image" if isinstance(error, UnidentifiedImageError) else error
            raise InputError(
                f"{path}: cannot read as an image ({reason}); only .jpg and .png files may be "
                f"in {folder}"
            ) from None
        if channels == 1:
            array = array[:, :, None]
        array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        images.append(array.transpose(2, 0, 1))
    batch = np.stack(images).astype(graph_input.dtype)
    return Samples({graph_input.name: batch}, None, f"{len(files)} images in {folder}")
