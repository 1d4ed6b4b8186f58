"""Banded block layouts on PyTorch's fused CPU attention kernel: the executor's fast path (METHODS.md B2).

A block layout is *banded* when every query block ``i`` reads one contiguous
run of key blocks that lies inside ``[i + start, i + start + width)`` for one
``start`` and ``width`` (sliding and dilated windows, causal or not, and any
user layout of that shape). The keys of query block ``i`` are then the
``width · block`` consecutive keys from ``(i + start) · block``, and the
windows of all query blocks are one overlapping strided view of K and V: no
gather, no copy. PyTorch's fused flash kernel for CPU
(``aten._scaled_dot_product_flash_attention_for_cpu``, the one behind SDPA)
attends each query block to its window under an additive element mask and
returns the log-sum-exp the engine merges with, so the scores never leave
its tiles and the softmax is a single fused pass, where the generic executor
gathers key blocks and runs separate max/exp/sum passes.

A translation-invariant pattern has one element mask for all query blocks
away from the sequence ends; :class:`BandPlan` stores it once and keeps its
own masks only for the blocks that differ, so the plan costs O(block · window)
memory plus the edges. The fast path serves forward passes on CPU without
key padding; training (gradients), padding and other devices use the generic
executor, which gives the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .masks import call_mask_mod

if TYPE_CHECKING:
    from .blocksparse import BlockLayout

#: elements of the element mask evaluated at once while planning (bounds peak memory)
_PLAN_CHUNK = 1 << 24
#: dtypes the fused CPU kernel accepts
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True, eq=False)
class BandPlan:
    """Where each query block's key window starts, and the element masks over the windows.

    Query block ``i`` reads keys ``[(i + start) · block, (i + start + width) · block)``
    (positions outside ``[0, Nk)`` are masked). ``shared (block, L)`` is the
    visibility of every query block not in ``special``; ``special_mask
    (ns, block, L)`` that of the blocks in ``special``. ``empty_rows (nq, block)``
    marks query rows that see no key (their result is ``(0, -inf)``).
    """

    block: int
    start: int
    width: int
    n_q: int
    shared: torch.Tensor
    special: torch.Tensor
    special_mask: torch.Tensor
    empty_rows: torch.Tensor

    @property
    def window(self) -> int:
        return self.width * self.block


def band_plan(layout: BlockLayout, causal: bool) -> BandPlan | None:
    """The :class:`BandPlan` of ``layout`` when it is banded and shared by all batches and heads, else None.

    Costs one evaluation of the layout's element mask over the windows,
    O(Nq · window); static layouts cache the plan.
    """
    kv = layout.kv_blocks
    if layout.block_q != layout.block_k or kv.shape[:2] != (1, 1) or kv.shape[-1] == 0:
        return None
    kv = kv[0, 0]
    valid = kv >= 0
    count = valid.sum(-1)
    rows = count > 0
    if not bool(rows.any()):
        return None
    lo = torch.where(valid, kv, torch.full_like(kv, layout.n_k_blocks)).amin(-1)
    hi = torch.where(valid, kv, torch.full_like(kv, -1)).amax(-1)
    if not bool(((hi - lo + 1 == count) | ~rows).all()):
        return None  # a row with a gap
    index = torch.arange(kv.shape[0], device=kv.device)
    start = int((lo - index)[rows].min())
    width = int((hi - index)[rows].max()) - start + 1
    if width > int(count.max()) + 1:
        return None  # rows drift: one window for all of them would read far more keys than the layout
    return _element_masks(layout, causal, kv, lo, hi, start, width)


def _element_masks(layout: BlockLayout, causal: bool, kv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   start: int, width: int) -> BandPlan:
    """Evaluate the visibility of every window element, keeping one shared mask and the blocks that differ."""
    b, nq, dev = layout.block_q, kv.shape[0], kv.device
    partial = _partial_in_window(layout, kv, start, width)
    window = torch.arange(width * b, device=dev)
    rows = torch.arange(b, device=dev)

    def visible(blocks: torch.Tensor) -> torch.Tensor:  # (n,) query blocks -> (n, b, L) bool
        q_idx = (blocks.view(-1, 1) * b + rows).unsqueeze(-1)  # (n, b, 1)
        k_idx = ((blocks + start) * b).view(-1, 1, 1) + window  # (n, 1, L)
        ok = ((q_idx < layout.len_q) & (k_idx >= lo[blocks].view(-1, 1, 1) * b)
              & (k_idx < (hi[blocks] + 1).view(-1, 1, 1) * b) & (k_idx < layout.len_k))
        if causal:
            ok = ok & (k_idx <= q_idx + layout.len_k - layout.len_q)
        if layout.mask_mod is not None:
            zero = torch.zeros(1, 1, 1, dtype=torch.long, device=dev)
            mm = call_mask_mod(layout.mask_mod, zero, zero, q_idx.clamp(max=layout.len_q - 1),
                               k_idx.clamp(0, layout.len_k - 1))
            whole = ~partial[blocks].repeat_interleave(b, dim=-1).unsqueeze(1)  # (n, 1, L)
            ok = ok & (mm | whole)
        return ok

    shared = visible(torch.tensor([nq // 2], device=dev))[0]
    special, special_mask = [], []
    step = max(1, _PLAN_CHUNK // (b * width * b))
    for n0 in range(0, nq, step):
        blocks = torch.arange(n0, min(nq, n0 + step), device=dev)
        mask = visible(blocks)
        differ = (mask != shared).flatten(1).any(1)
        if bool(differ.any()):
            special.append(blocks[differ])
            special_mask.append(mask[differ])
    special_t = torch.cat(special) if special else torch.zeros(0, dtype=torch.long, device=dev)
    special_m = torch.cat(special_mask) if special_mask else shared.new_zeros(0, *shared.shape)
    empty = (~shared.any(-1)).expand(nq, b).clone()
    empty[special_t] = ~special_m.any(-1)
    return BandPlan(b, start, width, nq, shared, special_t, special_m, empty)


def _partial_in_window(layout: BlockLayout, kv: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """``(nq, width)`` bool: window block ``c`` of query block ``i`` is a partial block of the layout."""
    nq = kv.shape[0]
    table = torch.zeros(nq, width + 1, dtype=torch.bool, device=kv.device)
    if layout.partial is None:
        return table[:, :width]
    pos = kv - (torch.arange(nq, device=kv.device).view(-1, 1) + start)
    pos = torch.where(kv >= 0, pos, torch.full_like(pos, width))  # unused slots land in the spare column
    table.scatter_(-1, pos, layout.partial[0, 0])
    return table[:, :width]


def band_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                 q_positions: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernel can run this call: a forward pass on CPU, no padding, equal head dims."""
    grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (q.device.type == "cpu" and not grads and key_padding_mask is None and q_positions is None
            and q.dtype in _KERNEL_DTYPES and q.shape[-1] == v.shape[-1])


def _windows(t: torch.Tensor, plan: BandPlan) -> torch.Tensor:
    """``(B, H, Nk, X)`` -> the overlapping view ``(B·H, nq, L, X)`` of every query block's key window."""
    B, H, Nk, X = t.shape
    b = plan.block
    front = max(0, -plan.start * b)
    back = max(0, (plan.n_q - 1 + plan.start + plan.width) * b - Nk)
    t = F.pad(t, (0, 0, front, back)) if front or back else t.contiguous()
    flat = t.reshape(B * H, t.shape[2], X)
    first = plan.start * b + front  # padded position of block 0's first key
    return flat.as_strided((B * H, plan.n_q, plan.window, X), (flat.stride(0), b * X, X, 1),
                           flat.storage_offset() + first * X)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def attend_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BandPlan, *,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a banded layout with the fused CPU kernel: ``(out (B, Hq, Nq, D), lse (B, Hq, Nq))``."""
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    groups, b, nq = Hq // Hkv, plan.block, plan.n_q
    kw, vw = _windows(k, plan), _windows(v, plan)
    qv = F.pad(q, (0, 0, 0, nq * b - Nq)).reshape(B, Hkv, groups, nq, b, D)
    out = q.new_empty(B, Hkv, groups, nq, b, D)
    lse_dtype = torch.promote_types(torch.float32, q.dtype)
    lse = torch.empty(B, Hkv, groups, nq, b, dtype=lse_dtype, device=q.device)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    interior = _complement(plan.special, nq)
    shared = _additive(plan.shared, q.dtype).view(1, 1, b, plan.window)
    special = _additive(plan.special_mask, q.dtype).unsqueeze(0) if plan.special.numel() else None
    for g in range(groups):  # the query heads sharing one KV head read the same windows
        qg = qv[:, :, g].reshape(B * Hkv, nq, b, D)
        for blocks, mask in ((interior, shared), (plan.special, special)):
            if mask is None or (isinstance(blocks, torch.Tensor) and blocks.numel() == 0):
                continue
            o, l = kernel(qg[:, blocks], kw[:, blocks], vw[:, blocks], attn_mask=mask, scale=scale)
            out[:, :, g, blocks] = o.view(B, Hkv, -1, b, D)
            lse[:, :, g, blocks] = l.view(B, Hkv, -1, b).to(lse_dtype)
    empty = plan.empty_rows.view(1, 1, 1, nq, b)
    out.masked_fill_(empty.unsqueeze(-1), 0.0)
    lse.masked_fill_(empty, -math.inf)
    return out.reshape(B, Hq, nq * b, D)[:, :, :Nq], lse.reshape(B, Hq, nq * b)[:, :, :Nq]


def _complement(special: torch.Tensor, n: int) -> slice | torch.Tensor:
    """The query blocks not in ``special``: a slice when they are contiguous (a view, no copy)."""
    keep = torch.ones(n, dtype=torch.bool, device=special.device)
    keep[special] = False
    idx = keep.nonzero().squeeze(-1)
    if idx.numel() and int(idx[-1] - idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx
