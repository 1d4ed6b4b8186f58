"""Soft-capped attention in one fused CPU pass: a small C++ extension (``csrc/capped_attention.cpp``),
compiled on first use.

A soft cap ``cap·tanh(s / cap)`` is no additive mask, so PyTorch's fused CPU kernel cannot run it, and the
eager row-wise path (:func:`attnzoo.core.exact._mod_row_tiles`) pays separate passes over every score
block. The extension is the same flash-style loop as PyTorch's kernel (per work item of 64 query rows:
blocks of 512 keys, a BLAS GEMM for the scores, one pass for the additive mask, the cap and the row
maximum, one for ``exp`` and the row sum, a GEMM into the output), with the cap inside it. Its entry
:func:`capped_attention` has :func:`~attnzoo.core.kernel.flash_cpu`'s interface plus ``cap`` and a
bottom-right causal ``offset``.

The build (:mod:`attnzoo.core.cpp`) needs a C++ compiler (and ninja). Where it cannot be built (or
``ATTNZOO_CPP=0``) :func:`available` is False and every caller keeps its eager path: the extension is
only ever a faster way to the same result.
"""

from __future__ import annotations

import torch

from . import cpp
from .kernel import kernel_rows

_SOURCE = "capped_attention.cpp"
#: dtypes the extension runs (others take the eager paths)
DTYPES = (torch.float32, torch.float64)


def built() -> bool | None:
    """Whether the extension was built in this process (None: not tried yet; nothing is built here)."""
    return cpp.built(_SOURCE)


def available() -> bool:
    """Whether the extension is built (building it now, once per process, if needed)."""
    return cpp.available(_SOURCE)


def applies(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`capped_attention` can run a call on these inputs (CPU, float32/64, built)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and v.dtype == q.dtype and available()


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, cap: float | None,
                     causal: bool = False, offset: int = 0, mask: torch.Tensor | None = None,
                     idx: torch.Tensor | None = None,
                     skip: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (X, Y, Lq, Dv), lse (X, Y, Lq))`` of ``q (X, Y, Lq, D)`` over ``k, v (X, Y, Lk, D|Dv)``
    (broadcast over ``X, Y``), scores ``cap·tanh((scale·q·k + mask) / cap)`` (no cap: ``None``).

    ``k`` may be laid out transposed (``k.transpose(-1, -2).contiguous().transpose(-1, -2)``, as the exact
    engine passes it): the score GEMM then reads it without packing a transpose per block.
    ``mask``: a bool visibility mask or an additive one in q's dtype (-inf hides a key), broadcast to
    ``(X, Y, Lq, Lk)``; ``causal``: key ``j`` visible to query ``i`` when ``j <= i + offset``. Rows that
    see no key give ``(0, -inf)``. ``idx (X, Y, m)`` int64 (broadcast): the call reads only rows ``idx`` of
    ``k``/``v`` (a selection, in place: no gathered copy; ``mask`` then covers those ``m`` keys, not
    ``causal``). ``skip (a, b)``: rows ``[a, b)`` of ``k``/``v`` are not keys (the keys are rows ``[0, a)`` then
    ``[b, Lk)``, read in place: a sinks + window step in one call; not with ``idx`` or ``causal``). Only after
    :func:`applies`.
    """
    X, Y = (max(a, b) for a, b in zip(q.shape[:2], k.shape[:2]))
    at, gap = (skip[0], skip[1] - skip[0]) if skip is not None and skip[1] > skip[0] else (0, 0)
    if idx is not None or not (k.stride(-2) == 1 and k.stride(-1) >= k.shape[-2] > 1):  # else K^T: a plain GEMM
        k = kernel_rows(k)
    q, k, v = (t.expand(X, Y, *t.shape[2:]) for t in (kernel_rows(q), k, kernel_rows(v)))
    if idx is not None:
        idx = kernel_rows(idx.long()).expand(X, Y, idx.shape[-1])
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, -float("inf"))
        keys = k.shape[2] - gap if idx is None else idx.shape[2]
        mask = kernel_rows(mask.to(q.dtype)).expand(X, Y, q.shape[2], keys)
    out, lse = torch.ops.attnzoo.capped_attention(q, k, v, mask, float(scale), float(cap or 0.0), causal, int(offset),
                                                  idx, at, gap)
    return out, lse


def quest_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *,
                    scale: float, page: int, unit: int, lo: int, hi: int, n: int, take: int,
                    valid: torch.Tensor | None = None,
                    fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quest's decode step in one call: ``(out (B, Hkv, G, Dv), lse (B, Hkv, G), units (B, Hkv, take))``.

    Per (batch, KV head) with query rows ``q (B, Hkv, G, D)``: each page of ``page`` slots in the middle
    ``[lo, hi)`` scores ``max_g Σ_d max(q_gd·kmin_d, q_gd·kmax_d)`` (``kmin``/``kmax (B, Hkv, pages, D)``
    float32 or bfloat16, an upper bound of ``q·k`` over the page), a unit of ``unit`` slots the max of its
    pages; the ``take`` best units (ties: the lower one) are read with the sinks ``[0, lo)`` and the local
    slots ``[hi, n)`` in place from ``k``/``v (B, Hkv, >= n, ·)`` (``valid (B, Hkv, >= n)`` bool hides
    padding). ``fixed (B, Hkv, take)``: read these units instead of selecting. ``units``: the middle units read,
    sorted. Only after :func:`applies`.
    """
    q, k, v = kernel_rows(q), kernel_rows(k), kernel_rows(v)
    fixed = None if fixed is None else fixed.long().contiguous()
    return tuple(torch.ops.attnzoo.quest_attention(q, k, v, kmin, kmax, valid, fixed, float(scale), page, unit, lo, hi,
                                                   n, take))


def tokenselect_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kmin: torch.Tensor | None,
                          kmax: torch.Tensor | None, *,
                          scale: float, page: int, lo: int, hi: int, n: int, candidates: int, take: int,
                          valid: torch.Tensor | None = None, fixed: torch.Tensor | None = None,
                          reuse: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokenselect's decode step in one call: ``(out (B, Hkv, G, Dv), lse (B, Hkv, G), slots (B, take))``.

    ``candidates=0`` (``page=0``, no bounds): every middle token gets the soft vote ``Σ_{heads}
    softmax_tokens(scale · q·k)`` (the exact vote, K read in place by the score GEMM). Else page-first,
    operands as :func:`quest_attention`'s. Per batch row: every page overlapping the middle ``[lo, hi)`` gets the
    soft vote ``Σ_{heads} softmax_pages(scale · bound)``; the tokens (within ``[lo, hi)``) of the ``candidates``
    pages of highest vote get exact scores ``q·k`` and the soft vote ``Σ_{heads} softmax_tokens(scale · q·k)``
    (padding hidden); the ``take`` best (ties: the lower slot) are read by every head with the sinks ``[0, lo)``
    and the local slots ``[hi, n)``, the selected tokens' scores taken from the vote. ``fixed (B, take)``: read
    these slots instead. Needs ``take <= (candidates - 2) · page`` (the two end pages may be cut).

    ``reuse = (ref, slots, counts, threshold)``: the policy's selection state, updated in place (no Python work
    per step): ``ref (B, Hkv, G, D)`` the queries of the last selection, ``slots (B, take)`` int64 the selection,
    ``counts (2,)`` int64 steps that selected / reused. The step reads ``slots`` again while a selection exists and
    every batch row's mean cosine between ``q`` and ``ref`` over its heads is ``>= threshold``; else it selects into
    ``slots`` and copies ``q`` into ``ref``. The returned slots are then ``slots`` itself. Only after :func:`applies`.
    """
    q, k, v = kernel_rows(q), kernel_rows(k), kernel_rows(v)
    fixed = None if fixed is None else fixed.long().contiguous()
    ref, slots, counts, threshold = reuse if reuse is not None else (None, None, None, 0.0)
    out, lse, chosen = torch.ops.attnzoo.tokenselect_attention(q, k, v, kmin, kmax, valid, fixed, ref, slots, counts,
                                                               float(scale), page, lo, hi, n, candidates, take,
                                                               float(threshold))
    return out, lse, chosen if reuse is None else slots
