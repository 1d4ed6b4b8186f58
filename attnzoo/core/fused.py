"""The executor's fast paths on PyTorch's fused CPU attention kernel (docs/methods.md, Engines).

The generic executor (:mod:`attnzoo.core.blocksparse`) gathers key blocks and
runs the online softmax as separate max/exp/sum passes in eager PyTorch.
Two common layout shapes can instead run on
``aten._scaled_dot_product_flash_attention_for_cpu``, the fused kernel behind
SDPA on CPU, which takes an additive element mask, keeps scores in its tiles
and returns the log-sum-exp the engine merges with:

* **Banded block layouts.** Every query block ``i`` reads one contiguous run
  of key blocks inside ``[i + start, i + start + width)`` (sliding and dilated
  windows, causal or not, the band of streaming and strided, any user layout
  of that shape). Its keys are then ``width · block`` consecutive keys, and
  the windows of all query blocks are one overlapping strided view of K and
  V: no gather, no copy. A translation-invariant pattern has one element mask
  for every block away from the sequence ends; :class:`BandPlan` keeps it once
  and gives the other ("special") blocks their own masks and gathered windows.
* **Token sets with a small union.** A token layout whose query groups read
  mostly the same keys (attention sinks, global tokens, vertical columns) is
  one dense attention per head over the union of its keys under a mask of
  which keys each row's group reads.

They serve forward passes on CPU (in training too: the backward pass
recomputes from the saved ``(out, lse)`` slot by slot in the generic
executor, which also serves other devices and gives the same result;
tests/test_fused.py checks both against dense references).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .kernel import KERNEL_DTYPES, flash_cpu
from .masks import call_mask_mod

if TYPE_CHECKING:
    from .blocksparse import BlockLayout, TokenLayout

#: elements of an element mask evaluated at once (planning a band, or a chunk of token rows): bounds peak memory
_PLAN_CHUNK = 1 << 24


def fused_applies(q: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernel can run this call's forward pass: CPU, default positions, equal head dims."""
    return (q.device.type == "cpu" and q_positions is None and q.dtype in KERNEL_DTYPES
            and q.shape[-1] == v.shape[-1])


def fused_kernel(q, k, v, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of ``q (X, Y, Lq, D)`` over ``k, v (X, Y, Lk, D)`` under a bool ``mask`` (broadcast).

    Rows whose mask is all False come back as ``(0, 0)``: callers set their lse to -inf.
    """
    return flash_cpu(q, k, v, scale=scale, mask=mask)


# ------------------------------------------------------------------ banded block layouts
@dataclass(frozen=True, eq=False)
class SubBlock:
    """Rows ``[row, row + rows)`` of every interior query block read window columns ``[col, col + cols)``."""

    row: int
    rows: int
    col: int
    mask: torch.Tensor  # (rows, cols) bool

    @property
    def cols(self) -> int:
        return self.mask.shape[-1]


@dataclass(frozen=True, eq=False)
class BandPlan:
    """Where each query block's key window starts, and the element masks over the windows.

    Query block ``i`` reads keys ``[(i + start) · block, (i + start + width) · block)``
    (positions outside ``[0, Nk)`` are masked). The ``interior`` query blocks
    (a slice or an index tensor) are whole, have their window inside the keys
    and share the mask ``shared (block, L)``; the ``special`` ones carry
    ``special_mask (ns, block, L)``. ``empty_rows (nq, block)`` marks query
    rows that see no key (their result is ``(0, -inf)``). ``parts`` cut the
    interior blocks' rows into the sub-blocks the kernel runs, each over the
    narrower run of window columns its rows see.
    """

    block: int
    start: int
    width: int
    n_q: int
    interior: slice | torch.Tensor
    shared: torch.Tensor
    special: torch.Tensor
    special_mask: torch.Tensor
    empty_rows: torch.Tensor
    parts: tuple[SubBlock, ...] = ()

    @property
    def window(self) -> int:
        return self.width * self.block

    @property
    def any_empty(self) -> bool:
        return bool(self.empty_rows.any())


def band_plan(layout: "BlockLayout", causal: bool) -> BandPlan | None:
    """The :class:`BandPlan` of ``layout`` when it is banded and shared by all batches and heads, else None.

    Costs one evaluation of the layout's element mask over the windows,
    O(Nq · window); the executor caches the plan of static layouts.
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


def _element_masks(layout: "BlockLayout", causal: bool, kv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
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

    # blocks the strided view may serve: whole query blocks whose window lies inside the keys
    first = max(0, -start)
    last = min(nq - 1 if layout.len_q % b == 0 else nq - 2, layout.len_k // b - start - width)
    shared = visible(torch.tensor([(first + last) // 2 if first <= last else 0], device=dev))[0]
    special, special_mask = [], []
    step = max(1, _PLAN_CHUNK // (b * width * b))
    for n0 in range(0, nq, step):
        blocks = torch.arange(n0, min(nq, n0 + step), device=dev)
        mask = visible(blocks)
        differ = (mask != shared).flatten(1).any(1) | (blocks < first) | (blocks > last)
        if bool(differ.any()):
            special.append(blocks[differ])
            special_mask.append(mask[differ])
    special_t = torch.cat(special) if special else torch.zeros(0, dtype=torch.long, device=dev)
    special_m = torch.cat(special_mask) if special_mask else shared.new_zeros(0, *shared.shape)
    empty = (~shared.any(-1)).expand(nq, b).clone()
    empty[special_t] = ~special_m.any(-1)
    is_interior = torch.ones(nq, dtype=torch.bool, device=dev)
    is_interior[special_t] = False
    return BandPlan(b, start, width, nq, _as_slice(is_interior.nonzero().squeeze(-1)), shared, special_t,
                    special_m, empty, _sub_blocks(shared))


def _sub_blocks(shared: torch.Tensor) -> tuple[SubBlock, ...]:
    """Cut the rows of ``shared (block, L)`` into the sub-blocks that compute the fewest scores.

    A causal window's rows each see a run of columns that moves with the row,
    so halving the rows of a kernel call narrows its key window: with block
    128 and window 512 the kernel computes 639 keys per row at 128 rows, 575
    at 64 and 543 at 32. Sub-blocks stop at 32 rows, where per-call overhead
    starts to outweigh the saving. Rows that see nothing are left out.
    """
    b = shared.shape[0]
    best, best_cost = (), None
    size = b
    while True:
        parts = []
        for row in range(0, b, size):
            seen = shared[row:row + size].any(0).nonzero().squeeze(-1)
            if seen.numel():
                col, end = int(seen[0]), int(seen[-1]) + 1
                parts.append(SubBlock(row, size, col, shared[row:row + size, col:end]))
        cost = sum(p.rows * p.cols for p in parts)
        if best_cost is None or cost < best_cost:
            best, best_cost = tuple(parts), cost
        if size % 2 or size // 2 < 32:
            return best
        size //= 2


def _partial_in_window(layout: "BlockLayout", kv: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """``(nq, width)`` bool: window block ``c`` of query block ``i`` is a partial block of the layout."""
    nq = kv.shape[0]
    table = torch.zeros(nq, width + 1, dtype=torch.bool, device=kv.device)
    if layout.partial is None:
        return table[:, :width]
    pos = kv - (torch.arange(nq, device=kv.device).view(-1, 1) + start)
    pos = torch.where(kv >= 0, pos, torch.full_like(pos, width))  # unused slots land in the spare column
    table.scatter_(-1, pos, layout.partial[0, 0])
    return table[:, :width]


def _as_slice(idx: torch.Tensor) -> slice | torch.Tensor:
    """Sorted indices as a slice when they are contiguous (indexing then gives a view, no copy)."""
    if idx.numel() == 0:
        return slice(0, 0)
    if int(idx[-1] - idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _rows_of_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` as ``(B·H, N, D)`` with rows of ``D`` contiguous elements, copying only when needed.

    A slice of a longer buffer (a KV cache's first ``n`` positions) keeps its
    storage: windows are strided views into it, so a decode step does not copy
    the whole cache.
    """
    B, H, N, D = t.shape
    rows_packed = t.stride(-1) == 1 and t.stride(-2) == D
    heads_merge = B == 1 or t.stride(0) == H * t.stride(1)
    return (t if rows_packed and heads_merge else t.contiguous()).reshape(B * H, N, D)


def attend_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BandPlan, *, scale: float,
                key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a banded layout with the fused CPU kernel: ``(out (B, Hq, Nq, D), lse (B, Hq, Nq))``.

    Key padding is applied per batch row through a strided view of the padding
    mask over the same windows (one kernel call per row then).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    groups, b, nq, L = Hq // Hkv, plan.block, plan.n_q, plan.window
    q = q.contiguous().view(B * Hkv, groups, Nq, D)
    k, v = _rows_of_heads(k), _rows_of_heads(v)
    pad = None if key_padding_mask is None else key_padding_mask.contiguous()
    out = q.new_empty(B * Hkv, groups, nq, b, D)
    lse = torch.empty(B * Hkv, groups, nq, b, dtype=torch.promote_types(torch.float32, q.dtype), device=q.device)
    batches = [(None, slice(None))] if pad is None else [(i, slice(i * Hkv, (i + 1) * Hkv)) for i in range(B)]

    def run(q_of_group, blocks, rows, kw, vw, mask, pad_windows):
        """Attend query blocks ``blocks`` (their ``rows``) to windows ``kw, vw`` under ``mask (n|1, r, c)``."""
        for g in range(groups):  # the query heads sharing one KV head read the same windows
            qg = q_of_group(g)
            for i, heads in batches:
                m = mask if i is None else mask & pad_windows[i].unsqueeze(-2)
                o, l = fused_kernel(qg[heads], kw[heads], vw[heads], m.unsqueeze(0), scale)
                if i is not None:  # rows that padding empties
                    o, l = fix_empty_rows(o, l, m)
                out[heads, g, blocks, rows], lse[heads, g, blocks, rows] = o, l

    blocks = plan.interior
    n_in = blocks.stop - blocks.start if isinstance(blocks, slice) else int(plan.interior.numel())
    if n_in:
        # interior blocks: strided views over the range they span (every window there lies inside the keys)
        first = blocks.start if isinstance(blocks, slice) else int(blocks[0])
        span = (blocks.stop if isinstance(blocks, slice) else int(blocks[-1]) + 1) - first
        sel = slice(0, span) if isinstance(blocks, slice) else blocks - first
        for part in plan.parts:
            key0 = (first + plan.start) * b + part.col  # first key of the first window
            kw, vw = (t.as_strided((B * Hkv, span, part.cols, D), (t.stride(0), b * D, D, 1),
                                   t.storage_offset() + key0 * D)[:, sel] for t in (k, v))
            pad_windows = None if pad is None else pad.as_strided((B, span, part.cols), (Nk, b, 1),
                                                                  pad.storage_offset() + key0)[:, sel]
            rows = slice(part.row, part.row + part.rows)
            run(lambda g: q[:, g, first * b:(first + span) * b].view(B * Hkv, span, b, D)[:, sel, rows],
                blocks, rows, kw, vw, part.mask.unsqueeze(0), pad_windows)
    if plan.special.numel():
        # special blocks: windows gathered with clamped indices (positions outside the keys are masked)
        pos = (plan.special.view(-1, 1) + plan.start) * b + torch.arange(L, device=q.device)
        pos = pos.clamp(0, Nk - 1).view(-1)
        kw, vw = (t[:, pos].view(B * Hkv, -1, L, D) for t in (k, v))  # indexing reads strided rows in place
        pad_windows = None if pad is None else pad[:, pos].view(B, -1, L)
        rows = (plan.special.view(-1, 1) * b + torch.arange(b, device=q.device)).clamp(max=Nq - 1).view(-1)
        run(lambda g: q[:, g].index_select(1, rows).view(B * Hkv, -1, b, D), plan.special, slice(None), kw, vw,
            plan.special_mask, pad_windows)
    if plan.any_empty:  # rows of the layout that see no key (written row by row, not a pass over the output)
        out[:, :, plan.empty_rows] = 0.0
        lse[:, :, plan.empty_rows] = -math.inf
    return out.view(B, Hq, nq * b, D)[:, :, :Nq], lse.view(B, Hq, nq * b)[:, :, :Nq]


# ------------------------------------------------------------------ token sets as one dense attention
def attend_token_union(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: "TokenLayout", keys: torch.Tensor,
                       member: torch.Tensor, *, scale: float, causal: bool,
                       key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token layout as one dense attention per head over the union of its keys (``TokenLayout.union``).

    Each query row sees the union keys its group reads (``member``), ∩ causal,
    ``mask_mod`` and padding. With ``Hl`` of 1 or Hkv the query heads of a KV
    head are folded into rows; per-query-head layouts gather keys per query head.
    Rows are processed in chunks of ``_PLAN_CHUNK`` mask elements.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    Bl, Hl, T = keys.shape
    per_query_head = Hl == Hq and groups > 1
    H, fold = (Hq, 1) if per_query_head else (Hkv, groups)  # kernel heads; query heads folded into rows
    kv_head = torch.arange(H, device=q.device) // (groups if per_query_head else 1)
    idx = keys.clamp(min=0).expand(B, H, T)
    flat = ((torch.arange(B, device=q.device).view(B, 1, 1) * Hkv + kv_head.view(1, H, 1)) * Nk + idx).reshape(-1)
    kg, vg = (t.reshape(-1, D).index_select(0, flat).view(B, H, T, D) for t in (k, v))
    valid = keys >= 0  # (Bl, Hl, T)
    if key_padding_mask is not None:
        pad = key_padding_mask.unsqueeze(1).expand(B, Hl, Nk)
        valid = valid & torch.gather(pad, 2, keys.clamp(min=0).expand(B, Hl, T))
    qf = q.reshape(B, H, fold, Nq, D)
    outs, lses = [], []
    step = max(1, _PLAN_CHUNK // (B * H * fold * max(T, 1)))
    for r0 in range(0, Nq, step):
        r1 = min(Nq, r0 + step)
        q_idx = torch.arange(r0, r1, device=q.device)
        vis = member[:, :, q_idx // layout.group] & valid.unsqueeze(2)  # (B|Bl, Hl, n, T)
        if causal:
            vis = vis & (keys.unsqueeze(2) <= q_idx.view(-1, 1) + Nk - Nq)
        if layout.mask_mod is not None:
            b = torch.arange(Bl, device=q.device).view(Bl, 1, 1, 1)
            h = torch.arange(Hl, device=q.device).view(1, Hl, 1, 1)
            vis = vis & call_mask_mod(layout.mask_mod, b, h, q_idx.view(1, 1, -1, 1),
                                      keys.clamp(0, Nk - 1).unsqueeze(2))
        vis = vis.expand(vis.shape[0], H, r1 - r0, T).unsqueeze(2).expand(-1, -1, fold, -1, -1)
        mask = vis.reshape(vis.shape[0], H, fold * (r1 - r0), T)
        o, l = fix_empty_rows(*fused_kernel(qf[:, :, :, r0:r1].reshape(B, H, -1, D), kg, vg, mask, scale), mask)
        outs.append(o.reshape(B, H, fold, r1 - r0, D))
        lses.append(l.reshape(B, H, fold, r1 - r0))
    out, lse = (torch.cat(t, 3) if len(t) > 1 else t[0] for t in (outs, lses))
    return out.reshape(B, Hq, Nq, D), lse.to(torch.promote_types(torch.float32, q.dtype)).reshape(B, Hq, Nq)


def fix_empty_rows(out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel leaves ``(0, 0)`` on rows whose ``mask`` is all False: make them ``(0, -inf)``."""
    empty = ~mask.any(-1).expand(lse.shape)
    if bool(empty.any()):
        out[empty] = 0.0  # writes the empty rows only (a where would rewrite the whole output)
        lse[empty] = -math.inf
    return out, lse
