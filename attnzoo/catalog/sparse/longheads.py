"""LongHeads (Lu et al., 2024): every head reads its own few chunks of the context, training-free.

The context is cut into chunks of ``block`` tokens, each summarised by its mean key.
Per head and query chunk, the head reads ``chunks`` chunks: always the first one and
its own (local) one, plus the best others by ``mean(Q_chunk)·mean(K_chunk)``. So a head
attends over at most ``chunks·block`` keys (the pretrained window it stays within) while
different heads cover different parts of a longer context. The original also re-numbers
the chosen chunks' positions into ``[0, chunks·block)`` for RoPE models; attnzoo
receives q and k after their positions are applied, so that part belongs to the model
(``attnzoo.hf``), not to this method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.layout import BlockLayout
from ...registry import Family, param, register
from ._base import LayoutMethod
from .dynamic import BlockTopK, diagonal_blocks, topk_mask


@register
@dataclass(frozen=True)
class LongHeads(LayoutMethod):
    """Per head and query chunk: the first chunk, the local chunk, and the best of the rest by mean key
    (``chunks`` in all); ``chunks·block >= N`` equals exact attention."""

    name: ClassVar[str] = "longheads"
    family: ClassVar[Family] = Family.DYNAMIC_SPARSE
    complexity: ClassVar[str] = "O(N·(N/block)·D + N·chunks·block·D)"
    papers: ClassVar[tuple[str, ...]] = ("LongHeads: Multi-Head Attention is Secretly a Long Context Processor",)
    exact_for: ClassVar[str] = "chunks·block >= N (every chunk read)"
    score: ClassVar[str] = "mean"  # the chunk summary: mean key (BlockTopK's pooled "mean" score)

    block: int = param(256, min=1, clamp=True, help="chunk length l (above N: one chunk, exact attention)")
    chunks: int = param(16, min=2, help="chunks each head reads per query chunk, the first and the local one "
                                        "included (chunks·block is the window)")

    block_scores = BlockTopK.block_scores

    def build_layouts(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        s = self.block_scores(q, k, prob, causal, key_padding_mask, score_mod)
        first = torch.finfo(s.dtype).max  # finite: topk_mask keeps finite scores only
        s[..., 0] = s[..., 0].masked_fill(s[..., 0] > -math.inf, first)  # the first chunk, when visible
        local = diagonal_blocks(prob, self.block, self.block, q.device)
        keep = topk_mask(s.masked_fill(local, -math.inf), self.chunks - 1) | local
        return [BlockLayout.from_block_mask(keep, block_q=self.block, block_k=self.block, len_q=prob.len_q,
                                            len_k=prob.len_k, causal=causal)]
