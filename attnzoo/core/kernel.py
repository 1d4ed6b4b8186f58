"""The one entry to PyTorch's fused CPU attention kernel.

``aten._scaled_dot_product_flash_attention_for_cpu`` is the kernel behind
SDPA on CPU; its op (unlike the public function) returns the log-sum-exp.
It reads every row of q, k and v as ``D`` packed elements: a last-dim stride
other than 1 (a permuted or sliced tensor) is read as if it were 1, giving
garbage or NaN. It honours every other stride (expanded heads, strided
windows over a longer buffer). :func:`kernel_rows` makes that layout, copying
only tensors whose last dim is strided; every caller of the kernel goes
through :func:`flash_cpu`, which applies it.
"""

from __future__ import annotations

import math

import torch

#: dtypes the fused CPU kernel accepts
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kernel_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels read an operand: a last-dim stride of 1, and rows (dim -2) that do not overlap (a
    broadcast head folded into the rows, e.g. ``fold_groups`` of an expanded query, gives row stride 0, which
    the C++ kernels refuse); a copy only when it is not."""
    overlap = t.dim() >= 2 and t.shape[-2] > 1 and t.stride(-2) < t.shape[-1]
    return t if t.stride(-1) == 1 and not overlap else t.contiguous()


def kernel_padding(key_padding_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A ``key_padding_mask`` (``(B | 1, Nk)``, False hides a key) as the C++ kernels read it: ``(batch, Nk)``
    bool, contiguous; None stays None."""
    if key_padding_mask is None:
        return None
    return key_padding_mask.to(torch.bool).expand(batch, -1).contiguous()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility mask as the kernel's additive mask: 0 where visible, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention of ``q (X, Y, Lq, D)`` over ``k, v (X, Y, Lk, D)``: ``(out, lse)``.

    ``mask`` is a bool visibility mask broadcast to ``(X, Y, Lq, Lk)``, or that mask already
    made additive (:func:`additive_mask`, for callers that keep it across calls; any float
    bias, -inf hiding a key, float32 for every q dtype but float64; any strides with a last
    one of 1, overlapping ones included: :mod:`attnzoo.core.exact` passes strided views);
    ``causal`` is the kernel's top-left causal mask. Rows with no visible key
    come back as ``(0, 0)`` (callers that can produce them set their lse to
    -inf, see :func:`attnzoo.core.fused.fix_empty_rows`).
    """
    additive = additive_mask(mask, q.dtype) if mask is not None and mask.dtype == torch.bool else mask
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        kernel_rows(q), kernel_rows(k), kernel_rows(v), 0.0, causal, attn_mask=additive, scale=scale)
