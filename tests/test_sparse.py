"""Block-sparse engine and static sparse methods against dense masked references (float64).

Seeds: inputs come from torch.Generator(seed) with the seed in each case id;
the autouse fixture in conftest.py also seeds the global RNG with 0.
"""

from unittest import mock

import pytest
import torch

import attnzoo as az
import attnzoo.core.blocksparse as bs
from attnzoo.core import blockkernel
from attnzoo.core.blocksparse import BlockLayout, TokenLayout, attend, attend_all
from attnzoo.checks import Problem
from _sparse_ref import assert_matches, band, combine, dilated, masked_reference, positions

# (batch, heads_q, heads_kv, len_q, len_k, dim): MHA, GQA, Nq < Nk, Nq > Nk
SHAPES = [(1, 2, 2, 37, 37, 8), (2, 4, 2, 23, 41, 8), (1, 4, 1, 45, 30, 4)]
CASES = [(shape, causal, padded) for shape in SHAPES for causal in (False, True) for padded in (False, True)]


@pytest.fixture(params=["fused", "gathered", "generic"])
def path(request, monkeypatch):
    """Which executor runs forward passes: the fused CPU paths (block layouts on ``core.blockkernel`` where it
    builds), the same without that kernel (block layouts gathered for PyTorch's fused kernel), or the
    generic slot loop."""
    if request.param == "generic":
        monkeypatch.setattr(bs, "fused_applies", lambda *args: False)
    if request.param == "gathered":
        monkeypatch.setattr(blockkernel, "applies", lambda *args: False)
    return request.param


def _inputs(shape, seed, padded, dtype=torch.float64, path="generic"):
    """Seeded q, k, v and key padding; v is one wider than q/k except for the fused kernel (equal dims only)."""
    B, Hq, Hkv, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D + (path == "generic"), generator=g, dtype=dtype)
    pad = (torch.rand(B, Nk, generator=g) > 0.25) if padded else None
    return q, k, v, pad


# ------------------------------------------------------------------ A.2 definitions, stated densely
def _streaming(len_q, len_k, sinks, window, causal):
    _, j = positions(len_q, len_k)
    return band(len_q, len_k, window, causal) | (j < sinks)


def _strided(len_q, len_k, stride, local, causal):
    _, j = positions(len_q, len_k)
    return band(len_q, len_k, local, causal) | (j % stride == stride - 1)


def _shifted(len_q, len_k, heads, group):
    p, j = positions(len_q, len_k)
    out = []
    for h in range(heads):
        s = group // 2 if h >= heads // 2 else 0
        out.append((p + s) // group == (j + s) // group)
    return torch.stack(out)


STATIC = {
    "sliding_window": (dict(window=5, block=8), lambda nq, nk, h, c: band(nq, nk, 5, c)),
    "dilated_window": (dict(window=4, dilation=3, block=8), lambda nq, nk, h, c: dilated(nq, nk, 4, 3, c)),
    "streaming": (dict(sinks=3, window=6, block=8), lambda nq, nk, h, c: _streaming(nq, nk, 3, 6, c)),
    "strided": (dict(stride=5, local=4, block=8), lambda nq, nk, h, c: _strided(nq, nk, 5, 4, c)),
    "shifted_sparse": (dict(group=12, block=8), lambda nq, nk, h, c: _shifted(nq, nk, h, 12)),
}


@pytest.mark.parametrize("name", sorted(STATIC))
@pytest.mark.parametrize("shape,causal,padded", CASES)
def test_static_method_equals_dense_reference(name, shape, causal, padded, path):
    params, visible = STATIC[name]
    q, k, v, pad = _inputs(shape, seed=1, padded=padded, path=path)
    B, Hq, Hkv, Nq, Nk, D = shape
    out, lse = az.attention(q, k, v, method=name, causal=causal, key_padding_mask=pad, return_lse=True, **params)
    vis = combine(visible(Nq, Nk, Hq, causal), causal=causal, len_q=Nq, len_k=Nk, key_padding_mask=pad)
    assert_matches(out, lse, *masked_reference(q, k, v, vis))


@pytest.mark.parametrize("causal", [False, True])
def test_strided_with_stride_longer_than_the_keys_is_the_band(causal):
    """No key is a stride column when stride > Nk (defaults on short inputs): the band alone remains."""
    q, k, v, _ = _inputs((1, 2, 2, 20, 30, 8), seed=4, padded=False)
    out, lse = az.attention(q, k, v, method="strided", stride=64, local=4, block=8, causal=causal, return_lse=True)
    vis = combine(_strided(20, 30, 64, 4, causal), causal=causal, len_q=20, len_k=30)
    assert_matches(out, lse, *masked_reference(q, k, v, vis))


@pytest.mark.parametrize("shape,causal,padded", CASES)
def test_bigbird_equals_dense_reference(shape, causal, padded, path):
    q, k, v, pad = _inputs(shape, seed=2, padded=padded, path=path)
    B, Hq, Hkv, Nq, Nk, D = shape
    m = az.get("bigbird", window=4, n_global=3, n_random=2, block=8, seed=5)
    out, lse = m(q, k, v, causal=causal, key_padding_mask=pad, return_lse=True)
    p, j = positions(Nq, Nk)
    table = m.random_blocks(Problem(B, Hq, Hkv, Nq, Nk, D, D, 1.0), causal)
    rand = table[torch.arange(Nq).view(-1, 1) // 8, j // 8]
    vis = band(Nq, Nk, 4, causal) | (j < 3) | (p < 3) | rand
    vis = combine(vis, causal=causal, len_q=Nq, len_k=Nk, key_padding_mask=pad)
    assert_matches(out, lse, *masked_reference(q, k, v, vis))


def test_bigbird_random_blocks_are_seeded_and_sized():
    prob = Problem(1, 1, 1, 256, 256, 8, 8, 1.0)
    a = az.get("bigbird", n_random=3, block=16, seed=0).random_blocks(prob, causal=False)
    b = az.get("bigbird", n_random=3, block=16, seed=0).random_blocks(prob, causal=False)
    c = az.get("bigbird", n_random=3, block=16, seed=1).random_blocks(prob, causal=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(-1) == 3).all()


# ------------------------------------------------------------------ block_sparse and the engine
MASK_MODS = {
    "checker": lambda b, h, qi, kj: ((qi // 3 + kj // 5 + h) % 2) == 0,
    "document": lambda b, h, qi, kj: (qi // 10) == (kj // 7),
    "hash": lambda b, h, qi, kj: ((qi * 7 + kj * 3 + b * 5 + h) % 4) != 0,
    "prefix_lm": lambda b, h, qi, kj: kj < 9,
}


@pytest.mark.parametrize("mod", sorted(MASK_MODS))
@pytest.mark.parametrize("shape,causal,padded", CASES)
def test_block_sparse_mask_mod_equals_dense_reference(mod, shape, causal, padded, path):
    q, k, v, pad = _inputs(shape, seed=3, padded=padded, path=path)
    B, Hq, Hkv, Nq, Nk, D = shape
    fn = MASK_MODS[mod]
    out, lse = az.attention(q, k, v, method="block_sparse", mask_mod=fn, block=8, causal=causal,
                            key_padding_mask=pad, return_lse=True)
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(Hq).view(1, -1, 1, 1)
    qi = torch.arange(Nq).view(1, 1, -1, 1)
    kj = torch.arange(Nk).view(1, 1, 1, -1)
    vis = combine(fn(b, h, qi, kj), causal=causal, len_q=Nq, len_k=Nk, key_padding_mask=pad)
    assert_matches(out, lse, *masked_reference(q, k, v, vis))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [4, 16, 64])
def test_full_layout_equals_exact(causal, block, path):
    q, k, v, _ = _inputs((2, 4, 2, 50, 50, 8), seed=4, padded=False, path=path)
    full = BlockLayout.from_indices(torch.arange(-(-50 // block)).expand(1, 1, -(-50 // block), -1),
                                    block_q=block, block_k=block, len_q=50, len_k=50)
    out, lse = az.attention(q, k, v, method="block_sparse", layout=full, causal=causal, return_lse=True)
    ref, ref_lse = az.attention(q, k, v, method="exact", causal=causal, return_lse=True)
    assert_matches(out, lse, ref, ref_lse)


@pytest.mark.parametrize("heads", ["shared", "kv", "query"])
@pytest.mark.parametrize("causal", [False, True])
def test_random_block_layouts_equal_dense_reference(heads, causal, path):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 29, 43, 8
    q, k, v, pad = _inputs((B, Hq, Hkv, Nq, Nk, D), seed=5, padded=path == "generic", path=path)
    g = torch.Generator().manual_seed(6)
    hl = {"shared": 1, "kv": Hkv, "query": Hq}[heads]
    bq, bk = 8, 5
    nq, nkb = -(-Nq // bq), -(-Nk // bk)
    blocks = torch.randint(-1, nkb, (B, hl, nq, 6), generator=g)
    lay = BlockLayout.from_indices(blocks, block_q=bq, block_k=bk, len_q=Nq, len_k=Nk)
    out, lse = attend(q, k, v, lay, scale=D ** -0.5, causal=causal, key_padding_mask=pad)
    dense = torch.zeros(B, hl, nq, nkb, dtype=torch.bool)
    for idx in zip(*torch.nonzero(blocks >= 0, as_tuple=True)):
        dense[idx[0], idx[1], idx[2], blocks[idx]] = True
    vis = dense.repeat_interleave(bq, 2)[:, :, :Nq].repeat_interleave(bk, 3)[..., :Nk]
    vis = vis.repeat_interleave(Hq // hl, 1)
    vis = combine(vis, causal=causal, len_q=Nq, len_k=Nk, key_padding_mask=pad)
    assert_matches(out, lse, *masked_reference(q, k, v, vis))


@pytest.mark.parametrize("causal", [False, True])
def test_token_gather_merges_with_blocks_by_lse(causal, path):
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 32, 40, 8
    q, k, v, pad = _inputs((B, Hq, Hkv, Nq, Nk, D), seed=7, padded=path == "generic", path=path)
    lay = BlockLayout.from_indices(torch.tensor([[[[0], [1], [2], [3]]]]).expand(1, Hkv, 4, 1), block_q=8,
                                   block_k=8, len_q=Nq, len_k=Nk)
    cols = torch.tensor([0, 3, 9, 17, 30, 39])
    tok = TokenLayout(cols.expand(1, Hkv, 4, -1).contiguous(), 8, Nq, Nk, slot=4).excluding(lay)
    out, lse = attend_all(q, k, v, [lay, tok], scale=D ** -0.5, causal=causal, key_padding_mask=pad)
    _, j = positions(Nq, Nk)
    vis = (torch.arange(Nq).view(-1, 1) // 8 == j // 8) | torch.isin(j, cols)
    vis = combine(vis, causal=causal, len_q=Nq, len_k=Nk, key_padding_mask=pad)
    assert_matches(out, lse, *masked_reference(q, k, v, vis))


def test_empty_rows_give_zero_and_minus_inf():
    q, k, v, _ = _inputs((1, 2, 2, 16, 16, 4), seed=8, padded=False)
    pad = torch.zeros(1, 16, dtype=torch.bool)
    out, lse = az.attention(q, k, v, method="sliding_window", window=3, block=4, key_padding_mask=pad,
                            return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_half_precision_runs_in_float32():
    q, k, v, _ = _inputs((1, 2, 2, 40, 40, 16), seed=9, padded=False, dtype=torch.float32)
    out = az.attention(q.half(), k.half(), v.half(), method="sliding_window", window=8, block=16, causal=True)
    ref = az.attention(q, k, v, method="sliding_window", window=8, block=16, causal=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=5e-3, rtol=5e-3)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("causal", [False, True])
def test_executor_gradcheck(causal):
    q, k, v, pad = _inputs((1, 2, 1, 7, 9, 2), seed=10, padded=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lay = BlockLayout.from_mask_mod(MASK_MODS["hash"], batch=1, heads=2, len_q=7, len_k=9, block=3, causal=causal)
    tok = TokenLayout(torch.tensor([[[[0, 5, 8], [2, 7, -1], [1, 3, 6]]]]), group=3, len_q=7, len_k=9, slot=2)
    for layout in (lay, tok):
        assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, layout, scale=0.6, causal=causal,
                                                               key_padding_mask=pad), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("name", ["sliding_window", "strided", "shifted_sparse"])
def test_method_gradients_match_dense_reference(name):
    params, visible = STATIC[name]
    shape = (2, 4, 2, 30, 30, 8)
    q, k, v, pad = _inputs(shape, seed=11, padded=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = az.attention(q, k, v, method=name, causal=True, key_padding_mask=pad, return_lse=True, **params)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v))
    vis = combine(visible(30, 30, 4, True), causal=True, len_q=30, len_k=30, key_padding_mask=pad)
    ro, rl = masked_reference(q, k, v, vis)
    ref = torch.autograd.grad((ro * w).sum() + rl.sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------ bad input
def test_bad_mask_mod_signature_and_output():
    with pytest.raises(az.AttnZooError, match="mask_mod"):
        az.get("block_sparse", mask_mod=lambda q, k: q < k)
    with pytest.raises(az.AttnZooError, match="mask_mod"):
        az.get("block_sparse", mask_mod="causal")
    q = k = v = torch.randn(1, 1, 16, 4)
    with pytest.raises(az.AttnZooError, match="mask_mod.*bool"):
        az.attention(q, k, v, method="block_sparse", mask_mod=lambda b, h, qi, kj: (qi - kj).float(), block=8)
    with pytest.raises(az.AttnZooError, match="mask_mod.*layout|layout.*mask_mod"):
        az.get("block_sparse")


def test_bad_layouts():
    q = k = v = torch.randn(1, 2, 16, 4)
    with pytest.raises(az.AttnZooError, match="layout.kv_blocks"):
        BlockLayout(torch.zeros(1, 1, 3, 2, dtype=torch.long), 8, 8, 16, 16)  # 2 query blocks, not 3
    with pytest.raises(az.AttnZooError, match="layout.kv_blocks"):
        BlockLayout(torch.full((1, 1, 2, 1), 5, dtype=torch.long), 8, 8, 16, 16)  # block 5 of 2
    lay = BlockLayout.from_indices(torch.zeros(1, 1, 2, 1, dtype=torch.long), block_q=8, block_k=8, len_q=16,
                                   len_k=16)
    with pytest.raises(az.AttnZooError, match="len_q"):
        az.attention(q[:, :, :8], k, v, method="block_sparse", layout=lay)
    bad_heads = BlockLayout.from_indices(torch.zeros(1, 3, 2, 1, dtype=torch.long), block_q=8, block_k=8, len_q=16,
                                         len_k=16)
    with pytest.raises(az.AttnZooError, match="head dim"):
        az.attention(q, k, v, method="block_sparse", layout=bad_heads)
    with pytest.raises(az.AttnZooError, match="layout"):
        az.get("block_sparse", layout=torch.zeros(2, 2))
    causal_only = az.get("sliding_window", window=4, block=8).layouts(q, k, causal=True)[0]
    with pytest.raises(az.AttnZooError, match="causal"):
        az.attention(q, k, v, method="block_sparse", layout=causal_only, causal=False)


@pytest.mark.parametrize("name,param", [("sliding_window", "window"), ("streaming", "window"),
                                        ("dilated_window", "dilation"), ("strided", "stride"),
                                        ("strided", "local"), ("shifted_sparse", "group"), ("bigbird", "block"),
                                        ("sliding_window", "block")])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes_are_refused(name, param, value):
    with pytest.raises(az.AttnZooError, match=param):
        az.get(name, **{param: value})


# ------------------------------------------------------------------ pictures
def test_visible_keys_probe_matches_the_definition(tmp_path):
    from attnzoo.viz import show_layout, visible_keys

    vis = visible_keys("streaming", 64, causal=True, sinks=2, window=8, block=16)
    assert torch.equal(vis[0], combine(_streaming(64, 64, 2, 8, True), causal=True, len_q=64, len_k=64)[0, 0])
    q = torch.zeros(1, 1, 64, 4)
    lay = az.get("sliding_window", window=5, block=16).layouts(q, q, causal=False)[0]
    assert torch.equal(visible_keys(lay, causal=False)[0], band(64, 64, 5, False))
    png = show_layout("bigbird", 64, path=tmp_path / "bb.png", window=4, n_global=2, block=8)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unpadded_forward_passes_take_the_fused_kernel():
    """Any layout, not only banded ones: a dynamic method's scattered blocks and per-head tokens."""
    q, k, v, _ = _inputs((1, 4, 2, 96, 96, 8), seed=12, padded=False, path="fused")
    params = dict(block=16, n_vertical=8, n_slash=2)
    lays = az.get("vertical_slash", **params).layouts(q, k, causal=True)
    assert [bs.forward_path(q, k, v, lay, causal=True) for lay in lays] == (
        ["block kernel"] * 2 if blockkernel.available() else ["fused", "token union"])
    out = az.attention(q, k, v, method="vertical_slash", causal=True, **params)
    with mock.patch.object(bs, "fused_applies", return_value=False):
        generic = az.attention(q, k, v, method="vertical_slash", causal=True, **params)
    torch.testing.assert_close(out, generic, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("jumps", [(0.5, 3.0), (25.0, 0.0), (120.0, -60.0), (-30.0, 95.0)])
def test_block_kernel_one_pass_softmax_when_the_row_maximum_grows(dtype, jumps):
    """The block kernel's one-pass step keeps a row's maximum while later key chunks stay within e^20 of it,
    rescales by one multiply past that, and redoes a chunk from its scores past e^80 (its weights may have
    overflowed): rows whose later chunks (key block 8 left out, so the chunks are keys 0-511, 576-1087 and
    1088-1535) score far above or below the first (``jumps``: the score offsets of the second and third chunk)
    equal the float64 reference."""
    if not blockkernel.available():
        return  # the extension did not build here
    g = torch.Generator().manual_seed(5)
    nq, nk, D = 96, 1536, 8
    q = torch.randn(1, 2, nq, D, generator=g, dtype=torch.float64) * 0.3
    k = torch.randn(1, 1, nk, D, generator=g, dtype=torch.float64) * 0.3
    v = torch.randn(1, 1, nk, D, generator=g, dtype=torch.float64)
    q[..., 0] = 1.0
    k[:, :, 576:1088, 0], k[:, :, 1088:, 0] = jumps  # channel 0: a per-chunk score offset
    blocks = torch.cat([torch.arange(8), torch.arange(9, nk // 64)]).view(1, 1, 1, -1).expand(1, 1, 2, -1)
    lay = BlockLayout.from_indices(blocks.contiguous(), block_q=64, block_k=64, len_q=nq, len_k=nk)
    assert bs.forward_path(q, k, v, lay, causal=False) == "block kernel"
    out, lse = attend(q.to(dtype), k.to(dtype), v.to(dtype), lay, scale=1.0, causal=False)
    read = torch.ones(1, 1, nq, nk, dtype=torch.bool)
    read[..., 512:576] = False
    ref, ref_lse = masked_reference(q, k, v, read, scale=1.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol * 100, rtol=tol)


def _shared_tokens(hl, nq, nk, group, seed, n_tok=40, skip_hl=None, sort=True):
    """A shared token row per layout head (unsorted when not ``sort``, a few -1 slots) and, with ``skip_hl``
    layout heads, a random block layout of 8-key blocks whose tokens the groups skip."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.stack([torch.randperm(nk, generator=g)[:min(n_tok, nk)] for _ in range(hl)]).view(1, hl, 1, -1)
    tok = torch.sort(tok, -1).values if sort else tok
    tok[..., 1] = -1
    lay = TokenLayout(tok.contiguous(), group, nq, nk)
    if skip_hl is None:
        return lay
    ng, nkb = -(-nq // group), -(-nk // 8)
    blocks = torch.where(torch.rand(1, skip_hl, ng, nkb, generator=g) < 0.3, torch.arange(nkb), -1)
    return lay.excluding(BlockLayout.from_indices(blocks, block_q=group, block_k=8, len_q=nq, len_k=nk))


@pytest.mark.parametrize("heads", ["shared", "kv", "query"])
@pytest.mark.parametrize("causal,padded,skip,sort,nq,nk", [
    (True, False, True, True, 70, 90), (True, True, True, False, 64, 64), (False, True, False, True, 50, 30),
    (False, False, True, False, 90, 60), (True, False, False, False, 33, 100)])
def test_shared_token_rows_on_the_block_kernel_equal_the_dense_reference(heads, causal, padded, skip, sort, nq,
                                                                          nk):
    """A token row stored once for every query group (vertical columns), read from one packed copy per head,
    its ``skip`` blocks hidden, the causal diagonal in place: equal to the dense reference and to the generic
    executor on the per-group rows (sorted or not, GQA, Nq != Nk, key padding)."""
    q, k, v = _inputs((1, 4, 2, nq, nk, 8), seed=nq + nk, padded=False, path="fused")[:3]
    hl = {"shared": 1, "kv": 2, "query": 4}[heads]
    lay = _shared_tokens(hl, nq, nk, 8, seed=nq, skip_hl=(4 if heads == "shared" else hl) if skip else None,
                         sort=sort)
    assert lay.shared and (lay.skip is not None) == skip
    pad = torch.rand(1, nk, generator=torch.Generator().manual_seed(3)) > 0.3 if padded else None
    assert bs.forward_path(q, k, v, lay, causal=causal) == ("block kernel" if blockkernel.available() else "fused")
    out, lse = attend(q, k, v, lay, scale=0.4, causal=causal, key_padding_mask=pad)
    rows = lay.per_group().kv_tokens  # (1, Hl', ng, T)
    member = torch.zeros(*rows.shape[:3], nk + 1, dtype=torch.bool).scatter_(-1, rows.clamp(min=-1) % (nk + 1), True)
    dense = member[..., :nk].repeat_interleave(8, 2)[:, :, :nq]
    vis = combine(dense.repeat_interleave(4 // dense.shape[1], 1), causal=causal, len_q=nq, len_k=nk,
                  key_padding_mask=pad)
    ref, ref_lse = masked_reference(q, k, v, vis, scale=0.4)
    assert_matches(out, lse, ref, ref_lse)
    with mock.patch.object(bs.blockkernel, "applies", return_value=False):
        gen, gen_lse = attend(q, k, v, lay, scale=0.4, causal=causal, key_padding_mask=pad)
    assert_matches(gen, gen_lse, ref, ref_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_shared_token_rows_with_a_distance_bias_read_each_token_in_place(causal):
    """Under a distance bias (ALiBi, + soft cap) a shared token row is read in place (no packed copy: each token
    at its own distance), its skip blocks hidden: equal to the generic executor in float64."""
    import attnzoo.mods as mods

    q, k, v = _inputs((1, 4, 2, 80, 80, 8), seed=4, padded=False, path="fused")[:3]
    lay = _shared_tokens(4, 80, 80, 16, seed=4, skip_hl=4)
    slopes = mods.alibi_slopes(4).double()
    for mod in (mods.alibi(slopes), mods.compose(mods.alibi(slopes), mods.softcap(5.0))):
        assert bs.forward_path(q, k, v, lay, causal=causal, score_mod=mod) == (
            "block kernel" if blockkernel.available() else "fused")
        out, lse = attend(q, k, v, lay, scale=0.3, causal=causal, score_mod=mod)
        with mock.patch.object(bs.blockkernel, "applies", return_value=False):
            ref, ref_lse = attend(q, k, v, lay, scale=0.3, causal=causal, score_mod=mod)
        assert_matches(out, lse, ref, ref_lse)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_shared_token_rows_count_what_each_group_reads(causal, skip):
    """``tokens_read`` of a shared row (a search in the sorted row, less the skipped blocks' tokens) equals the
    count of its per-group rows' tokens that each group's last row may see; the per-group form is one row per
    query group without ``skip``."""
    lay = _shared_tokens(3, 70, 90, 8, seed=9, skip_hl=3 if skip else None, sort=False)
    rows = lay.per_group()
    assert not rows.shared and rows.skip is None and rows.kv_tokens.shape[2] == 9
    last = (torch.arange(9) * 8 + 7).clamp(max=69) + 20
    limit = last + 1 if causal else torch.full_like(last, 90)
    want = ((rows.kv_tokens >= 0) & (rows.kv_tokens < limit.view(-1, 1))).sum(-1)
    assert torch.equal(lay.tokens_read(causal), want)
    assert torch.equal(rows.tokens_read(causal), want)


def test_token_layouts_refuse_a_wrong_group_count():
    with pytest.raises(az.AttnZooError, match=r"token_layout.kv_tokens: expected an int64 tensor \(Bl, Hl, 3 or 1"):
        TokenLayout(torch.zeros(1, 1, 2, 4, dtype=torch.long), 8, 20, 20)


def _dense_block_lse(q, k, block_k, scale, limit, pad):
    """The definition of :func:`blockkernel.block_lse` in float64: every score, masked, log-sum-exp per block."""
    B, Hq, R, _ = q.shape
    Nk = k.shape[2]
    s = q.double() @ k.double().repeat_interleave(Hq // k.shape[1], 1).transpose(-1, -2) * scale
    hide = torch.zeros(B, 1, R, Nk, dtype=torch.bool)
    if limit is not None:
        hide |= torch.arange(Nk) > limit.view(1, 1, -1, 1)
    if pad is not None:
        hide |= ~pad.view(B, 1, 1, Nk)
    s = s.masked_fill(hide, float("-inf"))
    nkb = -(-Nk // block_k)
    s = torch.nn.functional.pad(s, (0, nkb * block_k - Nk), value=float("-inf"))
    return s.view(B, Hq, R, nkb, block_k).logsumexp(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,block_k", [((1, 9, 3, 40, 700, 16), 64), ((2, 4, 4, 7, 333, 8), 32),
                                           ((1, 2, 1, 5, 50, 8), 7), ((1, 6, 2, 100, 1100, 4), 1000)])
@pytest.mark.parametrize("limited,padded", [(False, False), (True, False), (True, True)])
def test_block_lse_equals_the_dense_definition_on_both_paths(dtype, shape, block_k, limited, padded, monkeypatch):
    """block_topk's ``score="lse"`` estimate: the extension (work items of several rows per head, key chunks
    of whole blocks, a block far below or above the row's first chunk's maximum redone against its own) and the
    eager slabs equal the dense log-sum-exp per key block, -inf where a row sees no key (limits below 0 and past
    Nk, padding). float32 operands are rounded to bfloat16 on both paths: the reference rounds them too."""
    B, Hq, Hkv, R, Nk, D = shape
    g = torch.Generator().manual_seed(R + Nk)
    q = torch.randn(B, Hq, R, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype) * 2
    k[:, :, 3] *= 40  # a key whose score dwarfs its chunk's others: the blocks around it underflow against it
    k[:, :, -2] *= 60  # and one in the last chunk, far above the first chunk's maximum (overflow against it)
    limit = torch.randint(-3, Nk + 5, (R,), generator=g) if limited else None
    pad = torch.rand(B, Nk, generator=g) > 0.3 if padded else None
    if pad is not None:
        pad[:, :block_k] = False  # a whole padded block
    ref = _dense_block_lse(*((q, k) if dtype == torch.float64 else (q.bfloat16(), k.bfloat16())), block_k, 0.3,
                           limit, pad)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=1e-5)
    runs = {"extension": blockkernel.block_lse(q, k, block_k, scale=0.3, limit=limit, key_padding_mask=pad)}
    monkeypatch.setattr(blockkernel, "_LSE_SLAB", 7 * B * Hq * Nk)  # several slabs
    monkeypatch.setattr(blockkernel, "available", lambda: False)
    runs["eager"] = blockkernel.block_lse(q, k, block_k, scale=0.3, limit=limit, key_padding_mask=pad)
    for name, got in runs.items():
        assert got.dtype == dtype, name
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), name
        torch.testing.assert_close(got.double().nan_to_num(0, 0, 0), ref.nan_to_num(0, 0, 0), **tol, msg=name)
