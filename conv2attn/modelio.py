"""Reading and writing ONNX files: clear errors on bad input, atomic writes.

Models may keep their weights in external data files (what ``torch.onnx.export(...,
dynamo=True)`` writes). A model is written to a temporary folder next to its target,
checked there, and only then renamed into place, so a failure never leaves a partial
file and never touches the input.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper

from conv2attn.errors import InputError, InternalError

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1


def _external_locations(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor stored outside the model file."""
    found = []
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            found.append((tensor.name, info.location))
    return found


def _check_external_location(model_path: Path, tensor: str, location: str) -> Path:
    """The data file of ``tensor``; refuse locations that leave the model's folder."""
    folder = model_path.parent.resolve()
    if os.path.isabs(location):
        raise InputError(
            f"{model_path}: tensor '{tensor}' points to external data at an absolute path "
            f"'{location}'; refused: keep data files next to the model"
        )
    target = (folder / location).resolve()
    if target != folder and folder not in target.parents:
        raise InputError(
            f"{model_path}: tensor '{tensor}' points to external data '{location}' outside "
            f"the model's folder; refused: keep data files next to the model"
        )
    if not target.is_file():
        raise InputError(
            f"{model_path}: external data file '{location}' of tensor '{tensor}' is missing; "
            f"copy it next to the model"
        )
    return target


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The files holding a model file's external tensors, checked, in a fixed order."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    files = {_check_external_location(path, t, loc) for t, loc in _external_locations(model)}
    return sorted(files)


def model_size(model: onnx.ModelProto) -> int:
    """Serialised size in bytes, measured part by part: protobuf measures a message by
    serialising it, which for a whole model is one more full copy in memory (and fails
    at 2 GiB). A model that large reports ``PROTOBUF_LIMIT``."""
    graph = model.graph
    # Each part also pays a tag and a length: a few bytes, counted generously.
    parts = [*graph.node, *graph.input, *graph.output, *graph.value_info]
    parts += [*model.functions, *model.opset_import, *model.metadata_props]
    try:
        size = sum(part.ByteSize() + 16 for part in parts) + 1024
        return size + sum(tensor_size(tensor) + 16 for tensor in graph.initializer)
    except EncodeError:
        return PROTOBUF_LIMIT


# Bytes a TensorProto spends beyond its raw data, counted generously: type, dims and
# name are a few bytes each; the name's length is added on its own.
TENSOR_OVERHEAD = 128


def tensor_size(tensor: onnx.TensorProto) -> int:
    """About the serialised size of ``tensor``, at least the true one: from its dims
    and element size when its data is raw bytes (protobuf would serialise the tensor to
    measure it, which for the weights of a model costs as long as writing them)."""
    if not tensor.HasField("raw_data") or tensor.data_type == onnx.TensorProto.STRING:
        return tensor.ByteSize()
    itemsize = _itemsize(tensor.data_type)
    if itemsize is None:  # no such element type: the checker names it
        return tensor.ByteSize()
    fields = TENSOR_OVERHEAD + 10 * len(tensor.dims)
    fields += len(tensor.name.encode()) + len(tensor.doc_string.encode())
    return math.prod(tensor.dims) * itemsize + fields


def _itemsize(data_type: int) -> int | None:
    """Bytes per element of an ONNX element type as numpy holds it; None if unknown."""
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except KeyError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:  # the process's own symbols: glibc's when it is the C library
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # another C library, or no dlopen(NULL)
        return None


def release_freed_memory() -> None:
    """Hand memory that C and C++ code has freed back to the system (glibc keeps freed
    heap pages otherwise: after onnx's checker parses a 100 MB model and frees it, the
    process stays 100 MB larger). A no-op where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# Initializers above this many bytes are checked one by one (``check_model``).
CHECK_ALONE_BYTES = 4096


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` without a second copy of the weights: the structure
    is checked on a copy whose large initializers are one-element stand-ins, and each
    of those initializers on its own. (Checking the model itself serialises all of it
    for the C++ checker, and checking its file parses all of it again.) Raises
    ``onnx.checker.ValidationError`` like the checker."""
    light = onnx.ModelProto()
    copy_fields(light, model, skip=("graph",))
    copy_fields(light.graph, model.graph, skip=("initializer",))
    alone = []
    for tensor in model.graph.initializer:
        itemsize = _itemsize(tensor.data_type)
        if itemsize is None:
            onnx.checker.check_tensor(tensor)  # the checker's own words for a missing type
            raise onnx.checker.ValidationError(
                f"initializer '{tensor.name}' has element type {tensor.data_type}, which "
                f"onnx {onnx.__version__} does not know"
            )
        if tensor_size(tensor) <= CHECK_ALONE_BYTES:
            light.graph.initializer.append(tensor)
            continue
        alone.append(tensor)
        stand_in = light.graph.initializer.add()
        stand_in.name, stand_in.data_type = tensor.name, tensor.data_type
        stand_in.raw_data = bytes(itemsize)
    onnx.checker.check_model(light)
    for tensor in alone:
        onnx.checker.check_tensor(tensor)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# Protobuf's wire type of a length-delimited field (a message, bytes or a string).
LENGTH_DELIMITED = 2
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"]


def _tag(field_descriptor) -> bytes:
    return _varint(field_descriptor.number << 3 | LENGTH_DELIMITED)


def _raw_bytes(tensor: onnx.TensorProto) -> int | None:
    """The length of ``tensor``'s raw data from its dims and element type, without reading
    it (protobuf hands a field out as a copy); None where it is not raw fixed-size data."""
    if not tensor.HasField("raw_data") or tensor.data_type == onnx.TensorProto.STRING:
        return None
    itemsize = _itemsize(tensor.data_type)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


def _encoded_size(item) -> int:
    """The length of ``item``'s encoding. A tensor of raw data is measured as its other
    fields plus the data's length: protobuf measures a message by encoding it, which for
    a model's weights costs as long as writing them."""
    raw = _raw_bytes(item) if isinstance(item, onnx.TensorProto) else None
    if raw is None:
        return item.ByteSize()
    rest = onnx.TensorProto()
    for field_descriptor in onnx.TensorProto.DESCRIPTOR.fields:
        if field_descriptor is _RAW_DATA:
            continue
        if is_repeated(field_descriptor):
            if len(getattr(item, field_descriptor.name)):
                copy_field(rest, item, field_descriptor)
        elif item.HasField(field_descriptor.name):
            copy_field(rest, item, field_descriptor)
    return rest.ByteSize() + len(_tag(_RAW_DATA)) + len(_varint(raw)) + raw


def _message_elements(message):
    """Each message-typed field element of ``message``: (field, element)."""
    for field_descriptor, value in message.ListFields():
        if field_descriptor.message_type is None:
            continue
        for item in value if is_repeated(field_descriptor) else [value]:
            yield field_descriptor, item


def _field_chunks(message, sizes: list[int]):
    """The wire encoding of ``message``, one field element at a time, in field order;
    ``sizes``: each message element's ``_encoded_size``, in that order.

    A message's encoding is the concatenation of its fields' encodings, so these chunks
    joined equal ``message.SerializeToString()``; only one element is serialised at once.
    A message element is its tag, its length and its own encoding, which is serialised in
    place rather than copied into a one-field message first (an initializer can be
    hundreds of MB)."""
    elements = iter(sizes)
    for field_descriptor, value in message.ListFields():
        repeated = is_repeated(field_descriptor)
        items = value if repeated else [value]
        if field_descriptor.message_type is not None:
            for item in items:
                size = next(elements)
                encoded = item.SerializeToString()
                if len(encoded) != size:  # a tensor whose raw data does not fit its dims
                    raise InternalError(
                        f"{field_descriptor.name} '{getattr(item, 'name', '')}' encodes to "
                        f"{len(encoded)} bytes, not the {size} its dims give"
                    )
                yield _tag(field_descriptor) + _varint(size)
                yield encoded
            continue
        for item in items:
            single = type(message)()
            if repeated:
                getattr(single, field_descriptor.name).append(item)
            else:
                setattr(single, field_descriptor.name, item)
            yield single.SerializeToString()
            del single


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` like ``onnx.save_model`` does (same bytes), without ever holding its
    whole serialised form in memory: the graph is written element by element, after its
    length, which is summed from the elements' own (``_encoded_size``)."""
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"]
    with open(path, "wb") as handle:
        for field_descriptor, _ in model.ListFields():
            if field_descriptor.name != "graph":
                part = onnx.ModelProto()
                copy_field(part, model, field_descriptor)
                handle.write(part.SerializeToString())
                continue
            sizes = [_encoded_size(item) for _, item in _message_elements(model.graph)]
            length = sum(
                len(_tag(field)) + len(_varint(size)) + size
                for (field, _), size in zip(_message_elements(model.graph), sizes)
            )
            bare = onnx.GraphProto()  # the graph's other fields: its name and doc string
            for field, _ in model.graph.ListFields():
                if field.message_type is None:
                    copy_field(bare, model.graph, field)
            length += bare.ByteSize()
            handle.write(_tag(graph_field) + _varint(length))
            for chunk in _field_chunks(model.graph, sizes):
                handle.write(chunk)


def copy_field(target, source, field_descriptor) -> None:
    """Copy one field of a protobuf message into another of the same type."""
    value = getattr(source, field_descriptor.name)
    if is_repeated(field_descriptor):
        getattr(target, field_descriptor.name).extend(value)
    elif field_descriptor.message_type is not None:
        getattr(target, field_descriptor.name).CopyFrom(value)
    else:
        setattr(target, field_descriptor.name, value)


def copy_fields(target, source, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of ``source`` but those named in ``skip``."""
    for field_descriptor, _ in source.ListFields():
        if field_descriptor.name not in skip:
            copy_field(target, source, field_descriptor)


def is_repeated(field_descriptor) -> bool:
    repeated = getattr(field_descriptor, "is_repeated", None)
    if repeated is None:  # protobuf before 5.28
        repeated = field_descriptor.label == field_descriptor.LABEL_REPEATED
    return bool(repeated)


_TENSOR_PAYLOAD = {
    "raw_data",
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
}


def _decode_text(message) -> None:
    """Every text field must be valid UTF-8. Protobuf decodes a field only when Python
    reads it, and then raises or, for proto2 fields, hands back ``bytes``; either would
    fail later, in the middle of a conversion. Tensor payloads are never read."""
    for field_descriptor, value in message.ListFields():
        repeated = is_repeated(field_descriptor)
        items = list(value) if repeated else [value]
        if field_descriptor.message_type is None:
            if field_descriptor.type == field_descriptor.TYPE_STRING:
                if any(not isinstance(item, str) for item in items):
                    raise UnicodeDecodeError("utf-8", b"", 0, 1, field_descriptor.full_name)
            elif isinstance(message, onnx.AttributeProto) and field_descriptor.name in (
                "s",
                "strings",
            ):
                for item in items:  # text attributes are bytes in the proto, UTF-8 by convention
                    item.decode("utf-8")
            continue
        if field_descriptor.message_type.name == "TensorProto":
            for tensor in items:
                for inner, inner_value in tensor.ListFields():
                    if inner.name in _TENSOR_PAYLOAD:
                        continue
                    if inner.type == inner.TYPE_STRING and not isinstance(inner_value, str):
                        raise UnicodeDecodeError("utf-8", b"", 0, 1, inner.full_name)
                    if inner.message_type is not None:
                        for item in inner_value:
                            _decode_text(item)
            continue
        for item in items:
            _decode_text(item)


# Typed storage of each data type when not in raw_data (see onnx.proto).
_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: "float_data",
    onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.UINT64: "uint64_data",
    onnx.TensorProto.INT32: "int32_data",
}


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Each initializer's data must hold exactly as many elements as its dims say."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        elements = math.prod(tensor.dims)
        if tensor.HasField("raw_data"):
            try:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            except (KeyError, TypeError, ValueError):
                continue  # packed or exotic types: left to the tools that read them
            if itemsize < 1 or tensor.data_type == onnx.TensorProto.STRING:
                continue
            have = len(tensor.raw_data) / itemsize
        elif tensor.data_type in _TYPED_FIELDS:
            have = len(getattr(tensor, _TYPED_FIELDS[tensor.data_type]))
        else:
            continue
        if have != elements:
            raise InputError(
                f"{path}: initializer '{tensor.name}' has dims {list(tensor.dims)} "
                f"({elements} elements) but holds {have:g}; is the file corrupted?"
            )


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model and its external data, or raise InputError saying why not."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (check its permissions)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty, expected an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        raise InputError(
            f"{path}: not a valid ONNX model (protobuf parse failed: {error}); "
            f"is the file truncated or not ONNX?"
        ) from None
    try:
        _decode_text(model)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}: text in {error.reason} is not valid UTF-8; is the file corrupted?"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise InputError(
            f"{path}: not an ONNX model (no graph found); is the file truncated or not ONNX?"
        )
    for tensor, location in _external_locations(model):
        _check_external_location(path, tensor, location)
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read external data: {error}") from None
    for tensor in external_data_helper._get_all_tensors(model):
        # The data is in memory now: the model no longer refers to any file.
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    _check_tensor_sizes(model, path)
    try:
        check_model(model)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"{path}: fails onnx.checker: {first}") from None
    except UnicodeDecodeError:  # the checker's message quotes a name that is not UTF-8
        raise InputError(
            f"{path}: fails onnx.checker on a name that is not valid UTF-8; is the file corrupted?"
        ) from None
    return model


def check_output_path(output: str | os.PathLike, inputs: list[Path], force: bool) -> Path:
    """Refuse an output path that would overwrite an input or an existing file."""
    output = Path(output)
    for source in inputs:
        if output.resolve() == source.resolve() or (
            output.exists() and source.exists() and output.samefile(source)
        ):
            raise InputError(f"{output}: output is the input model; choose another -o path")
    if output.is_dir():
        raise InputError(f"{output}: is a directory; give a file name for the output")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{output}: folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{output}: folder '{folder}' is not writable")
    try:  # the system may refuse what the permissions allow (/proc, /sys, read-only mounts)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise InputError(
            f"{output}: cannot write in folder '{folder}': {error.strerror or error}"
        ) from None
    if output.exists() and not force:
        raise InputError(f"{output}: already exists; pass --force to overwrite it")
    return output


def new_file_mode() -> int:
    """The permissions a newly created file gets here (0o666 less the umask): staged
    files are created owner-only and get these before they are renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file next to ``path`` for the block to write; renamed onto ``path``
    when the block succeeds, removed when it fails, so ``path`` is never half written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as error:
        raise InputError(f"{path}: cannot write here: {error.strerror or error}") from None
    try:
        os.fchmod(handle, new_file_mode())
        os.close(handle)
        yield Path(staged)
        os.replace(staged, path)
    except OSError as error:
        raise InputError(f"{path}: cannot write output: {error.strerror or error}") from None
    finally:
        Path(staged).unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: dict | list, indent: int = 2) -> None:
    """``data`` as indented JSON, written atomically."""
    with staged_file(path) as staged, open(staged, "w") as handle:
        json.dump(data, handle, indent=indent)
        handle.write("\n")


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    external_threshold: int = PROTOBUF_LIMIT,
    verify: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write ``model`` atomically; with external data from ``external_threshold`` bytes.

    The data file is ``<name>.data`` next to the model. Writing external data moves the
    tensors out of ``model``. ``verify`` is called with the staged file before anything is
    renamed into place, so a model that fails it is never written; without ``verify``, a
    model with external data is still checked with ``onnx.checker`` (from the staged files:
    protobuf cannot hold it in memory). Returns the files written. A folder the system
    refuses to write to is an InputError.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    external = model_size(model) >= external_threshold
    data_name = path.name + ".data"
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
        staged = staging / path.name
        if external:
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            write_model(model, staged)
        release_freed_memory()  # each element was serialised on its own, then freed
        (verify or (_check_file if external else lambda staged: None))(staged)
        written = [path]
        if external:
            os.chmod(staging / data_name, new_file_mode())  # onnx creates it owner-only
            os.replace(staging / data_name, folder / data_name)
            written.insert(0, folder / data_name)
        os.replace(staged, path)
        return written
    except OSError as error:
        raise InputError(f"{path}: cannot write output: {error.strerror or error}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _check_file(staged: Path) -> None:
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0]
        raise InternalError(
            f"{staged.name}: the model to write fails onnx.checker: {first}"
        ) from None
