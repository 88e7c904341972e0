"""The names of what the pass emits: a contract between emission and every reader.

Every node and tensor that replaces a Conv named ``c`` is called ``c/attn/<part>``, so a
converted graph reads well in Netron and diffs cleanly. Other stages find nodes by these
names: TensorRT keeps the logits and Softmax in float32 (``keeps_float32``), the HTML
report reads each layer's attention (``softmax_output``; in the standard form, the
``attention_node``'s own softmax), and the per-layer profile adds
up the kernel time of a Conv's nodes (``owner_prefix``). They all use the functions
here, never string literals, and ``tests/test_names.py`` proves each still finds its nodes
in converted models. Plain Python.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SCOPE = "attn"
SOFTMAX = "Softmax"
LOGITS = "logits"
PROJECTION = "W_O"
BIAS = "bias"
FOLD = "fold"  # heads folded into W_O (``AttentionPlan.folds_heads``)


def scope(conv: str) -> str:
    """Prefix of every node and tensor that replaces Conv ``conv``: ``<conv>/attn``."""
    return f"{conv}/{SCOPE}"


def owner_prefix(conv: str) -> str:
    """What every node name of ``conv``'s replacement starts with."""
    return f"{scope(conv)}/"


def owner(node: str, prefixes: Mapping[str, str]) -> str | None:
    """The Conv whose replacement emitted node ``node``, or None; ``prefixes`` maps each
    converted Conv's ``owner_prefix`` to the Conv. The longest prefix wins (the parts
    emitted after a prefix never hold ``/attn/``), and only prefixes that end at one of
    the name's ``/attn/`` are looked up, so a lookup scans no list of Convs."""
    marker = f"/{SCOPE}/"
    end = node.rfind(marker)
    while end >= 0:
        conv = prefixes.get(node[: end + len(marker)])
        if conv is not None:
            return conv
        end = node.rfind(marker, 0, end)
    return None


def layer_weights(conv: str) -> tuple[str, str]:
    """The initializers of ``conv``'s replacement that hold the Conv's weight and bias, as
    emitted: W_O and the bias. The PyTorch import reads the Conv back out of them."""
    return f"{scope(conv)}/{PROJECTION}", f"{scope(conv)}/{BIAS}"


def output_of(node: str) -> str:
    """The (only) output tensor of an emitted node."""
    return f"{node}_output_0"


def softmax_output(conv: str) -> str:
    """The attention probabilities of ``conv``'s replacement, ``[queries * heads, keys]``
    (attend-first) or ``[queries, keys * heads]`` (project-first)."""
    return output_of(f"{scope(conv)}/{SOFTMAX}")


def attention_node(conv: str) -> str:
    """The standard form's ONNX ``Attention`` node of ``conv``'s replacement."""
    return f"{scope(conv)}/Attention"


def is_projection(tensor: str) -> bool:
    """Whether ``tensor`` is an output projection W_O (the bulk of a converted model)."""
    return tensor.endswith(f"/{SCOPE}/{PROJECTION}")


# The logits (every node under ``logits/``) and the Softmax with the reshapes, transposes
# and cast that follow it: in reduced precision these must stay float32 (the quadratic
# logits reach -ALPHA * distance^2, beyond fp16's range).
_FLOAT32_NODE = re.compile(rf"/{SCOPE}/({LOGITS}/|{SOFTMAX})")


def keeps_float32(node: str) -> bool:
    """Whether an emitted node (or a runtime layer named after it) must run in float32."""
    return _FLOAT32_NODE.search(node) is not None


# The Scan that runs a stretch of the graph one batch item at a time (``graph.per_item``)
# and the nodes around it.
PER_ITEM = "per_item"


def per_item_node(part: str) -> str:
    """A node of the per-item stretch's wrapping: ``per_item/<part>``."""
    return f"{PER_ITEM}/{part}"


def items_of(tensor: str) -> str:
    """The per-item Scan's output that stacks ``tensor`` of each batch item,
    ``[B, *shape at batch 1]``; ``tensor`` itself is made from it for the nodes after."""
    return f"{tensor}/items"
