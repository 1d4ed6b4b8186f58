"""Named registries and the one parameter checker.

:class:`Registry` is the one lookup every named collection uses: methods
(:func:`register` / :func:`get` / :func:`methods` here), cache policies
(``attnzoo.cache.policy``), benchmark workloads and extra inputs
(``attnzoo.bench.workloads``), and tasks. An entry is a class or a function;
its *parameters* are a class's dataclass fields or a function's parameters
that have a default. :func:`check_fields` (dataclass instances: methods,
policies) and :func:`check_params` (a name -> value dict for any entry) are the
one checker: type from the annotation, ranges and choices from :func:`param`,
errors that name the owner, the parameter, what was expected and what was given.

A method is a frozen dataclass subclassing :class:`Method`, decorated with
:func:`register`. Its dataclass fields are its parameters (typed, defaulted,
range-checked via :func:`param`); its class variables declare what it is and
what it can do. The benchmark, the CLI, the Hugging Face integration and the
tests all iterate this registry.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from . import backends
from .checks import Problem, check_flag, check_qkv, check_result
from .errors import AttnZooError, UnsupportedError
from .core.lowering import lower
from .core.scoremod import ScoreMod, check_score_mod, check_sinks, with_sinks
from .varlen import run_varlen


class Family(str, enum.Enum):
    """Where a method sits in the literature (docs/methods.md)."""

    EXACT = "exact"
    LOCAL = "local"
    STATIC_SPARSE = "static sparse"
    DYNAMIC_SPARSE = "dynamic sparse"
    HASHING = "hashing/clustering"
    LOW_RANK = "low-rank"
    KERNELISED = "kernelised"
    LINEAR_RNN = "linear RNN"
    HYBRID = "hybrid"
    QUANTISED = "quantised"


@dataclass(frozen=True)
class Supports:
    """The capabilities a method declares; anything else raises UnsupportedError."""

    causal: bool = True
    noncausal: bool = True
    decode: bool = False  # Nq < Nk with causal alignment (chunked prefill, one-token steps)
    grad: bool = False
    lse: bool = False  # can return the log-sum-exp of its scores
    gqa: bool = True  # Hq % Hkv == 0 with Hkv < Hq
    padding: bool = True  # key_padding_mask
    score_mod: bool = False  # score_mod(score, b, h, q_idx, kv_idx) -> score (attnzoo.mods)
    sinks: bool = False  # learnable sink logits (Hq,) in the softmax denominator (needs lse)
    varlen: bool = False  # packed sequences: cu_seqlens_q / cu_seqlens_k (attnzoo.varlen)


#: the upper bound of a size parameter that changes the result and costs memory in proportion
#: (random features, hash buckets, k-means clusters): far above any useful value, far below a hang
MAX_SIZE = 2**12


def param(default: Any, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, help: str = "", clamp: bool = False, share: str | None = None,
          **field_kwargs: Any) -> Any:
    """A method parameter: a dataclass field with a range or a set of choices.

    ``min``/``max`` are inclusive bounds; ``None`` values always pass (use them
    for "auto" defaults). ``clamp=True`` marks a size (a block, a tile, a top-k
    count, a number of splits) whose values above the call's sequence length mean
    the same as that length: each call caps it there (see :meth:`Method.fit`), so
    ``block=10**12`` costs what ``block=N`` costs. Sizes that change the result
    beyond the length take a ``max`` instead.

    ``share="keys"`` (or the name of the method's key-block-size field, e.g.
    ``"block"``) marks a count that may also be given as a fraction: a float in
    (0, 1) is that share of the call's keys (of its key blocks), rounded up, at
    least 1 — a budget that scales with N, so a default stays sparse at every
    length. An int is a count, checked against ``min``/``max``.
    """
    meta = {"min": min, "max": max, "choices": choices, "help": help, "clamp": clamp, "share": share}
    if isinstance(default, (list, dict, set, torch.Tensor)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta, **field_kwargs)
    return dataclasses.field(default=default, metadata=meta, **field_kwargs)


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """The runtime types a field annotation admits (None = unchecked)."""
    simple = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    if isinstance(annotation, str):  # postponed annotations
        parts = [p.strip() for p in annotation.split("|")]
        allowed: list[type] = []
        for p in parts:
            if p == "None":
                allowed.append(type(None))
            elif p in simple:
                allowed.extend(simple[p])
            else:
                return None
        return tuple(allowed)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out: list[type] = []
        for a in typing.get_args(annotation):
            sub = _allowed_types(a)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out)
    if annotation is type(None):
        return (type(None),)
    name = getattr(annotation, "__name__", None)
    return simple.get(name) if name in simple else None


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a registry entry: annotation (as text), default, inclusive range, choices, help."""

    name: str
    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    help: str = ""
    #: "keys" / a block-size field: a float in (0, 1) is a share of the call's keys / key blocks (see :func:`param`)
    share: str | None = None


def _type_text(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def param_specs(entry: Any) -> tuple[ParamInfo, ...]:
    """The parameters of a registry entry: a dataclass's fields, or a function's parameters with a default."""
    if dataclasses.is_dataclass(entry):
        out = []
        for f in dataclasses.fields(entry):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            m = f.metadata
            out.append(ParamInfo(f.name, _type_text(f.type), default, m.get("min"), m.get("max"), m.get("choices"),
                                 m.get("help", ""), m.get("share")))
        return tuple(out)
    sig = inspect.signature(entry)
    return tuple(ParamInfo(p.name, _type_text(p.annotation) if p.annotation is not p.empty else "", p.default)
                 for p in sig.parameters.values()
                 if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_value(owner: str, spec: ParamInfo, value: Any) -> None:
    """Raise AttnZooError unless ``value`` fits ``spec`` (type from its annotation, range, choices)."""
    allowed = _allowed_types(spec.type) if spec.type else None
    if allowed is not None:
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            names = " or ".join(sorted({t.__name__ for t in allowed}))
            raise AttnZooError(f"{owner}: parameter {spec.name!r} expected {names}, got {value!r} "
                               f"({type(value).__name__})")
    if value is None or isinstance(value, (torch.Tensor, tuple, list, dict)) or callable(value):
        return
    if spec.choices is not None and value not in spec.choices:
        raise AttnZooError(f"{owner}: parameter {spec.name!r} expected one of {list(spec.choices)}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise AttnZooError(f"{owner}: parameter {spec.name!r} expected a finite number, got {value}")
        if spec.share and isinstance(value, float) and value < 1:
            if value <= 0:
                raise AttnZooError(f"{owner}: parameter {spec.name!r} expected a count >= {spec.min} or a share of "
                                   f"N in (0, 1), got {value}")
            return
        if spec.share and isinstance(value, float) and not value.is_integer():
            raise AttnZooError(f"{owner}: parameter {spec.name!r} expected a whole count or a share of N in (0, 1), "
                               f"got {value}")
        lo, hi = spec.min, spec.max
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise AttnZooError(f"{owner}: parameter {spec.name!r} expected a value in {rng}, got {value}")


def check_params(owner: str, entry: Any, params: Mapping[str, Any]) -> None:
    """Refuse unknown parameter names and values that do not fit (see :func:`check_value`)."""
    specs = {s.name: s for s in param_specs(entry)}
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise AttnZooError(f"{owner}: unknown parameter(s) {unknown}; valid parameters: "
                           f"{', '.join(specs) or 'none'}")
    for name, value in params.items():
        check_value(owner, specs[name], value)


def check_fields(obj: Any) -> None:
    """Check every field of a dataclass instance (a method, a policy) against its :func:`param` spec."""
    owner = getattr(obj, "name", "") or type(obj).__name__
    for spec in param_specs(type(obj)):
        check_value(owner, spec, getattr(obj, spec.name))


T = TypeVar("T")


class Registry(Mapping[str, T]):
    """Entries (classes or functions) by name, with one lookup and one error style.

    ``Registry("task")`` gives ``add`` / the ``register`` decorator, mapping
    access (``name in r``, ``r[name]``, iteration in registration order),
    :meth:`lookup` (an AttnZooError with close matches for unknown names) and
    :meth:`build` (checked parameters, then the class instantiated or the
    function bound with :func:`functools.partial`). ``load`` runs once before
    the first read, to import the modules that register built-in entries.
    """

    def __init__(self, kind: str, *, load: Callable[[], None] | None = None, listing: str | None = None,
                 owner: str = "{name}") -> None:
        self.kind = kind
        self._owner = owner  # how parameter errors name an entry, e.g. "workload {name}"
        self._entries: dict[str, T] = {}
        self._load = load
        self._listing = listing  # how the error points at the list (default: the names themselves)

    def _loaded(self) -> dict[str, T]:
        if self._load is not None:
            load, self._load = self._load, None
            load()
        return self._entries

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name taken by another entry raises TypeError."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} registry: expected a non-empty name, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old is not entry and getattr(old, "__qualname__", None) != getattr(
                entry, "__qualname__", object()):
            raise TypeError(f"{self.kind} registry: the name {name!r} is already taken by "
                            f"{getattr(old, '__qualname__', old)!r}")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests that register a temporary entry); returns the entry."""
        return self._entries.pop(name)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def lookup(self, name: Any) -> T:
        """The entry called ``name``, or an AttnZooError naming the kind, the name and close matches."""
        entries = self._loaded()
        if not isinstance(name, str):
            raise AttnZooError(f"{self.kind}: expected a {self.kind} name (str), got {type(name).__name__}")
        if name in entries:
            return entries[name]
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = self._listing or f"available: {', '.join(entries)}"
        raise AttnZooError(f"{self.kind}: unknown {self.kind} {name!r}{hint} ({listing})")

    def params(self, name: str) -> tuple[ParamInfo, ...]:
        return param_specs(self.lookup(name))

    def check(self, name: str, params: Mapping[str, Any]) -> None:
        """Check ``params`` against entry ``name`` without building it (e.g. before a long run starts)."""
        check_params(self._owner.format(name=name), self.lookup(name), params)

    def build(self, name: str, **params: Any) -> Any:
        """A class entry instantiated with ``params``, a function entry bound to them; both checked first."""
        entry = self.lookup(name)
        check_params(self._owner.format(name=name), entry, params)
        if isinstance(entry, type):
            return entry(**params)
        return functools.partial(entry, **params)

    def __getitem__(self, name: str) -> T:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


#: families that never form the softmax scores a score_mod modifies
_SCORELESS = (Family.LOW_RANK, Family.KERNELISED, Family.LINEAR_RNN)
_NO_SCORES = "it never forms the query-key softmax scores a score_mod modifies"


@dataclass(frozen=True)
class Method:
    """Base class of every registered method.

    Subclasses implement :meth:`forward` on validated inputs; ``__call__``
    does the shared work: input checks, capability checks, empty inputs,
    fp32 compute for half-precision inputs, and output dtype.
    """

    name: ClassVar[str] = ""
    family: ClassVar[Family] = Family.EXACT
    complexity: ClassVar[str] = ""
    supports: ClassVar[Supports] = Supports()
    training_free: ClassVar[bool] = True
    papers: ClassVar[tuple[str, ...]] = ()
    #: when the method equals exact attention: "always", a parameter condition ("window >= N"),
    #: or "never: why" (docs/methods.md shows it; tests/test_docs.py requires it)
    exact_for: ClassVar[str] = ""
    #: extra per-call tensor inputs (name -> description), e.g. ``g`` for gla
    inputs: ClassVar[dict[str, str]] = {}
    #: compute in float32 when given float16/bfloat16 inputs
    upcast_half: ClassVar[bool] = True
    #: why the method refuses a score_mod, where the math gives a mod no meaning (the refusal says it)
    no_score_mod: ClassVar[str] = ""

    # ----------------------------------------------------------- parameters
    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Cross-parameter checks; override in subclasses that need them."""

    # ----------------------------------------------------------------- call
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, causal: bool = False,
                 scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                 return_lse: bool = False, score_mod: ScoreMod | None = None, sinks: torch.Tensor | None = None,
                 cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                 max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, backend: str = "auto",
                 **inputs: Any):
        """Attend ``q`` to ``k``/``v``; returns ``out`` or ``(out, lse)``.

        ``score_mod`` and ``sinks``: see :mod:`attnzoo.mods`; ``cu_seqlens_*``: see :mod:`attnzoo.varlen`;
        ``backend``: see :mod:`attnzoo.backends`.
        """
        check_flag("causal", causal)
        check_flag("return_lse", return_lse)
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            return run_varlen(self, q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                              max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, key_padding_mask=key_padding_mask,
                              return_lse=return_lse, inputs=inputs, causal=causal, scale=scale, score_mod=score_mod,
                              sinks=sinks, backend=backend)
        grad = _wants_grad(q, k, v)
        prob = check_qkv(q, k, v, key_padding_mask, scale, grad=grad)
        self.check_capabilities(prob, causal=causal, key_padding_mask=key_padding_mask,
                                return_lse=return_lse, grad=grad)
        self.check_routes(prob, q.device, score_mod=score_mod, sinks=sinks)
        if score_mod is not None and backend != "flex":  # a user function as the built-ins it computes
            score_mod, factor, _ = lower(score_mod, batch=prob.batch, heads_q=prob.heads_q, len_q=prob.len_q,
                                         len_k=prob.len_k, dtype=q.dtype, device=q.device)
            prob = dataclasses.replace(prob, scale=prob.scale * factor) if factor != 1 else prob
        if score_mod is not None:
            inputs = {**inputs, "score_mod": score_mod}
        unknown = sorted(set(inputs) - set(self.inputs) - {"score_mod"})
        if unknown:
            valid = ", ".join(self.inputs) or "none"
            raise AttnZooError(f"{self.name}: unknown input(s) {unknown}; this method's extra inputs: {valid}")
        runner = backends.choose(self, backend, backends.Case(q, k, v, causal, key_padding_mask, return_lse, grad,
                                                              inputs))
        empty = 0 in (prob.batch, prob.heads_q, prob.len_q, prob.len_k)
        if sinks is not None and runner is not None and runner.sinks and not empty:
            inputs = {**inputs, "sinks": sinks}  # the kernel adds them to its denominators
        elif sinks is not None:  # a partial (0, sinks) merged with the attention's (out, lse)
            out, lse = self(q, k, v, causal=causal, scale=prob.scale, key_padding_mask=key_padding_mask, return_lse=True,
                            backend=backend, **inputs)
            out, lse = with_sinks(out, lse, sinks)
            return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)
        if empty:
            out = q.new_zeros(prob.batch, prob.heads_q, prob.len_q, prob.dim_v)
            lse = q.new_full((prob.batch, prob.heads_q, prob.len_q), -math.inf, dtype=torch.float32)
            # keep the graph connected so backward works on empty inputs too
            out = out + 0 * (q.sum() + k.sum() + v.sum())
            return (out, lse) if return_lse else out
        if runner is not None:  # a kernel backend: half inputs stay half (the kernels accumulate in fp32)
            out, lse = backends.run(runner, self.fit(prob), q, k, v, prob, causal=causal,
                                    key_padding_mask=key_padding_mask, return_lse=return_lse, inputs=inputs)
            check_result(self.name, out, prob)
            return (out, lse) if return_lse else out
        dtype = q.dtype
        if self.upcast_half and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
            inputs = {n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                      for n, t in inputs.items()}
        out, lse = self.fit(prob).forward(q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask,
                                          return_lse=return_lse, **inputs)
        out = out.to(dtype)
        check_result(self.name, out, prob)
        if return_lse:
            return out, lse
        return out

    def fit(self, prob: Problem) -> "Method":
        """This method for one call: every ``share`` parameter given as a fraction turned into a count of the
        call's keys or key blocks (rounded up, at least 1), every ``clamp`` parameter capped at the call's
        sequence length (same result)."""
        counts = self.resolve_shares(prob.len_k)
        me = dataclasses.replace(self, **counts) if counts else self
        n = max(prob.len_q, prob.len_k)
        over = {name: n for name in _fitted_fields(type(self))[1]
                if isinstance(getattr(me, name), int) and getattr(me, name) > n}
        return dataclasses.replace(me, **over) if over else me

    def resolve_shares(self, len_k: int) -> dict[str, int]:
        """``{name: count}`` for the ``share`` parameters given as a fraction, at ``len_k`` keys."""
        out = {}
        for name, share in _fitted_fields(type(self))[0]:
            value = getattr(self, name)
            if isinstance(value, float):
                units = len_k if share == "keys" else -(-len_k // max(1, int(getattr(self, share))))
                out[name] = max(1, math.ceil(value * units - 1e-9)) if value < 1 else int(value)
        return out

    def check_capabilities(self, prob: Problem, *, causal: bool, key_padding_mask: torch.Tensor | None,
                           return_lse: bool, grad: bool) -> None:
        s = self.supports
        missing = None
        if causal and not s.causal:
            missing = "causal=True (this method is non-causal only)"
        elif not causal and not s.noncausal:
            missing = "causal=False (this method is causal only)"
        elif return_lse and not s.lse:
            missing = "return_lse=True (this method does not compute a log-sum-exp)"
        elif grad and not s.grad:
            missing = "gradients (inputs require grad; call under torch.no_grad())"
        elif prob.heads_q != prob.heads_kv and not s.gqa:
            missing = f"grouped-query attention (Hq={prob.heads_q}, Hkv={prob.heads_kv})"
        elif key_padding_mask is not None and not s.padding:
            missing = "key_padding_mask"
        elif causal and prob.len_q < prob.len_k and prob.len_q > 0 and not s.decode:
            missing = f"decode / chunked prefill (causal with Nq={prob.len_q} < Nk={prob.len_k})"
        if missing:
            raise UnsupportedError(f"method {self.name!r} does not support {missing}")

    def check_routes(self, prob: Problem, device, *, score_mod: object, sinks: object) -> None:
        """Refuse a score_mod or sinks this method does not declare; validate the ones it takes."""
        for name, given, ok in (("score_mod", score_mod, self.supports.score_mod),
                                ("sinks", sinks, self.supports.sinks)):
            if given is not None and not ok:
                why = _NO_SCORES if name == "score_mod" and self.family in _SCORELESS else self.no_score_mod
                raise UnsupportedError(f"method {self.name!r} does not support {name}"
                                       + (f": {why}" if why and name == "score_mod" else ""))
        if score_mod is not None:
            check_score_mod(score_mod)
        if sinks is not None:
            check_sinks(sinks, prob.heads_q, device)

    def sequence_kv(self, k: torch.Tensor, v: torch.Tensor, k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values packed sequence ``[k0, k1)`` attends (cu_seqlens calls): its own slice by default."""
        return k[:, :, k0:k1], v[:, :, k0:k1]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: Problem, *, causal: bool,
                key_padding_mask: torch.Tensor | None, return_lse: bool,
                **inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute ``(out, lse or None)`` on validated, non-empty inputs."""
        raise NotImplementedError


@functools.cache
def _fitted_fields(cls: type) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """A method class's ``(share field, its unit)`` pairs and its ``clamp`` field names (what :meth:`Method.fit`
    adjusts per call), found once per class rather than per call."""
    fields = dataclasses.fields(cls)
    return (tuple((f.name, f.metadata["share"]) for f in fields if f.metadata.get("share")),
            tuple(f.name for f in fields if f.metadata.get("clamp")))


def _wants_grad(*ts: torch.Tensor) -> bool:
    """Gradients will be taken (non-tensors, refused later by the input checks, want none)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


# ------------------------------------------------------------------ registry
def _load_builtin_methods() -> None:
    """Import every module of ``attnzoo.catalog`` (each registers itself)."""
    importlib.import_module(f"{__package__}.catalog")


#: every method class by name; the catalog is imported on first read
METHODS: Registry[type[Method]] = Registry("method", load=_load_builtin_methods, listing="see attnzoo.methods()")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register: expected a Method subclass, got {cls!r}")
    if "__dataclass_fields__" not in cls.__dict__ or not cls.__dataclass_params__.frozen:
        raise TypeError(f"register: {cls.__name__} must be a @dataclass(frozen=True)")
    if not cls.name:
        raise TypeError(f"register: {cls.__name__} has no `name`")
    try:
        return METHODS.add(cls.name, cls)
    except TypeError as e:
        raise TypeError(f"register: {e}") from None


def _lookup(name: str) -> type[Method]:
    return METHODS.lookup(name)


def param_names(cls: type[Method]) -> list[str]:
    return [p.name for p in param_specs(cls)]


def get(name: str, **params: Any) -> Method:
    """A configured, reusable method: ``get("sliding_window", window=256)(q, k, v)``."""
    return METHODS.build(name, **params)


def methods() -> dict[str, type[Method]]:
    """Every registered method class, by name, sorted by family then name."""
    order = list(Family)
    return dict(sorted(METHODS.items(), key=lambda kv: (order.index(kv[1].family), kv[0])))


@dataclass(frozen=True)
class MethodInfo:
    """What :func:`info` returns: everything the registry knows of one method."""

    name: str
    family: Family
    complexity: str
    supports: Supports
    training_free: bool
    papers: tuple[str, ...]
    params: tuple[ParamInfo, ...]
    inputs: dict[str, str]
    doc: str


def info(name: str) -> MethodInfo:
    """Family, complexity, capabilities, parameters and papers of one method."""
    cls = _lookup(name)
    doc = (cls.__doc__ or "").strip()
    return MethodInfo(cls.name, cls.family, cls.complexity, cls.supports, cls.training_free, cls.papers,
                      param_specs(cls), dict(cls.inputs), doc)
