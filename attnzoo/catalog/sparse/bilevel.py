"""BiFormer's bi-level routing attention (docs/methods.md), training-free form, on 1-D or 2-D token grids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...core.blocksparse import BlockLayout, attend
from ...core.scoremod import reordered
from ...errors import AttnZooError, UnsupportedError
from ...registry import Family, Method, Supports, param, register
from .dynamic import block_pool, grouped_scores, topk_mask


@register
@dataclass(frozen=True)
class BilevelRouting(Method):
    """BiFormer bi-level routing: tokens are split into regions (``regions`` equal runs in 1-D, or
    ``regions × regions`` windows of a ``grid=(H, W)`` row-major image); region descriptors are the mean
    query and key; each query region keeps the ``topk`` key regions of highest ``q̄·k̄`` and its tokens attend
    exactly to all tokens of those regions. Non-causal self-attention; the learned LCE branch is not part of
    this training-free form. ``topk >=`` the number of regions equals exact."""

    name: ClassVar[str] = "bilevel_routing"
    exact_for: ClassVar[str] = "topk >= the number of regions"
    family: ClassVar[Family] = Family.DYNAMIC_SPARSE
    complexity: ClassVar[str] = "O(R²·D + N·topk·(N/R)·D)"
    supports: ClassVar[Supports] = Supports(causal=False, noncausal=True, decode=False, grad=True, lse=True,
                                            sinks=True, varlen=True, score_mod=True)
    training_free: ClassVar[bool] = True
    papers: ClassVar[tuple[str, ...]] = ("BiFormer: Vision Transformer with Bi-Level Routing Attention",)

    regions: int = param(7, min=1, help="regions (1-D) or regions per side (2-D)")
    topk: int = param(4, min=1, help="key regions routed to each query region")
    grid: Any = param(None, help="(H, W) of a row-major 2-D token grid, or None for 1-D")

    def validate(self) -> None:
        if self.grid is None:
            return
        ok = isinstance(self.grid, (tuple, list)) and len(self.grid) == 2 and all(
            isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in self.grid)
        if not ok:
            raise AttnZooError(f"bilevel_routing: parameter 'grid' expected a pair of positive ints (H, W) or None, "
                               f"got {self.grid!r}")
        if self.grid[0] % self.regions or self.grid[1] % self.regions:
            raise AttnZooError(f"bilevel_routing: parameter 'grid' expected sides divisible by regions="
                               f"{self.regions}, got {tuple(self.grid)}")

    def token_order(self, n: int, device=None) -> torch.Tensor | None:
        """Permutation putting the tokens of each 2-D region next to each other (None in 1-D)."""
        if self.grid is None:
            return None
        H, W = self.grid
        if H * W != n:
            raise AttnZooError(f"bilevel_routing: parameter 'grid' expected H·W = N = {n}, got {tuple(self.grid)}")
        S = self.regions
        idx = torch.arange(n, device=device).view(S, H // S, S, W // S)
        return idx.permute(0, 2, 1, 3).reshape(-1)

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None):
        if prob.len_q != prob.len_k:
            raise UnsupportedError(f"method 'bilevel_routing' does not support Nq != Nk (self-attention only), "
                                   f"got Nq={prob.len_q}, Nk={prob.len_k}")
        n = prob.len_q
        order = self.token_order(n, q.device)
        if order is not None:
            q, k, v = q[:, :, order], k[:, :, order], v[:, :, order]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[:, order]
            size = n // (self.regions * self.regions)
        else:
            size = -(-n // self.regions)
        with torch.no_grad():
            affinity = grouped_scores(block_pool(q, size), block_pool(k, size, key_padding_mask), 1.0)
            layout = BlockLayout.from_block_mask(topk_mask(affinity, self.topk), block_q=size, block_k=size,
                                                 len_q=n, len_k=n)
        if score_mod is not None and order is not None:  # the mod sees the tokens' row-major positions
            score_mod = reordered(score_mod, order, order, q_offset=0, groups=prob.groups)
        out, lse = attend(q, k, v, layout, scale=prob.scale, causal=False, key_padding_mask=key_padding_mask,
                          score_mod=score_mod)
        if order is not None:
            back = torch.argsort(order)
            out, lse = out[:, :, back], lse[:, :, back]
        return out, lse
