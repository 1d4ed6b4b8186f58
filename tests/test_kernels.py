"""The Triton kernels against float64 references, on CUDA or (no GPU) under Triton's interpreter on CPU.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports the
kernels when no CUDA device exists: Triton reads it when a kernel is defined.
The interpreter is slow, so shapes are tiny (tiles of 16) and cases few; the
slow marker runs every layout method through the kernels.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo.core.blocksparse import BlockLayout, TokenLayout
from attnzoo.core.exact import naive_attention

from _sparse_ref import assert_matches, masked_reference

pytest.importorskip("triton")
kern = pytest.importorskip("attnzoo.kernels.attention")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not __import__("attnzoo.kernels._attn", fromlist=["INTERPRET"]).INTERPRET:
    pytest.skip("no CUDA device and the kernels were not defined under TRITON_INTERPRET=1", allow_module_level=True)


def _qkv(B, Hq, Hkv, Nq, Nk, D=16, dtype=torch.float32, grad=False):
    t = [torch.randn(B, h, n, D, dtype=dtype, device=DEV, requires_grad=grad)
         for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]
    return t


def _pad_with_empty_rows(B, Nk):
    """Key padding where batch row 1 keeps only its last key: causal rows before it see nothing."""
    pad = torch.rand(B, Nk, device=DEV) > 0.3
    pad[-1] = False
    pad[-1, -1] = True
    return pad


def _grads(out, lse, inputs, seed_out, seed_lse):
    fin = torch.isfinite(lse)
    loss = (out.double() * seed_out).sum() + (torch.where(fin, lse, 0).double() * seed_lse).sum()
    return torch.autograd.grad(loss, inputs)


def _check_grads(got, want, tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal,Nq,Nk,pad", [(True, 21, 37, True), (False, 40, 19, False)])
def test_dense_forward_and_backward_match_naive(causal, Nq, Nk, pad):
    """GQA (Hq=4, Hkv=2), bottom-right causal with Nq != Nk, padding with empty rows; out, lse and gradients."""
    q, k, v = _qkv(2, 4, 2, Nq, Nk, grad=True)
    mask = _pad_with_empty_rows(2, Nk) if pad else None
    out, lse = kern.flash_attention(q, k, v, scale=0.3, causal=causal, key_padding_mask=mask, block_m=16,
                                    block_n=16)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = naive_attention(*ref, scale=0.3, causal=causal, key_padding_mask=mask)
    if pad and causal:
        assert not torch.isfinite(r_lse).all()  # the case really has empty rows
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    so, sl = torch.randn_like(r_out), torch.randn_like(r_lse)
    _check_grads(_grads(out, lse, (q, k, v), so, sl), _grads(r_out, r_lse, ref, so, sl), 5e-5)


def test_dense_half_inputs_accumulate_in_fp32():
    q, k, v = _qkv(1, 2, 1, 33, 33, dtype=torch.float16)
    out, lse = az.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    r_out, r_lse = naive_attention(q.double(), k.double(), v.double(), scale=0.25, causal=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), r_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), r_lse, atol=2e-3, rtol=2e-3)
    slopes = torch.rand(2, device=DEV)  # fp32 mod tensors with half inputs: the scores stay fp32 in the kernel
    mod = az.mods.compose(az.mods.alibi(slopes), az.mods.softcap(1.0))
    out, lse = az.attention(q, k, v, causal=True, return_lse=True, score_mod=mod, backend="triton")
    r_out, r_lse = naive_attention(q.double(), k.double(), v.double(), scale=0.25, causal=True,
                                   score_mod=az.mods.compose(az.mods.alibi(slopes.double()), az.mods.softcap(1.0)))
    torch.testing.assert_close(out.double(), r_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), r_lse, atol=2e-3, rtol=2e-3)


def _window(b, h, q_idx, kv_idx):
    return (q_idx + 16 - kv_idx).abs() < 9 + 3 * h  # per KV head, partial blocks


def test_block_layout_with_partial_blocks_matches_masked_reference():
    """A per-KV-head BlockLayout whose edge blocks need the mask_mod: forward and backward, causal, padded."""
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 40, 56
    q, k, v = _qkv(B, Hq, Hkv, Nq, Nk, grad=True)
    pad = _pad_with_empty_rows(B, Nk)
    lay = BlockLayout.from_mask_mod(_window, heads=Hkv, len_q=Nq, len_k=Nk, block=16, causal=True, device=DEV)
    assert lay.partial is not None and bool(lay.partial.any())
    out, lse = kern.layout_attention(q, k, v, lay, scale=0.3, causal=True, key_padding_mask=pad)
    qi = torch.arange(Nq, device=DEV).view(-1, 1)
    kj = torch.arange(Nk, device=DEV).view(1, -1)
    vis = _window(0, torch.arange(Hkv, device=DEV).view(-1, 1, 1), qi, kj).repeat_interleave(Hq // Hkv, 0)
    vis = vis & (kj <= qi + Nk - Nq) & pad[:, None, None, :]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = masked_reference(*ref, vis, scale=0.3)
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    so, sl = torch.randn_like(r_out), torch.randn_like(r_lse)
    _check_grads(_grads(out, lse, (q, k, v), so, sl), _grads(r_out, r_lse, ref, so, sl), 5e-5)


def test_token_layout_with_mask_mod_matches_masked_reference():
    """Explicit tokens per group of query rows (per query head, with -1 holes) filtered by a mask_mod."""
    B, Hq, Hkv, Nq, Nk, group, T = 1, 4, 2, 24, 50, 8, 20
    q, k, v = _qkv(B, Hq, Hkv, Nq, Nk, grad=True)
    ng = -(-Nq // group)
    tok = torch.stack([torch.randperm(Nk, device=DEV)[:T] for _ in range(Hq * ng)]).view(1, Hq, ng, T)
    tok[..., -3:] = -1
    mm = (lambda b, h, qi, kj: (qi + kj + h) % 3 != 0)
    lay = TokenLayout(tok, group, Nq, Nk, mask_mod=mm)
    out, lse = kern.layout_attention(q, k, v, lay, scale=0.3, causal=False)
    rows = tok.repeat_interleave(group, 2)[:, :, :Nq]
    vis = torch.zeros(1, Hq, Nq, Nk + 1, dtype=torch.bool, device=DEV)  # column Nk takes the -1 holes
    vis = vis.scatter_(-1, torch.where(rows >= 0, rows, Nk), True)[..., :Nk]
    h = torch.arange(Hq, device=DEV).view(1, -1, 1, 1)
    vis &= mm(0, h, torch.arange(Nq, device=DEV).view(-1, 1), torch.arange(Nk, device=DEV).view(1, -1))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = masked_reference(*ref, vis, scale=0.3)
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    so, sl = torch.randn_like(r_out), torch.randn_like(r_lse)
    _check_grads(_grads(out, lse, (q, k, v), so, sl), _grads(r_out, r_lse, ref, so, sl), 5e-5)


def _mod_case(Hq, alibi, table, cap, grad=True):
    """Kernel arguments and the float64 reference score_mod of the same built-in mods (ALiBi slopes, a relative
    table of radius 4, per head or shared, a softcap), with their leaves for gradients."""
    leaves, args, parts = [], {}, []
    if alibi:
        args["slopes"] = (torch.rand(Hq, device=DEV) * 0.6).requires_grad_(grad)
    if table:
        args["table"] = torch.randn(*((Hq,) if table == "head" else ()), 9, device=DEV).requires_grad_(grad)
    for name, t in args.items():
        ref = t.detach().double().requires_grad_(grad)
        leaves.append((t, ref))
        parts.append(az.mods.alibi(ref) if name == "slopes" else az.mods.relative_bias(ref))
    if cap:
        args["cap"] = cap
        parts.append(az.mods.softcap(cap))
    return args, az.mods.compose(*parts) if parts else None, leaves


@pytest.mark.parametrize("causal,Nq,Nk,pad,alibi,table,cap", [
    (True, 21, 37, True, True, "head", 1.5),  # every mod, bottom-right causal, empty rows
    (False, 40, 19, False, True, "shared", None),
    (True, 33, 33, False, False, None, 0.7),  # softcap alone, scores far beyond the cap (both tanh branches)
])
def test_dense_kernel_mods_match_float64_with_gradients_to_the_mod_tensors(causal, Nq, Nk, pad, alibi, table, cap):
    """ALiBi / relative bias / softcap as kernel specialisations (GQA 4/2): out, lse and the gradients of q, k, v,
    the slopes and the table (atomics) against naive attention with the same mods in float64."""
    q, k, v = _qkv(2, 4, 2, Nq, Nk, grad=True)
    mask = _pad_with_empty_rows(2, Nk) if pad else None
    args, mod, leaves = _mod_case(4, alibi, table, cap)
    out, lse = kern.flash_attention(q, k, v, scale=0.3, causal=causal, key_padding_mask=mask, block_m=16,
                                    block_n=16, **args)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = naive_attention(*ref, scale=0.3, causal=causal, key_padding_mask=mask, score_mod=mod)
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    so, sl = torch.randn_like(r_out), torch.randn_like(r_lse)
    got = _grads(out, lse, (q, k, v, *(t for t, _ in leaves)), so, sl)
    want = _grads(r_out, r_lse, (*ref, *(r for _, r in leaves)), so, sl)
    for g, w in zip(got, want):  # the slopes' gradient sums ~Nq·Nk distance-weighted terms: relative tolerance
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=2e-5)


def test_sinks_join_the_kernel_denominator_with_their_gradient():
    """A sink logit per query head in the dense kernel (GQA, causal, padding with empty rows: those rows get
    lse = sink, out = 0), its gradient from the saved lse; and in split-K decode (added by one split only)."""
    from attnzoo.core.scoremod import with_sinks
    q, k, v = _qkv(2, 4, 2, 21, 37, grad=True)
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    mask = _pad_with_empty_rows(2, 37)
    out, lse = kern.flash_attention(q, k, v, scale=0.3, causal=True, key_padding_mask=mask, block_m=16, block_n=16,
                                    sinks=sinks)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    r_out, r_lse = with_sinks(*naive_attention(*ref[:3], scale=0.3, causal=True, key_padding_mask=mask), ref[3])
    assert torch.isfinite(lse).all()
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    so, sl = torch.randn_like(r_out), torch.randn_like(r_lse)
    _check_grads(_grads(out, lse, (q, k, v, sinks), so, sl), _grads(r_out, r_lse, ref, so, sl), 5e-5)

    Q, K, V = torch.randn(2, 8, 3, 16, device=DEV), torch.randn(2, 2, 90, 16, device=DEV), \
        torch.randn(2, 2, 90, 16, device=DEV)
    s8, slopes = torch.randn(8, device=DEV), torch.rand(8, device=DEV)
    got = kern.split_k(Q, K, V, scale=0.3, causal=True, stop=70, splits=3, block_n=16, sinks=s8, slopes=slopes,
                       cap=2.0)
    mod = az.mods.compose(az.mods.alibi(slopes.double()), az.mods.softcap(2.0))
    want = with_sinks(*naive_attention(Q.double(), K[:, :, :70].double(), V[:, :, :70].double(), scale=0.3,
                                       causal=True, score_mod=mod), s8.double())
    assert_matches(got.out.double(), got.lse.double(), want.out, want.lse, tol=2e-5)


def _packed(lens_q, lens_k, causal, grad=False):
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, k, v = _qkv(1, 4, 2, sum(lens_q), sum(lens_k), grad=grad)
    return q, k, v, cq, ck


def test_varlen_in_one_launch_equals_per_sequence_float64_with_mods_sinks_and_gradients():
    """Packed sequences (empty ones, Nq > Nk, Nq < Nk, keys but no queries) through attention(cu_seqlens=...,
    backend="triton"): ONE kernel launch, equal to every sequence run alone in float64, with ALiBi + a shared
    table + softcap, sinks, and gradients to q, k, v, the slopes, the table and the sinks."""
    lens_q, lens_k = [5, 0, 17, 3, 9, 0], [9, 4, 17, 0, 30, 0]
    q, k, v, cq, ck = _packed(lens_q, lens_k, True, grad=True)
    args, mod, leaves = _mod_case(4, True, "shared", 2.0)
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    kmod = az.mods.compose(az.mods.alibi(args["slopes"]), az.mods.relative_bias(args["table"]),
                           az.mods.softcap(2.0))
    launches = []
    real = kern.varlen_attention
    kern.varlen_attention = lambda *a, **kw: launches.append(1) or real(*a, **kw)
    try:
        out, lse = az.attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, score_mod=kmod, sinks=sinks,
                                return_lse=True, backend="triton")
    finally:
        kern.varlen_attention = real
    assert launches == [1]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    r_out, r_lse = az.attention(*ref[:3], causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, score_mod=mod,
                                sinks=ref[3], return_lse=True, backend="torch")
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    so, sl = torch.randn_like(r_out), torch.randn_like(r_lse)
    got = _grads(out, lse, (q, k, v, sinks, *(t for t, _ in leaves)), so, sl)
    want = _grads(r_out, r_lse, (*ref, *(r for _, r in leaves)), so, sl)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=2e-5)


@given(lens=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=5),
       causal=st.booleans())
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_varlen_kernel_over_random_boundaries_equals_per_sequence(lens, causal):
    """Random sequence boundaries (empty sequences, sequences without keys or queries): the one-launch varlen
    kernel equals each sequence attended alone (float64 naive)."""
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    if causal:  # bottom-right causal: a sequence with more queries than keys leaves its first rows empty
        lens_k = [max(a, b) if i % 2 else b for i, (a, b) in enumerate(zip(lens_q, lens_k))]
    q, k, v, cq, ck = _packed(lens_q, lens_k, causal)
    if max(lens_q) == 0 or sum(lens_k) == 0:
        return
    out, lse = kern.varlen_attention(q, k, v, cq, ck, max(lens_q), scale=0.3, causal=causal, block_m=16,
                                     block_n=16)
    for i in range(len(lens_q)):
        q0, q1, k0, k1 = int(cq[i]), int(cq[i + 1]), int(ck[i]), int(ck[i + 1])
        r_out, r_lse = naive_attention(q[:, :, q0:q1].double(), k[:, :, k0:k1].double(), v[:, :, k0:k1].double(),
                                       scale=0.3, causal=causal)
        assert_matches(out[:, :, q0:q1].double(), lse[:, :, q0:q1].double(), r_out, r_lse, tol=2e-5)


def test_composed_biases_merge_into_one_slope_vector_and_one_table():
    """compose(alibi, relative_bias(per head, R=2), alibi, relative_bias(shared, R=4), softcap) on the kernels: the
    slopes summed, the tables brought to R=4 by their edge entries; equal to torch with every tensor's gradient."""
    q, k, v = _qkv(1, 4, 2, 20, 30, grad=True)
    ts = [torch.rand(4, device=DEV), torch.randn(4, 5, device=DEV), torch.rand(4, device=DEV),
          torch.randn(9, device=DEV)]
    ts = [t.requires_grad_() for t in ts]
    mod = az.mods.compose(az.mods.alibi(ts[0]), az.mods.relative_bias(ts[1]), az.mods.alibi(ts[2]),
                          az.mods.relative_bias(ts[3]), az.mods.softcap(4.0))
    res = [az.attention(q, k, v, causal=True, score_mod=mod, backend=b) for b in ("triton", "torch")]
    torch.testing.assert_close(res[0], res[1], atol=2e-5, rtol=2e-5)
    seed = torch.randn_like(res[0])
    _check_grads(torch.autograd.grad((res[0] * seed).sum(), (q, k, v, *ts)),
                 [g.double() for g in torch.autograd.grad((res[1] * seed).sum(), (q, k, v, *ts))], 5e-5)


@pytest.mark.parametrize("method,params", [("sliding_window", {"window": 12, "block": 16}),
                                           ("block_topk", {"block": 16, "topk": 2})])
def test_layout_methods_with_mods_and_sinks_on_triton_equal_torch(method, params):
    """Layout methods with ALiBi + softcap and sinks (the first layout's launch adds them): the triton backend
    equals the torch backend, forward and backward (q, k, v, slopes, sinks); block_topk selects on the modified
    scores in both."""
    q, k, v = _qkv(1, 4, 2, 48, 48, grad=True)
    slopes = (torch.rand(4, device=DEV) * 0.5).requires_grad_()
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    mod = az.mods.compose(az.mods.alibi(slopes), az.mods.softcap(3.0))
    res = [az.attention(q, k, v, method=method, causal=True, score_mod=mod, sinks=sinks, return_lse=True,
                        backend=b, **params) for b in ("triton", "torch")]
    assert_matches(res[0][0].double(), res[0][1].double(), res[1][0].double(), res[1][1].double(), tol=2e-5)
    seed = torch.randn_like(res[0][0])
    leaves = (q, k, v, slopes, sinks)
    _check_grads(torch.autograd.grad((res[0][0] * seed).sum(), leaves),
                 [g.double() for g in torch.autograd.grad((res[1][0] * seed).sum(), leaves)], 5e-5)


def _float64_leaves(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("method,params,causal", [
    ("lsh", {"rounds": 2, "chunk": 16, "buckets": 4}, True),  # layouts on hash-sorted tokens, (B, H, N) orders
    ("bilevel_routing", {"regions": 2, "topk": 1, "grid": (6, 8)}, False),  # 2-D regions: a (N,) token order
    ("bigbird", {"window": 8, "n_global": 4, "block": 16, "n_random": 1}, True),  # + global rows (dense kernel)
])
def test_engine_methods_take_built_in_mods_on_the_kernels_at_the_original_positions(method, params, causal):
    """Methods that run the layout / tiled engines themselves (reordered tokens, global rows) with ALiBi + a
    shared relative table + softcap on triton: equal to the same method on torch in float64 (whose mods see
    the original positions), values, lse and the gradients of q, k, v, the slopes and the table."""
    q, k, v = _qkv(1, 4, 2, 48, 48, grad=True)
    slopes = (torch.rand(4, device=DEV) * 0.3).requires_grad_()
    table = torch.randn(7, device=DEV, requires_grad=True)

    def mod(s, t):
        return az.mods.compose(az.mods.alibi(s), az.mods.relative_bias(t), az.mods.softcap(3.0))

    got = az.attention(q, k, v, method=method, causal=causal, score_mod=mod(slopes, table), return_lse=True,
                       backend="triton", **params)
    ref = _float64_leaves(q, k, v, slopes, table)
    want = az.attention(*ref[:3], method=method, causal=causal, score_mod=mod(*ref[3:]), return_lse=True,
                        backend="torch", **params)
    assert_matches(got[0].double(), got[1].double(), want[0], want[1], tol=2e-5)
    seed = torch.randn_like(want[0])
    _check_grads(torch.autograd.grad((got[0] * seed).sum(), (q, k, v, slopes, table)),
                 torch.autograd.grad((want[0] * seed).sum(), ref), 5e-5)


@pytest.mark.parametrize("method,params,lens,launches", [
    ("sliding_window", {"window": 12, "block": 16}, ([16, 0, 40, 3, 33], [20, 4, 40, 0, 33]), 1),
    ("strided", {"stride": 5, "local": 8, "block": 16}, ([16, 40, 3, 20], [16, 40, 3, 20]), 2 + 1),
])
def test_varlen_layout_methods_run_every_sequence_in_one_launch_per_layout(method, params, lens, launches):
    """Packed sequences of a layout method on triton: each sequence's own layouts (block and token layouts,
    with their masks) stacked into one launch per layout (a sequence shorter than a block has a smaller fitted
    block: one more launch); empty sequences, keys without queries, queries without keys. Equal to every
    sequence run alone on torch in float64 with ALiBi + a relative table + softcap and sinks, values, lse and
    gradients to q, k, v, the slopes, the table and the sinks."""
    lens_q, lens_k = lens
    q, k, v, cq, ck = _packed(lens_q, lens_k, True, grad=True)
    slopes = (torch.rand(4, device=DEV) * 0.3).requires_grad_()
    table, sinks = torch.randn(7, device=DEV, requires_grad=True), torch.randn(4, device=DEV, requires_grad=True)

    def mod(s, t):
        return az.mods.compose(az.mods.alibi(s), az.mods.relative_bias(t), az.mods.softcap(3.0))

    calls, real = [], kern._KernelAttention.apply
    kern._KernelAttention.apply = lambda *a: calls.append(a[4]) or real(*a)
    try:
        out, lse = az.attention(q, k, v, method=method, causal=True, score_mod=mod(slopes, table), sinks=sinks,
                                cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True, backend="triton", **params)
    finally:
        kern._KernelAttention.apply = real
    assert len(calls) == launches and all(c.seqs for c in calls)
    ref = _float64_leaves(q, k, v, slopes, table, sinks)
    parts = [az.attention(ref[0][:, :, q0:q1], ref[1][:, :, k0:k1], ref[2][:, :, k0:k1], method=method, causal=True,
                          score_mod=mod(*ref[3:5]), sinks=ref[5], return_lse=True, backend="torch", **params)
             for q0, q1, k0, k1 in zip(cq.tolist(), cq.tolist()[1:], ck.tolist(), ck.tolist()[1:]) if q1 > q0]
    r_out, r_lse = (torch.cat(t, 2) for t in zip(*parts))
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    seed = torch.randn_like(r_out)
    _check_grads(torch.autograd.grad((out * seed).sum(), (q, k, v, slopes, table, sinks)),
                 torch.autograd.grad((r_out * seed).sum(), ref), 5e-5)


def _user_bias_cap(table: torch.Tensor):
    """A user score_mod: a per-head relative table read by distance, then a soft cap (core.lowering reads it
    as a distance bias then softcap(2)); and the same function made untraceable (the eager reference)."""
    radius = table.shape[-1] // 2

    def fn(s, b, h, q_idx, kv_idx):
        return 2.0 * torch.tanh((s + table[h, (kv_idx - q_idx).clamp(-radius, radius) + radius]) / 2.0)

    return fn, lambda s, b, h, q_idx, kv_idx: fn(s, b, h, q_idx, kv_idx) if s.dim() else s


@pytest.mark.parametrize("method,params,Nq,Nk", [("exact", {}, 21, 37),
                                                 ("sliding_window", {"window": 12, "block": 16}, 32, 32)])
def test_lowered_user_functions_run_on_the_kernels_as_a_distance_table(method, params, Nq, Nk):
    """A user function that core.lowering reads as a distance bias + soft cap runs on the triton backend (it was
    refused before): the kernel gets the bias as a table over the call's distances (radius = the farthest one)
    and the cap; equal to the function itself on torch's eager path in float64, values, lse and gradients to
    q, k, v and the table the function closes over. mods.positional takes the same route."""
    q, k, v = _qkv(1, 4, 2, Nq, Nk, grad=True)
    table = torch.randn(4, 9, device=DEV, requires_grad=True)
    fn, _ = _user_bias_cap(table)
    ref = _float64_leaves(q, k, v, table)
    _, eager = _user_bias_cap(ref[3])
    seen, real = [], kern._KernelAttention.apply
    kern._KernelAttention.apply = lambda *a: seen.append((a[4].mod, a[6])) or real(*a)
    try:
        got = az.attention(q, k, v, method=method, causal=True, score_mod=fn, return_lse=True, backend="triton",
                           **params)
    finally:
        kern._KernelAttention.apply = real
    mod, tab = seen[0]
    assert mod.rel and mod.cap == 2.0 and tuple(tab.shape) == (4, 2 * (max(Nq, Nk) - 1) + 1)
    want = az.attention(*ref[:3], method=method, causal=True, score_mod=eager, return_lse=True, backend="torch",
                        **params)
    assert_matches(got[0].double(), got[1].double(), want[0], want[1], tol=2e-5)
    seed = torch.randn_like(want[0])
    _check_grads(torch.autograd.grad((got[0] * seed).sum(), (q, k, v, table)),
                 torch.autograd.grad((want[0] * seed).sum(), ref), 5e-5)
    rows = {r.backend: r for r in az.explain(method, q, k, v, causal=True, score_mod=fn, **params)}
    assert rows["triton"].runs, str(rows["triton"])
    positional = az.mods.positional(lambda s, b, h, qi, kj: s + 0.1 * (kj - qi).abs().float().sqrt(), 1)
    with torch.no_grad():
        got = az.attention(q, k, v, method=method, causal=True, score_mod=positional, backend="triton", **params)
        want = az.attention(*ref[:3], method=method, causal=True, score_mod=positional.fn, backend="torch", **params)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_varlen_one_launch_takes_a_lowered_user_function():
    """Packed sequences with a user function (table + cap) on triton: lowered once for the whole call, then ONE
    kernel launch (before: refused by the kernels, so each sequence went alone and the triton backend raised);
    equal to each sequence with the function itself on torch in float64, with gradients to q, k, v and the table."""
    lens_q, lens_k = [5, 0, 17, 3, 9], [9, 4, 17, 0, 30]
    q, k, v, cq, ck = _packed(lens_q, lens_k, True, grad=True)
    table = torch.randn(4, 9, device=DEV, requires_grad=True)
    fn, _ = _user_bias_cap(table)
    launches, real = [], kern.varlen_attention
    kern.varlen_attention = lambda *a, **kw: launches.append(sorted(kw)) or real(*a, **kw)
    try:
        out, lse = az.attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, score_mod=fn,
                                return_lse=True, backend="triton")
    finally:
        kern.varlen_attention = real
    assert len(launches) == 1 and {"table", "cap"} <= set(launches[0])
    ref = _float64_leaves(q, k, v, table)
    _, eager = _user_bias_cap(ref[3])
    parts = [az.attention(ref[0][:, :, q0:q1], ref[1][:, :, k0:k1], ref[2][:, :, k0:k1], causal=True,
                          score_mod=eager, return_lse=True, backend="torch")
             for q0, q1, k0, k1 in zip(cq.tolist(), cq.tolist()[1:], ck.tolist(), ck.tolist()[1:]) if q1 > q0]
    r_out, r_lse = (torch.cat(t, 2) for t in zip(*parts))
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    seed = torch.randn_like(r_out)
    _check_grads(torch.autograd.grad((out * seed).sum(), (q, k, v, table)),
                 torch.autograd.grad((r_out * seed).sum(), ref), 5e-5)


@pytest.mark.slow
@given(hq_hkv=st.sampled_from([(2, 2), (4, 2), (4, 1)]), nq=st.integers(1, 40), extra=st.integers(0, 24),
       causal=st.booleans(), alibi=st.booleans(), table=st.sampled_from([None, "head", "shared"]),
       cap=st.sampled_from([None, 0.5, 4.0]), sinks=st.booleans(), token=st.booleans())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_mods_and_sinks_sweep(hq_hkv, nq, extra, causal, alibi, table, cap, sinks, token):
    """Any combination of the mods and sinks, on the dense kernel or a token layout (per query head, holes),
    GQA, Nq <= Nk causal or any non-causal: out, lse and every gradient against a float64 dense reference."""
    from attnzoo.core.scoremod import apply_score_mod, with_sinks
    Hq, Hkv = hq_hkv
    Nk = nq + extra
    q, k, v = _qkv(1, Hq, Hkv, nq, Nk, grad=True)
    args, mod, leaves = _mod_case(Hq, alibi, table, cap)
    sink = torch.randn(Hq, device=DEV, requires_grad=True) if sinks else None
    vis = torch.ones(1, Hq, nq, Nk, dtype=torch.bool, device=DEV)
    if token:
        T = min(Nk, 12)
        tok = torch.stack([torch.randperm(Nk, device=DEV)[:T] for _ in range(Hq * nq)]).view(1, Hq, nq, T)
        tok[..., -2:] = -1
        vis = torch.zeros(1, Hq, nq, Nk + 1, dtype=torch.bool, device=DEV)
        vis = vis.scatter_(-1, torch.where(tok >= 0, tok, Nk), True)[..., :Nk]
        out, lse = kern.layout_attention(q, k, v, TokenLayout(tok, 1, nq, Nk), scale=0.3, causal=causal,
                                         sinks=sink, **args)
    else:
        out, lse = kern.flash_attention(q, k, v, scale=0.3, causal=causal, block_m=16, block_n=16, sinks=sink,
                                        **args)
    if causal:
        vis = vis & (torch.arange(Nk, device=DEV) <= torch.arange(nq, device=DEV)[:, None] + extra)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_sink = None if sink is None else sink.detach().double().requires_grad_()
    s = ref[0] @ ref[1].repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * 0.3
    s = apply_score_mod(mod, s, Nk - nq, 0) if mod is not None else s
    s = s.masked_fill(~vis, float("-inf"))
    r_lse = torch.logsumexp(s, -1)
    r_out = torch.nan_to_num(torch.softmax(s, -1)) @ ref[2].repeat_interleave(Hq // Hkv, 1)
    if sink is not None:
        r_out, r_lse = with_sinks(r_out, r_lse, r_sink)
    assert_matches(out.double(), lse.double(), r_out, r_lse, tol=3e-5)
    so, sl = torch.randn_like(r_out), torch.randn_like(r_lse)
    extra_leaves = [(t, r) for t, r in leaves] + ([(sink, r_sink)] if sink is not None else [])
    got = _grads(out, lse, (q, k, v, *(t for t, _ in extra_leaves)), so, sl)
    want = _grads(r_out, r_lse, (*ref, *(r for _, r in extra_leaves)), so, sl)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=3e-5)


@pytest.mark.parametrize("nq", [1, 3])
def test_split_k_reads_a_store_range_and_selected_slots(nq):
    """Split-K over slots [10, 70) of a (B, Hkv, cap) store, causal by slot, per-head padding; and over
    selected slots read in place. Partials of 3 splits merged by lse."""
    B, Hq, Hkv, cap, n = 2, 8, 2, 90, 70
    k, v = torch.randn(B, Hkv, cap, 16, device=DEV), torch.randn(B, Hkv, cap, 16, device=DEV)
    q = torch.randn(B, Hq, nq, 16, device=DEV)
    valid = torch.rand(B, Hkv, cap, device=DEV) > 0.2
    got = kern.split_k(q, k, v, scale=0.3, causal=True, valid=valid, start=10, stop=n, splits=3, block_n=16)
    pos = torch.arange(cap, device=DEV)
    vis = (pos >= 10) & (pos < n) & (pos.view(1, -1) <= (torch.arange(nq, device=DEV) + n - nq).view(-1, 1))
    vis = vis & valid.repeat_interleave(Hq // Hkv, 1)[:, :, None, :]
    r_out, r_lse = masked_reference(q.double(), k.double(), v.double(), vis, scale=0.3)
    assert_matches(got.out.double(), got.lse.double(), r_out, r_lse, tol=2e-5)

    idx = torch.stack([torch.randperm(n, device=DEV)[:33] for _ in range(B * Hkv)]).view(B, Hkv, 33)
    got = kern.split_k(q, k, v, scale=0.3, causal=False, valid=valid, idx=idx, splits=2, block_n=16)
    sel = torch.zeros(B, Hkv, cap, dtype=torch.bool, device=DEV).scatter_(-1, idx, True) & valid
    r_out, r_lse = masked_reference(q.double(), k.double(), v.double(),
                                    sel.repeat_interleave(Hq // Hkv, 1)[:, :, None, :], scale=0.3)
    assert_matches(got.out.double(), got.lse.double(), r_out, r_lse, tol=2e-5)


def test_sage_kernel_matches_the_sage_method_and_exact():
    """INT8 QKᵀ with K smoothing (K far from zero mean) and fp16 P·V: cosine to exact >= 0.999, equal to the
    torch sage method up to the fp16 rounding of P·V, lse corrected for the smoothing exactly."""
    q, k, v = _qkv(1, 4, 2, 40, 50, D=32)
    k = k + 3
    out, lse = az.attention(q, k, v, method="sage", block=16, causal=True, return_lse=True, backend="triton")
    t_out, t_lse = az.attention(q, k, v, method="sage", block=16, causal=True, return_lse=True, backend="torch")
    r_out, r_lse = naive_attention(q.double(), k.double(), v.double(), scale=32 ** -0.5, causal=True)
    assert torch.nn.functional.cosine_similarity(out.double().flatten(), r_out.flatten(), 0) >= 0.999
    torch.testing.assert_close(out, t_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, t_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,params", [("sliding_window", {"window": 12, "block": 16}),
                                           ("streaming", {"sinks": 4, "window": 16, "block": 16}),
                                           ("block_topk", {"block": 16, "topk": 2})])
def test_layout_methods_on_triton_equal_the_torch_backend(method, params):
    """Whole methods through attention(backend="triton"): the layouts the method builds, merged by lse."""
    q, k, v = _qkv(1, 4, 2, 48, 48)
    pad = torch.ones(1, 48, dtype=torch.bool, device=DEV)
    pad[0, 5:9] = False
    got = az.attention(q, k, v, method=method, causal=True, key_padding_mask=pad, return_lse=True,
                       backend="triton", **params)
    want = az.attention(q, k, v, method=method, causal=True, key_padding_mask=pad, return_lse=True,
                        backend="torch", **params)
    assert_matches(got[0].double(), got[1].double(), want[0].double(), want[1].double(), tol=2e-5)


def _sparse_on_triton():
    from attnzoo.backends import _method_names
    return [n for n in _method_names("triton").split(", ") if az.info(n).family.value not in ("exact", "quantised",
                                                                                                "linear RNN",
                                                                                                "kernelised")]


_SMALL = {"block_sparse": {"mask_mod": _window}, "bigbird": {"window": 8, "n_global": 4},
          "bilevel_routing": {"regions": 4}, "lsh": {"rounds": 1}, "routing": {}, "hyper": {"samples": 8}}


def _run_both(method, grad, Nq=64):
    params = dict(_SMALL.get(method, {}))
    params.update({p.name: 16 for p in az.info(method).params if p.name in ("block", "block_size", "chunk")})
    q, k, v = _qkv(1, 4, 2, Nq, 64, grad=grad)
    causal = az.info(method).supports.causal and method != "bilevel_routing"
    got = az.attention(q, k, v, method=method, causal=causal, return_lse=True, backend="triton", **params)
    want = az.attention(q, k, v, method=method, causal=causal, return_lse=True, backend="torch", **params)
    assert_matches(got[0].double(), got[1].double(), want[0].double(), want[1].double(), tol=2e-5)
    if grad and az.info(method).supports.grad:
        seed = torch.randn_like(got[0])
        _check_grads(torch.autograd.grad((got[0] * seed).sum(), (q, k, v)),
                     [g.double() for g in torch.autograd.grad((want[0] * seed).sum(), (q, k, v))], 5e-5)


@pytest.mark.parametrize("method", ["bigbird", "lsh"])
def test_methods_beyond_their_layouts_run_their_engines_on_the_kernels(method):
    """BigBird's global rows (tiled engine) and LSH's sorted buckets + sampled tokens (layout engine)."""
    _run_both(method, grad=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", _sparse_on_triton())
def test_every_sparse_method_runs_on_triton(method):
    """Every sparse method with a Triton runner equals its torch backend, forward and backward."""
    _run_both(method, grad=True)


def test_flash_decode_and_exact_tiled_dispatch_to_the_kernels():
    q, k, v = _qkv(1, 4, 2, 2, 45)
    for method in ("flash_decode", "exact_tiled", "exact"):
        out, lse = az.attention(q, k, v, method=method, causal=True, return_lse=True, backend="triton")
        r_out, r_lse = naive_attention(q.double(), k.double(), v.double(), scale=0.25, causal=True)
        assert_matches(out.double(), lse.double(), r_out, r_lse, tol=2e-5)
    assert math.isfinite(float(lse.sum()))


@pytest.mark.parametrize("policy,params", [("full", {"splits": 3, "split_size": 8}),
                                           ("quest", {"budget": 16, "page": 4, "local": 4, "sinks": 0, "splits": 2})])
def test_kv_cache_reads_through_the_split_k_kernel(monkeypatch, policy, params):
    """A cache decoding through the kernel (as it does on CUDA: ranges in place, selected slots read without a
    gather copy) gives the torch reads' outputs and lse at every step."""
    from attnzoo.cache import read
    q, k, v = _qkv(1, 4, 2, 40, 40)

    def decode():
        cache = az.KVCache(policy, **params)
        cache.append(k[:, :, :32], v[:, :, :32])
        outs = [cache.attend(q[:, :, :32], return_lse=True)]
        for t in range(32, 36):
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            outs.append(cache.attend(q[:, :, t:t + 1], return_lse=True))
        return outs

    want = decode()
    monkeypatch.setattr(read, "auto_triton", lambda t: True)
    for (o, l), (wo, wl) in zip(decode(), want):
        assert_matches(o.double(), l.double(), wo.double(), wl.double(), tol=2e-5)


@pytest.mark.parametrize("method,extra", [("lightning", {}), ("gla", {"g": True}), ("linear", {})])
def test_linear_methods_on_the_chunked_kernels(method, extra):
    """No decay (+ normaliser), a decay per head, per-token-per-channel gates; outputs and gradients of q, k,
    v (and g) equal the torch engine in float64; GQA (K/V repeated by the engine), Nq < Nk, padding."""
    q, k, v = (t.double().detach().requires_grad_() for t in _qkv(1, 4, 2, 19, 37))
    pad = torch.ones(1, 37, dtype=torch.bool, device=DEV)
    pad[0, 3:6] = False
    inputs = {}
    if extra:
        inputs["g"] = (torch.nn.functional.logsigmoid(torch.randn(1, 4, 37, 16, device=DEV)) / 4).double()
        inputs["g"].requires_grad_()
    leaves = (q, k, v, *inputs.values())
    got = az.attention(q.float(), k.float(), v.float(), method=method, causal=True, key_padding_mask=pad,
                       backend="triton", **{n: t.float() for n, t in inputs.items()})
    want = az.attention(q, k, v, method=method, causal=True, key_padding_mask=pad, backend="torch", **inputs)
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5)
    seed = torch.randn_like(want)
    _check_grads(torch.autograd.grad((got.double() * seed).sum(), leaves),
                 torch.autograd.grad((want * seed).sum(), leaves), 2e-4)


def test_gla_gates_too_steep_for_the_factorised_kernel_are_refused_with_the_reason():
    q, k, v = _qkv(1, 2, 2, 20, 20)
    g = torch.full((1, 2, 20, 16), -10.0, device=DEV)  # -160 per 16-token chunk
    rows = az.explain("gla", q, k, v, causal=True, g=g)
    assert not next(r for r in rows if r.backend == "triton").runs
    with pytest.raises(az.UnsupportedError, match="decaying below -60"):
        az.attention(q, k, v, method="gla", causal=True, g=g, backend="triton")
    torch.testing.assert_close(az.attention(q, k, v, method="gla", causal=True, g=g, backend="auto"),
                               az.attention(q, k, v, method="gla", causal=True, g=g, backend="torch"))


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_within_shared_memory():
    """The interpreter does not run Triton's compiler: compile every kernel (dense/blocks/tokens, int8, the
    backward, the linear kernels at D=128) to a cubin with Triton's bundled toolchain, no GPU needed."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(here) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.join(here, "_compile_kernels.py")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
