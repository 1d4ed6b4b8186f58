"""Block layouts on PyTorch's FlexAttention: a :class:`BlockLayout` becomes a ``BlockMask``.

The layout's key-block table is FlexAttention's ``kv_indices``; blocks the
layout reads whole and that lie entirely inside the causal triangle and the
key range are its *full* blocks (no mask evaluated), the others get a mask_mod
that is the layout's ``mask_mod`` ∧ bottom-right causal ∧ key padding ∧ membership
in the layout (FlexAttention's eager path evaluates only the mask_mod). Block
masks are cached on reused (static) layouts and the compiled kernel once per
process (``torch.compile`` caches one kernel per mask_mod and shape). Token
layouts have no FlexAttention form (it reads whole key blocks). Exact attention
is the layout of every key block (:func:`dense_layout`).

A ``score_mod`` (attnzoo's convention, :mod:`attnzoo.mods`) goes to FlexAttention
as its own ``score_mod``, with the query index moved to attnzoo's bottom-right
aligned position; FlexAttention traces it (also on its eager CPU path, so the
helpers never update the scores in place there) and gives gradients to the tensors
it closes over. On CPU FlexAttention is forward-only for q, k, v, and its compiled
CPU kernel returns no lse, so it runs eagerly there (scores materialised per call).
A user function is not lowered to built-ins here (:mod:`attnzoo.core.lowering`, as the
other backends do): on CUDA FlexAttention compiles the function itself into its kernel,
and its eager CPU path calls a function once on the whole score tensor, the same cost
as a built-in (1K causal, 8 heads, one thread: a user ALiBi lambda 0.33 s, ``mods.alibi``
0.32 s, no mod 0.26 s).
"""

from __future__ import annotations

import functools

import torch

from ..core.layout import BlockLayout, TokenLayout, check_layout, query_block_positions
from ..errors import UnsupportedError


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def _table(t: torch.Tensor, heads_q: int, heads_kv: int) -> torch.Tensor:
    """A layout table ``(Bl, Hl, ...)`` as ``(B|1, Hq|1, ...)`` (FlexAttention's heads are query heads)."""
    if t.shape[1] == heads_kv and heads_kv != heads_q:
        t = t.repeat_interleave(heads_q // heads_kv, dim=1)
    return t


def block_mask(layout: BlockLayout, *, batch: int, heads_q: int, heads_kv: int, causal: bool,
               key_padding_mask: torch.Tensor | None = None):
    """The FlexAttention ``BlockMask`` of ``layout`` under attnzoo's visibility rule."""
    from torch.nn.attention.flex_attention import BlockMask
    if layout.block_q != layout.block_k:
        raise UnsupportedError(f"flex: layouts with block_q != block_k ({layout.block_q}, {layout.block_k})")
    kb = layout.kv_blocks
    dev = kb.device
    keep = kb >= 0
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # read blocks first
    idx = torch.gather(kb, -1, order).clamp(min=0)
    count = keep.sum(-1)
    first, last = query_block_positions(layout.len_q, layout.len_k, layout.block_q, dev)
    key_last = idx * layout.block_k + layout.block_k - 1
    rows_end = (torch.arange(kb.shape[2], device=dev) + 1) * layout.block_q
    whole = (key_last < layout.len_k) & torch.gather(keep, -1, order) & (rows_end <= layout.len_q).view(-1, 1)
    if causal:
        whole &= key_last <= first.view(-1, 1)
    if layout.partial is not None:
        whole &= ~torch.gather(layout.partial, -1, order)
    if key_padding_mask is not None:
        whole = torch.zeros_like(whole)
    # FlexAttention's partial list must exclude the full blocks: keep the order, partial blocks first
    part_order = torch.sort(whole.to(torch.int8), dim=-1, stable=True).indices
    part_idx = torch.gather(idx, -1, part_order)
    part_n = count - whole.sum(-1)
    full_order = torch.sort((~whole).to(torch.int8), dim=-1, stable=True).indices
    full_idx = torch.gather(idx, -1, full_order)
    full_n = whole.sum(-1)
    groups = heads_q // heads_kv
    lh = kb.shape[1]
    user = layout.mask_mod
    off = layout.len_k - layout.len_q

    member = _table(layout.block_mask(), heads_q, heads_kv)  # FlexAttention's mask_mod is the whole truth
    mb, mh = member.shape[:2]
    bq, bk = layout.block_q, layout.block_k

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (kv_idx < layout.len_k) & member[b if mb > 1 else b * 0, h if mh > 1 else h * 0, q_idx // bq,
                                              kv_idx // bk]
        if causal:
            ok = ok & (kv_idx <= q_idx + off)
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[b, kv_idx]
        if user is not None:
            hl = h // groups if (lh == heads_kv and lh != heads_q) else (h if lh > 1 else h * 0)
            ok = ok & user(b if kb.shape[0] > 1 else b * 0, hl, q_idx, kv_idx)
        return ok

    width = max(kb.shape[-1], layout.n_k_blocks)  # FlexAttention sizes its dense view by the table width

    def t(x):
        if x.dim() == 4 and x.shape[-1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
        return _table(x, heads_q, heads_kv)
    return BlockMask.from_kv_blocks(t(part_n).int(), t(part_idx).int(), t(full_n).int(), t(full_idx).int(),
                                    BLOCK_SIZE=layout.block_q, mask_mod=mask_mod,
                                    seq_lengths=(layout.len_q, layout.len_k))


def dense_layout(len_q: int, len_k: int, *, causal: bool, device, block: int = 128) -> BlockLayout:
    """Exact attention as a layout: every key block, those a query block can see under ``causal``."""
    nqb, nkb = -(-len_q // block), -(-len_k // block)
    if causal:
        last = query_block_positions(len_q, len_k, block, device)[1]
        seen = torch.arange(nkb, device=device) * block <= last.view(-1, 1)
    else:
        seen = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    return BlockLayout.from_block_mask(seen[None, None], block_q=block, block_k=block, len_q=len_q, len_k=len_k,
                                       causal=causal)


def _positions(score_mod, offset: int):
    """``score_mod`` with FlexAttention's query index (0-based in q) moved to attnzoo's position ``+ offset``."""
    if score_mod is None or offset == 0:
        return score_mod

    def mod(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + offset, kv_idx)
    return mod


def flex_layout_attention(q, k, v, layout, *, scale: float, causal: bool, key_padding_mask=None, score_mod=None):
    """``(out, lse)`` of ``layout`` on FlexAttention (compiled on CUDA), ``score_mod`` applied to its scores;
    rows without keys give ``(0, -inf)``."""
    if isinstance(layout, TokenLayout):
        raise UnsupportedError("flex: token layouts (FlexAttention reads whole key blocks; use backend='triton')")
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    check_layout(layout, batch=B, heads_q=Hq, heads_kv=Hkv, len_q=Nq, len_k=Nk, causal=causal)
    cache = layout.mask_cache if key_padding_mask is None else None
    key = ("flex", causal, B, Hq, Hkv)
    if cache is not None and key in cache:
        bm = cache[key]
    else:
        bm = block_mask(layout, batch=B, heads_q=Hq, heads_kv=Hkv, causal=causal, key_padding_mask=key_padding_mask)
        if cache is not None:
            cache[key] = bm
    out, lse = _compiled()(q, k, v, score_mod=_positions(score_mod, Nk - Nq), block_mask=bm, scale=scale,
                           enable_gqa=Hq != Hkv, return_lse=True)
    lse = lse.to(torch.promote_types(lse.dtype, torch.float32))
    empty = ~torch.isfinite(lse) | (lse < -1e30)
    return out.masked_fill(empty.unsqueeze(-1), 0), lse.masked_fill(empty, float("-inf"))
