"""`conv2attn report`: a self-contained HTML page, its charts, and what it shows."""

import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

import conv2attn
from conv2attn.cli import main
from conv2attn.inputs import graph_inputs, random_samples
from conv2attn.record import converted_layers
from conv2attn.visual_report import attention_picture
from tests.helpers import conv_model

pytest.importorskip("matplotlib", reason="the report needs matplotlib (the [report] extra)")

MODELS = Path(__file__).resolve().parent.parent / "models"


class Page(HTMLParser):
    """Collects ids, URL-valued attributes and text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.ids, self.urls, self.text, self.tags = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "id":
                self.ids.add(value)
            if name in ("src", "href", "xlink:href", "action", "poster", "data"):
                self.urls.append(value or "")

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def assert_self_contained(path: Path) -> None:
    page = parse(path)
    assert all(url.startswith(("#", "data:")) for url in page.urls), page.urls
    assert not {"link", "iframe", "img"} & set(page.tags)  # styles and images are inline
    css_urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", path.read_text())
    assert all(url.startswith("#") for url in css_urls), css_urls


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits_report")
    converted = folder / "digits_attn.onnx"
    assert main(["convert", str(MODELS / "digits_cnn.onnx"), "-o", str(converted), "-q"]) == 0
    profile = folder / "profile.json"
    args = [
        "profile",
        str(MODELS / "digits_cnn.onnx"),
        str(converted),
        "--per-layer",
        "--iterations",
        "5",
        "--warmup",
        "0",
        "--json",
        str(profile),
        "-q",
    ]
    assert main(args) == 0
    output = folder / "report.html"
    args = [
        "report",
        str(MODELS / "digits_cnn.onnx"),
        str(converted),
        "-o",
        str(output),
        "--profile",
        str(profile),
        "--png",
        str(folder / "png"),
        "-q",
    ]
    assert main(args) == 0
    return output


def test_report_has_every_part_and_is_self_contained(digits_report):
    page = parse(digits_report)
    assert {"summary", "layers", "layer-table", "construction", "charts"} <= page.ids
    assert {"chart-parity", "chart-growth", "chart-latency", "chart-attention"} <= page.ids
    text = " ".join(page.text)
    for phrase in (
        "Convs converted",
        "attention",
        "multiply-adds",
        "parameters",
        "file size",
        "PASS",
    ):
        assert phrase in text
    assert text.count("node_Conv_") >= 7  # every converted layer is in the table
    # three Convs are on the shifted grid with 4 or 6 heads where the fixed grid needs 9
    assert "fixed (Li et al.)" in text and "the fixed grid would need" in text
    assert_self_contained(digits_report)


def test_png_charts_are_written(digits_report):
    folder = digits_report.parent / "png"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["attention.png", "growth.png", "latency.png", "parity.png"]
    for path in folder.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_original_layers_get_latency_from_the_profile(digits_report):
    profile = json.loads((digits_report.parent / "profile.json").read_text())
    original, converted = profile["models"]
    attributed = {t["name"] for t in original["layers"]} - {"(other nodes)"}
    assert len(attributed) == 7  # every original Conv found among onnxruntime's nodes
    assert {t["name"] for t in converted["layers"]} >= attributed


def test_heads_of_a_3x3_conv_each_attend_to_one_neighbour_patch():
    model = conv_model(4, 4, kernel=(3, 3), pads=[1, 1, 1, 1], size=(12, 12))
    converted, _ = conv2attn.convert(model, patch="2")
    (layer,) = converted_layers(converted)
    feeds = random_samples(graph_inputs(model), 1, 0, {}).feeds
    picture = attention_picture(model, converted, layer, feeds)
    assert picture.heads == 4
    for head in range(4):
        assert picture.maps[head].sum() == pytest.approx(1.0, abs=1e-6)
        assert picture.maps[head].max() == pytest.approx(1.0, abs=1e-6)  # all mass on one key
    assert sorted(picture.offsets) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert picture.kernel.shape == (3, 3)


@pytest.mark.slow
def test_report_for_torchvision_resnet18(torchvision_model, tmp_path):
    source = torchvision_model("resnet18")
    converted = tmp_path / "r18_attn.onnx"
    assert main(["convert", str(source), "-o", str(converted), "-q"]) == 0
    output = tmp_path / "r18.html"
    args = [
        "report",
        str(source),
        str(converted),
        "-o",
        str(output),
        "-q",
        "--layer",
        "/layer1/layer1.0/conv1/Conv",
    ]
    assert main(args) == 0
    page = parse(output)
    assert {"chart-parity", "chart-growth", "chart-attention"} <= page.ids
    assert "chart-latency" not in page.ids  # no profile given
    assert "/layer1/layer1.0/conv1/Conv/attn/Softmax" in " ".join(page.text)
    assert_self_contained(output)


def test_bad_report_inputs(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(model))
    # the "converted" model has no conversion record
    assert main(["report", str(model), str(model), "-o", str(tmp_path / "r.html"), "-q"]) == 2
    converted = tmp_path / "c.onnx"
    onnx.save(conv2attn.convert(conv_model())[0], str(converted))
    args = ["report", str(model), str(converted), "-o", str(tmp_path / "r.html"), "--layer", "nope"]
    assert main(args) == 2
    assert not (tmp_path / "r.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_report_renders_in_a_real_browser(digits_report, tmp_path):
    profile_dir = tmp_path / "chromium-profile"
    url = digits_report.resolve().as_uri()
    screenshot = tmp_path / "page.png"
    common = [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile_dir}"]
    subprocess.run(
        [*common, f"--screenshot={screenshot}", "--window-size=1280,1800", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert png_size(screenshot) == (1280, 1800)
    from PIL import Image

    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not a blank page
    assert (pixels < 128).mean() > 0.005  # text and charts drawn in dark ink
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert 'data-js-errors="0"' in dom  # no script errors, no console.error
    assert "Convs converted" in dom and "digits_attn.onnx" in dom
