"""Model files: external data in and out, atomic writes, refusals."""

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import conv2attn
from conv2attn.errors import InputError, InternalError
from conv2attn.modelio import (
    check_model,
    check_output_path,
    load_model,
    save_model,
    tensor_size,
    write_model,
)
from tests.helpers import (
    assert_parity,
    chain_model,
    conv_model,
    random_input,
    run,
    save_model_file,
)


def test_external_data_model_loads_converts_and_saves(tmp_path):
    source = tmp_path / "ext.onnx"
    save_model_file(chain_model(), source, external=True)
    assert (tmp_path / "ext.onnx.data").exists()
    converted, report = conv2attn.convert(source)
    assert len(report.layers) == 3
    out = tmp_path / "out.onnx"
    assert save_model(converted, out) == [out]  # small: one self-contained file
    feeds = random_input(chain_model())
    assert_parity(run(str(source), feeds), run(str(out), feeds))


def test_output_over_the_limit_gets_external_data(tmp_path):
    converted, _ = conv2attn.convert(chain_model())
    out = tmp_path / "big.onnx"
    size = converted.ByteSize()
    # The limit is protobuf's 2 GiB; a lower one exercises the same path in a unit test.
    written = save_model(converted, out, external_threshold=size // 2)
    assert written == [tmp_path / "big.onnx.data", out]
    header = onnx.load(str(out), load_external_data=False)
    large = [t for t in header.graph.initializer if int(np.prod(t.dims)) * 4 > 1024]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
    onnx.checker.check_model(str(out), full_check=True)
    feeds = random_input(chain_model())
    assert_parity(run(chain_model(), feeds), run(str(out), feeds))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_missing_external_data_is_named(tmp_path):
    source = tmp_path / "ext.onnx"
    save_model_file(chain_model(), source, external=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(InputError, match=r"external data file 'ext\.onnx\.data' .* is missing"):
        load_model(source)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "m"
    folder.mkdir()
    model = conv_model()
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight)
    (tmp_path / "outside.data").write_bytes(values.tobytes())
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="refused"):
        load_model(path)


def test_model_failing_the_checker_is_refused(tmp_path):
    model = conv_model()
    model.graph.node[0].input[1] = "undefined_weight"
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"fails onnx\.checker"):
        load_model(path)


def test_a_large_weight_with_too_few_bytes_fails_the_light_check():
    """Large initializers are checked one by one (``modelio.check_model``), not skipped."""
    model = conv_model(in_channels=64, out_channels=64)  # a 147 kB weight
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]
    with pytest.raises(onnx.checker.ValidationError, match="raw_data size"):
        check_model(model)


def test_the_light_check_finds_what_the_checker_finds():
    """Large weights stand in as one element for the structural check: a graph error
    beside them is still found, with the checker's own message."""
    model = conv_model(in_channels=64, out_channels=64)
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(onnx.checker.ValidationError) as full:
        onnx.checker.check_model(model)
    with pytest.raises(onnx.checker.ValidationError) as light:
        check_model(model)
    assert str(light.value).splitlines()[0] == str(full.value).splitlines()[0]
    check_model(conv_model(in_channels=64, out_channels=64))  # and a sound one passes


def test_tensor_size_is_never_below_the_serialised_size():
    """``model_size`` decides when protobuf's 2 GB limit forces external data."""
    for dtype in (np.float32, np.float16, np.int64, np.uint8, np.bool_):
        for shape in [(0,), (1,), (3, 5), (64, 64, 3, 3)]:
            tensor = numpy_helper.from_array(np.zeros(shape, dtype), "a/long/tensor/name")
            assert tensor.ByteSize() <= tensor_size(tensor) <= tensor.ByteSize() + 256


def test_a_weight_of_no_known_element_type_is_left_to_the_checker(tmp_path):
    """A weight whose data_type is UNDEFINED (a damaged file) is refused by the checker
    with its own message, not a KeyError in the size estimate."""
    model = conv_model(in_channels=64, out_channels=64)
    model.graph.initializer[0].data_type = onnx.TensorProto.UNDEFINED
    assert tensor_size(model.graph.initializer[0]) == model.graph.initializer[0].ByteSize()
    with pytest.raises(onnx.checker.ValidationError):
        check_model(model)
    path = tmp_path / "damaged.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match=r"damaged\.onnx: fails onnx\.checker"):
        load_model(path)
    model.graph.initializer[0].data_type = 99  # a type from a later onnx, or noise
    with pytest.raises(onnx.checker.ValidationError, match="element type 99"):
        check_model(model)


def test_check_output_path_refusals(tmp_path):
    source = tmp_path / "in.onnx"
    source.write_bytes(b"x")
    with pytest.raises(InputError, match="output is the input"):
        check_output_path(tmp_path / "." / "in.onnx", [source], force=True)
    link = tmp_path / "link.onnx"
    os.symlink(source, link)
    with pytest.raises(InputError, match="output is the input"):
        check_output_path(link, [source], force=True)
    with pytest.raises(InputError, match="already exists"):
        check_output_path(link, [tmp_path / "other.onnx"], force=False)
    assert check_output_path(tmp_path / "new.onnx", [source], force=False) == tmp_path / "new.onnx"


def test_loaded_weights_are_exact(tmp_path):
    model = conv_model()
    path = tmp_path / "m.onnx"
    save_model_file(model, path, external=True)
    loaded = load_model(path)
    for a, b in zip(model.graph.initializer, loaded.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_names_that_are_not_utf8_are_refused_at_load(tmp_path):
    """Protobuf hands back bytes for such a name; it would fail mid-conversion."""
    data = bytearray(chain_model().SerializeToString())
    at = data.index(b"\x1a\x04relu") + 2  # NodeProto.name (field 3, 4 bytes): "relu"
    data[at] = 0xF2  # now b"\xf2elu", as a fuzzed file had it
    path = tmp_path / "m.onnx"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"onnx\.NodeProto\.name is not valid UTF-8"):
        load_model(path)


def test_streaming_writer_gives_the_bytes_protobuf_would(tmp_path):
    converted, _ = conv2attn.convert(chain_model())
    converted.doc_string = "converted"
    converted.graph.doc_string = "its graph"
    onnx.helper.set_model_props(converted, {"a": "1", "conv2attn": "{}"})
    # the length of raw data is taken from dims; typed fields and scalars are measured
    typed = onnx.helper.make_tensor("typed", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    scalar = numpy_helper.from_array(np.array(7, dtype=np.int64), "scalar")
    scalar.doc_string = "a scalar"
    converted.graph.initializer.extend([typed, scalar])
    path = tmp_path / "m.onnx"
    write_model(converted, path)
    assert path.read_bytes() == converted.SerializeToString()
    assert onnx.load(str(path)) == converted


def test_streaming_writer_refuses_raw_data_that_does_not_fit_its_dims(tmp_path):
    converted, _ = conv2attn.convert(chain_model())
    short = numpy_helper.from_array(np.zeros(4, dtype=np.float32), "short")
    short.raw_data = bytes(12)  # three floats under dims [4]
    converted.graph.initializer.append(short)
    with pytest.raises(InternalError, match="initializer 'short' encodes to"):
        write_model(converted, tmp_path / "m.onnx")
