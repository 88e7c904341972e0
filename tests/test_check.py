"""`conv2attn check`: parity, accuracy on real data, per-layer diagnosis, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import conv2attn
from conv2attn.cli import main
from conv2attn.errors import InputError
from conv2attn.inputs import GraphInput, random_samples
from tests.helpers import chain_model, conv_model, save_model_file

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def chain_pair(tmp_path):
    original = chain_model()
    converted, _ = conv2attn.convert(original)
    return save_model_file(original, tmp_path / "chain.onnx"), save_model_file(
        converted, tmp_path / "chain_attn.onnx"
    )


def perturb_projection(path: Path, layer: str, scale: float = 1e-3) -> Path:
    """A converted model whose ``layer`` projection is off by ``scale`` (relative)."""
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        if tensor.name == f"{layer}/attn/W_O":
            values = numpy_helper.to_array(tensor)
            noise = np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype)
            tensor.CopyFrom(
                numpy_helper.from_array(values + scale * noise * (values != 0), tensor.name)
            )
    broken = path.with_name("broken.onnx")
    onnx.save(model, str(broken))
    return broken


def test_check_passes_for_a_correct_conversion(chain_pair, tmp_path, capsys):
    original, converted = chain_pair
    report_path = tmp_path / "check.json"
    assert main(["check", str(original), str(converted), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "parity: PASS" in printed
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    (output,) = report["outputs"]
    assert output["name"] == "y" and output["within"]
    assert output["max_abs"] <= 1e-5 * output["max_reference"] + 1e-6
    assert set(output) >= {"max_abs", "max_rel", "mean_abs", "rtol", "atol"}
    assert report["samples"] == 4


def test_perturbed_projection_fails_and_per_layer_names_the_layer(chain_pair, tmp_path, capsys):
    original, converted = chain_pair
    broken = perturb_projection(converted, "down")
    report_path = tmp_path / "check.json"
    code = main(["check", str(original), str(broken), "--per-layer", "--json", str(report_path)])
    assert code == 1
    printed = capsys.readouterr().out
    assert "parity: FAIL" in printed
    assert "first layer over tolerance: down" in printed
    report = json.loads(report_path.read_text())
    assert report["first_failing_layer"] == "down"
    within = {layer["name"]: layer["within"] for layer in report["layers"]}
    assert within == {"stem": True, "down": False, "skip": True}
    assert [layer["name"] for layer in report["layers"]] == ["stem", "down", "skip"]  # graph order


def test_tolerance_options_decide(chain_pair):
    original, converted = chain_pair
    broken = perturb_projection(converted, "down", scale=1e-4)
    assert main(["check", str(original), str(broken), "-q"]) == 1
    assert main(["check", str(original), str(broken), "-q", "--rtol", "1e-2"]) == 0


def test_per_layer_works_with_external_data(tmp_path):
    original = chain_model()
    converted, _ = conv2attn.convert(original)
    a = save_model_file(original, tmp_path / "a.onnx", external=True)
    b = save_model_file(converted, tmp_path / "b.onnx", external=True)
    assert (tmp_path / "b.onnx.data").exists()
    report_path = tmp_path / "r.json"
    assert main(["check", str(a), str(b), "--per-layer", "-q", "--json", str(report_path)]) == 0
    assert len(json.loads(report_path.read_text())["layers"]) == 3


def test_digits_accuracy_is_identical_on_the_test_split(tmp_path):
    converted = tmp_path / "digits_attn.onnx"
    assert main(["convert", str(MODELS / "digits_cnn.onnx"), "-o", str(converted), "-q"]) == 0
    report_path = tmp_path / "r.json"
    args = [
        "check",
        str(MODELS / "digits_cnn.onnx"),
        str(converted),
        "--inputs",
        str(MODELS / "digits_test.npz"),
        "-q",
        "--json",
        str(report_path),
    ]
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    accuracy = report["accuracy"]
    assert accuracy["samples"] == 450
    assert accuracy["changed"] == 0
    assert accuracy["original"] == accuracy["converted"] >= 0.95
    assert report["outputs"][0]["top1_agreement"] == 1.0


def test_demo_converts_and_checks_the_shipped_model(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "total (7 converted)" in printed
    assert "accuracy on 450 labelled samples" in printed and "predictions changed: 0" in printed
    assert "parity: PASS" in printed
    assert (tmp_path / "digits_cnn_attn.onnx").exists()


PHOTOS = {
    "skimage": [
        "astronaut.png",
        "coffee.png",
        "chelsea.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "camera.png",
    ],
    "sklearn": ["china.jpg", "flower.jpg"],
}


def photographs(folder: Path) -> Path:
    """Real photographs shipped with scikit-image and scikit-learn (one greyscale)."""
    import skimage.data
    import sklearn.datasets

    roots = {
        "skimage": Path(skimage.data.__file__).parent,
        "sklearn": Path(sklearn.datasets.__file__).parent / "images",
    }
    folder.mkdir()
    for package, names in PHOTOS.items():
        for name in names:
            shutil.copy(roots[package] / name, folder / f"{package}_{name}")
    return folder


@pytest.mark.slow
def test_images_on_real_photographs_agree_top1(torchvision_model, tmp_path):
    source = torchvision_model("resnet18")
    converted = tmp_path / "resnet18_attn.onnx"
    assert main(["convert", str(source), "-o", str(converted), "-q"]) == 0
    folder = photographs(tmp_path / "photos")
    report_path = tmp_path / "r.json"
    code = main(
        [
            "check",
            str(source),
            str(converted),
            "--images",
            str(folder),
            "-q",
            "--json",
            str(report_path),
        ]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["samples"] == 8
    assert report["outputs"][0]["top1_agreement"] == 1.0
    assert report["outputs"][0]["topk_agreement"] == 1.0


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "conv2attn", *map(str, args)], capture_output=True, text=True
    )


def one_line_exit_2(result, message):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_mismatched_models_are_refused(chain_pair, tmp_path):
    original, _ = chain_pair
    other = save_model_file(conv_model(), tmp_path / "other.onnx")
    one_line_exit_2(run_cli("check", original, other), "the models do not match")
    two_outputs = chain_model()
    two_outputs.graph.output.append(
        onnx.helper.make_tensor_value_info("c1", onnx.TensorProto.FLOAT, ["N", 8, 16, 16])
    )
    two = save_model_file(two_outputs, tmp_path / "two.onnx")
    one_line_exit_2(run_cli("check", original, two), "has 1 outputs")


def test_npz_missing_an_input_is_refused(chain_pair, tmp_path):
    original, converted = chain_pair
    np.savez(tmp_path / "data.npz", image=np.zeros((2, 3, 16, 16), np.float32))
    one_line_exit_2(
        run_cli("check", original, converted, "--inputs", tmp_path / "data.npz"),
        "no array named 'x'",
    )


def test_npz_with_objects_is_refused_not_unpickled(chain_pair, tmp_path):
    original, converted = chain_pair
    np.savez(tmp_path / "data.npz", x=np.array([{"a": 1}], dtype=object))
    one_line_exit_2(
        run_cli("check", original, converted, "--inputs", tmp_path / "data.npz"), "refused"
    )


def test_directory_without_images_is_refused(chain_pair, tmp_path):
    original, converted = chain_pair
    (tmp_path / "empty").mkdir()
    one_line_exit_2(
        run_cli("check", original, converted, "--images", tmp_path / "empty", "--size", "16"),
        "no images",
    )


def test_non_image_file_among_images_is_refused(tmp_path):
    model = save_model_file(conv_model(3, 4, size=(16, 16)), tmp_path / "m.onnx")
    converted = save_model_file(
        conv2attn.convert(conv_model(3, 4, size=(16, 16)))[0], tmp_path / "m_attn.onnx"
    )
    folder = photographs(tmp_path / "photos")
    (folder / "notes.txt").write_text("not an image")
    one_line_exit_2(
        run_cli("check", model, converted, "--images", folder), "notes.txt: cannot read as an image"
    )


def test_oversized_image_is_refused(tmp_path, monkeypatch):
    from conv2attn import inputs

    monkeypatch.setattr(inputs, "MAX_IMAGE_PIXELS", 1000)
    folder = photographs(tmp_path / "photos")
    graph_input = GraphInput("x", np.dtype(np.float32), (None, 3, 16, 16))
    with pytest.raises(InputError, match="over the limit"):
        inputs.image_samples(folder, [graph_input])


def test_unknown_provider_is_refused(chain_pair):
    original, converted = chain_pair
    one_line_exit_2(
        run_cli("check", original, converted, "--provider", "NoSuchExecutionProvider"),
        "is not installed",
    )


def test_dynamic_dims_take_the_converted_models_size_or_need_input_shape(tmp_path):
    model = conv_model(size=("H", "W"))
    original = save_model_file(model, tmp_path / "dyn.onnx")
    converted = save_model_file(
        conv2attn.convert(model, input_shapes=["x:2x4x9x11"])[0], tmp_path / "dyn_attn.onnx"
    )
    # The converted model fixes the size the original is checked at.
    assert main(["check", str(original), str(converted), "-q"]) == 0
    assert main(["check", str(original), str(converted), "-q", "--input-shape", "x:2x4x9x11"]) == 0
    # Both dynamic: the error suggests a shape, and the suggested shape works.
    result = run_cli("check", original, original)
    one_line_exit_2(result, "--input-shape x:")
    suggested = result.stderr.split("--input-shape ")[1].split()[0]
    assert main(["check", str(original), str(original), "-q", "--input-shape", suggested]) == 0


def test_random_samples_respect_dtypes_and_fixed_batches():
    inputs = [
        GraphInput("ids", np.dtype(np.int64), (None, 7)),
        GraphInput("mask", np.dtype(bool), (2, 7)),
        GraphInput("x", np.dtype(np.float16), (None, 3)),
    ]
    samples = random_samples(inputs, count=3, seed=0, shapes={})
    assert samples.feeds["ids"].shape == (3, 7) and samples.feeds["ids"].dtype == np.int64
    assert samples.feeds["ids"].min() >= 0 and samples.feeds["ids"].max() < 16
    assert samples.feeds["mask"].shape == (6, 7) and samples.feeds["mask"].dtype == bool
    assert samples.feeds["x"].dtype == np.float16
    again = random_samples(inputs, count=3, seed=0, shapes={})
    np.testing.assert_array_equal(samples.feeds["x"], again.feeds["x"])
