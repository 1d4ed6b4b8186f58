"""Landmark Attention (Mohtashami & Jaggi, 2023): blocks of tokens gated by a landmark key.

Keys are split into blocks of ``block`` tokens, each with a landmark key. A
query attends to its own block's earlier tokens with plain softmax and to each
*past* block through the landmark (the *grouped softmax*): the landmark's
score competes with the current block's scores in one softmax, and the weight
it wins, ``g_b``, is shared among the block's tokens in proportion to their
softmax within the block::

    a_ij = g_b · exp(s_ij) / Σ_{j'∈b} exp(s_ij')      (j in a past block b)

That is a merge (log-sum-exp combination, :func:`attnzoo.core.partial.merge`) of
one :class:`Partial` per past block -- its in-block softmax output with the
landmark score as its log-weight -- and the current block's exact partial. At
inference a query keeps only its ``top_k`` past blocks by landmark score
(retrieval); with every block kept it equals the training-time output.

Here the landmark key of a block is a learned projection of the block's mean
input (the paper inserts a landmark *token* after each block, whose key the
earlier layers compute; a per-block projection keeps the layer a drop-in
``(B, N, d) -> (B, N, d)`` mixer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.partial import Partial, merge
from ..errors import AttnZooError
from .linear import _check_width, _merge_heads, _split_heads


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_landmark: torch.Tensor, block: int,
                      top_k: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal grouped-softmax attention; ``k_landmark (B, H, N // block, D)`` scores the complete blocks.

    ``top_k``: past blocks each query reads (by landmark score); None = all.
    """
    B, H, N, D = q.shape
    if k_landmark.shape != (B, H, N // block, D):
        raise AttnZooError(f"k_landmark: expected shape {(B, H, N // block, D)} (one key per complete block of "
                           f"{block}), got {tuple(k_landmark.shape)}")
    scale = D**-0.5 if scale is None else scale
    nb, full = -(-N // block), N // block
    pad = nb * block - N
    qc, kc, vc = (torch.nn.functional.pad(t, (0, 0, 0, pad)).view(B, H, nb, block, -1) for t in (q, k, v))
    s = qc @ kc.transpose(-1, -2) * scale  # (B, H, nb, l, l): each query against its own block
    s = s.masked_fill(~torch.ones(block, block, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    current = Partial((s.softmax(-1) @ vc).flatten(2, 3)[:, :, :N], s.logsumexp(-1).flatten(2)[:, :, :N])
    if full == 0 or N <= block:
        return current.out
    s_lm = q @ k_landmark.transpose(-1, -2) * scale  # (B, H, N, full)
    own = torch.arange(N, device=q.device) // block
    s_lm = s_lm.masked_fill(torch.arange(full, device=q.device) >= own[:, None], float("-inf"))  # past blocks only
    kb, vb = kc[:, :, :full], vc[:, :, :full]
    if top_k is None or top_k >= full:
        inner = torch.einsum("bhnd,bhkld->bhnkl", q, kb) * scale
        outs = torch.einsum("bhnkl,bhkld->bhnkd", inner.softmax(-1), vb)
        weights = s_lm
    else:
        weights, idx = s_lm.topk(top_k, dim=-1)  # (B, H, N, K); -inf weights (too few past blocks) drop out
        b_i = torch.arange(B, device=q.device)[:, None, None, None]
        h_i = torch.arange(H, device=q.device)[None, :, None, None]
        inner = torch.einsum("bhnd,bhnkld->bhnkl", q, kb[b_i, h_i, idx]) * scale
        outs = torch.einsum("bhnkl,bhnkld->bhnkd", inner.softmax(-1), vb[b_i, h_i, idx])
    return merge(current, *(Partial(outs[..., j, :], weights[..., j]) for j in range(weights.shape[-1]))).out


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
