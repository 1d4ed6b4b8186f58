"""Informer's ProbSparse attention (docs/methods.md): only the most "active" queries attend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.blocksparse import BlockLayout, attend
from ...registry import Family, Method, Supports, param, register


@register
@dataclass(frozen=True)
class ProbSparse(Method):
    """Informer ProbSparse: each query is scored on ``factor·⌈ln Nk⌉`` keys sampled uniformly among those it
    may see (``seed``) by ``M = max_j s_ij − Σ_j s_ij / Nk``; the top ``factor·⌈ln Nq⌉`` queries attend
    exactly to all their visible keys, the others output ``mean(V)`` over the visible keys (non-causal) or the
    running mean up to their position (causal). ``factor·⌈ln Nq⌉ >= Nq`` equals exact."""

    name: ClassVar[str] = "probsparse"
    exact_for: ClassVar[str] = "factor·⌈ln Nq⌉ >= Nq (every query is active)"
    family: ClassVar[Family] = Family.DYNAMIC_SPARSE
    complexity: ClassVar[str] = "O(N·log N·D)"
    supports: ClassVar[Supports] = Supports(causal=True, noncausal=True, decode=True, grad=True, lse=False, varlen=True)
    no_score_mod: ClassVar[str] = ("its lazy queries output the mean of V (uniform attention), which no score "
                                   "modification reaches, and it picks active queries on unmodified scores")
    papers: ClassVar[tuple[str, ...]] = ("Informer: Beyond Efficient Transformer for Long Sequence Time-Series "
                                         "Forecasting",)

    factor: int = param(5, min=1, help="c in u = c·ln N active queries and c·ln N sampled keys")
    seed: int = param(0, help="seed of the sampled keys")

    def active_count(self, len_q: int) -> int:
        return min(len_q, self.factor * math.ceil(math.log(max(len_q, 2))))

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
        B, Hq, n_q, D = q.shape
        n_k, dev = prob.len_k, q.device
        off = n_k - n_q
        pos = torch.arange(n_q, device=dev) + off  # (Nq,)
        keep = torch.ones(1, n_k, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask
        u = self.active_count(n_q)
        with torch.no_grad():
            n_sample = min(n_k, self.factor * math.ceil(math.log(max(n_k, 2))))
            gen = torch.Generator().manual_seed(self.seed)
            draw = torch.rand(n_q, n_sample, generator=gen).to(dev)
            span = (pos + 1).clamp(0, n_k) if causal else torch.full_like(pos, n_k)
            idx = (draw * span.view(-1, 1)).long().clamp(max=n_k - 1)  # (Nq, S) keys each query may see
            sparsity = torch.cat([self.sparsity(q[:, :, i0:i0 + 4096], k, idx[i0:i0 + 4096], prob)
                                  for i0 in range(0, n_q, 4096)], dim=2)
            if causal:
                sparsity = sparsity.masked_fill(pos < 0, -math.inf)
            active = sparsity.topk(u, dim=-1).indices  # (B, Hq, u)
        q_act = torch.gather(q, 2, active.unsqueeze(-1).expand(-1, -1, -1, D))
        nkb = -(-n_k // 128)
        full = BlockLayout.from_indices(torch.arange(nkb, device=dev).view(1, 1, 1, -1), block_q=u, block_k=128,
                                        len_q=u, len_k=n_k)
        out_act, _ = attend(q_act, k, v, full, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                            q_positions=active + off)
        lazy = self.lazy_output(v, keep, prob, causal)  # (B, Hkv, Nq|1, Dv)
        lazy = lazy.repeat_interleave(prob.groups, dim=1).expand(B, Hq, n_q, -1)
        out = lazy.scatter(2, active.unsqueeze(-1).expand(-1, -1, -1, out_act.shape[-1]), out_act)
        return out, None

    @staticmethod
    def sparsity(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, prob) -> torch.Tensor:
        """``M = max - sum / Nk`` of each query's scores on its sampled keys ``idx (n, S)``: ``(B, Hq, n)``."""
        B, Hq, n, D = q.shape
        k_s = k[:, :, idx]  # (B, Hkv, n, S, D)
        qg = q.view(B, prob.heads_kv, prob.groups, n, 1, D)
        s = (qg * k_s.unsqueeze(2)).sum(-1).view(B, Hq, n, -1) * prob.scale
        return s.amax(-1) - s.sum(-1) / prob.len_k

    @staticmethod
    def lazy_output(v: torch.Tensor, keep: torch.Tensor, prob, causal: bool) -> torch.Tensor:
        """Mean of V over the visible keys: ``(B, Hkv, 1, Dv)``, or the running mean ``(B, Hkv, Nq, Dv)`` if causal."""
        w = keep.to(v.dtype)[:, None, :, None]  # (B|1, 1, Nk, 1)
        if not causal:
            return (v * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)
        csum = (v * w).cumsum(2)
        ccount = w.cumsum(2)
        pos = torch.arange(prob.len_q, device=v.device) + prob.len_k - prob.len_q
        at = pos.clamp(0, prob.len_k - 1)
        mean = csum[:, :, at] / ccount[:, :, at].clamp(min=1)
        return mean * (pos >= 0).to(v.dtype).view(1, 1, -1, 1)
