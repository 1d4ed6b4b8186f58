"""SageAttention-style quantised attention (docs/methods.md).

Q and K are quantised per block of ``block`` tokens to signed ``bits``-bit
integers (scale = max|x| / (2^(bits-1) - 1)) after smoothing, and the scores
are the integer product times the product of the scales; the online softmax
and P·V run in fp32 on the tiled engine.

On CPU the integer GEMM is carried out as an fp32 matmul of the integer-valued
tensors, which is exact (|q·k| ≤ 127²·D < 2^24 for D ≤ 1040), so the numbers
are those of the INT8/INT4 kernel; the speed is not (that needs a GPU kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..checks import Problem
from ..core.exact import tiled_attention
from ..errors import AttnZooError
from ..registry import Family, Method, Supports, param, register


def quantize_blocks(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Symmetric per-block fake quantisation along the token dim of ``(B, H, N, D)``: returns ``q_int · scale``."""
    B, H, N, D = x.shape
    pad = (-N) % block
    xb = F.pad(x, (0, 0, 0, pad)).reshape(B, H, (N + pad) // block, block * D)
    qmax = 2 ** (bits - 1) - 1
    scale = xb.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) / qmax
    deq = torch.round(xb / scale).clamp_(-qmax, qmax) * scale
    return deq.view(B, H, N + pad, D)[:, :, :N]


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each token replaced by the mean of its block of ``block`` tokens (the last block may be shorter)."""
    N = x.shape[2]
    pad = (-N) % block
    sums = F.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, block)).sum(dim=3)  # (B, H, blocks, D)
    counts = torch.full((sums.shape[2], 1), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return (sums / counts).repeat_interleave(block, dim=2)[:, :, :N]


@register
@dataclass(frozen=True)
class Sage(Method):
    """INT8/INT4 per-block quantised Q·Kᵀ after smoothing K (SageAttention v1) and optionally Q per block (v2).

    Smoothing K subtracts the token mean of K; every score of a row shifts by the
    same constant, so the softmax is unchanged and the returned lse is corrected
    back exactly. ``smooth_q`` subtracts each query block's mean before
    quantising and adds it back in full precision (v2's bias term, here applied
    to the quantised K). ``bits=None`` turns quantisation off (smoothing alone
    equals exact attention). P·V runs in fp32.
    """

    name: ClassVar[str] = "sage"
    exact_for: ClassVar[str] = "bits = None (no quantisation)"
    family: ClassVar[Family] = Family.QUANTISED
    complexity: ClassVar[str] = "O(N²·D) in INT8/INT4"
    supports: ClassVar[Supports] = Supports(causal=True, noncausal=True,
                                            decode=True, grad=False, lse=True, sinks=True, varlen=True)
    papers: ClassVar[tuple[str, ...]] = ("SageAttention", "SageAttention2")

    bits: int | None = param(8, choices=(8, 4, None), help="integer width of Q and K (None: no quantisation)")
    smooth_k: bool = param(True, help="subtract the token mean of K before quantising (exact for softmax)")
    smooth_q: bool = param(False, help="subtract each query block's mean before quantising, add it back exactly")
    block: int = param(128, min=1, clamp=True, help="tokens per quantisation scale, for Q and K")

    def validate(self) -> None:
        if self.bits is None and self.smooth_q:
            raise AttnZooError("sage: parameter 'smooth_q' expected False when bits=None (nothing is quantised)")

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse):
        k_mean = None
        if self.smooth_k:
            keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None].to(k.dtype)
            k_mean = (k.mean(dim=2, keepdim=True) if keep is None else
                      (k * keep).sum(dim=2, keepdim=True) / keep.sum(dim=2, keepdim=True).clamp_min(1))
            k = k - k_mean
        q_used = q
        if self.bits is not None:
            k = quantize_blocks(k, self.bits, self.block)
            if self.smooth_q:
                q_mean = block_means(q, self.block)
                q_used = quantize_blocks(q - q_mean, self.bits, self.block) + q_mean
            else:
                q_used = quantize_blocks(q, self.bits, self.block)
        out, lse = tiled_attention(q_used, k, v, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask)
        if k_mean is not None and return_lse:
            group_mean = k_mean.repeat_interleave(prob.groups, dim=1)  # (B, Hq, 1, D): one vector per head
            lse = lse + prob.scale * (q * group_mean).sum(dim=-1)
        return out, lse
