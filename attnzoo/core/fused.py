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

They serve forward passes on CPU, in training too. The backward pass
recomputes from the saved ``(out, lse)``: a banded layout without a score_mod,
or with a distance bias (learned or not) and/or a soft cap, on a C++ kernel
(:func:`attend_band_backward`, ``csrc/band_backward.cpp``: FlashAttention-2's
backward over each query block's one key window, five GEMMs per tile, no
gather), everything else slot by slot in the generic executor, which also
serves other devices, builds without a compiler (``ATTNZOO_CPP=0``) and gives
the same result (tests/test_fused.py and tests/test_band_backward.py check them
against dense references). The same kernel runs exact attention's backward
(:func:`attend_exact_backward`: every query block reads keys from 0, causal or
not; tests/test_band_exact.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import capped, cpp
from .kernel import KERNEL_DTYPES, additive_mask, flash_cpu, kernel_padding, kernel_rows
from .layout import MASK_CHUNK, BandPlan, TokenLayout
from .masks import call_mask_mod
from .scoremod import DistanceBias, ModHook, distance_rows, negligible_gap, negligible_margin


def fused_applies(q: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernel can run this call's forward pass: CPU, default positions, equal head dims."""
    return (q.device.type == "cpu" and q_positions is None and q.dtype in KERNEL_DTYPES
            and q.shape[-1] == v.shape[-1])


def fused_kernel(q, k, v, mask: torch.Tensor, scale: float, cap: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of ``q (X, Y, Lq, D)`` over ``k, v (X, Y, Lk, D)`` under a bool ``mask`` (broadcast; or
    its :func:`~attnzoo.core.kernel.additive_mask`); with a soft ``cap`` on :mod:`attnzoo.core.capped`'s kernel
    (the cap after the additive mask's values).

    Rows whose mask is all False come back as ``(0, 0)`` or ``(0, -inf)``: callers set their lse to -inf.
    """
    if cap is not None:
        return capped.capped_attention(q, k, v, scale=scale, cap=cap, mask=mask)
    return flash_cpu(q, k, v, scale=scale, mask=mask)


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
                key_padding_mask: torch.Tensor | None = None, bias: DistanceBias | None = None,
                cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a banded layout with the fused CPU kernel: ``(out (B, Hq, Nq, D), lse (B, Hq, Nq))``.

    Key padding is applied per batch row through a strided view of the padding
    mask over the same windows (one kernel call per row then). A distance-bias
    score_mod (``bias``) joins the element masks as their additive values: key
    ``c`` of a query block's window is at distance ``c - r`` plus a constant
    from row ``r``, so every block shares one ``(Hq, block, L)`` bias
    (:func:`_band_bias`). A soft ``cap`` (after the bias) runs the same calls on :mod:`attnzoo.core.capped`.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    groups, b, nq, L = Hq // Hkv, plan.block, plan.n_q, plan.window
    band_bias = None if bias is None else _band_bias(bias, plan, q, k, scale, drop_far=cap is None)

    def masks(mask: torch.Tensor, rows: slice, cols: slice):
        """The kernel masks of query group ``g`` for the element mask ``mask (n|1, r, c)``: the bool mask
        itself, or with a bias ``(B·Hkv, n|1, r, c)`` additive ones (far keys dropped, see :func:`_band_bias`)."""
        if band_bias is None:
            return lambda g: mask
        add = band_bias(mask, rows, cols)  # (Hq, n|1, r, c)
        per_group = add.view(Hkv, groups, *add.shape[1:])
        return lambda g: per_group[:, g].repeat(B, 1, 1, 1) if B > 1 else per_group[:, g]
    q = q.contiguous().view(B * Hkv, groups, Nq, D)
    k, v = _rows_of_heads(k), _rows_of_heads(v)
    pad = None if key_padding_mask is None else key_padding_mask.contiguous()
    out = q.new_empty(B * Hkv, groups, nq, b, D)
    lse = torch.empty(B * Hkv, groups, nq, b, dtype=torch.promote_types(torch.float32, q.dtype), device=q.device)
    batches = [(None, slice(None))] if pad is None else [(i, slice(i * Hkv, (i + 1) * Hkv)) for i in range(B)]

    def run(q_of_group, blocks, rows, kw, vw, mask_of_group, pad_windows):
        """Attend query blocks ``blocks`` (their ``rows``) to windows ``kw, vw`` under the kernel masks
        ``mask_of_group(g)``: bool ``(n|1, r, c)`` or additive ``(B·Hkv, n|1, r, c)``."""
        for g in range(groups):  # the query heads sharing one KV head read the same windows
            qg, mask = q_of_group(g), mask_of_group(g)
            for i, heads in batches:
                if mask.dtype == torch.bool:
                    m = (mask if i is None else mask & pad_windows[i].unsqueeze(-2)).unsqueeze(0)
                else:
                    m = mask[heads] if i is None else mask[heads].masked_fill(~pad_windows[i].unsqueeze(-2), -math.inf)
                o, l = fused_kernel(qg[heads], kw[heads], vw[heads], m, scale, cap)
                if i is not None:  # rows that padding empties
                    o, l = fix_empty_rows(o, l, m if m.dtype == torch.bool else m > -math.inf)
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
                blocks, rows, kw, vw, masks(part.mask.unsqueeze(0), rows, slice(part.col, part.col + part.cols)),
                pad_windows)
    if plan.special.numel():
        # special blocks: each over the run of window columns its rows see (inside the keys), read in place
        seen = plan.special_mask.any(1)  # (n_special, L)
        col = torch.arange(L, device=q.device)
        firsts = torch.where(seen, col, L).amin(-1).tolist()
        ends = (torch.where(seen, col, -1).amax(-1) + 1).tolist()
        for j, i in enumerate(plan.special.tolist()):
            c0, c1, r = firsts[j], ends[j], min(b, Nq - i * b)  # the block's real rows (a short last one)
            if c0 >= c1:
                continue  # no row sees a key: all empty rows
            key0 = (i + plan.start) * b + c0
            kw, vw = (t[:, key0:key0 + c1 - c0].unsqueeze(1) for t in (k, v))
            pad_windows = None if pad is None else pad[:, key0:key0 + c1 - c0].unsqueeze(1)
            run(lambda g, i=i, r=r: q[:, g, i * b:i * b + r].unsqueeze(1), slice(i, i + 1), slice(0, r), kw, vw,
                masks(plan.special_mask[j:j + 1, :r, c0:c1], slice(0, r), slice(c0, c1)), pad_windows)
    if plan.any_empty:  # rows of the layout that see no key (written row by row, not a pass over the output)
        out[:, :, plan.empty_rows] = 0.0
        lse[:, :, plan.empty_rows] = -math.inf
    return out.view(B, Hq, nq * b, D)[:, :, :Nq], lse.view(B, Hq, nq * b)[:, :, :Nq]


_BACKWARD_SOURCE = "band_backward.cpp"
#: query positions per tile of the band backward (times a KV head's query heads: the tile's rows); a causal
#: window's rows see a run of keys that moves with the row, so smaller tiles compute fewer masked scores
BACKWARD_TILE = 64


def band_backward_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mod: ModHook | None = None) -> bool:
    """Whether :func:`attend_band_backward` and :func:`attend_exact_backward` can run: CPU tensors of one kernel
    dtype (bfloat16/float16 are computed in float32), the extension built (:mod:`attnzoo.core.cpp`;
    ``ATTNZOO_CPP=0``: never), and no score_mod or one the kernel recomputes (a distance bias and/or a soft cap
    after it) whose tensors needing a gradient, if any, are read by its distance bias (a learned table: the
    kernel sums the gradient per distance, see :meth:`~attnzoo.core.scoremod.ModHook.pull_back`)."""
    return (kernel_mod_applies(mod) and q.device.type == "cpu" and q.dtype in KERNEL_DTYPES and k.dtype == q.dtype
            and v.dtype == q.dtype and cpp.available(_BACKWARD_SOURCE))


def kernel_mod_applies(mod: ModHook | None) -> bool:
    """Whether the C++ backward kernels (this module's band/exact one, :mod:`attnzoo.core.blockbackward`'s) recompute
    ``mod``: none, or a distance bias and/or a soft cap after it, whose tensors needing a gradient, if any, are
    read by the bias (the kernels return the biased scores' gradient summed per distance, which
    :meth:`~attnzoo.core.scoremod.ModHook.pull_back` turns into theirs)."""
    if mod is None:
        return True
    bias, cap = fused_mod(mod)
    return (bias, cap) != (None, None) and (bias is not None or not mod.captured)


def fused_mod(mod: ModHook | None) -> tuple[DistanceBias | None, float | None]:
    """``(bias, cap)``: the distance bias the fused paths and the C++ backward add to the scores and the soft cap
    they apply after it (None each when ``mod`` has none: the only mods that reach them)."""
    if mod is None:
        return None, None
    return (mod.distance, None) if mod.distance is not None else mod.capped or (None, None)


def _band_masks(plan: BandPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's element masks as ``(masks (1 + n_special, block, L), mask_of (n_q,))``: mask 0 is the
    interior blocks' shared one, mask ``1 + j`` the special block ``plan.special[j]``'s."""
    masks = torch.cat([plan.shared.unsqueeze(0), plan.special_mask]).contiguous()
    mask_of = torch.zeros(plan.n_q, dtype=torch.long, device=plan.shared.device)
    mask_of[plan.special] = torch.arange(1, plan.special.numel() + 1, device=mask_of.device)
    return masks, mask_of


def attend_band_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         d_out: torch.Tensor, d_lse: torch.Tensor | None, plan: BandPlan, *, scale: float,
                         key_padding_mask: torch.Tensor | None = None, mod: ModHook | None = None,
                         grads: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`attend_band`'s ``(out, lse)`` on the C++ kernel
    ``csrc/band_backward.cpp``; only after :func:`band_backward_applies`.

    FlashAttention-2's backward, recomputing each query block's probabilities from the saved ``lse`` over
    its window of keys (the plan's element masks; padding hides keys): ``delta = rowsum(dO · O) - dlse``
    (as :func:`~attnzoo.core.partial.grad_inputs`, but while the kernel packs each tile's rows),
    ``dV += Pᵀ dO``, ``dS = P (dO Vᵀ - delta)``, ``dQ = dS K · scale``, ``dK += dSᵀ Q · scale``. The query
    heads of a KV head are one tile's rows; work runs in parallel over (batch row, KV head), and over runs of
    query blocks with their own dK/dV buffers when there are fewer than 8 of those; the result does not depend
    on the thread count (each work item on one thread, with single-threaded BLAS).
    The ``mod``'s distance bias and soft cap (after it) are recomputed on the scores as the forward applied
    them (the bias as one vector per head over the distances of a block's rows to its window, the same for
    every block, see :func:`_band_bias`) and ``dS`` is multiplied by the cap's slope ``1 - tanh²``; tensors
    the bias reads that need a gradient get it as in :func:`attend_exact_backward`, added into ``grads``.
    """
    masks, mask_of = _band_masks(plan)
    b, L, Nq, Nk = plan.block, plan.window, q.shape[2], k.shape[2]
    # distance of row r to window column c: start·b - (Nk - Nq) + c - r, at index c - r + b - 1
    return _backward_kernel(q, k, v, out, lse, d_out, d_lse, scale, key_padding_mask, mod, grads,
                            plan.start * b - (Nk - Nq) - (b - 1), b + L - 1, masks, mask_of, b, plan.start, _BAND, 0)


def attend_exact_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          d_out: torch.Tensor, d_lse: torch.Tensor | None, *, scale: float, causal: bool,
                          offset: int, key_padding_mask: torch.Tensor | None = None, mod: ModHook | None = None,
                          grads: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of exact attention's ``(out, lse)`` (the tiled engine's,
    :func:`attnzoo.core.exact.tiled_attention`) on the same C++ kernel as :func:`attend_band_backward`; only
    after :func:`band_backward_applies`.

    Every block of :data:`BACKWARD_TILE` query positions reads keys from 0: all ``Nk`` of them, or with
    ``causal`` those up to each row's limit ``position + offset`` (``offset = q_offset - k_offset``, bottom-right
    alignment: ``Nk - Nq``), as per-row column limits (no element masks, nothing of size Nq x Nk). The ``mod``'s
    distance bias is one vector per head over the call's distances ``-(Nq - 1) - offset .. Nk - 1 - offset``;
    tensors it reads that need a gradient (a learned table) get it from the kernel's per-distance sums of the
    biased scores' gradient, pulled back through the bias (:meth:`~attnzoo.core.scoremod.ModHook.pull_back`)
    and added into ``grads``.
    """
    Nq, Nk = q.shape[2], k.shape[2]
    none = torch.zeros(0, dtype=torch.bool, device=q.device), torch.zeros(0, dtype=torch.long, device=q.device)
    return _backward_kernel(q, k, v, out, lse, d_out, d_lse, scale, key_padding_mask, mod, grads, -(Nq - 1) - offset,
                            Nq + Nk - 1, *none, BACKWARD_TILE, 0, _PREFIX if causal else _FULL, offset)


#: csrc/band_backward.cpp's modes: a band plan's windows, keys from 0 to each row's causal limit, all keys
_BAND, _PREFIX, _FULL = 0, 1, 2


def _backward_kernel(q, k, v, out, lse, d_out, d_lse, scale: float, key_padding_mask, mod: ModHook | None,
                     grads: list | None, d0: int, length: int, masks: torch.Tensor, mask_of: torch.Tensor,
                     block: int, start: int, mode: int, offset: int):
    """``(dq, dk, dv)`` from ``csrc/band_backward.cpp`` in ``mode``, in float32 for bfloat16/float16 inputs; the
    ``mod``'s bias as :func:`~attnzoo.core.scoremod.distance_rows` of the distances ``d0 ..`` (``length`` of
    them), and when it reads tensors needing a gradient, the kernel's sums of the biased scores' gradient per
    distance pulled back into ``grads``."""
    bias, cap = fused_mod(mod)
    bias_grad = mod is not None and bool(mod.captured)
    dtype = q.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    q, k, v, out, d_out = (kernel_rows(t.to(work)) for t in (q, k, v, out, d_out))
    lse, d_lse = (None if t is None else t.to(work).contiguous() for t in (lse, d_lse))
    pad = kernel_padding(key_padding_mask, q.shape[0])
    vec = None if bias is None else distance_rows(bias, d0, length, work, q.device, causal=False)
    cpp.available(_BACKWARD_SOURCE)  # loads the op (built once per process)
    dq, dk, dv, d_bias = torch.ops.attnzoo_band.band_backward(q, k, v, out, d_out, lse, d_lse, masks, mask_of, pad,
                                                              block, start, float(scale), BACKWARD_TILE, vec,
                                                              float(cap or 0.0), mode, offset, bias_grad)
    if bias_grad:
        mod.pull_back(bias, d_bias, d0, grads)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _band_bias(mod: DistanceBias, plan: BandPlan, q: torch.Tensor, k: torch.Tensor, scale: float, drop_far: bool):
    """The additive masks of a banded layout under a distance bias, as a function of an element mask.

    Row ``r`` of query block ``i`` is at position ``i·block + r + Nk - Nq`` (bottom-right aligned) and
    column ``c`` of its window at ``(i + start)·block + c``: the distance ``start·block - (Nk - Nq) + c - r``
    does not depend on ``i``, so one ``(Hq, block, L)`` bias serves every block. The returned function
    takes a bool mask ``(n, r, c)`` of the window rows ``rows`` and columns ``cols`` and gives
    ``(Hq, n, r, c)``: the bias where visible, -inf elsewhere and at keys too far below the row's largest
    visible bias to count (:func:`~attnzoo.core.scoremod.negligible_gap`: spares the kernel subnormal
    arithmetic; only with ``drop_far``: under a soft cap every key weighs).
    """
    b, L, Nq, Nk = plan.block, plan.window, q.shape[2], k.shape[2]
    dtype = torch.promote_types(torch.float32, q.dtype)
    # the bias of distances d0 - (b - 1) .. d0 + L - 1 (d0 = start·b - (Nk - Nq)): row r of the window reads
    # L of them from index b - 1 - r, so the (b, L) table is the vector's overlapping windows, rows reversed
    vec = distance_rows(mod, plan.start * b - (Nk - Nq) - (b - 1), b + L - 1, dtype, q.device, causal=False)
    table = vec.unfold(-1, L, 1).flip(1).expand(q.shape[1], b, L)  # (Hq, b, L)
    # a bias whose values span less than the smallest gap has no key to drop: no pass over q and k, no row max
    drop_far = drop_far and bool(((vec.amax(-1) - vec.amin(-1)) >= negligible_margin(q.dtype, Nk)).any())
    if drop_far:
        gap = negligible_gap(q, k, scale, Nk).to(dtype).view(-1, 1, 1, 1)

    def additive(mask: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        # arithmetic passes only (a masked_fill / where with a broadcast bool mask is several times slower)
        with torch.no_grad():
            add = table[:, rows, cols].unsqueeze(1) + additive_mask(mask, dtype)
            if drop_far:  # + -inf where the bias is below floor = the row's largest visible bias - gap, else + 0
                floor = (add.amax(-1, keepdim=True) - gap).clamp_(min=torch.finfo(dtype).min)  # no -inf - -inf
                add += F.threshold(add - floor, 0.0, -math.inf).clamp_(max=0.0)
            return add

    return additive


# ------------------------------------------------------------------ token sets as one dense attention
#: causal token unions run in row chunks of at least this many rows (more when Nq / 16 is larger), each
#: attending only the union keys up to its last row: about half the kernel work of one pass over all keys
_CAUSAL_ROWS = 256


def attend_token_union(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, keys: torch.Tensor,
                       member: torch.Tensor, *, scale: float, causal: bool,
                       key_padding_mask: torch.Tensor | None = None, bias: DistanceBias | None = None,
                       cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token layout as one dense attention per head over the union of its keys (``TokenLayout.union``).

    Each query row sees the union keys its group reads (``member``), ∩ causal,
    ``mask_mod`` and padding. With ``Hl`` of 1 or Hkv the query heads of a KV
    head are folded into rows; per-query-head layouts gather keys per query head.
    Rows are processed in chunks of ``MASK_CHUNK`` mask elements. A distance ``bias`` joins the mask
    as its values (:func:`_token_bias`, per query head, so it varies along folded rows too); a soft
    ``cap`` (after it) runs on :mod:`attnzoo.core.capped`.
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
    step = max(1, MASK_CHUNK // (B * H * fold * max(T, 1)))
    if causal:  # smaller row chunks, each reading only the union keys its last row may see (keys are sorted)
        step = min(step, max(_CAUSAL_ROWS, -(-Nq // 16)))
        last_key = torch.where(keys >= 0, keys, torch.full_like(keys, Nk)).flatten(0, 1)  # (Bl·Hl, T) sorted
    for r0 in range(0, Nq, step):
        r1 = min(Nq, r0 + step)
        q_idx = torch.arange(r0, r1, device=q.device)
        t = T
        if causal:
            limit = torch.full((last_key.shape[0], 1), r1 - 1 + Nk - Nq, dtype=last_key.dtype, device=q.device)
            t = int(torch.searchsorted(last_key, limit, right=True).max())
            if t == 0:
                outs.append(q.new_zeros(B, H, fold, r1 - r0, D))
                lses.append(torch.full((B, H, fold, r1 - r0), -math.inf, device=q.device,
                                       dtype=torch.promote_types(torch.float32, q.dtype)))
                continue
        vis = member[:, :, q_idx // layout.group, :t] & valid[..., :t].unsqueeze(2)  # (B|Bl, Hl, n, t)
        if causal:
            vis = vis & (keys[..., :t].unsqueeze(2) <= q_idx.view(-1, 1) + Nk - Nq)
        if layout.mask_mod is not None:
            b = torch.arange(Bl, device=q.device).view(Bl, 1, 1, 1)
            h = torch.arange(Hl, device=q.device).view(1, Hl, 1, 1)
            vis = vis & call_mask_mod(layout.mask_mod, b, h, q_idx.view(1, 1, -1, 1),
                                      keys[..., :t].clamp(0, Nk - 1).unsqueeze(2))
        vis = vis.expand(vis.shape[0], H, r1 - r0, t).unsqueeze(2).expand(-1, -1, fold, -1, -1)
        mask = vis.reshape(vis.shape[0], H, fold * (r1 - r0), t)
        add = mask if bias is None else _token_bias(bias, keys[..., :t], q_idx + Nk - Nq, mask, groups, q.dtype)
        o, l = fix_empty_rows(*fused_kernel(qf[:, :, :, r0:r1].reshape(B, H, -1, D), kg[:, :, :t], vg[:, :, :t],
                                            add, scale, cap), mask)
        outs.append(o.reshape(B, H, fold, r1 - r0, D))
        lses.append(l.reshape(B, H, fold, r1 - r0))
    out, lse = (torch.cat(t, 3) if len(t) > 1 else t[0] for t in (outs, lses))
    return out.reshape(B, Hq, Nq, D), lse.to(torch.promote_types(torch.float32, q.dtype)).reshape(B, Hq, Nq)


def _token_bias(bias: DistanceBias, keys: torch.Tensor, q_pos: torch.Tensor, mask: torch.Tensor, groups: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of :func:`attend_token_union`'s rows under a distance bias: ``mask (X, H, fold·n, t)``
    (query head ``H_idx·fold + f``, rows ``q_pos (n,)``) with the bias of key positions ``keys (Bl, Hl, t)``."""
    X, H, rows, t = mask.shape
    fold, n = rows // q_pos.numel(), q_pos.numel()
    Hq = H * fold
    kv = keys if keys.shape[1] in (1, Hq) else keys.repeat_interleave(groups, 1)  # key positions per query head
    h = torch.arange(Hq, device=mask.device).view(1, Hq, 1, 1)
    with torch.no_grad():
        add = torch.zeros(X, Hq, n, t, dtype=dtype, device=mask.device)
        add = bias(add, torch.zeros(1, 1, 1, 1, dtype=torch.long, device=mask.device), h, q_pos.view(1, 1, n, 1),
                   kv.clamp(min=0).unsqueeze(2))
        return add.view(X, H, rows, t).masked_fill_(~mask, -math.inf)


def fix_empty_rows(out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel leaves ``(0, 0)`` on rows whose ``mask`` is all False: make them ``(0, -inf)``."""
    empty = ~mask.any(-1).expand(lse.shape)
    if bool(empty.any()):
        out[empty] = 0.0  # writes the empty rows only (a where would rewrite the whole output)
        lse[empty] = -math.inf
    return out, lse
