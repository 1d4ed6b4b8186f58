"""Exact softmax attention: the materialised reference, the SDPA dispatch, and
the tiled online-softmax engine with its recomputing backward (docs/methods.md, Engines).

All three share one visibility rule (:mod:`attnzoo.core.masks`): causal with
bottom-right alignment via ``q_offset``/``k_offset``, plus key padding.
Grouped-query attention folds the query group into the row dimension
(``(B, Hkv, G·Nq, D)``) so K and V are never repeated, except in the
reference, whose job is to be obviously right.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import capped
from .fused import attend_exact_backward, band_backward_applies
from .kernel import KERNEL_DTYPES, flash_cpu
from .gqa import fold_groups, repeat_kv, unfold_groups
from .masks import empty_rows, visible_mask
from .override import Override
from .partial import OnlineSoftmax, Partial, Recomputed, grad_inputs, grad_step, masked_softmax, merge
from .scoremod import ModHook, Softcap, apply_score_mod, distance_rows, negligible_gap, tile_index

#: :func:`tiled_attention`'s replacement inside ``TILED_ENGINE.use(impl)`` (a kernel backend)
TILED_ENGINE = Override("attnzoo_tiled_engine")


# ---------------------------------------------------------------- reference
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                    key_padding_mask: torch.Tensor | None = None, q_offset: int | None = None,
                    k_offset: int = 0, score_mod=None, head_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the full score matrix; any float dtype (float64 for oracles). Returns ``(out, lse)``.

    ``score_mod`` (see :mod:`attnzoo.mods`) sees query positions ``q_offset + i``, key positions
    ``k_offset + j`` and query heads ``head_offset + h``; it runs before the mask.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if score_mod is not None:
        scores = apply_score_mod(score_mod, scores, k.shape[2] - q.shape[2] if q_offset is None else q_offset,
                                 k_offset, head_offset)
    mask = visible_mask(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                        q_offset=q_offset, k_offset=k_offset, device=q.device)
    probs, lse = masked_softmax(scores, mask)
    return torch.matmul(probs, v), lse


# -------------------------------------------------------------------- SDPA
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                   key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with attnzoo's semantics.

    SDPA's ``is_causal`` is aligned top-left, so ``Nq != Nk`` uses a
    lower-right causal bias instead. Callers must route inputs with fully
    masked rows elsewhere (SDPA returns NaN there); see :func:`has_empty_rows`.
    """
    len_q, len_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if len_q == 1:  # a decode step: bottom-right, its one query sees every key
        causal = False
        if gqa:  # the query group folded into rows, no mask needed (a grouped SDPA call is ~1.4x slower on CPU)
            out = sdpa_attention(fold_groups(q, k.shape[1]), k, v, scale=scale, causal=False,
                                 key_padding_mask=key_padding_mask)
            return unfold_groups(out, q.shape[1])
    if key_padding_mask is None:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        if len_q == len_k:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if gqa:  # CausalBias does not forward enable_gqa; a dense mask keeps K/V unrepeated
            mask = visible_mask(len_q, len_k, causal=True, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(len_q, len_k), scale=scale)
    mask = visible_mask(len_q, len_k, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                  key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out, lse)`` from PyTorch's CPU flash-attention kernel, or None where it does not apply.

    SDPA's public function drops the lse its CPU kernel computes; the kernel's
    op returns it. It is used for inference only (its backward ignores the
    lse), without padding, with equal head counts or non-causal GQA (the query
    group folded into rows, K/V never repeated), and with causal only for
    ``Nq == Nk`` (its causal mask is top-left). Callers route empty rows away.
    """
    Hq, len_q, Hkv = q.shape[1], q.shape[2], k.shape[1]
    if (q.device.type != "cpu" or key_padding_mask is not None
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
            or (causal and (len_q != k.shape[2] or Hq != Hkv)) or q.shape[-1] != v.shape[-1]):
        return None
    out, lse = flash_cpu(fold_groups(q, Hkv), k, v, scale=scale, causal=causal)
    return unfold_groups(out, Hq), unfold_groups(lse.unsqueeze(-1), Hq).squeeze(-1)


def has_empty_rows(q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                   key_padding_mask: torch.Tensor | None) -> bool:
    return empty_rows(q.shape[2], k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                      batch=q.shape[0], device=q.device) is not None


# ------------------------------------------------------------ key spans
def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: tuple[tuple[int, int], ...], *,
                   scale: float, key_padding_mask: torch.Tensor | None = None, score_mod=None,
                   return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention of ``q (B, Hq, Nq, D)`` over the keys of ``spans``: one or two ascending, disjoint row
    ranges ``(a, b)`` of ``k, v (B, Hkv, Nk, ·)``, every one visible to every query (a generation step of a
    window method: the window, or the sinks and the window). Returns ``(out, lse)`` (lse None when not
    ``return_lse`` and the fastest path does not give it).

    The spans are read in place, never copied: one SDPA call on a single span (no score_mod, no lse wanted);
    else, on CPU in float32/64 without gradients and with no score_mod or a soft cap, one call of the capped
    kernel (:mod:`attnzoo.core.capped`) skipping the rows between two spans; else the tiled engine on each
    span, merged by lse. A ``score_mod`` sees the queries at the bottom right (positions ``Nk - Nq + i``) and
    the keys at their rows; ``key_padding_mask (B, Nk)`` hides keys as usual.
    """
    len_q, len_k = q.shape[2], k.shape[2]
    pad = [None if key_padding_mask is None else key_padding_mask[:, a:b] for a, b in spans]
    cap = score_mod.cap if isinstance(score_mod, Softcap) else None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if len(spans) == 1 and score_mod is None and not return_lse:
        (a, b), kpm = spans[0], pad[0]
        if not has_empty_rows(q, k[:, :, a:b], causal=False, key_padding_mask=kpm):
            return sdpa_attention(q, k[:, :, a:b], v[:, :, a:b], scale=scale, causal=False, key_padding_mask=kpm), None
    if (len(spans) <= 2 and (score_mod is None or cap is not None) and not grad and capped.applies(q, v)
            and k.dtype == q.dtype):
        Hq, Hkv = q.shape[1], k.shape[1]
        a, b = spans[0][0], spans[-1][1]
        skip = (spans[0][1], spans[1][0]) if len(spans) == 2 else None
        mask = None if key_padding_mask is None else torch.cat(pad, 1)[:, None, None, :]
        out, lse = capped.capped_attention(fold_groups(q, Hkv), k[:, :, a:b], v[:, :, a:b], scale=scale, cap=cap,
                                           mask=mask, skip=None if skip is None else (skip[0] - a, skip[1] - a))
        return unfold_groups(out, Hq), unfold_groups(lse.unsqueeze(-1), Hq).squeeze(-1)
    parts = [Partial(*tiled_attention(q, k[:, :, a:b], v[:, :, a:b], scale=scale, causal=False, key_padding_mask=kpm,
                                      q_offset=len_k - len_q, k_offset=a, score_mod=score_mod))
             for (a, b), kpm in zip(spans, pad)]
    return merge(*parts)


# ------------------------------------------------------------ tiled engine
@dataclass(frozen=True)
class TileSpec:
    """Static options of one tiled call (everything but the tensors)."""

    scale: float
    causal: bool
    q_offset: int
    k_offset: int
    q_tile: int
    k_tile: int
    mod: ModHook | None = None  # the call's score_mod, applied to each tile's scores (forward and backward)

    def key_end(self, i1: int, len_k: int) -> int:
        """One past the last key any query of ``[.., i1)`` may see."""
        if not self.causal:
            return len_k
        return max(0, min(len_k, self.q_offset + i1 - self.k_offset))

    def tile_mask(self, i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
        """Causal mask ``(ql, kl)`` of a tile, or None when the tile is fully visible."""
        if not self.causal or self.k_offset + j1 - 1 <= self.q_offset + i0:
            return None
        qi = torch.arange(i0, i1, device=device).unsqueeze(1) + self.q_offset
        kj = torch.arange(j0, j1, device=device).unsqueeze(0) + self.k_offset
        return kj <= qi


def _rows(t: torch.Tensor, groups: int, i0: int, i1: int) -> torch.Tensor:
    """Query rows ``[i0, i1)`` of a ``(B, Hq, N, X)`` tensor as ``(B, Hkv, G·n, X)``."""
    return fold_groups(t[:, :, i0:i1], t.shape[1] // groups)


def _masked_scores(q_rows: torch.Tensor, k_tile: torch.Tensor, groups: int, mask: torch.Tensor | None,
                   pad: torch.Tensor | None, spec: TileSpec, i0: int, j0: int, grads: list | None = None):
    """Scores ``(B, Hkv, G·ql, kl)`` of pre-scaled query rows, modified by the call's score_mod, -inf where
    invisible; with ``grads`` (the backward) also the mod's ``to_raw`` (see :class:`ModHook`)."""
    s = torch.matmul(q_rows, k_tile.transpose(-1, -2))
    to_raw = None
    if spec.mod is not None:  # rows (B, Hkv, G·ql, kl) are the query heads (B, Hq, ql, kl) in order
        B, Hkv, rows, kl = s.shape
        view = s.view(B, Hkv * groups, rows // groups, kl)
        idx = tile_index(view.shape, spec.q_offset + i0, spec.k_offset + j0, device=s.device)
        if grads is None:
            s = spec.mod.scores(view, *idx).view_as(s)
        else:
            mod, to_raw = spec.mod.recompute(view, *idx, grads)
            s = mod.view_as(s)
    if mask is not None:
        B, Hkv, rows, kl = s.shape
        s = s.view(B, Hkv, groups, rows // groups, kl).masked_fill(~mask, -math.inf).view(B, Hkv, rows, kl)
    if pad is not None:
        s = s.masked_fill(~pad, -math.inf)
    return s if grads is None else (s, to_raw)


def tiled_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: TileSpec,
                  key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax attention over ``q_tile × k_tile`` tiles; memory O(N·tile).

    Returns ``(out, lse)`` in q's dtype; rows with no visible key give ``(0, -inf)``.
    """
    B, Hq, len_q, _ = q.shape
    Hkv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    groups = Hq // Hkv
    out = q.new_empty(B, Hq, len_q, dim_v)
    lse = q.new_empty(B, Hq, len_q)
    if _fused_tiles_apply(q, k, v, spec, key_padding_mask):
        if spec.mod is None:
            return _fused_tiles(q, k, v, spec, out, lse)
        if key_padding_mask is not None:
            return _padded_bias_tiles(q, k, v, spec, out, lse, key_padding_mask)
        return _fused_bias_tiles(q, k, v, spec, out, lse)
    if spec.mod is not None and spec.mod.capped is not None and spec.mod.capped[0] is None and capped.applies(q, v):
        return _capped_tiles(q, k, v, spec, key_padding_mask)
    pad = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if _mod_rows(q, k, spec):
        return _mod_row_tiles(q, k, v, spec, out, lse, pad)
    for i0 in range(0, len_q, spec.q_tile):
        i1 = min(len_q, i0 + spec.q_tile)
        rows = _rows(q, groups, i0, i1) * spec.scale
        soft = OnlineSoftmax(rows.shape[:3], dim_v, like=rows)
        for j0 in range(0, spec.key_end(i1, len_k), spec.k_tile):
            j1 = min(spec.key_end(i1, len_k), j0 + spec.k_tile)
            s = _masked_scores(rows, k[:, :, j0:j1], groups, spec.tile_mask(i0, i1, j0, j1, q.device),
                               None if pad is None else pad[..., j0:j1], spec, i0, j0)
            soft.add(s, v[:, :, j0:j1])
        o, ls = soft.result()
        out[:, :, i0:i1] = unfold_groups(o, Hq)
        lse[:, :, i0:i1] = unfold_groups(ls.unsqueeze(-1), Hq).squeeze(-1)
    return out, lse


def _fused_tiles_apply(q, k, v, spec: TileSpec, key_padding_mask) -> bool:
    """Whether :func:`_fused_tiles` (no score_mod) or :func:`_fused_bias_tiles` (a distance bias, alone or
    followed by a soft cap) can run this forward: CPU kernel dtypes, equal head dims, every query sees the
    first key (so no row of any kernel call is empty), no padding but, with a mod, each batch row's kept keys
    one contiguous range (left or right padding: :func:`_padded_bias_tiles`)."""
    mod = spec.mod
    return (q.device.type == "cpu" and q.dtype in KERNEL_DTYPES and q.shape[-1] == v.shape[-1]
            and (mod is None or mod.distance is not None
                 or (mod.capped is not None and mod.capped[0] is not None and capped.applies(q, v)))
            and (key_padding_mask is None or (mod is not None and _key_ranges(key_padding_mask) is not None))
            and k.shape[2] > 0 and (not spec.causal or spec.q_offset >= spec.k_offset))


def _key_ranges(key_padding_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """Each batch row's kept keys as one range ``[a, e)`` (``(0, 0)``: none), or None when a row has holes."""
    kept = key_padding_mask.sum(-1)
    first = torch.where(kept > 0, key_padding_mask.int().argmax(-1), 0)
    if not bool((key_padding_mask.cumsum(-1).gather(-1, (first + kept - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
                 == kept).all()):
        return None
    return list(zip(first.tolist(), (first + kept).tolist()))


def _padded_bias_tiles(q, k, v, spec: TileSpec, out: torch.Tensor, lse: torch.Tensor, key_padding_mask):
    """:func:`_fused_bias_tiles` with left / right key padding: each batch row attends its kept keys
    ``[a, e)`` as a call of its own (keys at positions ``k_offset + a`` on; causal rows before the first kept
    key see nothing: ``(0, -inf)``), so the bias stays one Hankel view and no mask is materialised."""
    for b, (a, e) in enumerate(_key_ranges(key_padding_mask)):
        sub = dataclasses.replace(spec, k_offset=spec.k_offset + a)
        r0 = 0 if not spec.causal else max(0, min(q.shape[2], sub.k_offset - spec.q_offset))
        if e == a:
            r0 = q.shape[2]
        out[b, :, :r0], lse[b, :, :r0] = 0, -math.inf
        if r0 < q.shape[2]:
            _fused_bias_tiles(q[b:b + 1, :, r0:], k[b:b + 1, :, a:e], v[b:b + 1, :, a:e],
                              dataclasses.replace(sub, q_offset=spec.q_offset + r0), out[b:b + 1, :, r0:],
                              lse[b:b + 1, :, r0:])
    return out, lse


#: query rows per tile of the fused causal forward under GQA (bounds the diagonal's K/V copy to Hq heads)
_FUSED_ROWS = 2048


def _fused_tiles(q, k, v, spec: TileSpec, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled forward on PyTorch's fused CPU kernel, tiles merged by lse.

    Non-causal: one call (the kernel tiles internally). Causal: the keys
    before a query tile's first position are visible to every row of it (one
    unmasked call, the query group folded into rows); the next keys, as many
    as the tile has rows, are its diagonal square, where the kernel's own
    top-left causal mask is exactly attnzoo's (K/V repeated to the query heads
    for GQA). Without GQA the tile is every query (a prefill is then one
    causal call); with it, :data:`_FUSED_ROWS` rows bound the repeated copy.
    Every row of every call sees at least one key, so the kernel's lse of an
    empty row (0) never arises. Few, large calls: the kernel tiles internally,
    and each extra call adds a merge of small tensors.
    """
    Hq, len_q, Hkv, len_k = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    groups = Hq // Hkv
    tile = _FUSED_ROWS if spec.causal and groups > 1 else len_q
    for i0 in range(0, len_q, tile):
        i1 = min(len_q, i0 + tile)
        end = spec.key_end(i1, len_k)
        first = min(end, spec.q_offset + i0 - spec.k_offset) if spec.causal else end  # keys every row sees
        parts = []
        if first > 0:
            o, ls = flash_cpu(_rows(q, groups, i0, i1), k[:, :, :first], v[:, :, :first], scale=spec.scale)
            parts.append(Partial(unfold_groups(o, Hq), unfold_groups(ls.unsqueeze(-1), Hq).squeeze(-1)))
        if first < end:
            kd, vd = (repeat_kv(t[:, :, first:end], Hq) for t in (k, v))
            parts.append(Partial(*flash_cpu(q[:, :, i0:i1], kd, vd, scale=spec.scale, causal=True)))
        o, ls = merge(*parts)
        out[:, :, i0:i1] = o
        lse[:, :, i0:i1] = ls
    return out, lse


#: query rows per kernel call of the causal forward with a distance bias: the hidden half of each call's
#: diagonal square is computed (under a -inf mask); 768 rows is where the kernel takes its largest query blocks
_BIAS_ROWS = 768


def _fused_bias_tiles(q, k, v, spec: TileSpec, out: torch.Tensor, lse: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled forward with a distance-bias score_mod (:class:`~attnzoo.core.scoremod.DistanceBias`) on
    PyTorch's fused CPU kernel, the bias as its additive mask; never a (query, key) grid of indices.

    A kernel call takes a tile of query rows, reversed, and every key a row of it sees: element ``(r, c)``
    then has distance ``d0 + r + c``, so the mask (the bias, -inf where causal hides a key) is an
    overlapping strided view of one vector per head (:func:`~attnzoo.core.scoremod.distance_rows`).
    Non-causal, one call takes every query. Far keys of a steep bias are dropped where that cannot
    change the result (:func:`~attnzoo.core.scoremod.negligible_gap`): it keeps the kernel out of subnormal
    arithmetic, several times slower on CPUs. A bias followed by a soft cap runs the same tiles on
    :mod:`attnzoo.core.capped` (no key dropped: capped scores are bounded, every key weighs).
    """
    B, Hq, len_q, _ = q.shape
    len_k = k.shape[2]
    mod, cap = (spec.mod.distance, None) if spec.mod.distance is not None else spec.mod.capped
    dtype = torch.promote_types(torch.float32, q.dtype)
    sees_self = spec.q_offset >= spec.k_offset and spec.q_offset + len_q <= spec.k_offset + len_k
    floor = None
    if sees_self and cap is None:  # every row sees distance 0: its largest visible bias is at least bias(0)
        with torch.no_grad():
            zero = mod.bias(torch.zeros(1, dtype=torch.long, device=q.device)).to(q.device, dtype)
        floor = zero - negligible_gap(q, k, spec.scale, len_k).to(dtype)
    tile = _BIAS_ROWS if spec.causal else len_q
    for i0 in range(0, len_q, tile):
        i1 = min(len_q, i0 + tile)
        rows, end = i1 - i0, spec.key_end(i1, len_k)
        w = distance_rows(mod, spec.k_offset - spec.q_offset - i1 + 1, rows + end - 1, dtype, q.device,
                          causal=spec.causal, floor=floor)
        hankel = w.as_strided((w.shape[0], rows, end), (w.stride(0), 1, 1))
        o, ls = _biased_kernel(q[:, :, i0:i1].flip(2), k[:, :, :end], v[:, :, :end], hankel, spec.scale, cap)
        out[:, :, i0:i1], lse[:, :, i0:i1] = o.flip(2), ls.flip(2)
    return out, lse


def _biased_kernel(q, k, v, bias: torch.Tensor, scale: float, cap: float | None = None):
    """The fused kernel on ``q (B, Hq, r, D)``, ``k, v (B, Hkv, c, D)`` with the additive mask ``bias
    (Hq or 1, r, c)`` shared by the batch rows (with ``cap``: :mod:`attnzoo.core.capped`'s, the cap after the
    bias). Under GQA the kernel's batch axis runs over the query group (K and V expanded along it, no copy;
    one call per batch row): query head ``h·G + g`` is kernel entry ``(g, h)``."""
    B, Hq, rows, _ = q.shape
    Hkv = k.shape[1]
    groups = Hq // Hkv
    kernel = flash_cpu if cap is None else functools.partial(capped.capped_attention, cap=cap)
    if groups == 1:
        return kernel(q, k, v, scale=scale, mask=bias.unsqueeze(0).expand(B, Hq, *bias.shape[1:]))
    if bias.shape[0] == 1:
        mask = bias.expand(groups, Hkv, *bias.shape[1:])
    else:
        mask = bias.view(Hkv, groups, *bias.shape[1:]).transpose(0, 1)
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    lse = torch.empty(q.shape[:3], dtype=bias.dtype, device=q.device)
    for b in range(B):
        kb, vb = (t[b].expand(groups, *t.shape[1:]) for t in (k, v))
        o, ls = kernel(q[b].view(Hkv, groups, rows, -1).transpose(0, 1), kb, vb, scale=scale, mask=mask)
        out[b], lse[b] = o.transpose(0, 1).reshape(Hq, rows, -1), ls.transpose(0, 1).reshape(Hq, rows)
    return out, lse


def _capped_tiles(q, k, v, spec: TileSpec, key_padding_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled forward with a soft cap on the fused CPU extension (:mod:`attnzoo.core.capped`): one call,
    the query group of a KV head on the kernel's second batch axis (K and V expanded along it, no copy),
    the bottom-right causal rule as its offset, key padding as a mask broadcast over heads and rows."""
    B, Hq, len_q, _ = q.shape
    Hkv, len_k = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    qg = q.reshape(B * Hkv, groups, len_q, q.shape[3])
    kg, vg = (t.reshape(B * Hkv, 1, len_k, t.shape[3]) for t in (k, v))
    kg = kg.transpose(-1, -2).contiguous().transpose(-1, -2)  # K^T contiguous: the score GEMM reads it as is
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, None, :].expand(B, Hkv, 1, 1, len_k).reshape(B * Hkv, 1, 1, len_k)
    out, lse = capped.capped_attention(qg, kg, vg, scale=spec.scale, cap=spec.mod.cap, causal=spec.causal,
                                       offset=spec.q_offset - spec.k_offset, mask=mask)
    return out.view(B, Hq, len_q, -1), lse.view(B, Hq, len_q)


#: query positions per score block of the row-wise forward with a score_mod (:func:`_mod_row_tiles`) ...
_MOD_ROWS = 64
#: ... and the most scores (all heads) one block may hold; fewer positions than _MOD_MIN_ROWS: key tiles instead
_MOD_BLOCK = 1 << 23
_MOD_MIN_ROWS = 16


def _mod_rows(q: torch.Tensor, k: torch.Tensor, spec: TileSpec) -> int:
    """Query positions per block of :func:`_mod_row_tiles` for this call, 0 where it does not run (no
    score_mod, a distance bias (the fused kernel runs those), or rows too long for a bounded block)."""
    if spec.mod is None or spec.mod.distance is not None:
        return 0
    rows = min(_MOD_ROWS, _MOD_BLOCK // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
    return rows if rows >= _MOD_MIN_ROWS else 0


def _fixed_shift(cap: float | None, dtype: torch.dtype) -> float | None:
    """The softcap whose scores may skip the row maximum (shifted by ``cap`` instead, see
    :meth:`OnlineSoftmax.add`): ``exp(-2 cap)``, the smallest weight, must stay a normal number of ``dtype``."""
    if cap is None or 2 * cap > -math.log(torch.finfo(dtype).tiny) - 8:
        return None
    return cap


def _mod_row_tiles(q, k, v, spec: TileSpec, out: torch.Tensor, lse: torch.Tensor, pad: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled forward with a score_mod other than a distance bias: a block of query positions (every
    head) against every key they see in one GEMM, the mod on it, one softmax pass (no online rescale).

    Fewer, larger operations than key tiles: the mod's elementwise passes are what costs here (the GEMMs
    are what PyTorch's fused kernel does too). K is transposed once so the score GEMM reads it contiguous;
    the causal mask touches only the block's diagonal columns. A soft cap (:class:`Softcap`) is fused:
    ``1 / cap`` joins the query scale, and ``cap·tanh(s) - cap`` (in place) is already shifted by the row's
    upper bound, so no maximum pass either.
    """
    B, Hq, len_q, _ = q.shape
    Hkv, len_k = k.shape[1], k.shape[2]
    groups, block = Hq // Hkv, _mod_rows(q, k, spec)
    cap = _fixed_shift(spec.mod.cap, q.dtype)
    k_rows = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # (B, Hkv, Nk, D) laid out as (B, Hkv, D, Nk)
    for i0 in range(0, len_q, block):
        i1 = min(len_q, i0 + block)
        end = spec.key_end(i1, len_k)
        soft = OnlineSoftmax((B, Hkv, groups * (i1 - i0)), v.shape[3], like=q)
        if end > 0:
            if cap is None:
                s = _masked_scores(_rows(q, groups, i0, i1) * spec.scale, k_rows[:, :, :end], groups, None, None,
                                   spec, i0, 0)
            else:
                s = torch.matmul(_rows(q, groups, i0, i1) * (spec.scale / cap), k_rows[:, :, :end].transpose(-1, -2))
                s = torch.add(s.new_tensor(-cap), s.tanh_(), alpha=cap, out=s)
            diag = min(end, max(0, spec.q_offset + i0 + 1 - spec.k_offset)) if spec.causal else end
            mask = spec.tile_mask(i0, i1, diag, end, q.device)
            if mask is not None:
                s.view(B, Hkv, groups, i1 - i0, end)[..., diag:].masked_fill_(~mask, -math.inf)
            if pad is not None:
                s.masked_fill_(~pad[..., :end], -math.inf)
            soft.add(s, v[:, :, :end], shift=cap)
        o, ls = soft.result()
        out[:, :, i0:i1] = unfold_groups(o, Hq)
        lse[:, :, i0:i1] = unfold_groups(ls.unsqueeze(-1), Hq).squeeze(-1)
    return out, lse


def tiled_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   d_out: torch.Tensor, d_lse: torch.Tensor | None, spec: TileSpec,
                   key_padding_mask: torch.Tensor | None = None, mod_grads: list | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of tiled attention, recomputing probabilities from the saved ``lse``.

    ``out``/``lse`` may be the *global* result of a larger key set of which
    ``k``/``v`` are a slice (ring attention): the returned gradients are then
    this slice's contribution, exactly as in FlashAttention-2's backward.
    With a score_mod, its captured tensors' gradients are added into ``mod_grads``.
    """
    B, Hq, len_q, _ = q.shape
    Hkv, len_k = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    lse_safe, delta = grad_inputs(out, lse, d_out, d_lse)
    if mod_grads is None:
        mod_grads = [None] * (len(spec.mod.captured) if spec.mod is not None else 0)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    pad = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    for i0 in range(0, len_q, spec.q_tile):
        i1 = min(len_q, i0 + spec.q_tile)
        q_rows = _rows(q, groups, i0, i1)
        do_rows = _rows(d_out, groups, i0, i1)
        lse_rows = _rows(lse_safe.unsqueeze(-1), groups, i0, i1)
        delta_rows = _rows(delta.unsqueeze(-1), groups, i0, i1)
        dq_rows = torch.zeros_like(q_rows)
        for j0 in range(0, spec.key_end(i1, len_k), spec.k_tile):
            j1 = min(spec.key_end(i1, len_k), j0 + spec.k_tile)
            s, to_raw = _masked_scores(q_rows * spec.scale, k[:, :, j0:j1], groups,
                                       spec.tile_mask(i0, i1, j0, j1, q.device),
                                       None if pad is None else pad[..., j0:j1], spec, i0, j0, mod_grads)
            dq_t, dk_t, dv_t = grad_step(s, lse_rows, delta_rows, q_rows, do_rows, k[:, :, j0:j1], v[:, :, j0:j1],
                                         to_raw)
            dq_rows += dq_t
            dk[:, :, j0:j1] += dk_t
            dv[:, :, j0:j1] += dv_t
        dq[:, :, i0:i1] = unfold_groups(dq_rows, Hq)
    return dq * spec.scale, dk * spec.scale, dv


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                    key_padding_mask: torch.Tensor | None = None, q_offset: int | None = None,
                    k_offset: int = 0, q_tile: int = 256, k_tile: int = 512,
                    score_mod=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable tiled exact attention; returns ``(out, lse)`` (the lse is differentiable too).

    A ``score_mod`` runs on each tile's scores, in the forward and in the recomputing backward, where
    its gradient reaches q, k and the tensors it closes over (:class:`~attnzoo.core.scoremod.ModHook`). On
    CPU the backward without a mod, or with a distance bias and/or a soft cap, runs on the C++ band backward
    kernel (:func:`~attnzoo.core.fused.attend_exact_backward`), other mods on :func:`tiled_backward`.
    Inside ``TILED_ENGINE.use(impl)`` the call goes to ``impl`` (a kernel backend).
    """
    q_offset = k.shape[2] - q.shape[2] if q_offset is None else q_offset
    impl = TILED_ENGINE.get()
    if impl is not None:
        mod = {} if score_mod is None else {"score_mod": score_mod}  # the backend applies the mod or refuses it
        return impl(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask, q_offset=q_offset,
                    k_offset=k_offset, **mod)
    hook = None if score_mod is None else ModHook(score_mod, like=q, grad=torch.is_grad_enabled(), q_idx=q_offset,
                                                  kv_idx=k_offset, span=(k_offset - q_offset - q.shape[2] + 1,
                                                                         k_offset + k.shape[2] - 1 - q_offset))
    spec = TileSpec(scale, causal, q_offset, k_offset, q_tile, k_tile, hook)

    def forward(q, k, v, pad):
        return tiled_forward(q, k, v, spec, pad)

    def backward(q, k, v, pad, out, lse, d_out, d_lse, grads):
        if band_backward_applies(q, k, v, hook):  # no mod, or one the C++ kernel recomputes
            return attend_exact_backward(q, k, v, out, lse, d_out, d_lse, scale=scale, causal=causal,
                                         offset=q_offset - k_offset, key_padding_mask=pad, mod=hook, grads=grads)
        return tiled_backward(q, k, v, out, lse, d_out, d_lse, spec, pad, grads)

    return Recomputed.apply(q, k, v, key_padding_mask, forward, backward, hook, *(hook.captured if hook else ()))
