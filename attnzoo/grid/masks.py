"""Grid attention patterns as ``mask_mod``s (FlexAttention's convention on row-major token indices)
and as *sorted patterns*: a token order in which every query's keys lie in one or two contiguous
runs, so the block-sparse engine reads a few key blocks per query block instead of an N×N mask.
"""

from __future__ import annotations

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


def neighborhood_pattern(grid: tuple[int, ...], kernel, dilation=1, device=None) -> SortedPattern:
    """Tokens sorted by residue class of every axis (the dilated sub-grids), row-major inside: a query's
    neighbourhood spans ``kernel`` consecutive rows of its sub-grid, one contiguous run."""
    ker, dil, starts = _neighborhood_bounds(grid, kernel, dilation, device)
    coords = _coords(grid, device)
    cls_id = _compose([c % d for c, d in zip(coords, dil)], list(dil))
    inner = _compose([c // d for c, d in zip(coords, dil)], [-(-g // d) for g, d in zip(grid, dil)])
    order = torch.argsort(cls_id * len(inner) + inner)
    sub_start, _ = _group_runs(cls_id[order])
    # sub-grid shape of each sorted token: per axis the count of its residue class
    c_sorted = [c[order] for c in coords]
    sub_sizes = [(g - 1 - c % d) // d + 1 for c, g, d in zip(c_sorted, grid, dil)]
    row_len = torch.ones_like(sub_start)
    for s in sub_sizes[1:]:
        row_len = row_len * s  # tokens per step of the first axis inside the sub-grid
    first = starts[0][c_sorted[0]] // dil[0]  # first neighbour row (sub-grid units)
    lo = sub_start + first * row_len
    hi = lo + ker[0] * row_len - 1
    # on sorted indices: same residue class, and on every axis the key's sub-grid coordinate lies in the
    # query's window of ``kernel`` sub-grid positions (no modulo, six small gathers)
    cls_s = cls_id[order]
    sub = [c // d for c, d in zip(c_sorted, dil)]
    first_sub = [s[c] // d for s, c, d in zip(starts, c_sorted, dil)]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = cls_s[q_idx] == cls_s[kv_idx]
        for pos, lo, k in zip(sub, first_sub, ker):
            rel = pos[kv_idx] - lo[q_idx]
            ok = ok & (rel >= 0) & (rel < k)
        return ok

    return SortedPattern(order, mask_mod, ((lo, hi),))


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
