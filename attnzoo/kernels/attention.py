"""Host side of the softmax kernels: dense, block-sparse / token layouts, split-K decode, INT8 (sage).

Every entry point describes its keys as a :class:`Keys` (what a program's slots
are, see :mod:`attnzoo.kernels._attn`) and runs the same forward kernel; the
differentiable ones share one autograd function whose backward is the same
gather backward kernel (dQ in registers, dK/dV added atomically in fp32).
Semantics are the engines': GQA reads KV head ``h // G`` (K/V never
repeated), causal is bottom-right, key padding is ``(B, Nk)`` bool, rows that
see nothing give ``(0, -inf)``. Every entry point takes the built-in score
modifications as tensors (``slopes``, ``table``, ``cap``: :class:`Mod`) and
learnable ``sinks``; :func:`varlen_attention` runs packed sequences
(``cu_seqlens``) in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from ..core.layout import BlockLayout, TokenLayout, check_layout
from ..core.masks import call_mask_mod
from ..core.partial import Partial, merge
from . import _attn
from ._attn import BLOCKS, DENSE, LOG2E, TOKENS


@dataclass(frozen=True)
class Keys:
    """What one forward/backward launch reads for each tile of query rows.

    ``tab (Bl, Hl, rows_of_tab, S)`` int32 (block or token indices; broadcast over
    size-1 dims), ``tab_rows`` query rows per table row, ``row_tile`` rows per
    program (``<= block_m``; a longer table row takes several programs),
    ``key_unit`` keys per block (BLOCKS), ``tab_hdiv`` row head -> table head
    divisor; ``pidx``/``pm`` the element masks.
    """

    mode: int
    block_m: int
    block_n: int
    row_tile: int
    tab: torch.Tensor | None = None
    tab_rows: int = 1 << 30
    tab_hdiv: int = 1
    key_unit: int = 1
    mask: int = 0
    pidx: torch.Tensor | None = None
    pm: torch.Tensor | None = None
    k_base: int = 0

    def n_slots(self, k_end: int) -> int:
        if self.mode == DENSE:
            return triton.cdiv(k_end - self.k_base, self.block_n)
        if self.mode == BLOCKS:
            return self.tab.shape[-1]
        return triton.cdiv(self.tab.shape[-1], self.block_n)


#: query rows per program at most: a larger query block / token group is split over several programs
_MAX_ROW_TILE = 64


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _bstrides(t: torch.Tensor | None, nd: int) -> tuple[int, ...]:
    """Strides of the first ``nd`` dims, 0 where the dim is broadcast (size 1) or absent (placeholders)."""
    if t is None:
        return (0,) * nd
    return tuple(0 if i >= t.dim() or t.shape[i] == 1 else t.stride(i) for i in range(nd))


def _dummy(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class Call:
    """Everything of one kernel call but the tensors: the keys, the rule, the grouping of rows."""

    keys: Keys
    scale: float
    causal: bool
    q_off: int  # position of row 0 (bottom-right: Nk - Nq)
    rows_mod: int  # rows per query group when the group is folded into rows, else the row count
    groups: int  # row heads per KV head (1 when folded)
    k_end: int
    pad_hdiv: int = 1
    mod: "Mod" = None  # built-in score modifications (None: plain scores)
    hfold: int = 1  # query heads folded into one program's rows (split-K decode): query head = h·hfold + r // rows_mod
    seqs: int = 0  # varlen: packed sequences (the launch's batch axis), 0 otherwise
    max_rows: int = 0  # varlen: the longest sequence's query count


@dataclass(frozen=True)
class Mod:
    """The built-in score modifications as kernel specialisations, on natural-unit scores ``s``:
    ``s + slopes[h]·d + table[h, clamp(d, -R, R) + R]`` with ``d = kv_idx - q_idx``, then ``cap·tanh(s / cap)``.

    ``slopes (Hq,)`` and ``table (Hq or 1, 2R + 1)`` are fp32 tensors (gradients flow to them through
    :class:`_KernelAttention`); ``cap`` a float or None. The tensors travel as autograd inputs, this holds
    only what selects the specialisation.
    """

    alibi: bool = False
    rel: bool = False
    cap: float | None = None
    radius: int = 0


def _mod_args(call: Call, slopes, table, pos, dev) -> tuple:
    """The kernels' mod arguments: ``(SLOPES, TABLE, QPOS, KPOS)``, ``(hfold, table head stride, radius, cap,
    position strides)`` and the constexprs. ``pos``: None, or ``(q_pos (B|1, Hq|1, Nq), k_pos (B|1, Hkv|1,
    Nk))`` int32 positions the mods see instead of the row / key indices."""
    mod = call.mod or Mod()
    stab = 0 if table is None or table.shape[0] == 1 else table.stride(0)
    qp, kp = pos if pos is not None else (_dummy(dev), _dummy(dev))
    tensors = (slopes if slopes is not None else _dummy(dev).float(), table if table is not None else
               _dummy(dev).float(), qp, kp)
    pstr = _bstrides(pos[0], 2) + _bstrides(pos[1], 2) if pos is not None else (0,) * 4
    return tensors, (call.hfold, stab, mod.radius, float(mod.cap or 1.0), *pstr), dict(
        ALIBI=mod.alibi, REL=mod.rel, SOFTCAP=mod.cap is not None, VARLEN=call.seqs > 0, POS=pos is not None)


def _common(call: Call, q, k, pad):
    """The launch's table/mask/padding tensors (placeholders where absent), their strides, the row tiles."""
    ks = call.keys
    dev = q.device
    tab = ks.tab if ks.tab is not None else _dummy(dev)
    pidx = ks.pidx if ks.pidx is not None else tab
    pm = ks.pm if ks.pm is not None else _dummy(dev)
    padt = pad if pad is not None else _dummy(dev)
    strides = (_bstrides(ks.tab, 3), _bstrides(pad, 2), _bstrides(ks.pm, 3))  # pad: (B, Hp, Nk), unit key stride
    n_rows = call.max_rows if call.seqs else q.shape[2]
    tab_rows = min(ks.tab_rows, n_rows)
    tpr = triton.cdiv(tab_rows, ks.row_tile)  # tiles per table row
    tiles = (triton.cdiv(n_rows, tab_rows) * tpr, tab_rows, tpr)
    return (tab, pidx, pm, padt), strides, tiles, ks.tab.shape[-1] if ks.tab is not None else 1


def _consts(call: Call, q, v, pad) -> dict:
    ks = call.keys
    D, Dv = q.shape[-1], v.shape[-1]
    return dict(D=D, DV=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv), BLOCK_M=ks.block_m, BLOCK_N=ks.block_n,
                ROW_TILE=ks.row_tile, KEY_UNIT=ks.key_unit, MODE=ks.mode, CAUSAL=call.causal,
                HAS_PAD=pad is not None, PAD_HDIV=call.pad_hdiv, MASK=ks.mask,
                PREC=_attn.dot_precision(v.dtype))


def forward(q, k, v, pad, call: Call, *, splits: int = 1, quant=None, out_dtype=None, slopes=None, table=None,
            cu=None, sinks=None, pos=None):
    """``(out, lse)`` of rows ``q (B, H, n_rows, D)`` over ``k``/``v (B, H/groups, ·, ·)``.

    ``splits > 1`` cuts each row's slots into that many ranges run by separate
    programs and merges their fp32 partials by lse. ``quant = (q_int8, q_scale,
    k_int8, k_scale, q_block, k_block)`` scores with an int8 dot. ``slopes`` /
    ``table``: the tensors of ``call.mod``; ``cu = (q_bounds, k_bounds)`` int32
    ``(call.seqs, 2)`` ``[start, end)`` of each sequence of a varlen call (packed in
    batch row 0; rows of no listed sequence give ``(0, -inf)``); ``sinks (Hq,)``
    fp32 logits joining every row's denominator; ``pos``: see :func:`_mod_args`.
    """
    B, H, n_rows, _ = q.shape
    Dv = v.shape[-1]
    (tab, pidx, pm, padt), (tstr, padstr, pmstr), (n_tiles, tab_rows, tpr), tab_len = _common(call, q, k, pad)
    n_slots = call.keys.n_slots(call.k_end)
    splits = max(1, min(splits, n_slots))
    per = triton.cdiv(max(n_slots, 1), splits)
    splits = triton.cdiv(max(n_slots, 1), per)
    dt = torch.float32 if splits > 1 else (out_dtype or q.dtype)
    if call.seqs:  # a launch over some of the packed sequences writes only their rows
        out = torch.zeros(splits, B, H, n_rows, Dv, dtype=dt, device=q.device)
        lse = torch.full((splits, B, H, n_rows), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(splits, B, H, n_rows, Dv, dtype=dt, device=q.device)
        lse = torch.empty(splits, B, H, n_rows, dtype=torch.float32, device=q.device)
    if quant is None:
        qq, kk, qs, kscale, qb, kb = q, k, _dummy(q.device), _dummy(q.device), 1, 1
    else:
        qq, qs, kk, kscale, qb, kb = quant
    (sl, tb, qp, kp), mod_scalars, mod_consts = _mod_args(call, slopes, table, pos, q.device)
    cuq, cuk = cu if cu is not None else (_dummy(q.device),) * 2
    _attn._fwd_kernel[(n_tiles, (call.seqs or B) * H, splits)](
        qq, kk, v, out, lse, qs, kscale, tab, pidx, pm, padt, sl, tb, cuq, cuk, qp, kp,
        sinks if sinks is not None else _dummy(q.device).float(),
        qq.stride(0), qq.stride(1), qq.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *out.stride()[:4], *lse.stride()[:3],
        *_bstrides(qs, 2), *_bstrides(kscale, 2),
        *tstr, *padstr, *pmstr,
        n_rows, call.k_end, call.keys.k_base, call.q_off, call.rows_mod, call.groups, n_slots, per,
        call.scale * LOG2E, tab_len, tab_rows, tpr, call.keys.tab_hdiv, H, *mod_scalars,
        QUANT=quant is not None, Q_BLOCK=qb, K_BLOCK=kb, SINK=sinks is not None, **_consts(call, q, v, pad),
        **mod_consts)
    if splits == 1:
        return out[0], lse[0]
    return merge(*(Partial(out[i], lse[i]) for i in range(splits)))


def backward(q, k, v, pad, out, lse, d_out, d_lse, call: Call, slopes=None, table=None, cu=None,
             bias_grad: bool = False, pos=None):
    """``(dq, dk, dv, dslopes, dtable)`` of :func:`forward` (``splits = 1``), recomputing probabilities from
    ``lse``; the mod tensors' gradients are None unless ``bias_grad``."""
    B, H, n_rows, _ = q.shape
    (tab, pidx, pm, padt), (tstr, padstr, pmstr), (n_tiles, tab_rows, tpr), tab_len = _common(call, q, k, pad)
    d_out = d_out.contiguous()
    delta = (d_out.float() * out.float()).sum(-1)
    if d_lse is not None:
        delta = delta - d_lse
    delta = delta.contiguous()
    lse = lse.contiguous()
    dq = torch.zeros_like(q) if call.seqs else torch.empty_like(q)  # varlen: rows of no listed sequence
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    dsl = torch.zeros_like(slopes) if bias_grad and slopes is not None else _dummy(q.device).float()
    dtb = torch.zeros_like(table) if bias_grad and table is not None else _dummy(q.device).float()
    (sl, tb, qp, kp), mod_scalars, mod_consts = _mod_args(call, slopes, table, pos, q.device)
    cuq, cuk = cu if cu is not None else (_dummy(q.device),) * 2
    _attn._bwd_kernel[(n_tiles, (call.seqs or B) * H)](
        q, k, v, d_out, lse, delta, dq, dk, dv, tab, pidx, pm, padt, sl, tb, cuq, cuk, qp, kp, dsl, dtb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), d_out.stride(0), d_out.stride(1), d_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), lse.stride(0),
        lse.stride(1), *tstr, *padstr, *pmstr,
        n_rows, call.k_end, call.keys.k_base, call.q_off, call.rows_mod, call.groups,
        call.keys.n_slots(call.k_end), call.scale * LOG2E, call.scale, tab_len, tab_rows, tpr,
        call.keys.tab_hdiv, H, *mod_scalars, BIAS_GRAD=bias_grad, **_consts(call, q, v, pad), **mod_consts)
    grads = (dsl if bias_grad and slopes is not None else None, dtb if bias_grad and table is not None else None)
    return dq, dk.to(k.dtype), dv.to(v.dtype), *grads


class _KernelAttention(torch.autograd.Function):
    """Forward and backward kernels for one :class:`Call`; ``(out, lse)``, both differentiable in q, k, v, the
    mod's ``slopes`` / ``table`` and the ``sinks``."""

    @staticmethod
    def forward(ctx, q, k, v, pad, call, slopes=None, table=None, cu=None, sinks=None, pos=None):  # noqa: D401
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        sinks = None if sinks is None else sinks.float().contiguous()
        out, lse = forward(q, k, v, pad, call, slopes=slopes, table=table, cu=cu, sinks=sinks, pos=pos)
        ctx.save_for_backward(q, k, v, pad, out, lse, slopes, table, sinks)
        ctx.call, ctx.cu, ctx.pos = call, cu, pos
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, pad, out, lse, slopes, table, sinks = ctx.saved_tensors
        dq, dk, dv, dsl, dtb = backward(q, k, v, pad, out, lse, d_out, d_lse, ctx.call, slopes, table, ctx.cu,
                                        bias_grad=any(ctx.needs_input_grad[5:7]), pos=ctx.pos)
        dsink = None
        if sinks is not None and ctx.needs_input_grad[8]:  # d lse / d sink = its probability; it has no value
            delta = (d_out.float() * out.float()).sum(-1) - (0 if d_lse is None else d_lse)
            p_sink = torch.exp(sinks[None, :, None] - lse).masked_fill(lse == float("-inf"), 0)  # rows not run
            dsink = -(p_sink * delta).sum((0, 2))
        return dq, dk, dv, None, None, dsl, dtb, None, dsink, None


def _mod_tensors(mod_tensors) -> tuple:
    """``(Mod, slopes, table)`` from ``(slopes or None, table or None, cap or None)``: fp32, contiguous, with the
    table's rows as ``(Hq or 1, 2R + 1)``."""
    slopes, table, cap = mod_tensors or (None, None, None)
    if slopes is None and table is None and cap is None:
        return None, None, None
    slopes = None if slopes is None else slopes.float().contiguous()
    table = None if table is None else table.float().reshape(-1, table.shape[-1]).contiguous()
    return (Mod(slopes is not None, table is not None, cap, 0 if table is None else table.shape[-1] // 2),
            slopes, table)


def _pad_arg(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, Nk)`` bool -> ``(B, 1, Nk)`` int8, the kernels' per-(batch, head) key mask (heads broadcast)."""
    return None if key_padding_mask is None else key_padding_mask.to(torch.int8).unsqueeze(1).contiguous()


# ------------------------------------------------------------------ dense
def flash_attention(q, k, v, *, scale: float, causal: bool, key_padding_mask=None, q_offset: int | None = None,
                    k_offset: int = 0, block_m: int = 64, block_n: int = 64, slopes=None, table=None,
                    cap: float | None = None, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention ``(out, lse)`` (FlashAttention-2 tiles; causal tiles above the diagonal skipped).

    ``q_offset``/``k_offset``: absolute positions of the first query / key (default bottom-right), as in
    :func:`attnzoo.core.exact.tiled_attention`, whose contract this has. ``slopes`` (ALiBi, ``(Hq,)``),
    ``table`` (relative bias, ``(Hq, 2R+1)`` or ``(2R+1,)``) and ``cap`` (softcap): see :class:`Mod`;
    ``sinks (Hq,)``: learnable sink logits in every row's denominator (differentiable).
    """
    Nq, Nk = q.shape[2], k.shape[2]
    q_off = (Nk - Nq if q_offset is None else q_offset) - k_offset
    mod, slopes, table = _mod_tensors((slopes, table, cap))
    keys = Keys(DENSE, block_m, block_n, block_m)
    call = Call(keys, scale, causal, q_off, Nq, q.shape[1] // k.shape[1], Nk, mod=mod)
    return _KernelAttention.apply(q, k, v, _pad_arg(key_padding_mask), call, slopes, table, None, sinks)


def varlen_attention(q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, *, scale: float, causal: bool,
                     block_m: int = 64, block_n: int = 64, slopes=None, table=None,
                     cap: float | None = None, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences in one launch: ``q (1, Hq, total_q, D)``, ``k``/``v (1, Hkv, total_k, ·)``; sequence
    ``i``'s queries ``cu_q[i]:cu_q[i+1]`` attend its keys ``cu_k[i]:cu_k[i+1]`` (causal bottom-right within the
    sequence; positions for the mods count from each sequence's start). ``max_q``: the longest sequence's query
    count (the grid). Differentiable; ``(out, lse)`` over the packed queries."""
    mod, slopes, table = _mod_tensors((slopes, table, cap))
    keys = Keys(DENSE, block_m, block_n, block_m)
    call = Call(keys, scale, causal, 0, 1 << 30, q.shape[1] // k.shape[1], k.shape[2], mod=mod,
                seqs=cu_q.numel() - 1, max_rows=max(int(max_q), 1))
    return _KernelAttention.apply(q, k, v, None, call, slopes, table, (_bounds(cu_q), _bounds(cu_k)), sinks)


def _bounds(cu: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens (S + 1,)`` -> the kernels' ``(S, 2)`` int32 ``[start, end)`` per sequence."""
    cu = cu.to(torch.int32)
    return torch.stack([cu[:-1], cu[1:]], 1).contiguous()


# ----------------------------------------------------------------- layouts
def _block_keys(layout: BlockLayout, heads_q: int, heads_kv: int) -> Keys:
    """A BlockLayout as BLOCKS slots; its partial blocks' mask_mod evaluated once into packed masks."""
    cache = layout.mask_cache
    key = ("triton", heads_q, heads_kv)
    if cache is not None and key in cache:
        return cache[key]
    kb = layout.kv_blocks
    Bl, Hl = kb.shape[:2]
    rt = min(layout.block_q, _MAX_ROW_TILE)
    keys = Keys(BLOCKS, _pow2(rt), _pow2(layout.block_k), rt,
                tab=kb.to(torch.int32).contiguous(), tab_rows=layout.block_q,
                tab_hdiv=heads_q // heads_kv if (Hl == heads_kv and Hl != heads_q) else 1, key_unit=layout.block_k)
    if layout.partial is not None and bool(layout.partial.any()):
        where = layout.partial.nonzero()  # (P, 4): b, h, query block, slot
        b, h, i, s = where.unbind(-1)
        blk = kb[b, h, i, s]
        q_idx = (i.view(-1, 1) * layout.block_q + torch.arange(layout.block_q, device=kb.device)).clamp(
            max=layout.len_q - 1).unsqueeze(-1)
        kv_idx = (blk.view(-1, 1) * layout.block_k + torch.arange(layout.block_k, device=kb.device)).clamp(
            max=layout.len_k - 1).unsqueeze(-2)
        pm = call_mask_mod(layout.mask_mod, b.view(-1, 1, 1), h.view(-1, 1, 1), q_idx, kv_idx)
        pm = pm.expand(len(where), layout.block_q, layout.block_k).to(torch.int8).contiguous()
        pidx = torch.full(kb.shape, -1, dtype=torch.int32, device=kb.device)
        pidx[b, h, i, s] = torch.arange(len(where), dtype=torch.int32, device=kb.device)
        keys = replace(keys, mask=1, pidx=pidx, pm=pm)
    if cache is not None:
        cache[key] = keys
    return keys


def _token_keys(layout: TokenLayout, heads_q: int, heads_kv: int) -> Keys:
    """A TokenLayout as TOKENS slots; a mask_mod evaluated into a dense per-token mask."""
    tok = layout.kv_tokens
    Bl, Hl, ng, T = tok.shape
    rt = min(layout.group, _MAX_ROW_TILE)
    keys = Keys(TOKENS, _pow2(rt), min(64, _pow2(T)), rt, tab=tok.to(torch.int32).contiguous(),
                tab_rows=layout.group, tab_hdiv=heads_q // heads_kv if (Hl == heads_kv and Hl != heads_q) else 1)
    if layout.mask_mod is None:
        return keys
    dev = tok.device
    q_idx = (torch.arange(ng, device=dev).view(-1, 1) * layout.group + torch.arange(layout.group, device=dev))
    q_idx = q_idx.clamp(max=layout.len_q - 1).view(1, 1, ng, layout.group, 1)
    pm = call_mask_mod(layout.mask_mod, torch.arange(Bl, device=dev).view(-1, 1, 1, 1, 1),
                       torch.arange(Hl, device=dev).view(1, -1, 1, 1, 1), q_idx, tok.clamp(min=0).unsqueeze(-2))
    pm = pm.expand(Bl, Hl, ng, layout.group, T).to(torch.int8).contiguous().view(Bl, Hl, ng, -1)
    return replace(keys, mask=2, pm=pm)


def layout_attention(q, k, v, layout: BlockLayout | TokenLayout, *, scale: float, causal: bool,
                     key_padding_mask=None, slopes=None, table=None, cap: float | None = None, sinks=None,
                     q_pos: torch.Tensor | None = None,
                     k_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention restricted to ``layout`` (as :func:`attnzoo.core.blocksparse.attend`); differentiable.
    ``slopes`` / ``table`` / ``cap``: the built-in mods (:class:`Mod`); ``sinks``: as :func:`flash_attention`;
    ``q_pos (B|1, Hq|1, Nq)`` / ``k_pos (B|1, Hkv|1, Nk)``: the positions the mods see (default: the
    bottom-right row positions and the key indices), for engines running on reordered tokens."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    check_layout(layout, batch=B, heads_q=Hq, heads_kv=Hkv, len_q=Nq, len_k=Nk, causal=causal)
    keys = _block_keys(layout, Hq, Hkv) if isinstance(layout, BlockLayout) else _token_keys(layout, Hq, Hkv)
    mod, slopes, table = _mod_tensors((slopes, table, cap))
    call = Call(keys, scale, causal, Nk - Nq, Nq, Hq // Hkv, Nk, mod=mod)
    pos = None
    if mod is not None and (q_pos is not None or k_pos is not None):
        dev = q.device
        q_pos = torch.arange(Nk - Nq, Nk, device=dev).view(1, 1, -1) if q_pos is None else q_pos
        k_pos = torch.arange(Nk, device=dev).view(1, 1, -1) if k_pos is None else k_pos
        pos = tuple(p.to(torch.int32).contiguous() for p in (q_pos, k_pos))
    return _KernelAttention.apply(q, k, v, _pad_arg(key_padding_mask), call, slopes, table, None, sinks, pos)


def _layout_keys(layout: BlockLayout | TokenLayout, heads_q: int, heads_kv: int) -> Keys:
    return _block_keys(layout, heads_q, heads_kv) if isinstance(layout, BlockLayout) else \
        _token_keys(layout, heads_q, heads_kv)


def _shape_of(keys: Keys) -> tuple:
    """What sequences' keys must share to run in one launch: everything but their tables' sizes."""
    return keys.mode, keys.block_m, keys.row_tile, keys.key_unit, keys.tab_rows, keys.tab_hdiv, keys.tab.shape[1]


def _stack_keys(keys: list[Keys | None], rows: int) -> Keys:
    """One launch's :class:`Keys` over packed sequences: sequence ``i``'s table (``None``: no keys) padded
    with empty slots to the longest, its partial-block masks appended (their indices shifted), its
    per-token masks padded like its tokens. ``rows``: the most table rows of a sequence."""
    some = next(ks for ks in keys if ks is not None)
    Hl = some.tab.shape[1]
    slots = max(ks.tab.shape[-1] for ks in keys if ks is not None)
    dev = some.tab.device
    tab = torch.full((len(keys), Hl, rows, slots), -1, dtype=torch.int32, device=dev)
    masked = [ks for ks in keys if ks is not None and ks.mask]
    pidx = tab.clone() if some.mode == BLOCKS and masked else None
    pm = [] if masked else None
    if some.mode == TOKENS and masked:
        group = some.tab_rows
        pm = torch.zeros(len(keys), Hl, rows, group, slots, dtype=torch.int8, device=dev)
    count = 0
    for i, ks in enumerate(keys):
        if ks is None:
            continue
        r, n = ks.tab.shape[2:]
        tab[i, :, :r, :n] = ks.tab[0]
        if pidx is not None and ks.pidx is not None:
            pidx[i, :, :r, :n] = torch.where(ks.pidx[0] >= 0, ks.pidx[0] + count, -1)
            pm.append(ks.pm)
            count += len(ks.pm)
        elif some.mode == TOKENS and masked:
            m = ks.pm[0].view(Hl, r, group, n) if ks.pm is not None else torch.ones(Hl, r, group, n, dtype=torch.int8,
                                                                                    device=dev)
            pm[i, :, :r, :, :n] = m
    if some.mode == TOKENS:
        out = replace(some, tab=tab, block_n=min(64, _pow2(slots)))
        return out if not masked else replace(out, mask=2, pm=pm.view(len(keys), Hl, rows, -1))
    if pidx is None:
        return replace(some, tab=tab, mask=0, pidx=None, pm=None)
    return replace(some, tab=tab, mask=1, pidx=pidx, pm=torch.cat(pm) if pm else some.pm)


def varlen_layout_attention(q, k, v, layouts: list[list[BlockLayout | TokenLayout] | None], cu_q: torch.Tensor,
                            cu_k: torch.Tensor, *, scale: float, causal: bool, slopes=None, table=None,
                            cap: float | None = None, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences (as :func:`varlen_attention`) over each sequence's own layouts, ``layouts[i]`` built
    on sequence ``i`` alone (None: it has no keys or no queries). Sequences whose ``j``-th layouts share their
    shape (block sizes / token group, heads) run in ONE launch per layout index; the launches are merged by
    lse. The first layout's launch adds the sinks. Differentiable."""
    Hq, Hkv = q.shape[1], k.shape[1]
    mod, slopes, table = _mod_tensors((slopes, table, cap))
    bq, bk = _bounds(cu_q), _bounds(cu_k)
    lengths, lengths_k = ((c[1:] - c[:-1]).tolist() for c in (cu_q, cu_k))
    for lays, nq, nk in zip(layouts, lengths, lengths_k):
        for lay in lays or ():
            check_layout(lay, batch=1, heads_q=Hq, heads_kv=Hkv, len_q=nq, len_k=nk, causal=causal)
    keys = [None if lays is None else [_layout_keys(lay, Hq, Hkv) for lay in lays] for lays in layouts]
    groups: dict[tuple, list[int]] = {}
    for i, ks in enumerate(keys):
        if ks is not None:
            groups.setdefault(tuple(_shape_of(x) for x in ks), []).append(i)
    first = next(iter(groups.values()))  # sequences with queries but no keys: their rows get (0, -inf) and sinks
    first += [i for i, ks in enumerate(keys) if ks is None and lengths[i] > 0]
    parts = []
    for members in groups.values():
        idx = torch.tensor(members, device=q.device)
        for j in range(len(keys[members[0]])):
            mine = [None if keys[i] is None else keys[i][j] for i in members]
            rows = max(ks.tab.shape[2] for ks in mine if ks is not None)
            call = Call(_stack_keys(mine, rows), scale, causal, 0, 1 << 30, Hq // Hkv, k.shape[2], mod=mod,
                        seqs=len(members), max_rows=max(1, max(lengths[i] for i in members)))
            parts.append(Partial(*_KernelAttention.apply(q, k, v, None, call, slopes, table, (bq[idx], bk[idx]),
                                                         None if j else sinks)))
    return merge(*parts)


# ------------------------------------------------------------------ decode
def split_k(q, k, v, *, scale: float, causal: bool, valid=None, idx=None, start: int = 0, stop: int | None = None,
            q_off: int | None = None, splits: int = 8, block_n: int = 64, slopes=None, table=None,
            cap: float | None = None, sinks=None) -> Partial:
    """Split-K attention of ``q (B, Hq, nq, D)`` over a KV store ``k``/``v (B, Hkv, cap, ·)``.

    Reads either the slots ``[start, stop)`` in place or the selected slots
    ``idx (B, Hkv, m)`` (no gather copy); each KV head's query group is folded
    into the rows, so every K/V byte is read once per split. ``causal``: the
    queries are the newest slots ending at ``stop`` (their positions start at
    ``q_off``, default ``stop - nq``). ``valid (B, Hkv, cap)`` hides padding.
    The splits' partials are merged by lse; returns a :class:`Partial` in fp32.
    ``slopes`` / ``table`` / ``cap``: the built-in mods (:class:`Mod`); ``sinks (Hq,)``: sink logits
    (the first split adds them). Forward only.
    """
    B, Hq, nq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    stop = k.shape[2] if stop is None else stop
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    rows = q.reshape(B, Hkv, G * nq, D)
    block_m = min(64, _pow2(G * nq))
    if idx is None:
        keys = Keys(DENSE, block_m, block_n, block_m, k_base=start)
    else:
        keys = Keys(TOKENS, block_m, block_n, block_m, tab=idx.to(torch.int32).unsqueeze(2).contiguous())
    mod, slopes, table = _mod_tensors((slopes, table, cap))
    call = Call(keys, scale, causal, stop - nq if q_off is None else q_off, nq, 1, stop, mod=mod, hfold=G)
    pad = None if valid is None else valid.to(torch.int8)
    out, lse = forward(rows, k, v, pad, call, splits=splits, out_dtype=torch.float32, slopes=slopes, table=table,
                       sinks=None if sinks is None else sinks.float().contiguous())
    return Partial(out.float().reshape(B, Hq, nq, -1), lse.reshape(B, Hq, nq))


# -------------------------------------------------------------------- sage
def _quantize_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block int8 codes ``(B, H, N, D)`` and scales ``(B, H, ceil(N / block))``."""
    B, H, N, D = x.shape
    pad = (-N) % block
    xb = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).reshape(B, H, -1, block * D)
    scale = xb.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    codes = torch.round(xb / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return codes.view(B, H, -1, D)[:, :, :N].contiguous(), scale.contiguous()


def sage_attention(q, k, v, *, scale: float, causal: bool, key_padding_mask=None, block: int = 128,
                   block_m: int = 64, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 Q·Kᵀ (per-block scales of ``block`` tokens, K smoothed by its token mean) and P·V in v's dtype.

    Returns ``(out, lse)``; the lse is corrected for the smoothing exactly (every
    score of a row shifted by ``q · mean(K)``). Inference only.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    kf = k.float()
    if key_padding_mask is None:
        k_mean = kf.mean(dim=2, keepdim=True)
    else:
        keep = key_padding_mask[:, None, :, None].float()
        k_mean = (kf * keep).sum(2, keepdim=True) / keep.sum(2, keepdim=True).clamp_min(1)
    qi, qs = _quantize_int8(q, block)
    ki, ks = _quantize_int8(kf - k_mean, block)
    if v.dtype == torch.float32:
        v = v.half()  # P·V in fp16 (SageAttention keeps PV in half precision)
    keys = Keys(DENSE, block_m, block_n, block_m)
    call = Call(keys, scale, causal, Nk - Nq, Nq, Hq // Hkv, Nk)
    out, lse = forward(qi, ki, v.contiguous(), _pad_arg(key_padding_mask), call,
                       quant=(qi, qs, ki, ks, block, block), out_dtype=q.dtype)
    group_mean = k_mean.repeat_interleave(Hq // Hkv, dim=1)
    return out, lse + scale * (q.float() * group_mean).sum(-1)
