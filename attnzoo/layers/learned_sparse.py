"""Learned sparse attention layers: a small learned predictor decides which keys each query reads,
then exact softmax runs on those keys on the block-sparse engine.

- :class:`SparsifinerLayer` (Wei et al., 2023): a low-rank connectivity predictor ``C = (X W_q^r)(X W_k^r)ᵀ``;
  the top ``top_k`` keys per query (a token layout).
- :class:`SEALayer` (Lee et al., 2024): a compressed estimate of the attention map -- kernel (elu+1)
  scores against keys mean-pooled into ``bins``, refined by a small learned decoder (a per-head
  convolution along the bins) -- picks the ``top_k`` key bins per query block (+ the diagonal).
- :class:`SeerGateLayer` (SeerAttention, Gao et al., 2024): a learned block gate
  ``softmax(W_q avgpool(Q) · W_k [maxpool ∥ minpool ∥ avgpool](K))`` keeps blocks with gate > ``threshold``
  (or the ``top_k`` best, always the diagonal) -- the learned replacement of ``block_topk``'s
  training-free pooled scores.

Each predictor is trained by distillation from the layer's own dense attention (the teacher,
no gradient): after a training-mode forward, ``distill_loss`` holds KL(teacher ‖ predictor) at the
predictor's resolution (tokens, bins, or block max-pooling for the gate). :func:`attnzoo.train.fit`
adds every such loss (``attnzoo.train.aux_loss``). The selection itself is discrete: the task
loss reaches the attention through the kept keys, the predictor only through its distillation loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..catalog.sparse.dynamic import block_pool
from ..core.blocksparse import BlockLayout, TokenLayout, attend
from ..core.features import elu_plus_one
from ..errors import AttnZooError
from .heads import stable_topk_mask
from .linear import _check_width, _merge_heads, _split_heads


def _causal(n: int, m: int, device) -> torch.Tensor:
    """``(n, m)`` True where query i may see key j (bottom-right aligned)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n)


def teacher_probs(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """The dense attention map ``(B, H, N, N)`` the predictors distil from (no gradient)."""
    with torch.no_grad():
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if causal:
            s = s.masked_fill(~_causal(q.shape[2], k.shape[2], q.device), float("-inf"))
        return s.softmax(-1)


def _kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target ‖ softmax(logits)); -inf logits where the target is 0 add nothing."""
    logp = logits.log_softmax(-1)
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - logp), torch.zeros_like(target))
    return terms.sum(-1).mean()


def _block_layout(keep: torch.Tensor, block: int, n: int) -> BlockLayout:
    return BlockLayout.from_block_mask(keep, block_q=block, block_k=block, len_q=n, len_k=n)


class _Learned(nn.Module):
    """Shared projections; subclasses implement ``layout(x, q, k)`` and ``distill(x, q, k, teacher)``."""

    def __init__(self, name: str, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        _check_width(name, d_model, n_heads)
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.distill_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.training:
            self.distill_loss = self.distill(x, q.detach(), k.detach(), teacher_probs(q, k, self.causal))
        out, _ = attend(q, k, v, self.layout(x, q, k), scale=q.shape[-1] ** -0.5, causal=self.causal)
        return self.o_proj(_merge_heads(out))

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.o_proj.in_features  # every key and value is kept for the predictor to choose


class SparsifinerLayer(_Learned):
    """Top-``top_k`` keys per query from a rank-``rank`` predictor (``top_k >= N``: dense attention)."""

    def __init__(self, d_model: int, n_heads: int = 2, rank: int = 8, top_k: int = 16, causal: bool = True):
        super().__init__("SparsifinerLayer", d_model, n_heads, causal)
        if rank < 1 or top_k < 1:
            raise AttnZooError(f"SparsifinerLayer: expected rank >= 1 and top_k >= 1, got rank={rank}, top_k={top_k}")
        self.rank, self.top_k = rank, top_k
        self.pred = nn.Linear(d_model, 2 * n_heads * rank, bias=False)

    def connectivity(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted scores ``C (B, H, N, N)`` (-inf where causality forbids)."""
        qr, kr = (_split_heads(t, self.n_heads) for t in self.pred(x).chunk(2, dim=-1))
        c = qr @ kr.transpose(-1, -2) * self.rank**-0.5
        return c.masked_fill(~_causal(c.shape[2], c.shape[3], c.device), float("-inf")) if self.causal else c

    def layout(self, x, q, k) -> TokenLayout:
        c = self.connectivity(x).detach()
        vals, idx = c.topk(min(self.top_k, c.shape[-1]), dim=-1)
        return TokenLayout(torch.where(torch.isfinite(vals), idx, -1), group=1, len_q=c.shape[2], len_k=c.shape[3])

    def distill(self, x, q, k, teacher):
        return _kl(teacher, self.connectivity(x))


class SEALayer(_Learned):
    """Estimated-mask attention: ``bins`` key bins, ``top_k`` bins per query block (``top_k >= bins``: dense)."""

    def __init__(self, d_model: int, n_heads: int = 2, bins: int = 16, top_k: int = 4, causal: bool = True):
        super().__init__("SEALayer", d_model, n_heads, causal)
        if bins < 1 or top_k < 1:
            raise AttnZooError(f"SEALayer: expected bins >= 1 and top_k >= 1, got bins={bins}, top_k={top_k}")
        self.bins, self.top_k = bins, top_k
        self.decoder = nn.Conv1d(n_heads, n_heads, 3, padding=1, groups=n_heads)

    def estimate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Refined log-estimate ``(B, H, N, nb)`` of the attention mass per key bin, and the bin width."""
        B, H, N, _ = q.shape
        width = -(-N // self.bins)
        kbar = block_pool(k, width)  # (B, H, nb, D)
        est = (elu_plus_one(q) @ elu_plus_one(kbar).transpose(-1, -2)).clamp_min(1e-6).log()
        nb = est.shape[-1]
        refined = est + self.decoder(est.permute(0, 2, 1, 3).reshape(B * N, H, nb)).view(B, N, H, nb).transpose(1, 2)
        if self.causal:
            bins_ok = torch.arange(nb, device=q.device) * width <= torch.arange(N, device=q.device)[:, None]
            refined = refined.masked_fill(~bins_ok, float("-inf"))
        return refined, width

    def layout(self, x, q, k) -> BlockLayout:
        est, width = self.estimate(q.detach(), k.detach())
        B, H, N, nb = est.shape
        pooled = block_pool(est.softmax(-1), width)  # mean estimated mass per (query block, key bin)
        if self.causal:
            pooled = pooled.masked_fill(~_causal(pooled.shape[2], nb, x.device), float("-inf"))
        keep = stable_topk_mask(pooled, min(self.top_k, nb)) & torch.isfinite(pooled)
        keep |= torch.eye(pooled.shape[2], nb, dtype=torch.bool, device=x.device)
        return _block_layout(keep, width, N)

    def distill(self, x, q, k, teacher):
        est, width = self.estimate(q, k)
        binned = F.pad(teacher, (0, est.shape[-1] * width - teacher.shape[-1]))
        return _kl(binned.view(*teacher.shape[:3], -1, width).sum(-1), est)


class SeerGateLayer(_Learned):
    """Attention through SeerAttention's learned block gate: blocks of ``block`` tokens whose gate exceeds
    ``threshold`` (``0``: every visible block, exact), or the ``top_k`` best; always the diagonal."""

    def __init__(self, d_model: int, n_heads: int = 2, block: int = 16, d_gate: int = 16,
                 threshold: float | None = None, top_k: int | None = 2, causal: bool = True):
        super().__init__("SeerGateLayer", d_model, n_heads, causal)
        if (threshold is None) == (top_k is None):
            raise AttnZooError(f"SeerGateLayer: expected exactly one of threshold and top_k, got threshold={threshold}, "
                               f"top_k={top_k}")
        self.block, self.threshold, self.top_k = block, threshold, top_k
        dh = d_model // n_heads
        self.gate_q = nn.Linear(dh, d_gate, bias=False)
        self.gate_k = nn.Linear(3 * dh, d_gate, bias=False)

    def gate_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Block-level gate logits ``(B, H, nb, nb)``, -inf above the block diagonal when causal."""
        qg = self.gate_q(block_pool(q, self.block))
        kg = self.gate_k(torch.cat([block_pool(k, self.block, how=h) for h in ("max", "min", "mean")], -1))
        g = qg @ kg.transpose(-1, -2) * qg.shape[-1] ** -0.5
        return g.masked_fill(~_causal(g.shape[2], g.shape[3], g.device), float("-inf")) if self.causal else g

    def layout(self, x, q, k) -> BlockLayout:
        g = self.gate_logits(q.detach(), k.detach()).softmax(-1)
        visible = g > 0 if self.causal else torch.ones_like(g, dtype=torch.bool)
        keep = (g > self.threshold) if self.threshold is not None else stable_topk_mask(g, min(self.top_k, g.shape[-1]))
        keep = (keep & visible) | torch.eye(g.shape[2], g.shape[3], dtype=torch.bool, device=g.device)
        return _block_layout(keep, self.block, q.shape[2])

    def target(self, teacher: torch.Tensor) -> torch.Tensor:
        """Row-normalised block max-pooling of the dense map: the gate's distillation target."""
        B, H, N, _ = teacher.shape
        nb = -(-N // self.block)
        pad = nb * self.block - N
        t = F.pad(teacher, (0, pad, 0, pad)).view(B, H, nb, self.block, nb, self.block).amax((3, 5))
        return t / t.sum(-1, keepdim=True)

    def distill(self, x, q, k, teacher):
        return _kl(self.target(teacher), self.gate_logits(q, k))

    def block_recall(self, x: torch.Tensor) -> float:
        """Share of the target's block mass inside the kept blocks (1 = every block the map needs)."""
        q, k, _ = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        target = self.target(teacher_probs(q, k, self.causal))
        return float((target * self.layout(x, q, k).block_mask()).sum(-1).mean())
