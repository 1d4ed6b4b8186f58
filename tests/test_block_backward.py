"""The block kernel's backward (core/blockbackward.attend_blocks_backward, csrc/block_backward.cpp) against the
dense float64 reference and the generic executor's slot-by-slot backward.

Training through a layout whose forward runs on the block kernel (block_topk, vertical_slash, any block list or
shared token row without element masks) without a score_mod, or with a distance bias (ALiBi, a relative table,
a lowered user bias; fixed or learned: the kernel sums the biased scores' gradient per distance) and/or a soft
cap, runs this kernel's backward; every call where the extension is not built (``ATTNZOO_CPP=0``) keeps the slot
loop. Both dK/dV schedules are drawn: one work item per (batch row, KV head) from 8 pairs up, the key-major pass
below.
Seeds: each case draws from torch.Generator(seed).
"""

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnzoo as az
import attnzoo.core.blocksparse as bs
from attnzoo import mods
from attnzoo.core import blockbackward
from attnzoo.core.layout import BlockLayout, TokenLayout
from attnzoo.core.lowering import lower
from _sparse_ref import combine, modded_reference

pytestmark = pytest.mark.skipif(not blockbackward.available(),
                                reason="the block backward extension does not build here")


@contextmanager
def _kernel_calls():
    with mock.patch.object(bs.blockbackward, "attend_blocks_backward",
                           wraps=bs.blockbackward.attend_blocks_backward) as spy:
        yield spy


def _slot_loop():
    """The generic executor's backward (the same block-kernel forward)."""
    return mock.patch.object(bs.blockbackward, "applies", return_value=False)


def _qkv(B, Hq, Hkv, Nq, Nk, D, g, dtype=torch.float64):
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=dtype).requires_grad_()
                 for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))


def _mod(name, heads, g):
    """A score_mod the kernel recomputes."""
    if name == "table":
        return mods.relative_bias(torch.randn(heads, 9, generator=g))
    if name == "user":  # lowered to a distance bias (core/lowering.py)
        slopes = torch.rand(heads, generator=g, dtype=torch.float64)
        return lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx).abs().clamp(max=7)
    alibi = mods.alibi(mods.alibi_slopes(heads))
    return {None: None, "alibi": alibi, "softcap": mods.softcap(1.5),
            "alibi+softcap": mods.compose(alibi, mods.softcap(2.0))}[name]


def _lowered(score_mod, q, k):
    """A user function as the built-in mods it computes (what ``attnzoo.attention`` passes the engines)."""
    if score_mod is None:
        return None
    mod, factor, note = lower(score_mod, batch=q.shape[0], heads_q=q.shape[1], len_q=q.shape[2], len_k=k.shape[2],
                              dtype=q.dtype, device=q.device)
    assert factor == 1.0, note
    return mod


def _attend(q, k, v, layout, causal, pad, score_mod):
    return bs.attend(q, k, v, layout, scale=q.shape[-1] ** -0.5, causal=causal, key_padding_mask=pad,
                     score_mod=score_mod)


def _grads(q, k, v, w, wl, layout, causal, pad=None, score_mod=None):
    """Gradients of ``Σ out·w + Σ lse·wl`` (rows that see no key: their lse term left out)."""
    out, lse = _attend(q, k, v, layout, causal, pad, score_mod)
    loss = (out * w).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * wl).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _visible(layout: BlockLayout, Hq: int, causal: bool, pad) -> torch.Tensor:
    """The layout's element visibility ``(B|1, Hq, Nq, Nk)`` (∩ its mask_mod ∩ causal ∩ padding)."""
    bm = layout.block_mask()  # (Bl, Hl, nq, nkb)
    Hl = bm.shape[1]
    if Hl not in (1, Hq):
        bm = bm.repeat_interleave(Hq // Hl, 1)
    el = bm.repeat_interleave(layout.block_q, 2).repeat_interleave(layout.block_k, 3)
    el = el[:, :, :layout.len_q, :layout.len_k]
    if layout.mask_mod is not None:  # the mask_mod's head index is the layout's
        h = torch.arange(el.shape[1]) // (Hq // Hl if Hl not in (1, Hq) else 1) * (Hl > 1)
        el = el & layout.mask_mod(torch.arange(el.shape[0]).view(-1, 1, 1, 1), h.view(1, -1, 1, 1),
                                  torch.arange(layout.len_q).view(1, 1, -1, 1),
                                  torch.arange(layout.len_k).view(1, 1, 1, -1))
    return combine(el, causal=causal, len_q=layout.len_q, len_k=layout.len_k, key_padding_mask=pad)


def _assert_all_close(got, want, tol):
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r.double(), atol=tol, rtol=tol)


def _checkered(b, h, q_idx, kv_idx):
    """A mask_mod that hides some pairs of most blocks (and none of key 0's column)."""
    return ((q_idx * 3 + kv_idx * 5 + h + b) % 4 != 0) | (kv_idx == 0)


def _random_layout(g, Bl, Hl, Nq, Nk, bq, bk, density, causal, shuffle, masked=False):
    nq, nkb = -(-Nq // bq), -(-Nk // bk)
    mask = torch.rand(Bl, Hl, nq, nkb, generator=g) < density
    lay = BlockLayout.from_block_mask(mask, block_q=bq, block_k=bk, len_q=Nq, len_k=Nk)
    if masked:  # partial blocks: the mask_mod's elements (the fused forward, the kernel's element masks)
        lay = BlockLayout.from_candidates(lay.kv_blocks, _checkered, block_q=bq, block_k=bk, len_q=Nq, len_k=Nk,
                                          causal=causal)
    if shuffle:  # lists in any order: runs are merged only where adjacent in the list
        perm = torch.randperm(lay.kv_blocks.shape[-1], generator=g)
        partial = None if lay.partial is None else lay.partial[..., perm].contiguous()
        lay = BlockLayout(lay.kv_blocks[..., perm].contiguous(), bq, bk, Nq, Nk, partial, lay.mask_mod, lay.causal)
    return lay


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), hkv=st.integers(1, 3), groups=st.sampled_from([1, 2, 3]),
       heads=st.sampled_from(["one", "kv", "q"]), per_batch=st.booleans(), nq=st.integers(1, 70),
       nk=st.integers(1, 70), bq=st.sampled_from([4, 8, 16]), bk=st.sampled_from([2, 4, 8, 16]),
       density=st.floats(0.1, 1.0), causal=st.booleans(), padded=st.booleans(), shuffle=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 2**16),
       mod=st.sampled_from([None, None, "alibi", "table", "softcap", "alibi+softcap", "user"]))
def test_gradients_equal_the_dense_reference_and_the_slot_loop(B, hkv, groups, heads, per_batch, nq, nk, bq, bk,
                                                                density, causal, padded, shuffle, masked, seed,
                                                                mod):
    """Random block lists (shared, per KV head or per query head, per batch row, in any order, with partial
    blocks of a mask_mod or not), GQA, Nq != Nk (bottom-right causal alignment), key padding, short last blocks
    and the score mods the kernel recomputes: the kernel's gradients of out equal the dense float64 reference's,
    and with an lse gradient the slot loop's; both dK/dV schedules (B·Hkv below 8 and from 8 up) are drawn."""
    g = torch.Generator().manual_seed(seed)
    Hq = hkv * groups
    q, k, v = _qkv(B, Hq, hkv, nq, nk, 8, g)
    Hl = {"one": 1, "kv": hkv, "q": Hq}[heads]
    layout = _random_layout(g, B if per_batch else 1, Hl, nq, nk, bq, bk, density, causal, shuffle, masked)
    user_mod = _mod(mod, Hq, g)
    score_mod = _lowered(user_mod, q, k)
    pad = torch.rand(B, nk, generator=g) > 0.3 if padded else None
    w = torch.randn(B, Hq, nq, 8, generator=g, dtype=q.dtype)
    wl = torch.randn(B, Hq, nq, generator=g, dtype=q.dtype)
    path = bs.forward_path(q, k, v, layout, causal=causal, score_mod=score_mod)
    with _kernel_calls() as spy:
        got = _grads(q, k, v, w, 0 * wl, layout, causal, pad, score_mod)
    assert spy.called == (path in ("block kernel", "fused"))
    ref = modded_reference(q, k, v, _visible(layout, Hq, causal, pad), user_mod)
    _assert_all_close(got, torch.autograd.grad((ref * w).sum(), (q, k, v)), 1e-9)
    with_lse = _grads(q, k, v, w, wl, layout, causal, pad, score_mod)
    with _slot_loop():
        _assert_all_close(with_lse, _grads(q, k, v, w, wl, layout, causal, pad, score_mod), 1e-10)


@pytest.mark.parametrize("B,hkv", [(1, 2), (4, 2)])  # the key-major dK/dV pass, then one item per pair
@pytest.mark.parametrize("mod", [None, "alibi+softcap", "user"])
@pytest.mark.parametrize("padded", [False, True])
def test_token_layouts(B, hkv, mod, padded):
    """Token layouts on the kernel: vertical_slash (a block layout and a shared column row that skips the
    blocks' keys, merged by lse) and a random shared token row: gradients equal the slot loop's."""
    g = torch.Generator().manual_seed(7 + B)
    Hq, N = 2 * hkv, 150
    q, k, v = _qkv(B, Hq, hkv, N, N, 16, g)
    pad = torch.rand(B, N, generator=g) > 0.2 if padded else None
    score_mod = _mod(mod, Hq, g)
    w = torch.randn(B, Hq, N, 16, generator=g, dtype=q.dtype)
    cols = torch.randperm(N, generator=g)[:30].sort().values.view(1, 1, 1, -1)
    tokens = TokenLayout(cols, 16, N, N)

    def run():
        a = az.attention(q, k, v, method="vertical_slash", n_vertical=24, n_slash=4, block=16, last_q=16,
                         causal=True, key_padding_mask=pad, score_mod=score_mod, dense_below=0, dense_from=1.0)
        out, _ = _attend(q, k, v, tokens, True, pad, _lowered(score_mod, q, k))
        return torch.autograd.grad((a * w).sum() + (out * w).sum(), (q, k, v))

    with _kernel_calls() as spy:
        got = run()
    assert spy.call_count == 3  # vertical_slash's two layouts and the token row
    with _slot_loop():
        _assert_all_close(got, run(), 1e-10)


@pytest.mark.parametrize("B,hkv", [(1, 1), (8, 1)])
def test_long_keys_in_both_schedules(B, hkv):
    """Keys spanning several 512-key tiles of the key-major pass (one pair) and of one item per pair (8 pairs),
    with key padding, a bias and unsorted block lists: the slot loop's gradients."""
    g = torch.Generator().manual_seed(13)
    Hq, Nq, Nk = 2 * hkv, 300, 1300
    q, k, v = _qkv(B, Hq, hkv, Nq, Nk, 8, g)
    layout = _random_layout(g, 1, Hq, Nq, Nk, 32, 48, 0.3, True, True)
    pad = torch.rand(B, Nk, generator=g) > 0.1
    score_mod = _mod("alibi", Hq, g)
    w = torch.randn(B, Hq, Nq, 8, generator=g, dtype=torch.float64)
    wl = torch.randn(B, Hq, Nq, generator=g, dtype=torch.float64)
    with _kernel_calls() as spy:
        got = _grads(q, k, v, w, wl, layout, True, pad, score_mod)
    assert spy.called
    with _slot_loop():
        _assert_all_close(got, _grads(q, k, v, w, wl, layout, True, pad, score_mod), 1e-10)


def test_strided_expanded_and_empty_inputs():
    """Permuted and sliced q/k/v, heads expanded from one (stride 0), an expanded d_out, and an empty batch:
    the same gradients as contiguous copies (the kernel reads strided rows in place, copies overlapping ones)."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, N, D = 2, 4, 2, 96, 8
    layout = _random_layout(g, 1, Hkv, N, N, 16, 16, 0.5, True, False)
    base = torch.randn(B, N, Hq + 2 * Hkv, 2 * D, generator=g, dtype=torch.float64)
    q, k, v = (base[:, :, a:b, :D].permute(0, 2, 1, 3).detach().requires_grad_()
               for a, b in ((0, Hq), (Hq, Hq + Hkv), (Hq + Hkv, Hq + 2 * Hkv)))
    w = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    wl = torch.randn(B, Hq, N, generator=g, dtype=torch.float64)
    with _kernel_calls() as spy:
        got = _grads(q, k, v, w, wl, layout, True)
    assert spy.called
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    _assert_all_close(got, _grads(*copies, w, wl, layout, True), 1e-12)
    # one KV head expanded to two (stride 0), d_out a broadcast view
    k1, v1 = (torch.randn(B, 1, N, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    out, _ = _attend(q, k1.expand(B, Hkv, N, D), v1.expand(B, Hkv, N, D), layout, True, None, None)
    gq = torch.autograd.grad(out, (q, k1, v1), torch.ones(1, 1, 1, 1, dtype=torch.float64).expand(out.shape))
    out2, _ = _attend(q, k1.expand(B, Hkv, N, D).contiguous(), v1.expand(B, Hkv, N, D).contiguous(), layout, True,
                      None, None)
    _assert_all_close(gq, torch.autograd.grad(out2, (q, k1, v1), torch.ones_like(out2)), 1e-12)
    # an empty batch
    e = [torch.zeros(0, h, N, D, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv)]
    out, lse = _attend(*e, layout, True, None, None)
    assert all(x.shape == t.shape for x, t in zip(torch.autograd.grad(out.sum() + lse.sum(), e), e))


def test_float32():
    """float32 gradients match the float64 reference within float32 rounding."""
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, N = 1, 4, 2, 120
    layout = _random_layout(g, 1, Hq, N, N, 16, 8, 0.4, True, True)
    q, k, v = _qkv(B, Hq, Hkv, N, N, 16, g)
    score_mod = _mod("alibi+softcap", Hq, g)
    w = torch.randn(B, Hq, N, 16, generator=g, dtype=torch.float64)
    vis = _visible(layout, Hq, True, None)
    ref = torch.autograd.grad((modded_reference(q, k, v, vis, score_mod) * w).sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    with _kernel_calls() as spy:
        out, _ = _attend(q32, k32, v32, layout, True, None, score_mod)
        got = torch.autograd.grad((out * w.float()).sum(), (q32, k32, v32))
    assert spy.called
    _assert_all_close(got, ref, 2e-4)


def _learned(name, Hq, g):
    """``(make, tensor)``: a distance-bias mod over a tensor that needs a gradient, ``make(tensor)`` the mod."""
    if name == "alibi":
        return mods.alibi, mods.alibi_slopes(Hq).double().requires_grad_()
    if name == "shared table":
        return mods.relative_bias, torch.randn(9, generator=g, dtype=torch.float64).requires_grad_()
    table = torch.randn(Hq, 9, generator=g, dtype=torch.float64).requires_grad_()
    if name == "table+softcap":
        return (lambda t: mods.compose(mods.relative_bias(t), mods.softcap(2.0))), table
    return mods.relative_bias, table


@pytest.mark.parametrize("B,hkv", [(1, 2), (4, 2)])  # the key-major dK/dV pass (d_bias per run of query blocks),
@pytest.mark.parametrize("heads", ["one", "kv", "q"])  # then one item per pair
@pytest.mark.parametrize("masked", [False, True])
def test_learned_mods_on_the_kernel(B, hkv, heads, masked):
    """A distance bias whose tensor needs a gradient (learned ALiBi slopes, a relative table per head or shared,
    a table under a soft cap) runs the kernel, which sums the biased scores' gradient per distance: with GQA,
    Nq != Nk, key padding, unsorted lists (packed chunks), partial blocks (the fused forward) or not, layouts
    shared / per KV head / per query head, the gradients of q, k, v and the mod's tensor equal the dense float64
    reference's and (with an lse gradient) the slot loop's."""
    g = torch.Generator().manual_seed(17 + B)
    Hq, Nq, Nk = 2 * hkv, 70, 90
    q, k, v = _qkv(B, Hq, hkv, Nq, Nk, 8, g)
    layout = _random_layout(g, 1, {"one": 1, "kv": hkv, "q": Hq}[heads], Nq, Nk, 8, 8, 0.4, True, True, masked)
    pad = torch.rand(B, Nk, generator=g) > 0.2
    vis = _visible(layout, Hq, True, pad)
    w = torch.randn(B, Hq, Nq, 8, generator=g, dtype=torch.float64)
    wl = torch.randn(B, Hq, Nq, generator=g, dtype=torch.float64)

    def grads(make, table, wl):
        out, lse = _attend(q, k, v, layout, True, pad, make(table))
        loss = (out * w).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * wl).sum()
        return torch.autograd.grad(loss, (q, k, v, table))

    for name in ("alibi", "table", "shared table", "table+softcap"):
        make, table = _learned(name, Hq, g)
        with _kernel_calls() as spy:
            got = grads(make, table, 0 * wl)
        assert spy.called, name
        want = torch.autograd.grad((modded_reference(q, k, v, vis, make(table)) * w).sum(), (q, k, v, table))
        _assert_all_close(got, want, 1e-9)
        with_lse = grads(make, table, wl)
        with _slot_loop():
            _assert_all_close(with_lse, grads(make, table, wl), 1e-10)


@pytest.mark.parametrize("B,hkv", [(1, 2), (4, 2)])
def test_same_bits_at_any_thread_count(B, hkv):
    """1, 3 and 2 threads give bit-identical gradients, in both dK/dV schedules (block_topk with a soft cap and
    key padding, and with a learned table: its gradient too; vertical_slash's shared token row)."""
    g = torch.Generator().manual_seed(5)
    Hq, N = 3 * hkv, 230
    q, k, v = _qkv(B, Hq, hkv, N, N, 16, g)
    pad = torch.rand(B, N, generator=g) > 0.1
    w = torch.randn(B, Hq, N, 16, generator=g, dtype=torch.float64)
    table = torch.randn(Hq, 33, generator=g, dtype=torch.float64, requires_grad=True)

    def run():
        kw = dict(method="block_topk", block=16, topk=4, causal=True, key_padding_mask=pad, dense_below=0,
                  dense_from=1.0)
        a = az.attention(q, k, v, score_mod=mods.softcap(3.0), **kw)
        t = az.attention(q, k, v, score_mod=mods.relative_bias(table), **kw)
        b = az.attention(q, k, v, method="vertical_slash", n_vertical=24, n_slash=4, block=16, last_q=16,
                         causal=True, dense_below=0, dense_from=1.0)
        return torch.autograd.grad(((a + t + b) * w).sum(), (q, k, v, table))

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            with _kernel_calls() as spy:
                results.append(run())
            assert spy.call_count == 4
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, results[0]))
