"""Aaren: softmax attention as a many-to-many RNN over the B1 monoid (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import Problem
from ..core.masks import visible_mask
from ..core.partial import Partial, merge
from ..registry import Family, Method, Supports, param, register
from .hybrid import masked_softmax_partial


@register
@dataclass(frozen=True)
class Aaren(Method):
    """Causal softmax attention as an RNN: the state ``(out, lse)`` (equivalently
    (max, sum, weighted sum)) of every query is updated key chunk by key chunk
    with the associative B1 combine, so ``out_i`` is the softmax attention of
    ``q_i`` over keys ``0..p(i)`` — equal to causal exact, lse included.

    With one query shared by all positions (Aaren's learned query) the same
    monoid gives every prefix output by one parallel scan in O(N log N) and
    decodes with O(1) state: :func:`attnzoo.core.linear.softmax_prefix_scan`,
    used by :class:`attnzoo.layers.AarenLayer`.
    """

    name: ClassVar[str] = "aaren"
    exact_for: ClassVar[str] = "always (causal)"
    family: ClassVar[Family] = Family.LINEAR_RNN
    complexity: ClassVar[str] = "O(Nq·Nk·D), O(Nq·(chunk + D)) state"
    supports: ClassVar[Supports] = Supports(causal=True, noncausal=False,
                                            decode=True, grad=True, lse=True, sinks=True, varlen=True)
    papers: ClassVar[tuple[str, ...]] = ("Attention as an RNN (Aaren)",)

    chunk: int = param(64, min=1, clamp=True, help="keys consumed per RNN step")

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse):
        k, v = k.repeat_interleave(prob.groups, dim=1), v.repeat_interleave(prob.groups, dim=1)
        state = Partial(q.new_zeros(prob.batch, prob.heads_q, prob.len_q, prob.dim_v),
                        q.new_full((prob.batch, prob.heads_q, prob.len_q), -torch.inf))
        offset = prob.len_k - prob.len_q
        for j0 in range(0, max(0, min(prob.len_k, prob.len_q + offset)), self.chunk):
            j1 = min(prob.len_k, j0 + self.chunk)
            visible = visible_mask(prob.len_q, j1 - j0, causal=True, q_offset=offset, k_offset=j0,
                                   key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, j0:j1],
                                   device=q.device)
            scores = torch.matmul(q, k[:, :, j0:j1].transpose(-1, -2)) * prob.scale
            state = merge(state, Partial(*masked_softmax_partial(scores, visible.expand_as(scores), v[:, :, j0:j1])))
        return state.out.to(q.dtype), state.lse
