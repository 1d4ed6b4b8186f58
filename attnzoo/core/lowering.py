"""A user's score_mod run as the built-in mods it computes, on the fused kernels instead of the eager path.

A plain function ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's convention) is Python code that no
fused kernel can call, so it runs on the eager tile / slot paths (2-8x the time of the same call without it
at 4K on CPU). Many user functions are built-ins in disguise: a soft cap written as ``c * tanh(s / c)``, ALiBi
written as ``s + slopes[h] * (kv_idx - q_idx)``, a relative-position table indexed by the distance.
:func:`lower` recognises them:

1. **Trace**: the function is traced once with ``torch.fx`` (symbolic proxies, no values: Python control
   flow on score or index values cannot be traced, and the function keeps the eager path).
2. **Read the graph**: it is lowered when it computes

   - ``a * score + B``  (a distance bias, optionally a constant scale), or
   - ``c * tanh(a * score + B)``  (then a soft cap),

   where ``a`` and ``c`` are Python numbers and ``B`` any expression of the query head ``h`` and the distance
   ``kv_idx - q_idx`` (``q_idx`` and ``kv_idx`` used only as that difference, either sign), of constants and
   of tensors the function closes over, built from elementwise torch ops and indexing (no batch row ``b``, no
   shape-dependent op, nothing in place outside the score chain). The lowering is then ``scale x a`` (x a·c)
   on the call's query scale, ``B`` (c·B) as a :class:`~attnzoo.core.scoremod.DistanceBias` (evaluated by
   replaying the graph: gradients reach the closed-over tensors), and ``Softcap(c)``.
3. **Check the numbers**: before each call uses it, the lowering and the function are compared on random
   scores at a grid of the call's own indices (every head, both extreme query and key positions, random
   ones between); any difference beyond rounding keeps the eager path. So a stale trace (a global the
   function reads was rebound) or anything the graph reading missed never gives a wrong answer.

Traces are cached per function object (weakly) and redone when its code or closure changes.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from .scoremod import Composed, DistanceBias, Softcap, call_score_mod, functional

_S, _B, _H, _Q, _K, _D = "score", "b", "h", "q_idx", "kv_idx", "distance"

#: call_function targets by the name this module reads them as
_FUNCTIONS = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div", operator.neg: "neg",
    operator.getitem: "getitem", operator.floordiv: "floor_divide", operator.mod: "remainder", operator.pow: "pow",
    operator.lt: "lt", operator.le: "le", operator.gt: "gt", operator.ge: "ge", operator.eq: "eq", operator.ne: "ne",
    operator.and_: "logical_and", operator.or_: "logical_or", operator.invert: "logical_not", abs: "abs",
    getattr: "getattr",
}
_ELEMENTWISE = ("add", "sub", "mul", "div", "neg", "abs", "clamp", "clamp_min", "clamp_max", "where", "exp", "exp2",
                "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "pow", "sign", "floor", "ceil", "round", "trunc",
                "minimum", "maximum", "remainder", "fmod", "floor_divide", "lt", "le", "gt", "ge", "eq", "ne",
                "logical_and", "logical_or", "logical_not", "sigmoid", "tanh", "sin", "cos", "atan", "reciprocal",
                "square", "masked_fill")
_FUNCTIONS.update({getattr(torch, n): n for n in _ELEMENTWISE if hasattr(torch, n)})
_FUNCTIONS.update({torch.divide: "div", torch.multiply: "mul", torch.subtract: "sub", torch.negative: "neg",
                   torch.true_divide: "div"})
#: conversions (identity on values for a floating result; on the score only these)
_CONVERT = ("to", "float", "double", "type_as", "contiguous", "clone")
#: conversions of indices and biases
_CAST = _CONVERT + ("long", "int")
#: methods read under their function's name
_METHODS = {"__getitem__": "getitem", "truediv": "div", "divide": "div", "multiply": "mul", "subtract": "sub",
            "negative": "neg", "__and__": "logical_and", "__or__": "logical_or", "__invert__": "logical_not"}


class Refused(Exception):
    """Why a function is not lowered (it keeps the eager path)."""


def _op(node: fx.Node) -> tuple[str, bool]:
    """``(name, in_place)`` of a call node, names normalised across torch functions, operators and methods."""
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
        if name is None:
            raise Refused(f"calls {getattr(node.target, '__name__', node.target)!r}")
        return name, False
    if node.op == "call_method":
        name = str(node.target)
        in_place = name.endswith("_") and not name.endswith("__")
        name = name[:-1] if in_place else name
        return _METHODS.get(name, name), in_place
    raise Refused(f"a {node.op} node")


def _nodes(x) -> list[fx.Node]:
    """The graph nodes among ``x``'s (nested) arguments."""
    out: list[fx.Node] = []
    fx.node.map_arg(x, out.append)
    return out


@dataclass(frozen=True)
class Analysis:
    """A lowerable function's graph read as ``c * tanh(a * score + B)`` or ``a * score + B``."""

    graph: fx.GraphModule | None  # computes ``B`` (score given as zeros); None: no bias
    factor: float  # the bias is ``factor * B`` (c with a cap, 1 without)
    scale: float  # the query scale's factor: a·c with a cap, a without
    cap: float | None
    uses_head: bool


def analyse(score_mod) -> Analysis:
    """Trace ``score_mod`` and read its graph (:class:`Refused` with the reason when it is not lowerable)."""
    def call(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx, kv_idx)

    try:
        gm = fx.symbolic_trace(call)
    except Exception as e:  # control flow on values, non-torch code on proxies, ...
        raise Refused(f"not traceable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    deps: dict[fx.Node, frozenset] = {}
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            deps[n] = frozenset({(_S, _B, _H, _Q, _K)[holders.index(n)]})
            continue
        if n.op in ("get_attr", "output"):
            deps[n] = frozenset()
            continue
        name, in_place = _op(n)
        args = _nodes((n.args, n.kwargs))
        d = frozenset().union(*(deps[a] for a in args))
        if name == "getattr":
            if n.args[1] not in ("dtype", "device"):
                raise Refused(f"reads .{n.args[1]}")
            deps[n] = frozenset()  # a dtype / device: a constant of the call
            continue
        if "out" in n.kwargs:
            raise Refused("writes into an out= tensor")
        if _B in d:
            raise Refused("reads the batch row b")
        if in_place and (_S not in d or not isinstance(n.args[0], fx.Node) or _S not in deps[n.args[0]]):
            raise Refused(f"updates a tensor other than the score in place ({n.target})")
        if d & {_Q, _K}:
            d = _positions(n, name, args, deps, d)
        elif _S not in d and d and name not in _ELEMENTWISE + _CAST + ("getitem",):
            raise Refused(f"applies {name!r} to the head / distance (only elementwise ops and indexing)")
        if name == "getitem" and d and not all(isinstance(i, (fx.Node, int)) for i in _index_items(n.args[1])):
            raise Refused("slices (only indexing by index tensors and integers)")
        deps[n] = d
    result = out_node.args[0]
    if not isinstance(result, fx.Node) or _S not in deps[result]:
        raise Refused("does not return a tensor computed from the score")
    return _read_chain(gm, deps, holders[0], result)


def _index_items(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _positions(n: fx.Node, name: str, args: list, deps: dict, d: frozenset) -> frozenset:
    """The dependencies of a node reading ``q_idx`` / ``kv_idx``: a conversion of one of them, or their
    difference (which is the distance); anything else is refused."""
    if name in _CAST and len(args) >= 1 and args[0] is n.args[0] and deps[args[0]] in ({_Q}, {_K}) \
            and all(not (deps[a] & {_Q, _K}) for a in args[1:]):
        return deps[args[0]]
    if name == "sub" and not n.kwargs and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) \
            and {deps[n.args[0]], deps[n.args[1]]} == {frozenset({_Q}), frozenset({_K})}:
        return frozenset({_D})
    raise Refused("uses q_idx / kv_idx other than as their difference kv_idx - q_idx")


def _number(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise Refused(f"multiplies the score by {type(x).__name__} (only by Python numbers)")
    return float(x)


def _read_chain(gm: fx.GraphModule, deps: dict, score: fx.Node, result: fx.Node) -> Analysis:
    """Walk the nodes computing the result from the score (each must take the score through exactly one
    argument) and read them as ``a * score + B`` then optionally ``c * tanh(.)``."""
    chain = [result]
    while chain[-1] is not score:
        node = chain[-1]
        feeding = [a for a in _nodes((node.args, node.kwargs)) if _S in deps[a]]
        if len(feeding) != 1 or sum(a is feeding[0] for a in _nodes((node.args, node.kwargs))) != 1:
            raise Refused("combines the score with itself")
        chain.append(feeding[0])
    chain.reverse()
    if any(_S in d and n not in chain and n.op != "output" for n, d in deps.items()):
        raise Refused("computes from the score off its result's path (an in-place update, a second use)")
    a, pre, p, bias = 1.0, None, 1.0, False
    for prev, node in zip(chain, chain[1:]):
        name, _ = _op(node)
        args, kwargs = node.args, node.kwargs
        first = args[0] is prev
        if name in _CONVERT:
            if not first or name in ("clone", "contiguous") and (len(args) > 1 or kwargs):
                raise Refused(f"{name} on the score")
            continue
        if kwargs and not (name in ("add", "sub") and set(kwargs) == {"alpha"}):
            raise Refused(f"{name} with {sorted(kwargs)} on the score")
        if name == "tanh" and pre is None:
            pre = prev
            continue
        if name in ("mul", "div", "neg"):
            if name == "neg":
                c = -1.0
            elif name == "div":
                if not first:
                    raise Refused("divides by the score")
                c = 1.0 / _number(args[1]) if _number(args[1]) != 0 else math.inf
            else:
                c = _number(args[1] if first else args[0])
            if not math.isfinite(c):
                raise Refused("divides the score by 0")
            if pre is None:
                a *= c
            else:
                p *= c
            continue
        if name in ("add", "sub") and pre is None:
            other = args[1] if first else args[0]
            if isinstance(other, fx.Node) and deps[other] - {_H, _D}:
                raise Refused(f"adds a term of {sorted(deps[other])}")
            alpha = _number(kwargs.get("alpha", 1.0))
            if not first:  # other + alpha·s, other - alpha·s
                a *= alpha * (1.0 if name == "add" else -1.0)
            bias = True
            continue
        raise Refused(f"{name} on the score" + (" after its soft cap" if pre is not None else ""))
    if pre is None:
        scale, cap, factor, node = a, None, 1.0, result
    else:
        sign = 1.0 if p > 0 else -1.0
        cap, scale, factor, node = abs(p), sign * a * abs(p), sign * abs(p), pre
        if cap == 0:
            raise Refused("multiplies the capped score by 0")
    if not scale > 0:
        raise Refused(f"scales the score by {scale:g} (only a positive factor)")
    if abs(scale - 1.0) < 1e-12:
        scale = 1.0
    graph = _bias_graph(gm, node) if bias else None
    uses_head = bias and _H in deps[node]
    return Analysis(graph, factor, scale, cap, uses_head)


def _bias_graph(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    """A copy of ``gm`` returning ``node`` (called with zero scores it gives the bias)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        env[n] = g.node_copy(n, lambda x: env[x])
        if n is node:
            break
    g.output(env[node])
    g.eliminate_dead_code()
    return fx.GraphModule(gm, g)


class TracedBias(DistanceBias):
    """The distance bias of a lowered function: ``factor * B(h, kv_idx - q_idx)``, ``B`` replayed from its
    graph on the mod's own tensors (so gradients reach them); ``heads`` rows (1 when ``B`` ignores ``h``)."""

    def __init__(self, graph: fx.GraphModule, factor: float, heads: int, name: str) -> None:
        self.graph, self.factor, self.heads, self.__name__ = graph, factor, heads, name

    def _at(self, h, q_idx, kv_idx, dtype=torch.float64):
        shape = torch.broadcast_shapes(*(t.shape for t in (h, q_idx, kv_idx) if isinstance(t, torch.Tensor)))
        zero = torch.zeros(shape, dtype=dtype, device=q_idx.device)
        b = torch.zeros((1,) * len(shape), dtype=torch.long, device=q_idx.device)
        out = self.graph(zero, b, h, q_idx, kv_idx)
        return out * self.factor if self.factor != 1 else out

    def __call__(self, score, b, h, q_idx, kv_idx):
        bias = self._at(h, q_idx, kv_idx, score.dtype).to(score.dtype)
        return score + bias if functional(score, bias) else score.add_(bias)

    def bias(self, dist):
        d = dist.view(1, 1, 1, -1)
        q_idx = (-d).clamp(min=0)
        h = torch.arange(self.heads, device=d.device).view(1, -1, 1, 1)
        out = self._at(h, q_idx, q_idx + d)
        return torch.broadcast_to(out, (1, self.heads, 1, d.shape[-1])).reshape(self.heads, -1)


#: function -> (fingerprint, Analysis or the Refused reason)
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(fn) -> tuple:
    """What a trace depends on besides globals (the per-call check covers those): code, closure, defaults."""
    code = getattr(fn, "__code__", None)
    cells = tuple(id(c.cell_contents) if c.cell_contents is not None else None
                  for c in (getattr(fn, "__closure__", None) or ()))
    state = tuple(map(id, vars(fn).values())) if code is None and hasattr(fn, "__dict__") else ()
    return code, cells, tuple(map(id, getattr(fn, "__defaults__", None) or ())), state


def analysis(score_mod) -> Analysis | str:
    """``score_mod``'s :class:`Analysis`, or why it is not lowerable (cached per function object)."""
    key = _fingerprint(score_mod)
    try:
        hit = _CACHE.get(score_mod)
    except TypeError:  # not weakly referenceable: traced each call
        hit = None
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        got: Analysis | str = analyse(score_mod)
    except Refused as e:
        got = str(e)
    try:
        _CACHE[score_mod] = (key, got)
    except TypeError:
        pass
    return got


def lower(score_mod, *, batch: int, heads_q: int, len_q: int, len_k: int, dtype: torch.dtype,
          device) -> tuple[object, float, str]:
    """``(mod, scale factor, note)``: the built-in mods equal to a user ``score_mod`` on this call (``mod`` None
    when it only scales the scores) and the factor on the query scale, or ``(score_mod, 1.0, why not)``.
    Built-in mods and :func:`~attnzoo.mods.positional` pass through unchanged."""
    if isinstance(score_mod, (DistanceBias, Softcap, Composed)):
        return score_mod, 1.0, ""
    got = analysis(score_mod)
    if isinstance(got, str):
        return score_mod, 1.0, got
    name = getattr(score_mod, "__name__", type(score_mod).__name__)
    bias = None if got.graph is None else TracedBias(got.graph, got.factor, heads_q if got.uses_head else 1,
                                                     f"traced({name})")
    parts = tuple(m for m in (bias, None if got.cap is None else Softcap(got.cap)) if m is not None)
    mod = None if not parts else parts[0] if len(parts) == 1 else Composed(parts)
    try:
        ok = _matches(score_mod, mod, got.scale, batch, heads_q, len_q, len_k, dtype, device)
    except Exception as e:  # the function or its replay fails on the call's indices: the eager path shows it
        return score_mod, 1.0, f"its check on this call's indices raised {type(e).__name__}"
    if not ok:
        try:
            _CACHE.pop(score_mod, None)  # traced again next time (a global it reads may have changed)
        except TypeError:
            pass
        return score_mod, 1.0, "the lowering differs from the function on this call's indices"
    steps = ((["the query scale x %g" % got.scale] if got.scale != 1 else []) + (["a distance bias"] if bias else [])
             + ([f"softcap({got.cap:g})"] if got.cap is not None else []))
    return mod, got.scale, "lowered to " + (" then ".join(steps) or "nothing (it returns the score)")


def _matches(fn, mod, scale: float, batch: int, heads: int, len_q: int, len_k: int, dtype, device) -> bool:
    """Whether ``mod`` on ``scale``-times the scores equals ``fn`` on random scores at a grid of this call's
    indices: every head, the first and last batch rows, and 12 query and 12 key positions (the extremes,
    so both extreme distances, and random ones between); the bias as the fused kernels read it
    (:meth:`DistanceBias.bias` at the grid's distances)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(len_q * 7919 + len_k)
    first = len_k - len_q  # query i sits at position len_k - len_q + i

    def picks(lo, hi):
        inner = torch.randint(lo, hi + 1, (10,), generator=g) if hi > lo else torch.empty(0, dtype=torch.long)
        return torch.unique(torch.cat([torch.tensor([lo, hi]), inner])).to(device)

    q_idx, kv_idx = picks(first, len_k - 1).view(1, 1, -1, 1), picks(0, len_k - 1).view(1, 1, 1, -1)
    b = torch.tensor(sorted({0, batch - 1}), device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    shape = (b.shape[0], heads, q_idx.shape[2], kv_idx.shape[3])
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(device, compute)
    with torch.no_grad():
        want = call_score_mod(fn, s.clone(), b, h, q_idx, kv_idx)
        got = s * scale
        if isinstance(mod, Composed):
            bias_mod, cap = mod.parts
        else:
            bias_mod, cap = (mod, None) if isinstance(mod, DistanceBias) else (None, mod)
        if bias_mod is not None:
            dist = kv_idx - q_idx
            lo = int(dist.min())
            table = bias_mod.bias(torch.arange(lo, int(dist.max()) + 1, device=device))
            got = got + table[h if table.shape[0] > 1 else 0, dist - lo].to(compute)
        if cap is not None:
            got = cap(got, b, h, q_idx, kv_idx)
    tol = math.sqrt(torch.finfo(compute).eps)
    return bool(torch.isclose(got, want.to(compute), rtol=tol, atol=tol).all())
