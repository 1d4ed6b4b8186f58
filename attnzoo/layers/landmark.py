"""Landmark Attention (Mohtashami & Jaggi, 2023): blocks of tokens gated by a landmark key.

Keys are split into blocks of ``block`` tokens, each with a landmark key. A
query attends to its own block's earlier tokens with plain softmax and to each
*past* block through the landmark (the *grouped softmax*): the landmark's
score competes with the current block's scores in one softmax, and the weight
it wins, ``g_b``, is shared among the block's tokens in proportion to their
softmax within the block::

    a_ij = g_b · exp(s_ij) / Σ_{j'∈b} exp(s_ij')      (j in a past block b)

That is a merge (log-sum-exp combination, as in :func:`attnzoo.core.partial.merge`)
of one partial per past block -- its in-block softmax output with the landmark
score as its log-weight -- and the current block's exact partial, computed here
as a single softmax over per-key scores shifted by their block's log-weight (see
:func:`grouped_attention`). At inference a query keeps only its ``top_k`` past
blocks by landmark score (retrieval); with every block kept it equals the
training-time output.

Here the landmark key of a block is a learned projection of the block's mean
input (the paper inserts a landmark *token* after each block, whose key the
earlier layers compute; a per-block projection keeps the layer a drop-in
``(B, N, d) -> (B, N, d)`` mixer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnZooError
from .linear import _check_width, _merge_heads, _split_heads


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_landmark: torch.Tensor, block: int,
                      top_k: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal grouped-softmax attention; ``k_landmark (B, H, N // block, D)`` scores the complete blocks.

    ``top_k``: past blocks each query reads (by landmark score); None = all.

    The merge of the per-block partials is one softmax over every key: a key ``j`` in a past block ``b``
    scores ``s_ij - lse_b(i) + s_lm_ib`` (its in-block log-softmax plus the landmark's log-weight), a key
    of the query's own block scores ``s_ij``, any other key ``-inf``. Its row normaliser is the merged
    ``lse`` and each past block's keys share ``exp(s_lm_ib)`` of it, so the result is the merge exactly,
    computed with batched matrix products (no per-block loop; the cost of dense causal attention).
    """
    B, H, N, D = q.shape
    if k_landmark.shape != (B, H, N // block, D):
        raise AttnZooError(f"k_landmark: expected shape {(B, H, N // block, D)} (one key per complete block of "
                           f"{block}), got {tuple(k_landmark.shape)}")
    scale = D**-0.5 if scale is None else scale
    full = N // block
    pos = torch.arange(N, device=q.device)
    own = pos // block
    s = q @ k.transpose(-1, -2) * scale  # (B, H, N, N)
    in_own = (own[:, None] == own[None, :]) & (pos[None, :] <= pos[:, None])  # causal, the query's own block
    if full == 0:
        return s.masked_fill(~in_own, float("-inf")).softmax(-1) @ v
    s_lm = q @ k_landmark.transpose(-1, -2) * scale  # (B, H, N, full)
    keep = torch.arange(full, device=q.device) < own[:, None]  # (N, full): past complete blocks
    if top_k is not None and top_k < full:
        # the top_k past blocks by landmark score; a query with fewer past blocks keeps them all
        chosen = torch.zeros_like(s_lm, dtype=torch.bool).scatter_(
            -1, s_lm.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices, True)
        keep = keep & chosen
    past = s[..., :full * block].unflatten(-1, (full, block))  # (B, H, N, full, block)
    log_w = (s_lm - past.logsumexp(-1)).masked_fill(~keep, float("-inf"))  # per block: landmark - in-block lse
    grouped = torch.nn.functional.pad((past + log_w[..., None]).flatten(-2), (0, N - full * block),
                                      value=float("-inf"))  # the incomplete last block is never a past block
    return torch.where(in_own, s, grouped).softmax(-1) @ v


class LandmarkLayer(nn.Module):
    """Causal multi-head Landmark Attention: ``forward(x)`` trains with the grouped softmax over every
    past block; ``top_k`` (a constructor default, or per call) retrieves only the best past blocks."""

    def __init__(self, d_model: int, n_heads: int = 2, block: int = 16, top_k: int | None = None):
        super().__init__()
        _check_width("LandmarkLayer", d_model, n_heads)
        if block < 1 or (top_k is not None and top_k < 1):
            raise AttnZooError(f"LandmarkLayer: expected block >= 1 and top_k >= 1 or None, got block={block}, "
                               f"top_k={top_k}")
        self.n_heads, self.block, self.top_k = n_heads, block, top_k
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.landmark = nn.Linear(d_model, d_model)  # block mean -> landmark key
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        B, N, d = x.shape
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        full = N // self.block
        pooled = x[:, :full * self.block].reshape(B, full, self.block, d).mean(2)
        k_lm = _split_heads(self.landmark(pooled), self.n_heads)
        out = grouped_attention(q, k, v, k_lm, self.block, self.top_k if top_k is None else top_k)
        return self.o_proj(_merge_heads(out))

    def state_size(self, seq_len: int) -> int:
        d = self.o_proj.in_features
        return 2 * seq_len * d + (seq_len // self.block) * d  # every key and value + one landmark per block
