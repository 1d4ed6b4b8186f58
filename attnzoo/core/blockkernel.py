"""Block layouts on a C++ CPU kernel that reads the layout itself (``csrc/blocksparse_attention.cpp``).

PyTorch's fused kernel needs each query block's keys as one tensor, so the executor's fused path
(:func:`attnzoo.core.blocksparse._forward_fused`) gathers the selected key blocks (a copy of every block
read), runs the causal diagonal as a separate call of small blocks and merges the two by lse, and the
kernel tiles a query block's rows (a KV head's query group folded in: 192 rows for 3 heads of 64) in
64-row GEMMs. This kernel instead walks each query block's list of key blocks: adjacent blocks are one
run of keys read in place, the causal diagonal is the run's last rows' limit, and the whole group's
rows (up to 256) are one GEMM operand. Work item: (batch row, the query heads sharing a layout row,
query block).

Short runs (scattered blocks of a few keys) are packed into chunks of up to 512 keys, a copy of their rows.
It serves block layouts without ``mask_mod``/partial blocks, and token layouts without ``mask_mod`` as layouts
of one-key blocks (vertical_slash's columns), without custom positions (key padding hides keys in the row
pass; a distance-bias score_mod, one ``(Hq|1, distances)`` vector, is added to the scores and a soft cap
applied in the same pass), in float32/float64, where the extension builds (:mod:`attnzoo.core.cpp`).
"""

from __future__ import annotations

import math

import torch

from . import cpp
from .gqa import fold_groups, unfold_groups
from .kernel import kernel_padding, kernel_rows
from .layout import BlockLayout, TokenLayout
from .scoremod import DistanceBias, distance_rows

_SOURCE = "blocksparse_attention.cpp"
#: dtypes the extension runs (others take the other fused paths)
DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    """Whether the extension is built (building it now, once per process, if needed)."""
    return cpp.available(_SOURCE)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> bool:
    """Whether :func:`attend_blocks` can run this call: CPU, float32/64 alike, a layout without element
    masks, and the extension built."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and getattr(layout, "partial", None) is None and layout.mask_mod is None and available())


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | TokenLayout, *,
                  scale: float, causal: bool, key_padding_mask: torch.Tensor | None = None,
                  bias: DistanceBias | None = None, cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))`` of ``q`` over the key blocks ``layout`` lists (causal:
    bottom-right aligned; ``key_padding_mask (B, Nk)``: False hides a key; ``bias``: a distance-bias
    score_mod at the default positions, then ``cap``: a soft cap; forward only); rows that see no key give
    ``(0, -inf)``. A :class:`TokenLayout` is a block layout of one-key blocks (``block_q`` = its group): the
    kernel merges adjacent tokens into runs and packs short runs into long chunks; a shared token row (one for
    every group: vertical columns) is copied once per head and read from that copy in place, its ``skip``
    blocks hidden. Only after :func:`applies`."""
    index, block_q, block_k, heads, skip, skip_k = kernel_layout(layout, q.shape[1], k.shape[1])
    q, k, v = (kernel_rows(t) for t in (q, k, v))
    pad = kernel_padding(key_padding_mask, q.shape[0])
    Nq, Nk = q.shape[2], k.shape[2]
    available()  # loads the op (built once per process)
    return torch.ops.attnzoo_blocksparse.blocksparse_attention(
        q, k, v, index, pad, block_q, block_k, heads, float(scale), causal, Nk - Nq,
        kernel_bias(bias, Nq, Nk, q.dtype, q.device), 1 - Nk, float(cap or 0.0), skip, skip_k)


def kernel_layout(layout: BlockLayout | TokenLayout, heads_q: int, heads_kv: int):
    """A layout as the block kernels (this forward, :mod:`attnzoo.core.blockbackward`) read it: ``(index,
    block_q, block_k, heads, skip, skip_block_k)``: the contiguous key-block lists (a token layout's tokens as
    one-key blocks, ``block_q`` its group), the query heads per work item (the heads sharing one layout row) and
    a shared token row's skipped blocks (None, 1 without)."""
    skip = None
    if isinstance(layout, TokenLayout):  # shared tokens: one row for every group, packed once by the kernel
        index, block_q, block_k, skip = layout.kv_tokens, layout.group, 1, layout.skip
    else:
        index, block_q, block_k = layout.kv_blocks, layout.block_q, layout.block_k
    groups = heads_q // heads_kv
    per_query = index.shape[1] == heads_q or (skip is not None and skip.kv_blocks.shape[1] == heads_q)
    heads = 1 if (per_query and groups > 1) else groups  # query heads per work item (one layout row)
    return (index.contiguous(), block_q, block_k, heads, None if skip is None else skip.kv_blocks.contiguous(),
            1 if skip is None else skip.block_k)


def kernel_bias(bias: DistanceBias | None, len_q: int, len_k: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """The block kernels' distance-bias operand: ``(Hq | 1, Nq + Nk - 1)`` over the distances ``1 - Nk ..
    Nq - 1`` (key - query position; column ``d - (1 - Nk)``), or None."""
    return None if bias is None else distance_rows(bias, 1 - len_k, len_q + len_k - 1, dtype, device, causal=False)


def block_select(scores: torch.Tensor, heads: int, count: int, *, by_max: bool, sink: bool,
                 span: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """block_topk's selection in one C++ pass, or None where the extension does not apply (not CPU float32/64):
    ``(B, heads, nq, S)`` key-block indices, ascending, -1 padded, from pooled ``scores (B, Hq, nq, nkb)`` (-inf:
    a block the query block does not see) for ``heads`` selecting heads, each ranking the blocks for its
    ``Hq / heads`` query heads by their best score (``by_max``; one head: its own score) or else by the mean of
    their softmaxes over the visible blocks: the ``count`` best visible blocks (ties: the lower index), block
    0 if visible (``sink``) and the blocks ``span = (lo, hi)`` (``(nq,)`` each, inclusive) of each query block."""
    if scores.device.type != "cpu" or scores.dtype not in DTYPES or not available():
        return None
    lo, hi = (None, None) if span is None else (t.to(torch.int64).contiguous() for t in span)
    return torch.ops.attnzoo_blocksparse.block_select(scores.contiguous(), heads, count, by_max, sink, lo, hi)


#: score elements per step of :func:`block_lse`'s eager path (one slab of rows at a time)
_LSE_SLAB = 1 << 22


def block_lse(q: torch.Tensor, k: torch.Tensor, block_k: int, *, scale: float, limit: torch.Tensor | None = None,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, Hq, R, ceil(Nk / block_k))``: for each row of ``q (B, Hq, R, D)`` and each key block of ``block_k``
    keys of ``k (B, Hkv, Nk, D)`` (GQA: query head h reads KV head h // (Hq / Hkv)), the log-sum-exp of
    ``scale · q·k_j`` over the block's keys j the row sees: ``j <= limit[r]`` (``limit (R,)``; None: every key),
    not hidden by ``key_padding_mask (B, Nk)`` (False hides); -inf where it sees none. block_topk's
    ``score="lse"`` estimate (each query block's mean row against every key it may see). On the extension
    where it applies (CPU, float32/64; one GEMM and one pass per chunk of keys), else eagerly in slabs of rows.
    float32 operands are rounded to bfloat16 first on both paths (the estimate's GEMM then runs on MKL's bf16
    kernel, AMX tiles where the CPU has them: 3x float32's rate; the scores move by ~2^-8 of |q|·|k|)."""
    pad = kernel_padding(key_padding_mask, q.shape[0])
    lim = None if limit is None else limit.to(device=q.device, dtype=torch.int64).contiguous()
    if q.dtype == torch.float32:
        q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    if q.device.type == "cpu" and q.dtype in DTYPES + (torch.bfloat16,) and k.dtype == q.dtype and available():
        q, k = kernel_rows(q), kernel_rows(k)
        return torch.ops.attnzoo_blocksparse.block_lse(q, k, pad, lim, block_k, float(scale))
    q, k = (t.float() if t.dtype == torch.bfloat16 else t for t in (q, k))
    B, Hq, R, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nkb = -(-Nk // block_k)
    hide = torch.zeros(1, 1, 1, Nk, dtype=torch.bool, device=q.device) if pad is None else ~pad[:, None, None, :]
    slab = max(1, _LSE_SLAB // max(1, B * Hq * Nk))
    out = []
    for r0 in range(0, R, slab):
        r1 = min(R, r0 + slab)
        s = unfold_groups(torch.matmul(fold_groups(q[:, :, r0:r1], Hkv), k.transpose(-1, -2)) * scale, Hq)
        h = hide if lim is None else hide | (torch.arange(Nk, device=q.device) > lim[r0:r1, None])
        s = torch.nn.functional.pad(s.masked_fill(h, -math.inf), (0, nkb * block_k - Nk), value=-math.inf)
        out.append(s.view(B, Hq, r1 - r0, nkb, block_k).logsumexp(-1))
    return torch.cat(out, 2) if out else q.new_empty(B, Hq, 0, nkb)
