"""Block-sparse and token-gather attention: one layout format, one executor (docs/methods.md, Engines).

The layouts (:class:`BlockLayout`, :class:`TokenLayout`, re-exported here)
live in :mod:`attnzoo.core.layout`, which also documents ``mask_mod``.

:func:`attend` runs either layout: for each slot it gathers the selected key
blocks of *every* query block with one index, does one batched matmul over
all query blocks and folds the result into an online softmax, so the cost is
O(N · S · block · D) with Python looping only over the ``S`` slots. GQA reads
the shared KV head without repeating K/V: a layout shared by a KV head's
query group folds the group into the query rows. The backward pass recomputes
the probabilities slot by slot from the saved log-sum-exp (as
:func:`attnzoo.core.exact.tiled_backward` does), so training memory stays
O(N · D). Results over disjoint key sets merge exactly by lse
(:func:`attend_all`). Forward passes on CPU take the fused paths of
:mod:`attnzoo.core.fused` where they apply, and so do the backward passes of
banded layouts (its C++ band backward kernel) and of other block lists
(:mod:`attnzoo.core.blockbackward`); a score_mod there only if it is a
distance bias and/or soft cap (learned tables and slopes included).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import AttnZooError, UnsupportedError
from . import blockbackward, blockkernel, capped
from .fused import (attend_band, attend_band_backward, attend_token_union, band_backward_applies, fix_empty_rows,
                    fused_applies, fused_kernel, fused_mod as _fused_mod)
from .kernel import additive_mask, flash_cpu
from .layout import BlockLayout, Layout, TokenLayout, band_plan, check_layout
from .masks import call_mask_mod
from .override import Override
from .partial import OnlineSoftmax, Partial, Recomputed, grad_inputs, grad_step, merge
from .scoremod import DistanceBias, ModHook, ScoreMod, gathered_bias

#: :func:`attend`'s replacement inside ``LAYOUT_ENGINE.use(impl)`` (a kernel backend; no custom query positions)
LAYOUT_ENGINE = Override("attnzoo_layout_engine")
#: keys a query block reads per executor pass (key blocks are grouped up to this width)
_PASS_KEYS = 1024
#: gathered key/value/mask elements per chunk of query blocks on the fused path (bounds its memory)
_FUSED_CHUNK = 1 << 24
#: mask elements the fused path keeps on a reused layout (additive, in q's dtype; all chunks together)
_FUSED_MASK_CACHE = 1 << 24


# ----------------------------------------------------------------- executor
class _Plan:
    """Everything one executor call needs besides q/k/v: the layout as slots of key units."""

    def __init__(self, layout: Layout, *, batch: int, heads_q: int, heads_kv: int, len_q: int, len_k: int,
                 scale: float, causal: bool, q_positions: torch.Tensor | None, device,
                 mod: ModHook | None = None) -> None:
        self.mod = mod
        lb, lh = check_layout(layout, batch=batch, heads_q=heads_q, heads_kv=heads_kv, len_q=len_q, len_k=len_k,
                              causal=causal)
        self.scale, self.causal, self.len_q, self.len_k = scale, causal, len_q, len_k
        self.heads_q, self.heads_kv = heads_q, heads_kv
        groups = heads_q // heads_kv
        self.gl = groups if (lh == heads_q and groups > 1) else 1  # query heads with their own layout rows
        h1 = 1 if lh == 1 else heads_kv
        self.mask_mod = layout.mask_mod
        if isinstance(layout, BlockLayout):
            self.rows, self.unit = layout.block_q, layout.block_k
            # several key blocks per pass (up to _PASS_KEYS keys): fewer, larger matmuls and rescales
            n_slots = layout.kv_blocks.shape[-1]
            n_pass = max(1, -(-n_slots * layout.block_k // _PASS_KEYS))
            per_pass = -(-n_slots // n_pass) if n_slots else 1
            extra = n_pass * per_pass - n_slots
            shape = (lb, h1, self.gl, layout.n_q_blocks, n_pass, per_pass)
            units = F.pad(layout.kv_blocks, (0, extra), value=-1).reshape(shape)
            self.partial = None if layout.partial is None else F.pad(layout.partial, (0, extra)).reshape(shape)
            self.always_mask = False
            self.mask_cache = layout.mask_cache
        else:
            self.mask_cache = None
            self.rows, self.unit = layout.group, 1
            tok = layout.kv_tokens
            per_slot = max(1, min(layout.slot, tok.shape[-1]))
            width = -(-tok.shape[-1] // per_slot) * per_slot
            tok = F.pad(tok, (0, width - tok.shape[-1]), value=-1)
            units = tok.reshape(lb, h1, self.gl, tok.shape[2], -1, per_slot)
            self.partial = None
            self.always_mask = True
        self.units = units  # (Bl, H1, Gl, nq, S, U)
        self.n_q = units.shape[3]
        self.n_units = -(-len_k // self.unit)
        self.head_of_layout = lh
        self.custom_positions = q_positions is not None
        if q_positions is None:
            pos = torch.arange(self.n_q * self.rows, device=device) + (len_k - len_q)
            pos = pos.view(1, 1, 1, self.n_q, self.rows).repeat(1, 1, 1, 1, groups // self.gl)
        else:
            qp = q_positions.to(device=device, dtype=torch.long)
            qp = qp.expand(qp.shape[0], heads_q, qp.shape[2]).unsqueeze(-1)
            pos = self.to_rows(qp).squeeze(-1)
        self.q_pos = pos  # (Bp, Hkv|1, Gl, nq, R)
        self.q_block_first = pos.amin(-1)

    # ------------------------------------------------------------ layout of rows
    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, N, X)`` -> ``(B, Hkv, Gl, nq, R, X)``: query rows grouped by query block."""
        B, Hq, N, X = t.shape
        pad = self.n_q * self.rows - N
        if pad:
            t = F.pad(t, (0, 0, 0, pad))
        gr = Hq // self.heads_kv // self.gl
        t = t.reshape(B, self.heads_kv, self.gl, gr, self.n_q, self.rows, X).transpose(3, 4)
        return t.reshape(B, self.heads_kv, self.gl, self.n_q, gr * self.rows, X)

    def from_rows(self, t: torch.Tensor) -> torch.Tensor:
        B, _, _, nq, R, X = t.shape
        gr = R // self.rows
        t = t.reshape(B, self.heads_kv, self.gl, nq, gr, self.rows, X).transpose(3, 4)
        return t.reshape(B, self.heads_q, nq * self.rows, X)[:, :, :self.len_q]

    # ------------------------------------------------------------ one slot
    def mod_index(self, u: torch.Tensor, batch: int, blocks: slice = slice(None)):
        """``(b, h, q_idx, kv_idx)`` of the score_mod, broadcastable to a slot's scores ``(B, Hkv, Gl, nq, R, W)``:
        query heads ``h`` (rows are ``gr`` query heads of ``rows`` positions), key positions of the units ``u``
        (of the query blocks ``blocks``)."""
        dev = u.device
        gr, R = self.heads_q // self.heads_kv // self.gl, self.q_pos.shape[-1]
        head = (torch.arange(self.heads_kv, device=dev).view(-1, 1) * self.gl + torch.arange(self.gl, device=dev))
        h = head.view(1, self.heads_kv, self.gl, 1, 1, 1) * gr + (torch.arange(R, device=dev) // self.rows).view(
            1, 1, 1, 1, R, 1)
        kpos = (u.unsqueeze(-1) * self.unit + torch.arange(self.unit, device=dev)).flatten(-2)
        return (torch.arange(batch, device=dev).view(batch, 1, 1, 1, 1, 1), h,
                self.q_pos[:, :, :, blocks].clamp(max=self.len_k - 1).unsqueeze(-1),
                kpos.clamp(0, self.len_k - 1).unsqueeze(-2))

    def flat_index(self, u: torch.Tensor, batch: int) -> torch.Tensor:
        """Row indices into the ``(B·Hkv·n_units, unit·X)`` view of K or V: ``(B, Hkv, Gl, n, U)``."""
        b = torch.arange(batch, device=u.device).view(batch, 1, 1, 1, 1) * self.heads_kv
        h = torch.arange(self.heads_kv, device=u.device).view(1, -1, 1, 1, 1)
        return ((b + h) * self.n_units + u.clamp(min=0)).expand(batch, self.heads_kv, self.gl, u.shape[3], -1)

    def slot_mask(self, s: int, u: torch.Tensor, pad_flat: torch.Tensor | None, batch: int):
        """Element mask of slot ``s`` (True = visible), the query blocks it covers, and empty slots.

        Returns ``(mask, rows, empty)``: ``mask (.., n, R, W)`` or None when no
        element mask is needed; ``rows`` the query blocks the mask covers (None
        = all, the others are all visible); ``empty (.., nq)`` or None, the
        blocks whose slot is unused.
        """
        rows = None
        if not self.always_mask and pad_flat is None and not self.custom_positions:
            first_key = u * self.unit  # (.., nq, U)
            empty_unit = u < 0
            need = (first_key + self.unit > self.len_k) & ~empty_unit
            if self.causal:
                need = need | (first_key + self.unit - 1 > self.q_block_first.unsqueeze(-1)) & ~empty_unit
            if self.partial is not None:
                need = need | self.partial[..., s, :]
            empty = empty_unit.all(-1)
            need = need.any(-1) | (empty_unit.any(-1) & ~empty)  # a pass partly padded needs element masks
            need = need.flatten(0, -2).any(0)  # (nq,)
            n_need = int(need.sum())
            empty = empty if bool(empty.any()) else None
            if n_need == 0:
                return None, None, empty
            if n_need < 0.75 * need.numel():
                rows = need.nonzero().squeeze(-1)
            key = (s, self.causal, self.heads_q, self.heads_kv)
            if self.mask_cache is not None and key in self.mask_cache:
                return self.mask_cache[key], rows, empty
            mask = self.element_mask(u if rows is None else u[:, :, :, rows], rows, pad_flat, batch)
            if self.mask_cache is not None:
                self.mask_cache[key] = mask
            return mask, rows, empty
        return self.element_mask(u, None, pad_flat, batch), None, None

    def element_mask(self, u: torch.Tensor, rows: torch.Tensor | None, pad_flat: torch.Tensor | None,
                     batch: int) -> torch.Tensor:
        """Visibility ``(.., n, R, W)`` of the units ``u (.., n, U)`` for query blocks ``rows`` (None = all)."""
        q_pos = self.q_pos if rows is None else self.q_pos[:, :, :, rows]
        kpos = (u.unsqueeze(-1) * self.unit + torch.arange(self.unit, device=u.device)).flatten(-2)
        ok = (kpos >= 0) & (kpos < self.len_k)
        kclamp = kpos.clamp(0, self.len_k - 1)
        if pad_flat is not None:
            boff = torch.arange(batch, device=u.device).view(batch, 1, 1, 1, 1) * self.len_k
            ok = ok & pad_flat[boff + kclamp]
        ok = ok.unsqueeze(-2)  # (.., n, 1, W)
        if self.causal:
            ok = ok & (kpos.unsqueeze(-2) <= q_pos.unsqueeze(-1))
        if self.mask_mod is not None:
            dev = u.device
            lb = u.shape[0]
            b = torch.arange(lb, device=dev).view(lb, 1, 1, 1, 1, 1)
            if self.head_of_layout == 1:
                h = torch.zeros(1, 1, 1, 1, 1, 1, dtype=torch.long, device=dev)
            elif self.gl > 1 or self.head_of_layout == self.heads_q:
                h = (torch.arange(self.heads_kv, device=dev).view(-1, 1) * self.gl
                     + torch.arange(self.gl, device=dev)).view(1, self.heads_kv, self.gl, 1, 1, 1)
            else:
                h = torch.arange(self.heads_kv, device=dev).view(1, -1, 1, 1, 1, 1)
            q_idx = (q_pos - (self.len_k - self.len_q)).clamp(0, self.len_q - 1).unsqueeze(-1)
            ok = ok & call_mask_mod(self.mask_mod, b, h, q_idx, kclamp.unsqueeze(-2))
        return ok


def _apply_mask(sc: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None,
                empty: torch.Tensor | None) -> None:
    """Set invisible scores of ``sc (.., nq, R, W)`` to -inf in place.

    ``mask`` covers the query blocks ``rows`` (None = all); ``empty (.., nq)``
    marks whole empty slots (padding of shorter layout rows).
    """
    if empty is not None:
        sc.masked_fill_(empty[..., None, None], -math.inf)
    if mask is None:
        return
    if rows is None:
        sc.masked_fill_(~mask, -math.inf)
    else:
        sc[:, :, :, rows] = sc[:, :, :, rows].masked_fill_(~mask, -math.inf)


def _gather(units_view: torch.Tensor, flat: torch.Tensor, width: int) -> torch.Tensor:
    """Gather key units ``flat (B, Hkv, Gl, nq, U)`` from ``units_view`` as ``(B, Hkv, Gl, nq, U·unit, X)``."""
    g = units_view.index_select(0, flat.reshape(-1))
    return g.view(*flat.shape[:-1], width, -1)


def _unit_view(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``(B, Hkv, Nk, X)`` padded to whole units, as ``(B·Hkv·n_units, unit·X)``."""
    pad = plan.n_units * plan.unit - t.shape[2]
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(-1, plan.unit * t.shape[3])


def _slots(plan: _Plan):
    for s in range(plan.units.shape[4]):
        u = plan.units[:, :, :, :, s]
        if bool((u >= 0).any()):
            yield s, u


def _slot_scores(q_rows, k_units, v_units, plan: _Plan, s: int, u: torch.Tensor, pad_flat, batch: int,
                 mod_grads: list | None = None):
    """Scores of the (scaled) query rows against slot ``s``'s keys, modified by the call's score_mod,
    invisible ones at -inf.

    Returns ``(scores, keys, values, flat, to_raw)``: the gathered keys and values of
    the slot, their row indices (where the backward pass scatters dK, dV) and, in the backward
    (``mod_grads`` given) with a score_mod, its ``to_raw`` (see :class:`~attnzoo.core.scoremod.ModHook`).
    """
    flat = plan.flat_index(u, batch)
    width = u.shape[-1] * plan.unit
    kb, vb = _gather(k_units, flat, width), _gather(v_units, flat, width)
    sc = torch.matmul(q_rows, kb.transpose(-1, -2))
    to_raw = None
    if plan.mod is not None:
        idx = plan.mod_index(u, batch)
        sc, to_raw = (plan.mod.scores(sc, *idx), None) if mod_grads is None else plan.mod.recompute(sc, *idx,
                                                                                                   mod_grads)
    _apply_mask(sc, *plan.slot_mask(s, u, pad_flat, batch))
    return sc, kb, vb, flat, to_raw


def _forward(q, k, v, pad, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    B, dim_v = q.shape[0], v.shape[3]
    qb = plan.to_rows(q) * plan.scale
    k_units, v_units = _unit_view(k, plan), _unit_view(v, plan)
    pad_flat = None if pad is None else pad.reshape(-1)
    soft = OnlineSoftmax(qb.shape[:-1], dim_v, like=qb)
    for s, u in _slots(plan):
        sc, _, vb, _, _ = _slot_scores(qb, k_units, v_units, plan, s, u, pad_flat, B)
        soft.add(sc, vb)
    out, lse = soft.result()
    return plan.from_rows(out), plan.from_rows(lse.unsqueeze(-1)).squeeze(-1)


def _backward(q, k, v, pad, out, lse, d_out, d_lse, plan: _Plan, mod_grads: list):
    B = q.shape[0]
    qb = plan.to_rows(q)
    qs = qb * plan.scale
    dob = plan.to_rows(d_out)
    lse_safe, delta = grad_inputs(out, lse, d_out, d_lse)
    delta_r = plan.to_rows(delta.unsqueeze(-1))
    lse_r = plan.to_rows(lse_safe.unsqueeze(-1))
    k_units, v_units = _unit_view(k, plan), _unit_view(v, plan)
    dk_units, dv_units = torch.zeros_like(k_units), torch.zeros_like(v_units)
    dqb = torch.zeros_like(qb)
    pad_flat = None if pad is None else pad.reshape(-1)
    for s, u in _slots(plan):
        sc, kb, vb, flat, to_raw = _slot_scores(qs, k_units, v_units, plan, s, u, pad_flat, B, mod_grads)
        dq_blk, dk_blk, dv_blk = grad_step(sc, lse_r, delta_r, qb, dob, kb, vb, to_raw)
        dqb += dq_blk
        idx = flat.reshape(-1)
        dk_units.index_add_(0, idx, dk_blk.reshape(idx.numel(), -1))
        dv_units.index_add_(0, idx, dv_blk.reshape(idx.numel(), -1))

    def back(t_units, like):
        Bk, H, N, X = like.shape
        return t_units.view(Bk, H, -1, X)[:, :, :N]

    return plan.from_rows(dqb) * plan.scale, back(dk_units, k) * plan.scale, back(dv_units, v)


def _forward_fused(q, k, v, pad, plan: _Plan, units: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass of any layout on the fused CPU kernel (``units (Bl, H1, Gl, nq, W)``: the key units each
    query block reads, -1 for none; default the plan's).

    A block layout without padding, ``mask_mod`` or custom positions first splits off its fully visible
    units (:func:`_split_clean`): they run on the kernel without any mask, and only the rest (the
    causal diagonal, the sequence end, partial blocks) needs the masked pass below, merged by lse.
    The masked pass, per chunk of query blocks: gather every key unit the blocks read (all slots at
    once), build their element mask, and let the kernel attend each block to its gathered keys; about
    twice as fast as the slot loop of :func:`_forward`, whose softmax is separate eager passes. Memory
    is bounded by the chunk (``_FUSED_CHUNK`` gathered elements); a reused layout keeps its kernel masks
    (up to ``_FUSED_MASK_CACHE`` elements). A soft cap (``plan.mod``) runs every call on
    :mod:`attnzoo.core.capped`; a distance bias is every call's mask values (clean units: their only mask),
    as Toeplitz tiles (:func:`~attnzoo.core.scoremod.gathered_bias`).
    """
    B, D = q.shape[0], q.shape[3]
    bias, cap = _fused_mod(plan.mod)
    qb = plan.to_rows(q)  # (B, Hkv, Gl, nq, R, D)
    lead, (nq, R) = qb.shape[:3], qb.shape[3:5]
    tag = "fused" if units is None else "masked"
    if units is None:
        units = plan.units.flatten(-2)  # (Bl, H1, Gl, nq, U): every slot of a query block
        if pad is None and plan.mask_mod is None and not plan.custom_positions and not plan.always_mask:
            clean, counts, masked = _split_clean(plan, units)
            parts = [_attend_clean(qb, k, v, plan, clean, counts, cap, bias)]
            if masked.shape[-1]:
                diagonal = None if bias is not None else _attend_diagonal(qb, k, v, plan, masked, cap)
                parts.append(diagonal if diagonal is not None else Partial(*_forward_fused(q, k, v, pad, plan,
                                                                                           masked)))
            out, lse = merge(*parts)
            return out.to(q.dtype), lse
    width = units.shape[-1] * plan.unit
    out = qb.new_zeros(qb.shape)
    lse = torch.full(qb.shape[:-1], -math.inf, dtype=torch.promote_types(torch.float32, q.dtype), device=q.device)
    if width == 0:
        return plan.from_rows(out), plan.from_rows(lse.unsqueeze(-1)).squeeze(-1)
    k_units, v_units = _unit_view(k, plan), _unit_view(v, plan)
    pad_flat = None if pad is None else pad.reshape(-1)
    step = max(1, _FUSED_CHUNK // (math.prod(lead) * width * (R + 2 * D)))
    # a reused layout keeps its masks, ready for the kernel (the same on every call without padding or custom
    # positions): evaluating a mask_mod and converting it to the kernel's additive form cost more than the kernel
    cache = plan.mask_cache if (plan.mask_cache is not None and pad is None and not plan.custom_positions
                                and bias is None and math.prod(units.shape[:4]) * R * width <= _FUSED_MASK_CACHE) else None
    for n0 in range(0, nq, step):
        n1 = min(nq, n0 + step)
        u = units[:, :, :, n0:n1]
        flat = plan.flat_index(u, B)
        kb, vb = _gather(k_units, flat, width), _gather(v_units, flat, width)
        key = (tag, n0, n1, plan.causal, plan.heads_q, plan.heads_kv, q.dtype)
        masks = cache.get(key) if cache is not None else None
        if masks is None:
            mask = plan.element_mask(u, torch.arange(n0, n1, device=q.device), pad_flat, B)
            add = additive_mask(mask, q.dtype)
            if bias is not None and not plan.custom_positions:  # a distance bias: the mask's values, from
                gr = plan.heads_q // plan.heads_kv // plan.gl
                head0 = torch.arange(0, plan.heads_q, gr, device=q.device).view(1, plan.heads_kv, plan.gl, 1)
                add = add + _gathered_bias(plan, bias, u, torch.arange(n0, n1, device=q.device), head0, q.dtype)
            elif bias is not None:
                idx = plan.mod_index(u, 1, slice(n0, n1))
                with torch.no_grad():
                    add = bias(add.expand(torch.broadcast_shapes(add.shape, *(t.shape for t in idx))).clone(), *idx)
            masks = add, mask.any(-1, keepdim=True)  # (.., n, R, W), rows with a key
            if cache is not None:
                cache[key] = masks
        heads = lead if math.prod(masks[0].shape[:3]) > 1 else (1, 1, 1)  # a mask shared by all heads broadcasts
        add, seen = (m.expand(*heads, n1 - n0, R, m.shape[-1]).reshape(-1, n1 - n0, R, m.shape[-1]) for m in masks)
        o, l = fused_kernel(qb[:, :, :, n0:n1].reshape(-1, n1 - n0, R, D), kb.reshape(-1, n1 - n0, width, D),
                            vb.reshape(-1, n1 - n0, width, D), add, plan.scale, cap)
        o, l = fix_empty_rows(o, l, seen)
        out[:, :, :, n0:n1] = o.view(*lead, n1 - n0, R, D)
        lse[:, :, :, n0:n1] = l.view(*lead, n1 - n0, R)
    return plan.from_rows(out), plan.from_rows(lse.unsqueeze(-1)).squeeze(-1)


def _gathered_bias(plan: _Plan, bias: DistanceBias, u: torch.Tensor, blocks: torch.Tensor, head0: torch.Tensor,
                   dtype) -> torch.Tensor:
    """The distance bias (default positions) of query blocks ``blocks`` against their gathered units ``u``
    (:func:`~attnzoo.core.scoremod.gathered_bias`; ``head0``: each block's first query head)."""
    off = plan.len_k - plan.len_q
    return gathered_bias(bias, u, blocks * plan.rows + off, head0, rows=plan.rows, unit=plan.unit, dtype=dtype,
                         groups=plan.heads_q // plan.heads_kv // plan.gl,
                         span=(-(off + plan.n_q * plan.rows), plan.n_units * plan.unit - off))


def _split_clean(plan: _Plan, units: torch.Tensor):
    """Split a block layout's ``units (Bl, H1, Gl, nq, W)`` into the fully visible ones and the rest.

    A unit is fully visible to its query block when it lies inside the keys, wholly before the block's
    first query position (causal) and is not marked partial. Returns ``(clean, counts, masked)``:
    ``clean`` the units with each row's fully visible ones first, ``counts (Bl, H1, Gl, nq)`` how many,
    and ``masked (.., W2)`` the others (-1 padded, ``W2`` the most any row has).
    """
    real = units >= 0
    first_key = units * plan.unit
    need = first_key + plan.unit > plan.len_k
    if plan.causal:
        need = need | (first_key + plan.unit - 1 > plan.q_block_first.unsqueeze(-1))
    if plan.partial is not None:
        need = need | plan.partial.flatten(-2)
    need = need & real
    clean = real & ~need
    order = torch.sort((~clean).to(torch.uint8), dim=-1, stable=True).indices
    n_need = need.sum(-1)
    width = int(n_need.max()) if n_need.numel() else 0
    m_order = torch.sort((~need).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    masked = torch.where(need.gather(-1, m_order), units.gather(-1, m_order), -1)
    return units.gather(-1, order), clean.sum(-1), masked


def _attend_diagonal(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan,
                     masked: torch.Tensor, cap: float | None = None) -> Partial | None:
    """The masked units of :func:`_split_clean` when they are only each query block's own diagonal block
    (causal, ``Nq == Nk``, query and key blocks of one size, whole blocks): the kernel's own top-left causal
    mask on each block against its key block, read in place (no gather, no element mask). None otherwise."""
    B, Hkv, Gl, nq, R, D = qb.shape
    b = plan.rows
    if not (plan.causal and plan.len_q == plan.len_k and plan.unit == b and plan.len_k % b == 0
            and masked.shape[-1] == 1 and plan.partial is None):
        return None
    own = torch.arange(nq, device=qb.device)
    unit = masked[..., 0]
    if not bool(((unit == own) | (unit < 0)).all()):
        return None
    gr = R // b
    kd, vd = (t.reshape(B, Hkv, 1, nq, 1, b, D).expand(B, Hkv, Gl, nq, gr, b, D).reshape(-1, gr, b, D)
              for t in (k, v))
    if cap is None:
        o, l = flash_cpu(qb.reshape(-1, gr, b, D), kd, vd, scale=plan.scale, causal=True)
    else:
        o, l = capped.capped_attention(qb.reshape(-1, gr, b, D), kd, vd, scale=plan.scale, cap=cap, causal=True)
    out, lse = o.reshape(qb.shape), l.reshape(B, Hkv, Gl, nq, R).to(torch.promote_types(torch.float32, qb.dtype))
    missing = (unit < 0).expand(B, Hkv, Gl, nq)
    if bool(missing.any()):  # query blocks whose layout leaves out their diagonal
        out[missing] = 0.0
        lse[missing] = -math.inf
    return Partial(plan.from_rows(out), plan.from_rows(lse.unsqueeze(-1)).squeeze(-1))


def _attend_clean(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan, clean: torch.Tensor,
                  counts: torch.Tensor, cap: float | None = None, bias: DistanceBias | None = None) -> Partial:
    """The fully visible units of :func:`_split_clean` on the fused kernel with no mask (a distance bias:
    its Toeplitz tiles as the mask): the query blocks reading the same number of units are one kernel call
    (chunked to ``_FUSED_CHUNK`` gathered elements), each block attending its gathered keys."""
    B, Hkv, Gl, nq, R, D = qb.shape
    lead = (B, Hkv, Gl, nq)
    rows_q = qb.reshape(-1, R, D)
    out = qb.new_zeros(rows_q.shape)
    lse = torch.full(rows_q.shape[:-1], -math.inf, dtype=torch.promote_types(torch.float32, qb.dtype),
                     device=qb.device)
    counts = counts.expand(lead).reshape(-1)
    clean = clean.expand(*lead, clean.shape[-1]).reshape(counts.numel(), -1)
    # first unit row of each query block's KV head in the (B·Hkv·n_units, unit·D) views
    base = ((torch.arange(B, device=qb.device).view(B, 1, 1, 1) * Hkv
             + torch.arange(Hkv, device=qb.device).view(1, Hkv, 1, 1)) * plan.n_units).expand(lead).reshape(-1)
    k_units, v_units = _unit_view(k, plan), _unit_view(v, plan)
    for c in counts.unique().tolist():
        if c == 0:
            continue
        sel = (counts == c).nonzero().squeeze(1)
        step = max(1, _FUSED_CHUNK // (c * plan.unit * 2 * D + R * D))
        for s0 in range(0, sel.numel(), step):
            rows = sel[s0:s0 + step]
            flat = (base[rows].unsqueeze(1) + clean[rows, :c]).reshape(-1)
            kb, vb = (t.index_select(0, flat).view(1, rows.numel(), c * plan.unit, D) for t in (k_units, v_units))
            add = None if bias is None else _gathered_bias(
                plan, bias, clean[rows, :c], rows % nq, rows // nq % (Hkv * Gl) * (R // plan.rows), qb.dtype)
            o, l = fused_kernel(rows_q.index_select(0, rows).unsqueeze(0), kb, vb,
                                None if add is None else add.unsqueeze(0), plan.scale, cap)
            out[rows], lse[rows] = o[0], l[0]
    return Partial(plan.from_rows(out.view(qb.shape)), plan.from_rows(lse.view(*lead, R, 1)).squeeze(-1))


def _route(plan: _Plan | None, layout: Layout, fused: bool, kernel: bool, scale: float, causal: bool,
           mod: ModHook | None):
    """``(name, forward)``: the fastest forward path that can run this call (:mod:`attnzoo.core.fused`,
    :mod:`attnzoo.core.blockkernel` where ``kernel``) and its function of ``(q, k, v, pad)``. Names: ``band``,
    ``block kernel``, ``token union``, ``fused`` (gathered units on the kernel) or ``slot loop``
    (:func:`_forward`, the generic path). ``plan`` may be None on the block kernel's path (it reads the layout
    itself)."""
    if not fused:
        return "slot loop", lambda q, k, v, pad: _forward(q, k, v, pad, plan)
    bias, cap = _fused_mod(mod)  # a distance bias joins each path's masks as their values
    band = _cached_band_plan(layout, causal) if isinstance(layout, BlockLayout) else None
    if band is not None:
        return "band", lambda q, k, v, pad: attend_band(q, k, v, band, scale=scale, key_padding_mask=pad,
                                                        bias=bias, cap=cap)
    if kernel:
        return "block kernel", lambda q, k, v, pad: blockkernel.attend_blocks(
            q, k, v, layout, scale=scale, causal=causal, key_padding_mask=pad, bias=bias, cap=cap)
    if isinstance(layout, TokenLayout):
        keys, member = layout.union()
        if 0 < keys.shape[-1] <= 2 * layout.kv_tokens.shape[-1]:  # dense over the union beats per-group gathers
            return "token union", lambda q, k, v, pad: attend_token_union(
                q, k, v, layout, keys, member, scale=scale, causal=causal, key_padding_mask=pad,
                bias=bias, cap=cap)
    return "fused", lambda q, k, v, pad: _forward_fused(q, k, v, pad, plan)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, scale: float, causal: bool,
           key_padding_mask: torch.Tensor | None = None, q_positions: torch.Tensor | None = None,
           score_mod: ScoreMod | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention restricted to ``layout``; differentiable. Returns ``(out, lse)``.

    ``q_positions`` (``(B|1, Hq|1, Nq)`` absolute positions) overrides the
    default ``i + Nk - Nq`` for the causal test, for callers that pass a
    gathered subset of query rows. ``score_mod`` (:mod:`attnzoo.mods`; it sees
    those positions as ``q_idx``) modifies each slot's scores in the forward and
    in the recomputing backward. The fused CPU forward paths (:mod:`attnzoo.core.fused`)
    take a distance bias (:class:`~attnzoo.core.scoremod.DistanceBias`: ALiBi,
    relative-position tables) as the values of their additive masks, and a soft cap
    (alone or after such a bias) on :mod:`attnzoo.core.capped`'s kernel; any other mod
    (a user function) runs the generic slot loop (:func:`forward_path` says which runs).
    """
    if not isinstance(layout, (BlockLayout, TokenLayout)):
        raise AttnZooError(f"layout: expected a BlockLayout or TokenLayout, got {type(layout).__name__}")
    impl = LAYOUT_ENGINE.get()
    if impl is not None:
        if q_positions is not None:
            raise UnsupportedError("layout engine override: custom query positions (q_positions) are not supported")
        mod = {} if score_mod is None else {"score_mod": score_mod}  # the backend applies the mod or refuses it
        if isinstance(layout, TokenLayout):  # engines read one token row per query group
            layout = layout.per_group()
        return impl(q, k, v, layout, scale=scale, causal=causal, key_padding_mask=key_padding_mask, **mod)
    plan, make_plan, hook, (path, forward) = _plan_and_route(q, k, v, layout, scale, causal, q_positions,
                                                             score_mod)

    def backward(q, k, v, pad, out, lse, d_out, d_lse, grads):
        """A band layout's fused backward (:func:`~attnzoo.core.fused.attend_band_backward`), the block-list
        kernel's (:func:`~attnzoo.core.blockbackward.attend_blocks_backward`: the block kernel's layouts and block
        layouts with partial blocks), else slot by slot, all recomputing from ``(out, lse)``."""
        if path == "band" and band_backward_applies(q, k, v, hook):
            return attend_band_backward(q, k, v, out, lse, d_out, d_lse, _cached_band_plan(layout, causal),
                                        scale=scale, key_padding_mask=pad, mod=hook, grads=grads)
        if path in ("block kernel", "fused") and blockbackward.applies(q, k, v, layout, hook):
            return blockbackward.attend_blocks_backward(q, k, v, out, lse, d_out, d_lse, layout, scale=scale,
                                                        causal=causal, key_padding_mask=pad, mod=hook, grads=grads)
        return _backward(q, k, v, pad, out, lse, d_out, d_lse, plan or make_plan(), grads)

    return Recomputed.apply(q, k, v, key_padding_mask, forward, backward, hook, *(hook.captured if hook else ()))


def _plan_and_route(q, k, v, layout: Layout, scale: float, causal: bool, q_positions, score_mod):
    """The executor's plan of a call (None where the block kernel runs a token layout), a function building it
    (for a backward), the score_mod's hook and the forward :func:`_route`."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    hook = None if score_mod is None else ModHook(score_mod, like=q, grad=torch.is_grad_enabled(),
                                                  q_idx=max(0, Nk - 1), kv_idx=0, span=(1 - Nk, Nq - 1))
    fused = fused_applies(q, v, q_positions) and (hook is None or hook.distance is not None or (
        hook.capped is not None and capped.applies(q, v)))
    kernel = (fused and (hook is None or ((hook.distance or hook.capped) is not None and q_positions is None))
              and blockkernel.applies(q, k, v, layout))
    if not kernel and isinstance(layout, TokenLayout):  # the other paths read one token row per query group
        layout = layout.per_group()

    def make_plan() -> _Plan:  # the token row of each query group (the generic executor's and a backward's)
        return _Plan(layout.per_group() if isinstance(layout, TokenLayout) else layout, batch=B, heads_q=Hq,
                     heads_kv=Hkv, len_q=Nq, len_k=Nk, scale=scale, causal=causal, q_positions=q_positions,
                     device=q.device, mod=hook)

    # a token layout on the block kernel needs no plan to run forward (shared tokens: no per-group copy)
    plan = None if kernel and isinstance(layout, TokenLayout) else make_plan()
    return plan, make_plan, hook, _route(plan, layout, fused, kernel, scale, causal, hook)


def forward_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, causal: bool,
                 q_positions: torch.Tensor | None = None, score_mod: ScoreMod | None = None) -> str:
    """Which forward path :func:`attend` takes for this call: ``band``, ``block kernel`` (a block or token
    layout without element masks, with no score_mod or a distance bias and/or soft cap, on
    :mod:`attnzoo.core.blockkernel`), ``token union``, ``fused``
    (PyTorch's fused CPU kernel, or with a soft cap :mod:`attnzoo.core.capped`'s) or ``slot loop`` (the
    generic executor: other devices, custom query positions, user score_mods)."""
    return _plan_and_route(q, k, v, layout, 1.0, causal, q_positions, score_mod)[3][0]


def _cached_band_plan(layout: BlockLayout, causal: bool):
    """The layout's :class:`~attnzoo.core.layout.BandPlan` (None when not banded), kept on reused layouts."""
    if layout.mask_cache is None:
        return band_plan(layout, causal)
    key = ("band", causal)
    if key not in layout.mask_cache:
        layout.mask_cache[key] = band_plan(layout, causal)
    return layout.mask_cache[key]


def attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: Sequence[Layout], *, scale: float,
               causal: bool, key_padding_mask: torch.Tensor | None = None,
               score_mod: ScoreMod | None = None) -> Partial:
    """Attend each layout (with the same ``score_mod``) and merge by lse; the layouts' key sets must be disjoint."""
    parts = [Partial(*attend(q, k, v, lay, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                             score_mod=score_mod)) for lay in layouts]
    return merge(*parts)
