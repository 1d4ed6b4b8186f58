"""The band backward kernel (core/fused.attend_band_backward, csrc/band_backward.cpp) against the dense float64
reference and the generic executor's slot-by-slot backward.

Training through a banded layout (sliding_window, dilated_window, a streaming window) without a score_mod, or
with a distance bias (ALiBi, a relative table, learned or not) and/or a soft cap, runs the band forward and this
kernel's backward; everything else (other mods, other layouts), and every call where the extension is not built
(``ATTNZOO_CPP=0``), keeps the slot loop. Seeds: each case draws from
torch.Generator(seed).
"""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnzoo as az
import attnzoo.core.blocksparse as bs
import attnzoo.core.exact as ex
from attnzoo import mods
from attnzoo.core import fused
from _sparse_ref import band, combine, dilated, modded_reference as _modded_reference
from test_cpp_threads import _same_bits_at_1_3_2_threads

pytestmark = pytest.mark.skipif(not fused.band_backward_applies(*(torch.zeros(1, 1, 1, 1),) * 3),
                                reason="the band backward extension does not build here")


def _qkv(B, Hq, Hkv, Nq, Nk, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g, dtype=dtype).requires_grad_()
                 for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))


@contextmanager
def _kernel_calls():
    with mock.patch.object(bs, "attend_band_backward", wraps=bs.attend_band_backward) as spy:
        yield spy


def _slot_loop():
    """The generic executor's backward (the same band forward)."""
    return mock.patch.object(bs, "band_backward_applies", return_value=False)


def _grads(q, k, v, w, wl, **kw):
    """Gradients of ``Σ out·w + Σ lse·wl`` (rows that see no key: their lse term left out)."""
    out, lse = az.attention(q, k, v, return_lse=True, **kw)
    loss = (out * w).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * wl).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _mod(name, heads, g):
    """A score_mod the kernel recomputes (None, ALiBi, a relative table, a soft cap, ALiBi then a cap)."""
    if name == "table":
        return mods.relative_bias(torch.randn(heads, 9, generator=g))
    alibi = mods.alibi(mods.alibi_slopes(heads))
    return {None: None, "alibi": alibi, "softcap": mods.softcap(1.5),
            "alibi+softcap": mods.compose(alibi, mods.softcap(2.0))}[name]


def _assert_all_close(got, want, tol):
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r.double(), atol=tol, rtol=tol)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), nq=st.integers(1, 60),
       nk=st.integers(1, 60), block=st.sampled_from([4, 8, 16]), window=st.integers(1, 24), causal=st.booleans(),
       dilation=st.sampled_from([1, 1, 2]), padded=st.booleans(), seed=st.integers(0, 2**16),
       mod=st.sampled_from([None, None, "alibi", "table", "softcap", "alibi+softcap"]))
def test_gradients_equal_the_dense_reference_and_the_slot_loop(B, hkv, groups, nq, nk, block, window, causal,
                                                                dilation, padded, seed, mod):
    """Over shapes, GQA, Nq != Nk (bottom-right causal alignment), key padding, dilated windows and the score
    mods the kernel recomputes (distance biases, soft caps): the kernel's gradients of out equal the dense
    float64 reference's, and with an lse gradient the slot loop's."""
    q, k, v = _qkv(B, hkv * groups, hkv, nq, nk, 8, seed)
    g = torch.Generator().manual_seed(seed + 1)
    score_mod = _mod(mod, hkv * groups, g)
    pad = torch.rand(B, nk, generator=g) > 0.3 if padded else None
    w, wl = torch.randn(B, hkv * groups, nq, 8, generator=g, dtype=q.dtype), torch.randn(B, hkv * groups, nq,
                                                                                       generator=g, dtype=q.dtype)
    kw = dict(method="dilated_window", window=window, dilation=2) if dilation == 2 else dict(
        method="sliding_window", window=window)
    kw.update(block=block, causal=causal, key_padding_mask=pad, score_mod=score_mod)
    with _kernel_calls() as spy:
        got = _grads(q, k, v, w, 0 * wl, **kw)
        path = bs.forward_path(q, k, v, az.get(kw["method"], **{x: kw[x] for x in ("window", "block")} | (
            {"dilation": 2} if dilation == 2 else {})).layouts(q, k, causal=causal)[0], causal=causal,
            score_mod=score_mod)
        # one query of a plain window is one exact call over its key span (no layout, tests/test_hf_decode.py)
        assert spy.called == (path == "band" and (nq > 1 or dilation == 2))
    vis = dilated(nq, nk, window, 2, causal) if dilation == 2 else band(nq, nk, window, causal)
    vis = combine(vis, causal=causal, len_q=nq, len_k=nk, key_padding_mask=pad)
    ref = _modded_reference(q, k, v, vis, score_mod)
    _assert_all_close(got, torch.autograd.grad((ref * w).sum(), (q, k, v)), 1e-9)
    with_lse = _grads(q, k, v, w, wl, **kw)
    with _slot_loop():
        _assert_all_close(with_lse, _grads(q, k, v, w, wl, **kw), 1e-10)


@pytest.mark.parametrize("mod", ["alibi", "table", "softcap", "alibi+softcap"])
@pytest.mark.parametrize("padded,dilation", [(False, 1), (True, 2)])
def test_each_mod_on_the_kernel(mod, padded, dilation):
    """Every mod the kernel recomputes, on GQA with Nq != Nk (special blocks at both ends): the kernel runs and
    its gradients of (out, lse) equal the slot loop's, those of out the dense float64 reference's."""
    q, k, v = _qkv(2, 6, 2, 45, 61, 8, seed=7)
    g = torch.Generator().manual_seed(8)
    score_mod = _mod(mod, 6, g)
    pad = torch.rand(2, 61, generator=g) > 0.2 if padded else None
    w, wl = torch.randn(2, 6, 45, 8, generator=g, dtype=q.dtype), torch.randn(2, 6, 45, generator=g, dtype=q.dtype)
    kw = dict(method="dilated_window", window=9, dilation=2) if dilation == 2 else dict(
        method="sliding_window", window=21)
    kw.update(block=8, causal=True, key_padding_mask=pad, score_mod=score_mod)
    with _kernel_calls() as spy:
        got = _grads(q, k, v, w, 0.0, **kw)
        with_lse = _grads(q, k, v, w, wl, **kw)
    assert spy.call_count == 2
    vis = dilated(45, 61, 9, 2, True) if dilation == 2 else band(45, 61, 21, True)
    vis = combine(vis, causal=True, len_q=45, len_k=61, key_padding_mask=pad)
    _assert_all_close(got, torch.autograd.grad((_modded_reference(q, k, v, vis, score_mod) * w).sum(), (q, k, v)),
                      1e-9)
    with _slot_loop():
        _assert_all_close(with_lse, _grads(q, k, v, w, wl, **kw), 1e-10)


@pytest.mark.parametrize("mod", [None, "alibi+softcap"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision(dtype, tol, mod):
    """float32 on the kernel as is, bfloat16 computed in float32: close to the float64 reference."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _qkv(1, 6, 2, 150, 170, 16, seed=3))
    w = torch.randn(1, 6, 150, 16, generator=torch.Generator().manual_seed(4), dtype=dtype)
    score_mod = _mod(mod, 6, None)
    with _kernel_calls() as spy:
        got = _grads(q, k, v, w, 0.0, method="sliding_window", window=40, block=32, causal=True, score_mod=score_mod)
    assert spy.called and all(g.dtype == dtype for g in got)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _modded_reference(q64, k64, v64, combine(band(150, 170, 40, True), causal=True, len_q=150, len_k=170),
                            score_mod)
    want = torch.autograd.grad((ref * w.double()).sum(), (q64, k64, v64))
    scale = max(float(r.abs().max()) for r in want)
    _assert_all_close([g / scale for g in got], [r / scale for r in want], tol)


@pytest.mark.parametrize("exact", [False, True])
def test_strided_permuted_and_expanded_inputs(exact):
    """q a transposed (B, N, H, D) buffer, k a batch-expanded view, v a slice of wider rows: the same gradients
    as contiguous copies, on the band layouts' kernel and its exact modes (test_band_exact.py)."""
    g = torch.Generator().manual_seed(9)
    q_base = torch.randn(2, 50, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k_base = torch.randn(1, 2, 60, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v_base = torch.randn(2, 2, 60, 16, generator=g, dtype=torch.float64, requires_grad=True)
    views = (q_base.transpose(1, 2), k_base.expand(2, -1, -1, -1), v_base[..., 3:11])
    copies = tuple(t.detach().contiguous().requires_grad_() for t in views)
    w = torch.randn(2, 4, 50, 8, generator=g, dtype=torch.float64)
    kw = dict(method="sliding_window", window=13, block=8, causal=True)
    if exact:
        kw = dict(method="exact", causal=True, score_mod=mods.compose(mods.alibi(mods.alibi_slopes(4)),
                                                                      mods.softcap(3.0)))
    spy_on = mock.patch.object(ex, "attend_exact_backward", wraps=ex.attend_exact_backward) if exact else \
        _kernel_calls()
    with spy_on as spy:
        got = _grads(*views, w, 0.0, **kw)
        want = _grads(*copies, w, 0.0, **kw)
    assert spy.call_count == 2
    _assert_all_close(got, want, 1e-12)
    base_grads = torch.autograd.grad(sum((t * torch.randn_like(t)).sum() for t in views), (q_base, k_base, v_base))
    assert [tuple(x.shape) for x in base_grads] == [(2, 50, 4, 8), (1, 2, 60, 8), (2, 2, 60, 16)]


@pytest.mark.parametrize("batch,kv_heads", [(1, 1), (2, 4)])
def test_gradients_do_not_depend_on_the_thread_count(batch, kv_heads):
    """The work items depend on the shapes only and run with single-threaded BLAS, so 1, 2 and 3 threads give
    the same bits: one KV head (its query blocks split into runs with their own dK/dV buffers, run in parallel)
    and 8 (batch, KV head) pairs (one item each). ``torch.set_num_threads`` also switches MKL's dynamic
    threading off, which used to change how MKL threaded the kernel's GEMMs."""
    q, k, v = _qkv(batch, 3 * kv_heads, kv_heads, 300, 300, 16, seed=12)
    w = torch.randn(batch, 3 * kv_heads, 300, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(method="sliding_window", window=50, block=16, causal=False, score_mod=mods.softcap(3.0))

    def run():
        with _kernel_calls() as spy:
            got = _grads(q, k, v, w, 0.0, **kw)
        assert spy.called
        return got

    _same_bits_at_1_3_2_threads(run)


@pytest.mark.parametrize("dilation", [1, 2])
def test_learned_mods_on_the_kernel_and_token_layouts_on_the_slot_loop(dilation):
    """A distance bias whose tensor requires grad (ALiBi slopes, a relative table per head or shared; alone or
    under a soft cap), GQA with Nq != Nk (special blocks at both ends) and key padding: the kernel runs and
    the mod's tensors get the dense reference's and the slot loop's gradients (the kernel sums the biased
    scores' gradient per distance). Non-band layouts run no band backward."""
    q, k, v = _qkv(2, 4, 2, 45, 61, 8, seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 4, 45, 8, generator=g, dtype=torch.float64)
    pad = torch.rand(2, 61, generator=g) > 0.2
    kw = dict(method="dilated_window", window=9, dilation=2) if dilation == 2 else dict(
        method="sliding_window", window=16)
    kw.update(block=8, causal=True, key_padding_mask=pad)
    vis = dilated(45, 61, 9, 2, True) if dilation == 2 else band(45, 61, 16, True)
    vis = combine(vis, causal=True, len_q=45, len_k=61, key_padding_mask=pad)
    for make, table in ((mods.alibi, mods.alibi_slopes(4).double()),
                        (mods.relative_bias, torch.randn(4, 9, generator=g, dtype=torch.float64)),
                        (mods.relative_bias, torch.randn(9, generator=g, dtype=torch.float64)),
                        (lambda t: mods.compose(mods.relative_bias(t), mods.softcap(2.0)),
                         torch.randn(4, 9, generator=g, dtype=torch.float64))):
        table.requires_grad_()
        with _kernel_calls() as spy:
            out = az.attention(q, k, v, score_mod=make(table), **kw)
            got = torch.autograd.grad((out * w).sum(), (q, k, v, table))
        assert spy.called
        want = torch.autograd.grad((_modded_reference(q, k, v, vis, make(table)) * w).sum(), (q, k, v, table))
        _assert_all_close(got, want, 1e-9)
        with _slot_loop():
            out = az.attention(q, k, v, score_mod=make(table), **kw)
            _assert_all_close(got, torch.autograd.grad((out * w).sum(), (q, k, v, table)), 1e-10)
    with _kernel_calls() as spy:
        az.attention(q, k, v, method="block_topk", causal=True, block=16).sum().backward()
    assert not spy.called


def test_without_the_extension_the_slot_loop_gives_the_same_gradients(tmp_path):
    """``ATTNZOO_CPP=0``: the kernel is not available and the slot loop serves (the same gradients)."""
    path = tmp_path / "grads.pt"
    script = (
        "import sys, torch, attnzoo as az\n"
        "from attnzoo.core import fused\n"
        "assert not fused.band_backward_applies(*(torch.zeros(1, 1, 1, 1),) * 3)\n"
        "g = torch.Generator().manual_seed(5)\n"
        "q, k, v = (torch.randn(2, 4, 70, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))\n"
        "out = az.attention(q, k, v, method='sliding_window', window=20, block=16, causal=True)\n"
        "torch.save((q, k, v, torch.autograd.grad(out.pow(2).sum(), (q, k, v))), sys.argv[1])\n")
    env = dict(os.environ, ATTNZOO_CPP="0", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
    q, k, v, want = torch.load(path)
    with _kernel_calls() as spy:
        out = az.attention(q, k, v, method="sliding_window", window=20, block=16, causal=True)
        got = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    assert spy.called
    _assert_all_close(got, want, 1e-10)
