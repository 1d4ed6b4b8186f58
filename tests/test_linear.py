"""The linear-recurrence engine, its feature maps, the linear / low-rank / hybrid methods and the learned layers.

Seeds: the autouse fixture seeds torch with 0 before every test; hypothesis
draws shapes and its own seeds. Tolerances are written next to each check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo.core.features import orthogonal_gaussian, taylor2
from attnzoo.core.linear import LinearState, linear_attention, softmax_prefix_scan
from attnzoo.layers import AarenLayer, GLALayer, LinformerLayer, SLABLayer

FORMS = ("parallel", "chunked", "recurrent")


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def qkv(B=2, Hq=4, Hkv=2, Nq=33, Nk=33, D=8, Dv=8, dtype=torch.float32, scale=1.0):
    q = torch.randn(B, Hq, Nq, D, dtype=dtype) * scale
    k = torch.randn(B, Hkv, Nk, D, dtype=dtype) * scale
    v = torch.randn(B, Hkv, Nk, Dv, dtype=dtype)
    return q, k, v


def gate(kind: str, B: int, H: int, N: int, D: int, dtype=torch.float32):
    if kind == "none":
        return None
    if kind == "invariant":  # one decay per head for every position (Lightning / RetNet)
        return F.logsigmoid(torch.randn(1, H, 1, 1, dtype=dtype) + 2)
    width = 1 if kind == "scalar" else D
    return F.logsigmoid(torch.randn(B, H, N, width, dtype=dtype) + 2)


def oracle(q, k, v, method="naive", **kw):
    return az.attention(q.double(), k.double(), v.double(), method=method, **kw)


# ------------------------------------------------------------------ engine
@pytest.mark.parametrize("decay", ["none", "invariant", "scalar", "channel"])
@pytest.mark.parametrize("chunk", [5, 16, 64])  # 5 and 16 do not divide N=37; 64 > N
@pytest.mark.parametrize("normalize", [False, True])
def test_forms_agree_fp32(decay, chunk, normalize):
    q, k, v = qkv(Nq=37, Nk=37)
    q, k = q.abs(), k.abs()  # positive features keep the normaliser away from 0
    g = gate(decay, 2, 4, 37, 8)
    outs = {f: linear_attention(q, k, v, gate=g, form=f, chunk=chunk, normalize=normalize) for f in FORMS}
    ref_out, ref_state = outs["recurrent"]
    for form in ("parallel", "chunked"):
        out, state = outs[form]
        assert rel(out, ref_out) <= 1e-5, form
        assert rel(state.packed(), ref_state.packed()) <= 1e-5, form


@pytest.mark.parametrize("decay", ["none", "invariant", "scalar", "channel"])
def test_state_handover_equals_one_shot(decay):
    q, k, v = qkv(Hq=4, Hkv=4, Nq=40, Nk=40, dtype=torch.float64)
    g = gate(decay, 2, 4, 40, 8, torch.float64)
    full, full_state = linear_attention(q, k, v, gate=g, chunk=8)
    outs, state = [], None
    for a, b in ((0, 13), (13, 14), (14, 40)):  # pieces of 13, 1 and 26 tokens
        piece = None if g is None or g.shape[2] == 1 else g[:, :, a:b]
        out, state = linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], chunk=8, state=state,
                                      gate=g if piece is None else piece, form="recurrent" if b - a == 1 else "chunked")
        outs.append(out)
    assert rel(torch.cat(outs, dim=2), full) <= 1e-12
    assert rel(state.kv, full_state.kv) <= 1e-12 and state.tokens == 40


@pytest.mark.parametrize("decay", ["none", "invariant", "scalar", "channel"])
def test_chunked_gradients_match_parallel(decay):
    q, k, v = qkv(Hq=2, Hkv=2, Nq=21, Nk=21, dtype=torch.float64)
    g = gate(decay, 2, 2, 21, 8, torch.float64)
    s0 = LinearState(torch.randn(2, 2, 8, 8, dtype=torch.float64))
    leaves = [t.requires_grad_() for t in (q, k, v) + (() if g is None else (g,)) + (s0.kv,)]
    grads = {}
    for form in ("parallel", "chunked"):
        out, state = linear_attention(q, k, v, gate=g, form=form, chunk=6, state=s0)
        loss = (out * torch.cos(out)).sum() + (state.kv ** 2).sum()
        grads[form] = torch.autograd.grad(loss, leaves)
    for a, b in zip(grads["parallel"], grads["chunked"]):
        assert rel(b, a) <= 1e-10


def test_extreme_gates_stay_finite_and_agree():
    """α → 0 (g = -1e30 or -inf), α = 1 (g = 0) and gates strong enough to force the segment-sum fallback."""
    q, k, v = qkv(Hq=2, Hkv=2, Nq=30, Nk=30, D=4, Dv=4)
    g = torch.zeros(2, 2, 30, 4)
    g[:, :, 3] = -1e30
    g[:, :, 7, :2] = -math.inf
    g[:, :, 10:20] = -9.0  # cumulative -90 inside a chunk: beyond the factorised form's safe range
    g.requires_grad_()
    leaves = [t.requires_grad_() for t in (q, k, v)] + [g]
    outs = {}
    for form in FORMS:
        out, state = linear_attention(q, k, v, gate=g, form=form, chunk=16)
        assert torch.isfinite(out).all() and torch.isfinite(state.kv).all(), form
        grads = torch.autograd.grad(out.square().sum() + state.kv.sum(), leaves)
        assert all(torch.isfinite(t).all() for t in grads), form
        outs[form] = out
    assert rel(outs["chunked"], outs["recurrent"]) <= 1e-5
    assert rel(outs["parallel"], outs["recurrent"]) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 3), Nk=st.integers(1, 40), extra=st.integers(-5, 40),
       D=st.integers(1, 6), chunk=st.integers(1, 20), decay=st.sampled_from(["none", "invariant", "scalar", "channel"]),
       seed=st.integers(0, 2**16))
def test_forms_agree_property(B, Hkv, G, Nk, extra, D, chunk, decay, seed):
    """Any shape, GQA ratio, Nq != Nk (bottom-right; Nq > Nk leaves early rows empty), any chunk."""
    torch.manual_seed(seed)
    Nq = max(1, Nk - extra)
    q, k, v = qkv(B, Hkv * G, Hkv, Nq, Nk, D, 3, torch.float64)
    g = gate(decay, B, Hkv * G, Nk, D, torch.float64)
    ref, _ = linear_attention(q, k, v, gate=g, form="recurrent")
    for form in ("parallel", "chunked"):
        out, _ = linear_attention(q, k, v, gate=g, form=form, chunk=chunk)
        assert out.shape == (B, Hkv * G, Nq, 3)
        assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)


def test_engine_noncausal_padding_and_gqa_against_dense():
    q, k, v = qkv(Hq=4, Hkv=2, Nq=9, Nk=12, dtype=torch.float64)
    mask = torch.rand(2, 12) > 0.3
    out, _ = linear_attention(q, k, v, causal=False, key_padding_mask=mask)
    kk, vv = k.repeat_interleave(2, 1) * mask[:, None, :, None], v.repeat_interleave(2, 1)
    assert rel(out, q @ kk.transpose(-1, -2) @ vv) <= 1e-12


def test_softmax_prefix_scan_is_exact_and_resumable():
    s, v = torch.randn(2, 3, 50, dtype=torch.float64) * 4, torch.randn(2, 3, 50, 5, dtype=torch.float64)
    s[0, 0, 10] = -math.inf  # a masked key
    ref = torch.stack([torch.softmax(s[..., : t + 1], -1).unsqueeze(-2) @ v[..., : t + 1, :] for t in range(50)], 2)
    out, state = softmax_prefix_scan(s, v)
    assert rel(out, ref.squeeze(-2)) <= 1e-6
    first, mid = softmax_prefix_scan(s[..., :17], v[..., :17, :])
    second, _ = softmax_prefix_scan(s[..., 17:], v[..., 17:, :], mid)
    assert rel(torch.cat([first, second], dim=2), ref.squeeze(-2)) <= 1e-6


# ------------------------------------------------------------ feature maps
def test_taylor2_is_the_second_order_expansion():
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    x = (a * b).sum(-1)
    assert torch.allclose((taylor2(a) * taylor2(b)).sum(-1), 1 + x + x**2 / 2)
    assert taylor2(a).shape[-1] == 1 + 7 + 49


def test_orthogonal_features_are_seeded_and_orthogonal_in_blocks():
    w = orthogonal_gaussian(20, 8, seed=3, dtype=torch.float64)
    assert torch.equal(w, orthogonal_gaussian(20, 8, seed=3, dtype=torch.float64))
    block = w[:8] / w[:8].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------ methods
def test_linear_matches_its_formula_causal_and_not_with_padding():
    q, k, v = qkv(Hq=4, Hkv=2, Nq=20, Nk=20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 4:9] = False
    fq, fk = F.elu(q.double()) + 1, (F.elu(k.double()) + 1).repeat_interleave(2, 1) * mask[:, None, :, None]
    vv = v.double().repeat_interleave(2, 1)
    for causal in (True, False):
        a = fq @ fk.transpose(-1, -2)
        if causal:
            a = a.tril()
        ref = (a @ vv) / (a.sum(-1, keepdim=True) + 1e-6)
        out = az.attention(q, k, v, method="linear", causal=causal, key_padding_mask=mask)
        assert rel(out, ref) <= 1e-5


def test_gla_matches_an_explicit_recurrence():
    """The flash-linear-attention ``naive_recurrent_gla`` convention, written out (scale·q, exp(g) on the key dim)."""
    q, k, v = qkv(Hq=2, Hkv=2, Nq=19, Nk=19, D=6, Dv=5, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(2, 2, 19, 6, dtype=torch.float64))
    s = torch.zeros(2, 2, 6, 5, dtype=torch.float64)
    ref = []
    for t in range(19):
        s = s * g[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        ref.append(((q[:, :, t] * 6**-0.5)[..., None] * s).sum(-2))
    out = az.attention(q, k, v, method="gla", causal=True, g=g, chunk=4)
    assert rel(out, torch.stack(ref, 2)) <= 1e-12


def test_gla_with_zero_gates_equals_lightning_without_decay():
    q, k, v = qkv(Nq=30, Nk=30)
    g = torch.zeros(2, 4, 30, 8)
    assert rel(az.attention(q, k, v, method="gla", causal=True, g=g),
               az.attention(q, k, v, method="lightning", causal=True, decay=1.0)) <= 1e-5


def test_lightning_decay_matches_its_formula():
    q, k, v = qkv(Hq=3, Hkv=3, Nq=25, Nk=25, dtype=torch.float64)
    lam = torch.tensor([1.0, 0.9, 0.0], dtype=torch.float64)
    t = torch.arange(25)
    dist = (t[:, None] - t[None, :]).clamp(min=0).double()
    decay = torch.where(t[:, None] >= t[None, :], lam[:, None, None] ** dist, 0.0)
    ref = ((q * 8**-0.5) @ k.transpose(-1, -2) * decay) @ v
    assert rel(az.attention(q, k, v, method="lightning", causal=True, decay=lam, chunk=7), ref) <= 1e-12
    retnet = az.attention(q, k, v, method="lightning", causal=True)  # default decay 1 - 2^(-5-h)
    lam_rn = 1 - 2.0 ** (-5 - torch.arange(3, dtype=torch.float64))
    ref_rn = ((q * 8**-0.5) @ k.transpose(-1, -2) * torch.where(t[:, None] >= t[None, :], lam_rn[:, None, None] ** dist, 0.0)) @ v
    assert rel(retnet, ref_rn) <= 1e-12


@pytest.mark.parametrize("method,params,inputs", [
    ("linear", {}, False), ("performer", {"features": 32}, False), ("lightning", {}, False),
    ("gla", {}, True), ("based", {"window": 6, "feature_dim": 4}, False)])
def test_decode_from_prefill_state_equals_one_shot(method, params, inputs):
    q, k, v = qkv(Hq=4, Hkv=2, Nq=26, Nk=26, scale=0.5)
    extra = {"g": F.logsigmoid(torch.randn(2, 4, 26, 8) + 2)} if inputs else {}
    m = az.get(method, chunk=8, **params)
    full = m(q, k, v, causal=True, **extra)
    cut = lambda d, a, b: {n: t[:, :, a:b] for n, t in d.items()}  # noqa: E731
    out, state = m.run(q[:, :, :11], k[:, :, :11], v[:, :, :11], **cut(extra, 0, 11))
    outs = [out]
    for t in range(11, 26):
        out, state = m.run(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, **cut(extra, t, t + 1))
        outs.append(out)
    assert rel(torch.cat(outs, dim=2), full) <= 1e-5
    # the plain call with Nq < Nk (recompute) agrees too
    assert rel(m(q[:, :, -3:], k, v, causal=True, **extra), full[:, :, -3:]) <= 1e-5


def test_low_rank_methods_are_exact_at_full_rank():
    q, k, v = qkv(Hq=4, Hkv=2, Nq=24, Nk=30, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, -6:] = False
    exact = oracle(q, k, v, key_padding_mask=mask)
    for kk in (30, 100):  # k >= Nk: one key per segment
        assert rel(az.get("linformer", k=kk)(q, k, v, key_padding_mask=mask), exact) <= 1e-12
    # Nyström with landmarks = N: A·pinv(A)·A·V; 20 Newton–Schulz steps converge to 1e-10 here
    # (measured ~1e-14); the default 6 steps leave a few percent on these inputs.
    q2 = q[:, :, :30] if q.shape[2] >= 30 else torch.randn(2, 4, 30, 8, dtype=torch.float64)
    exact2 = oracle(q2, k, v, key_padding_mask=mask)
    assert rel(az.attention(q2, k, v, method="nystrom", landmarks=30, pinv_iters=20, key_padding_mask=mask), exact2) <= 1e-10
    assert rel(az.attention(q2, k, v, method="nystrom", landmarks=30, key_padding_mask=mask), exact2) <= 0.1


def test_performer_error_shrinks_with_features():
    """Mean relative error over 4 seeds, D=16, inputs of std 0.5: measured ≈ 0.37 (16), 0.15 (256), 0.05 (4096)."""
    q, k, v = qkv(B=1, Hq=2, Hkv=2, Nq=48, Nk=48, D=16, Dv=8, dtype=torch.float64, scale=0.5)
    exact = oracle(q, k, v)
    err = {m: sum(rel(az.attention(q, k, v, method="performer", features=m, seed=s), exact) for s in range(4)) / 4
           for m in (16, 256, 4096)}
    assert err[256] < 0.7 * err[16] and err[4096] < 0.6 * err[256] and err[4096] < 0.1, err


def test_performer_redraw_changes_features_and_seed_fixes_them():
    q, k, v = qkv(Nq=16, Nk=16, scale=0.5)
    torch.manual_seed(1)
    a = az.attention(q, k, v, method="performer", features=8, redraw=True)
    b = az.attention(q, k, v, method="performer", features=8, redraw=True)
    assert not torch.equal(a, b)
    assert torch.equal(az.attention(q, k, v, method="performer", features=8, seed=5),
                       az.attention(q, k, v, method="performer", features=8, seed=5))


def test_aaren_equals_causal_exact_with_lse():
    q, k, v = qkv(Hq=4, Hkv=2, Nq=21, Nk=30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :12] = False  # early rows of batch 0 see nothing: out 0, lse -inf
    ref, ref_lse = oracle(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
    out, lse = az.attention(q, k, v, method="aaren", causal=True, key_padding_mask=mask, return_lse=True, chunk=7)
    assert rel(out, ref) <= 1e-5
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    assert torch.allclose(lse[torch.isfinite(lse)].double(), ref_lse[torch.isfinite(ref_lse)], atol=1e-5)


def test_based_window_covering_everything_is_exact():
    q, k, v = qkv(Hq=4, Hkv=2, Nq=30, Nk=30, dtype=torch.float64)
    assert rel(az.attention(q, k, v, method="based", causal=True, window=30), oracle(q, k, v, causal=True)) <= 1e-12


def test_based_taylor_part_is_its_formula():
    """window=1: only the diagonal is exact; every older key is weighted by 1 + x + x²/2, x = scale·q·k (feature_dim >= D)."""
    q, k, v = qkv(Hq=2, Hkv=2, Nq=15, Nk=15, D=4, dtype=torch.float64, scale=0.5)
    x = (q @ k.transpose(-1, -2)) * 0.5
    w = torch.where(torch.eye(15, dtype=torch.bool), torch.exp(x), 1 + x + x**2 / 2).tril()
    ref = (w @ v) / w.sum(-1, keepdim=True)
    assert rel(az.attention(q, k, v, method="based", causal=True, window=1, feature_dim=4), ref) <= 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_scatterbrain_exact_when_omega_is_everything_and_close_otherwise(causal):
    q, k, v = qkv(Hq=4, Hkv=2, Nq=40, Nk=40, dtype=torch.float64, scale=0.5)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 30:] = False
    exact = oracle(q, k, v, causal=causal, key_padding_mask=mask)
    full = az.attention(q, k, v, method="scatterbrain", causal=causal, buckets=1, chunk=64, key_padding_mask=mask)
    assert rel(full, exact) <= 1e-10
    approx = az.attention(q, k, v, method="scatterbrain", causal=causal, buckets=4, chunk=8, key_padding_mask=mask)
    assert torch.isfinite(approx).all() and rel(approx, exact) < 0.5


def test_half_inputs_return_half():
    q, k, v = qkv(Nq=20, Nk=20, dtype=torch.bfloat16)
    out = az.attention(q, k, v, method="lightning", causal=True)
    assert out.dtype == torch.bfloat16
    assert rel(out, az.attention(q.float(), k.float(), v.float(), method="lightning", causal=True)) <= 1e-2


@pytest.mark.parametrize("method", ["linear", "performer", "lightning", "based", "aaren", "scatterbrain", "linformer",
                                    "nystrom"])
def test_backward_runs_and_is_finite(method):
    causal = method not in ("linformer", "nystrom")
    q, k, v = (t.requires_grad_() for t in qkv(Nq=20, Nk=20))
    az.attention(q, k, v, method=method, causal=causal).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(Nq=10, Nk=10)
    with pytest.raises(az.AttnZooError, match="missing required input 'g'"):
        az.attention(q, k, v, method="gla", causal=True)
    with pytest.raises(az.AttnZooError, match=r"g: expected shape \(2, 4, 10, 8\)"):
        az.attention(q, k, v, method="gla", causal=True, g=torch.zeros(2, 2, 10, 8))
    with pytest.raises(az.AttnZooError, match="log-gates <= 0"):
        az.attention(q, k, v, method="gla", causal=True, g=torch.full((2, 4, 10, 8), 0.1))
    with pytest.raises(az.AttnZooError, match="NaN"):
        az.attention(q, k, v, method="gla", causal=True, g=torch.full((2, 4, 10, 8), math.nan))
    for method in ("lightning", "gla", "aaren", "based"):
        with pytest.raises(az.UnsupportedError, match="causal=False"):
            az.attention(q, k, v, method=method, causal=False, g=torch.zeros(2, 4, 10, 8)) if method == "gla" \
                else az.attention(q, k, v, method=method, causal=False)
    for method in ("linformer", "nystrom"):
        with pytest.raises(az.UnsupportedError, match="causal=True"):
            az.attention(q, k, v, method=method, causal=True)
    for bad in (0, -3):
        with pytest.raises(az.AttnZooError, match="'features'"):
            az.attention(q, k, v, method="performer", features=bad)
        with pytest.raises(az.AttnZooError, match="'features'"):
            az.attention(q, k, v, method="scatterbrain", features=bad)
    with pytest.raises(az.AttnZooError, match="'decay'"):
        az.get("lightning", decay=1.5)
    with pytest.raises(az.AttnZooError, match="4 values"):
        az.attention(q, k, v, method="lightning", causal=True, decay=torch.tensor([0.5, 0.9]))
    with pytest.raises(az.AttnZooError, match="'buckets'"):
        az.get("scatterbrain", buckets=3)
    with pytest.raises(az.AttnZooError, match="state: expected kv"):
        az.get("lightning").run(q, k, v, LinearState(torch.zeros(2, 4, 3, 3)))
    with pytest.raises(az.AttnZooError, match="redraw=False"):
        az.get("performer", redraw=True).run(q, k, v, LinearState(torch.zeros(2, 4, 256, 8), torch.zeros(2, 4, 256)))
    with pytest.raises(az.AttnZooError, match="unknown input"):
        az.get("lightning").run(q, k, v, g=torch.zeros(2, 4, 10, 8))
    with pytest.raises(az.AttnZooError, match="gate: decay needs causal=True"):
        linear_attention(q, k, v, causal=False, gate=torch.zeros(2, 4, 10, 1))


# ------------------------------------------------------------------ layers
def _train(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 25) -> tuple[float, float]:
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = F.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-5:])


@pytest.mark.parametrize("make", [
    lambda: GLALayer(16, n_heads=2, chunk=8), lambda: LinformerLayer(16, n_heads=2, max_len=24, k=8),
    lambda: SLABLayer(16, n_heads=2, chunk=8), lambda: SLABLayer(16, n_heads=2, causal=False, kernel=3),
    lambda: AarenLayer(16, n_heads=2)], ids=["gla", "linformer", "slab", "slab-noncausal", "aaren"])
def test_layers_train_on_a_toy_task(make):
    """Target: a causal running mean of a fixed linear map of x; 25 Adam steps must cut the loss by >= 40%."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(4, 24, 16)
    y = torch.cumsum(x @ torch.randn(16, 16) * 0.5, dim=1) / torch.arange(1, 25).view(1, -1, 1)
    first, last = _train(layer, x, y)
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("make", [lambda: GLALayer(16, n_heads=2, chunk=4), lambda: AarenLayer(16, n_heads=2)],
                         ids=["gla", "aaren"])
def test_recurrent_layers_decode_like_one_shot(make):
    layer = make()
    x = torch.randn(2, 15, 16)
    with torch.no_grad():
        full, _ = layer(x)
        out, state = layer(x[:, :6])
        outs = [out]
        for t in range(6, 15):
            out, state = layer(x[:, t:t + 1], state)
            outs.append(out)
    assert rel(torch.cat(outs, dim=1), full) <= 1e-5


def test_layer_errors():
    with pytest.raises(az.AttnZooError, match="n_heads"):
        GLALayer(10, n_heads=3)
    with pytest.raises(az.AttnZooError, match="max_len"):
        LinformerLayer(8, 2, max_len=4)(torch.randn(1, 5, 8))
    with pytest.raises(az.AttnZooError, match="odd kernel"):
        SLABLayer(8, 2, causal=False, kernel=4)
