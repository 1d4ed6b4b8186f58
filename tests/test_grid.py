"""Grid re-layout (attnzoo.grid) and the grid attention methods (window2d, neighborhood2d, tile3d, adaspa)
against references written from their definitions."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo import grid as G


def _qkv(n, heads=2, d=8, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _masked_ref(q, k, v, mask):
    """Dense attention under a bool (N, N) mask (float64)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


# ------------------------------------------------------------------ re-layout
@pytest.mark.parametrize("grid,window", [((8, 8), 4), ((7, 10), 3), ((4, 6, 5), (2, 3, 2))])
def test_window_partition_merge_roundtrip(grid, window):
    x = torch.randn(2, *grid, 3)
    w, valid = G.window_partition(x, window)
    assert int(valid.sum()) == torch.tensor(grid).prod()
    assert torch.equal(G.window_merge(w, grid, window), x)
    assert torch.equal(G.unflatten(G.flatten(x, grid), grid), x)


def test_cyclic_shift_inverts():
    x = torch.randn(1, 6, 7, 2)
    y = G.cyclic_shift(x, 2, dims=(1, 2))
    assert torch.equal(y[0, 0, 0], x[0, 2, 2])
    assert torch.equal(G.cyclic_shift(y, -2, dims=(1, 2)), x)


def _swin_region_mask(H, W, M, s):
    """Swin's explicit construction: roll by -s, partition into M×M windows, region ids by slices, roll back."""
    img = torch.zeros(H, W, dtype=torch.long)
    sl = (slice(0, -M), slice(-M, -s), slice(-s, None)) if s else (slice(None),)
    cnt = 0
    for hs in sl:
        for ws in sl:
            img[hs, ws] = cnt
            cnt += 1
    win = (torch.arange(H).view(-1, 1) // M) * W + torch.arange(W).view(1, -1) // M
    # token at shifted position (r', c') came from (r' + s, c' + s) mod H/W
    region = torch.roll(img, shifts=(s, s), dims=(0, 1)).reshape(-1)
    window = torch.roll(win, shifts=(s, s), dims=(0, 1)).reshape(-1)
    return (region[:, None] == region[None]) & (window[:, None] == window[None])


@pytest.mark.parametrize("H,W,M,s", [(8, 8, 4, 2), (12, 8, 4, 1), (6, 9, 3, 1), (8, 8, 4, 0)])
def test_shifted_window_mask_equals_explicit_region_id_mask(H, W, M, s):
    gid = G.window_ids((H, W), M, s)
    assert torch.equal(gid[:, None] == gid[None], _swin_region_mask(H, W, M, s))
    mm = G.window_mask_mod((H, W), M, s)
    idx = torch.arange(H * W)
    assert torch.equal(mm(0, 0, idx[:, None], idx[None]), _swin_region_mask(H, W, M, s))


def _natten_ref(L, k, d):
    """Per position, its keys on one axis written out the slow way: the positions of its residue class,
    the window of k centred on it, slid back inside the class at the ends."""
    out = []
    for i in range(L):
        cls = [j for j in range(L) if j % d == i % d]
        c = cls.index(i)
        start = min(max(c - k // 2, 0), len(cls) - k)
        out.append(cls[start:start + k])
    return torch.tensor(out)


@pytest.mark.parametrize("L,k,d", [(9, 3, 1), (10, 3, 2), (13, 5, 2), (7, 7, 1), (12, 3, 4)])
def test_axis_neighbors_follow_natten(L, k, d):
    assert torch.equal(G.axis_neighbors(L, k, d), _natten_ref(L, k, d))


def test_neighborhood_index_and_mask_mod_agree():
    grid, k, d = (9, 11), 3, 2
    idx = G.neighborhood_index(grid, k, d)
    assert idx.shape == (99, 9)
    dense = torch.zeros(99, 99, dtype=torch.bool)
    dense[torch.arange(99)[:, None], idx] = True
    n = torch.arange(99)
    assert torch.equal(G.neighborhood_mask_mod(grid, k, d)(0, 0, n[:, None], n[None]), dense)
    assert bool((dense.sum(-1) == k * k).all())


@pytest.mark.parametrize("pattern", [
    lambda: G.window_pattern((7, 10), 3, 1), lambda: G.neighborhood_pattern((9, 11), 3, 2),
    lambda: G.neighborhood_pattern((8, 8), 5, 1), lambda: G.tile3d_pattern((4, 6, 5), (2, 4, 3), 1),
    lambda: G.neighborhood_pattern((9, 11), 3, 2, tile=(2, 3)), lambda: G.neighborhood_pattern((13, 17), 5, 1, tile=4),
    lambda: G.neighborhood_pattern((5, 6, 7), 3, (1, 2, 1), tile=(2, 2, 3)),
    lambda: G.neighborhood_pattern((5, 6, 7), 3, 1)])
def test_sorted_pattern_runs_hold_every_key(pattern):
    p = pattern()
    n = p.order.shape[0]
    i = torch.arange(n)
    dense = p.mask_mod(0, 0, i[:, None], i[None])
    in_runs = torch.zeros_like(dense)
    for lo, hi in p.runs:
        in_runs |= (i[None] >= lo[:, None]) & (i[None] <= hi[:, None])
    assert not (dense & ~in_runs).any()
    assert torch.equal(torch.sort(p.order).values, i)


@pytest.mark.parametrize("grid,k,d,tile", [((9, 11), 3, 2, (2, 3)), ((13, 17), 5, 1, 4), ((13, 17), 5, 1, None),
                                           ((5, 6, 7), 3, (1, 2, 1), (2, 2, 3))])
def test_neighborhood_pattern_is_the_row_major_mask_sorted(grid, k, d, tile):
    p = G.neighborhood_pattern(grid, k, d, tile=tile)
    i = torch.arange(p.order.shape[0])
    row_major = G.neighborhood_mask_mod(grid, k, d)(0, 0, i[:, None], i[None])
    assert torch.equal(p.mask_mod(0, 0, i[:, None], i[None]), row_major[p.order][:, p.order])


def test_flat_window_order_groups_windows():
    g = torch.Generator().manual_seed(0)
    coords = torch.randint(0, 20, (200, 2), generator=g)
    order = G.flat_window_order(coords, 5, axis=1)
    c = coords[order]
    wid = (c[:, 0] // 5) * 100 + c[:, 1] // 5
    assert bool((wid[1:] >= wid[:-1]).all())  # sorted by window
    same = wid[1:] == wid[:-1]
    assert bool((c[1:, 1][same] >= c[:-1, 1][same]).all())  # then along the chosen axis


def test_grid_errors_name_the_argument():
    with pytest.raises(az.AttnZooError, match="grid"):
        G.check_grid((4, 0))
    with pytest.raises(az.AttnZooError, match="kernel"):
        G.axis_neighbors(5, 4)
    with pytest.raises(az.AttnZooError, match="kernel·dilation"):
        G.axis_neighbors(5, 3, 2)


# ---------------------------------------------------------------- methods
def _dense_for(method, grid, **kw):
    n = int(torch.tensor(grid).prod())
    i = torch.arange(n)
    if method == "window2d":
        mm = G.window_mask_mod(grid, kw["window"], kw.get("shift", 0))
    elif method == "neighborhood2d":
        mm = G.neighborhood_mask_mod(grid, kw["kernel"], kw.get("dilation", 1))
    else:
        t = kw.get("tile") or (1, grid[1], grid[2])
        mm = G.tile3d_mask_mod(grid, t, kw.get("ref_frames", 1))
    return mm(0, 0, i[:, None], i[None])


@pytest.mark.parametrize("method,grid,kw", [
    ("window2d", (8, 8), dict(window=4)), ("window2d", (8, 8), dict(window=4, shift=2)),
    ("window2d", (7, 10), dict(window=3, shift=1)), ("window2d", (5, 9), dict(window=(2, 4), shift=(1, 3))),
    ("neighborhood2d", (9, 11), dict(kernel=3, dilation=2)), ("neighborhood2d", (10, 7), dict(kernel=5)),
    ("neighborhood2d", (12, 12), dict(kernel=3, dilation=4)), ("neighborhood2d", (20, 23), dict(kernel=5)),
    ("tile3d", (4, 6, 5), dict(tile=(2, 4, 3), ref_frames=1)), ("tile3d", (5, 4, 4), dict(ref_frames=2)),
    ("tile3d", (3, 5, 6), dict(tile=(1, 2, 2), ref_frames=0)),
])
@pytest.mark.parametrize("block", [16, 64])
def test_grid_methods_equal_dense_masked_attention(method, grid, kw, block):
    n = int(torch.tensor(grid).prod())
    q, k, v = _qkv(n)
    out = az.attention(q, k, v, method=method, grid=grid, block=block, **kw)
    torch.testing.assert_close(out, _masked_ref(q, k, v, _dense_for(method, grid, **kw)))


@pytest.mark.parametrize("method,grid,kw", [
    ("window2d", (6, 7), dict(window=(6, 7))),  # one window covering the map, no shift
    ("neighborhood2d", (7, 7), dict(kernel=7)),  # kernel covering the grid
    ("neighborhood2d", (5, 5), dict(kernel=5, dilation=1)),
    ("tile3d", (4, 3, 5), dict(ref_frames=4)),  # r = T
])
def test_grid_methods_covering_the_grid_equal_global_attention(method, grid, kw):
    n = int(torch.tensor(grid).prod())
    q, k, v = _qkv(n, heads=3)
    out, lse = az.attention(q, k, v, method=method, grid=grid, return_lse=True, **kw)
    ref, ref_lse = az.attention(q, k, v, method="naive", return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype))


@pytest.mark.parametrize("method,kw", [("window2d", dict(window=3, shift=1)),
                                       ("neighborhood2d", dict(kernel=3, dilation=2))])
def test_grid_method_gradients_and_padding(method, kw):
    grid = (7, 9)
    q, k, v = _qkv(63, seed=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    pad = torch.ones(1, 63, dtype=torch.bool)
    pad[0, 5] = False
    mask = _dense_for(method, grid, **kw) & pad[0][None]
    out = az.attention(q, k, v, method=method, grid=grid, key_padding_mask=pad, **kw)
    ref = _masked_ref(q, k, v, mask)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("block", [8, 64])
def test_small_grids_run_dense_with_the_same_values_and_gradients(block):
    """A small grid whose layout reads most pairs runs one dense masked call (block 64 here), otherwise the
    block engine (block 8); both equal the dense reference in values and gradients, also with GQA."""
    from attnzoo.catalog.vision import _dense_mask
    grid, kw = (7, 9), dict(kernel=3, dilation=2)
    m = az.get("neighborhood2d", grid=grid, block=block, **kw)
    assert (_dense_mask(m, 63, torch.device("cpu"), torch.float64) is not None) == (block == 64)
    q, k, v = _qkv(63, heads=4, seed=2)
    k, v = k[:, :2], v[:, :2]  # GQA: two query heads per KV head
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = m(q, k, v)
    ref = _masked_ref(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), _dense_for("neighborhood2d", grid, **kw))
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)),
                    torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_neighborhood_on_a_wide_grid_reads_tiles_and_keeps_its_masks():
    grid, kw = (40, 37), dict(kernel=5, dilation=1, block=16)
    m = az.get("neighborhood2d", grid=grid, **kw)
    assert len(m.pattern(grid, None).runs) > 1  # the 2-D tile order was picked (rows would be one run)
    q, k, v = _qkv(40 * 37, heads=2, d=8)
    dense = _dense_for("neighborhood2d", grid, **kw)
    first, again = m(q, k, v), m(q, k, v)  # the second call runs on the masks kept by the first
    assert torch.equal(first, again)
    torch.testing.assert_close(first, _masked_ref(q, k, v, dense))
    pad = torch.ones(1, 40 * 37, dtype=torch.bool)
    pad[0, ::7] = False  # padding is not in the kept masks
    torch.testing.assert_close(m(q, k, v, key_padding_mask=pad), _masked_ref(q, k, v, dense & pad[0][None]))


@settings(max_examples=20, deadline=None)
@given(H=st.integers(3, 10), W=st.integers(3, 10), win=st.integers(1, 5), data=st.data())
def test_window2d_property(H, W, win, data):
    shift = data.draw(st.integers(0, win - 1))
    q, k, v = _qkv(H * W, heads=1, d=4, seed=H * 100 + W)
    out = az.attention(q, k, v, method="window2d", grid=(H, W), window=win, shift=shift, block=8)
    torch.testing.assert_close(out, _masked_ref(q, k, v, _dense_for("window2d", (H, W), window=win, shift=shift)))


def test_grid_method_errors():
    q, k, v = _qkv(30)
    with pytest.raises(az.UnsupportedError, match="grid"):
        az.attention(q, k, v, method="window2d")
    with pytest.raises(az.AttnZooError, match="grid"):
        az.attention(q, k, v, method="window2d", grid=(5, 5))
    with pytest.raises(az.AttnZooError, match="kernel"):
        az.get("neighborhood2d", kernel=4)
    with pytest.raises(az.AttnZooError, match="shift"):
        az.get("window2d", window=4, shift=4)
    with pytest.raises(az.AttnZooError, match="tile"):
        az.get("tile3d", tile=(0, 1, 1))
    with pytest.raises(az.UnsupportedError, match="Nq != Nk"):
        kk, vv = _qkv(36)[:2]
        az.attention(q[:, :, :25], kk, vv, method="window2d", grid=(6, 6))


# ------------------------------------------------------------------ AdaSpa
def test_adaspa_full_coverage_is_exact_and_mass_recall_reaches_coverage():
    q, k, v = _qkv(96, heads=2, d=8, seed=3)
    q = q * 3  # peaky rows: few blocks hold most mass
    for causal in (False, True):
        out = az.attention(q, k, v, method="adaspa", coverage=1.0, block=16, causal=causal)
        torch.testing.assert_close(out, az.attention(q, k, v, method="naive", causal=causal))
    m = az.get("adaspa", coverage=0.8, block=16)
    lay = m.search(q, k)
    _, lse_sparse = az.attention(q, k, v, method="block_sparse", layout=lay, return_lse=True)
    _, lse_full = az.attention(q, k, v, method="naive", return_lse=True)
    mass = (lse_sparse - lse_full).exp()  # per-row recalled mass
    # kept per query block: block mass >= coverage by construction (row masses average to it)
    per_block = mass.view(1, 2, -1, 16).mean(-1)
    assert bool((per_block >= 0.8 - 1e-9).all())
    assert lay.density() < 0.9


def test_adaspa_is_head_adaptive():
    q, k, v = _qkv(64, heads=2, d=8, seed=4)
    q[:, 0] *= 6  # head 0 peaky, head 1 flat
    lay = az.get("adaspa", coverage=0.9, block=16).search(q, k)
    kept = (lay.kv_blocks >= 0).sum((-1, -2))[0]
    assert int(kept[0]) < int(kept[1])
