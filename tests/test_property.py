"""Property test: random Conv configurations, converted graph vs onnxruntime's own Conv.

CI runs 150 2-D and 50 1-D/3-D cases; PROPERTY_EXAMPLES=3000 runs a longer search.
"""

import os

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

import conv2attn
from conv2attn.core.geometry import AutoPad, ConvSpec, resolve_pads
from tests.helpers import assert_parity, conv_model, random_input, run

EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "150"))


@st.composite
def conv_configs(draw, ranks=(2,)):
    rank = draw(st.sampled_from(ranks))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans())
    if depthwise:
        group = draw(st.integers(2, 6))
        cin, cout = group, group * draw(st.integers(1, 2))
    else:
        cin, cout = group * draw(st.integers(1, 3)), group * draw(st.integers(1, 3))
    axis = st.integers(1, 5)
    kernel = tuple(draw(axis) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 4)) for _ in range(rank))  # stride > kernel too
    dilations = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    max_size = 13 if rank < 3 else 6
    size = tuple(draw(st.integers(1, max_size)) for _ in range(rank))
    auto_pad = draw(st.sampled_from([None, None, *AutoPad.__members__]))
    pads = None if auto_pad else [draw(st.integers(0, 3)) for _ in range(2 * rank)]
    mode = auto_pad or "NOTSET"
    begin, end = resolve_pads(mode, size, kernel, strides, dilations, pads)
    spec = ConvSpec(cin, cout, group, kernel, strides, dilations, begin, end, size)
    assume(min(spec.output_size) >= 1)
    patch = draw(
        st.one_of(
            st.just("auto"),
            st.tuples(*[st.integers(1, 4)] * rank).map(lambda p: "x".join(map(str, p))),
        )
    )
    attention = draw(st.sampled_from(["global", "local", "auto"]))
    block = "auto"
    if attention != "global":
        block = draw(
            st.one_of(
                st.just("auto"),
                st.tuples(*[st.integers(1, 4)] * rank).map(lambda b: "x".join(map(str, b))),
            )
        )
    return {
        "attention": attention,
        "block": block,
        "grid": draw(st.sampled_from(["shifted", "fixed", "auto"])),
        # --queries strided is refused with global attention (an option that does nothing)
        "queries": draw(
            st.sampled_from(["auto", "patch"] + (["strided"] if attention != "global" else []))
        ),
        "model": dict(
            in_channels=cin,
            out_channels=cout,
            kernel=kernel,
            strides=list(strides),
            dilations=list(dilations),
            pads=pads,
            auto_pad=auto_pad if auto_pad != "NOTSET" else None,
            group=group,
            size=size,
            bias=draw(st.booleans()),
            seed=draw(st.integers(0, 99)),
        ),
        "batch": draw(st.integers(1, 3)),
        "patch": patch,
        # convert's --batch: 1, or so large that every block of a local plan is a tile
        "tile_batch": draw(st.sampled_from([1, 1, 10**9])),
    }


def onnxruntime_deviates(m) -> bool:
    """Where onnxruntime's Conv departs from the ONNX definition for SAME auto_pad.

    It refuses dilation > 1, and when the stride exceeds the dilated kernel the padding
    the spec computes is negative: onnxruntime then shifts the window, the definition
    (onnx.reference) pads nothing.
    """
    if not (m["auto_pad"] or "").startswith("SAME"):
        return False
    if max(m["dilations"]) > 1:
        return True
    return any(
        (-(-n // s) - 1) * s + (k - 1) * d + 1 < n
        for n, k, s, d in zip(m["size"], m["kernel"], m["strides"], m["dilations"])
    )


def reference(model, feeds, config):
    """onnxruntime's Conv, or the ONNX reference evaluator where onnxruntime deviates."""
    if onnxruntime_deviates(config["model"]):
        return ReferenceEvaluator(model).run(None, feeds)
    return run(model, feeds)


def takes_strided_queries(config) -> bool:
    """Whether ``--queries strided`` gives this Conv strided queries when it goes local:
    a stride above 1 on an axis whose kernel is above 1 (kernel-1 axes are subsampled),
    and patch 1 on every such axis."""
    m = config["model"]
    strided = [i for i, (k, s) in enumerate(zip(m["kernel"], m["strides"])) if k > 1 and s > 1]
    if not strided:
        return False
    if config["patch"] == "auto":
        return True
    patch = [int(v) for v in config["patch"].split("x")]
    return all(patch[i] == 1 for i in strided)


def check_queries(config, layer) -> None:
    if config["queries"] == "patch" or layer.attention == "global":
        assert not layer.strided_queries
    elif config["queries"] == "strided":
        assert layer.strided_queries == takes_strided_queries(config)


def check(config, form: str = "matmul"):
    model = conv_model(**config["model"])
    converted, report = conv2attn.convert(
        model,
        patch=config["patch"],
        attention=config["attention"],
        block=config["block"],
        form=form,
        grid=config["grid"],
        batch=config["tile_batch"],
        queries=config["queries"],
    )
    assert len(report.layers) == 1
    if config["grid"] != "auto":
        assert report.layers[0].grid == config["grid"]
    check_queries(config, report.layers[0])
    ops = [n.op_type for n in converted.graph.node]
    assert "Conv" not in ops
    assert ("Attention" in ops) == (form == "attention")
    feeds = random_input(model, batch=config["batch"])
    assert_parity(reference(model, feeds, config), run(converted, feeds))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(conv_configs())
def test_random_2d_convs_match_onnxruntime(config):
    check(config)


@settings(
    max_examples=max(EXAMPLES // 3, 1),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(conv_configs(ranks=(1, 3)))
def test_random_1d_and_3d_convs_match_onnxruntime(config):
    check(config)


def test_property_strategy_reaches_the_hard_cases():
    """The strategy must produce what the property is about, or the test proves little."""
    seen = {
        "stride>kernel": False,
        "dilation>1": False,
        "depthwise": False,
        "same": False,
        "local": False,
        "global": False,
        "auto": False,
        "shifted": False,
        "fixed": False,
        "fixed grid phase": False,
        "tiles": False,
        "strided queries": False,
    }

    # generation only (nothing converts here), so many draws are cheap: the rarest case,
    # a fixed grid with a phase, needs four independent choices at once
    @settings(max_examples=1000, deadline=None, database=None)
    @given(conv_configs())
    def collect(config):
        m = config["model"]
        seen["stride>kernel"] |= any(s > k for s, k in zip(m["strides"], m["kernel"]))
        seen["dilation>1"] |= max(m["dilations"]) > 1
        seen["depthwise"] |= m["group"] == m["in_channels"] > 1
        seen["same"] |= (m["auto_pad"] or "").startswith("SAME")
        seen[config["attention"]] = True
        seen[config["grid"]] = True
        seen["tiles"] |= config["attention"] != "global" and config["tile_batch"] > 1
        seen["strided queries"] |= (
            config["attention"] != "global"
            and config["queries"] == "strided"
            and takes_strided_queries(config)
        )
        if config["grid"] == "fixed" and m["pads"] and config["patch"] != "auto":
            # a begin pad that is no whole number of input patches: the grid has a phase
            patch = map(int, config["patch"].split("x"))
            seen["fixed grid phase"] |= any(
                pad % (stride * p) for pad, stride, p in zip(m["pads"], m["strides"], patch)
            )

    collect()
    assert all(seen.values()), seen
