"""Token re-layout on 2-D / 3-D grids: flatten and back, windows, cyclic shifts, dilated
neighbourhoods (NATTEN semantics) and point-cloud window sorting (FlatFormer).

Tokens of a grid ``(H, W)`` or ``(T, H, W)`` are numbered in row-major order
(the last axis fastest); every index map here is in that numbering.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import AttnZooError


def check_grid(grid, n: int | None = None, *, name: str = "grid", dims: tuple[int, ...] = (2, 3)) -> tuple[int, ...]:
    """Validate a grid shape (a tuple of positive ints with ``len in dims``); with ``n``, its product must be ``n``."""
    ok = isinstance(grid, (tuple, list)) and len(grid) in dims and all(
        isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    if not ok:
        want = " or ".join(f"{d} positive ints" for d in dims)
        raise AttnZooError(f"{name}: expected {want}, got {grid!r}")
    grid = tuple(grid)
    if n is not None and math.prod(grid) != n:
        raise AttnZooError(f"{name}: expected a grid of N={n} tokens, got {grid} ({math.prod(grid)} tokens)")
    return grid


def per_axis(value, ndim: int, name: str) -> tuple[int, ...]:
    """An int (same on every axis) or one int per axis -> a tuple of ``ndim`` positive ints."""
    vals = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(vals, (tuple, list)) and len(vals) == ndim and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in vals)):
        raise AttnZooError(f"{name}: expected a non-negative int or {ndim} of them, got {value!r}")
    return tuple(vals)


def flatten(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(B, *grid, C)`` -> ``(B, N, C)`` in row-major token order."""
    return x.reshape(x.shape[0], math.prod(grid), x.shape[-1])


def unflatten(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, *grid, C)``."""
    return x.reshape(x.shape[0], *grid, x.shape[-1])


def to_channels_first(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, C, *grid)`` (the layout of ``nn.Conv2d``)."""
    return unflatten(x, grid).movedim(-1, 1)


def from_channels_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *grid)`` -> ``(B, N, C)``."""
    return x.flatten(2).transpose(1, 2)


def cyclic_shift(x: torch.Tensor, shift, dims: tuple[int, ...]) -> torch.Tensor:
    """Roll ``x`` by ``-shift`` along ``dims`` (Swin's shift before partitioning; ``cyclic_shift(x, -s)`` undoes it)."""
    shift = per_axis(shift, len(dims), "shift") if not isinstance(shift, int) or shift >= 0 else (shift,) * len(dims)
    return torch.roll(x, shifts=tuple(-s for s in shift), dims=dims)


def window_partition(x: torch.Tensor, window) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, *grid, C)`` -> windows ``(B, n_windows, prod(window), C)`` and the valid-token mask
    ``(n_windows, prod(window))``. Sides that the window does not divide are zero-padded at the end."""
    grid = tuple(x.shape[1:-1])
    win = per_axis(window, len(grid), "window")
    pads = [(-g) % w for g, w in zip(grid, win)]
    valid = torch.ones(grid, dtype=torch.bool, device=x.device)
    if any(pads):
        pad_spec = [0, 0] + [p for d in reversed(pads) for p in (0, d)]
        x = F.pad(x, pad_spec)
        valid = F.pad(valid, pad_spec[2:])
    counts = [(g + p) // w for g, p, w in zip(grid, pads, win)]
    shape = [x.shape[0]] + [v for c, w in zip(counts, win) for v in (c, w)] + [x.shape[-1]]
    nd = len(grid)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd]
    xw = x.reshape(shape).permute(perm).reshape(x.shape[0], math.prod(counts), math.prod(win), x.shape[-1])
    vshape = [v for c, w in zip(counts, win) for v in (c, w)]
    vperm = [2 * i for i in range(nd)] + [1 + 2 * i for i in range(nd)]
    vw = valid.reshape(vshape).permute(vperm).reshape(math.prod(counts), math.prod(win))
    return xw, vw


def window_merge(windows: torch.Tensor, grid: tuple[int, ...], window) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, n_windows, prod(window), C)`` -> ``(B, *grid, C)``."""
    win = per_axis(window, len(grid), "window")
    counts = [-(-g // w) for g, w in zip(grid, win)]
    nd = len(grid)
    shape = [windows.shape[0]] + counts + list(win) + [windows.shape[-1]]
    perm = [0] + [v for i in range(nd) for v in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
    x = windows.reshape(shape).permute(perm).reshape(windows.shape[0], *[c * w for c, w in zip(counts, win)],
                                                    windows.shape[-1])
    return x[(slice(None),) + tuple(slice(0, g) for g in grid)]


def _coords(grid: tuple[int, ...], device=None) -> list[torch.Tensor]:
    """Per axis, the coordinate of every row-major token: a list of ``(N,)`` tensors."""
    axes = torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij")
    return [a.reshape(-1) for a in axes]


def _compose(ids: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Mixed-radix combination of per-axis ids (row-major)."""
    out = torch.zeros_like(ids[0])
    for i, s in zip(ids, sizes):
        out = out * s + i
    return out


def window_ids(grid: tuple[int, ...], window, shift=0, device=None) -> torch.Tensor:
    """``(N,)`` the attention group of every token under (shifted) window attention.

    Unshifted: the window a token falls in (windows tile the grid from the origin; the
    last window of a side the window does not divide is cut short). Shifted by ``s``:
    Swin's cyclic shift followed by its region mask keeps together exactly the tokens of
    the windows whose origin is moved to ``s - M`` (a first window of ``s`` rows/cols, then
    full windows), so that is the group. For sides the window divides this equals the
    explicit roll + region-id mask of Swin.
    """
    win = per_axis(window, len(grid), "window")
    sh = per_axis(shift, len(grid), "shift")
    for s, w in zip(sh, win):
        if s >= w:
            raise AttnZooError(f"shift: expected each shift < window {win}, got {sh}")
    ids, sizes = [], []
    for c, g, w, s in zip(_coords(grid, device), grid, win, sh):
        off = (w - s) % w
        ids.append((c + off) // w)
        sizes.append((g - 1 + off) // w + 1)
    return _compose(ids, sizes)


def axis_neighbors(length: int, kernel: int, dilation: int = 1, device=None) -> torch.Tensor:
    """``(length, kernel)`` the key positions of every query on one axis (NATTEN): the ``kernel``
    positions of the query's residue class mod ``dilation``, centred on the query and shifted inward
    at the borders so that there are always ``kernel`` of them."""
    if kernel < 1 or kernel % 2 == 0:
        raise AttnZooError(f"kernel: expected an odd positive int, got {kernel}")
    if dilation < 1 or kernel * dilation > length:
        raise AttnZooError(f"kernel·dilation: expected kernel·dilation <= side {length} (every query needs "
                           f"kernel keys of its residue class), got kernel={kernel}, dilation={dilation}")
    i = torch.arange(length, device=device)
    cls, pos = i % dilation, i // dilation
    n_cls = (length - 1 - cls) // dilation + 1  # positions in the query's residue class
    start = (pos - kernel // 2).clamp(min=0)
    start = torch.minimum(start, n_cls - kernel)
    return (start.unsqueeze(-1) + torch.arange(kernel, device=device)) * dilation + cls.unsqueeze(-1)


def neighborhood_index(grid: tuple[int, ...], kernel, dilation=1, device=None) -> torch.Tensor:
    """``(N, prod(kernel))`` the row-major key indices each query of ``grid`` attends (dilated
    neighbourhood attention, window shifted inward at borders)."""
    ker = per_axis(kernel, len(grid), "kernel")
    dil = per_axis(dilation, len(grid), "dilation")
    per = [axis_neighbors(g, k, d, device) for g, k, d in zip(grid, ker, dil)]  # (g_a, k_a)
    coords = _coords(grid, device)
    idx = torch.zeros(coords[0].shape[0], 1, dtype=torch.long, device=device)
    for c, p, g in zip(coords, per, grid):
        idx = (idx.unsqueeze(-1) * g + p[c].unsqueeze(1)).flatten(1)
    return idx


def flat_window_order(coords: torch.Tensor, window, axis: int = 0, shift=0) -> torch.Tensor:
    """FlatFormer's sort of points with integer ``coords (N, d)``: by window id (windows of ``window``
    cells, origin moved by ``-shift``), then along ``axis`` inside the window (the other axes break ties).
    Returns the permutation ``order`` (``x[order]`` is sorted); cut it into equal groups to attend."""
    if coords.dim() != 2 or coords.dtype.is_floating_point:
        raise AttnZooError(f"coords: expected an int tensor (N, d), got {tuple(coords.shape)} {coords.dtype}")
    d = coords.shape[1]
    if not 0 <= axis < d:
        raise AttnZooError(f"axis: expected 0 <= axis < {d}, got {axis}")
    win = torch.tensor(per_axis(window, d, "window"), device=coords.device)
    sh = torch.tensor(per_axis(shift, d, "shift"), device=coords.device)
    c = coords.long() - coords.long().min(0).values + sh
    wid, inner = c // win, c % win
    span = int(c.max()) + 2
    key = torch.zeros(c.shape[0], dtype=torch.long, device=c.device)
    for a in range(d):  # window id first (row-major over axes)
        key = key * span + wid[:, a]
    rest = [axis] + [a for a in range(d) if a != axis]
    for a in rest:  # then the chosen axis, then the others
        key = key * int(win[a]) + inner[:, a]
    return torch.argsort(key, stable=True)


def shifted_window_partition(x: torch.Tensor, window, shift=0) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups of :func:`window_ids` as full windows: ``(B, *grid, C)`` -> ``(B, n_windows, prod(window), C)``
    and the valid-token mask ``(n_windows, prod(window))``. The grid is zero-padded in front by
    ``window - shift`` (mod window) and at the end; padded tokens are invalid. Relative offsets between the
    valid tokens of a window are those of the grid (what a relative position bias reads)."""
    grid = tuple(x.shape[1:-1])
    win = per_axis(window, len(grid), "window")
    front = [(w - s) % w for w, s in zip(win, per_axis(shift, len(grid), "shift"))]
    spec = [p for f in reversed(front) for p in (f, 0)]
    xw, _ = window_partition(F.pad(x, [0, 0] + spec), win)
    ones = F.pad(torch.ones(1, *grid, 1, device=x.device), [0, 0] + spec)
    valid, _ = window_partition(ones, win)
    return xw, valid[0, ..., 0].bool()


def shifted_window_merge(windows: torch.Tensor, grid: tuple[int, ...], window, shift=0) -> torch.Tensor:
    """Inverse of :func:`shifted_window_partition`."""
    win = per_axis(window, len(grid), "window")
    front = [(w - s) % w for w, s in zip(win, per_axis(shift, len(grid), "shift"))]
    x = window_merge(windows, tuple(g + f for g, f in zip(grid, front)), win)
    return x[(slice(None),) + tuple(slice(f, None) for f in front)]
