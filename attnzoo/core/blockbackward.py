"""The backward pass of block-list layouts on a C++ kernel (``csrc/block_backward.cpp``).

Training through a layout whose forward runs on :mod:`attnzoo.core.blockkernel` (block_topk, vertical_slash,
any block list or shared token row without element masks), or a block layout with partial blocks (a
``mask_mod``: bigbird, neighborhood2d) on the gathered fused path, recomputes each query block's
probabilities from the saved lse over its own key-block list, as FlashAttention-2's backward does: adjacent
whole key blocks are one run of keys read in place, short runs are packed into chunks of up to 512 keys, the
causal diagonal is each row's limit, a partial block is read in place under its element mask (the
``mask_mod`` evaluated once per partial block, kept on a reused layout), key padding and a distance bias /
soft cap are applied in the same pass as the forward applied them. A bias reading tensors that need a gradient
(a learned relative table, learned ALiBi slopes) gets it as on the band kernel: the kernel sums the biased
scores' gradient per distance (each work item in its own buffer, added up in item order) and
:meth:`~attnzoo.core.scoremod.ModHook.pull_back` turns the sums into the tensors' gradients. The slot loop of
:mod:`attnzoo.core.blocksparse` stays for everything else (user functions not lowered to a bias, token layouts
with a ``mask_mod``, other devices, ``ATTNZOO_CPP=0``) and gives the same gradients.

dK/dV: with at least 8 (batch row, KV head) pairs each pair is one work item owning its head's dK/dV; with
fewer, dQ is one pass over the query blocks and dK/dV a key-major pass over the transposed block lists (one
item per pair and tile of 512 keys). The items depend on the shapes only and run on single-threaded BLAS, so
the gradients are the same bits at any thread count.
"""

from __future__ import annotations

import torch

from . import cpp
from .blockkernel import DTYPES, kernel_bias, kernel_layout
from .fused import fused_mod, kernel_mod_applies
from .kernel import kernel_padding, kernel_rows
from .layout import BlockLayout, Layout, TokenLayout
from .masks import call_mask_mod
from .scoremod import ModHook

_SOURCE = "block_backward.cpp"
#: element-mask entries of a layout's partial blocks beyond which the slot loop serves (memory)
_MASK_LIMIT = 1 << 26


def available() -> bool:
    """Whether the extension is built (building it now, once per process, if needed)."""
    return cpp.available(_SOURCE)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, mod: ModHook | None = None) -> bool:
    """Whether :func:`attend_blocks_backward` can run: CPU float32/64 tensors of one dtype, the extension built,
    a layout without element masks or a block layout whose ``mask_mod`` is flagged per block (``partial``, at
    most ``_MASK_LIMIT`` mask entries), and no score_mod or one it recomputes (a distance bias and/or a soft cap
    after it; tensors needing a gradient only in the bias: :func:`~attnzoo.core.fused.kernel_mod_applies`)."""
    if layout.mask_mod is not None and (
            not isinstance(layout, BlockLayout) or layout.partial is None
            or int(layout.partial.sum()) * layout.block_q * layout.block_k > _MASK_LIMIT):
        return False
    return (q.device.type == "cpu" and q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and kernel_mod_applies(mod) and available())


def _partial_masks(layout: BlockLayout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(part, masks)`` of a layout with partial blocks: ``part`` (the shape of ``kv_blocks``) the index of each
    listed block's element mask (-1: whole), ``masks (M, block_q, block_k)`` bool, the ``mask_mod`` at each
    partial block's (query row, key) pairs (indices clamped into range, as the executor's ``element_mask``; the
    head index is the layout's); ``(None, None)`` without. Kept on a reused layout."""
    if layout.partial is None:
        return None, None
    key = ("block backward masks",)
    if layout.mask_cache is not None and key in layout.mask_cache:
        return layout.mask_cache[key]
    blocks, bq, bk = layout.kv_blocks, layout.block_q, layout.block_k
    flags = layout.partial & (blocks >= 0)
    b, h, qb, s = flags.nonzero().unbind(1)
    part = torch.full(blocks.shape, -1, dtype=torch.long, device=blocks.device)
    part[flags] = torch.arange(b.numel(), device=blocks.device)
    dev = blocks.device
    q_idx = (qb.view(-1, 1, 1) * bq + torch.arange(bq, device=dev).view(1, -1, 1)).clamp(max=layout.len_q - 1)
    kv_idx = (blocks[b, h, qb, s].view(-1, 1, 1) * bk + torch.arange(bk, device=dev)).clamp(max=layout.len_k - 1)
    with torch.no_grad():
        masks = call_mask_mod(layout.mask_mod, b.view(-1, 1, 1), h.view(-1, 1, 1), q_idx, kv_idx)
    got = part.contiguous(), masks.expand(b.numel(), bq, bk).contiguous()
    if layout.mask_cache is not None:
        layout.mask_cache[key] = got
    return got


def attend_blocks_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor | None,
                           layout: BlockLayout | TokenLayout, *, scale: float, causal: bool,
                           key_padding_mask: torch.Tensor | None = None, mod: ModHook | None = None,
                           grads: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the attention ``(out, lse)`` of ``layout`` (as
    :func:`~attnzoo.core.blockkernel.attend_blocks` and the executor compute it) for these arguments, given
    ``d_out`` and ``d_lse`` (None: no lse gradient); only after :func:`applies`. The ``mod``'s tensors that need
    a gradient get it added into ``grads`` (pulled back from the kernel's per-distance sums)."""
    if not (q.numel() and k.numel() and v.numel()):  # nothing to read (an empty view's strides are arbitrary)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bias, cap = fused_mod(mod)
    bias_grad = mod is not None and bool(mod.captured)
    index, block_q, block_k, heads, skip, skip_k = kernel_layout(layout, q.shape[1], k.shape[1])
    part, masks = _partial_masks(layout) if isinstance(layout, BlockLayout) else (None, None)
    q, k, v, out, d_out = (kernel_rows(t) for t in (q, k, v, out, d_out))
    lse, d_lse = (None if t is None else t.to(q.dtype).contiguous() for t in (lse, d_lse))
    pad = kernel_padding(key_padding_mask, q.shape[0])
    Nq, Nk = q.shape[2], k.shape[2]
    available()  # loads the op (built once per process)
    dq, dk, dv, d_bias = torch.ops.attnzoo_block_backward.block_backward(
        q, k, v, out, d_out, lse, d_lse, index, pad, block_q, block_k, heads, float(scale), causal, Nk - Nq,
        kernel_bias(bias, Nq, Nk, q.dtype, q.device), 1 - Nk, float(cap or 0.0), skip, skip_k, part, masks,
        bias_grad)
    if bias_grad:  # d_bias's columns are the distances 1 - Nk .. Nq - 1 (kernel_bias)
        mod.pull_back(bias, d_bias, 1 - Nk, grads)
    return dq, dk, dv
