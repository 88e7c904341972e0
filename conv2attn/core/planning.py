"""The plan of every converted Conv of a model, chosen once for every front end.

``plan_layers`` is the one place that turns the user's patch, block and attention
choices into per-Conv plans: a forced patch takes each Conv's cheapest plan with that
patch; ``auto`` takes the cheapest plans whose parameters stay within the whole-model
growth budget (``geometry.choose_plans``). Attention ``auto`` lets each Conv's global
and local plans compete in the same choice, and grid ``auto`` its shifted-grid and
fixed-grid plans, and queries ``auto`` a strided Conv's plans with and without strided
queries. Where the caller knows which Convs follow each other (``Stretches``), grid
``auto`` picks one grid per stretch of consecutive layers: the grid whose plans cost least
together, less the shuffles that tokens flowing between them save
(``geometry.flow_saving``). The ONNX pass and the PyTorch layer both call it, so a
converted ONNX model and a converted ``nn.Module`` get the same plans for the same
stretches (a module does not show how its Convs connect: each is a stretch of its own).
Plain Python: no onnx, numpy or torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from conv2attn.core.geometry import (
    TRAFFIC_COST,
    Attention,
    AttentionPlan,
    ConvSpec,
    GeometryError,
    Grid,
    Order,
    auto_patches,
    best_plan,
    candidate_plans,
    choose_plans,
    flow_saving,
    has_phase,
    trim_plan_cache,
)

# "auto", or sizes: one for every spatial axis, or one per axis.
Sizes = tuple[int, ...] | str


class AttentionChoice(str, Enum):
    """What the user asks for: one attention for every Conv, or per Conv by the cost
    model (a plan itself is always global or local)."""

    GLOBAL = "global"
    LOCAL = "local"
    AUTO = "auto"

    def modes(self) -> list[Attention]:
        return [Attention.GLOBAL, Attention.LOCAL] if self is self.AUTO else [Attention(self)]


class GridChoice(str, Enum):
    """The token grid asked for: one for every Conv, or per Conv by the cost model."""

    SHIFTED = "shifted"
    FIXED = "fixed"
    AUTO = "auto"

    def grids(self) -> list[Grid]:
        return [Grid.SHIFTED, Grid.FIXED] if self is self.AUTO else [Grid(self)]


class QueryChoice(str, Enum):
    """Where a strided Conv's local attention puts its queries: on the tokens of its
    patches (input patch = stride x output patch), on one-pixel tokens every stride tokens
    (``strided``), or per Conv by the cost model."""

    PATCH = "patch"
    STRIDED = "strided"
    AUTO = "auto"

    def keep(self, plans: list[AttentionPlan]) -> list[AttentionPlan]:
        """The candidates this choice allows: ``strided`` keeps a Conv's strided plans
        (and its global ones) where it has any, ``patch`` drops them."""
        if self is QueryChoice.PATCH:
            return [p for p in plans if not p.strided_queries]
        if self is QueryChoice.STRIDED and any(p.strided_queries for p in plans):
            return [p for p in plans if p.strided_queries or p.attention is Attention.GLOBAL]
        return plans


@dataclass(frozen=True)
class Stretches:
    """How a model's Convs meet. ``links``: (producer, consumer) pairs where the consumer
    reads the producer's output through elementwise operations only (activations, gates,
    residual ``Add``, per-channel scales), so tokens can flow between them; ``of[i]``:
    the stretch of Conv i, the Convs joined to it by links or by reading the same feature
    map (consecutive layers that could share one token grid). Without them every Conv is
    a stretch of its own."""

    of: Sequence[int] = ()
    links: Sequence[tuple[int, int]] = ()

    def members(self, layers: int) -> list[list[int]]:
        """The layers of each stretch, stretches in the order of their first layer."""
        grouped: dict[int, list[int]] = defaultdict(list)
        for index in range(layers):
            grouped[self.of[index] if index < len(self.of) else -1 - index].append(index)
        return sorted(grouped.values(), key=lambda members: members[0])


class PlanError(GeometryError):
    """An option that does not fit a Conv (a patch with the wrong number of axes)."""


@dataclass(frozen=True)
class LayerPlans:
    """The chosen plan per Conv, every plan each was chosen from, and whether the
    parameter budget held (always true for a forced patch)."""

    plans: list[AttentionPlan]
    considered: list[list[AttentionPlan]]
    budget_met: bool

    @property
    def growth(self) -> float:
        """Parameters of the chosen plans over the original Convs'."""
        before = sum((p.source or p.spec).params for p in self.plans)
        return sum(p.params for p in self.plans) / max(before, 1)


def per_axis(sizes: Sizes, rank: int, option: str, name: str) -> tuple[int, ...] | None:
    """``sizes`` for a Conv with ``rank`` spatial axes: None for ``auto``; one size is
    repeated on every axis."""
    if sizes == "auto":
        return None
    if len(sizes) == 1:
        return tuple(sizes) * rank
    if len(sizes) != rank:
        raise PlanError(
            f"{option} {'x'.join(map(str, sizes))} has {len(sizes)} sizes, "
            f"Conv '{name}' has {rank} spatial axes"
        )
    return tuple(sizes)


def plan_layers(
    specs: Sequence[ConvSpec],
    names: Sequence[str],
    *,
    attention: Attention | AttentionChoice | str = Attention.GLOBAL,
    patch: Sizes = "auto",
    block: Sizes = "auto",
    max_param_growth: float = 4.0,
    attend_first: Sequence[bool] = (),
    grid: Grid | GridChoice | str = GridChoice.AUTO,
    fixed_grid_unfit: Sequence[str | None] = (),
    queries: QueryChoice | str = QueryChoice.AUTO,
    explicit_attention: Sequence[bool] = (),
    stretches: Stretches | None = None,
    narrow_values: bool = True,
    rows_first: Sequence[bool] = (),
) -> LayerPlans:
    """Plans for the Convs ``specs`` (named ``names``, for errors), chosen together.
    ``attend_first[i]``: layer i can only attend first (an integer Conv selects its
    tokens, then projects them). ``attention`` ``auto``: each Conv's cheapest plan
    over both modes (``block`` then applies to its local plans); ``grid`` ``auto``
    likewise over both grids. ``fixed_grid_unfit[i]``: why layer i has no fixed grid
    (its begin pad changes with a dynamic input size), or None. ``queries``: where strided
    Convs' local attention puts its queries (``QueryChoice``). ``explicit_attention[i]``:
    layer i's emission keeps the attention product with whole heads (the standard operator
    form, an integer Conv), so its plans are priced without folding the heads into W_O or
    narrowing their values. ``narrow_values`` False keeps every global head whole (the
    GPU form: a GPU runs a few large products faster than one per head).
    ``rows_first[i]``: whether layer i's emission may gather window rows first
    (``AttentionPlan.gathers_rows_first``: the CPU emission of a static shape; all may
    where the list is empty).
    ``stretches``: which Convs feed each other (``Stretches``); grid ``auto`` then takes
    one grid per stretch (``_plan_stretches``)."""
    modes = AttentionChoice(attention).modes()
    query_choice = QueryChoice(queries)
    choice = GridChoice(grid)
    considered = []
    for index, (spec, name) in enumerate(zip(specs, names, strict=True)):
        forced = per_axis(patch, spec.rank, "--patch", name)
        blocks = per_axis(block, spec.rank, "--block", name)
        grids = choice.grids()
        unfit = fixed_grid_unfit[index] if index < len(fixed_grid_unfit) else None
        if unfit is not None:
            if choice is GridChoice.FIXED:
                raise PlanError(
                    f"Conv '{name}' has no fixed token grid: {unfit}; "
                    "use --grid shifted or auto, or pin the size with --input-shape"
                )
            grids = [Grid.SHIFTED]
        patches = {kind: None if forced is None else [forced] for kind in grids}
        if len(grids) > 1:  # a shifted plan without a phase is its fixed twin: plan one
            tried = patches[Grid.SHIFTED] or auto_patches(spec)
            patches[Grid.SHIFTED] = [p for p in tried if has_phase(spec, p)]
        plans = [
            plan
            for mode in modes
            for kind in grids
            if patches[kind] != []
            for plan in candidate_plans(
                spec,
                mode,
                patches=patches[kind],
                block=blocks if mode is Attention.LOCAL else None,
                grid=kind,
                fold_heads=not (index < len(explicit_attention) and explicit_attention[index]),
                narrow_values=narrow_values,
                rows_first=rows_first[index] if index < len(rows_first) else True,
            )
        ]
        if len(grids) > 1:  # strided queries (one-pixel tokens) have no phase either
            plans = [p for p in plans if p.grid is Grid.FIXED or not p.grid_aligned]
        if index < len(attend_first) and attend_first[index]:
            plans = [p for p in plans if p.order is Order.ATTEND_FIRST]
        considered.append(query_choice.keep(plans))
    # Candidates are cached so that repeated Convs are planned once; a large model's many
    # plans must not outlive its planning (``considered`` keeps what is chosen from).
    trim_plan_cache()
    start = _plan_stretches(considered, choice.grids(), stretches or Stretches())
    if patch != "auto":
        return LayerPlans(start, considered, True)
    original = sum(spec.params for spec in specs)
    plans, met = choose_plans(considered, original, max_param_growth, start)
    return LayerPlans(plans, considered, met)


def _on_grid(plans: list[AttentionPlan], grid: Grid) -> list[AttentionPlan]:
    """The plans on ``grid`` (a plan without a phase is on both); all of them where the
    layer has none there (a Conv with no fixed grid)."""
    kept = [p for p in plans if p.grid is grid or p.grid_aligned]
    return kept or plans


def _plan_stretches(
    considered: list[list[AttentionPlan]], grids: list[Grid], stretches: Stretches
) -> list[AttentionPlan]:
    """Each layer's starting plan, stretch by stretch: a stretch tries each of ``grids``
    and keeps the one whose plans cost least together, less what tokens flowing along
    its links save (the fixed grid on a tie); ``considered`` is narrowed to the plans on
    the grid kept. A link to a layer of another stretch is priced with that layer's
    current plan (its own cheapest until its stretch is chosen)."""
    chosen = [best_plan(layer) for layer in considered]
    if len(grids) == 1:
        return chosen
    for members in stretches.members(len(considered)):
        outcome = None
        for grid in grids:
            lists = {i: _on_grid(considered[i], grid) for i in members}
            total, plans = _priced(lists, chosen, stretches.links)
            # an exact tie goes to the fixed grid, as between two plans (``best_plan``)
            key = (total, grid is Grid.SHIFTED)
            if outcome is None or key < outcome[0]:
                outcome = (key, lists, plans)
        assert outcome is not None
        _, lists, plans = outcome
        for index in members:
            considered[index] = lists[index]
            chosen[index] = plans[index]
    return chosen


def _priced(
    lists: dict[int, list[AttentionPlan]],
    chosen: list[AttentionPlan],
    links: Sequence[tuple[int, int]],
) -> tuple[float, dict[int, AttentionPlan]]:
    """Each layer's cheapest plan of ``lists``, and their total: their costs less the
    flow savings of the links that touch them (other layers keep their ``chosen``
    plans)."""
    plans = {index: best_plan(options) for index, options in lists.items()}
    saved = sum(
        flow_saving(plans.get(producer, chosen[producer]), plans.get(consumer, chosen[consumer]))
        for producer, consumer in links
        if producer in plans or consumer in plans
    )
    return sum(plan.cost for plan in plans.values()) - TRAFFIC_COST * saved, plans
