"""The plan file: which KV heads of which layer keep the full cache, stream, or run a prefill method.

A plan is JSON (``version`` 1)::

    {"version": 1,
     "model": "smollm2-135m",
     "shapes": {"layers": 30, "heads": 9, "heads_kv": 3, "head_dim": 64},
     "calibrator": {"name": "razor", "params": {"budget": 0.125, ...}},
     "layers": [
        {"groups": [{"heads": [0], "policy": "full", "params": {}},
                    {"heads": [1, 2], "policy": "streaming", "params": {"sinks": 4, "window": 124,
                                                                          "compensation": true}}]},
        ...]}

Each layer lists groups of **KV head** indices covering every KV head exactly once. A group has
either a ``policy`` (``full``: the head keeps every token; ``streaming``: it keeps ``sinks`` +
``window`` tokens, plus one compensation token with ``compensation``; ``snapkv``: it keeps the
``budget`` tokens its last ``observe`` queries attend to most; ``novelty``: it keeps ``budget`` tokens chosen
from the keys alone, the least duplicated, :mod:`attnzoo.cache.novelty`, plus one mean token of what it
evicted with ``compensate``) or a ``method`` (a registered
attention method and its params, run at prefill on the query heads sharing those KV heads).
Groups of one layer may differ in params (each KV head its own window or budget).

:meth:`Plan.apply_plan` gives the per-head dict :func:`attnzoo.hf.apply` resolves and
:meth:`Plan.cache_layers` the per-layer ``heads`` policies (:mod:`attnzoo.cache.heads`) that
:func:`attnzoo.hf.make_cache` builds; both accept a :class:`Plan` directly. A plan whose groups are
all ``full`` or methods (a prefill plan) needs no cache policy (:attr:`Plan.needs_cache`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AttnZooError

VERSION = 1
POLICIES = ("full", "streaming", "snapkv", "novelty")
SHAPE_KEYS = ("layers", "heads", "heads_kv", "head_dim")
#: the parameters of a streaming group and their defaults (the ``razor`` cache policy's)
STREAMING_PARAMS = {"sinks": 4, "window": 512, "compensation": True}
#: parameters a snapkv group may set (the ``snapkv`` cache policy's; its defaults apply)
SNAPKV_PARAMS = ("budget", "observe", "pool")
#: parameters a novelty group may set (the ``novelty`` cache policy's; its defaults apply)
NOVELTY_PARAMS = ("budget", "sinks", "recent", "pool", "exclude", "rope", "interval", "compensate")


@dataclass(frozen=True)
class Group:
    """KV heads of one layer and what they do: a cache ``policy`` or a prefill ``method``."""

    heads: tuple[int, ...]
    policy: str | None = None
    method: str | None = None
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        kind = {"policy": self.policy} if self.policy is not None else {"method": self.method}
        return {"heads": list(self.heads), **kind, "params": dict(self.params)}


@dataclass(frozen=True)
class Plan:
    """A validated plan (see the module docstring); build with :func:`load`, :func:`from_dict` or directly."""

    model: str
    shapes: dict
    layers: tuple[tuple[Group, ...], ...]
    calibrator: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    # --- what each head does -------------------------------------------------------------------
    def kind(self, layer: int, kv_head: int) -> str:
        """``full``, ``streaming`` or the method name of one KV head."""
        g = next(g for g in self.layers[layer] if kv_head in g.heads)
        return g.policy or g.method

    def kv_fraction(self, length: int) -> float:
        """Mean share of ``length`` tokens the KV heads hold (streaming: sinks + window + compensation)."""
        held = 0
        for groups in self.layers:
            for g in groups:
                held += len(g.heads) * _held(g, length)
        return held / (length * self.shapes["layers"] * self.shapes["heads_kv"])

    # --- what attnzoo.hf consumes ------------------------------------------------------------------
    def apply_plan(self) -> dict:
        """The per-layer / per-query-head plan for :func:`attnzoo.hf.apply` (policy groups run ``exact``)."""
        per = self.shapes["heads"] // self.shapes["heads_kv"]
        out: dict = {}
        for i, groups in enumerate(self.layers):
            entries = ["exact"] * self.shapes["heads"]
            for g in groups:
                if g.method is not None:
                    for kv in g.heads:
                        entries[kv * per:(kv + 1) * per] = [(g.method, dict(g.params))] * per
            out[i] = entries if len(set(map(repr, entries))) > 1 else entries[0]
        return out

    @property
    def needs_cache(self) -> bool:
        """Whether some KV head holds less than everything (a cache plan rather than a prefill plan)."""
        return any(g.policy not in (None, "full") for groups in self.layers for g in groups)

    def cache_layers(self) -> list[tuple[str, dict]]:
        """Per layer, the cache policy and params: ``full``, or ``heads`` with one group per plan group."""
        out = []
        for i, groups in enumerate(self.layers):
            if any(g.method is not None for g in groups):
                raise AttnZooError(f"plan layer {i}: groups run prefill methods, which a KV cache cannot read "
                                   "through; make_cache takes plans whose groups are all cache policies")
            if all(g.policy == "full" for g in groups):
                out.append(("full", {}))
                continue
            out.append(("heads", {"groups": tuple((g.heads, *_cache_policy(g)) for g in groups)}))
        return out

    def check_model(self, model) -> None:
        """Refuse a model whose shapes differ from the plan's (naming each difference)."""
        got = model_shapes(model)
        diff = [f"{k} {self.shapes[k]} (model: {got[k]})" for k in SHAPE_KEYS if got[k] != self.shapes[k]]
        if diff:
            raise AttnZooError(f"plan for {self.model!r} does not fit this model: plan shapes {', '.join(diff)}")

    # --- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": VERSION, "model": self.model, "shapes": dict(self.shapes), "calibrator": self.calibrator,
                "layers": [{"groups": [g.to_dict() for g in groups]} for groups in self.layers]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _held(g: Group, length: int) -> int:
    if g.policy == "streaming":
        p = {**STREAMING_PARAMS, **g.params}
        return min(length, p["sinks"] + p["window"]) + int(bool(p["compensation"]) and p["sinks"] + p["window"] < length)
    if g.policy == "novelty":
        return min(length, g.params["budget"]) + int(g.params.get("compensate", "none") != "none"
                                                     and g.params["budget"] < length)
    if g.policy == "snapkv":
        return min(length, g.params["budget"])
    return length


def _cache_policy(g: Group) -> tuple[str, dict]:
    """The cache policy name and params that run one policy group."""
    if g.policy == "streaming":
        p = {**STREAMING_PARAMS, **g.params}
        return "streaming", {"sinks": p["sinks"], "window": p["window"], "compensate": bool(p["compensation"])}
    return g.policy, dict(g.params)


def _validate(plan: Plan) -> None:
    from .. import registry
    from ..cache import make_policy

    shapes = plan.shapes
    if not isinstance(plan.model, str):
        raise AttnZooError(f"plan: 'model' expected a name (str), got {plan.model!r}")
    if not isinstance(shapes, dict) or sorted(shapes) != sorted(SHAPE_KEYS) or not all(
            isinstance(shapes[k], int) and not isinstance(shapes[k], bool) and shapes[k] > 0 for k in SHAPE_KEYS):
        raise AttnZooError(f"plan: 'shapes' expected positive ints for {', '.join(SHAPE_KEYS)}, got {shapes!r}")
    if shapes["heads"] % shapes["heads_kv"]:
        raise AttnZooError(f"plan: shapes heads ({shapes['heads']}) must be a multiple of heads_kv "
                           f"({shapes['heads_kv']})")
    if len(plan.layers) != shapes["layers"]:
        raise AttnZooError(f"plan: 'layers' expected {shapes['layers']} entries (shapes.layers), got "
                           f"{len(plan.layers)}; missing layers {list(range(len(plan.layers), shapes['layers']))}"
                           if len(plan.layers) < shapes["layers"] else
                           f"plan: 'layers' expected {shapes['layers']} entries (shapes.layers), got {len(plan.layers)}")
    for i, groups in enumerate(plan.layers):
        seen: list[int] = []
        for g in groups:
            where = f"plan layer {i} heads {list(g.heads)}"
            if (g.policy is None) == (g.method is None):
                raise AttnZooError(f"{where}: expected exactly one of 'policy' ({'/'.join(POLICIES)}) or 'method'")
            if not isinstance(g.params, dict):
                raise AttnZooError(f"{where}: 'params' expected a dict, got {g.params!r}")
            if g.policy is not None:
                if g.policy not in POLICIES:
                    raise AttnZooError(f"{where}: unknown policy {g.policy!r} (expected one of {', '.join(POLICIES)})")
                allowed = {"full": (), "streaming": STREAMING_PARAMS, "snapkv": SNAPKV_PARAMS,
                           "novelty": NOVELTY_PARAMS}[g.policy]
                extra = sorted(set(g.params) - set(allowed))
                if extra:
                    raise AttnZooError(f"{where}: policy {g.policy!r} takes no parameter {extra[0]!r} "
                                       f"(accepted: {', '.join(allowed) or 'none'})")
                if g.policy in ("snapkv", "novelty") and "budget" not in g.params:
                    raise AttnZooError(f"{where}: policy {g.policy!r} expected a 'budget' parameter (tokens held)")
                if g.policy != "full":
                    name, params = _cache_policy(g)
                    try:
                        make_policy(name, **params)
                    except AttnZooError as e:
                        raise AttnZooError(f"{where}: {e}") from None
            else:
                try:
                    registry.get(g.method, **g.params)
                except AttnZooError as e:
                    raise AttnZooError(f"{where}: {e}") from None
            for h in g.heads:
                if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < shapes["heads_kv"]:
                    raise AttnZooError(f"{where}: KV head {h!r} does not exist (expected 0..{shapes['heads_kv'] - 1})")
            seen += list(g.heads)
        if sorted(seen) != list(range(shapes["heads_kv"])):
            missing = sorted(set(range(shapes["heads_kv"])) - set(seen))
            twice = sorted({h for h in seen if seen.count(h) > 1})
            raise AttnZooError(f"plan layer {i}: groups must cover every KV head once; missing {missing}, "
                               f"repeated {twice}")


def from_dict(data: Any, *, source: str = "plan") -> Plan:
    """A :class:`Plan` from its JSON form; every problem raises AttnZooError naming the field."""
    if not isinstance(data, dict):
        raise AttnZooError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("version") != VERSION:
        raise AttnZooError(f"{source}: 'version' expected {VERSION}, got {data.get('version')!r}")
    missing = [k for k in ("model", "shapes", "layers") if k not in data]
    if missing:
        raise AttnZooError(f"{source}: missing field(s) {missing}")
    layers = data["layers"]
    if not isinstance(layers, list):
        raise AttnZooError(f"{source}: 'layers' expected a list, got {type(layers).__name__}")
    parsed = []
    for i, layer in enumerate(layers):
        groups = layer.get("groups") if isinstance(layer, dict) else None
        if not isinstance(groups, list) or not groups:
            raise AttnZooError(f"{source}: layer {i} expected {{'groups': [...]}}, got {layer!r}")
        out = []
        for g in groups:
            if not isinstance(g, dict) or not isinstance(g.get("heads"), list):
                raise AttnZooError(f"{source}: layer {i} group expected {{'heads': [...], 'policy'|'method': ...}}, "
                                   f"got {g!r}")
            unknown = sorted(set(g) - {"heads", "policy", "method", "params"})
            if unknown:
                raise AttnZooError(f"{source}: layer {i} group has unknown field(s) {unknown}")
            out.append(Group(tuple(g["heads"]), g.get("policy"), g.get("method"), g.get("params", {})))
        parsed.append(tuple(out))
    return Plan(data["model"], data["shapes"], tuple(parsed), data.get("calibrator", {}))


def load(path: str | Path) -> Plan:
    """Read and validate a plan file."""
    path = Path(path)
    if not path.is_file():
        raise AttnZooError(f"plan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise AttnZooError(f"plan file {path} is not JSON ({e})") from None
    return from_dict(data, source=f"plan file {path}")


def is_plan_file(data: Any) -> bool:
    """Whether parsed JSON is a plan file (as opposed to an ``attnzoo.hf.apply`` dict)."""
    return isinstance(data, dict) and "version" in data and "layers" in data


def model_shapes(model) -> dict:
    """The ``shapes`` entry for a transformers model."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "heads": heads,
            "heads_kv": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def head_plan(model_name: str, shapes: dict, choices: list[list[tuple[str, str, dict]]], *,
              calibrator: dict | None = None) -> Plan:
    """A plan from one choice per (layer, KV head): ``(kind, name, params)``, kind ``policy`` or ``method``;
    the KV heads of a layer with equal choices share one group."""
    layers = []
    for row in choices:
        groups: dict[str, tuple[list[int], tuple]] = {}
        for h, choice in enumerate(row):
            groups.setdefault(json.dumps(choice, sort_keys=True), ([], choice))[0].append(h)
        layers.append(tuple(Group(tuple(heads), **{kind: name}, params=dict(params))
                            for heads, (kind, name, params) in groups.values()))
    return Plan(model_name, dict(shapes), tuple(layers), calibrator or {})


def split_plan(model_name: str, shapes: dict, full: list[list[int]], *, calibrator: dict | None = None,
               **streaming: Any) -> Plan:
    """A cache plan: per layer, the KV heads in ``full[layer]`` keep everything, the rest stream."""
    stream = ("policy", "streaming", {**STREAMING_PARAMS, **streaming})
    return head_plan(model_name, shapes, [[("policy", "full", {}) if h in heads else stream
                                           for h in range(shapes["heads_kv"])] for heads in full],
                     calibrator=calibrator)
