"""What ``attnzoo eval`` puts on a task: ``prefill=<method>``, ``cache=<policy>`` or ``plan=<file>``.

* ``prefill=<method>``: the method runs the model's attention calls through :func:`attnzoo.hf.apply`; the
  KV cache is the ordinary full one. Generation steps of a dynamic sparse method run exact attention
  (``apply``'s ``decode="auto"``: one query cannot pay for its estimate); ``prefill=block_topk:decode=method``
  keeps the method on every step. The row's resolved parameters say which (``decode``: dense/method/mixed).
* ``cache=<policy>``: the model runs exact attention and the KV cache is
  :func:`attnzoo.hf.make_cache` with the policy: the prompt is compressed, generation reads through it.
  A budget is a number of tokens (``budget=256``) or a fraction of the context (``budget=0.125``);
  a fractional budget also scales the policy's sinks / local / window defaults (which are sized for
  long contexts) by the same ratio, so the policy is valid at every length.
* ``plan=<file>``: a JSON file: a per-layer / per-head plan (see :mod:`attnzoo.hf.plan`) handed to
  ``apply``; or ``{"plan": ..., "cache": {"policy": name, ...params}}`` to also set a cache policy; or a
  calibrated plan file (``attnzoo plan --out``, :mod:`attnzoo.plan.file`), which sets both (a plan of
  prefill methods only, e.g. ``minference``'s, keeps the ordinary full cache).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .. import registry
from ..cache.policy import make_policy, policies
from ..errors import AttnZooError

KINDS = ("prefill", "cache", "plan")
#: how the policies' token budget maps onto their own parameters (the rest take ``budget`` itself)
_WINDOWED = {"streaming": "window", "razor": "window", "duo": "window"}
#: parameters a fractional budget scales (when the user did not set them)
_SCALED = ("sinks", "local", "recent", "observe", "block", "reps")
#: selection units a fractional budget shrinks only when the scaled policy still does not fit
_UNITS = ("page",)
#: policies without a token budget: they hold every token (``quantized``: in fewer bits); see :func:`takes_budget`
_NO_BUDGET = ("full", "quantized")


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def split_specs(text: str | list[str] | None) -> list[str]:
    """``"a:x=1,y=2,b"`` -> ``["a:x=1,y=2", "b"]``: a comma piece holding ``=`` continues the previous item."""
    items: list[str] = []
    for chunk in [text] if isinstance(text, str) else (text or []):
        for piece in filter(None, (p.strip() for p in chunk.split(","))):
            if "=" in piece and ":" not in piece and items:
                items[-1] += "," + piece
            else:
                items.append(piece)
    return items


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"sliding_window:window=256,block=64"`` -> ``("sliding_window", {"window": 256, "block": 64})``."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise AttnZooError(f"eval: parameter expected key=value, got {item!r} in {spec!r}")
        params[key.strip()] = _value(raw.strip())
    return name.strip(), params


#: ``prefill=`` parameters that route the model rather than configure the method (``attnzoo.hf.apply``'s)
_ROUTING = ("decode",)


def method_params(params: dict) -> dict:
    """A ``prefill=`` case's parameters of the method itself (without :data:`_ROUTING`'s)."""
    return {k: v for k, v in params.items() if k not in _ROUTING}


def method_case(spec: str) -> dict:
    name, params = parse_spec(spec)
    registry.get(name, **method_params(params))  # unknown names / bad parameters: named now, with close matches
    if "decode" in params:
        from ..hf.adapter import check_decode

        check_decode(params["decode"])
    return {"kind": "prefill", "name": name, "params": params, "budget": None}


def takes_budget(name: str) -> bool:
    """Whether the policy holds a token budget: its own ``budget`` or a window the budget sets. The others
    (``full``, ``quantized``, ``zipvl``'s mass share, ...) run without one, and ``--budgets`` passes them by."""
    if name in _NO_BUDGET:
        return False
    return name in _WINDOWED or any(f.name == "budget" for f in dataclasses.fields(make_policy_cls(name)))


def policy_case(spec: str, budget: float | int | None = None) -> dict:
    name, params = parse_spec(spec)
    make_policy_cls(name)
    if "budget" in params:
        budget = params.pop("budget")
        if not takes_budget(name):
            raise AttnZooError(f"eval: policy {name!r} takes no budget (it keeps every token or sizes itself), "
                               f"got budget={budget!r}")
    if not takes_budget(name):
        budget = None
    elif budget is None:
        raise AttnZooError(f"eval: policy {name!r} needs a budget (budget=256 tokens or budget=0.125 of the "
                           "context; or pass --budgets)")
    else:
        check_budget(budget)
    return {"kind": "cache", "name": name, "params": params, "budget": budget}


def cases_of(methods: str, policies: str, budgets: list) -> list[dict]:
    """The cases of ``--methods`` and ``--policies``: each method, then each policy with its own budget or none,
    then the policies without one budget by budget (the first budget's row of every policy comes first: a cut run
    still compares them all)."""
    cases = [method_case(m) for m in split_specs(methods)]
    swept = []
    for spec in split_specs(policies):
        name, params = parse_spec(spec)
        if "budget" in params or not takes_budget(name):
            cases.append(policy_case(spec))
        else:
            swept.append(spec)
    return cases + [policy_case(spec, b) for b in budgets or [None] for spec in swept]


def applies(task_kind: str, case: dict) -> bool:
    """Whether a task of ``task_kind`` takes ``case``: a perplexity task scores the prompt's own forward pass, which a
    cache policy does not change, so it takes prefill and plan cases only."""
    return not (task_kind == "perplexity" and case["kind"] == "cache")


def plan_case(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AttnZooError(f"eval: plan file {path} does not exist")
    load_plan(path)
    return {"kind": "plan", "name": str(path.resolve()), "params": {}, "budget": None}


def load_plan(path: str | Path) -> tuple[Any, dict | None]:
    """A plan file -> ``(plan for attnzoo.hf.apply, cache policy spec or None)``; a calibrated plan
    (:mod:`attnzoo.plan.file`) is both: ``(plan, {"policy": plan})`` (make_cache takes it as its policy)."""
    from ..plan.file import from_dict, is_plan_file

    try:
        data = json.loads(Path(path).read_text())
    except ValueError as e:
        raise AttnZooError(f"eval: plan file {path} is not JSON ({e})") from None
    if is_plan_file(data):
        plan = from_dict(data, source=f"eval: plan file {path}")
        return plan, {"policy": plan} if plan.needs_cache else None  # a prefill plan keeps the full cache
    if isinstance(data, dict) and "plan" in data:
        cache = data.get("cache")
        if cache is not None and not (isinstance(cache, dict) and isinstance(cache.get("policy"), str)):
            raise AttnZooError(f"eval: plan file {path}: 'cache' expected {{'policy': name, ...}}, got {cache!r}")
        return data["plan"], cache
    return data, None


def make_policy_cls(name: str):
    if name not in policies():
        make_policy(name)  # raises with close matches
    return policies()[name]


def check_budget(budget: Any) -> None:
    ok = isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0
    if not ok or (isinstance(budget, float) and budget >= 1 and not float(budget).is_integer()):
        raise AttnZooError(f"eval: budget expected a token count >= 1 or a fraction in (0, 1), got {budget!r}")


def budget_tokens(budget: float | int, length: int) -> int:
    """A budget as tokens: fractions of ``length`` round to the nearest token (at least 1)."""
    return max(1, round(budget * length)) if budget < 1 else int(budget)


def policy_params(name: str, params: dict, budget: float | int | None, length: int) -> dict:
    """The policy's parameters for one context ``length``: the budget in its own terms, defaults scaled.

    A fractional budget ``f`` scales every default in ``_SCALED`` (and a window policy's ``sinks``)
    that exceeds ``f`` of its own default budget, by ``tokens / default budget``; if the policy still
    refuses (units rounding), those parameters and the selection unit (``page``) are halved until it
    accepts or they reach 1.
    """
    cls = make_policy_cls(name)
    if budget is None or not takes_budget(name):
        return dict(params)
    tokens = budget_tokens(budget, length)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(params)
    if name in _WINDOWED:
        if _WINDOWED[name] in params:  # the budget sets it: a silent override hid a 5-token cache once
            raise AttnZooError(f"eval: policy {name!r} got both {_WINDOWED[name]}={params[_WINDOWED[name]]} and "
                               f"budget={budget}; the budget sets the {_WINDOWED[name]} (budget - sinks), give one")
        sinks = out.get("sinks", fields["sinks"].default)
        if budget < 1 and "sinks" not in params:
            sinks = min(sinks, max(1, tokens // 16))
            out["sinks"] = sinks
        if tokens - sinks < 1:  # sinks + a window of 1 would hold more than the budget
            hint = " (lower sinks, or give a fractional budget, which scales them)" if budget >= 1 else ""
            raise AttnZooError(f"{name}: budget expected >= {sinks + 1} tokens, forced by sinks={sinks} plus a window "
                               f"of at least 1; got {tokens}{hint}")
        out[_WINDOWED[name]] = tokens - sinks
        return out
    out["budget"] = tokens
    if not budget < 1:
        return out
    ratio = tokens / fields["budget"].default
    scaled = [p for p in _SCALED if p in fields and p not in params and isinstance(fields[p].default, int)
              and fields[p].default > 0]
    floor = {"sinks": 4}  # attention sinks stay (a few initial tokens carry much of every row's mass)
    for p in scaled:
        out[p] = max(min(floor.get(p, 1), fields[p].default), min(fields[p].default, round(fields[p].default * ratio)))
    shrink = scaled + [p for p in _UNITS if p in fields and p not in params]
    for _ in range(12):
        try:
            cls(**out)
            return out
        except AttnZooError:
            if all(out.get(p, fields[p].default) <= 1 for p in shrink):
                break
            for p in shrink:
                out[p] = max(1, out.get(p, fields[p].default) // 2)
    cls(**out)  # raises the policy's own message
    return out


def check_case(case: dict, length: int) -> None:
    """Refuse now what a case would fail on later: its policy's parameters at ``length`` (a budget below the
    policy's minimum names the minimum and the defaults that force it)."""
    if case["kind"] == "cache":
        make_policy_cls(case["name"])(**policy_params(case["name"], case["params"], case["budget"], length))


_SIMPLE = (int, float, str, bool)


def method_parameters(case: dict, length: int) -> dict:
    """A prefill method's parameters, defaults included, with counts given as a share of N resolved at ``length``."""
    method = registry.get(case["name"], **method_params(case["params"]))
    fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    fields.update(method.resolve_shares(length))
    return {k: v for k, v in fields.items() if isinstance(v, _SIMPLE)}


def policy_parameters(case: dict, length: int) -> dict:
    """A cache policy's parameters at ``length``, defaults included: every field of the policy the case makes."""
    policy = make_policy_cls(case["name"])(**policy_params(case["name"], case["params"], case["budget"], length))
    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)
            if isinstance(getattr(policy, f.name), _SIMPLE)}


def resolved_today(case: dict, length: int) -> dict:
    """Every parameter ``case`` would run with at ``length`` with today's defaults ({} for a plan, or a case that no
    longer resolves: a removed name, a parameter refused now)."""
    try:
        if case["kind"] == "prefill":
            return method_parameters(case, length)
        if case["kind"] == "cache":
            return policy_parameters(case, length)
    except (AttnZooError, TypeError, ValueError, KeyError):
        pass
    return {}


def describe(case: dict) -> str:
    """``prefill=sliding_window:window=256`` / ``cache=h2o@0.125`` / ``plan=name.json``."""
    params = ",".join(f"{k}={v}" for k, v in sorted(case["params"].items()))
    name = Path(case["name"]).name if case["kind"] == "plan" else case["name"]
    text = f"{case['kind']}={name}" + (f":{params}" if params else "")
    return text + (f"@{case['budget']}" if case.get("budget") is not None else "")
