"""Static sparse patterns (docs/methods.md): each is a ``mask_mod`` plus the key blocks it can reach.

Positions follow A.1: query ``i`` sits at ``p = i + Nk - Nq``; every mask
below is stated on ``p`` and the key index ``j``; causality is applied on top
by the engine when ``causal=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ...checks import Problem
from ...core.layout import BlockLayout, TokenLayout, compact, range_blocks, sink_window_layouts
from ...core.exact import tiled_attention
from ...core.masks import check_mask_mod
from ...errors import AttnZooError
from ...registry import Family, param, register
from ._base import (LayoutMethod, StaticMethod, as_layout_rows, band_candidates, block_positions,
                    prefix_candidates, static_block_layout)

_BLOCK_HELP = "query/key block size of the executor (speed only; the result does not depend on it)"


def _offset(prob: Problem) -> int:
    return prob.len_k - prob.len_q


@register
@dataclass(frozen=True)
class SlidingWindow(StaticMethod):
    """Local attention: causal, key j is visible iff ``p - window < j <= p``; non-causal iff ``|p - j| < window``."""

    name: ClassVar[str] = "sliding_window"
    exact_for: ClassVar[str] = "window >= N"
    family: ClassVar[Family] = Family.LOCAL
    complexity: ClassVar[str] = "O(N·w·D), O(N·w) mem"
    papers: ClassVar[tuple[str, ...]] = ("Longformer", "Mistral 7B")

    window: int = param(512, min=1, help="keys each query sees on each side (itself included)")
    block: int = param(128, min=1, clamp=True, help=_BLOCK_HELP)

    def static_layouts(self, prob, causal, device):
        off, w = _offset(prob), self.window
        cand = band_candidates(prob, self.block, w - 1, w - 1, causal, device)
        return [static_block_layout(as_layout_rows(cand), lambda b, h, qi, kj: (qi + off - kj).abs() < w,
                                    prob, self.block, causal)]

    def step_spans(self, len_k):
        return ((max(0, len_k - self.window), len_k),)


@register
@dataclass(frozen=True)
class DilatedWindow(StaticMethod):
    """Dilated local attention: ``d = p - j`` (``|p - j|`` non-causal) with ``d % dilation == 0`` and
    ``d < window · dilation``."""

    name: ClassVar[str] = "dilated_window"
    exact_for: ClassVar[str] = "dilation = 1 and window >= N"
    family: ClassVar[Family] = Family.LOCAL
    complexity: ClassVar[str] = "O(N·w·dilation·D)"
    papers: ClassVar[tuple[str, ...]] = ("Longformer", "LongNet", "DiNAT")

    window: int = param(256, min=1, help="keys each query sees on each side")
    dilation: int = param(2, min=1, help="distance between the keys a query sees")
    block: int = param(128, min=1, clamp=True, help=_BLOCK_HELP)

    def static_layouts(self, prob, causal, device):
        off, w, dil = _offset(prob), self.window, self.dilation
        span = w * dil - 1
        cand = band_candidates(prob, self.block, span, span, causal, device)

        def mask_mod(b, h, qi, kj):
            d = (qi + off - kj).abs()
            return (d % dil == 0) & (d < w * dil)

        return [static_block_layout(as_layout_rows(cand), mask_mod, prob, self.block, causal)]


@register
@dataclass(frozen=True)
class Streaming(StaticMethod):
    """StreamingLLM / A-shape: the sliding window's keys plus the first ``sinks`` keys (∩ causal)."""

    name: ClassVar[str] = "streaming"
    exact_for: ClassVar[str] = "window >= N, or sinks + window >= N"
    family: ClassVar[Family] = Family.LOCAL
    complexity: ClassVar[str] = "O(N·(w+sinks)·D)"
    papers: ClassVar[tuple[str, ...]] = ("StreamingLLM (Efficient Streaming Language Models with Attention Sinks)",
                                         "MInference 1.0 (A-shape)")

    sinks: int = param(4, min=0, help="initial keys every query sees")
    window: int = param(512, min=1, help="recent keys each query sees (itself included)")
    block: int = param(128, min=1, clamp=True, help=_BLOCK_HELP)

    def static_layouts(self, prob, causal, device):
        return sink_window_layouts(prob.len_q, prob.len_k, sinks=self.sinks, window=self.window, block=self.block,
                                   causal=causal, device=device)

    def step_spans(self, len_k):
        start = max(0, len_k - self.window)
        if self.sinks >= start:  # the sinks touch the window: one range
            return ((0, len_k),)
        return ((0, self.sinks), (start, len_k)) if self.sinks else ((start, len_k),)


@register
@dataclass(frozen=True)
class Strided(StaticMethod):
    """Sparse Transformer's strided pattern: a local band of width ``local`` ∪ the keys with
    ``j % stride == stride - 1`` (∩ causal).

    Near the diagonal both parts share the block layout; the far stride
    columns are a token gather, merged by lse.
    """

    name: ClassVar[str] = "strided"
    exact_for: ClassVar[str] = "local >= N, or stride = 1"
    family: ClassVar[Family] = Family.STATIC_SPARSE
    complexity: ClassVar[str] = "O(N·(local + N/stride)·D)"
    papers: ClassVar[tuple[str, ...]] = ("Generating Long Sequences with Sparse Transformers", "S2-Attention")

    stride: int = param(64, min=1, help="every stride-th key (j % stride == stride-1) is a column all queries see")
    local: int = param(64, min=1, help="width of the local band")
    block: int = param(128, min=1, clamp=True, help=_BLOCK_HELP)

    def static_layouts(self, prob, causal, device):
        off, loc, st, bs = _offset(prob), self.local, self.stride, self.block
        band = band_candidates(prob, bs, loc - 1, loc - 1, causal, device)
        near = static_block_layout(as_layout_rows(band), lambda b, h, qi, kj: ((qi + off - kj).abs() < loc)
                                   | (kj % st == st - 1), prob, bs, causal)
        if st > prob.len_k:  # no key is a stride column: the band layout is the whole pattern
            return [near]
        first, last = block_positions(prob, bs, device)
        lo_blk = torch.where(band[:, 0] >= 0, band[:, 0], torch.full_like(first, prob.len_k))
        hi_blk = band.max(dim=-1).values
        cols = torch.arange(st - 1, prob.len_k, st, device=device).expand(band.shape[0], -1)
        far = (cols < (lo_blk * bs).unsqueeze(-1)) | (cols >= ((hi_blk + 1) * bs).unsqueeze(-1))
        if causal:
            far = far & (cols <= last.unsqueeze(-1))
        tokens = compact(far, cols).view(1, 1, band.shape[0], -1)
        return [near, TokenLayout(tokens, bs, prob.len_q, prob.len_k)]


@register
@dataclass(frozen=True)
class BigBird(StaticMethod):
    """BigBird: band ``|p - j| < window`` ∪ the first ``n_global`` keys ∪ queries at ``p < n_global`` see
    every key ∪ ``n_random`` random key blocks per query block (drawn with ``seed`` among the blocks the
    query block may see), all ∩ causal. Blocks have ``block`` tokens."""

    name: ClassVar[str] = "bigbird"
    exact_for: ClassVar[str] = "window >= N, or n_global >= N"
    family: ClassVar[Family] = Family.STATIC_SPARSE
    complexity: ClassVar[str] = "O(N·(w + g + r·block)·D)"
    papers: ClassVar[tuple[str, ...]] = ("Big Bird: Transformers for Longer Sequences",)

    window: int = param(256, min=1, help="half-width of the local band")
    n_global: int = param(64, min=0, help="global tokens (seen by all, see all)")
    n_random: int = param(2, min=0, help="random key blocks per query block")
    block: int = param(64, min=1, clamp=True, help="block size of the random blocks and of the executor")
    seed: int = param(0, help="seed of the random blocks")

    def random_blocks(self, prob: Problem, causal: bool, device=None) -> torch.Tensor:
        """``(nq, nk_blocks)`` bool: the random key blocks of each query block."""
        nq, nkb = -(-prob.len_q // self.block), -(-prob.len_k // self.block)
        gen = torch.Generator().manual_seed(self.seed)
        score = torch.rand(nq, nkb, generator=gen)
        if causal:
            _, last = block_positions(prob, self.block, None)
            score = torch.where(torch.arange(nkb) * self.block <= last.view(-1, 1), score, torch.full_like(score, -1))
        table = torch.zeros(nq, nkb, dtype=torch.bool)
        if self.n_random:
            top = score.topk(min(self.n_random, nkb), dim=-1)
            table.scatter_(-1, top.indices, top.values >= 0)
        return table.to(device)

    def static_layouts(self, prob, causal, device):
        off, w, g, bs = _offset(prob), self.window, self.n_global, self.block
        table = self.random_blocks(prob, causal, device)
        band = band_candidates(prob, bs, w - 1, w - 1, causal, device)
        glob = prefix_candidates(band.shape[0], g, bs, prob.len_k, device)
        rand = torch.where(table, torch.arange(table.shape[1], device=device), torch.full_like(table, -1,
                                                                                                dtype=torch.long))

        def mask_mod(b, h, qi, kj):
            return ((qi + off - kj).abs() < w) | (kj < g) | table[qi // bs, kj // bs]

        return [static_block_layout(as_layout_rows(band, glob, rand), mask_mod, prob, bs, causal)]

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None):
        out, lse = super().forward(q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask,
                                   return_lse=return_lse, score_mod=score_mod)
        rows = max(0, min(prob.len_q, self.n_global - _offset(prob)))  # queries at p < n_global see everything
        if rows == 0:
            return out, lse
        g_out, g_lse = tiled_attention(q[:, :, :rows], k, v, scale=prob.scale, causal=causal,
                                       key_padding_mask=key_padding_mask, q_offset=_offset(prob), score_mod=score_mod)
        return torch.cat([g_out.to(out.dtype), out[:, :, rows:]], 2), torch.cat([g_lse.to(lse.dtype),
                                                                                 lse[:, :, rows:]], 2)


@register
@dataclass(frozen=True)
class ShiftedSparse(StaticMethod):
    """LongLoRA S²-Attn: attention within groups of ``group`` positions; heads ``h >= Hq // 2`` use groups
    shifted by ``group // 2`` (the wrapped half-groups at the ends stay separate): visible iff
    ``(p + s_h) // group == (j + s_h) // group`` with ``s_h = group // 2`` on shifted heads, else 0."""

    name: ClassVar[str] = "shifted_sparse"
    exact_for: ClassVar[str] = "group >= 2N (no group, shifted or not, splits the sequence)"
    family: ClassVar[Family] = Family.STATIC_SPARSE
    complexity: ClassVar[str] = "O(N·group·D)"
    papers: ClassVar[tuple[str, ...]] = ("LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models",)

    group: int = param(2048, min=1, help="tokens per attention group")
    block: int = param(128, min=1, clamp=True, help=_BLOCK_HELP)

    def static_layouts(self, prob, causal, device):
        off, grp, bs, heads = _offset(prob), self.group, self.block, prob.heads_q
        shifts = (torch.arange(heads, device=device) >= heads // 2).long() * (grp // 2)  # (H,)
        first, last = block_positions(prob, bs, device)
        lo = ((first.unsqueeze(0) + shifts.view(-1, 1)) // grp) * grp - shifts.view(-1, 1)
        hi = (last.unsqueeze(0) if causal else
              ((last.unsqueeze(0) + shifts.view(-1, 1)) // grp + 1) * grp - shifts.view(-1, 1) - 1)
        cand = range_blocks(lo, hi.expand_as(lo), bs, prob.len_k)  # (H, nq, C)

        def mask_mod(b, h, qi, kj):
            s = shifts[h]
            return (qi + off + s) // grp == (kj + s) // grp

        return [static_block_layout(as_layout_rows(cand), mask_mod, prob, bs, causal)]


@register
@dataclass(frozen=True)
class BlockSparse(LayoutMethod):
    """Exactly the keys a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` allows (causal applied
    on top when ``causal=True``), or the keys of an explicit layout (a :class:`BlockLayout`, a
    :class:`TokenLayout`, or a tuple of disjoint ones, e.g. what a dynamic method's ``layouts()`` chose)."""

    name: ClassVar[str] = "block_sparse"
    exact_for: ClassVar[str] = "a mask_mod or layout that allows every key"
    family: ClassVar[Family] = Family.STATIC_SPARSE
    complexity: ClassVar[str] = "O(nnz·block·D); building from mask_mod O(Nq·Nk)"
    papers: ClassVar[tuple[str, ...]] = ("FlexAttention", "Generating Long Sequences with Sparse Transformers")

    mask_mod: Callable | None = param(None, help="mask_mod(b, h, q_idx, kv_idx) -> bool tensor (elementwise)")
    layout: Any = param(None, help="a BlockLayout / TokenLayout or a tuple of disjoint ones")
    block: int = param(128, min=1, clamp=True, help="block size when building from mask_mod")

    def validate(self) -> None:
        if (self.mask_mod is None) == (self.layout is None):
            raise AttnZooError("block_sparse: expected exactly one of parameters 'mask_mod' or 'layout', got "
                               + ("neither" if self.mask_mod is None else "both"))
        if self.mask_mod is not None:
            check_mask_mod(self.mask_mod)
        if self.layout is not None:
            lays = self.layout if isinstance(self.layout, (tuple, list)) else (self.layout,)
            for lay in lays:
                if not isinstance(lay, (BlockLayout, TokenLayout)):
                    raise AttnZooError(f"block_sparse: parameter 'layout' expected a BlockLayout, TokenLayout "
                                       f"or a tuple of them, got {type(lay).__name__}")

    def build_layouts(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        if self.layout is not None:
            return list(self.layout) if isinstance(self.layout, (tuple, list)) else [self.layout]
        return [BlockLayout.from_mask_mod(self.mask_mod, batch=prob.batch, heads=prob.heads_q, len_q=prob.len_q,
                                          len_k=prob.len_k, block=self.block, causal=causal, device=q.device)]
