"""score_mod (attnzoo.mods), learnable sinks, packed varlen batches and pack/unpack.

References are dense float64 computations written out here (explicit bias matrices, explicit block-diagonal
masks), independent of the engines under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo import mods
from attnzoo.cache import KVCache

F64 = torch.float64
#: methods that equal exact attention with the mod (anchor: without cu_seqlens it is causal exact)
SCORE_MOD_METHODS = ["anchor", "exact", "exact_tiled", "flash_decode", "naive"]
#: layout methods (block-sparse executor) with small sizes, so their key sets are sparse at ~20 tokens
LAYOUT_MOD_METHODS = {
    "adaspa": dict(block=4, coverage=0.7), "bigbird": dict(window=2, n_global=2, n_random=1, block=4),
    "block_sparse": dict(mask_mod=lambda b, h, qi, kj: (qi + 2 * kj) % 3 != 0, block=4),
    "block_topk": dict(block=4, topk=2), "dilated_window": dict(window=3, dilation=2, block=4),
    "hip": dict(block=4, topk=2), "longheads": dict(block=4, chunks=2),
    "shifted_sparse": dict(group=6, block=4), "sliding_window": dict(window=3, block=4),
    "streaming": dict(sinks=2, window=3, block=4), "strided": dict(stride=3, local=2, block=4),
    "vertical_slash": dict(last_q=4, n_vertical=3, n_slash=2, sinks=1, block=4),
}


def qkv(B=2, Hq=4, Hkv=2, Nq=11, Nk=13, D=8, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, Hq, Nq, D, generator=g, dtype=F64), torch.randn(B, Hkv, Nk, D, generator=g, dtype=F64),
          torch.randn(B, Hkv, Nk, D, generator=g, dtype=F64)]
    return [t.requires_grad_(grad) for t in ts]


def dense(q, k, v, *, causal, bias=None, cap=None, sinks=None, mask=None):
    """Reference: explicit scores, the modification, the mask, softmax (with the sink in the denominator)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    Nq, Nk = q.shape[2], k.shape[2]
    vis = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        vis = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)
    if mask is not None:
        vis = vis & mask
    s = s.masked_fill(~vis, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
        v = torch.cat([v, torch.zeros_like(v[:, :, :1]).expand(*v.shape[:2], 1, v.shape[3])], dim=2)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return p @ v, lse


def distance(Nq, Nk):
    """``kv_idx - q_idx`` with bottom-right aligned query positions, ``(Nq, Nk)``."""
    return torch.arange(Nk)[None, :] - (torch.arange(Nq)[:, None] + Nk - Nq)


def assert_same_grads(out_a, out_b, tensors):
    w = torch.randn_like(out_a[0])
    ga = torch.autograd.grad((out_a[0] * w).sum() + out_a[1].nan_to_num(neginf=0).sum(), tensors, retain_graph=True)
    gb = torch.autograd.grad((out_b[0] * w).sum() + out_b[1].nan_to_num(neginf=0).sum(), tensors, retain_graph=True)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------- score_mod
@pytest.mark.parametrize("method", SCORE_MOD_METHODS)
@pytest.mark.parametrize("causal,Nq", [(True, 11), (False, 11), (True, 3)])
def test_helpers_match_dense_values_and_gradients(method, causal, Nq):
    if not causal and not az.info(method).supports.noncausal:
        pytest.skip(f"{method} is causal only")
    q, k, v = qkv(Nq=Nq)
    slopes = mods.alibi_slopes(4).to(F64)
    table = torch.randn(4, 9, dtype=F64, requires_grad=True)
    dist = distance(Nq, 13)
    params = {"exact_tiled": {"q_tile": 4, "k_tile": 5}, "flash_decode": {"splits": 3}}.get(method, {})
    cases = [  # (score_mod, reference arguments (built fresh per case), uses the table)
        (mods.alibi(slopes), lambda: dict(bias=slopes[:, None, None] * dist), False),
        (mods.softcap(1.5), lambda: dict(cap=1.5), False),
        (mods.relative_bias(table), lambda: dict(bias=table[:, dist.clamp(-4, 4) + 4]), True),
        (mods.compose(mods.relative_bias(table), mods.softcap(2.0)),
         lambda: dict(bias=table[:, dist.clamp(-4, 4) + 4], cap=2.0), True),
    ]
    for score_mod, ref, uses_table in cases:
        got = az.attention(q, k, v, method=method, causal=causal, score_mod=score_mod, return_lse=True, **params)
        want = dense(q, k, v, causal=causal, **ref())
        torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10)
        assert_same_grads(got, want, [q, k, v, table] if uses_table else [q, k, v])
        with torch.no_grad():  # inference: the mod runs inside the tiled engine's tiles
            fast = az.attention(q, k, v, method=method, causal=causal, score_mod=score_mod, return_lse=True,
                                **params)
        torch.testing.assert_close(fast[0], want[0].detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(fast[1], want[1].detach(), atol=1e-12, rtol=1e-10)


def test_gradient_reaches_a_tensor_the_mod_closes_over_through_a_computation():
    """The closed-over tensor may itself be computed from a parameter (not a leaf)."""
    q, k, v = qkv()
    raw = torch.randn(4, dtype=F64, requires_grad=True)
    slopes = torch.nn.functional.softplus(raw)

    def mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    got = az.attention(q, k, v, method="exact", score_mod=mod, return_lse=True)
    want = dense(q, k, v, causal=False, bias=-slopes[:, None, None] * distance(11, 13).abs())
    assert_same_grads(got, want, [raw, q])
    assert torch.autograd.grad(got[0].sum(), raw)[0].abs().sum() > 0


def test_score_mod_sees_batch_and_head_indices_and_decode_positions():
    q, k, v = qkv(grad=False, Nq=1)
    bias = torch.randn(2, 4, 1, 13, dtype=F64)
    got = az.attention(q, k, v, method="exact", causal=True,
                       score_mod=lambda s, b, h, qi, kj: s + bias[b, h, qi - 12, kj])
    torch.testing.assert_close(got, dense(q, k, v, causal=True, bias=bias)[0])


def test_score_mod_under_half_precision_and_no_grad_is_finite():
    q, k, v = (t.detach().to(torch.bfloat16) for t in qkv())
    with torch.no_grad():
        out = az.attention(q, k, v, method="exact", causal=True, score_mod=mods.softcap(5.0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_every_score_mod_method_is_tested():
    declared = {n for n, c in az.methods().items() if c.supports.score_mod}
    assert declared == set(SCORE_MOD_METHODS) | set(LAYOUT_MOD_METHODS) | set(REORDERED_MOD_METHODS)


#: methods that attend reordered tokens (hash buckets, clusters, grid patterns): (params, N, causal allowed)
REORDERED_MOD_METHODS = {
    "lsh": (dict(buckets=4, chunk=4, rounds=2), 16, True), "routing": (dict(clusters=3, block=4), 16, True),
    "bilevel_routing": (dict(regions=2, topk=1, grid=(4, 4)), 16, False),
    "window2d": (dict(window=2, block=4), 16, False), "neighborhood2d": (dict(kernel=3, block=4), 16, False),
    "tile3d": (dict(grid=(2, 2, 4), tile=(1, 2, 2), block=4), 16, False),
}


@settings(max_examples=18, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(REORDERED_MOD_METHODS)), B=st.integers(1, 2),
       heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), causal=st.booleans(), which=st.integers(0, 2),
       seed=st.integers(0, 50))
def test_reordered_methods_apply_score_mods_at_the_original_positions(name, B, heads, causal, which, seed):
    """Methods that sort or regroup tokens before the block-sparse executor (lsh, routing, bilevel_routing,
    the grid methods) apply the mod with the tokens' original positions (``scoremod.reordered``): equal to the
    dense float64 reference with the mod, restricted to the keys the method reads; values, lse and gradients
    to q, k, v and a learnable table."""
    params, N, causal_ok = REORDERED_MOD_METHODS[name]
    causal = causal and causal_ok
    q, k, v = qkv(B=B, Hq=heads[0], Hkv=heads[1], Nq=N, Nk=N, seed=seed)
    Hq = heads[0]
    method = az.get(name, **params)
    dist = distance(N, N)
    table = torch.randn(Hq, 7, dtype=F64, requires_grad=True)
    slopes = mods.alibi_slopes(Hq).to(F64)
    score_mod, ref = [
        (mods.relative_bias(table), dict(bias=table[:, dist.clamp(-3, 3) + 3])),
        (mods.compose(mods.alibi(slopes), mods.softcap(2.0)), dict(bias=slopes[:, None, None] * dist, cap=2.0)),
        (lambda s, b, h, qi, kj: s + table[h, (2 * qi + kj) % 7] - b,  # not a function of kv - q only
         dict(bias=table[:, (2 * torch.arange(N)[:, None] + torch.arange(N)[None, :]) % 7][None]
              - torch.arange(B, dtype=F64)[:, None, None, None])),
    ][which]
    vis = _visible(method, q, k, causal)
    got = method(q, k, v, causal=causal, score_mod=score_mod, return_lse=True)
    want = dense(q, k, v, causal=causal, mask=vis, **ref)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, table] if which != 1 else [q, k, v])


def _visible(method, q, k, causal, score_mod=None):
    """The keys ``method`` reads, ``(B, Hq, Nq, Nk)``: its output with one-hot values (the selection of a
    dynamic method depends on q, k and the mod only)."""
    B, Hkv, Nk, _ = k.shape
    eye = torch.eye(Nk, dtype=F64).expand(B, Hkv, Nk, Nk)
    with torch.no_grad():
        return method(q.detach(), k.detach(), eye, causal=causal, score_mod=score_mod) > 0


@settings(max_examples=24, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(LAYOUT_MOD_METHODS)), B=st.integers(1, 2), heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
       Nq=st.integers(1, 20), extra=st.integers(0, 6), causal=st.booleans(), which=st.integers(0, 2))
def test_layout_methods_apply_score_mods_like_the_dense_reference(name, B, heads, Nq, extra, causal, which):
    """Sparse methods with a score_mod equal the dense float64 reference with the same mod restricted to the
    keys the method reads: values, lse, and gradients to q, k, v and a learnable bias table."""
    cls = az.methods()[name]
    causal = causal or not cls.supports.noncausal
    Nk = Nq + extra if causal else max(1, Nq + extra - 3)  # decode-shaped Nq < Nk; Nq > Nk when non-causal
    q, k, v = qkv(B=B, Hq=heads[0], Hkv=heads[1], Nq=Nq, Nk=Nk, seed=Nq * 7 + extra)
    Hq = heads[0]
    method = az.get(name, **LAYOUT_MOD_METHODS[name])
    dist = distance(Nq, Nk)
    table = torch.randn(Hq, 7, dtype=F64, requires_grad=True)
    slopes = mods.alibi_slopes(Hq).to(F64)
    score_mod, ref = [
        (mods.relative_bias(table), lambda: dict(bias=table[:, dist.clamp(-3, 3) + 3])),
        (mods.compose(mods.alibi(slopes), mods.softcap(2.0)), lambda: dict(bias=slopes[:, None, None] * dist, cap=2.0)),
        (mods.compose(mods.relative_bias(table), mods.softcap(1.5)),
         lambda: dict(bias=table[:, dist.clamp(-3, 3) + 3], cap=1.5)),
    ][which]
    vis = _visible(method, q, k, causal, score_mod)
    got = method(q, k, v, causal=causal, score_mod=score_mod, return_lse=True)
    want = dense(q, k, v, causal=causal, mask=vis, **ref())
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, table] if which != 1 else [q, k, v])
    with torch.no_grad():  # inference: the mod in the executor's forward (the generic slot loop)
        fast = method(q, k, v, causal=causal, score_mod=score_mod, return_lse=True)
    torch.testing.assert_close(fast[0], want[0].detach(), atol=1e-12, rtol=1e-10)


def _distance_mods(which, Hq, steep):
    """A distance-bias mod, its dense bias builder (``dist (Nq, Nk)`` -> ``(Hq|1, Nq, Nk)``) and the learnable
    tensors it reads."""
    slopes = (mods.alibi_slopes(Hq).to(F64) * (64.0 if steep else 1.0)).requires_grad_()  # steep: far keys
    table = torch.randn(Hq, 9, dtype=F64, requires_grad=True)                            # fall below the floor
    shared = torch.randn(5, dtype=F64, requires_grad=True)
    return {
        "alibi": (mods.alibi(slopes), lambda d: slopes[:, None, None] * d, [slopes]),
        "relative_bias": (mods.relative_bias(table), lambda d: table[:, d.clamp(-4, 4) + 4], [table]),
        "shared_table": (mods.relative_bias(shared), lambda d: shared[d.clamp(-2, 2) + 2][None], [shared]),
        "sum": (mods.compose(mods.alibi(slopes), mods.relative_bias(table)),
                lambda d: slopes[:, None, None] * d + table[:, d.clamp(-4, 4) + 4], [slopes, table]),
    }[which]


class _Spy:
    """Counts calls of a module function (patched for the test's duration)."""

    def __init__(self, module, name):
        self.fn, self.calls = getattr(module, name), 0
        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(method=st.sampled_from(["exact", "exact_tiled", "sliding_window"]), B=st.integers(1, 2),
       heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), Nq=st.integers(1, 40), extra=st.integers(0, 12),
       causal=st.booleans(), which=st.sampled_from(["alibi", "relative_bias", "shared_table", "sum"]),
       steep=st.booleans())
def test_distance_bias_mods_run_in_the_fused_kernel_like_the_dense_reference(method, B, heads, Nq, extra, causal,
                                                                             which, steep):
    """alibi, relative_bias and their sums (``DistanceBias``) run inside PyTorch's fused CPU kernel as
    strided additive masks (exact family: reversed query tiles, here 8 rows each; sliding_window: the band
    path's shared per-block bias): values and lse against the dense float64 reference, and the gradients
    (the recomputing backward, the bias's own gradients from per-distance sums) to q, k, v, the slopes
    and the tables."""
    import attnzoo.core.blocksparse as blocksparse
    import attnzoo.core.exact as exact
    causal = causal or method == "sliding_window"
    Nk = Nq + extra if causal else max(1, Nq + extra - 6)
    Hq, Hkv = heads
    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, seed=Nq * 13 + extra)
    score_mod, bias, learnable = _distance_mods(which, Hq, steep)
    params = {"sliding_window": dict(window=6, block=4)}.get(method, {})
    mask = (distance(Nq, Nk) > -6) if method == "sliding_window" else None
    spies = [_Spy(exact, "_fused_bias_tiles"), _Spy(blocksparse, "attend_band")]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(exact, "_BIAS_ROWS", 8)
            got = az.attention(q, k, v, method=method, causal=causal, score_mod=score_mod, return_lse=True, **params)
            with torch.no_grad():
                fast = az.attention(q, k, v, method=method, causal=causal, score_mod=score_mod, return_lse=True,
                                    **params)
    finally:
        for spy in spies:
            spy.patch.undo()
    # the fused path ran (with grad and without); a one-query window step is exact attention over its window
    assert spies[method == "sliding_window" and Nq > 1].calls == 2
    want = dense(q, k, v, causal=causal, bias=bias(distance(Nq, Nk)), mask=mask)
    for out in (got, fast):
        torch.testing.assert_close(out[0], want[0].detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out[1], want[1].detach(), atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, *learnable])


@pytest.mark.parametrize("extension", [False, True])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(method=st.sampled_from(["exact", "exact_tiled"]), B=st.integers(1, 2), heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
       Nq=st.integers(1, 30), extra=st.integers(0, 9), causal=st.booleans(), padded=st.booleans(),
       which=st.sampled_from(["softcap", "bias_softcap", "closure"]))
def test_row_wise_mod_forward_like_the_dense_reference(extension, method, B, heads, Nq, extra, causal, padded,
                                                       which):
    """Mods other than a distance bias run the tiled engine's row-wise forward (``exact._mod_row_tiles``, here
    4 query positions per block so calls span several; a softcap alone on its fused no-maximum path), or with
    ``extension`` (where it builds) the soft-cap C++ kernel (``core.capped``: a softcap alone, a bias then a
    softcap without padding): values, lse, and the gradients (recomputing backward) to q, k, v and a tensor
    the mod closes over, against the dense float64 reference, with causal offsets (Nk > Nq), GQA and key
    padding (rows without keys too)."""
    import attnzoo.core.exact as exact
    from attnzoo.core import capped
    if extension and not capped.available():
        pytest.skip("the soft-cap extension did not build here")
    Hq, Hkv = heads
    Nk = Nq + extra
    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, seed=Nq * 7 + extra)
    pad = (torch.arange(Nk)[None, :] * (torch.arange(B)[:, None] + 2) % 3 != 1) if padded else None
    table = torch.randn(Hq, 7, dtype=F64, requires_grad=True)
    dist = distance(Nq, Nk)
    score_mod, ref, learnable = {
        "softcap": (mods.softcap(1.5), dict(cap=1.5), []),
        "bias_softcap": (mods.compose(mods.relative_bias(table), mods.softcap(2.0)),
                         dict(bias=table[:, dist.clamp(-3, 3) + 3], cap=2.0), [table]),
        "closure": (lambda s, b, h, qi, kj: s * 0.5 + table[h, (qi + kj) % 7] - b,
                    dict(bias=None), [table]),
    }[which]
    want_s = None
    if which == "closure":  # the reference scores written out: 0.5·s + table[h, (i + j) % 7] - b
        qi = torch.arange(Nq)[:, None] + Nk - Nq
        kj = torch.arange(Nk)[None, :]
        want_s = table[:, (qi + kj) % 7][None] - torch.arange(B, dtype=F64)[:, None, None, None]
    path = "_mod_row_tiles"
    if extension and which == "softcap":
        path = "_capped_tiles"
    elif extension and which == "bias_softcap" and not padded:
        path = "_fused_bias_tiles"
    elif extension and which == "bias_softcap" and exact._key_ranges(pad) is not None:  # no holes in the padding
        path = "_padded_bias_tiles"
    spy = _Spy(exact, path)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if not extension:
                mp.setattr(capped, "applies", lambda *a: False)
            mp.setattr(exact, "_BIAS_ROWS", 8)
            mp.setattr(exact, "_MOD_ROWS", 4)
            mp.setattr(exact, "_MOD_MIN_ROWS", 1)
            got = az.attention(q, k, v, method=method, causal=causal, score_mod=score_mod, key_padding_mask=pad,
                               return_lse=True)
            with torch.no_grad():
                fast = az.attention(q, k, v, method=method, causal=causal, score_mod=score_mod,
                                    key_padding_mask=pad, return_lse=True)
    finally:
        spy.patch.undo()
    assert spy.calls == 2
    mask = None if pad is None else pad[:, None, None, :]
    if which == "closure":
        want = dense(q * 0.5, k, v, causal=causal, bias=want_s, mask=mask)
    else:
        want = dense(q, k, v, causal=causal, mask=mask, **ref)
    for out in (got, fast):
        torch.testing.assert_close(out[0], want[0].detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out[1], want[1].detach(), atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, *learnable])


@pytest.mark.parametrize("which", ["softcap", "bias_softcap"])
@pytest.mark.parametrize("method,heads,Nq,Nk,causal,padded", [
    ("exact", (4, 2), 21, 28, True, False), ("exact", (4, 1), 70, 70, True, True), ("exact_tiled", (2, 2), 9, 9, True, False),
    ("exact", (4, 2), 30, 17, False, True), ("exact_tiled", (3, 1), 1, 40, True, False)])
def test_soft_cap_extension_in_the_exact_engine(which, method, heads, Nq, Nk, causal, padded):
    """The tiled forward on the soft-cap C++ kernel (``core.capped``): a softcap alone (``_capped_tiles``, any
    padding) or a bias then a softcap (``_fused_bias_tiles``, the bias as the kernel's mask; left padding:
    ``_padded_bias_tiles``, each batch row on its kept key range): values, lse and gradients (to the table too) against the dense float64 reference, GQA,
    causal Nq != Nk, padding with rows that see no key, query tiles of 8 rows."""
    import attnzoo.core.exact as exact
    from attnzoo.core import capped
    if not capped.available():
        pytest.skip("the soft-cap extension did not build here")
    q, k, v = qkv(B=2, Hq=heads[0], Hkv=heads[1], Nq=Nq, Nk=Nk, seed=Nq + Nk)
    pad = (torch.arange(Nk)[None, :] >= torch.tensor([[0], [min(Nk, 12)]])) if padded else None  # row 1: 12 hidden
    table = torch.randn(heads[0], 7, dtype=F64, requires_grad=True)
    score_mod, ref, learnable = {
        "softcap": (mods.softcap(0.8), dict(cap=0.8), []),
        "bias_softcap": (mods.compose(mods.relative_bias(table), mods.softcap(2.0)),
                         dict(bias=table[:, distance(Nq, Nk).clamp(-3, 3) + 3], cap=2.0), [table]),
    }[which]
    path = "_capped_tiles" if which == "softcap" else "_padded_bias_tiles" if padded else "_fused_bias_tiles"
    spy = _Spy(exact, path)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(exact, "_BIAS_ROWS", 8)
            got = az.attention(q, k, v, method=method, causal=causal, score_mod=score_mod, key_padding_mask=pad,
                               return_lse=True)
    finally:
        spy.patch.undo()
    assert spy.calls == 1
    want = dense(q, k, v, causal=causal, mask=None if pad is None else pad[:, None, None, :], **ref)
    torch.testing.assert_close(got[0], want[0].detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[1], want[1].detach(), atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, *learnable])


def test_row_wise_softcap_in_float32_with_and_without_the_fixed_shift():
    """float32: softcap(30) skips the row maximum (scores shifted by the cap), softcap(60) cannot (exp(-120)
    underflows) and takes the maximum; both as close to float64 as plain float32 attention is."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g) * 4 for _ in range(3))
    for cap in (30.0, 60.0, 0.5):
        with torch.no_grad():
            got = az.attention(q, k, v, causal=True, score_mod=mods.softcap(cap))
        want = dense(q.double(), k.double(), v.double(), causal=True, cap=cap)[0]
        plain = (az.attention(q, k, v, causal=True).double() - dense(q.double(), k.double(), v.double(),
                                                                   causal=True)[0]).abs().max()
        assert (got.double() - want).abs().max() <= max(4 * plain, 1e-5), cap


def test_distance_bias_in_float32_drops_only_negligible_keys():
    """A steep ALiBi in float32 (most keys masked as negligible, see ``negligible_gap``) over several query
    tiles, causal and not, GQA: as close to float64 as the generic engine running the same mod (a plain
    function, no DistanceBias) gets. A softcap composed after a bias is no distance bias."""
    from attnzoo.core.scoremod import DistanceBias
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 900, 16, generator=g), torch.randn(2, 2, 1000, 16, generator=g), \
        torch.randn(2, 2, 1000, 16, generator=g)
    alibi = mods.alibi(torch.tensor([4.0, 1.0, 0.25, 0.01]))
    for method, causal, params in (("exact", True, {}), ("exact", False, {}), ("sliding_window", True, {"window": 300})):
        with torch.no_grad():
            want = az.attention(q.double(), k.double(), v.double(), method=method, causal=causal, score_mod=alibi,
                                return_lse=True, **params)
            errors = []
            for mod in (alibi, lambda *a: alibi(*a)):
                got = az.attention(q, k, v, method=method, causal=causal, score_mod=mod, return_lse=True, **params)
                errors.append([float((a.double() - b).abs().max()) for a, b in zip(got, want)])
        fused, generic = errors
        assert fused[0] <= 2 * generic[0] + 1e-6 and fused[1] <= 2 * generic[1] + 1e-6, (method, causal, errors)
    assert isinstance(mods.compose(alibi, mods.relative_bias(torch.randn(3))), DistanceBias)
    assert not isinstance(mods.compose(alibi, mods.softcap(2.0)), DistanceBias)


@pytest.mark.parametrize("name,params", [
    ("block_topk", dict(block=4, topk=1, sink=False)), ("block_topk", dict(block=4, topk=1, sink=False, score="mean")),
    ("longheads", dict(block=4, chunks=3)), ("hip", dict(block=4, block_k=4, topk=1)),
    ("vertical_slash", dict(last_q=4, n_vertical=4, n_slash=1, sinks=0, block=4)),
    ("adaspa", dict(block=4, coverage=0.3))])
def test_dynamic_methods_select_on_the_modified_scores(name, params):
    """A mod that lifts keys [8, 12) far above the rest (and slopes towards them, so HiP's halving search,
    which scores a chunk by its middle key, is led there) makes every dynamic method read them for the
    rows past them, where the plain scores (those keys' k made small) leave them out."""
    q, k, v = qkv(B=1, Hq=2, Hkv=2, Nq=32, Nk=32, grad=False, seed=5)
    q = q.abs() + 1.0
    k = k.abs() + 1.0
    k[:, :, 8:12] = 0.01  # unmodified, these keys score lowest for every query
    lift = lambda s, b, h, qi, kj: s + 1e3 * ((kj >= 8) & (kj < 12)) + 1e3 - 10 * (kj - 10).abs()  # noqa: E731
    method = az.get(name, **params)
    plain = _visible(method, q, k, True)
    modded = _visible(method, q, k, True, lift)
    late = slice(16, 32)  # query rows whose own block is past the lifted keys
    assert not plain[:, :, late, 8:12].all()
    assert modded[:, :, late, 8:12].all()
    lays = method.layouts(q, k, causal=True, score_mod=lift)
    again = az.get("block_sparse", layout=tuple(lays))(q, k, torch.eye(32, dtype=F64).expand(1, 2, 32, 32),
                                                         causal=True, score_mod=lift) > 0
    assert torch.equal(again, modded)  # layouts(score_mod=...) is what the method attends


def test_layout_score_mod_with_padding_sinks_and_varlen():
    """The executor's mod with a key padding mask, learnable sinks and packed sequences (positions restart
    per sequence) against dense references."""
    q, k, v = qkv(B=2, Nq=13, Nk=13)
    pad = torch.ones(2, 13, dtype=torch.bool)
    pad[1, 9:] = False
    table = torch.randn(4, 7, dtype=F64, requires_grad=True)
    sinks = torch.randn(4, dtype=F64, requires_grad=True)
    method = az.get("sliding_window", window=4, block=4)
    got = method(q, k, v, causal=True, key_padding_mask=pad, score_mod=mods.relative_bias(table), sinks=sinks,
                 return_lse=True)
    band = (distance(13, 13) > -4) & (distance(13, 13) <= 0)
    want = dense(q, k, v, causal=True, bias=table[:, distance(13, 13).clamp(-3, 3) + 3], sinks=sinks,
                 mask=band & pad[:, None, None, :])
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, table, sinks])
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    q1, k1, v1 = (t[:1] for t in (q, k, v))
    packed = method(q1, k1, v1, causal=True, score_mod=mods.relative_bias(table), cu_seqlens_q=cu, cu_seqlens_k=cu)
    for a, b in ((0, 5), (5, 13)):
        one = method(q1[:, :, a:b], k1[:, :, a:b], v1[:, :, a:b], causal=True, score_mod=mods.relative_bias(table))
        torch.testing.assert_close(packed[:, :, a:b], one, atol=1e-12, rtol=1e-10)


def test_layout_engine_override_gets_the_mod_and_kernels_refuse_user_mods():
    from attnzoo.backends import explain
    from attnzoo.core.blocksparse import LAYOUT_ENGINE, BlockLayout, attend

    q, k, v = qkv(B=1, grad=False, Nq=8, Nk=8)
    lay = BlockLayout.from_mask_mod(lambda b, h, qi, kj: kj <= qi, len_q=8, len_k=8, block=4)
    seen = []  # an engine override gets the mod (a kernel backend applies it or refuses it)
    with LAYOUT_ENGINE.use(lambda *a, **kw: seen.append(kw.get("score_mod"))):
        attend(q, k, v, lay, scale=1.0, causal=True, score_mod=mods.softcap(2.0))
        attend(q, k, v, lay, scale=1.0, causal=True)
    assert isinstance(seen[0], type(mods.softcap(2.0))) and seen[1] is None
    # the kernels take only the built-in mods (and what core.lowering turns into them; this one reads the
    # query position alone, so it stays a user function)
    user_mod = lambda s, b, h, qi, kj: s * 2 + qi  # noqa: E731
    for name in ("exact", "sliding_window"):
        rows = {r.backend: r for r in explain(name, q, k, v, causal=True, score_mod=user_mod)}
        assert any("score_mod" in why for why in rows["triton"].reasons)
        assert rows["torch"].runs
        with pytest.raises(az.UnsupportedError, match="score_mod"):
            az.attention(q, k, v, method=name, causal=True, score_mod=user_mod, backend="triton")


def test_mask_combinators():
    even = lambda b, h, qi, kj: kj % 2 == 0  # noqa: E731
    causal = lambda b, h, qi, kj: kj <= qi  # noqa: E731
    qi, kj = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.equal(mods.and_masks(even, causal)(0, 0, qi, kj), (kj % 2 == 0) & (kj <= qi))
    assert torch.equal(mods.or_masks(even, causal)(0, 0, qi, kj), (kj % 2 == 0) | (kj <= qi))
    with pytest.raises(az.AttnZooError, match="and_masks"):
        mods.and_masks()


def test_alibi_slopes_are_the_papers():
    torch.testing.assert_close(mods.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert mods.alibi_slopes(12).shape == (12,) and (mods.alibi_slopes(12) > 0).all()


# ------------------------------------------------------------------- sinks
@pytest.mark.parametrize("method,params", [("exact", {}), ("naive", {}), ("exact_tiled", {"q_tile": 3}),
                                           ("flash_decode", {"splits": 3}), ("sliding_window", {"window": 64})])
@pytest.mark.parametrize("Nq", [13, 2])
def test_sinks_match_the_closed_form(method, params, Nq):
    q, k, v = qkv(Nq=Nq)
    sinks = torch.randn(4, dtype=F64, requires_grad=True)
    got = az.attention(q, k, v, method=method, causal=True, sinks=sinks, return_lse=True, **params)
    want = dense(q, k, v, causal=True, sinks=sinks)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, sinks])


def test_sinks_with_score_mod_and_rows_without_keys():
    q, k, v = qkv(Nq=13, Nk=13)
    pad = torch.ones(2, 13, dtype=torch.bool)
    pad[1, :5] = False  # row 1: queries 0..4 see no key at all
    sinks = torch.randn(4, dtype=F64)
    out, lse = az.attention(q, k, v, method="exact", causal=True, key_padding_mask=pad, sinks=sinks,
                            score_mod=mods.softcap(3.0), return_lse=True)
    want = dense(q, k, v, causal=True, cap=3.0, sinks=sinks, mask=pad[:, None, None, :])
    torch.testing.assert_close(out, want[0])
    assert torch.equal(out[1, :, :5], torch.zeros_like(out[1, :, :5]))
    torch.testing.assert_close(lse[1, :, :5], sinks[:, None].expand(4, 5))


def test_sinks_in_kvcache_decode_reads():
    q, k, v = (t.detach() for t in qkv(B=1, Nq=13, Nk=13))
    sinks = torch.randn(4, dtype=F64)
    cache = KVCache("full")
    cache.append(k[:, :, :12], v[:, :, :12])
    cache.attend(q[:, :, :12], sinks=sinks)
    cache.append(k[:, :, 12:], v[:, :, 12:])
    step = cache.attend(q[:, :, 12:], sinks=sinks)
    torch.testing.assert_close(step, dense(q, k, v, causal=True, sinks=sinks)[0][:, :, 12:])
    with pytest.raises(az.AttnZooError, match="sinks"):
        cache.attend(q[:, :, 12:], sinks=torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------ varlen
def packed(lengths_q, lengths_k, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cq = torch.tensor([0, *torch.tensor(lengths_q, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lengths_k, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, Hq, int(cq[-1]), D, generator=g, dtype=F64)
    k = torch.randn(1, Hkv, int(ck[-1]), D, generator=g, dtype=F64)
    v = torch.randn(1, Hkv, int(ck[-1]), D, generator=g, dtype=F64)
    return q, k, v, cq, ck


def block_diagonal(cq, ck, causal):
    """The dense mask of packed sequences: query i of sequence s sees key j of s (bottom-right causal)."""
    Tq, Tk = int(cq[-1]), int(ck[-1])
    mask = torch.zeros(Tq, Tk, dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(zip(cq.tolist(), cq[1:].tolist()), zip(ck.tolist(), ck[1:].tolist())):
        block = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if causal:
            block = distance(q1 - q0, k1 - k0) <= 0
        mask[q0:q1, k0:k1] = block
    return mask


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5), causal=st.booleans(),
       method=st.sampled_from(["exact", "naive", "exact_tiled"]), decode=st.booleans())
def test_varlen_equals_the_dense_block_diagonal_mask(lengths, causal, method, decode):
    lengths_q = [min(n, 2) for n in lengths] if decode else lengths  # a decode step: fewer queries than keys
    q, k, v, cq, ck = packed(lengths_q, lengths)
    out, lse = az.attention(q, k, v, method=method, causal=causal, cu_seqlens_q=cq, cu_seqlens_k=ck,
                            return_lse=True)
    want = dense(q, k, v, causal=False, mask=block_diagonal(cq, ck, causal))
    torch.testing.assert_close(out, want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, want[1], atol=1e-12, rtol=1e-10, check_dtype=False)  # no query: fp32 lse


@pytest.mark.parametrize("method,params", [("sliding_window", {"window": 4}), ("streaming", {"sinks": 2, "window": 3}),
                                           ("linear", {}), ("lightning", {}), ("gla", {})])
def test_varlen_sparse_and_linear_equal_the_sequences_one_by_one(method, params):
    """Document boundaries reset sparse layouts and linear states: each sequence as its own call."""
    lengths = [7, 0, 12, 1, 5]
    q, k, v, cq, _ = packed(lengths, lengths, Hq=2, Hkv=2)
    q, k, v = q.float(), k.float(), v.float()
    extra = {"g": -torch.rand(1, 2, q.shape[2], 8)} if method == "gla" else {}
    out = az.attention(q, k, v, method=method, causal=True, cu_seqlens_q=cq, cu_seqlens_k=cq, **params, **extra)
    for a, b in zip(cq.tolist(), cq[1:].tolist()):
        if b > a:
            one = az.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], method=method, causal=True, **params,
                               **{n: t[:, :, a:b] for n, t in extra.items()})
            torch.testing.assert_close(out[:, :, a:b], one, atol=1e-6, rtol=1e-5)


def test_varlen_with_sinks_score_mod_and_gradients():
    q, k, v, cq, ck = packed([4, 6, 3], [4, 6, 3])
    for t in (q, k, v):
        t.requires_grad_(True)
    sinks = torch.randn(4, dtype=F64, requires_grad=True)
    slopes = mods.alibi_slopes(4).to(F64)
    got = az.attention(q, k, v, method="exact", causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, sinks=sinks,
                       score_mod=mods.alibi(slopes), return_lse=True)
    outs, lses = [], []
    for a, b in zip(cq.tolist(), cq[1:].tolist()):
        o, ls = dense(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, sinks=sinks,
                      bias=slopes[:, None, None] * distance(b - a, b - a))
        outs.append(o)
        lses.append(ls)
    assert_same_grads(got, (torch.cat(outs, 2), torch.cat(lses, 2)), [q, k, v, sinks])


@pytest.mark.parametrize("kwargs,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32)), "cu_seqlens_k"),
    (dict(cu_seqlens_q=torch.tensor([1, 9], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 9])), "starting at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 9]), cu_seqlens_k=torch.tensor([0, 3, 3, 9])), "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 9])), "packed length 9"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 9.0]), cu_seqlens_k=torch.tensor([0, 9])), "int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9]), cu_seqlens_k=torch.tensor([0, 9])), "as many sequences"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9]), cu_seqlens_k=torch.tensor([0, 4, 9]), max_seqlen_q=3),
     "max_seqlen_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 9]), cu_seqlens_k=torch.tensor([0, 9]),
          key_padding_mask=torch.ones(1, 9, dtype=torch.bool)), "key_padding_mask"),
])
def test_varlen_bad_offsets_are_named(kwargs, match):
    q, k, v, _, _ = packed([9], [9])
    with pytest.raises(az.AttnZooError, match=match):
        az.attention(q, k, v, method="exact", **kwargs)


def test_varlen_needs_batch_one():
    q, k, v = qkv(grad=False, Nq=4, Nk=4)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(az.AttnZooError, match="packed"):
        az.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


# ---------------------------------------------------------- unsupported
@pytest.mark.parametrize("method,kwargs,match", [
    ("probsparse", dict(score_mod=mods.softcap(3.0)), "score_mod: its lazy queries output the mean of V"),
    ("hyper", dict(score_mod=mods.softcap(3.0)), "score_mod: its light part is a sampled estimate"),
    ("performer", dict(score_mod=mods.softcap(3.0)), "score_mod: it never forms the query-key softmax scores"),
    ("linformer", dict(score_mod=mods.softcap(3.0)), "score_mod: it never forms"),
    ("linear", dict(sinks=torch.zeros(4, dtype=F64)), "sinks"),
    ("linformer", dict(cu_seqlens_q=torch.tensor([0, 13], dtype=torch.int32),
                       cu_seqlens_k=torch.tensor([0, 13], dtype=torch.int32)), "cu_seqlens"),
])
def test_methods_refuse_what_they_do_not_declare(method, kwargs, match):
    q, k, v = qkv(B=1, grad=False, Nq=13)
    with pytest.raises(az.UnsupportedError, match=match):
        az.attention(q, k, v, method=method, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(score_mod=lambda s, b, h: s), "5 positional"),
    (dict(score_mod="softcap"), "callable"),
    (dict(score_mod=lambda s, b, h, qi, kj: s.sum()), "shape"),
    (dict(sinks=torch.zeros(3, dtype=F64)), r"shape \(4,\)"),
    (dict(sinks=torch.tensor([0, 0, 0, math.nan], dtype=F64)), "finite"),
    (dict(sinks=torch.zeros(4, dtype=torch.long)), "floating"),
])
def test_bad_score_mods_and_sinks_are_named(kwargs, match):
    q, k, v = qkv(grad=False)
    with pytest.raises(az.AttnZooError, match=match):
        az.attention(q, k, v, method="exact", **kwargs)


@pytest.mark.parametrize("build,match", [(lambda: mods.softcap(0), "cap"), (lambda: mods.alibi(torch.ones(2, 2)), "1-D"),
                                         (lambda: mods.relative_bias(torch.ones(4, 6)), "odd"),
                                         (lambda: mods.alibi_slopes(0), "positive")])
def test_bad_helper_arguments(build, match):
    with pytest.raises(az.AttnZooError, match=match):
        build()


# ------------------------------------------------------------ pack / unpack
@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (3, 6, 5), (3, 6)])
def test_pack_unpack_round_trip(shape):
    x = torch.randn(*shape)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    p, cu = az.pack(x, mask)
    assert cu.tolist() == [0, 3, 7, 13] and cu.dtype == torch.int32
    assert p.shape[0] == 1 and p.shape[2 if x.dim() == 4 else 1] == 13
    u = az.unpack(p, mask)
    keep = mask.bool().view(3, *([1] if x.dim() == 4 else []), 6, *([1] * (x.dim() - 2 - (x.dim() == 4))))
    torch.testing.assert_close(u, x * keep)


def test_padded_batch_equals_packed_batch():
    q, k, v = qkv(B=3, Hq=4, Hkv=2, Nq=6, Nk=6, grad=False)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    (pq, cu), (pk, _), (pv, _) = az.pack(q, mask), az.pack(k, mask), az.pack(v, mask)
    out = az.unpack(az.attention(pq, pk, pv, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), mask)
    for b in range(3):
        m = mask[b]
        one = az.attention(q[b:b + 1, :, m], k[b:b + 1, :, m], v[b:b + 1, :, m], causal=True)
        torch.testing.assert_close(out[b:b + 1, :, m], one)


def test_pack_refuses_bad_masks():
    with pytest.raises(az.AttnZooError, match="attention_mask"):
        az.pack(torch.randn(2, 5, 3), torch.ones(2, 4))
    with pytest.raises(az.AttnZooError, match="0/1"):
        az.pack(torch.randn(2, 5, 3), torch.full((2, 5), 2))
    with pytest.raises(az.AttnZooError, match="packed"):
        az.unpack(torch.randn(1, 4, 3), torch.ones(2, 5))


# ---------------------------------------------------------- AnchorAttention
@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=5))
def test_anchor_equals_the_dense_document_plus_anchor_mask(lengths):
    q, k, v, cq, _ = packed(lengths, lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    j, i = torch.arange(len(doc))[None, :], torch.arange(len(doc))[:, None]
    mask = (j <= i) & ((doc[None, :] == doc[:, None]) | (j == 0))
    out, lse = az.attention(q, k, v, method="anchor", causal=True, cu_seqlens_q=cq, cu_seqlens_k=cq,
                            return_lse=True)
    want = dense(q, k, v, causal=False, mask=mask)
    torch.testing.assert_close(out, want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, want[1], atol=1e-12, rtol=1e-10)


def test_anchor_on_one_document_is_causal_exact_and_refuses_noncausal():
    q, k, v = qkv(B=1, Nq=9, Nk=9, grad=False)
    torch.testing.assert_close(az.attention(q, k, v, method="anchor", causal=True),
                               az.attention(q, k, v, method="naive", causal=True))
    with pytest.raises(az.UnsupportedError, match="causal"):
        az.attention(q, k, v, method="anchor")


@pytest.mark.parametrize("method,params", [("exact", {}), ("exact_tiled", {}), ("sliding_window", dict(window=24))])
def test_distance_bias_fused_path_takes_strided_inputs_and_empty_batches(method, params):
    """The fused distance-bias path (ALiBi as a strided additive mask) gives the same values and gradients on
    permuted, sliced and expanded (stride-0 heads) inputs as on contiguous copies; an empty batch is empty."""
    Hq, Hkv, N, D = 4, 2, 80, 16
    slopes = mods.alibi_slopes(Hq).requires_grad_(True)
    mod = mods.alibi(slopes)
    q = torch.randn(1, N, Hq, D).permute(0, 2, 1, 3).requires_grad_(True)  # permuted
    k_buf = torch.randn(1, Hkv, N + 7, D)
    k = k_buf[:, :, 3:N + 3].requires_grad_(False)  # sliced
    v = torch.randn(1, 1, N, D).expand(1, Hkv, N, D)  # expanded: head stride 0
    args = dict(method=method, causal=True, return_lse=True, score_mod=mod, **params)
    out, lse = az.attention(q, k, v, **args)
    (g_q, g_s) = torch.autograd.grad(out.square().sum(), (q, slopes))
    qc = q.detach().contiguous().requires_grad_(True)
    ref, ref_lse = az.attention(qc, k.contiguous(), v.contiguous(), **args)
    (r_q, r_s) = torch.autograd.grad(ref.square().sum(), (qc, slopes))
    for got, want in ((out, ref), (lse, ref_lse), (g_q, r_q), (g_s, r_s)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    empty = az.attention(q[:0], k[:0], v[:0], **args)
    assert empty[0].shape == (0, Hq, N, D) and empty[1].shape == (0, Hq, N)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (heads and positions swapped in memory), grad-connected."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("path,Nq,Nk,causal", [("band", 21, 28, True), ("band", 24, 24, False),
                                               ("fused", 24, 24, True), ("fused", 21, 28, True),
                                               ("token union", 21, 28, True), ("fused tokens", 24, 24, False),
                                               ("fused, per query head", 21, 28, True),
                                               ("token union, per query head", 24, 24, False)])
@pytest.mark.parametrize("which", ["softcap", "bias_softcap", "alibi"])
def test_fused_sparse_paths_run_mods_like_the_slot_loop_and_the_dense_reference(path, Nq, Nk, causal, which,
                                                                                 monkeypatch):
    """Each fused forward path of the block-sparse executor (``blocksparse.forward_path``) with each built-in
    mod: a distance bias as the values of the path's masks, a soft cap (alone or after a bias) on
    ``core.capped``'s kernel. Values and lse equal the slot loop's and the
    dense float64 reference restricted to the layout's keys; gradients (the recomputing backward) to q, k,
    v and the bias table equal the reference's. GQA, strided q/k/v, causal with Nq != Nk. (The C++ block
    kernel, which takes a bias-only mod on block layouts first, is off here: tests/test_mods.py has it.)"""
    from attnzoo.core import blocksparse as bs
    from attnzoo.core import capped
    from attnzoo.core.layout import BlockLayout, TokenLayout
    monkeypatch.setattr(bs.blockkernel, "applies", lambda *a: False)
    if not capped.available() and which != "alibi":
        pytest.skip("the soft-cap extension did not build here")
    q, k, v = (_strided(t) for t in qkv(B=2, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, seed=Nq + Nk))
    g = torch.Generator().manual_seed(7)
    path, per_q = path.split(", per")[0], ", per" in path
    lh = 4 if per_q else 2  # layout heads: every query head its own, or one per KV head (shared by its group)
    if path == "band":
        (layout,) = az.get("sliding_window", window=6, block=4).layouts(q, k, causal=causal)
    elif path == "fused":  # a random block layout per KV head (the causal diagonal block always kept)
        nqb, nkb = -(-Nq // 4), -(-Nk // 4)
        pick = torch.rand(1, lh, nqb, nkb, generator=g) < 0.4
        pick |= torch.arange(nkb)[None, :] == (torch.arange(nqb)[:, None] * 4 + Nk - Nq) // 4
        if Nq == Nk:  # nothing above the diagonal: only the diagonal blocks need masks (``_attend_diagonal``)
            pick = pick.tril()
        layout = BlockLayout.from_block_mask(pick, block_q=4, block_k=4, len_q=Nq, len_k=Nk, causal=causal)
    elif path == "token union":  # every query group reads the same few keys
        keys = torch.tensor([0, 1, 5, 9, 13, 17, 20])
        keys = torch.stack([keys + (h if per_q else 0) for h in range(lh)])  # (lh, 7)
        layout = TokenLayout(keys[None, :, None].expand(1, lh, -(-Nq // 3), -1), 3, Nq, Nk)
    else:  # each query group its own keys: a union too large for one dense call
        keys = torch.stack([torch.randperm(Nk, generator=g)[:6].sort().values for _ in range(-(-Nq // 3))])
        layout = TokenLayout(keys.view(1, 1, -1, 6), 3, Nq, Nk)
    table = torch.randn(4, 9, dtype=F64, requires_grad=True)
    dist = distance(Nq, Nk)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64)
    score_mod, ref, learnable = {
        "softcap": (mods.softcap(1.5), dict(cap=1.5), []),
        "bias_softcap": (mods.compose(mods.relative_bias(table), mods.softcap(2.0)),
                         dict(bias=table[:, dist.clamp(-4, 4) + 4], cap=2.0), [table]),
        "alibi": (mods.alibi(slopes), dict(bias=slopes[:, None, None] * dist), []),
    }[which]
    scale = q.shape[-1] ** -0.5
    kind = "fused" if path == "fused tokens" else path
    assert bs.forward_path(q, k, v, layout, causal=causal, score_mod=score_mod) == kind
    assert bs.forward_path(q, k, v, layout, causal=causal, score_mod=lambda s, *_: s) == "slot loop"

    def run():
        return bs.attend(q, k, v, layout, scale=scale, causal=causal, score_mod=score_mod)

    got = run()
    with torch.no_grad():
        fast = run()
        eye = torch.eye(Nk, dtype=F64).expand(2, 2, Nk, Nk)
        vis = bs.attend(q, k, eye, layout, scale=scale, causal=causal)[0] > 0  # the layout's keys, (B, Hq, Nq, Nk)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bs, "fused_applies", lambda *a: False)
        slot = run()
    want = dense(q, k, v, causal=causal, mask=vis, **ref)
    for out in (got, fast):
        for a, b in zip(out, slot):
            torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out[0], want[0].detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(out[1], want[1].detach(), atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, *learnable])


def test_explain_names_the_path_each_kind_of_mod_takes_on_torch():
    """``explain``'s torch note: a distance bias in PyTorch's fused kernel, a soft cap (alone or after biases)
    on the C++ soft-cap kernel, a user function on the eager paths (and why), or lowered to built-ins."""
    q = torch.randn(1, 2, 16, 8)
    bias = mods.alibi(mods.alibi_slopes(2))
    notes = {name: az.explain("block_topk", q, q, q, causal=True, score_mod=m)[0].note
             for name, m in (("bias", bias), ("cap", mods.softcap(3.0)), ("both", mods.compose(bias, mods.softcap(3.0))),
                             ("user", lambda s, b, h, qi, kj: s + qi),  # not lowerable (core.lowering)
                             ("lowered", lambda s, b, h, qi, kj: torch.tanh(s / 3.0) * 3.0))}
    assert "fused CPU kernel" in notes["bias"] and "C++ soft-cap kernel" not in notes["bias"]
    assert "a soft cap on the C++ soft-cap kernel" in notes["cap"]
    assert "distance biases then a soft cap on the C++ soft-cap kernel" in notes["both"]
    assert "'<lambda>'" in notes["user"] and "slot loop" in notes["user"] and "row-wise" in notes["user"]
    assert "not lowered" in notes["user"] and "kv_idx - q_idx" in notes["user"]
    assert "lowered to softcap(3)" in notes["lowered"] and "C++ soft-cap kernel" in notes["lowered"]


@pytest.mark.parametrize("method,params", [("exact", {}), ("exact_tiled", {}), ("sliding_window", dict(window=24)),
                                           ("block_topk", dict(block=16, topk=2, dense_below=0, dense_from=1))])
def test_softcap_paths_take_strided_inputs_and_empty_batches(method, params):
    """A soft cap (the C++ kernel where it builds, else the eager paths) gives the same values, lse and
    gradients on permuted, sliced and expanded (stride-0 heads) inputs as on contiguous copies; an empty
    batch is empty."""
    Hq, Hkv, N, D = 4, 2, 80, 16
    q = torch.randn(1, N, Hq, D).permute(0, 2, 1, 3).requires_grad_(True)  # permuted
    k = torch.randn(1, Hkv, N + 7, D)[:, :, 3:N + 3]  # sliced
    v = torch.randn(1, 1, N, D).expand(1, Hkv, N, D)  # expanded: head stride 0
    args = dict(method=method, causal=True, return_lse=True, score_mod=mods.softcap(1.5), **params)
    out, lse = az.attention(q, k, v, **args)
    (g_q,) = torch.autograd.grad(out.square().sum(), (q,))
    qc = q.detach().contiguous().requires_grad_(True)
    ref, ref_lse = az.attention(qc, k.contiguous(), v.contiguous(), **args)
    (r_q,) = torch.autograd.grad(ref.square().sum(), (qc,))
    for got, want in ((out, ref), (lse, ref_lse), (g_q, r_q)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    empty = az.attention(q[:0], k[:0], v[:0], **args)
    assert empty[0].shape == (0, Hq, N, D) and empty[1].shape == (0, Hq, N)


@pytest.mark.parametrize("rows,unit,groups,shared", [(4, 4, 2, False), (3, 5, 1, True), (6, 2, 3, False),
                                                      (5, 5, 2, True)])
def test_gathered_bias_tiles_equal_the_mod_on_index_grids(rows, unit, groups, shared):
    """scoremod.gathered_bias (the fused sparse path's Toeplitz tiles, one gather from a Hankel view) equals
    the mod itself on (query, key) index grids, for ALiBi + a relative table (per head or shared), several
    query heads per row group, query blocks and key units of different sizes; units -1 are don't-care."""
    from attnzoo.core.scoremod import gathered_bias
    torch.manual_seed(0)
    Hkv, nq, U, off, n_units = 2, 5, 4, 7, 9
    heads = Hkv * groups
    table = torch.randn(*(() if shared else (heads,)), 9, dtype=torch.float64)
    mod = mods.compose(mods.alibi(torch.rand(heads, dtype=torch.float64)), mods.relative_bias(table))
    units = torch.randint(-1, n_units, (1, Hkv, 1, nq, U))
    first = torch.arange(nq) * rows + off
    head0 = (torch.arange(Hkv) * groups).view(1, Hkv, 1, 1)
    got = gathered_bias(mod, units, first, head0, rows=rows, unit=unit, groups=groups, dtype=torch.float64,
                        span=(-(off + nq * rows), n_units * unit - off))
    assert got.shape == (1, Hkv, 1, nq, groups * rows, U * unit)
    h = (head0.unsqueeze(-1) + torch.arange(groups)).repeat_interleave(rows, -1).unsqueeze(-1)  # (.., R, 1)
    q_idx = (first.view(-1, 1) + torch.arange(rows).repeat(groups)).unsqueeze(-1)  # (n, R, 1)
    kv_idx = (units.unsqueeze(-1) * unit + torch.arange(unit)).flatten(-2).unsqueeze(-2)  # (.., n, 1, W)
    want = mod(torch.zeros(got.shape, dtype=torch.float64), torch.zeros(1, dtype=torch.long), h, q_idx, kv_idx)
    real = (units >= 0).repeat_interleave(unit, -1).unsqueeze(-2).expand_as(got)
    torch.testing.assert_close(got[real], want[real], atol=0, rtol=0)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("which", ["alibi", "bias_softcap"])
@pytest.mark.parametrize("heads,Nq,Nk,causal", [((4, 2), 9, 20, True), ((2, 2), 14, 14, False), ((3, 1), 20, 20, True)])
def test_distance_bias_with_left_or_right_padding_runs_the_kernel_per_kept_range(which, heads, Nq, Nk, causal):
    """A distance bias (alone, or before a soft cap) with key padding that leaves each batch row one key range
    (left padding, right padding, a fully padded row): each batch row on the fused kernels over its kept keys
    (``exact._padded_bias_tiles``; causal rows before the first kept key see nothing); values, lse and
    gradients (to the table too) against the dense float64 reference."""
    import attnzoo.core.exact as exact
    from attnzoo.core import capped
    if which == "bias_softcap" and not capped.available():
        pytest.skip("the soft-cap extension did not build here")
    q, k, v = qkv(B=3, Hq=heads[0], Hkv=heads[1], Nq=Nq, Nk=Nk, seed=Nq * Nk)
    j = torch.arange(Nk)
    pad = torch.stack([j >= 6, j < Nk - 5, j < 0])  # left, right, nothing kept
    slopes, table = mods.alibi_slopes(heads[0]).to(F64), torch.randn(heads[0], 7, dtype=F64, requires_grad=True)
    dist = distance(Nq, Nk)
    score_mod, ref, learnable = {
        "alibi": (mods.alibi(slopes), dict(bias=slopes[:, None, None] * dist), []),
        "bias_softcap": (mods.compose(mods.relative_bias(table), mods.softcap(2.0)),
                         dict(bias=table[:, dist.clamp(-3, 3) + 3], cap=2.0), [table]),
    }[which]
    spy = _Spy(exact, "_padded_bias_tiles")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(exact, "_BIAS_ROWS", 8)
            got = az.attention(q, k, v, causal=causal, score_mod=score_mod, key_padding_mask=pad, return_lse=True)
    finally:
        spy.patch.undo()
    assert spy.calls == 1
    want = dense(q, k, v, causal=causal, mask=pad[:, None, None, :], **ref)
    torch.testing.assert_close(got[0], want[0].detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[1], want[1].detach(), atol=1e-12, rtol=1e-10)
    assert_same_grads(got, want, [q, k, v, *learnable])
