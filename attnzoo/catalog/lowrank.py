"""Training-free low-rank attention: Linformer-style pooling and Nyströmformer (docs/methods.md).

Both replace the N keys by a few segment means, so they are non-causal only
(a segment mixes future tokens). Their learned forms live in ``attnzoo.layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import Problem
from ..core.gqa import fold_groups
from ..core.partial import masked_softmax
from ..registry import Family, Method, Supports, param, register

_NONCAUSAL = Supports(causal=False, noncausal=True, decode=False, grad=True, lse=False)


def segment_means(x: torch.Tensor, segments: int, key_padding_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``x (B, H, N, D)`` over ``min(segments, N)`` contiguous segments of (near-)equal length.

    Returns ``(means (B, H, s, D), counts (B, s))``; with a padding mask only kept
    tokens are averaged and a segment with no kept token has count 0 (and mean 0).
    """
    B, _, n, _ = x.shape
    s = min(segments, n)
    segment_of = (torch.arange(n, device=x.device) * s) // n  # token -> segment, sizes differ by <= 1
    weight = x.new_ones(B, n) if key_padding_mask is None else key_padding_mask.to(x.dtype)
    sums = x.new_zeros(B, x.shape[1], s, x.shape[3]).index_add(2, segment_of, x * weight[:, None, :, None])
    counts = x.new_zeros(B, s).index_add(1, segment_of, weight)
    return sums / counts.clamp(min=1)[:, None, :, None], counts


def biased_softmax(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores + bias`` over the last dim; ``bias = -inf`` hides a column; all-hidden rows give 0."""
    return masked_softmax(scores + bias)[0]


@register
@dataclass(frozen=True)
class Linformer(Method):
    """Linformer's training-free form: K and V pooled along the sequence into ``k``
    segment means, then exact softmax over the pooled keys (non-causal).

    Each pooled key is weighted by its segment size (``+ log count`` on its score),
    so unequal segments are not biased; with ``k >= Nk`` every segment is one key
    and the result equals exact attention. Padded keys are left out of the means.
    The learned form (projections E, F) is :class:`attnzoo.layers.LinformerLayer`.
    """

    name: ClassVar[str] = "linformer"
    exact_for: ClassVar[str] = "k >= Nk (every segment is one key)"
    family: ClassVar[Family] = Family.LOW_RANK
    complexity: ClassVar[str] = "O(N·k·D)"
    supports: ClassVar[Supports] = _NONCAUSAL
    papers: ClassVar[tuple[str, ...]] = ("Linformer", "Greenformers")

    k: int = param(256, min=1, help="number of pooled keys (segments)")

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse):
        k_bar, counts = segment_means(k, self.k, key_padding_mask)
        v_bar, _ = segment_means(v, self.k, key_padding_mask)
        log_count = torch.log(counts)[:, None, None, :]  # -inf for empty segments
        p = biased_softmax(torch.matmul(fold_groups(q, prob.heads_kv), k_bar.transpose(-1, -2)) * prob.scale, log_count)
        return torch.matmul(p, v_bar).view(prob.batch, prob.heads_q, prob.len_q, prob.dim_v), None


def newton_schulz_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Pseudo-inverse of ``a (..., m, n)`` by Nyströmformer's third-order Newton–Schulz iteration."""
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    col = a.abs().sum(dim=-2).amax(dim=-1)[..., None, None]
    row = a.abs().sum(dim=-1).amax(dim=-1)[..., None, None]
    z = a.transpose(-1, -2) / (col * row)
    for _ in range(iters):
        az = torch.matmul(a, z)
        z = 0.25 * torch.matmul(z, 13 * eye - torch.matmul(az, 15 * eye - torch.matmul(az, 7 * eye - az)))
    return z


@register
@dataclass(frozen=True)
class Nystrom(Method):
    """Nyströmformer: segment-mean landmarks Q̃, K̃ and
    ``out = softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V`` (non-causal),
    the pseudo-inverse by ``pinv_iters`` Newton–Schulz steps. With
    ``landmarks >= N`` the three matrices are the exact attention matrix A and the
    result is ``A·pinv(A)·A·V = A·V`` up to the iteration's convergence.
    The paper's depthwise-convolution residual on V is learned and left out.
    """

    name: ClassVar[str] = "nystrom"
    exact_for: ClassVar[str] = "landmarks >= N, up to the pseudo-inverse iteration's convergence"
    family: ClassVar[Family] = Family.LOW_RANK
    complexity: ClassVar[str] = "O(N·m·D + m³)"
    supports: ClassVar[Supports] = _NONCAUSAL
    papers: ClassVar[tuple[str, ...]] = ("Nyströmformer",)

    landmarks: int = param(64, min=1, help="number of segment-mean landmarks m")
    pinv_iters: int = param(6, min=1, max=100, help="Newton–Schulz iterations of the pseudo-inverse")

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse):
        hkv, scale = prob.heads_kv, prob.scale
        q_land, _ = segment_means(q, self.landmarks)
        k_land, counts = segment_means(k, self.landmarks, key_padding_mask)
        land_bias = torch.where(counts > 0, 0.0, -math.inf).to(q.dtype)[:, None, None, :]
        key_bias = q.new_zeros(1, 1, 1, 1) if key_padding_mask is None else \
            torch.where(key_padding_mask, 0.0, -math.inf).to(q.dtype)[:, None, None, :]
        kernel_1 = biased_softmax(torch.matmul(fold_groups(q, hkv), k_land.transpose(-1, -2)) * scale, land_bias)
        kernel_2 = biased_softmax(torch.matmul(fold_groups(q_land, hkv), k_land.transpose(-1, -2)) * scale, land_bias)
        kernel_3 = biased_softmax(torch.matmul(fold_groups(q_land, hkv), k.transpose(-1, -2)) * scale, key_bias)
        m_q = q_land.shape[2]
        # the pseudo-inverse and C·V are per query head: unfold the groups
        k2 = kernel_2.view(prob.batch, prob.heads_q, m_q, -1)
        cv = torch.matmul(kernel_3, v).view(prob.batch, prob.heads_q, m_q, prob.dim_v)
        inner = torch.matmul(newton_schulz_pinv(k2, self.pinv_iters), cv)  # (B, Hq, m_k, Dv)
        k1 = kernel_1.view(prob.batch, prob.heads_q, prob.len_q, -1)
        return torch.matmul(k1, inner), None
