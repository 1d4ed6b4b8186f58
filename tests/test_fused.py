"""The executor's fused fast paths (core/fused.py) against dense references and the generic executor.

The fast path serves CPU forward passes without padding; these tests check
that it is taken where it should be, that it agrees with the dense masked
reference (float64) over shapes, GQA ratios, Nq != Nk alignment and blocks,
and that it leaves everything else to the generic executor.
Seeds: each case draws its inputs from torch.Generator(seed) with the seed in the test.
"""

from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnzoo as az
import attnzoo.core.blocksparse as bs
from attnzoo.core import blockkernel, fused
from attnzoo.core.layout import band_plan
from attnzoo.core.blocksparse import BlockLayout, TokenLayout, attend
from _sparse_ref import assert_matches, band, combine, dilated, masked_reference, positions


def _qkv(B, Hq, Hkv, Nq, Nk, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype))


def _spy():
    """Patches the fast path with a mock that counts its calls (and still runs it)."""
    return mock.patch.object(bs, "attend_band", wraps=bs.attend_band)


def _generic():
    """Runs the generic slot-loop executor only (the reference the fused paths must agree with)."""
    return mock.patch.object(bs, "fused_applies", return_value=False)


@pytest.fixture
def band_calls():
    with _spy() as spy:
        yield spy


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), nq=st.integers(1, 70),
       nk=st.integers(1, 70), block=st.sampled_from([4, 8, 16]), window=st.integers(1, 24), causal=st.booleans(),
       method=st.sampled_from(["sliding_window", "dilated_window", "streaming"]), padded=st.booleans())
def test_banded_methods_equal_dense_reference(B, hkv, groups, nq, nk, block, window, causal, method, padded):
    q, k, v = _qkv(B, hkv * groups, hkv, nq, nk, 8, seed=nq * 100 + nk)
    pad = torch.rand(B, nk, generator=torch.Generator().manual_seed(nk)) > 0.3 if padded else None
    params = {"sliding_window": dict(window=window), "dilated_window": dict(window=window, dilation=2),
              "streaming": dict(window=window, sinks=3)}[method]
    out, lse = az.attention(q, k, v, method=method, causal=causal, return_lse=True, block=block,
                            key_padding_mask=pad, **params)
    vis = {"sliding_window": lambda: band(nq, nk, window, causal),
           "dilated_window": lambda: dilated(nq, nk, window, 2, causal),
           "streaming": lambda: band(nq, nk, window, causal) | (positions(nq, nk)[1] < 3)}[method]()
    ref, ref_lse = masked_reference(q, k, v, combine(vis, causal=causal, len_q=nq, len_k=nk,
                                                      key_padding_mask=pad))
    assert_matches(out, lse, ref, ref_lse)


@pytest.mark.parametrize("method,params", [("sliding_window", dict(window=20)), ("streaming", dict(window=20)),
                                           ("dilated_window", dict(window=6, dilation=3))])
@pytest.mark.parametrize("nq", [200, 64, 5, 1])  # self-attention, a chunk of queries after a prefix, generation steps
@pytest.mark.parametrize("causal", [False, True])
def test_windows_take_the_fast_path(method, params, nq, causal, band_calls):
    """Windows shorter than the sequence are banded (tiny or degenerate ones may fall back; still exact)."""
    q, k, v = _qkv(1, 4, 2, nq, 200, 8, seed=7)
    out = az.attention(q, k, v, method=method, causal=causal, block=16, **params)
    # one query of a plain window: one exact call over its key spans instead (tests/test_hf_decode.py)
    assert band_calls.called != (nq == 1 and method != "dilated_window")
    with _generic():
        generic = az.attention(q, k, v, method=method, causal=causal, block=16, **params)
    torch.testing.assert_close(out, generic, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mod", ["alibi", "softcap", None])
@pytest.mark.parametrize("padded", [False, True])
def test_generation_steps_attend_their_real_rows_only(mod, padded, band_calls):
    """A step (fewer queries than a block) runs its rows, not a block of clamped copies, and stays exact."""
    q, k, v = _qkv(2, 4, 2, 3, 300, 8, seed=11)
    pad = (torch.arange(300) >= 7).expand(2, 300).clone() if padded else None
    score_mod = {"alibi": az.mods.alibi(torch.tensor([0.5, 0.25, 0.125, 0.0625])), "softcap": az.mods.softcap(2.0),
                 None: None}[mod]
    kw = dict(method="sliding_window", causal=True, window=40, block=16, key_padding_mask=pad, score_mod=score_mod)
    with mock.patch.object(fused, "fused_kernel", wraps=fused.fused_kernel) as kernel:
        out = az.attention(q, k, v, **kw)
    assert band_calls.called and kernel.called and all(c.args[0].shape[-2] == 3 for c in kernel.call_args_list)
    with _generic():
        generic = az.attention(q, k, v, **kw)
    torch.testing.assert_close(out, generic, atol=1e-10, rtol=1e-10)


def test_method_layouts_that_are_banded_and_those_that_are_not():
    q, k, _ = _qkv(1, 2, 2, 300, 300, 8, seed=0)
    for name, params in (("sliding_window", dict(window=40, block=16)),
                         ("dilated_window", dict(window=10, dilation=3, block=16))):
        for causal in (False, True):
            (lay,) = az.get(name, **params).layouts(q, k, causal=causal)
            plan = band_plan(lay, causal)
            assert plan is not None
            assert plan.width == int((lay.kv_blocks >= 0).sum(-1).max()), "windows as wide as the longest row"
            assert plan.special.numel() < plan.n_q // 2, "edges only: interior blocks share one mask"
    near, far = az.get("strided", stride=7, local=8, block=16).layouts(q, k, causal=True)
    assert band_plan(near, True) is not None  # the band with the stride columns near it; far ones are tokens
    (bigbird,) = az.get("bigbird", window=8, n_global=0, n_random=2, block=16).layouts(q, k, causal=True)
    assert band_plan(bigbird, True) is None  # random blocks leave gaps in the rows
    scattered = BlockLayout.from_indices(torch.tensor([[[[0, 2], [1, 3]]]]), block_q=8, block_k=8, len_q=16,
                                         len_k=32)
    assert band_plan(scattered, False) is None


def test_position_dependent_mask_makes_every_block_special_and_stays_exact(band_calls):
    """A banded layout whose element mask is not translation invariant: each block keeps its own mask."""
    q, k, v = _qkv(1, 2, 1, 50, 50, 8, seed=3)

    def mod(b, h, qi, kj):
        return ((qi - kj).abs() < 6) & ((qi * kj) % 3 != 1)

    lay = BlockLayout.from_mask_mod(mod, len_q=50, len_k=50, block=8)
    plan = band_plan(lay, False)
    assert plan is not None and plan.special.numel() > plan.n_q // 2
    out, lse = attend(q, k, v, lay, scale=8 ** -0.5, causal=False)
    qi, kj = torch.arange(50).view(-1, 1), torch.arange(50).view(1, -1)
    ref, ref_lse = masked_reference(q, k, v, mod(0, 0, qi, kj).expand(1, 1, 50, 50))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    assert band_calls.called


def test_rows_without_keys_are_zero_and_minus_inf(band_calls):
    """Nq > Nk, causal: the first queries sit before every key."""
    q, k, v = _qkv(1, 2, 2, 40, 20, 8, seed=4)
    out, lse = az.attention(q, k, v, method="sliding_window", window=4, block=8, causal=True, return_lse=True)
    assert band_calls.called
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20])) and torch.isneginf(lse[:, :, :20]).all()
    assert torch.isfinite(lse[:, :, 20:]).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_matches_the_generic_executor(dtype, tol, band_calls):
    q, k, v = _qkv(1, 4, 2, 200, 200, 16, seed=5, dtype=dtype)
    fast = az.attention(q, k, v, method="sliding_window", window=30, block=32, causal=True)
    assert band_calls.called and fast.dtype == dtype
    with _generic():
        slow = az.attention(q, k, v, method="sliding_window", window=30, block=32, causal=True)
    torch.testing.assert_close(fast.float(), slow.float(), atol=tol, rtol=tol)


def test_padded_windows_mask_each_batch_row(band_calls):
    """Key padding differs per batch row: the band path masks each row's windows, same result as generic."""
    q, k, v = _qkv(2, 2, 2, 30, 30, 8, seed=6)
    pad = torch.ones(2, 30, dtype=torch.bool)
    pad[0, -3:] = False
    pad[1, :9] = False  # the first queries of row 1 see only padding: (0, -inf)
    out, lse = az.attention(q, k, v, method="sliding_window", window=4, block=8, key_padding_mask=pad,
                            causal=True, return_lse=True)
    assert band_calls.called
    with _generic():
        ref, ref_lse = az.attention(q, k, v, method="sliding_window", window=4, block=8, key_padding_mask=pad,
                                    causal=True, return_lse=True)
    assert_matches(out, lse, ref, ref_lse, tol=1e-10)
    assert torch.isneginf(lse[1, :, :9]).all()


@pytest.mark.parametrize("method,params", [("sliding_window", dict(window=12)), ("streaming", dict(window=12)),
                                           ("vertical_slash", dict(n_vertical=6, n_slash=2))])
def test_training_runs_the_fused_forward_and_the_recomputing_backward(method, params):
    """Gradients of out and of lse (merged layouts) through a fused forward equal the generic executor's
    (whose gradients test_sparse.py checks against the dense reference)."""
    q, k, v = _qkv(2, 4, 2, 70, 70, 8, seed=11)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    paths, route = [], bs._route

    def recording(*args):
        paths.append(route(*args)[0])
        return route(*args)

    with mock.patch.object(bs, "_route", recording):
        out, lse = az.attention(q, k, v, method=method, causal=True, block=16, return_lse=True, **params)
    assert paths and "slot loop" not in paths, "every layout's forward is fused"
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v))
    with _generic():
        ro, rl = az.attention(q, k, v, method=method, causal=True, block=16, return_lse=True, **params)
    torch.testing.assert_close(out, ro, atol=1e-10, rtol=1e-10)
    ref = torch.autograd.grad((ro * w).sum() + rl.sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_shared_token_sets_take_the_fused_path_and_equal_dense_reference(causal):
    """Every query group reads the same keys (sinks, global tokens): one dense attention over them."""
    q, k, v = _qkv(2, 6, 2, 45, 60, 8, seed=8)
    keys = torch.tensor([0, 1, 2, 7, 33, 59])
    lay = TokenLayout(keys.expand(1, 1, 6, -1), 8, 45, 60, lambda b, h, qi, kj: (qi + kj) % 4 != 0)
    with mock.patch.object(bs, "attend_token_union", wraps=bs.attend_token_union) as spy:
        out, lse = attend(q, k, v, lay, scale=0.3, causal=causal)
    assert spy.called
    qi, kj = torch.arange(45).view(-1, 1), torch.arange(60).view(1, -1)
    vis = combine(torch.isin(kj, keys) & ((qi + kj) % 4 != 0), causal=causal, len_q=45, len_k=60)
    assert_matches(out, lse, *masked_reference(q, k, v, vis, scale=0.3))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_interior_rows_run_in_narrower_sub_blocks(causal, padded, band_calls):
    """Block 128, window 100: the kernel runs sub-blocks of 32 or 64 rows over the columns they see."""
    q, k, v = _qkv(2, 2, 1, 900, 900, 8, seed=9)
    pad = torch.rand(2, 900, generator=torch.Generator().manual_seed(9)) > 0.2 if padded else None
    m = az.get("sliding_window", window=100, block=128)
    (lay,) = m.layouts(q, k, causal=causal)
    plan = band_plan(lay, causal)
    assert len(plan.parts) > 1 and all(p.cols < plan.window for p in plan.parts)
    out, lse = m(q, k, v, causal=causal, return_lse=True, key_padding_mask=pad)
    assert band_calls.called
    ref, ref_lse = masked_reference(q, k, v, combine(band(900, 900, 100, causal), causal=causal, len_q=900,
                                                      len_k=900, key_padding_mask=pad))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-9, rtol=1e-9)


def test_layouts_that_read_nothing_give_zero_and_minus_inf():
    q, k, v = _qkv(1, 2, 1, 20, 30, 8, seed=10)
    nothing = [BlockLayout.from_indices(torch.full((1, 1, 3, 2), -1), block_q=8, block_k=8, len_q=20, len_k=30),
               TokenLayout(torch.full((1, 2, 3, 4), -1), 8, 20, 30),
               TokenLayout(torch.zeros(1, 1, 3, 0, dtype=torch.long), 8, 20, 30)]
    for lay in nothing:
        out, lse = attend(q, k, v, lay, scale=0.3, causal=False)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.sampled_from([1, 2]), nq=st.integers(1, 50),
       nk=st.integers(1, 50), bq=st.sampled_from([3, 8, 16]), bk=st.sampled_from([2, 5, 8]),
       heads=st.sampled_from(["shared", "kv", "query"]), slots=st.integers(1, 5), causal=st.booleans(),
       padded=st.booleans(), seed=st.integers(0, 2**16), engine=st.sampled_from(["block kernel", "fused"]))
def test_gathered_layouts_equal_dense_reference(B, hkv, groups, nq, nk, bq, bk, heads, slots, causal, padded,
                                                seed, engine):
    """Random scattered block layouts (no band): the block kernel (``core.blockkernel``, where it builds) and
    the gathered fused path against the dense reference."""
    if engine == "block kernel" and not blockkernel.available():
        return  # the extension did not build here
    hq = hkv * groups
    q, k, v = _qkv(B, hq, hkv, nq, nk, 8, seed=seed)
    hl = {"shared": 1, "kv": hkv, "query": hq}[heads]
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    blocks = torch.randint(-1, nkb, (B, hl, nqb, slots), generator=torch.Generator().manual_seed(seed))
    lay = BlockLayout.from_indices(blocks, block_q=bq, block_k=bk, len_q=nq, len_k=nk)
    pad = torch.rand(B, nk, generator=torch.Generator().manual_seed(seed)) > 0.3 if padded else None
    with mock.patch.object(bs.blockkernel, "applies", return_value=False) if engine == "fused" else nullcontext():
        assert bs.forward_path(q, k, v, lay, causal=causal) in (engine, "band")
        out, lse = attend(q, k, v, lay, scale=0.4, causal=causal, key_padding_mask=pad)
    dense = lay.block_mask().repeat_interleave(bq, 2)[:, :, :nq].repeat_interleave(bk, 3)[..., :nk]
    vis = combine(dense.repeat_interleave(hq // hl, 1), causal=causal, len_q=nq, len_k=nk, key_padding_mask=pad)
    ref, ref_lse = masked_reference(q, k, v, vis, scale=0.4)
    assert_matches(out, lse, ref, ref_lse)


@pytest.mark.parametrize("causal,padded,nq,nk", [(True, False, 1300, 1300), (True, True, 1000, 1300),
                                                  (False, True, 700, 1300)])
def test_block_kernel_packs_scattered_blocks_into_long_chunks(causal, padded, nq, nk):
    """Short scattered key blocks (8 keys, HiP's) are packed into chunks of up to 512 keys, a block split where a
    chunk fills; with the causal diagonal, key padding, GQA and Nq != Nk the kernel still equals the reference."""
    if not blockkernel.available():
        return  # the extension did not build here
    q, k, v = _qkv(1, 4, 2, nq, nk, 8, seed=31)
    g = torch.Generator().manual_seed(31)
    nqb, nkb = -(-nq // 64), -(-nk // 8)
    blocks = torch.stack([torch.randperm(nkb, generator=g)[:120] for _ in range(2 * nqb)]).view(1, 2, nqb, 120)
    blocks[..., :5] = torch.arange(5) * 3 + 1  # runs of one block and a ragged split across chunk boundaries
    lay = BlockLayout.from_indices(blocks, block_q=64, block_k=8, len_q=nq, len_k=nk)
    pad = torch.rand(1, nk, generator=g) > 0.2 if padded else None
    assert bs.forward_path(q, k, v, lay, causal=causal) == "block kernel"
    out, lse = attend(q, k, v, lay, scale=0.4, causal=causal, key_padding_mask=pad)
    dense = lay.block_mask().repeat_interleave(64, 2)[:, :, :nq].repeat_interleave(8, 3)[..., :nk]
    vis = combine(dense.repeat_interleave(2, 1), causal=causal, len_q=nq, len_k=nk, key_padding_mask=pad)
    ref, ref_lse = masked_reference(q, k, v, vis, scale=0.4)
    assert_matches(out, lse, ref, ref_lse)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.sampled_from([1, 2]), nq=st.integers(1, 40),
       nk=st.integers(1, 60), group=st.sampled_from([1, 4, 8]), heads=st.sampled_from(["shared", "kv", "query"]),
       pool=st.integers(1, 12), causal=st.booleans(), padded=st.booleans(), seed=st.integers(0, 2**16),
       masked=st.booleans(), kernel=st.booleans())
def test_token_layouts_equal_dense_reference(B, hkv, groups, nq, nk, group, heads, pool, causal, padded, seed,
                                             masked, kernel):
    """Rows drawn from a per-head pool (vertical columns): one dense attention over the union, any mask; without
    a mask_mod on the block kernel (one-key blocks) where it builds, or with it turned off."""
    hq = hkv * groups
    q, k, v = _qkv(B, hq, hkv, nq, nk, 8, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    hl = {"shared": 1, "kv": hkv, "query": hq}[heads]
    ng = -(-nq // group)
    cols = torch.randint(0, nk, (1, hl, 1, pool), generator=gen)
    rows = torch.where(torch.rand(1, hl, ng, pool, generator=gen) < 0.7, cols, torch.full_like(cols, -1))
    rows = torch.cat([rows, torch.randint(-1, nk, (1, hl, ng, 2), generator=gen)], -1)  # a few tokens off the pool
    dedup = torch.sort(rows, -1).values
    dedup[..., 1:] = torch.where(dedup[..., 1:] == dedup[..., :-1], -1, dedup[..., 1:])  # distinct per row
    mod = (lambda b, h, qi, kj: (qi + kj + h) % 5 != 0) if masked else None
    lay = TokenLayout(dedup, group, nq, nk, mod)
    pad = torch.rand(B, nk, generator=gen) > 0.3 if padded else None
    on_kernel = kernel and not masked and blockkernel.available()
    off = mock.patch.object(bs.blockkernel, "applies", return_value=False) if not kernel else nullcontext()
    with mock.patch("attnzoo.core.fused._CAUSAL_ROWS", 3), off:  # causal: row chunks of 3, each cut to its keys
        assert (bs.forward_path(q, k, v, lay, causal=causal) == "block kernel") == on_kernel
        out, lse = attend(q, k, v, lay, scale=0.4, causal=causal, key_padding_mask=pad)
    qi, kj = torch.arange(nq).view(-1, 1), torch.arange(nk).view(1, -1)
    member = torch.zeros(1, hl, ng, nk + 1, dtype=torch.bool)
    member.scatter_(-1, torch.where(dedup >= 0, dedup, nk), True)
    vis = member[..., :nk].repeat_interleave(group, 2)[:, :, :nq]
    if masked:
        vis = vis & ((qi + kj + torch.arange(hl).view(1, -1, 1, 1)) % 5 != 0)
    vis = combine(vis.repeat_interleave(hq // hl, 1), causal=causal, len_q=nq, len_k=nk, key_padding_mask=pad)
    ref, ref_lse = masked_reference(q, k, v, vis, scale=0.4)
    assert_matches(out, lse, ref, ref_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_token_layouts_with_a_distance_bias_on_the_block_kernel(causal):
    """A token layout with ALiBi (alone or with a soft cap) runs on the block kernel, each token at its own
    distance (no packing under a bias), equal to the fused path in float64."""
    import attnzoo.mods as mods

    if not blockkernel.available():
        return  # the extension did not build here
    q, k, v = _qkv(1, 4, 2, 300, 300, 16, seed=32)
    cols = torch.sort(torch.randint(0, 300, (1, 4, 10, 40), generator=torch.Generator().manual_seed(32)), -1).values
    cols[..., 1:] = torch.where(cols[..., 1:] == cols[..., :-1], -1, cols[..., 1:])  # distinct per row
    lay = TokenLayout(cols, 30, 300, 300)
    slopes = mods.alibi_slopes(4).double()
    for mod in (mods.alibi(slopes), mods.compose(mods.alibi(slopes), mods.softcap(5.0))):
        assert bs.forward_path(q, k, v, lay, causal=causal, score_mod=mod) == "block kernel"
        out, lse = attend(q, k, v, lay, scale=0.3, causal=causal, score_mod=mod)
        with mock.patch.object(bs.blockkernel, "applies", return_value=False):
            ref, ref_lse = attend(q, k, v, lay, scale=0.3, causal=causal, score_mod=mod)
        assert_matches(out, lse, ref, ref_lse)


def test_windows_read_a_cache_slice_in_place(band_calls):
    """K/V as the first n positions of a longer buffer (a KV cache): no copy of the cache, same result."""
    q, k, v = _qkv(1, 4, 2, 1, 300, 8, seed=12)
    buf_k, buf_v = torch.zeros(1, 2, 512, 8, dtype=k.dtype), torch.zeros(1, 2, 512, 8, dtype=v.dtype)
    buf_k[:, :, :300], buf_v[:, :, :300] = k, v
    for nq in (1, 40):
        qq = torch.randn(1, 4, nq, 8, dtype=q.dtype, generator=torch.Generator().manual_seed(nq))
        out = az.attention(qq, buf_k[:, :, :300], buf_v[:, :, :300], method="sliding_window", window=50,
                           block=16, causal=True)
        ref = az.attention(qq, k, v, method="sliding_window", window=50, block=16, causal=True)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert band_calls.called
