"""The arithmetic of a cache read: split-K attention over held or gathered keys, merged by lse.

Both readers fold each KV head's query group (:mod:`attnzoo.core.gqa`), so K
and V are never repeated (``(B, Hq, nq, D)`` is viewed as ``(B·Hkv, G, nq, D)``
against ``(B·Hkv, 1, n, D)``); per-(batch, head) key masks then become an
ordinary ``key_padding_mask``. :func:`flash_read` is the fast path (the registered
``flash_decode`` method: split-K + lse merge); :func:`dense_read` materialises
probabilities a chunk of queries at a time, for the policies that need them
(accumulated scores, observation windows) or a visibility rule by position
(the sink + window band of streaming heads).

The gather of selected slots lives in :meth:`Store.gather`; once the shared
block-sparse executor exists, a select policy's (always ranges, selected
slots) plan maps directly onto its gather layout (B2g).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from ..core import blockkernel, capped, cpp
from ..core.blocksparse import LAYOUT_ENGINE, attend_all
from ..core.layout import BlockLayout, reusable, sink_window_layouts
from ..kernels import auto_triton
from ..core.kernel import KERNEL_DTYPES, flash_cpu, kernel_rows
from ..core.splitk import split_k
from ..core.gqa import fold_groups, merge_groups, repeat_kv, split_groups, unfold_groups
from ..core.partial import Partial, merge


def flash_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
               valid: torch.Tensor | None = None, splits: int = 8, split_size: int = 1) -> Partial:
    """Attention of ``q (B, Hq, nq, D)`` over ``k``/``v (B, Hkv, n, ·)`` by split-K + lse merge.

    At most ``splits`` key ranges of at least ``split_size`` keys each (on a
    GPU they are what fills the device). On CPU only a single query is split:
    a multi-token read (a prompt) is one fused call, as every extra range is
    only overhead there.
    ``causal`` aligns bottom-right by slot (the queries are the newest slots);
    ``valid (B, Hkv, n)`` hides padding. Rows that see nothing give ``(0, -inf)``.
    """
    B, Hq, nq, D = q.shape
    Hkv, n, Dv = k.shape[1], k.shape[2], v.shape[3]
    if n == 0:
        return Partial.empty((B, Hq, nq, Dv), device=q.device)
    if auto_triton(q):  # CUDA: the split-K kernel reads the (strided) slices in place
        from ..kernels.attention import split_k as split_k_kernel
        return split_k_kernel(q, k, v, scale=scale, causal=causal, valid=valid,
                              splits=max(1, min(splits, n // split_size)))
    if q.dtype in (torch.float16, torch.bfloat16):  # as Method.__call__ does: compute in fp32
        q, k, v = q.float(), k.float(), v.float()
    splits = min(splits, n // split_size) if nq == 1 else 1
    if (nq == 1 and q.device.type == "cpu" and q.dtype in KERNEL_DTYPES and D == Dv
            and (splits <= 1 or B * Hkv >= torch.get_num_threads())):
        # a decode step's one query sees every key: one kernel call, the query group folded into rows (no copy
        # of K per query head), padding an additive mask; on CPU key ranges would only occupy idle threads,
        # and the (batch, KV head) rows already occupy them all
        out, lse = flash_cpu(fold_groups(q, Hkv), k, v, scale=scale, mask=None if valid is None else valid[:, :, None])
        if valid is not None:  # a row whose keys are all padding: (0, -inf) (the kernel gives (0, 0))
            lse = lse.masked_fill(~valid.any(-1, keepdim=True), -math.inf)
        return Partial(unfold_groups(out, Hq), unfold_groups(lse.unsqueeze(-1), Hq).squeeze(-1))
    # each (batch, KV head) one batch row whose query group are its heads: a per-row key mask is padding
    mask = None if valid is None else valid.flatten(0, 1)
    qf, kf, vf = split_groups(q, Hkv).flatten(0, 1), k.flatten(0, 1).unsqueeze(1), v.flatten(0, 1).unsqueeze(1)
    out, lse = split_k(qf, kf, vf, scale=scale, causal=causal, splits=splits, key_padding_mask=mask)
    return Partial(merge_groups(out.unflatten(0, (B, Hkv))), merge_groups(lse.unflatten(0, (B, Hkv))))


def dense_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_pos: torch.Tensor,
               k_pos: torch.Tensor, causal: bool = True, valid: torch.Tensor | None = None,
               window: int | None = None, sinks: int = 0, want_mass: bool = False,
               budget_elems: int = 1 << 24) -> tuple[Partial, torch.Tensor | None]:
    """Exact attention with visibility by position, and optionally the mass each key received.

    Key ``j`` is visible to query ``i`` iff ``k_pos[j] <= q_pos[i]`` (when ``causal``), it is
    ``valid``, and, when ``window`` is set, ``k_pos[j] > q_pos[i] - window`` or ``k_pos[j] < sinks``
    (StreamingLLM's sinks + window band). ``q_pos (nq,)``, ``k_pos (B, Hkv, n)``.
    Returns ``(Partial, mass)`` with ``mass (B, Hkv, n)`` the probability each key received,
    summed over the queries and the query heads of its group (None unless ``want_mass``).
    """
    B, Hq, nq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    qf = split_groups(q.float(), Hkv) * scale  # (B, Hkv, G, nq, D)
    kf, vf = k.float(), v.float()
    mass = torch.zeros(B, Hkv, n, device=q.device) if want_mass else None
    outs, lses = [], []
    step = max(1, budget_elems // max(1, B * Hq * n))
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qf[:, :, :, i0:i1], kf)
        qp = q_pos[i0:i1].view(1, 1, 1, -1, 1)
        kp = k_pos.unsqueeze(2).unsqueeze(2)
        vis = torch.ones_like(s, dtype=torch.bool) if not causal else (kp <= qp).expand_as(s)
        if window is not None:
            vis = vis & ((kp > qp - window) | (kp < sinks))
        if valid is not None:
            vis = vis & valid[:, :, None, None, :]
        s = s.masked_fill(~vis, -math.inf)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
        outs.append(torch.einsum("bhgqk,bhkd->bhgqd", p, vf))
        lses.append(lse.squeeze(-1))
        if mass is not None:
            mass += p.sum(dim=(2, 3))
    return Partial(merge_groups(torch.cat(outs, dim=3)), merge_groups(torch.cat(lses, dim=3))), mass


def band_read(q: torch.Tensor, store, step, *, sinks: int, window: int) -> Partial | None:
    """StreamingLLM's sinks + window visibility over the held slots through the fused band path, or None.

    Applies when the held slots are the sink positions followed by one run of
    consecutive positions (what streaming eviction leaves) and padding is the
    same in every head: then "window by position" is "window by slot" over the
    run. Without a gap the whole run is the ``streaming`` method's pattern (its
    sink + band layouts on the block-sparse engine); after eviction the sink
    slots, which every query sees, are one more split-K partial.
    """
    pos, n, valid = store.positions, store.n, store.valid
    if n == 0 or not step.causal or (valid is not None and not bool((valid == valid[:, :1]).all())):
        return None
    row = pos[0, 0]
    a = int(torch.searchsorted(row, sinks))  # sink slots
    if not bool((pos == row).all()) or (a < n and int(row[-1] - row[a]) != n - 1 - a):
        return None
    gap = a > 0 and a < n and int(row[a]) != a
    b = a if gap else 0  # first slot of the banded run
    pad = None if valid is None else valid[:, 0, b:]
    keys, values = store.keys(b), store.values(b)
    if q.dtype in (torch.float16, torch.bfloat16):  # as Method.__call__ does: compute in fp32
        q, keys, values = q.float(), keys.float(), values.float()
    layouts = _sink_window(q.shape[2], n - b, 0 if gap else a, window, q.device)
    # on CUDA the layouts run on the Triton layout kernel, as the streaming method's auto backend does
    engine = contextlib.nullcontext()
    if auto_triton(q):
        from ..kernels.attention import layout_attention
        engine = LAYOUT_ENGINE.use(layout_attention)
    with engine:
        parts = [attend_all(q, keys, values, layouts, scale=step.scale, causal=True, key_padding_mask=pad)]
    if gap:
        parts += read_ranges(q, store, [(0, a)], step)  # older than every query: read without a mask
    return merge(*parts)


#: block of the sink + window layouts (the ``streaming`` method's default), capped at the read's length
_BAND_BLOCK = 128


@functools.lru_cache(maxsize=32)
def _sink_window(len_q: int, len_k: int, sinks: int, window: int, device) -> list:
    """The streaming pattern's layouts for a read of ``len_q`` queries over ``len_k`` held keys, kept across
    decode steps (a full streaming cache reads the same number of slots every step)."""
    block = min(_BAND_BLOCK, max(len_q, len_k))
    return reusable(sink_window_layouts(len_q, len_k, sinks=sinks, window=window, block=block, causal=True,
                                        device=device))


def key_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, *, scale: float, q_pos: torch.Tensor,
             k_pos: torch.Tensor, causal: bool = True, valid: torch.Tensor | None = None,
             rows: int = 256, budget_elems: int = 1 << 24) -> torch.Tensor:
    """``(B, Hkv, n)``: the probability each key received, summed over the queries and their group's heads.

    The probabilities are recomputed from the read's saved ``lse (B, Hq, nq)``
    (``p = exp(s - lse)``; ``lse=None`` computes it first, in a pass of the same
    shape), a chunk of at most ``rows`` queries at a time: no N×N matrix and no
    output. Keys are sorted by position in every row, so a chunk scores only the
    keys up to the last one any of its queries may see, and masks only those
    some of its queries may not see. Visibility is :func:`dense_read`'s (causal
    by position, ``valid``; ``q_pos`` ascending), and so is the result.
    """
    B, Hq, nq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    qf = q.float() * scale
    kt = k.float().transpose(-1, -2)
    kp = k_pos.contiguous()
    q_pos = q_pos.to(kp.dtype)
    step = max(1, min(rows, budget_elems // max(1, B * Hq * n)))

    def scores(i0: int, i1: int) -> tuple[torch.Tensor, int]:
        """Scores ``(B, Hkv, G·(i1 - i0), end)`` of a query chunk (the group's query heads folded into rows: one
        GEMM per KV head, K never broadcast), -inf where hidden; keys ``>= end`` it cannot see."""
        qp = q_pos[i0:i1]
        end, full = n, n
        if causal:  # keys [0, full) are seen by every query of the chunk, [end, n) by none
            end = int(torch.searchsorted(kp, qp[-1:].expand(B, Hkv, 1).contiguous(), right=True).max())
            full = int(torch.searchsorted(kp, qp[:1].expand(B, Hkv, 1).contiguous(), right=True).min())
        s = torch.matmul(fold_groups(qf[:, :, i0:i1], Hkv), kt[..., :end])
        if full < end:
            s[..., full:end].masked_fill_(kp[:, :, None, full:end] > qp.repeat(groups).view(1, 1, -1, 1), -math.inf)
        if valid is not None:
            s.masked_fill_(~valid[:, :, None, :end], -math.inf)
        return s, end

    chunks = [(i0, min(nq, i0 + step)) for i0 in range(0, nq, step)]
    if lse is None:
        lse = torch.cat([unfold_groups(torch.logsumexp(scores(i0, i1)[0], dim=-1, keepdim=True), Hq)
                         for i0, i1 in chunks], dim=2).squeeze(-1)
    lse_safe = torch.where(torch.isfinite(lse), lse.float(), torch.full_like(lse, math.inf, dtype=torch.float32))
    mass = torch.zeros(B, Hkv, n, device=q.device)
    for i0, i1 in chunks:
        s, end = scores(i0, i1)
        mass[:, :, :end] += s.sub_(fold_groups(lse_safe[:, :, i0:i1, None], Hkv)).exp_().sum(dim=2)
    return mass


#: queries from which :func:`fused_mass` beats :func:`key_mass` (below, its per-call copies of K dominate)
FUSED_MASS_QUERIES = 64


def fused_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
               valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`key_mass` for the newest ``nq`` slots (causal by slot) on the fused CPU kernel, or None.

    The mass of key ``j`` is ``Σ_i exp(s_ij - lse_i)``: attention with the roles
    swapped, whose lse it is. Keys become the kernel's queries ``[k_j, 1]``,
    queries its keys ``[q_i, -lse_i / scale]`` (the extra channel subtracts
    ``lse_i``), so ``exp(lse')`` per query head is the mass; the group's heads
    are summed by a logsumexp. Causal visibility ``j <= n - nq + i`` is the
    kernel's top-left mask once both sequences are reversed. Padding keys get
    zero mass afterwards; queries that saw nothing add none.
    """
    B, Hq, nq, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    if q.device.type != "cpu" or q.dtype not in KERNEL_DTYPES or nq < FUSED_MASS_QUERIES:
        return None
    dtype = torch.promote_types(q.dtype, torch.float32)
    bias = torch.where(torch.isfinite(lse), -lse.to(dtype) / scale, torch.full((), -1e9 / scale, dtype=dtype))
    rows = repeat_kv(torch.cat([k.to(dtype), k.new_ones(B, Hkv, n, 1, dtype=dtype)], -1), Hq)
    cols = torch.cat([q.to(dtype), bias.unsqueeze(-1)], -1)
    if causal:
        rows, cols = rows.flip(2), cols.flip(2)
    _, lse_t = flash_cpu(rows, cols, torch.zeros_like(cols), scale=scale, causal=causal)
    lse_t = lse_t.flip(2) if causal else lse_t
    mass = torch.logsumexp(split_groups(lse_t.float(), Hkv), dim=2).exp_()
    return mass if valid is None else mass.masked_fill_(~valid, 0.0)


#: the one-pass kernel's source (:mod:`attnzoo.core.cpp` builds it) and the dtypes it runs
MASS_SOURCE, MASS_DTYPES = "mass_attention.cpp", (torch.float32, torch.float64)


def attend_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool,
                     valid: torch.Tensor | None = None) -> tuple[Partial, torch.Tensor] | None:
    """Attention of the newest ``nq`` slots (causal by slot) and :func:`key_mass` in one pass, or None.

    One call of the C++ kernel ``csrc/mass_attention.cpp`` (built by :mod:`attnzoo.core.cpp`): a
    flash-style loop that keeps each query block's probabilities and column-sums them once its rows' lse is
    known, so every score is computed and exponentiated once (:func:`flash_read` then :func:`fused_mass`
    compute them twice). Each KV head's query group is a batch of heads over the same K/V (a stride-0 view, no
    copy); where no query's visibility differs (one query, or not causal) the group is folded into one work
    item's rows instead (K read once per KV head). None where the extension is not built (``ATTNZOO_CPP=0``, no compiler) or the device/dtype is
    not the kernel's (CPU; half inputs are computed in fp32, as :func:`flash_read` does).
    """
    B, Hq, nq, D = q.shape
    Hkv, n, Dv = k.shape[1], k.shape[2], v.shape[3]
    dtype = torch.promote_types(q.dtype, torch.float32)
    if q.device.type != "cpu" or n == 0 or dtype not in MASS_DTYPES or not cpp.available(MASS_SOURCE):
        return None
    G = Hq // Hkv
    fold = nq == 1 or not causal  # every query sees every key: the group's queries are one item's rows
    Y = 1 if fold else G
    qg = kernel_rows(q.to(dtype)).reshape(B * Hkv, Y, G * nq // Y, D)
    kg, vg = (kernel_rows(t.to(dtype)).reshape(B * Hkv, 1, n, t.shape[3]).expand(-1, Y, -1, -1) for t in (k, v))
    bias = None
    if valid is not None:
        bias = torch.zeros(B * Hkv, 1, n, dtype=dtype, device=q.device).masked_fill_(~valid.reshape(B * Hkv, 1, n),
                                                                                     -math.inf).expand(-1, Y, -1)
    out, lse, mass = torch.ops.attnzoo_mass.mass_attention(qg, kg, vg, bias, float(scale), causal and not fold,
                                                           n - nq)
    part = Partial(out.view(B, Hq, nq, Dv), lse.view(B, Hq, nq).float())
    return part, mass.view(B, Hkv, Y, n).sum(dim=2).float()


def mass_read(q: torch.Tensor, store, step, start: int = 0) -> tuple[Partial, torch.Tensor]:
    """Exact attention over the held slots ``[start, n)`` and the mass each received (:func:`key_mass`).

    One fused pass where the C++ kernel is built (:func:`attend_with_mass`); else the read is one
    :func:`flash_read` (the fused path) and the mass is recomputed from its lse.
    """
    valid = None if store.valid is None else store.valid[:, :, start:]
    keys, values = store.keys(start), store.values(start)
    fused = attend_with_mass(q, keys, values, scale=step.scale, causal=step.causal, valid=valid)
    if fused is not None:
        return fused
    part = flash_read(q, keys, values, scale=step.scale, causal=step.causal, valid=valid, **step.split)
    mass = fused_mass(q, keys, part.lse, scale=step.scale, causal=step.causal, valid=valid)
    return part, mass if mass is not None else key_mass(q, keys, part.lse, scale=step.scale, q_pos=step.q_pos,
                                                        k_pos=store.positions[:, :, start:], causal=step.causal,
                                                        valid=valid)


def read_ranges(q: torch.Tensor, store, ranges: list[tuple[int, int]], step) -> list[Partial]:
    """One :func:`flash_read` partial per non-empty slot range ``[a, b)`` of ``store``.

    A range ending at the newest slot is causal (bottom-right); an older range is
    entirely in the past of every query and is read without a mask.
    """
    parts = []
    for a, b in ranges:
        if b > a:
            valid = store.valid
            parts.append(flash_read(q, store.keys(a, b), store.values(a, b), scale=step.scale,
                                    causal=step.causal and b == store.n,
                                    valid=None if valid is None else valid[:, :, a:b], **step.split))
    return parts


def read_selected(q: torch.Tensor, store, idx: torch.Tensor, step, unit: int = 1,
                  local_from: int | None = None) -> Partial:
    """Attention over the slots ``idx (B, Hkv, m)`` (all older than the query: no causal mask), and with
    ``local_from`` over the slots ``[local_from, n)`` too (a decode query's local window, which it sees whole).

    A decode query's selection is read in place by the C++ kernel where it builds (the local window joins
    the selection: one call, no merge). On CUDA with float storage the split-K kernel reads the selected
    slots in place (no gather copy); elsewhere they are gathered, whole units at a time when ``idx`` is runs
    of ``unit`` slots (:meth:`Store.gather`), and the local window is read as a slice and merged by lse.
    """
    if local_from is not None:
        local = torch.arange(local_from, store.n, device=idx.device).expand(*idx.shape[:2], -1)
        part = _selected_in_place(q, store, torch.cat([idx, local], dim=-1), step)
        if part is not None:
            return part
        return merge(read_selected(q, store, idx, step, unit), *read_ranges(q, store, [(local_from, store.n)], step))
    if store.bits is None and auto_triton(q):
        from ..kernels.attention import split_k
        return split_k(q, store.buf["k"], store.buf["v"], scale=step.scale, causal=False, valid=store.buf.get("valid"),
                       idx=idx, splits=step.splits)
    part = _selected_in_place(q, store, idx, step)
    if part is not None:
        return part
    k, v = store.gather(idx, unit)
    valid = store.valid
    valid = None if valid is None else torch.gather(valid, 2, idx)
    return flash_read(q, k, v, scale=step.scale, causal=False, valid=valid, **step.split)


def _selected_in_place(q: torch.Tensor, store, idx: torch.Tensor, step) -> Partial | None:
    """A decode query's attention over the slots ``idx (B, Hkv, m)`` read in place by the C++ kernel of
    :mod:`attnzoo.core.capped` (each block of selected rows copied into the worker's scratch for its GEMMs:
    no gathered copy of the selection in memory), or None where it does not apply (no extension, several
    queries, a quantised store, a dtype the kernel does not run)."""
    kb, vb = store.buf.get("k"), store.buf.get("v")
    if q.shape[2] != 1 or store.bits is not None or not capped.applies(q, kb) or kb.dtype != q.dtype:
        return None
    Hq, Hkv = q.shape[1], idx.shape[1]
    valid = store.valid
    mask = None if valid is None else torch.gather(valid, 2, idx).unsqueeze(2)  # (B, Hkv, 1, m)
    out, lse = capped.capped_attention(fold_groups(q, Hkv), kb, vb, scale=step.scale, cap=None, mask=mask, idx=idx)
    return Partial(unfold_groups(out, Hq), unfold_groups(lse.unsqueeze(-1), Hq).squeeze(-1))


def quest_read(q: torch.Tensor, store, step, *, unit: int, lo: int, hi: int, take: int,
               fixed: torch.Tensor | None = None) -> tuple[Partial, torch.Tensor] | None:
    """A quest decode step (page selection by the store's key bounds and the read) in one call of
    :func:`attnzoo.core.capped.quest_attention`: ``(Partial, units (B, Hkv, take))``, or None where it does not
    apply (no extension, several queries, a dtype the kernel does not run). No temporaries beyond the output:
    the bounds are read as stored (bfloat16 widened exactly in the kernel), the selection in place."""
    return _paged_step(capped.quest_attention, q, store, step, unit=unit, lo=lo, hi=hi, take=take, fixed=fixed)


def tokenselect_read(q: torch.Tensor, store, step, *, lo: int, hi: int, candidates: int, take: int,
                     fixed: torch.Tensor | None = None, reuse=None) -> tuple[Partial, torch.Tensor] | None:
    """A tokenselect decode step in one call of :func:`attnzoo.core.capped.tokenselect_attention`: ``(Partial,
    slots (B, take))``, or None where it does not apply (as :func:`quest_read`). ``candidates``: pages scored
    token by token after the page vote (page-first), 0 for the exact vote over every middle token (no bounds);
    ``reuse``: the policy's selection state, decided and updated in the call (see there)."""
    return _paged_step(capped.tokenselect_attention, q, store, step, bounds=candidates > 0, lo=lo, hi=hi,
                       candidates=candidates, take=take, fixed=fixed, reuse=reuse)


def _paged_step(op, q: torch.Tensor, store, step, bounds: bool = True, **params) -> tuple[Partial, torch.Tensor] | None:
    """One call of a selection step ``op`` on the store's buffers (and its page bounds, with ``bounds``):
    ``(Partial, selection)``, or None where it does not apply."""
    kb, vb = store.buf.get("k"), store.buf.get("v")
    if (q.shape[2] != 1 or store.bits is not None or (bounds and not store.page) or not capped.applies(q, kb)
            or kb.dtype != q.dtype):
        return None
    (B, Hq, _, D), Hkv = q.shape, kb.shape[1]
    kmin, kmax = (store.pages["kmin"], store.pages["kmax"]) if bounds else (None, None)
    # one query: its group's heads are the rows of each KV head, (B, Hq, 1, ·) <-> (B, Hkv, G, ·) by reshaping
    out, lse, chosen = op(q.reshape(B, Hkv, Hq // Hkv, D), kb, vb, kmin, kmax, scale=step.scale,
                          page=store.page if bounds else 0, n=store.n, valid=store.buf.get("valid"), **params)
    return Partial(out.view(B, Hq, 1, -1), lse.view(B, Hq, 1)), chosen


#: smallest selection unit read in place by the block kernel (single tokens make one-key runs: gathered instead)
IN_PLACE_UNIT = 8


def read_units(q: torch.Tensor, store, units: torch.Tensor, unit: int, step) -> Partial | None:
    """A decode query's attention over the held slots of the units ``units (B, Hkv, S)`` (sorted unit indices;
    unit ``u`` is slots ``[u·unit, (u+1)·unit)``, the last one cut at ``n``), read in place, or None.

    One call of the block kernel (:mod:`attnzoo.core.blockkernel`): the units are a one-query-block layout per
    KV head, adjacent units read as one run straight from the store's buffers, the query group one GEMM
    operand, and no copy of the selected keys (the gather path copies them, then reads the copy). None where
    it does not apply: no extension, a quantised or half-precision store, units under ``IN_PLACE_UNIT``
    tokens, or padding that differs between heads.
    """
    k, v, valid = store.keys(), store.values(), store.valid
    if (unit < IN_PLACE_UNIT or store.bits is not None or q.shape[2] != 1 or q.device.type != "cpu"
            or q.dtype not in blockkernel.DTYPES or k.dtype != q.dtype or not blockkernel.available()):
        return None
    if valid is not None and not bool((valid == valid[:, :1]).all()):
        return None
    layout = BlockLayout(units.unsqueeze(2).contiguous(), block_q=1, block_k=unit, len_q=1, len_k=store.n)
    out, lse = blockkernel.attend_blocks(q, k, v, layout, scale=step.scale, causal=False,
                                         key_padding_mask=None if valid is None else valid[:, 0])
    return Partial(out, lse)


def combine(parts: list[Partial], like: torch.Tensor, dim_v: int) -> Partial:
    """Merge partials over disjoint key sets; the empty merge is ``(0, -inf)``."""
    if not parts:
        B, Hq, nq, _ = like.shape
        return Partial.empty((B, Hq, nq, dim_v), device=like.device)
    return merge(*parts)
