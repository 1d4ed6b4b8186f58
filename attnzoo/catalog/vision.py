"""Vision and video attention patterns on token grids (Swin windows, NATTEN / DiNA neighbourhoods,
Efficient-vDiT's Attention Tile) and AdaSpa's adaptive block sparsity, all on the block-sparse engine.

The grid methods take q, k, v of shape ``(B, H, N, D)`` whose N tokens are the grid in row-major order
and return the output in the same order. Inside, the tokens are sorted so that each query's keys lie in
one or two contiguous runs (:mod:`attnzoo.grid.masks`); the layout reads the key blocks of those runs and
the pattern's ``mask_mod`` cuts them exactly (no N×N mask is built).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..checks import Problem
from ..core.blocksparse import BlockLayout, attend, attend_all
from ..core.exact import tiled_attention
from ..core.kernel import additive_mask
from ..core.layout import range_blocks
from ..core.masks import call_mask_mod, visible_mask
from ..core.scoremod import apply_score_mod, reordered
from ..errors import AttnZooError, UnsupportedError
from ..grid import SortedPattern, check_grid, neighborhood_pattern, per_axis, tile3d_pattern, window_pattern
from ..registry import Family, Supports, param, register
from .sparse._base import LayoutMethod, as_layout_rows

_GRID_SUPPORTS = Supports(causal=False, noncausal=True, decode=False, grad=True, lse=True, score_mod=True)
_BLOCK_HELP = "query/key block size of the executor (speed only; the result does not depend on it)"


def _run_blocks(lo: torch.Tensor, hi: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Per query block, the key blocks of the union-hull of its queries' runs ``[lo, hi]``: ``(nq, C)``."""
    nq = -(-n // block)
    idx = torch.arange(n, device=lo.device) // block
    lo_b = torch.full((nq,), n, dtype=torch.long, device=lo.device).scatter_reduce(0, idx, lo, "amin")
    hi_b = torch.full((nq,), -1, dtype=torch.long, device=lo.device).scatter_reduce(0, idx, hi, "amax")
    return range_blocks(lo_b, hi_b, block, n)


def pattern_layout(pattern: SortedPattern, n: int, block: int) -> BlockLayout:
    """The block layout (in the pattern's sorted order) that reads exactly the pattern's keys."""
    cand = as_layout_rows(*[_run_blocks(lo, hi, block, n) for lo, hi in pattern.runs])
    return BlockLayout.from_candidates(cand, pattern.mask_mod, block_q=block, block_k=block, len_q=n, len_k=n,
                                       causal=False)


#: a grid of at most this many tokens whose layout reads at least half of all (query, key) pairs runs as one
#: dense masked SDPA call (its additive mask kept, at most 4 MiB in fp32): the block engine cannot skip work
#: there, and its per-block gathers and recomputing backward cost ~3x a fused dense call (a 12×12 grid)
_DENSE_TOKENS = 1024


@functools.lru_cache(maxsize=32)
def _dense_mask(method: "GridMethod", n: int, device, dtype) -> torch.Tensor | None:
    """The pattern's ``(N, N)`` additive mask in row-major order when the dense path applies, else None."""
    layout = _plan(method, n, device)[2]
    if n > _DENSE_TOKENS or 2 * int((layout.kv_blocks >= 0).sum()) * layout.block_q * layout.block_k < n * n:
        return None
    pattern = method.pattern(method.resolve_grid(n), device)
    pos = pattern.inverse  # the sorted position of each row-major token
    visible = call_mask_mod(pattern.mask_mod, 0, 0, pos[:, None], pos[None, :])
    return additive_mask(visible, dtype)


@functools.lru_cache(maxsize=32)
def _plan(method: "GridMethod", n: int, device) -> tuple[torch.Tensor, torch.Tensor, BlockLayout]:
    pattern = method.pattern(method.resolve_grid(n), device)
    layout = pattern_layout(pattern, n, method.block)
    layout = BlockLayout(layout.kv_blocks, layout.block_q, layout.block_k, n, n, layout.partial, layout.mask_mod,
                         layout.causal, reuse=True)
    return pattern.order, pattern.inverse, layout


@dataclass(frozen=True)
class GridMethod(LayoutMethod):
    """Self-attention over a row-major token grid through a sorted pattern (see the module docstring)."""

    supports: ClassVar[Supports] = _GRID_SUPPORTS
    ndim: ClassVar[int] = 2

    grid: Any = param(None, help="grid shape of the N row-major tokens; None = a square (2-D) or one square "
                                 "frame (3-D) when N is a perfect square")
    block: int = param(64, min=1, clamp=True, help=_BLOCK_HELP)

    def validate(self) -> None:
        if self.grid is not None:
            object.__setattr__(self, "grid", check_grid(self.grid, name=f"{self.name}: parameter 'grid'",
                                                        dims=(self.ndim,)))

    def resolve_grid(self, n: int) -> tuple[int, ...]:
        """The grid for N tokens (``grid`` or the inferred square)."""
        if self.grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise UnsupportedError(f"method {self.name!r} needs grid=... for N={n} tokens (N is not a perfect "
                                       f"square, so no square grid can be assumed)")
            return (side, side) if self.ndim == 2 else (1, side, side)
        return check_grid(self.grid, n, name=f"{self.name}: parameter 'grid'", dims=(self.ndim,))

    def pattern(self, grid: tuple[int, ...], device) -> SortedPattern:
        raise NotImplementedError

    def layout(self, n: int, device=None) -> BlockLayout:
        """The block layout for N tokens, in the pattern's sorted order (``pattern(...).order``), not in
        row-major order; built once per (method, N, device) and reused (it keeps the executor's masks)."""
        return _plan(self, n, device)[2]

    def build_layouts(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        return [self.layout(prob.len_k, q.device)]

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse, score_mod=None):
        if prob.len_q != prob.len_k:
            raise UnsupportedError(f"method {self.name!r} does not support Nq != Nk (grid self-attention only), "
                                   f"got Nq={prob.len_q}, Nk={prob.len_k}")
        if key_padding_mask is None and score_mod is None and not return_lse:
            dense = _dense_mask(self, prob.len_k, q.device, q.dtype)
            if dense is not None:  # a small grid: one fused dense call under the pattern's mask
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=prob.scale,
                                                      enable_gqa=q.shape[1] != k.shape[1]), None
        order, inverse, layout = _plan(self, prob.len_k, q.device)
        pad = None if key_padding_mask is None else key_padding_mask[:, order]
        if score_mod is not None:  # the mod sees the tokens' row-major positions
            score_mod = reordered(score_mod, order, order, q_offset=0, groups=prob.groups)
        out, lse = attend(q[:, :, order], k[:, :, order], v[:, :, order], layout, scale=prob.scale, causal=False,
                          key_padding_mask=pad, score_mod=score_mod)
        return out[:, :, inverse], lse[:, :, inverse]


@register
@dataclass(frozen=True)
class Window2D(GridMethod):
    """Swin window attention on a ``grid=(H, W)``: each query attends the keys of its ``window × window``
    window. With ``shift = s > 0`` the grid is cyclically shifted by ``s`` before partitioning and pairs from
    different pre-shift regions are masked (Swin's shifted block), which equals windows whose origin is moved
    to ``s - window``. Sides the window does not divide end in a shorter window (no padding tokens)."""

    name: ClassVar[str] = "window2d"
    exact_for: ClassVar[str] = "window >= both grid sides and shift = 0"
    family: ClassVar[Family] = Family.LOCAL
    complexity: ClassVar[str] = "O(N·M²·D)"
    papers: ClassVar[tuple[str, ...]] = ("Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",)

    window: Any = param(7, help="window side M (int) or (Mh, Mw)")
    shift: Any = param(0, help="cyclic shift s (int or pair), 0 <= s < window; Swin uses window // 2 in "
                               "every second block")

    def validate(self) -> None:
        super().validate()
        win = per_axis(self.window, 2, f"{self.name}: parameter 'window'")
        sh = per_axis(self.shift, 2, f"{self.name}: parameter 'shift'")
        if min(win) < 1 or any(s >= w for s, w in zip(sh, win)):
            raise AttnZooError(f"{self.name}: parameters 'window'/'shift' expected window >= 1 and shift < window, "
                               f"got window={self.window!r}, shift={self.shift!r}")
        object.__setattr__(self, "window", win)
        object.__setattr__(self, "shift", sh)

    def pattern(self, grid, device):
        return window_pattern(grid, self.window, self.shift, device)


@register
@dataclass(frozen=True)
class Neighborhood2D(GridMethod):
    """Dilated neighbourhood attention (NATTEN / DiNA) on a ``grid=(H, W)``: each query attends
    ``kernel × kernel`` keys, on each axis the ``kernel`` positions of its residue class mod ``dilation``
    centred on it, the window shifted inward at borders so it always holds ``kernel²`` keys."""

    name: ClassVar[str] = "neighborhood2d"
    exact_for: ClassVar[str] = "dilation = 1 and kernel = both grid sides (odd)"
    family: ClassVar[Family] = Family.LOCAL
    complexity: ClassVar[str] = "O(N·k²·D)"
    papers: ClassVar[tuple[str, ...]] = ("Neighborhood Attention Transformer", "Dilated Neighborhood Attention "
                                         "Transformer", "MedViTV2")

    kernel: int = param(7, min=1, help="odd neighbourhood side k")
    dilation: int = param(1, min=1, help="distance between neighbours (kernel·dilation <= each side)")

    def validate(self) -> None:
        super().validate()
        if self.kernel % 2 == 0:
            raise AttnZooError(f"{self.name}: parameter 'kernel' expected an odd int, got {self.kernel}")

    def pattern(self, grid, device):
        """Of two token orders (sub-grid rows; 2-D tiles of one block), the one whose layout reads fewer key
        blocks: rows win on narrow grids (a block holds whole rows), tiles on wide ones (a 7×7 neighbourhood
        at 128×128 reads 9 tile blocks instead of 14 row blocks)."""
        th = 1 << (self.block.bit_length() - 1) // 2  # a power-of-two tile of about one block
        options = [neighborhood_pattern(grid, self.kernel, self.dilation, device, tile=t)
                   for t in (None, (th, max(1, self.block // th)))]
        n = math.prod(grid)
        return min(options, key=lambda p: int((as_layout_rows(*[_run_blocks(lo, hi, self.block, n)
                                                                for lo, hi in p.runs]) >= 0).sum()))


@register
@dataclass(frozen=True)
class Tile3D(GridMethod):
    """Attention Tile (Efficient-vDiT) on a video ``grid=(T, H, W)``: a query attends the keys of its
    spatial tile in its own temporal tile and in the first ``ref_frames`` frames (the global reference
    frames). ``tile=None`` is ``(1, H, W)``: each frame attends itself plus the reference frames, Attention
    Tile's frame pattern; ``ref_frames >= T`` with whole-frame tiles is exact attention."""

    name: ClassVar[str] = "tile3d"
    exact_for: ClassVar[str] = "ref_frames >= T with whole-frame tiles"
    family: ClassVar[Family] = Family.STATIC_SPARSE
    complexity: ClassVar[str] = "O(T·(1+r)·F²·D)"
    papers: ClassVar[tuple[str, ...]] = ("Efficient-vDiT: Efficient Video Diffusion Transformers With Attention "
                                         "Tile",)
    ndim: ClassVar[int] = 3

    tile: Any = param(None, help="(t, h, w) tile; None = (1, H, W), whole frames")
    ref_frames: int = param(1, min=0, help="first frames every query also attends (same spatial tile)")

    def validate(self) -> None:
        super().validate()
        if self.tile is not None:
            t = per_axis(self.tile, 3, f"{self.name}: parameter 'tile'")
            if min(t) < 1:
                raise AttnZooError(f"{self.name}: parameter 'tile' expected positive sizes, got {self.tile!r}")
            object.__setattr__(self, "tile", t)

    def pattern(self, grid, device):
        return tile3d_pattern(grid, self.tile or (1, grid[1], grid[2]), self.ref_frames, device)


@register
@dataclass(frozen=True)
class AdaSpa(LayoutMethod):
    """AdaSpa: training-free adaptive block sparsity. A search pass runs exact attention for each row's lse,
    sums the exact attention mass ``Σ exp(scale·q·k - lse)`` of every (query block, key block) pair, and keeps
    per head and query block the fewest key blocks whose mass reaches ``coverage`` of the row block's total;
    the output is exact attention over those blocks. ``coverage=1`` keeps every block (exact). The search is
    ``search(q, k)``; its layout can be reused on later steps with ``block_sparse(layout=...)``, as AdaSpa
    reuses it across denoising steps."""

    name: ClassVar[str] = "adaspa"
    exact_for: ClassVar[str] = "coverage = 1"
    family: ClassVar[Family] = Family.DYNAMIC_SPARSE
    complexity: ClassVar[str] = "search O(N²·D), attend O(N·k·b·D)"
    papers: ClassVar[tuple[str, ...]] = ("Training-free and Adaptive Sparse Attention for Efficient Long Video "
                                         "Generation (AdaSpa)",)

    block: int = param(64, min=1, clamp=True, help="query/key block size b")
    coverage: float = param(0.9, min=0.0, max=1.0, help="attention mass each query block keeps (top-p)")
    chunk: int = param(8, min=1, clamp=True, help="query blocks scored at once in the search (memory only)")

    def block_mass(self, q, k, *, scale: float, causal: bool, key_padding_mask=None, score_mod=None) -> torch.Tensor:
        """``(B, Hq, nq, nk)`` exact attention mass of every (query block, key block), from the cached lse
        (with ``score_mod``: of the modified scores)."""
        with torch.no_grad():
            _, lse = tiled_attention(q, k, k[..., :1], scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                     score_mod=score_mod)
            B, Hq, Nq, _ = q.shape
            Nk, b = k.shape[2], self.block
            kk = k.repeat_interleave(Hq // k.shape[1], dim=1)
            nq, nk = -(-Nq // b), -(-Nk // b)
            lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            out = q.new_zeros(B, Hq, nq, nk, dtype=torch.float32)
            for c0 in range(0, nq, self.chunk):
                r0, r1 = c0 * b, min(Nq, (c0 + self.chunk) * b)
                s = scale * (q[:, :, r0:r1].float() @ kk.float().transpose(-1, -2))
                if score_mod is not None:
                    s = apply_score_mod(score_mod, s, r0 + Nk - Nq, 0)
                p = (s - lse[:, :, r0:r1, None]).exp()
                vis = visible_mask(r1 - r0, Nk, causal=causal, key_padding_mask=key_padding_mask,
                                   q_offset=r0 + Nk - Nq, device=q.device)
                if vis is not None:
                    p = torch.where(vis, p, torch.zeros_like(p))
                p = torch.nn.functional.pad(p, (0, nk * b - Nk, 0, (-(r1 - r0)) % b))
                out[:, :, c0:c0 + p.shape[2] // b] = p.view(B, Hq, -1, b, nk, b).sum((3, 5))
            return out

    def search(self, q, k, *, scale: float | None = None, causal: bool = False,
               key_padding_mask: torch.Tensor | None = None, score_mod=None) -> BlockLayout:
        """The per-head block layout covering ``coverage`` of each query block's attention mass."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        mass = self.block_mass(q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                               score_mod=score_mod)
        if self.coverage >= 1.0:
            keep = torch.ones_like(mass, dtype=torch.bool)
        else:
            val, idx = mass.sort(-1, descending=True)
            before = val.cumsum(-1) - val
            take = before < self.coverage * val.sum(-1, keepdim=True)
            take[..., 0] = True
            keep = torch.zeros_like(take).scatter(-1, idx, take)
        return BlockLayout.from_block_mask(keep, block_q=self.block, block_k=self.block, len_q=q.shape[2],
                                           len_k=k.shape[2], causal=causal)

    def build_layouts(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        return [self.search(q, k, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                            score_mod=score_mod)]

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None):
        lays = self.build_layouts(q, k, prob, causal=causal, key_padding_mask=key_padding_mask, score_mod=score_mod)
        return attend_all(q, k, v, lays, scale=prob.scale, causal=causal, key_padding_mask=key_padding_mask,
                          score_mod=score_mod)
