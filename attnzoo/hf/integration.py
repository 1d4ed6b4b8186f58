"""``apply`` / ``remove`` / ``capture_qkv``: route a transformers model's attention through attnzoo."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel

from ..errors import AttnZooError, UnsupportedError
from ..plan.file import Plan as PlanFile
from . import plan as plans
from .adapter import (_EXACT, ATTN_NAME, CAPTURE_ATTR, SCAN_ATTR, SPEC_ATTR, STEP_ATTR, attnzoo_attention,
                      attnzoo_mask, check_decode, decode_spec)

#: the transformers versions attnzoo.hf is written and tested for (also pyproject's ``hf`` extra)
SUPPORTED_TRANSFORMERS = (5, 6)  # major versions: >= 5.0, < 6
_ORIGINAL_ATTR = "_attnzoo_original_attn_implementation"


def check_transformers_version(version: str | None = None) -> None:
    """Raise UnsupportedError outside the supported transformers versions."""
    version = version or transformers.__version__
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise UnsupportedError(f"transformers: cannot parse the version {version!r}") from None
    lo, hi = SUPPORTED_TRANSFORMERS
    if not lo <= major < hi:
        raise UnsupportedError(f"transformers: attnzoo.hf supports versions >={lo}.0,<{hi}; found {version}")


def register() -> None:
    """Register attnzoo's attention and mask functions with transformers under :data:`ATTN_NAME` (idempotent)."""
    AttentionInterface.register(ATTN_NAME, attnzoo_attention)
    AttentionMaskInterface.register(ATTN_NAME, attnzoo_mask)


@functools.cache
def _routes_through_interface(cls: type) -> bool:
    """Whether a module class's forward calls transformers' attention interface."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def attention_layers(model: torch.nn.Module) -> dict[int, list[torch.nn.Module]]:
    """The model's attention modules by layer index; UnsupportedError when they cannot be routed."""
    if not isinstance(model, PreTrainedModel):
        raise AttnZooError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    found: dict[int, list[torch.nn.Module]] = {}
    unroutable = []
    for name, m in model.named_modules():
        if "Attention" not in type(m).__name__ or not isinstance(getattr(m, "layer_idx", None), int):
            continue
        if _routes_through_interface(type(m)):
            found.setdefault(m.layer_idx, []).append(m)
        else:
            unroutable.append(f"{name} ({type(m).__name__})")
    if unroutable or not found or not type(model)._can_set_attn_implementation():
        what = ", ".join(unroutable[:3]) or "no attention layer calling transformers' AttentionInterface was found"
        raise UnsupportedError(f"{type(model).__name__}: attention cannot be routed through attnzoo ({what}); "
                               "only models whose attention calls ALL_ATTENTION_FUNCTIONS are supported")
    n = len(found)
    expected = getattr(model.config.get_text_config(), "num_hidden_layers", n)
    if sorted(found) != list(range(n)) or n != expected:
        raise UnsupportedError(f"{type(model).__name__}: found attention layers {sorted(found)}, expected "
                               f"0..{expected - 1}")
    return found


def _num_heads(module: torch.nn.Module) -> int:
    heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
    return int(heads or module.config.num_attention_heads)


def apply(model: PreTrainedModel, method: str | Mapping = "exact", *, decode: str = "auto",
          **params: Any) -> PreTrainedModel:
    """Route ``model``'s attention through attnzoo: ``apply(model, "sliding_window", window=64)``,
    ``apply(model, plan)`` (see :mod:`attnzoo.hf.plan`) or ``apply(model, attnzoo.plan.load("plan.json"))``
    (a plan file, checked against the model's shapes). Returns the model (modified in place).

    ``decode`` says how generation steps (at most 16 queries against a longer cache) run:
    ``"auto"`` runs a dynamic sparse method's steps as exact attention (its estimate reads every key, so
    one query cannot pay for it; the prompt still runs the method), ``"dense"`` every non-exact method's,
    ``"method"`` keeps the method on every call. :func:`decode_route` says which a model does.

    Re-applying replaces the previous plan; :func:`remove` restores the original attention.
    Parameters of a layer's methods may also be passed per call: ``model(**inputs, window=32)``.
    """
    check_transformers_version()
    check_decode(decode)
    if isinstance(method, PlanFile):
        method.check_model(model)
        method = method.apply_plan()
    layers = attention_layers(model)
    heads = {i: {_num_heads(m) for m in ms} for i, ms in layers.items()}
    if any(len(h) != 1 for h in heads.values()) or len({next(iter(h)) for h in heads.values()}) != 1:
        raise UnsupportedError(f"{type(model).__name__}: layers with different head counts {heads} are not supported")
    specs = plans.resolve(method, params, num_layers=len(layers), num_heads=next(iter(heads[0])))
    for spec in specs:
        for m in layers[spec.layer]:
            _check_mode(spec, bool(getattr(m, "is_causal", True)))
    register()
    original = getattr(model, _ORIGINAL_ATTR, model.config._attn_implementation)
    for spec in specs:
        step = decode_spec(spec, decode)
        for m in layers[spec.layer]:
            setattr(m, SPEC_ATTR, spec)
            setattr(m, STEP_ATTR, step)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        _clear(model, layers)
        raise UnsupportedError(f"{type(model).__name__}: transformers refused attn_implementation={ATTN_NAME!r}")
    setattr(model, _ORIGINAL_ATTR, original)
    return model


def _check_mode(spec: plans.LayerSpec, causal: bool) -> None:
    """Refuse, before any forward, a method that cannot run the layer's causal / non-causal attention."""
    for g in spec.groups:
        s = g.method.supports
        if not (s.causal if causal else s.noncausal):
            mode = "causal=True" if causal else "causal=False"
            raise UnsupportedError(f"method {g.method.name!r} does not support {mode}, which layer {spec.layer} "
                                   f"of this model runs ({'causal' if s.causal else 'non-causal'} only)")


def _clear(model: PreTrainedModel, layers: dict[int, list[torch.nn.Module]]) -> None:
    for ms in layers.values():
        for m in ms:
            for attr in (SPEC_ATTR, STEP_ATTR, SCAN_ATTR):
                m.__dict__.pop(attr, None)


def is_applied(model: torch.nn.Module) -> bool:
    return hasattr(model, _ORIGINAL_ATTR)


def remove(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`apply`: the model's original attention implementation comes back."""
    if not is_applied(model):
        raise AttnZooError(f"model: attnzoo was not applied to this {type(model).__name__}")
    _clear(model, attention_layers(model))
    model.set_attn_implementation(getattr(model, _ORIGINAL_ATTR))
    delattr(model, _ORIGINAL_ATTR)
    return model


def layer_plan(model: PreTrainedModel) -> list[plans.LayerSpec]:
    """The plan :func:`apply` installed, one LayerSpec per layer."""
    if not is_applied(model):
        raise AttnZooError(f"model: attnzoo was not applied to this {type(model).__name__}")
    return [ms[0].__dict__[SPEC_ATTR] for _, ms in sorted(attention_layers(model).items())]


def decode_route(model: PreTrainedModel) -> str:
    """How the applied plan runs generation steps (see :func:`apply`'s ``decode``): ``"dense"`` (every layer's
    steps are exact attention), ``"method"`` (every layer's steps run its plan's methods, some non-exact) or
    ``"mixed"``."""
    if not is_applied(model):
        raise AttnZooError(f"model: attnzoo was not applied to this {type(model).__name__}")
    layers = [ms[0].__dict__ for _, ms in sorted(attention_layers(model).items())]
    if all(g.method.name in _EXACT for m in layers for g in m[STEP_ATTR].groups):
        return "dense"
    return "method" if all(m[STEP_ATTR] is m[SPEC_ATTR] for m in layers) else "mixed"


@torch.no_grad()
def capture_qkv(model: PreTrainedModel, inputs: Mapping[str, Any], *, return_output: bool = False):
    """Run ``model(**inputs)`` once and return, per layer, the ``(q, k, v)`` its attention received
    (``(B, H, S, D)``, after RoPE and the cache update), as recorded by attnzoo's adapter;
    with ``return_output=True``, ``(per-layer records, the model's output)``.

    A model without an attnzoo plan is captured under ``exact`` and restored afterwards.
    """
    applied_here = not is_applied(model)
    if applied_here:
        apply(model, "exact")
    layers = attention_layers(model)
    records: dict[int, list] = {}
    try:
        for i, ms in layers.items():
            records[i] = []
            for m in ms:
                setattr(m, CAPTURE_ATTR, records[i])
        output = model(**inputs)
    finally:
        for ms in layers.values():
            for m in ms:
                if hasattr(m, CAPTURE_ATTR):
                    delattr(m, CAPTURE_ATTR)
        if applied_here:
            remove(model)
    missing = [i for i, r in records.items() if len(r) != 1]
    if missing:
        raise UnsupportedError(f"capture_qkv: layers {missing} did not call attention exactly once")
    qkv = [records[i][0] for i in sorted(records)]
    return (qkv, output) if return_output else qkv
