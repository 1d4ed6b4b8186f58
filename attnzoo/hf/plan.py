"""Attention plans: which attnzoo method runs on which layer and head (docs/methods.md, Attention plans).

A plan is resolved once, at :func:`attnzoo.hf.apply` time, into one
:class:`LayerSpec` per attention layer, so that every bad name, parameter,
layer index or head index is reported before the model runs.

Accepted forms (``method`` is a registered name, ``params`` a dict)::

    "sliding_window"                         every layer, every head
    {0: "exact", 3: ("sliding_window", {"window": 64})}      per layer
    {2: ["exact"] * 6 + [("sliding_window", {"window": 64})] * 6}   per head (one entry per query head)
    {"*": "sliding_window", 0: "exact"}      "*" = layers the plan does not name (default "exact")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import registry
from ..errors import AttnZooError

DEFAULT_KEY = "*"


@dataclass(frozen=True)
class HeadGroup:
    """One configured method and the query heads it runs on (``None`` = all heads)."""

    method: registry.Method
    heads: tuple[int, ...] | None = None

    def with_overrides(self, overrides: Mapping[str, Any]) -> HeadGroup:
        """This group with per-call parameter overrides (kwargs of ``model(...)``) applied and validated."""
        names = set(registry.param_names(type(self.method)))
        mine = {k: v for k, v in overrides.items() if k in names}
        if not mine:
            return self
        return HeadGroup(dataclasses.replace(self.method, **mine), self.heads)


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer runs: one or more head groups covering every query head once."""

    layer: int
    groups: tuple[HeadGroup, ...]
    num_heads: int

    @property
    def param_names(self) -> frozenset[str]:
        """Every parameter name of this layer's methods (the kwargs of ``model(...)`` they accept)."""
        return frozenset(n for g in self.groups for n in registry.param_names(type(g.method)))

    def describe(self) -> str:
        parts = []
        for g in self.groups:
            heads = "all heads" if g.heads is None else f"heads {list(g.heads)}"
            parts.append(f"{g.method!r} on {heads}")
        return f"layer {self.layer}: " + "; ".join(parts)


def _method(entry: Any, where: str, shared: Mapping[str, Any]) -> registry.Method:
    """A configured method from ``"name"`` or ``("name", {params})``."""
    if isinstance(entry, str):
        name, params = entry, {}
    elif isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], Mapping):
        name, params = entry
    else:
        raise AttnZooError(f"plan {where}: expected a method name or (name, params dict), got {entry!r}")
    try:
        return registry.get(name, **{**shared, **params})
    except AttnZooError as e:
        raise AttnZooError(f"plan {where}: {e}") from None


def _layer(entry: Any, layer: int, num_heads: int, shared: Mapping[str, Any]) -> LayerSpec:
    if isinstance(entry, (list, tuple)) and not (isinstance(entry, tuple) and len(entry) == 2
                                                 and isinstance(entry[0], str) and isinstance(entry[1], Mapping)):
        if len(entry) != num_heads:
            raise AttnZooError(f"plan layer {layer}: a per-head plan needs one entry per query head "
                               f"({num_heads}), got {len(entry)}")
        groups: list[tuple[registry.Method, list[int]]] = []  # grouped by equality (params may be unhashable)
        for h, e in enumerate(entry):
            method = _method(e, f"layer {layer} head {h}", shared)
            same = next((heads for m, heads in groups if m == method), None)
            if same is None:
                groups.append((method, [h]))
            else:
                same.append(h)
        if len(groups) == 1:
            return LayerSpec(layer, (HeadGroup(groups[0][0]),), num_heads)
        return LayerSpec(layer, tuple(HeadGroup(m, tuple(hs)) for m, hs in groups), num_heads)
    return LayerSpec(layer, (HeadGroup(_method(entry, f"layer {layer}", shared)),), num_heads)


def resolve(plan: str | Mapping, params: Mapping[str, Any], *, num_layers: int, num_heads: int) -> list[LayerSpec]:
    """One :class:`LayerSpec` per layer ``0..num_layers-1``; ``params`` apply to every method named."""
    if isinstance(plan, str):
        return [_layer(plan, i, num_heads, params) for i in range(num_layers)]
    if not isinstance(plan, Mapping):
        raise AttnZooError(f"plan: expected a method name or a dict {{layer: entry}}, got {type(plan).__name__}")
    if params:
        raise AttnZooError(f"plan: parameters {sorted(params)} given next to a plan; put them in the plan's "
                           "entries as (name, params)")
    default = plan.get(DEFAULT_KEY, "exact")
    for key in plan:
        if key == DEFAULT_KEY:
            continue
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < num_layers:
            raise AttnZooError(f"plan: layer {key!r} does not exist; the model has layers 0..{num_layers - 1}")
    return [_layer(plan.get(i, default), i, num_heads, {}) for i in range(num_layers)]
