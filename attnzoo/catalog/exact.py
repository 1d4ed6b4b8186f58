"""Exact softmax attention: the reference, the fastest path, the tiled engine, split-K decode."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import Problem
from ..core.exact import (has_empty_rows, naive_attention, sdpa_attention, sdpa_with_lse,
                          tiled_attention)
from ..core.splitk import split_k
from ..registry import Family, Method, Supports, param, register

_ALL = Supports(causal=True, noncausal=True, decode=True, grad=True, lse=True, score_mod=True, sinks=True,
                varlen=True)


@register
@dataclass(frozen=True)
class Naive(Method):
    """Materialises the full score matrix. Works in float64: the oracle every test compares with."""

    name: ClassVar[str] = "naive"
    exact_for: ClassVar[str] = "always (it computes in float64: the tests' oracle)"
    family: ClassVar[Family] = Family.EXACT
    complexity: ClassVar[str] = "O(N²·D), O(N²) mem"
    supports: ClassVar[Supports] = _ALL
    papers: ClassVar[tuple[str, ...]] = ("Attention Is All You Need",)

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse, score_mod=None):
        return naive_attention(q, k, v, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                               score_mod=score_mod)


@register
@dataclass(frozen=True)
class ExactTiled(Method):
    """FlashAttention-style online softmax over query and key tiles.

    Memory O(N·tile), never an N×N buffer; returns the log-sum-exp; the backward
    pass recomputes the probabilities tile by tile from the saved lse.
    """

    name: ClassVar[str] = "exact_tiled"
    exact_for: ClassVar[str] = "always"
    family: ClassVar[Family] = Family.EXACT
    complexity: ClassVar[str] = "O(N²·D), O(N·tile) mem"
    supports: ClassVar[Supports] = _ALL
    papers: ClassVar[tuple[str, ...]] = ("FlashAttention", "FlashAttention-2")

    q_tile: int = param(256, min=1, clamp=True, help="query rows per tile")
    k_tile: int = param(512, min=1, clamp=True, help="keys per tile")

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse, score_mod=None):
        return tiled_attention(q, k, v, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                               q_tile=self.q_tile, k_tile=self.k_tile, score_mod=score_mod)


@register
@dataclass(frozen=True)
class Exact(Method):
    """Exact softmax attention on the fastest correct path.

    ``torch.nn.functional.scaled_dot_product_attention`` (with a lower-right
    causal bias when Nq != Nk) unless some query row has no visible key. With
    the lse requested: PyTorch's CPU flash kernel (it returns the lse) when it
    applies (see :func:`sdpa_with_lse`), otherwise the tiled engine.
    """

    name: ClassVar[str] = "exact"
    exact_for: ClassVar[str] = "always"
    family: ClassVar[Family] = Family.EXACT
    complexity: ClassVar[str] = "O(N²·D)"
    supports: ClassVar[Supports] = _ALL
    papers: ClassVar[tuple[str, ...]] = ("FlashAttention-2",)
    upcast_half: ClassVar[bool] = False  # SDPA accumulates half inputs in fp32 itself

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse, score_mod=None):
        if score_mod is None and not has_empty_rows(q, k, causal=causal, key_padding_mask=key_padding_mask):
            if not return_lse:
                return sdpa_attention(q, k, v, scale=prob.scale, causal=causal,
                                      key_padding_mask=key_padding_mask), None
            fast = sdpa_with_lse(q, k, v, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask)
            if fast is not None:
                return fast
        dtype = q.dtype
        if dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out, lse = tiled_attention(q, k, v, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                                   score_mod=score_mod)
        return out.to(dtype), lse


@register
@dataclass(frozen=True)
class FlashDecode(Method):
    """Split-K attention (flash-decoding / LeanAttention): the keys are cut into
    ``splits`` ranges attended independently and merged by log-sum-exp. Equals exact;
    the split is what lets a decode step with one query use every core."""

    name: ClassVar[str] = "flash_decode"
    exact_for: ClassVar[str] = "always (any splits)"
    family: ClassVar[Family] = Family.EXACT
    complexity: ClassVar[str] = "O(Nq·Nk·D)/splits"
    supports: ClassVar[Supports] = _ALL
    papers: ClassVar[tuple[str, ...]] = ("Flash-Decoding", "LeanAttention")

    splits: int = param(8, min=1, clamp=True, help="number of key ranges attended independently")

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse, score_mod=None):
        return split_k(q, k, v, scale=prob.scale, causal=causal, splits=self.splits,
                       key_padding_mask=key_padding_mask, score_mod=score_mod)


@register
@dataclass(frozen=True)
class Anchor(Exact):
    """AnchorAttention: packed documents attend within themselves plus one shared anchor, the packed
    sequence's first token (e.g. BOS). With ``cu_seqlens_q/k`` each document runs as its own exact call
    with the anchor's key and value prepended (cost Σ_d (|d| + 1)·|d|, never a total × total mask);
    without them the whole input is one document and this is causal exact attention. Position ids
    (and whether they restart per document) are the model's business, applied to q and k beforehand."""

    name: ClassVar[str] = "anchor"
    exact_for: ClassVar[str] = "one document (no cu_seqlens): then it is causal exact attention"
    family: ClassVar[Family] = Family.STATIC_SPARSE
    complexity: ClassVar[str] = "O(Σ_d |d|²·D)"
    supports: ClassVar[Supports] = dataclasses.replace(_ALL, noncausal=False)
    papers: ClassVar[tuple[str, ...]] = ("When Precision Meets Position: BFloat16 Breaks Down RoPE in "
                                         "Long-Context Training (AnchorAttention)",)

    def sequence_kv(self, k, v, k0, k1):
        if k0 == 0:  # the first document holds the anchor already
            return k[:, :, :k1], v[:, :, :k1]
        return torch.cat([k[:, :, :1], k[:, :, k0:k1]], dim=2), torch.cat([v[:, :, :1], v[:, :, k0:k1]], dim=2)
