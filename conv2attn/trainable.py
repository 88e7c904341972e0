"""Trainable attention in PyTorch: ``ConvAttention`` and ``convert_module``.

(Imported as ``conv2attn.trainable``; ``conv2attn.torch`` is an alias kept for code
written against 0.1.0.)

A ``ConvAttention`` is a relative-positional multi-head self-attention layer over patch
tokens that starts out computing exactly what a given ``nn.Conv2d`` computes and can then
be trained beyond it. Geometry, patch choice and weights are the ONNX path's own
(``geometry``, ``weights``); only the tensor program is written here, in torch.

Per head ``h``, a gated mix of positional and content attention (ConViT's gated
positional self-attention, with the gate as a zero-initialised residual):

    P_h = softmax(bias_h[d])                    positional: d = key - query position
    C_h = softmax(q_i . k_j / sqrt(key_dim))    content: q = x W_Q, k = x W_K
    A_h = P_h + g_h * (C_h - P_h)

``bias_h`` is a trainable table over relative positions initialised to section 2's
quadratic encoding ``-alpha * |d - offset_h|^2``, so ``P_h`` selects the Conv's tap;
W_Q and W_K start random (as in any attention layer) and the gate ``g_h`` starts at 0, so
at initialisation ``A_h = P_h`` exactly and the output equals the Conv's to float32
rounding, while the gate's gradient, ``(C_h - P_h) V W_O``, is as large as the layer's
signal: the first optimiser step opens the gates and from then on W_Q and W_K learn.
Values are the tokens (W_V = I, folded into the output projection); W_O and the bias are
section 3's. ``attention_parameters()`` names what shapes the attention.

Requires torch (``pip install conv2attn[torch]``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from conv2attn.core.geometry import (
    KEY_DIM,
    Attention,
    AttentionPlan,
    ConvSpec,
    GeometryError,
    Order,
    plan_attention,
    validate,
)
from conv2attn.core.planning import AttentionChoice, LayerPlans, plan_layers
from conv2attn.core.selection import selection_reason
from conv2attn.core.weights import (
    TRAINABLE_ALPHA,
    output_bias,
    output_projection,
    quadratic_encoding,
    query_indices,
    relative_position_range,
    relative_positions,
    window_indices,
)

__all__ = ["ConvAttention", "attention_summary", "conv_spec", "convert_module", "plan_for"]


def conv_spec(conv: nn.Conv2d, input_size: Sequence[int]) -> ConvSpec:
    """The Conv2d as the geometry sees it; a non-zero ``padding_mode`` is applied before
    the attention (as torch itself does), so the attention's own padding is then zero."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
    input_size = tuple(int(n) for n in input_size)
    if len(input_size) != 2:
        raise ValueError(f"input_size {list(input_size)}: expected (height, width)")
    kernel, strides, dilations = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding_mode != "zeros":
        begin = end = (0, 0)
        input_size = tuple(n + 2 * p for n, p in zip(input_size, _explicit_padding(conv)))
    elif conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilations)]
        begin = tuple(t // 2 for t in totals)
        end = tuple(t - t // 2 for t in totals)
    elif conv.padding == "valid":
        begin = end = (0, 0)
    else:
        begin = end = tuple(conv.padding)
    spec = ConvSpec(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        group=conv.groups,
        kernel=tuple(kernel),
        strides=tuple(strides),
        dilations=tuple(dilations),
        pads_begin=begin,
        pads_end=end,
        input_size=input_size,
    )
    try:
        validate(spec)
    except GeometryError as error:
        raise ValueError(f"{conv}: {error}") from None
    return spec


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # "same" with a padding mode: torch pads like this
        return tuple((d * (k - 1)) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


def plan_for(
    conv: nn.Conv2d,
    input_size: Sequence[int],
    patch: str | int | Sequence[int] = "auto",
    attention: str = "global",
    block: str | int | Sequence[int] = "auto",
    max_param_growth: float = 4.0,
    grid: str = "auto",
    queries: str = "auto",
) -> AttentionPlan:
    """The plan ``conv2attn convert`` chooses for this Conv alone in a model."""
    spec = conv_spec(conv, input_size)
    chosen = _plans([spec], ["conv"], patch, attention, block, max_param_growth, grid, queries)
    return chosen.plans[0]


def _plans(
    specs: list[ConvSpec],
    names: list[str],
    patch: str | int | Sequence[int],
    attention: str,
    block: str | int | Sequence[int],
    max_param_growth: float,
    grid: str = "auto",
    queries: str = "auto",
) -> LayerPlans:
    """``core.planning.plan_layers``, the ONNX pass's own choice, for ``nn.Module`` options."""
    attention = AttentionChoice(attention)
    if attention is AttentionChoice.GLOBAL and block != "auto":
        raise ValueError("block applies to local (or auto) attention only")
    if attention is AttentionChoice.GLOBAL and queries == "strided":
        raise ValueError("strided queries apply to local (or auto) attention only")
    return plan_layers(
        specs,
        names,
        attention=attention,
        patch=patch if patch == "auto" else _pair(patch, "patch"),
        block=block if block == "auto" else _pair(block, "block"),
        max_param_growth=max_param_growth,
        grid=grid,
        queries=queries,
    )


def _pair(value, name: str) -> tuple[int, int]:
    sizes = (int(value),) * 2 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(sizes) != 2 or min(sizes) < 1:
        raise ValueError(f"{name} {value}: expected a positive int or (rows, columns)")
    return sizes


@dataclass
class _Geometry:
    """What ``ConvAttention`` indexes with at one input size."""

    plan: AttentionPlan
    query_index: torch.Tensor
    key_index: torch.Tensor
    bias_index: torch.Tensor
    lows: tuple[int, ...]


def _geometry(plan: AttentionPlan, device) -> _Geometry:
    """Indices of ``plan`` (its bias table's range: ``weights.quadratic_encoding``'s)."""
    lows, spans = relative_position_range(plan)
    deltas = [d - low for d, low in zip(relative_positions(plan), lows)]
    return _Geometry(
        plan,
        torch.from_numpy(query_indices(plan)).to(device),
        torch.from_numpy(window_indices(plan)).to(device),
        torch.from_numpy(deltas[0] * spans[1] + deltas[1]).to(device),
        tuple(lows),
    )


class ConvAttention(nn.Module):
    """Relative-positional multi-head self-attention that equals a Conv2d at initialisation.

    Build it with ``ConvAttention.from_conv``. Input and output are NCHW, like the Conv's.
    Trainable: ``w_q``, ``w_k`` ``[heads, features, key_dim]``, ``gate`` ``[heads]``,
    ``position_bias`` ``[heads, span_rows, span_cols]``, ``w_o`` and ``bias`` (section 3's
    shapes).
    """

    def __init__(
        self,
        plan: AttentionPlan,
        weight: np.ndarray,
        bias: np.ndarray | None,
        padding_mode: str = "zeros",
        explicit_padding: tuple[int, int] = (0, 0),
        key_dim: int = KEY_DIM,
        alpha: float = TRAINABLE_ALPHA,
    ):
        super().__init__()
        if plan.spec.rank != 2:
            raise ValueError("ConvAttention handles 2-D convolutions")
        # A head whose W_Q and W_K train may attend anywhere, so it keeps every feature of
        # its keys: the ONNX emission's narrowed values hold only what the one-hot
        # construction reads.
        plan = replace(plan, narrow_values=False)
        self.plan = plan
        self.padding_mode = padding_mode
        self.explicit_padding = tuple(explicit_padding)
        self.key_dim = key_dim
        self.alpha = alpha
        self._other_sizes: dict[tuple[int, ...], _Geometry] = {}
        dtype = torch.float16 if weight.dtype == np.float16 else torch.float32
        features = plan.in_dim
        # random like any attention layer's (torch's global generator, as nn.Linear)
        scale = features**-0.5
        self.w_q = nn.Parameter((torch.randn(plan.heads, features, key_dim) * scale).to(dtype))
        self.w_k = nn.Parameter((torch.randn(plan.heads, features, key_dim) * scale).to(dtype))
        self.gate = nn.Parameter(torch.zeros(plan.heads, dtype=dtype))
        table, lows = quadratic_encoding(plan, alpha)
        self.table_lows = tuple(lows)
        self.position_bias = nn.Parameter(torch.from_numpy(table).to(dtype))
        self.w_o = nn.Parameter(torch.from_numpy(output_projection(plan, weight)))
        self.bias = nn.Parameter(torch.from_numpy(output_bias(plan, bias, weight.dtype)))
        # the indices at the plan's own size come with the first input of that size: a
        # layer read from a dynamic model is planned for a nominal size it may never see,
        # where global attention's [queries, keys] indices can be gigabytes
        self.register_buffer("query_index", None, False)
        self.register_buffer("key_index", None, False)
        self.register_buffer("bias_index", None, False)
        # what the report shows each head next to: the Conv's mean |weight| per tap
        kernel = np.abs(weight.astype(np.float32)).mean(axis=(0, 1))
        self.register_buffer("source_kernel", torch.from_numpy(kernel), False)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        input_size: Sequence[int],
        patch: str | int | Sequence[int] = "auto",
        attention: str = "global",
        block: str | int | Sequence[int] = "auto",
        key_dim: int = KEY_DIM,
        plan: AttentionPlan | None = None,
        alpha: float = TRAINABLE_ALPHA,
    ) -> ConvAttention:
        """The attention equal to ``conv`` on inputs of spatial size ``input_size``.

        ``patch`` and ``block`` are ``"auto"`` (the cost model's choice), an int or a pair;
        ``attention`` is ``"global"`` or ``"local"``; a ``plan`` given overrides all three.
        ``alpha`` scales the initial quadratic encoding: lower is softer (larger gradients
        through the softmax) and less exact (a neighbour leaks ``exp(-alpha)``).
        """
        if plan is None:
            plan = plan_for(conv, input_size, patch, attention, block)
        weight = conv.weight.detach().cpu().numpy()
        bias = None if conv.bias is None else conv.bias.detach().cpu().numpy()
        layer = cls(
            plan,
            weight,
            bias,
            conv.padding_mode,
            _explicit_padding(conv) if conv.padding_mode != "zeros" else (0, 0),
            key_dim,
            alpha,
        )
        return layer.to(conv.weight.device)

    def attention_parameters(self) -> list[nn.Parameter]:
        """What shapes the attention: the query and key projections, the gates and the
        position biases (W_O and the bias are the value path)."""
        return [self.w_q, self.w_k, self.gate, self.position_bias]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Forget the Conv: initialise as a generic attention layer would be (ViT-style
        small random W_Q, W_K and position bias; gates at 0.5, so content and position
        both attend; fan-in scaled W_O; zero bias)."""
        plan = self.plan
        with torch.no_grad():
            for weight in (self.w_q, self.w_k):
                weight.copy_(torch.randn(weight.shape, generator=generator) * plan.in_dim**-0.5)
            self.position_bias.copy_(
                torch.randn(self.position_bias.shape, generator=generator) * 0.02
            )
            self.gate.fill_(0.5)
            # attend-first sums heads * Dg_in products per output, project-first the same
            fan_in = self.w_o.shape[1] * (1 if plan.order is Order.ATTEND_FIRST else plan.heads)
            self.w_o.copy_(torch.randn(self.w_o.shape, generator=generator) * fan_in**-0.5)
            self.bias.zero_()

    def extra_repr(self) -> str:
        p = self.plan
        return (
            f"{p.spec.in_channels}->{p.spec.out_channels}, kernel={p.spec.kernel}, "
            f"attention={p.attention.value}, patch={p.patch}, heads={p.heads}, "
            f"tokens={p.token_grid}, order={p.order.value}"
        )

    def _tokens(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Padded input -> ``[B, tokens, groups, group features]`` (weights' layouts)."""
        spec = plan.spec
        if self.padding_mode != "zeros":
            rows, cols = self.explicit_padding
            x = functional.pad(x, (cols, cols, rows, rows), mode=self.padding_mode)
        if plan.subsamples:
            source = plan.source
            steps = plan.input_steps
            pads = []
            for axis in (1, 0):
                on = steps[axis] > 1
                pads += [source.pads_begin[axis] if on else 0, source.pads_end[axis] if on else 0]
            x = functional.pad(x, pads)
            out = source.output_size
            x = x[
                :,
                :,
                : (out[0] - 1) * steps[0] + 1 : steps[0],
                : (out[1] - 1) * steps[1] + 1 : steps[1],
            ]
        rows, cols = plan.axes
        x = x[:, :, : rows.input_kept, : cols.input_kept]
        x = functional.pad(
            x, (cols.zeros_before, cols.zeros_after, rows.zeros_before, rows.zeros_after)
        )
        batch = x.shape[0]
        group = spec.group
        x = x.reshape(
            batch,
            group,
            spec.in_channels // group,
            rows.tokens,
            rows.in_patch,
            cols.tokens,
            cols.in_patch,
        )
        # features (y, x, c) channels-last, else (c, y, x)
        order = (0, 3, 5, 1, 4, 6, 2) if plan.channels_last else (0, 3, 5, 1, 2, 4, 6)
        x = x.permute(*order)
        return x.reshape(batch, plan.tokens, group, plan.group_in_dim)

    def _geometry(self, size: tuple[int, ...]) -> _Geometry:
        """The geometry at input size ``size``: the built one, or computed (and kept) for
        another size; the weights do not depend on it (``docs/design.md`` section 7)."""
        plan = self.plan
        built = plan.source.input_size if plan.source is not None else plan.spec.input_size
        # the geometry's input is after a padding mode's own padding
        size = tuple(n + 2 * p for n, p in zip(size, self.explicit_padding))
        if size == tuple(built):
            if self.bias_index is None:
                own = _geometry(plan, self.position_bias.device)
                self.query_index, self.key_index = own.query_index, own.key_index
                self.bias_index = own.bias_index
            return _Geometry(
                plan, self.query_index, self.key_index, self.bias_index, self.table_lows
            )
        if size not in self._other_sizes:
            source = plan.source or plan.spec
            local = plan.attention is Attention.LOCAL
            try:
                other = plan_attention(
                    replace(source, input_size=size),
                    plan.patch,
                    plan.order,
                    plan.attention,
                    plan.block if local else None,
                    plan.grid,
                    plan.strided_queries,
                    narrow_values=False,
                )
            except GeometryError as error:
                raise ValueError(f"input size {list(size)}: {error}") from None
            self._other_sizes[size] = _geometry(other, self.position_bias.device)
        return self._other_sizes[size]

    def _position_table(self, g: _Geometry) -> torch.Tensor:
        """The position bias over ``g``'s relative positions: the trained table where it
        reaches, the initial quadratic encoding beyond it."""
        if g.lows == self.table_lows and g.plan is self.plan:
            return self.position_bias
        fresh, _ = quadratic_encoding(g.plan, self.alpha)
        table = torch.from_numpy(fresh).to(self.position_bias)
        spans = self.position_bias.shape[1:]
        target, source = [slice(None)], [slice(None)]
        for low, new_low, span, new_span in zip(self.table_lows, g.lows, spans, fresh.shape[1:]):
            start, stop = max(low, new_low), min(low + span, new_low + new_span)
            target.append(slice(start - new_low, max(stop - new_low, start - new_low)))
            source.append(slice(start - low, max(stop - low, start - low)))
        table[tuple(target)] = self.position_bias[tuple(source)]
        return table

    def _positional(self, g: _Geometry) -> torch.Tensor:
        """P: the softmax of the position biases, [heads, q, k] in float32."""
        position = self._position_table(g).reshape(g.plan.heads, -1)[:, g.bias_index]
        return torch.softmax(position.float(), dim=-1)

    def _attention(self, tokens: torch.Tensor, g: _Geometry) -> torch.Tensor:
        """A = P + gate * (C - P) for tokens [B, N, g, Dg]: [B, blocks, heads, q, k]."""
        plan = g.plan
        flat = tokens.reshape(tokens.shape[0], plan.tokens, plan.in_dim)
        q = torch.einsum("bnqf,hfd->bnhqd", flat[:, g.query_index], self.w_q)
        k = torch.einsum("bnkf,hfd->bnhkd", flat[:, g.key_index], self.w_k)
        content = torch.einsum("bnhqd,bnhkd->bnhqk", q, k).float() / math.sqrt(self.key_dim)
        content = torch.softmax(content, dim=-1)
        positional = self._positional(g)
        gate = self.gate.float().reshape(-1, 1, 1)
        return positional + gate * (content - positional)

    @torch.no_grad()
    def attention_statistics(self, x: torch.Tensor) -> dict:
        """How far the attention has moved from the Conv, on inputs ``x``: per head the
        gate; ``off_convolution``, the mean total variation distance between the attention
        and the Conv's (one key, at the head's offset), which for a gate in [0, 1] is the
        share of attention mass off the Conv's key (a gate may leave [0, 1]: the layer
        stays exact at 0 and trains freely); and the mean attention per relative position
        (``maps`` [heads, span_rows, span_cols], lowest offsets ``lows``)."""
        g = self._geometry(tuple(x.shape[2:]))
        attention = self._attention(self._tokens(x, g.plan), g)
        heads = g.plan.heads
        spans = self._position_table(g).shape[1:]
        # the Conv's attention: each head's one key at its offset (section 2)
        taps = [(o[0] - g.lows[0]) * spans[1] + o[1] - g.lows[1] for o in g.plan.head_offsets]
        taps = torch.tensor(taps, device=g.bias_index.device).reshape(-1, 1, 1)
        convolution = (g.bias_index.unsqueeze(0) == taps).float()  # [h, q, k]
        # total variation distance; for gates in [0, 1] the mass off the Conv's key
        moved = 0.5 * (attention - convolution).abs().sum(dim=-1)  # [B, blocks, h, q]
        per_query = attention.mean(dim=(0, 1)).reshape(heads, -1)  # [h, q * k]
        maps = torch.zeros(heads, spans[0] * spans[1], dtype=per_query.dtype)
        maps.index_add_(1, g.bias_index.reshape(-1).cpu(), per_query.cpu())
        maps /= g.bias_index.shape[0]  # mean over queries: each row sums to 1
        return {
            "gates": self.gate.float().cpu().tolist(),
            "off_convolution": moved.mean(dim=(0, 1, 3)).cpu().tolist(),
            "maps": maps.reshape(heads, *spans).numpy(),
            "lows": g.lows,
            "offsets": [tuple(int(v) for v in o) for o in g.plan.head_offsets],
            "kernel": self.source_kernel.cpu().numpy(),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._geometry(tuple(x.shape[2:]))
        plan, spec = g.plan, g.plan.spec
        batch = x.shape[0]
        tokens = self._tokens(x, plan)  # [B, N, g, Dg]
        weights = self._attention(tokens, g).to(tokens.dtype)  # [B, blocks, h, q, k]

        values = tokens[:, g.key_index]  # [B, blocks, k, g, Dg]
        group = spec.group
        if plan.order is Order.ATTEND_FIRST:
            attended = torch.einsum("bnhqk,bnkgf->bnqghf", weights, values)
            attended = attended.reshape(*attended.shape[:4], plan.heads * plan.group_in_dim)
            out = torch.einsum("bnqgi,gio->bnqgo", attended, self.w_o)
        else:
            projected = torch.einsum("bnkgf,gfo->bnkgo", values, self.w_o)
            projected = projected.reshape(*projected.shape[:4], plan.heads, plan.group_out_dim)
            out = torch.einsum("bnhqk,bnkgho->bnqgo", weights, projected)
        out = out + self.bias.reshape(group, plan.group_out_dim)

        rows, cols = plan.axes
        cg_out = spec.out_channels // group
        # [B, blocks_r, blocks_c, block_r, block_c, g, ...] -> query grid
        out = out.reshape(batch, rows.blocks, cols.blocks, rows.block, cols.block, group, -1)
        out = out.permute(0, 1, 3, 2, 4, 5, 6)
        if plan.channels_last:  # (u, v, co)
            out = out.reshape(
                batch, rows.queries, cols.queries, group, rows.patch, cols.patch, cg_out
            )
            out = out.permute(0, 3, 6, 1, 4, 2, 5)
        else:  # (co, u, v)
            out = out.reshape(
                batch, rows.queries, cols.queries, group, cg_out, rows.patch, cols.patch
            )
            out = out.permute(0, 3, 4, 1, 5, 2, 6)
        out = out.reshape(
            batch, spec.out_channels, rows.queries * rows.patch, cols.queries * cols.patch
        )
        return out[:, :, : rows.output, : cols.output]


def convert_module(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    patch: str | int | Sequence[int] = "auto",
    attention: str = "global",
    block: str | int | Sequence[int] = "auto",
    max_param_growth: float = 4.0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    key_dim: int = KEY_DIM,
    alpha: float = TRAINABLE_ALPHA,
    grid: str = "auto",
    queries: str = "auto",
) -> nn.Module:
    """A copy of ``model`` with every selected ``nn.Conv2d`` replaced by ``ConvAttention``.

    ``example_input`` fixes each Conv's input size (one forward pass, recorded by hooks).
    ``include``/``exclude`` are glob patterns over module names (``layer1.*``). With
    ``patch="auto"`` patches are chosen per layer by the ONNX converter's cost model under
    the same whole-model parameter budget (``max_param_growth``); ``grid`` and
    ``queries`` as in ``conv2attn.convert`` (``fixed``: Li et al.'s token grid;
    ``strided``: strided Convs' queries every stride pixels), except that ``grid="auto"``
    chooses per Conv: a module does not show which Convs follow each other, so each is a
    stretch of its own. ``model`` is unchanged.
    """
    converted = copy.deepcopy(model)
    convs = {
        name: module
        for name, module in converted.named_modules()
        if isinstance(module, nn.Conv2d) and selection_reason(name, include, exclude) is None
    }
    if not convs:
        raise ValueError("the model has no selected nn.Conv2d; nothing to convert")
    sizes: dict[str, tuple[int, int]] = {}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            sizes.setdefault(name, tuple(args[0].shape[2:]))

        return record

    hooks = [module.register_forward_pre_hook(recorder(name)) for name, module in convs.items()]
    try:
        with torch.no_grad():
            inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
            converted(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    unused = [name for name in convs if name not in sizes]
    if unused:
        raise ValueError(f"Conv2d {unused[0]} did not run on the example input")
    names = list(convs)
    specs = [conv_spec(convs[name], sizes[name]) for name in names]
    plans = _plans(specs, names, patch, attention, block, max_param_growth, grid, queries).plans
    for name, plan in zip(names, plans):
        layer = ConvAttention.from_conv(
            convs[name], sizes[name], key_dim=key_dim, plan=plan, alpha=alpha
        )
        parent_name, _, child = name.rpartition(".")
        parent = converted.get_submodule(parent_name) if parent_name else converted
        setattr(parent, child, layer)
    return converted


def attention_summary(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """``attention_statistics`` of every ``ConvAttention`` of ``model`` on inputs ``x``
    (each layer sees what the model feeds it), with the layer's name and plan, in the
    order the model runs them: what ``trained_report`` draws."""
    inputs: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ConvAttention)}
    named = getattr(model, "named_layers", None)
    if callable(named):  # a model from torch_graph.load_trainable: name layers by Conv
        by_module = {id(layer): conv for conv, layer in named()}
        layers = {by_module.get(id(m), name): m for name, m in layers.items()}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args[0].detach())

        return record

    hooks = [m.register_forward_pre_hook(recorder(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    summary = []
    for name in inputs:  # run order
        layer = layers[name]
        plan = layer.plan
        summary.append(
            {
                "name": name,
                "heads": plan.heads,
                "patch": list(plan.patch),
                "strided_queries": plan.strided_queries,
                "attention": plan.attention.value,
                **layer.attention_statistics(inputs[name]),
            }
        )
    return summary
