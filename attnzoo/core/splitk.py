"""Split-K attention (flash-decoding): the keys cut into ranges attended independently, merged by lse.

The one split-K function: the ``flash_decode`` method and the KV cache's reads
(:func:`attnzoo.cache.read.flash_read`) both call :func:`split_k`. Each range
runs on the tiled engine (the fused CPU kernel where it applies), so a range
is one fused call; on a GPU the ranges are what fills the device, on CPU every
extra range is only overhead, which is why callers bound how many they ask for.
"""

from __future__ import annotations

import torch

from .exact import tiled_attention
from .partial import Partial, merge


def split_k(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool, splits: int,
            key_padding_mask: torch.Tensor | None = None, score_mod=None) -> Partial:
    """Attention of ``q (B, Hq, Nq, D)`` over ``k``/``v (B, Hkv, Nk, ·)`` as ``splits`` key ranges merged by lse.

    Causal is aligned bottom-right (query ``i`` at position ``i + Nk - Nq``);
    ``key_padding_mask (B, Nk)`` hides keys. Equals exact attention for any
    ``splits >= 1``; rows that see no key give ``(0, -inf)``.
    """
    n_k = k.shape[2]
    splits = max(1, min(splits, n_k))
    bounds = [round(n_k * s / splits) for s in range(splits + 1)]
    q_offset = n_k - q.shape[2]
    parts = []
    for j0, j1 in zip(bounds[:-1], bounds[1:]):
        pad = None if key_padding_mask is None else key_padding_mask[:, j0:j1]
        parts.append(Partial(*tiled_attention(q, k[:, :, j0:j1], v[:, :, j0:j1], scale=scale, causal=causal,
                                              key_padding_mask=pad, q_offset=q_offset, k_offset=j0,
                                              k_tile=max(1, j1 - j0), score_mod=score_mod)))
    return merge(*parts)
