"""Token mixers for the tiny trainer: any registered method behind learned projections, or a learned layer.

:func:`build_mixer` turns a name into an ``nn.Module`` mapping ``x (B, N, d_model)`` to
``(B, N, d_model)``. Names of learned layers (``LAYERS``: GLA's data-dependent gates,
Aaren's learned query, ...) come first, because for those the layer *is* the method;
every other registered method name becomes a :class:`MethodMixer`. ``method:NAME``
forces the plain method even where a layer of that name exists.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import AttnZooError
from ..layers import (AarenLayer, CombinerLayer, DiffQKVLayer, GLALayer, LandmarkLayer, MoHLayer, SEALayer,
                      SeerGateLayer, SparsifinerLayer, SSELayer)
from ..registry import Family, _lookup, param_names

@dataclass(frozen=True)
class LayerSpec:
    """A learned layer usable as a mixer: built as ``cls(d_model, n_heads, **params)``, plus ``causal`` and
    ``max_len`` when its constructor takes them; ``returns_state``: its forward returns ``(y, state)``."""

    cls: type[nn.Module]
    causal_only: bool = False
    returns_state: bool = False
    #: floats of state the layer keeps per sequence when decoding after ``seq_len`` tokens: f(layer, seq_len)
    #: (default: the layer's own ``state_size(seq_len)`` method, if it has one)
    state: Callable[[nn.Module, int], int] | None = None


#: learned layers by mixer name (a layer module registers itself with :func:`register_layer`)
LAYERS: dict[str, LayerSpec] = {}


def register_layer(name: str, cls: type[nn.Module], *, causal_only: bool = False, returns_state: bool = False,
                   state: Callable[[nn.Module, int], int] | None = None) -> None:
    """Make ``cls`` a mixer named ``name`` (see :class:`LayerSpec`)."""
    LAYERS[name] = LayerSpec(cls, causal_only, returns_state, state)


class LayerMixer(nn.Module):
    """A registered learned layer as a mixer: returns ``y`` (dropping a recurrent layer's state) and
    reports its decoding state size."""

    def __init__(self, layer: nn.Module, spec: LayerSpec):
        super().__init__()
        self.layer, self.spec = layer, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y[0] if self.spec.returns_state else y

    def state_size(self, seq_len: int) -> int | None:
        if self.spec.state is not None:
            return self.spec.state(self.layer, seq_len)
        own = getattr(self.layer, "state_size", None)
        return None if own is None else own(seq_len)


def _gla_state(layer: GLALayer, seq_len: int) -> int:
    d_k, d_v = layer.q_proj.out_features, layer.v_proj.out_features
    return d_k * d_v // layer.n_heads  # one (d_k/H) x (d_v/H) matrix per head


def _aaren_state(layer: AarenLayer, seq_len: int) -> int:
    return layer.o_proj.in_features + layer.n_heads  # a running (output, log-sum-exp) per head


register_layer("gla", GLALayer, causal_only=True, returns_state=True, state=_gla_state)
register_layer("aaren", AarenLayer, causal_only=True, returns_state=True, state=_aaren_state)
register_layer("landmark", LandmarkLayer, causal_only=True)
register_layer("sse", SSELayer, causal_only=True)
register_layer("combiner", CombinerLayer, causal_only=True)
register_layer("moh", MoHLayer)
register_layer("diffqkv", DiffQKVLayer)
register_layer("sea", SEALayer)
register_layer("sparsifiner", SparsifinerLayer)
register_layer("seer", SeerGateLayer)


class MethodMixer(nn.Module):
    """Multi-head attention whose attention step is ``attnzoo.attention(..., method=name)``.

    Learned Q, K, V and output projections; the method's parameters are fixed
    at construction (checked then, not at the first forward).
    """

    def __init__(self, d_model: int, n_heads: int, method: str, *, causal: bool = True, **params: Any):
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise AttnZooError(f"MethodMixer: expected n_heads >= 1 dividing d_model={d_model}, got n_heads={n_heads}")
        cls = _lookup(method)
        if cls.inputs:
            raise AttnZooError(f"MethodMixer: method {method!r} needs extra inputs {sorted(cls.inputs)} that a plain "
                               "mixer cannot supply; use its learned layer (see attnzoo.train.mixer_names())")
        unknown = sorted(set(params) - set(param_names(cls)))
        if unknown:
            raise AttnZooError(f"MethodMixer: unknown parameter(s) {unknown} for method {method!r}; "
                               f"valid: {', '.join(param_names(cls)) or 'none'}")
        self.fn = cls(**params)
        if causal and not cls.supports.causal or not causal and not cls.supports.noncausal:
            raise AttnZooError(f"MethodMixer: method {method!r} does not support causal={causal}")
        self.method, self.n_heads, self.causal = method, n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, d = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        o = self.fn(q, k, v, causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(B, n, d))

    def state_size(self, seq_len: int) -> int:
        """Floats this layer keeps per sequence to decode after ``seq_len`` tokens: the recurrent state of
        linear methods, the window's keys and values for local ones, every key and value otherwise."""
        d = self.out.in_features
        h, dh, fn = self.n_heads, d // self.n_heads, self.fn
        if self.method == "lightning":
            return h * dh * dh
        if self.method == "linear":
            return h * dh * (dh + 1)  # + the normaliser column
        if self.method == "performer":
            return h * fn.features * (dh + 1)
        if self.method == "based":
            f = fn.feature_dim
            return h * (1 + f + f * f) * (dh + 1) + 2 * min(fn.window, seq_len) * d
        if type(fn).family is Family.LOCAL:
            return 2 * min(fn.window + getattr(fn, "sinks", 0), seq_len) * d
        return 2 * seq_len * d

    def extra_repr(self) -> str:
        return f"method={self.method!r}, n_heads={self.n_heads}, causal={self.causal}"


def mixer_names(causal: bool = True) -> list[str]:
    """Every name :func:`build_mixer` trains with ``causal``: learned layers, then registered methods with
    gradients and no extra inputs."""
    from ..registry import methods

    layers = [n for n, s in LAYERS.items() if causal or not s.causal_only]
    return sorted(layers) + sorted(n for n, c in methods().items() if not c.inputs and c.supports.grad
                                   and n not in LAYERS and (c.supports.causal if causal else c.supports.noncausal))


def build_mixer(name: str, d_model: int, n_heads: int, *, causal: bool = True, max_len: int = 4096,
                **params: Any) -> nn.Module:
    """A token mixer by name (see the module docstring); ``params`` go to the layer or the method."""
    if not isinstance(name, str):
        raise AttnZooError(f"mixer: expected a name (str), got {type(name).__name__}")
    if name.startswith("method:"):
        return MethodMixer(d_model, n_heads, name.removeprefix("method:"), causal=causal, **params)
    spec = LAYERS.get(name)
    if spec is None:
        return MethodMixer(d_model, n_heads, name, causal=causal, **params)
    if spec.causal_only and not causal:
        raise AttnZooError(f"mixer {name!r}: expected causal=True (this layer is causal only), got causal=False")
    accepted = [p for p in inspect.signature(spec.cls).parameters if p not in ("d_model", "n_heads")]
    unknown = sorted(set(params) - set(accepted) | set(params) & {"causal", "max_len"})
    if unknown:
        raise AttnZooError(f"mixer {name!r}: unknown parameter(s) {unknown}; valid: "
                           f"{', '.join(p for p in accepted if p not in ('causal', 'max_len')) or 'none'}")
    extra = {"causal": causal, "max_len": max_len}
    return LayerMixer(spec.cls(d_model, n_heads, **params, **{k: v for k, v in extra.items() if k in accepted}), spec)
