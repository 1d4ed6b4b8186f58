"""Which implementation runs a method call: ``torch`` (the engines), ``triton`` (:mod:`attnzoo.kernels`)
or ``flex`` (PyTorch's FlexAttention over the method's block layouts).

``attention(..., backend="auto")`` takes ``triton`` when the inputs are on CUDA,
Triton imports and the case is supported, else ``torch``. An explicitly
requested backend that cannot run raises :class:`UnsupportedError` with its
reasons; nothing falls back silently. :func:`explain` lists every backend and
why it would or would not run (xformers' ``not_supported_reasons``).

Each backend is a list of :class:`Runner` (a method class, the reasons it
cannot take a case, how to run it); the first runner whose class the method is
an instance of answers. ``torch`` is the method's own ``forward``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import AttnZooError, UnsupportedError
from .kernels import auto_triton, triton_missing

BACKENDS = ("torch", "triton", "flex")


@dataclass(frozen=True)
class Case:
    """The facts of one call a backend decides on."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    key_padding_mask: torch.Tensor | None
    return_lse: bool
    grad: bool
    inputs: dict


@dataclass(frozen=True)
class Runner:
    """How one backend runs instances of ``cls``: ``check`` lists why it cannot, ``run`` gives ``(out, lse)``;
    ``mods``: ``run`` takes the built-in score_mods (:func:`kernel_mod`); ``sinks``: ``run`` takes ``sinks``
    (else :class:`~attnzoo.registry.Method` merges them after the call)."""

    cls: type
    check: Callable[[Any, Case], list[str]]
    run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    mods: bool = False
    sinks: bool = False


@dataclass(frozen=True)
class Verdict:
    """One line of :func:`explain`: whether ``backend`` runs the call, and if not, why."""

    backend: str
    runs: bool
    reasons: tuple[str, ...] = ()
    note: str = ""  # how it runs, when that differs from the usual path

    def __str__(self) -> str:
        return f"{self.backend}: " + ("runs" + (f" ({self.note})" if self.note else "") if self.runs
                                      else "no: " + "; ".join(self.reasons))


# ------------------------------------------------------------ environment
def _interpreted() -> bool:
    """Kernels run on CPU tensors: defined (or about to be) under TRITON_INTERPRET=1."""
    mod = sys.modules.get("attnzoo.kernels._attn")
    if mod is not None:
        return mod.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _device_reasons(case: Case, backend: str) -> list[str]:
    dev = case.q.device.type
    if dev == "cuda" or (backend == "triton" and dev == "cpu" and _interpreted()):
        return []
    return [f"inputs are on {dev}; the {backend} backend needs CUDA tensors"
            + (" (or TRITON_INTERPRET=1 for CPU tensors)" if backend == "triton" else "")]


def _triton_common(case: Case) -> list[str]:
    why = []
    missing = triton_missing()
    if missing:
        why.append(missing)
    why += _device_reasons(case, "triton")
    if case.q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        why.append(f"dtype {case.q.dtype} (the kernels take float16/bfloat16/float32)")
    if max(case.q.shape[-1], case.v.shape[-1]) > 256:
        why.append(f"head dim {max(case.q.shape[-1], case.v.shape[-1])} > 256")
    return why


def _score_mod(case: Case) -> list[str]:
    return ["score_mod (this backend runs this method without score modifications)"] \
        if case.inputs.get("score_mod") else []


#: what the kernels' score_mod specialisations cover (explain's words)
KERNEL_MODS = ("distance biases (alibi, relative_bias, mods.positional, a user function core.lowering reads as "
               "one, their sums: mods.compose), optionally followed by one softcap; any other function runs on the "
               "torch backend")


def distance_span(len_q: int, len_k: int, q_offset: int | None = None, k_offset: int = 0) -> tuple[int, int]:
    """``(lo, hi)``: the distances ``kv_idx - q_idx`` of a call's scores, queries at ``q_offset + i`` (default
    ``len_k - len_q``, bottom-right aligned) and keys at ``k_offset + j``."""
    q0 = len_k - len_q if q_offset is None else q_offset
    return k_offset - q0 - max(len_q - 1, 0), k_offset + max(len_k - 1, 0) - q0


def kernel_mod(score_mod, q: torch.Tensor, span: tuple[int, int]) -> tuple[dict, list[str]]:
    """A built-in score_mod as the kernels' arguments ``{slopes, table, cap}`` (``{}`` for none), or the reasons
    it cannot be one; ``span``: the call's distances (:func:`distance_span`).

    ``compose(biases..., softcap)`` becomes one ALiBi slope vector (the slopes summed), one relative table (the
    tables brought to the largest radius by repeating their edge entries, shared rows broadcast) and a cap,
    all through differentiable torch ops, so gradients reach the mod's own tensors. Any other distance bias
    (a user function lowered by :mod:`~attnzoo.core.lowering`, :func:`~attnzoo.mods.positional`) joins as the
    table of its values over the call's distances ``span`` (radius ``max(-lo, hi)``; entries beyond the span,
    which no score reads, repeat its edges): the kernels read it by distance like a relative_bias table.
    """
    if score_mod is None:
        return {}, []
    from . import mods
    from .core.scoremod import BiasSum, Composed, DistanceBias, Softcap, Within
    parts, stack = [], [score_mod]
    while stack:  # flatten compositions, in order
        m = stack.pop(0)
        if isinstance(m, (BiasSum, Composed)):
            stack[:0] = list(m.parts)
        else:
            parts.append(m)
    caps = [i for i, m in enumerate(parts) if isinstance(m, Softcap)]
    other = [m for m in parts if not isinstance(m, (DistanceBias, Softcap))]
    if other:
        name = getattr(other[0], "__name__", type(other[0]).__name__)
        return {}, [f"score_mod {name!r} (the kernels apply only {KERNEL_MODS})"]
    if len(caps) > 1 or (caps and caps[0] != len(parts) - 1):
        return {}, [f"score_mod with a softcap before another mod (the kernels apply only {KERNEL_MODS})"]
    Hq, dev = q.shape[1], q.device
    slopes = [m.slopes for m in parts if isinstance(m, mods._Alibi)]
    tables = [m.table for m in parts if isinstance(m, mods._RelativeBias)]
    radius = max(-span[0], span[1], 0)
    tables += [Within(m, span).bias(torch.arange(-radius, radius + 1, device=dev)) for m in parts
               if isinstance(m, DistanceBias) and not isinstance(m, (mods._Alibi, mods._RelativeBias))]
    bad = [f"alibi slopes of shape {tuple(t.shape)} (expected ({Hq},))" for t in slopes if t.numel() != Hq]
    bad += [f"relative_bias table of shape {tuple(t.shape)} (expected rows 1 or {Hq})" for t in tables
            if t.dim() == 2 and t.shape[0] not in (1, Hq)]
    if bad:
        return {}, bad
    out = {"cap": parts[caps[0]].cap} if caps else {}
    if slopes:
        out["slopes"] = sum(t.to(dev, torch.float32) for t in slopes)
    if tables:
        radius = max(t.shape[-1] // 2 for t in tables)
        pos = torch.arange(-radius, radius + 1, device=dev)
        out["table"] = sum(t.to(dev, torch.float32).reshape(-1, t.shape[-1])[
                               :, pos.clamp(-(t.shape[-1] // 2), t.shape[-1] // 2) + t.shape[-1] // 2]
                           for t in tables)
    return out, []


def _case_mod(case: "Case") -> tuple[dict, list[str]]:
    """:func:`kernel_mod` of a call's score_mod over its distances."""
    return kernel_mod(case.inputs.get("score_mod"), case.q, distance_span(case.q.shape[2], case.k.shape[2]))


# ---------------------------------------------------------------- runners
def _kernels():
    from .kernels import attention
    return attention


def _no_grad(case: Case, what: str) -> list[str]:
    """A forward-only runner refuses gradients, to q/k/v or to the score_mod's tensors (a learnable table)."""
    mod = _case_mod(case)[0] if torch.is_grad_enabled() else {}
    if case.grad or any(isinstance(t, torch.Tensor) and t.requires_grad for t in mod.values()):
        return [f"gradients ({what} is forward only)"]
    return []


def _triton_exact(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None, sinks=None, **_):
    return _kernels().flash_attention(q, k, v, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                                      sinks=sinks, **kernel_mod(score_mod, q, distance_span(q.shape[2], k.shape[2]))[0])


def _triton_flash_decode(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None, sinks=None,
                         **_):
    """Split-K (forward only): sinks in the kernel, or merged after it when they are learning (their gradient)."""
    from .core.scoremod import with_sinks
    learn = sinks is not None and sinks.requires_grad and torch.is_grad_enabled()
    valid = None if key_padding_mask is None else key_padding_mask[:, None, :].expand(-1, prob.heads_kv, -1)
    part = _kernels().split_k(q, k, v, scale=prob.scale, causal=causal, valid=valid, splits=m.splits,
                              sinks=None if learn else sinks,
                              **kernel_mod(score_mod, q, distance_span(q.shape[2], k.shape[2]))[0])
    return with_sinks(part.out, part.lse, sinks) if learn else part


def _own_layouts(m, case: Case) -> list[str]:
    from .catalog.sparse._base import LayoutMethod
    if type(m).forward is not LayoutMethod.forward:
        return [f"{m.name} computes more than its layouts in its own forward (only layout methods run here)"]
    return []


def _layouts(m, q, k, prob, causal, key_padding_mask, score_mod=None):
    return m.build_layouts(q, k, prob, causal=causal, key_padding_mask=key_padding_mask, score_mod=score_mod)


def _triton_layouts(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None, sinks=None, **_):
    """The method's layouts (a dynamic method selects on the modified scores) through the layout kernel, merged
    by lse; the first layout's launch adds the sinks."""
    from .core.partial import Partial, merge
    kern = _kernels()
    mod = kernel_mod(score_mod, q, distance_span(q.shape[2], k.shape[2]))[0]
    parts = [Partial(*kern.layout_attention(q, k, v, lay, scale=prob.scale, causal=causal,
                                            key_padding_mask=key_padding_mask, sinks=None if i else sinks, **mod))
             for i, lay in enumerate(_layouts(m, q, k, prob, causal, key_padding_mask, score_mod))]
    return merge(*parts)


def _triton_engines(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, **inputs):
    """The method's own forward (its estimators in fp32, as on torch) with the layout and tiled engines on the
    kernels: for sparse methods that compute more than their layouts (bigbird's global rows, hashing's sorts).
    A score_mod reaches the kernels through the engines: a built-in one (:func:`kernel_mod`) as the kernels'
    specialisation, at the tokens' original positions when the method runs on reordered ones
    (:class:`~attnzoo.core.scoremod.Reordered`: hashing, clustering, 2-D regions)."""
    from .core.blocksparse import LAYOUT_ENGINE
    from .core.exact import TILED_ENGINE
    q, k, v, inputs = _upcast(q, k, v, inputs)
    with LAYOUT_ENGINE.use(_engine_layout), TILED_ENGINE.use(_engine_tiled):
        return m.forward(q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask, return_lse=return_lse,
                         **inputs)


def _engine_mod(score_mod, q, span: tuple[int, int]) -> dict:
    """The kernels' mod arguments for a score_mod reaching an engine override over the distances ``span``
    (``q_pos``/``k_pos`` for a :class:`~attnzoo.core.scoremod.Reordered` one, whose distances are those of its
    original positions); raises when the kernels cannot apply it."""
    from .core.scoremod import Reordered
    pos = {}
    if isinstance(score_mod, Reordered):
        q_pos, k_pos = score_mod.positions()
        pos = {"q_pos": q_pos, "k_pos": k_pos}
        span = (int(k_pos.min() - q_pos.max()), int(k_pos.max() - q_pos.min())) if q_pos.numel() and k_pos.numel() \
            else span
        score_mod = score_mod.mod
    args, why = kernel_mod(score_mod, q, span)
    if why:
        raise UnsupportedError("triton engines: " + "; ".join(why))
    return {**args, **pos}


def _engine_layout(q, k, v, layout, *, scale, causal, key_padding_mask=None, score_mod=None):
    return _kernels().layout_attention(q, k, v, layout, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                       **_engine_mod(score_mod, q, distance_span(q.shape[2], k.shape[2])))


def _engine_tiled(q, k, v, *, scale, causal, key_padding_mask=None, q_offset=None, k_offset=0, score_mod=None):
    mod = _engine_mod(score_mod, q, distance_span(q.shape[2], k.shape[2], q_offset, k_offset))
    if "q_pos" in mod:
        raise UnsupportedError("triton engines: a score_mod at reordered positions in the dense kernel")
    return _kernels().flash_attention(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                      q_offset=q_offset, k_offset=k_offset, **mod)


def _upcast(q, k, v, inputs):
    """Half inputs in fp32, as ``Method.__call__`` gives them to ``forward`` on the torch backend."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return q, k, v, inputs
    return q.float(), k.float(), v.float(), {n: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                             else t for n, t in inputs.items()}


def _sage_check(m, case: Case) -> list[str]:
    why = []
    if m.bits != 8 or not m.smooth_k or m.smooth_q:
        why.append(f"sage with bits={m.bits}, smooth_k={m.smooth_k}, smooth_q={m.smooth_q} (the kernel is "
                   "INT8 with K smoothing, no Q smoothing)")
    return why


def _triton_sage(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, **_):
    return _kernels().sage_attention(q, k, v, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                                     block=m.block)


def _flex_check(m, case: Case) -> list[str]:
    return _own_layouts(m, case)


def _flex_layouts(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None, **_):
    """The method's layouts (a dynamic method selects on the modified scores) on FlexAttention, merged by lse;
    ``score_mod`` is FlexAttention's own (any function; sinks are merged after the call by the method)."""
    from .core.partial import Partial, merge
    from .kernels.flex import flex_layout_attention
    parts = [Partial(*flex_layout_attention(q, k, v, lay, scale=prob.scale, causal=causal,
                                            key_padding_mask=key_padding_mask, score_mod=score_mod))
             for lay in _layouts(m, q, k, prob, causal, key_padding_mask, score_mod)]
    return merge(*parts)


def _flex_exact(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None, **_):
    """Exact attention on FlexAttention: the layout of every key block (:func:`~attnzoo.kernels.flex.dense_layout`)."""
    from .kernels.flex import dense_layout, flex_layout_attention
    lay = dense_layout(q.shape[2], k.shape[2], causal=causal, device=q.device)
    return flex_layout_attention(q, k, v, lay, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                                 score_mod=score_mod)


def _runners() -> dict[str, list[Runner]]:
    """The backends' runners (built on first use: the catalog imports this module's users)."""
    global _RUNNERS
    if _RUNNERS is None:
        from .catalog.exact import Exact, ExactTiled, FlashDecode
        from .catalog.quantized import Sage
        from .catalog.sparse._base import LayoutMethod
        _RUNNERS = {
            "triton": [
                Runner(Exact, lambda m, c: [], _triton_exact, mods=True, sinks=True),
                Runner(ExactTiled, lambda m, c: [], _triton_exact, mods=True, sinks=True),
                Runner(FlashDecode, lambda m, c: _no_grad(c, "split-K decode"), _triton_flash_decode, mods=True,
                       sinks=True),
                *(Runner(cls, lambda m, c: [], _triton_engines, mods=True) for cls in _engine_methods()),
                Runner(LayoutMethod, _own_layouts, _triton_layouts, mods=True, sinks=True),
                Runner(Sage, _sage_check, _triton_sage),
            ],
            "flex": [Runner(Exact, lambda m, c: [], _flex_exact), Runner(ExactTiled, lambda m, c: [], _flex_exact),
                     Runner(LayoutMethod, _flex_check, _flex_layouts)],
        }
        _RUNNERS["triton"] += _linear_runners()
    return _RUNNERS


def _linear_check(m, case: Case) -> list[str]:
    why = []
    if not case.causal:
        why.append("causal=False (one global state: two GEMMs, which the torch engine already is)")
    if case.k.shape[2] == 1:
        why.append("a single key (a recurrent step, not the chunked form)")
    g = case.inputs.get("g")
    if isinstance(g, torch.Tensor) and not why:
        from .kernels.linear import CHUNK, SAFE_LOG, chunk_decay_ok
        if not chunk_decay_ok(g.clamp(min=-1e4)):
            why.append(f"gates decaying below -{SAFE_LOG:g} (log space) within {CHUNK} tokens (the "
                       "factorised per-channel kernel would overflow)")
    return why


def _triton_linear(m, q, k, v, prob, *, causal, key_padding_mask, return_lse, **inputs):
    """The method's own forward (feature maps, gates) with the engine's chunked form on the kernels, in fp32."""
    from .core.linear import CHUNKED
    from .kernels.linear import chunked
    q, k, v, inputs = _upcast(q, k, v, inputs)
    with CHUNKED.use(chunked):
        return m.forward(q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask, return_lse=return_lse,
                         **inputs)


def _engine_methods() -> tuple[type, ...]:
    """Sparse methods that attend only through the layout / tiled engines (without custom query positions)."""
    from .catalog.sparse.bilevel import BilevelRouting
    from .catalog.sparse.hashing import LSH, Hyper, Routing
    from .catalog.sparse.static import BigBird
    return (BigBird, BilevelRouting, LSH, Hyper, Routing)


def _linear_runners() -> list[Runner]:
    from .catalog.linear import GLA, Lightning, Linear, Performer
    return [Runner(cls, _linear_check, _triton_linear) for cls in (Linear, Performer, Lightning, GLA)]


_RUNNERS: dict[str, list[Runner]] | None = None


def _verdict(method, backend: str, case: Case) -> tuple[list[str], Runner | None]:
    if backend == "torch":
        return [], None
    runner = next((r for r in _runners()[backend] if isinstance(method, r.cls)), None)
    if runner is None:
        return [f"no {backend} implementation of {method.name!r}"], None
    why = (_triton_common(case) if backend == "triton" else _flex_common(case)) + runner.check(method, case)
    if backend == "triton":
        why += _case_mod(case)[1] if runner.mods else _score_mod(case)
    return why, runner


def _flex_common(case: Case) -> list[str]:
    """FlexAttention runs on CUDA (compiled) and on CPU (eager, forward only for q, k, v: its CPU backward is
    missing); any score_mod is its own (gradients reach the tensors the mod closes over)."""
    why = []
    if case.q.device.type not in ("cuda", "cpu"):
        why.append(f"inputs are on {case.q.device.type}; the flex backend needs CUDA or CPU tensors")
    if case.q.device.type == "cpu" and case.grad:
        why.append("gradients to q, k, v on CPU (FlexAttention has no CPU backward; the tensors a score_mod "
                   "closes over do get theirs)")
    if getattr(torch.nn.attention, "flex_attention", None) is None and \
            importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        why.append("this torch has no FlexAttention (torch >= 2.5)")
    return why


def choose(method, backend: str, case: Case) -> Runner | None:
    """The runner for ``backend`` (None = the method's own forward); raises when an explicit choice cannot run."""
    if backend not in ("auto", *BACKENDS):
        raise AttnZooError(f"backend: expected one of {', '.join(('auto', *BACKENDS))}, got {backend!r}")
    if backend == "auto":
        if case.q.device.type != "cuda":
            return None
        why, runner = _verdict(method, "triton", case)
        return None if why else runner
    why, runner = _verdict(method, backend, case)
    if why:
        raise UnsupportedError(f"method {method.name!r} cannot run on backend {backend!r}: " + "; ".join(why))
    return runner


def torch_mod_note(score_mod) -> str:
    """How the torch engines run ``score_mod`` forward on CPU (``explain``'s note; backward passes recompute
    slot by slot or tile by tile with the mod, on every device)."""
    from .core import capped
    from .core.scoremod import DistanceBias, capped_parts
    block = "; block layouts without element masks: in the C++ block kernel's row pass (core.blockkernel)"
    if isinstance(score_mod, DistanceBias):
        return ("score_mod: a distance bias (alibi, relative_bias, mods.positional, their sums) inside PyTorch's fused "
                "CPU kernel as its additive mask (exact family and every fused sparse path)" + block)
    parts = capped_parts(score_mod)
    if parts is None:
        name = getattr(score_mod, "__name__", type(score_mod).__name__)
        return (f"score_mod {name!r}: Python code, which no fused kernel can run: the exact family's row-wise tiled "
                "forward (eager ops), sparse methods the block-sparse slot loop")
    where = ("the exact family and every fused sparse path (band, token union, gathered units)" if parts[0] is None
             else "with the bias as its mask: every fused sparse path and the exact family without key padding (with "
                  "it: the row-wise tiled forward)")
    state = {None: " (compiled on first use)", True: "",
             False: "; not built here (no compiler?): instead the exact family's row-wise tiled forward and the "
                    "block-sparse slot loop"}[capped.built()]
    return f"score_mod: {'a soft cap' if parts[0] is None else 'distance biases then a soft cap'} on the C++ " \
           f"soft-cap kernel (core.capped), {where}{state}{block}"


def explain(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, causal: bool = False,
            key_padding_mask: torch.Tensor | None = None, return_lse: bool = False, score_mod=None,
            **params: Any) -> list[Verdict]:
    """Every backend and whether it would run ``attention(q, k, v, method=method, ...)``, with its reasons.

    The first line is what ``backend="auto"`` picks. A capability the method
    itself lacks (e.g. gradients, a score_mod) is a reason for every backend.
    """
    from .api import configure
    from .checks import check_qkv
    from .core.lowering import lower
    m, inputs, _ = configure(method, params)
    prob = check_qkv(q, k, v, key_padding_mask, None)
    user, lowered = score_mod, ""
    if score_mod is not None:  # as Method.__call__ does: a user function as the built-ins it computes
        score_mod, factor, lowered = lower(score_mod, batch=prob.batch, heads_q=prob.heads_q, len_q=prob.len_q,
                                           len_k=prob.len_k, dtype=q.dtype, device=q.device)
        if score_mod is not None:
            inputs = {**inputs, "score_mod": score_mod}
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    case = Case(q, k, v, causal, key_padding_mask, return_lse, grad, inputs)
    base = []
    try:
        m.check_capabilities(prob, causal=causal, key_padding_mask=key_padding_mask, return_lse=return_lse,
                             grad=grad)
        m.check_routes(prob, q.device, score_mod=user, sinks=None)
    except UnsupportedError as e:
        base.append(str(e))
    rows = []
    for b in BACKENDS:
        why = base + _verdict(m, b, case)[0]
        note = ""
        if user is not None and b == "torch":
            note = torch_mod_note(score_mod) if score_mod is not None else "score_mod: none left"
            if lowered.startswith("lowered"):
                note = f"user score_mod {lowered} (core.lowering); {note}"
            elif lowered:
                note += f"; not lowered to built-in mods (core.lowering): {lowered}"
        elif user is not None and b == "triton":
            note = "score_mod as a kernel specialisation (ALiBi slopes / relative table / softcap, fwd and bwd)"
        elif b == "flex" and q.device.type == "cpu":
            note = "eager FlexAttention on CPU: forward only, each call materialises its scores"
        rows.append(Verdict(b, not why, tuple(why), note))
    auto = "torch" if choose(m, "auto", case) is None else "triton"
    picked = next(r for r in rows if r.backend == auto)
    rows.insert(0, Verdict(f"auto ({auto})", picked.runs, picked.reasons, picked.note))
    return rows


def packed(method, q, k, v, cu_q: list[int], cu_k: list[int], *, causal: bool, scale, score_mod, sinks,
           backend: str, inputs: dict, return_lse: bool):
    """A varlen call (offsets already checked) in ONE kernel launch over every packed sequence, or None when
    that does not apply (then each sequence runs as its own call, on ``backend``).

    Applies on the triton backend (``auto``: CUDA inputs) with no extra inputs and a score_mod the kernels take
    (sinks too) to ``exact`` / ``exact_tiled`` (the dense kernel) and to layout-only sparse methods: each
    sequence's layouts are built on that sequence alone (a dynamic method estimates on it), then one launch
    per layout runs them all (:func:`~attnzoo.kernels.attention.varlen_layout_attention`; sequences whose
    layouts differ in block size, e.g. shorter than a block, take one more launch). Same results as the
    per-sequence calls.
    """
    from .catalog.exact import Exact, ExactTiled
    from .catalog.sparse._base import LayoutMethod
    from .checks import check_qkv
    from .registry import Method
    dense = type(method) in (Exact, ExactTiled)
    layouts = isinstance(method, LayoutMethod) and _is_layout_only(type(method)) and \
        type(method).sequence_kv is Method.sequence_kv
    if backend not in ("auto", "triton") or not (dense or layouts) or inputs:
        return None
    if (backend == "auto" and q.device.type != "cuda") or 0 in (q.shape[2], k.shape[2]):
        return None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    case = Case(q, k, v, causal, None, True, grad, {"score_mod": score_mod} if score_mod is not None else {})
    if _triton_common(case):
        return None
    longest = [max(b - a for a, b in zip(c, c[1:])) for c in (cu_q, cu_k)]
    mod, why = kernel_mod(score_mod, q, distance_span(*longest))  # covers every sequence's distances
    if why:
        return None
    prob = check_qkv(q, k, v, None, scale, grad=grad)
    method.check_routes(prob, q.device, score_mod=score_mod, sinks=sinks)
    dev = q.device
    cq, ck = (torch.tensor(c, dtype=torch.int32, device=dev) for c in (cu_q, cu_k))
    if dense:
        method.check_capabilities(prob, causal=causal, key_padding_mask=None, return_lse=return_lse, grad=grad)
        out, lse = _kernels().varlen_attention(q, k, v, cq, ck, longest[0], scale=prob.scale, causal=causal,
                                               sinks=sinks, **mod)
    else:
        per_seq = []
        for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
            if q0 == q1 or k0 == k1:
                per_seq.append(None)
                continue
            qs, ks = q[:, :, q0:q1], k[:, :, k0:k1]
            one = check_qkv(qs, ks, v[:, :, k0:k1], None, scale, grad=grad)
            method.check_capabilities(one, causal=causal, key_padding_mask=None, return_lse=return_lse, grad=grad)
            per_seq.append(_layouts(method.fit(one), qs, ks, one, causal, None, score_mod))
        if all(lays is None for lays in per_seq):
            return None
        out, lse = _kernels().varlen_layout_attention(q, k, v, per_seq, cq, ck, scale=prob.scale, causal=causal,
                                                      sinks=sinks, **mod)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def describe() -> list[tuple[str, str, str]]:
    """``(backend, methods it implements, availability here)`` for ``attnzoo info --backends``."""
    cuda = torch.cuda.is_available()
    missing = triton_missing()
    trit = ("ready" if cuda and not missing else
            missing or ("CPU tensors only, under TRITON_INTERPRET=1 (no CUDA device)" if _interpreted()
                        else "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly)"))
    flex = "ready" if cuda else "CPU tensors only: eager FlexAttention, forward only (no CUDA device)"
    names = {b: _method_names(b) for b in ("triton", "flex")}
    return [("torch", "every method", "ready"),
            ("triton", names["triton"], trit),
            ("flex", names["flex"], flex)]


def _method_names(backend: str) -> str:
    from .registry import methods
    out = []
    for name, cls in methods().items():
        r = next((r for r in _runners()[backend] if issubclass(cls, r.cls)), None)
        if r is not None and (r.cls.__name__ != "LayoutMethod" or _is_layout_only(cls)):
            out.append(name)
    return ", ".join(out)


def _is_layout_only(cls) -> bool:
    from .catalog.sparse._base import LayoutMethod
    return cls.forward is LayoutMethod.forward


def run(runner: Runner, method, q, k, v, prob, *, causal, key_padding_mask, return_lse, inputs):
    """Run ``runner``; the output in q's dtype and the lse in fp32, or fp64 for fp64 inputs (as the torch path
    returns them)."""
    out, lse = runner.run(method, q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask,
                          return_lse=return_lse, **inputs)
    return out.to(q.dtype), (None if lse is None else lse.to(torch.promote_types(lse.dtype, torch.float32)))


__all__ = ["BACKENDS", "Verdict", "auto_triton", "choose", "describe", "explain"]
