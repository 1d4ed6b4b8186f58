"""Combiner (Ren et al., 2021), the *fixed* causal variant: full attention support at sub-quadratic cost.

Keys a query sees split into a *direct* set -- its own block of ``block`` tokens (causal) -- and
*regions* -- the ``region``-token chunks entirely before its block. A region r is one abstraction
key and value, ``k̂_r = Σ_j q_r(j) k_j`` and ``v̂_r = Σ_j q_r(j) v_j``, where ``q_r(j)`` is a
query-independent softmax of the region's keys against a learned per-head region query; so
``p(j | i) = p(region | i) · q_r(j)`` for past tokens: every visible key keeps a non-zero share and
each row sums to 1. ``region = 1`` makes every past token its own region: exact causal attention.
The direct part runs on the block-sparse engine (a diagonal layout) and the two parts merge
exactly by log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.blocksparse import BlockLayout, attend
from ..core.partial import Partial, merge
from ..errors import AttnZooError
from .linear import _check_width, _merge_heads, _split_heads


def combiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_query: torch.Tensor, block: int,
                       region: int, scale: float | None = None) -> torch.Tensor:
    """Causal fixed-Combiner attention; ``region_query (H, D)``; ``block`` must be a multiple of ``region``."""
    B, H, N, D = q.shape
    if block % region:
        raise AttnZooError(f"combiner: block expected a multiple of region={region}, got {block}")
    scale = D**-0.5 if scale is None else scale
    nq = -(-N // block)
    diag = torch.arange(nq, device=q.device).view(1, 1, nq, 1)
    direct = Partial(*attend(q, k, v, BlockLayout.from_indices(diag, block_q=block, block_k=block, len_q=N, len_k=N),
                             scale=scale, causal=True))
    nr = N // region
    if nr == 0 or N <= block:
        return direct.out
    kr = k[:, :, :nr * region].reshape(B, H, nr, region, D)
    vr = v[:, :, :nr * region].reshape(B, H, nr, region, -1)
    inner = torch.einsum("hd,bhrld->bhrl", region_query, kr).softmax(-1)  # q_r(j)
    k_hat = torch.einsum("bhrl,bhrld->bhrd", inner, kr)
    v_hat = torch.einsum("bhrl,bhrld->bhrd", inner, vr)
    s = q @ k_hat.transpose(-1, -2) * scale  # (B, H, N, nr)
    block_start = torch.arange(N, device=q.device) // block * block
    visible = (torch.arange(1, nr + 1, device=q.device) * region) <= block_start[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    lse = s.logsumexp(-1)
    regions = Partial(torch.nan_to_num((s - lse.unsqueeze(-1)).exp()) @ v_hat, lse)
    return merge(direct, regions).out


class CombinerLayer(nn.Module):
    """Causal multi-head fixed Combiner (see the module docstring); ``block`` defaults to √max_len."""

    def __init__(self, d_model: int, n_heads: int = 2, block: int | None = None, region: int | None = None,
                 max_len: int = 256):
        super().__init__()
        _check_width("CombinerLayer", d_model, n_heads)
        self.block = block or max(1, int(max_len**0.5))
        self.region = region or self.block
        if self.block % self.region:
            raise AttnZooError(f"CombinerLayer: block expected a multiple of region={self.region}, got {self.block}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.region_query = nn.Parameter(torch.zeros(n_heads, d_model // n_heads))  # starts as mean pooling
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.o_proj(_merge_heads(combiner_attention(q, k, v, self.region_query, self.block, self.region)))

    def state_size(self, seq_len: int) -> int:
        d = self.o_proj.in_features
        return 2 * d * (min(self.block, seq_len) + seq_len // self.region)  # own block + one summary per region
