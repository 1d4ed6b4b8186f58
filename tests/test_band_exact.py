"""Exact attention's backward on the band backward kernel (core/fused.attend_exact_backward, the causal-prefix
and full modes of csrc/band_backward.cpp) against the dense float64 reference.

Training exact / exact_tiled (the tiled engine) without a score_mod, or with one the kernel recomputes (a distance
bias and/or a soft cap after it, built-in or a lowered user function) whose tensors need no gradient, runs the
kernel's backward: every query block reads keys from 0, all of them or up to each row's causal limit. A learned
table (a distance bias whose tensors need a gradient) runs there too: the kernel sums the biased scores' gradient
per distance and autograd pulls the sums back through the bias. Seeds: each case draws from torch.Generator(seed).
"""

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnzoo as az
import attnzoo.core.exact as ex
from attnzoo import mods
from attnzoo.core import fused
from attnzoo.core.exact import naive_attention, tiled_attention
from test_cpp_threads import _same_bits_at_1_3_2_threads

pytestmark = pytest.mark.skipif(not fused.band_backward_applies(*(torch.zeros(1, 1, 1, 1),) * 3),
                                reason="the band backward extension does not build here")


@contextmanager
def _kernel_calls():
    with mock.patch.object(ex, "attend_exact_backward", wraps=ex.attend_exact_backward) as spy:
        yield spy


def _qkv(B, Hq, Hkv, Nq, Nk, D, Dv, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, d, generator=g, dtype=dtype).requires_grad_()
                 for h, n, d in ((Hq, Nq, D), (Hkv, Nk, D), (Hkv, Nk, Dv)))


def _mod(name, heads, g, learned=False):
    """A score_mod: None, ALiBi, a relative table, a soft cap, ALiBi then a cap, or user functions the lowering
    turns into a table / a biased cap."""
    table = torch.randn(heads, 9, generator=g, dtype=torch.float64).requires_grad_(learned)
    alibi = mods.alibi(mods.alibi_slopes(heads))
    slopes = mods.alibi_slopes(heads).double()
    return {None: None, "alibi": alibi, "table": mods.relative_bias(table), "softcap": mods.softcap(1.5),
            "alibi+softcap": mods.compose(alibi, mods.softcap(2.0)),
            "user table": lambda s, b, h, q_idx, kv_idx: s + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4],
            "user alibi+cap": lambda s, b, h, q_idx, kv_idx: torch.tanh((s + slopes[h] * (kv_idx - q_idx)) / 2.5)
            * 2.5}[name]


def _loss_grads(out, lse, w, wl, inputs):
    """Gradients of ``Σ out·w + Σ lse·wl`` (rows that see no key: their lse term left out)."""
    loss = (out * w).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * wl).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _assert_all_close(got, want, tol):
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r.double(), atol=tol, rtol=tol)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), nq=st.integers(1, 150),
       nk=st.integers(1, 150), dv=st.sampled_from([8, 5]), causal=st.booleans(), padded=st.booleans(),
       shift=st.sampled_from([None, None, -7, 5]), seed=st.integers(0, 2**16),
       mod=st.sampled_from([None, "alibi", "table", "softcap", "alibi+softcap", "user table"]),
       learned=st.booleans())
def test_gradients_equal_the_dense_reference(B, hkv, groups, nq, nk, dv, causal, padded, shift, seed, mod, learned):
    """Over shapes (several query blocks of the kernel's 64 rows, one row, Nq != Nk), GQA, value widths, key
    padding (rows that see no key), the causal alignment (bottom-right, or the query positions shifted against
    the keys, as key-split callers pass them) and the mods the kernel recomputes, their tables fixed or
    learned: the kernel runs, and the gradients of (out, lse) equal the dense float64 reference's, the
    table's included."""
    hq = hkv * groups
    q, k, v = _qkv(B, hq, hkv, nq, nk, 8, dv, seed)
    g = torch.Generator().manual_seed(seed + 1)
    learned = learned and mod in ("table", "user table")
    score_mod = _mod(mod, hq, g, learned)
    inputs = (q, k, v) + ((_table(score_mod),) if learned else ())
    pad = torch.rand(B, nk, generator=g) > 0.3 if padded else None
    offset = None if shift is None else nk - nq + shift
    w, wl = torch.randn(B, hq, nq, dv, generator=g, dtype=q.dtype), torch.randn(B, hq, nq, generator=g,
                                                                               dtype=q.dtype)
    kw = dict(scale=0.3, causal=causal, key_padding_mask=pad, q_offset=offset)
    lowered = score_mod
    if mod == "user table":  # as attnzoo.attention hands it over: lowered to a distance bias
        from attnzoo.core.lowering import lower
        lowered, factor, note = lower(score_mod, batch=B, heads_q=hq, len_q=nq, len_k=nk, dtype=q.dtype,
                                      device=q.device)
        assert factor == 1.0 and note.startswith("lowered"), note
    with _kernel_calls() as spy:
        out, lse = tiled_attention(q, k, v, score_mod=lowered, **kw)
        got = _loss_grads(out, lse, w, wl, inputs)
    assert spy.called
    ref_out, ref_lse = naive_attention(q, k, v, score_mod=score_mod, **kw)
    _assert_all_close((out, lse), (ref_out, ref_lse), 1e-10)
    _assert_all_close(got, _loss_grads(ref_out, ref_lse, w, wl, inputs), 1e-9)


@pytest.mark.parametrize("method", ["exact", "exact_tiled"])
@pytest.mark.parametrize("mod", [None, "alibi", "table", "softcap", "alibi+softcap", "user table",
                                 "user alibi+cap"])
def test_methods_train_on_the_kernel(method, mod):
    """attnzoo.attention's exact methods in training, GQA with Nq != Nk and padding: the kernel runs the backward
    (exact without a mod is SDPA's own) with every built-in and lowerable user mod, and the gradients equal the
    dense reference's."""
    q, k, v = _qkv(2, 6, 2, 90, 130, 8, 8, seed=5)
    g = torch.Generator().manual_seed(6)
    score_mod = _mod(mod, 6, g)
    pad = torch.rand(2, 130, generator=g) > 0.2
    w = torch.randn(2, 6, 90, 8, generator=g, dtype=q.dtype)
    with _kernel_calls() as spy:
        out = az.attention(q, k, v, method=method, causal=True, key_padding_mask=pad, score_mod=score_mod)
        got = torch.autograd.grad((out * w).sum(), (q, k, v))
    assert spy.called == (method == "exact_tiled" or mod is not None)
    ref = naive_attention(q, k, v, scale=8 ** -0.5, causal=True, key_padding_mask=pad, score_mod=score_mod)[0]
    _assert_all_close(got, torch.autograd.grad((ref * w).sum(), (q, k, v)), 1e-9)


def _table(score_mod):
    return score_mod.table if hasattr(score_mod, "table") else score_mod.__closure__[0].cell_contents


@pytest.mark.parametrize("mod", ["table", "user table", "table+softcap", "shared table", "two tensors"])
def test_learned_tables_on_the_kernel(mod):
    """Tables that need a gradient (per head, shared by the heads, under a soft cap, a user function reading two
    learned tensors), GQA with Nq != Nk and padding: the kernel runs, and q, k, v and every table get the dense
    reference's gradients (a mod that reads its tensors other than through a distance bias keeps the eager
    tiled backward: test_mods)."""
    q, k, v = _qkv(2, 4, 2, 70, 90, 8, 8, seed=11)
    g = torch.Generator().manual_seed(12)
    table = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    score_mod = {"table": mods.relative_bias(table), "user table": _mod("user table", 4, g, learned=True),
                 "table+softcap": mods.compose(mods.relative_bias(table), mods.softcap(2.0)),
                 "shared table": mods.relative_bias(shared),
                 "two tensors": lambda s, b, h, q_idx, kv_idx: s + table[h, (kv_idx - q_idx).clamp(-4, 4) + 4]
                 * shared[(q_idx - kv_idx).clamp(-4, 4) + 4]}[mod]
    tables = {"shared table": (shared,), "two tensors": (table, shared)}.get(mod, (
        _table(score_mod) if mod == "user table" else table,))
    pad = torch.rand(2, 90, generator=g) > 0.2
    w = torch.randn(2, 4, 70, 8, generator=g, dtype=q.dtype)
    with _kernel_calls() as spy:
        out = az.attention(q, k, v, method="exact", causal=True, key_padding_mask=pad, score_mod=score_mod)
        got = torch.autograd.grad((out * w).sum(), (q, k, v) + tables)
    assert spy.called
    ref = naive_attention(q, k, v, scale=8 ** -0.5, causal=True, key_padding_mask=pad, score_mod=score_mod)[0]
    _assert_all_close(got, torch.autograd.grad((ref * w).sum(), (q, k, v) + tables), 1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision(dtype, tol):
    """float32 on the kernel as is, bfloat16 computed in float32: close to the float64 reference."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _qkv(1, 6, 2, 150, 170, 16, 16, seed=3))
    w = torch.randn(1, 6, 150, 16, generator=torch.Generator().manual_seed(4), dtype=dtype)
    score_mod = _mod("alibi+softcap", 6, None)
    with _kernel_calls() as spy:
        got = torch.autograd.grad((az.attention(q, k, v, method="exact", causal=True, score_mod=score_mod)
                                   * w).sum(), (q, k, v))
    assert spy.called and all(t.dtype == dtype for t in got)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_attention(q64, k64, v64, scale=16 ** -0.5, causal=True, score_mod=score_mod)[0]
    want = torch.autograd.grad((ref * w.double()).sum(), (q64, k64, v64))
    scale = max(float(r.abs().max()) for r in want)
    _assert_all_close([t / scale for t in got], [r / scale for r in want], tol)


@pytest.mark.parametrize("batch,kv_heads,causal", [(1, 1, True), (2, 4, False)])
def test_gradients_do_not_depend_on_the_thread_count(batch, kv_heads, causal):
    """1, 3 and 2 threads give the same bits: one KV head (its query blocks split into runs with their own
    dK/dV buffers over the keys they read, run in parallel) and 8 (batch, KV head) pairs (one item each)."""
    q, k, v = _qkv(batch, 3 * kv_heads, kv_heads, 300, 300, 16, 16, seed=12)
    w = torch.randn(batch, 3 * kv_heads, 300, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run():
        with _kernel_calls() as spy:
            out = az.attention(q, k, v, method="exact_tiled", causal=causal, score_mod=mods.softcap(3.0))
            got = torch.autograd.grad((out * w).sum(), (q, k, v))
        assert spy.called
        return got

    _same_bits_at_1_3_2_threads(run)


def test_a_wrong_causal_offset_or_bias_index_is_seen():
    """The reference comparisons above can fail: the kernel given the causal limit one key off, or the bias
    vector one distance off, gives other gradients."""
    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 40, 50, 8, 8, seed=2))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 2, 40, 8, generator=g, dtype=q.dtype)
    score_mod = mods.relative_bias(torch.randn(2, 9, generator=g, dtype=torch.float64))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(qg, kg, vg, scale=0.3, causal=True, score_mod=score_mod)
    want = torch.autograd.grad((out * w).sum(), (qg, kg, vg))
    hook = ex.ModHook(score_mod, like=q, grad=False, span=(-49, 39))
    rows = fused.distance_rows
    for off, shift in ((10, 0), (11, 0), (10, 1)):
        with mock.patch.object(fused, "distance_rows", lambda mod, d0, *a, **kw: rows(mod, d0 + shift, *a, **kw)):
            got = fused.attend_exact_backward(q, k, v, out.detach(), lse.detach(), w, None, scale=0.3, causal=True,
                                              offset=off, mod=hook)
        close = all(torch.allclose(a, b, atol=1e-9) for a, b in zip(got, want))
        assert close == (off == 10 and shift == 0), (off, shift)
