"""What every sparse method shares: layouts in, engine out, and the index helpers they build layouts from."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...checks import Problem, check_qkv
from ...core.blocksparse import attend_all
from ...core.exact import span_attention
from ...core.layout import BlockLayout, Layout, band_blocks, query_block_positions, reusable
from ...core.scoremod import check_score_mod
from ...registry import Method, Supports

SPARSE_SUPPORTS = Supports(causal=True, noncausal=True, decode=True, grad=True, lse=True, sinks=True, varlen=True)
#: layout methods also take a score_mod: the executor applies it to the scores of the keys the layouts select,
#: and dynamic methods select on the modified scores
LAYOUT_SUPPORTS = dataclasses.replace(SPARSE_SUPPORTS, score_mod=True)


@dataclass(frozen=True)
class LayoutMethod(Method):
    """A method that is exact attention over the key set its :meth:`layouts` selects (with a ``score_mod``:
    exact attention with that mod over the key set, which a dynamic method selects on the modified scores)."""

    supports: ClassVar[Supports] = LAYOUT_SUPPORTS

    def build_layouts(self, q: torch.Tensor, k: torch.Tensor, prob: Problem, *, causal: bool,
                      key_padding_mask: torch.Tensor | None, score_mod=None) -> list[Layout]:
        """The disjoint layouts whose union is this method's visible set (a dynamic method estimates it on
        the scores as ``score_mod`` modifies them; static ones ignore it)."""
        raise NotImplementedError

    def layouts(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
                key_padding_mask: torch.Tensor | None = None, score_mod=None) -> list[Layout]:
        """The layouts this method would attend with on ``q``/``k`` (run them with ``block_sparse(layout=...)``)."""
        prob = check_qkv(q, k, k, key_padding_mask)
        if score_mod is not None:
            check_score_mod(score_mod)
        return self.fit(prob).build_layouts(q, k, prob, causal=causal, key_padding_mask=key_padding_mask,
                                            score_mod=score_mod)

    def choose(self, q: torch.Tensor, k: torch.Tensor, prob: Problem, *, causal: bool,
               key_padding_mask: torch.Tensor | None, score_mod=None) -> list[Layout] | None:
        """The layouts :meth:`forward` attends, or None for the dense path (exact attention on the fused kernel:
        a dynamic method where sparsity cannot pay, see ``DynamicLayoutMethod``)."""
        return self.build_layouts(q, k, prob, causal=causal, key_padding_mask=key_padding_mask, score_mod=score_mod)

    def step_spans(self, len_k: int) -> tuple[tuple[int, int], ...] | None:
        """The key ranges one query at the last position sees, when they are all it sees (a window method's
        generation step: one exact call over them, :func:`~attnzoo.core.exact.span_attention`); None: the
        layouts run every call."""
        return None

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse, score_mod=None):
        spans = self.step_spans(prob.len_k) if prob.len_q == 1 else None
        if spans is not None:
            return span_attention(q, k, v, spans, scale=prob.scale, key_padding_mask=key_padding_mask,
                                  score_mod=score_mod, return_lse=return_lse)
        lays = self.choose(q, k, prob, causal=causal, key_padding_mask=key_padding_mask, score_mod=score_mod)
        if lays is None:
            from ..exact import Exact
            return Exact().forward(q, k, v, prob, causal=causal, key_padding_mask=key_padding_mask,
                                   return_lse=return_lse, score_mod=score_mod)
        out, lse = attend_all(q, k, v, lays, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                              score_mod=score_mod)
        return out, lse


@dataclass(frozen=True)
class StaticMethod(LayoutMethod):
    """A method whose layout depends only on the sizes: built once per shape and cached."""

    def static_layouts(self, prob: Problem, causal: bool, device) -> list[Layout]:
        raise NotImplementedError

    def build_layouts(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        return _cached_layouts(self, prob.len_q, prob.len_k, prob.heads_q, causal, q.device)


@functools.lru_cache(maxsize=64)
def _cached_layouts(method: StaticMethod, len_q: int, len_k: int, heads_q: int, causal: bool, device):
    prob = Problem(1, heads_q, heads_q, len_q, len_k, 1, 1, 1.0)
    return reusable(method.static_layouts(prob, causal, device))


# ------------------------------------------------------------- index helpers
def block_positions(prob: Problem, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last absolute query position of every query block."""
    return query_block_positions(prob.len_q, prob.len_k, block, device)


def band_candidates(prob: Problem, block: int, before: int, after: int, causal: bool, device) -> torch.Tensor:
    """Key blocks within ``before`` keys before / ``after`` keys after each query block's positions."""
    return band_blocks(prob.len_q, prob.len_k, block, before, after, causal, device)


def prefix_candidates(n_rows: int, count: int, block: int, len_k: int, device) -> torch.Tensor:
    """The key blocks holding keys ``[0, count)``, for every row: ``(n_rows, C)``."""
    n = -(-min(count, len_k) // block)
    return torch.arange(n, device=device).expand(n_rows, n)


def as_layout_rows(*cands: torch.Tensor) -> torch.Tensor:
    """Concatenate ``(nq, C_i)`` (or ``(H, nq, C_i)``) candidate lists into ``(1, H, nq, ΣC)``."""
    cands = [c if c.dim() == 3 else c.unsqueeze(0) for c in cands]
    heads = max(c.shape[0] for c in cands)
    return torch.cat([c.expand(heads, *c.shape[1:]) for c in cands], dim=-1).unsqueeze(0)


def static_block_layout(candidates: torch.Tensor, mask_mod, prob: Problem, block: int, causal: bool) -> BlockLayout:
    return BlockLayout.from_candidates(candidates, mask_mod, block_q=block, block_k=block, len_q=prob.len_q,
                                       len_k=prob.len_k, causal=causal)
