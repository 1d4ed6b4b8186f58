"""Grid attention patterns as ``mask_mod``s (FlexAttention's convention on row-major token indices)
and as *sorted patterns*: a token order in which every query's keys lie in one or two contiguous
runs, so the block-sparse engine reads a few key blocks per query block instead of an N×N mask.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..core.masks import MaskMod
from ..errors import AttnZooError
from .layout import _compose, _coords, axis_neighbors, per_axis, window_ids


@dataclass(frozen=True)
class SortedPattern:
    """A grid pattern in a token order where it is cheap to run.

    ``order``: ``(N,)`` row-major index of each sorted position (``x[:, :, order]`` sorts).
    ``mask_mod``: the pattern on *sorted* indices. ``runs``: ``(lo, hi)`` pairs of ``(N,)`` inclusive
    sorted key ranges per sorted query whose union holds every key the query may see.
    """

    order: torch.Tensor
    mask_mod: MaskMod
    runs: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def inverse(self) -> torch.Tensor:
        return torch.argsort(self.order)


def _group_runs(gid_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted group ids, the first and last sorted position of each token's group."""
    _, inv, counts = torch.unique_consecutive(gid_sorted, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0) - 1
    return (ends - counts + 1)[inv], ends[inv]


# ---------------------------------------------------------------- windows
def window_mask_mod(grid: tuple[int, ...], window, shift=0, device=None) -> MaskMod:
    """Row-major mask: query and key share a (shifted) window; see :func:`~attnzoo.grid.window_ids`."""
    gid = window_ids(grid, window, shift, device)
    return lambda b, h, q_idx, kv_idx: gid[q_idx] == gid[kv_idx]


def window_pattern(grid: tuple[int, ...], window, shift=0, device=None) -> SortedPattern:
    """Windows as contiguous runs: tokens sorted by window (row-major inside)."""
    gid = window_ids(grid, window, shift, device)
    order = torch.argsort(gid, stable=True)
    g = gid[order]
    return SortedPattern(order, lambda b, h, q_idx, kv_idx: g[q_idx] == g[kv_idx], (_group_runs(g),))


# ---------------------------------------------------------- neighbourhoods
def _neighborhood_bounds(grid, kernel, dilation, device):
    ker = per_axis(kernel, len(grid), "kernel")
    dil = per_axis(dilation, len(grid), "dilation")
    starts = [axis_neighbors(g, k, d, device)[:, 0] for g, k, d in zip(grid, ker, dil)]
    return ker, dil, starts


def neighborhood_mask_mod(grid: tuple[int, ...], kernel, dilation=1, device=None) -> MaskMod:
    """Row-major mask of dilated neighbourhood attention (NATTEN): on every axis the key is one of the
    ``kernel`` positions of the query's residue class mod ``dilation`` starting at the clamped start."""
    ker, dil, starts = _neighborhood_bounds(grid, kernel, dilation, device)
    coords = _coords(grid, device)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for c, s, k, d in zip(coords, starts, ker, dil):
            cq, ck = c[q_idx], c[kv_idx]
            rel = ck - s[cq]
            here = (rel >= 0) & (rel < k * d) & (rel % d == 0)
            ok = here if ok is None else ok & here
        return ok

    return mask_mod


def neighborhood_pattern(grid: tuple[int, ...], kernel, dilation=1, device=None, tile=None) -> SortedPattern:
    """Tokens sorted by residue class of every axis (the dilated sub-grids), then inside each sub-grid

    * ``tile=None``: row-major. A query's neighbourhood spans ``kernel`` consecutive rows of its sub-grid,
      one contiguous run (``kernel · row`` keys read for ``kernel²`` needed: good for narrow sub-grids);
    * ``tile=(t0, t1, ...)``: by tiles of that shape (row-major over tiles, row-major inside a tile). A
      query's neighbourhood is one run per tile row it touches (the tiles of that row from the first to the
      last touched column are contiguous), so a query block that is one tile reads the ~3×3 tiles around it
      (good for wide sub-grids, whose rows are longer than a block).

    On sorted indices the mask is: same residue class, and on every axis the key's sub-grid coordinate lies
    in the query's window of ``kernel`` sub-grid positions.
    """
    ker, dil, starts = _neighborhood_bounds(grid, kernel, dilation, device)
    nd = len(grid)
    tiles = (1,) * (nd - 1) + (max(grid),) if tile is None else per_axis(tile, nd, "tile")
    if min(tiles) < 1:
        raise AttnZooError(f"tile: expected positive sizes, got {tile!r}")
    coords = _coords(grid, device)
    sub_sides = [-(-g // d) for g, d in zip(grid, dil)]
    n_tiles = [-(-s // t) for s, t in zip(sub_sides, tiles)]
    cls_id = _compose([c % d for c, d in zip(coords, dil)], list(dil))
    sub = [c // d for c, d in zip(coords, dil)]
    tile_id = _compose([p // t for p, t in zip(sub, tiles)], n_tiles)
    inner = _compose([p % t for p, t in zip(sub, tiles)], list(tiles))
    order = torch.argsort((cls_id * math.prod(n_tiles) + tile_id) * math.prod(tiles) + inner)
    cls_s, tile_s = cls_id[order], tile_id[order]
    # first / last sorted position of every (class, tile); tiles with no token are never read
    t_lo, t_hi = _group_runs(cls_s * math.prod(n_tiles) + tile_s)
    n_all = math.prod(dil) * math.prod(n_tiles)
    first_of = torch.zeros(n_all, dtype=torch.long, device=device).scatter_(0, cls_s * math.prod(n_tiles) + tile_s,
                                                                          t_lo)
    last_of = torch.zeros(n_all, dtype=torch.long, device=device).scatter_(0, cls_s * math.prod(n_tiles) + tile_s,
                                                                         t_hi)
    sub_s = [p[order] for p in sub]
    first_sub = [st[c[order]] // d for st, c, d in zip(starts, coords, dil)]  # window start, sub-grid units
    lo_tile = [f // t for f, t in zip(first_sub, tiles)]
    hi_tile = [(f + k - 1) // t for f, k, t in zip(first_sub, ker, tiles)]
    # one run per combination of the leading axes' tile indices (the last axis is contiguous inside a row)
    runs = []
    for offs in itertools.product(*[range((k - 2 + t) // t + 1) for k, t in zip(ker[:-1], tiles[:-1])]):
        lead = [lo + o for lo, o in zip(lo_tile[:-1], offs)]
        used = torch.ones_like(cls_s, dtype=torch.bool)
        for tl, hi in zip(lead, hi_tile[:-1]):
            used &= tl <= hi
        lead = [tl.clamp(max=n - 1) for tl, n in zip(lead, n_tiles[:-1])]
        base = cls_s * math.prod(n_tiles)
        lo = first_of[base + _compose(lead + [lo_tile[-1]], n_tiles)]
        hi = last_of[base + _compose(lead + [hi_tile[-1]], n_tiles)]
        runs.append((torch.where(used, lo, len(order)), torch.where(used, hi, -1)))  # unused: empty, lo > hi

    def mask_mod(b, h, q_idx, kv_idx):
        ok = cls_s[q_idx] == cls_s[kv_idx]
        for pos, lo, k in zip(sub_s, first_sub, ker):
            rel = pos[kv_idx] - lo[q_idx]
            ok = ok & (rel >= 0) & (rel < k)
        return ok

    return SortedPattern(order, mask_mod, tuple(runs))


# ------------------------------------------------------------------ 3-D tiles
def tile3d_mask_mod(grid: tuple[int, int, int], tile, ref_frames: int = 0, device=None) -> MaskMod:
    """Row-major mask of the video tile pattern: query and key lie in the same spatial tile and either in
    the same temporal tile or the key is in one of the first ``ref_frames`` frames (Attention Tile's
    global reference frames). ``tile=(1, H, W)`` is Attention Tile's frame pattern."""
    sp, tt, frame = _tile_ids(grid, tile, device)
    return lambda b, h, q_idx, kv_idx: (sp[q_idx] == sp[kv_idx]) & ((tt[q_idx] == tt[kv_idx])
                                                                   | (frame[kv_idx] < ref_frames))


def _tile_ids(grid, tile, device):
    if len(grid) != 3:
        raise AttnZooError(f"grid: expected (T, H, W), got {grid!r}")
    t_, h_, w_ = per_axis(tile, 3, "tile")
    if min(t_, h_, w_) < 1:
        raise AttnZooError(f"tile: expected positive sizes, got {tile!r}")
    f, r, c = _coords(grid, device)
    sp = _compose([r // h_, c // w_], [-(-grid[1] // h_), -(-grid[2] // w_)])
    return sp, f // t_, f


def tile3d_pattern(grid: tuple[int, int, int], tile, ref_frames: int = 0, device=None) -> SortedPattern:
    """Tokens sorted by spatial tile, then frame (row-major inside): a query's own temporal tile and the
    reference frames of its spatial tile are two contiguous runs."""
    sp, tt, frame = _tile_ids(grid, tile, device)
    order = torch.argsort(sp, stable=True)
    s, t, f = sp[order], tt[order], frame[order]
    seg_lo, _ = _group_runs(s)
    own_lo, own_hi = _group_runs(s * (int(tt.max()) + 1) + t)
    per_frame = torch.bincount(sp, minlength=int(sp.max()) + 1)[s] // grid[0]  # tokens of the tile per frame
    ref_lo, ref_hi = seg_lo, seg_lo + min(ref_frames, grid[0]) * per_frame - 1
    runs = ((own_lo, own_hi),) + (((ref_lo, ref_hi),) if ref_frames > 0 else ())
    return SortedPattern(order, lambda b, h, q_idx, kv_idx: (s[q_idx] == s[kv_idx]) & (
        (t[q_idx] == t[kv_idx]) | (f[kv_idx] < ref_frames)), runs)
