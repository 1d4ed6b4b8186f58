"""Score modifications and learnable sinks: what changes the softmax without changing the keys read.

A **score_mod** (FlexAttention's convention) is ``score_mod(score, b, h, q_idx, kv_idx) -> score``,
called on a tensor of pre-softmax scores (already multiplied by the scale) and integer index tensors
broadcastable to it: batch row ``b``, *query* head ``h``, query position ``q_idx`` and key position
``kv_idx``. Positions are on the key axis, bottom-right aligned like attnzoo's causal mask: query
``i`` of ``Nq`` sits at ``Nk - Nq + i``, so a mod written for self-attention also holds for decode
steps and chunked prefill (for ``Nq == Nk`` this is exactly FlexAttention's ``q_idx``). Masking is
applied after the mod. The scores tensor belongs to the engine: outside autograd a mod may update it
in place (the helpers do, which saves a full pass over each tile); under autograd it must not. Write mods
with elementwise torch ops and broadcasting indexing; gradients reach q, k, v and every tensor requiring
grad that the mod reads through torch operations (a learnable bias table; found by running the mod once,
see :func:`attnzoo.core.scoremod.captured_tensors`).

>>> import attnzoo as az
>>> from attnzoo import mods
>>> out = az.attention(q, k, v, causal=True, score_mod=mods.alibi(mods.alibi_slopes(8)))
>>> out = az.attention(q, k, v, causal=True, score_mod=mods.compose(mods.relative_bias(table), mods.softcap(30.0)))

**Sinks** (gpt-oss): ``sinks`` of shape ``(Hq,)`` adds ``exp(sinks[h])`` to head ``h``'s softmax
denominator and no value. A sink is the partial ``(out = 0, lse = sinks[h])`` merged with the
attention result by log-sum-exp (:func:`with_sinks`), so every method that returns an lse takes it.

``alibi``, ``relative_bias``, ``positional(fn, heads)`` (your own function declared to be such a bias) and a
``compose`` of them are *distance biases*
(:class:`attnzoo.core.scoremod.DistanceBias`: ``score + bias[h, kv_idx - q_idx]``): on CPU the exact
family and banded layouts run them inside PyTorch's fused attention kernel as its additive mask. Your own
function is traced once and, when it computes ``a * score + B`` or ``c * tanh(a * score + B)`` (``a``, ``c``
numbers, ``B`` of ``h`` and ``kv_idx - q_idx`` only), runs as those built-ins after a check on the call's
indices (:mod:`attnzoo.core.lowering`); any other mod runs on the generic tiled engines.

``and_masks`` / ``or_masks`` combine mask_mods ``(b, h, q_idx, kv_idx) -> bool``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .core.scoremod import (BiasSum, Composed, DistanceBias, ScoreMod, Softcap, check_score_mod, functional,
                             with_sinks)
from .errors import AttnZooError

__all__ = ["ScoreMod", "alibi", "alibi_slopes", "and_masks", "compose", "or_masks", "positional", "relative_bias",
           "softcap", "with_sinks"]


# ------------------------------------------------------------------ helpers
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes ``2^(-8 h / H)`` (geometric; non-powers of two interleaved as in BLOOM)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise AttnZooError(f"alibi_slopes: num_heads expected a positive int, got {num_heads!r}")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(num_heads - closest)]
    return torch.tensor(base + extra, dtype=torch.float32)


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)`` (a linear penalty on distance; ``slopes`` of shape (Hq,))."""
    _check_table("alibi", "slopes", slopes, 1)
    return _Alibi(slopes)


class _Alibi(DistanceBias):
    def __init__(self, slopes: torch.Tensor) -> None:
        self.slopes = slopes

    def __call__(self, score, b, h, q_idx, kv_idx):
        slope, dist = self.slopes[h].to(score.dtype), (kv_idx - q_idx).to(score.dtype)
        return score + slope * dist if functional(score, self.slopes) else score.addcmul_(slope, dist)

    def bias(self, dist):
        return self.slopes.double().unsqueeze(-1) * dist.to(self.slopes.device, torch.float64)


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise AttnZooError(f"softcap: cap expected a positive finite number, got {cap!r}")
    return Softcap(float(cap))  # the engines recognise it: the tiled forward fuses it, Triton specialises on cap


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """A learned relative-position bias: ``score + table[h, clamp(kv_idx - q_idx, -R, R) + R]``.

    ``table`` is ``(Hq, 2R + 1)`` (one row per query head) or ``(2R + 1,)`` (shared by all heads);
    distances beyond ``R`` share the edge entry. Gradients reach ``table``.
    """
    _check_table("relative_bias", "table", table, None)
    if table.dim() not in (1, 2) or table.shape[-1] % 2 != 1:
        raise AttnZooError(f"relative_bias: table expected shape (Hq, 2R+1) or (2R+1,) with an odd last size, "
                           f"got {tuple(table.shape)}")
    return _RelativeBias(table)


class _RelativeBias(DistanceBias):
    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.radius = table, table.shape[-1] // 2

    def __call__(self, score, b, h, q_idx, kv_idx):
        rel = (kv_idx - q_idx).clamp(-self.radius, self.radius) + self.radius
        bias = (self.table[h, rel] if self.table.dim() == 2 else self.table[rel]).to(score.dtype)
        return score + bias if functional(score, self.table) else score.add_(bias)

    def bias(self, dist):
        rows = self.table.view(-1, self.table.shape[-1])
        return rows[:, dist.to(rows.device).clamp(-self.radius, self.radius) + self.radius]


def compose(*score_mods: ScoreMod) -> ScoreMod:
    """Apply score_mods in order: ``compose(relative_bias(t), softcap(30))`` biases, then caps."""
    for i, m in enumerate(score_mods):
        check_score_mod(m, f"compose argument {i}")
    if not score_mods:
        raise AttnZooError("compose: expected at least one score_mod, got none")
    if all(isinstance(m, DistanceBias) for m in score_mods):
        return BiasSum(score_mods)
    return Composed(score_mods)


def and_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod true where every one of ``mask_mods`` is (FlexAttention's ``and_masks``)."""
    return _combine("and_masks", mask_mods, torch.logical_and)


def or_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod true where any one of ``mask_mods`` is (FlexAttention's ``or_masks``)."""
    return _combine("or_masks", mask_mods, torch.logical_or)


def _combine(name: str, mask_mods: tuple, op) -> Callable:
    from .core.masks import call_mask_mod, check_mask_mod

    if not mask_mods:
        raise AttnZooError(f"{name}: expected at least one mask_mod, got none")
    for i, m in enumerate(mask_mods):
        check_mask_mod(m, f"{name} argument {i}")

    def combined(b, h, q_idx, kv_idx):
        out = call_mask_mod(mask_mods[0], b, h, q_idx, kv_idx)
        for m in mask_mods[1:]:
            out = op(out, call_mask_mod(m, b, h, q_idx, kv_idx))
        return out

    return combined


def positional(score_mod: ScoreMod, heads: int) -> ScoreMod:
    """Declare that ``score_mod`` only adds a bias of the query head and the distance ``kv_idx - q_idx``:
    ``score_mod(score, b, h, q_idx, kv_idx) == score + f(h, kv_idx - q_idx)`` (a learned or computed
    relative-position bias written as your own function). ``heads``: the query heads (``h`` runs over
    ``range(heads)``), or 1 when ``f`` ignores ``h``.

    The engines then treat it like :func:`relative_bias`: once per call they evaluate ``score_mod`` on a zero
    score at one (query, key) pair per distance the call meets (a ``(heads, distances)`` table, with gradients
    to the tensors it closes over) and run that table as a distance bias, inside PyTorch's fused kernel on CPU,
    instead of calling your function on every score (for a 4K causal ``exact`` call: the time of
    ``relative_bias``, not the ~2-3x of a function on the row-wise path). The declaration is yours: the first
    evaluation checks only that the mod is additive (``f`` the same for random scores) and raises otherwise;
    a mod that reads the batch row or absolute positions gives wrong results. The flex backend calls
    ``score_mod`` itself; the Triton kernels read the table (over the call's distances) like a relative_bias.
    """
    check_score_mod(score_mod)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise AttnZooError(f"positional: heads expected a positive int (the query heads, or 1 when the bias ignores "
                           f"h), got {heads!r}")
    return _Positional(score_mod, heads)


class _Positional(DistanceBias):
    def __init__(self, fn: ScoreMod, heads: int) -> None:
        self.fn, self.heads, self.checked = fn, heads, False
        self.__name__ = f"positional({getattr(fn, '__name__', type(fn).__name__)})"

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx)

    def bias(self, dist):
        """``f(h, d)`` for ``dist (L,)``: the mod on zero scores at query ``max(0, -d)``, key ``max(0, -d) + d``."""
        d = dist.view(1, 1, 1, -1)
        q_idx = (-d).clamp(min=0)
        idx = (torch.zeros((1, 1, 1, 1), dtype=torch.long, device=d.device),
               torch.arange(self.heads, device=d.device).view(1, -1, 1, 1), q_idx, q_idx + d)
        zero = torch.zeros(1, self.heads, 1, d.shape[-1], dtype=torch.float64, device=d.device)
        out = self.fn(zero, *idx)
        if not isinstance(out, torch.Tensor) or out.numel() != zero.numel():
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AttnZooError(f"{self.__name__}: expected scores of shape {tuple(zero.shape)} from the mod, got {got}")
        out = out.reshape(self.heads, -1)
        if not self.checked:
            with torch.no_grad():
                r = torch.randn(zero.shape, dtype=torch.float64, device=d.device) * 10
                moved = self.fn(r.clone(), *idx).reshape(self.heads, -1) - r.view(self.heads, -1)
            if not torch.allclose(moved, out.detach().to(moved.dtype), rtol=1e-6, atol=1e-6):
                raise AttnZooError(f"{self.__name__}: the mod is declared positional but is not score + f(h, kv_idx "
                                   f"- q_idx): its change of the scores depends on the scores (max difference "
                                   f"{float((moved - out.detach()).abs().max()):.3g}); use it as a plain score_mod")
            self.checked = True
        return out


def _check_table(where: str, name: str, t: object, ndim: int | None) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise AttnZooError(f"{where}: {name} expected a floating torch.Tensor, got "
                           f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise AttnZooError(f"{where}: {name} expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
