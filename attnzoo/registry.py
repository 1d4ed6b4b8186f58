"""The method registry: the single source of truth for what attnzoo can run.

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
import importlib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .checks import Problem, check_flag, check_qkv
from .errors import AttnZooError, UnsupportedError


class Family(str, enum.Enum):
    """Where a method sits in the literature (METHODS.md Part A.2)."""

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


def param(default: Any, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, help: str = "", **field_kwargs: Any) -> Any:
    """A method parameter: a dataclass field with a range or a set of choices.

    ``min``/``max`` are inclusive bounds; ``None`` values always pass (use them
    for "auto" defaults).
    """
    meta = {"min": min, "max": max, "choices": choices, "help": help}
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
    #: extra per-call tensor inputs (name -> description), e.g. ``g`` for gla
    inputs: ClassVar[dict[str, str]] = {}
    #: compute in float32 when given float16/bfloat16 inputs
    upcast_half: ClassVar[bool] = True

    # ----------------------------------------------------------- parameters
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _allowed_types(f.type)
            if allowed is not None:
                ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
                if not ok:
                    names = " or ".join(sorted({t.__name__ for t in allowed}))
                    raise AttnZooError(
                        f"{self.name}: parameter {f.name!r} expected {names}, got {value!r} ({type(value).__name__})"
                    )
            if value is None or isinstance(value, (torch.Tensor, tuple, list, dict)) or callable(value):
                continue
            lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise AttnZooError(f"{self.name}: parameter {f.name!r} expected one of {list(choices)}, got {value!r}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    raise AttnZooError(f"{self.name}: parameter {f.name!r} expected a finite number, got {value}")
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                    raise AttnZooError(f"{self.name}: parameter {f.name!r} expected a value in {rng}, got {value}")
        self.validate()

    def validate(self) -> None:
        """Cross-parameter checks; override in subclasses that need them."""

    # ----------------------------------------------------------------- call
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, causal: bool = False,
                 scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                 return_lse: bool = False, **inputs: Any):
        """Attend ``q`` to ``k``/``v``; returns ``out`` or ``(out, lse)``."""
        check_flag("causal", causal)
        check_flag("return_lse", return_lse)
        prob = check_qkv(q, k, v, key_padding_mask, scale)
        self.check_capabilities(prob, causal=causal, key_padding_mask=key_padding_mask,
                                return_lse=return_lse, grad=_wants_grad(q, k, v))
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            valid = ", ".join(self.inputs) or "none"
            raise AttnZooError(f"{self.name}: unknown input(s) {unknown}; this method's extra inputs: {valid}")
        if 0 in (prob.batch, prob.heads_q, prob.len_q, prob.len_k):
            out = q.new_zeros(prob.batch, prob.heads_q, prob.len_q, prob.dim_v)
            lse = q.new_full((prob.batch, prob.heads_q, prob.len_q), -math.inf, dtype=torch.float32)
            # keep the graph connected so backward works on empty inputs too
            out = out + 0 * (q.sum() + k.sum() + v.sum())
            return (out, lse) if return_lse else out
        dtype = q.dtype
        if self.upcast_half and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
            inputs = {n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                      for n, t in inputs.items()}
        out, lse = self.forward(q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask,
                                return_lse=return_lse, **inputs)
        out = out.to(dtype)
        if return_lse:
            return out, lse
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prob: Problem, *, causal: bool,
                key_padding_mask: torch.Tensor | None, return_lse: bool,
                **inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute ``(out, lse or None)`` on validated, non-empty inputs."""
        raise NotImplementedError


def _wants_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# ------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register: expected a Method subclass, got {cls!r}")
    if "__dataclass_fields__" not in cls.__dict__ or not cls.__dataclass_params__.frozen:
        raise TypeError(f"register: {cls.__name__} must be a @dataclass(frozen=True)")
    if not cls.name:
        raise TypeError(f"register: {cls.__name__} has no `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"register: the name {cls.name!r} is already taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _lookup(name: str) -> type[Method]:
    _load_builtin_methods()
    if not isinstance(name, str):
        raise AttnZooError(f"method: expected a method name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise AttnZooError(f"method: unknown method {name!r}{hint} (see attnzoo.methods())") from None


def param_names(cls: type[Method]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def get(name: str, **params: Any) -> Method:
    """A configured, reusable method: ``get("sliding_window", window=256)(q, k, v)``."""
    cls = _lookup(name)
    valid = param_names(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise AttnZooError(
            f"{name}: unknown parameter(s) {unknown}; valid parameters: {', '.join(valid) or 'none'}"
        )
    return cls(**params)


def methods() -> dict[str, type[Method]]:
    """Every registered method class, by name, sorted by family then name."""
    _load_builtin_methods()
    order = list(Family)
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (order.index(kv[1].family), kv[0])))


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str
    default: Any
    min: float | None
    max: float | None
    choices: tuple | None
    help: str


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
                      param_infos(cls), dict(cls.inputs), doc)


def param_infos(cls: type) -> tuple[ParamInfo, ...]:
    """The parameters (dataclass fields declared with :func:`param`) of a method or cache policy class."""
    ps = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        ps.append(ParamInfo(f.name, f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)),
                            default, f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices"),
                            f.metadata.get("help", "")))
    return tuple(ps)


_LOADED = False


def _load_builtin_methods() -> None:
    """Import every module of ``attnzoo.catalog`` once (each registers itself)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        importlib.import_module(f"{__package__}.catalog")
