"""Backend dispatch: explicit choices raise with their reasons, explain() lists every backend, flex's block masks."""

import warnings

import pytest
import torch

import attnzoo as az
from attnzoo.core.blocksparse import BlockLayout, attend

from _sparse_ref import assert_matches


def _qkv(dtype=torch.float32):
    return torch.randn(1, 4, 24, 16, dtype=dtype), torch.randn(1, 2, 24, 16, dtype=dtype), \
        torch.randn(1, 2, 24, 16, dtype=dtype)


def test_auto_on_cpu_is_torch_and_unknown_backend_is_named():
    q, k, v = _qkv()
    torch.testing.assert_close(az.attention(q, k, v, backend="auto"), az.attention(q, k, v, backend="torch"))
    with pytest.raises(az.AttnZooError, match=r"backend: expected one of auto, torch, triton, flex, got 'cuda'"):
        az.attention(q, k, v, backend="cuda")


def test_explicit_backend_that_cannot_run_raises_with_its_reasons():
    q, k, v = _qkv(torch.float64)
    with pytest.raises(az.UnsupportedError, match=r"'exact' cannot run on backend 'triton': .*dtype torch.float64"):
        az.attention(q, k, v, backend="triton")
    with pytest.raises(az.UnsupportedError, match=r"'naive' cannot run on backend 'triton': no triton implementation"):
        az.attention(q, k, v, method="naive", backend="triton")
    with pytest.raises(az.UnsupportedError, match=r"backend 'flex': gradients to q, k, v on CPU \(FlexAttention has no"):
        az.attention(q.float().requires_grad_(), k.float(), v.float(), method="sliding_window", window=8,
                     backend="flex")


def test_explain_lists_every_backend_with_reasons():
    q, k, v = _qkv()
    rows = az.explain("bigbird", q, k, v, causal=True, window=8, block=8)
    assert [r.backend for r in rows] == ["auto (torch)", "torch", "triton", "flex"]
    assert rows[1].runs and not rows[3].runs
    assert any("computes more than its layouts" in r for r in rows[3].reasons)  # flex: layouts only
    assert any("no triton implementation of 'probsparse'" in r for r in az.explain("probsparse", q, k, v)[2].reasons)
    q.requires_grad_()
    rows = az.explain("sage", q, k, v)  # sage has no gradients: a reason on every backend
    assert all(not r.runs and "gradients" in str(r) for r in rows)


def test_info_backends_lists_availability():
    from typer.testing import CliRunner

    from attnzoo.cli import app
    res = CliRunner().invoke(app, ["info", "--backends"])
    assert res.exit_code == 0, res.output
    assert "triton" in res.output and "flex" in res.output and "sliding_window" in res.output


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_flex_block_mask_of_a_layout_equals_the_engine(causal):
    """The FlexAttention BlockMask built from a layout (partial blocks, per-head rows, GQA, padding) gives the
    engine's (out, lse); run with eager flex_attention on CPU (compiled on CUDA)."""
    from attnzoo.kernels.flex import flex_layout_attention
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 40, 56
    q, k, v = torch.randn(B, Hq, Nq, 16), torch.randn(B, Hkv, Nk, 16), torch.randn(B, Hkv, Nk, 16)
    pad = torch.rand(B, Nk) > 0.2
    lays = [BlockLayout.from_mask_mod(lambda b, h, qi, kj: (qi + 16 - kj).abs() < 10 + h, heads=Hkv, len_q=Nq,
                                      len_k=Nk, block=16, causal=causal),
            BlockLayout.from_indices(torch.randint(-1, 4, (B, Hq, 3, 3)), block_q=16, block_k=16, len_q=Nq,
                                     len_k=Nk)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it materialises the scores
        for lay in lays:
            for mask in (None, pad):
                got = flex_layout_attention(q, k, v, lay, scale=0.3, causal=causal, key_padding_mask=mask)
                want = attend(q.double(), k.double(), v.double(), lay, scale=0.3, causal=causal,
                              key_padding_mask=mask)
                # fp32 flex against a float64 reference: eager flex keeps lse in base 2 and converts, so its lse
                # differs by up to ~5e-5 at |lse| ~ 4 on some CPUs (CI saw 5.1e-5); 2e-4 bounds that with margin.
                assert_matches(got[0].double(), got[1].double(), *want, tol=2e-4)


@pytest.mark.parametrize("method, params", [("exact", {}), pytest.param("sliding_window", {"window": 12},
                                                                         marks=pytest.mark.slow),
                                            ("block_topk", {"block": 8, "topk": 2})])
def test_flex_runs_any_score_mod_and_sinks_like_the_dense_reference(method, params):
    """The flex backend on CPU (eager FlexAttention, float64): built-in mods, their composition and a user
    function at attnzoo's bottom-right aligned positions (Nq < Nk), GQA, key padding, sinks merged after the
    call; values and lse against the torch engines in float64 (the dense reference for exact; the same layouts,
    selected on the modified scores, for block_topk), the learnable table's gradient too."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 40, 56
    q, k, v = (torch.randn(B, h, n, 16, generator=g, dtype=torch.float64) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    pad = torch.rand(B, Nk, generator=g) > 0.2
    table = torch.randn(Hq, 9, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64)
    mods = az.mods
    cases = [mods.alibi(mods.alibi_slopes(Hq).double()), mods.softcap(3.0), mods.relative_bias(table),
             mods.compose(mods.relative_bias(table), mods.alibi(torch.rand(Hq, generator=g).double()),
                          mods.softcap(4.0)),
             lambda s, b, h, qi, ki: torch.tanh(s / 5) * 5 - 0.05 * (qi - ki).abs() * (h + 1) + 0.1 * b]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it materialises the scores
        for mod in cases:
            for mask, sink in ((None, None), (pad, sinks)):
                got = az.attention(q, k, v, method=method, causal=True, score_mod=mod, key_padding_mask=mask,
                                   sinks=sink, return_lse=True, backend="flex", **params)
                want = az.attention(q, k, v, method=method, causal=True, score_mod=mod, key_padding_mask=mask,
                                    sinks=sink, return_lse=True, backend="torch", **params)
                # FlexAttention's lse goes through base 2 with a float32 constant: ~6e-8 relative even in float64,
                # and the sink merge carries that into the values; without sinks the values agree to 1e-10
                assert_matches(*got, *want, tol=1e-6)
                if sink is None:
                    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-10)
        grads = [torch.autograd.grad(az.attention(q, k, v, method=method, causal=True, backend=b, **params,
                                                  score_mod=mods.relative_bias(table)).square().sum(), table)[0]
                 for b in ("flex", "torch")]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)
    assert grads[0].abs().sum() > 0
    row = next(r for r in az.explain(method, q, k, v, causal=True, score_mod=cases[-1], **params)
               if r.backend == "flex")
    assert row.runs and "eager FlexAttention" in row.note, str(row)


def test_triton_takes_built_in_mods_and_names_what_it_refuses():
    """explain(): the triton backend runs alibi / relative_bias / their sums / a final softcap (as kernel
    specialisations); a user function, a softcap before a bias and mismatched slopes are reasons, also for a
    method whose triton runner overrides the engines (bigbird)."""
    pytest.importorskip("triton")
    q, k, v = _qkv()
    mods = az.mods
    ok = [mods.alibi(mods.alibi_slopes(4)), mods.softcap(20.0),
          mods.compose(mods.relative_bias(torch.randn(9)), mods.alibi(torch.rand(4)), mods.softcap(5.0))]
    for mod in ok:
        row = next(r for r in az.explain("exact", q, k, v, causal=True, score_mod=mod) if r.backend == "triton")
        assert row.runs and "kernel specialisation" in row.note, str(row)
    refused = [(lambda s, b, h, qi, ki: s * 2 + qi, "score_mod '<lambda>'"),  # not lowerable (reads q_idx alone)
               (mods.compose(mods.softcap(5.0), mods.alibi(torch.rand(4))), "softcap before another mod"),
               (mods.alibi(torch.rand(3)), r"alibi slopes of shape \(3,\) \(expected \(4,\)\)")]
    for mod, why in refused:
        row = next(r for r in az.explain("exact", q, k, v, causal=True, score_mod=mod) if r.backend == "triton")
        assert not row.runs and any(__import__("re").search(why, r) for r in row.reasons), str(row)
        with pytest.raises(az.UnsupportedError, match=why):
            az.attention(q, k, v, causal=True, score_mod=mod, backend="triton")
    for mod, runs in ((mods.softcap(5.0), True), (refused[0][0], False)):  # through the engines it overrides
        row = next(r for r in az.explain("bigbird", q, k, v, causal=True, window=8, block=8, score_mod=mod)
                   if r.backend == "triton")
        assert row.runs == runs and (runs or any("score_mod '<lambda>'" in r for r in row.reasons)), str(row)


def test_forward_only_split_k_refuses_learnable_mod_tensors_and_merges_learnable_sinks():
    """flash_decode's kernel is forward only: a learnable relative table is a reason (never a silently missing
    gradient); learnable sinks are merged after the kernel, so their gradient equals torch's."""
    pytest.importorskip("triton")
    q, k, v = _qkv()
    q = q[:, :, :2]
    table = torch.randn(4, 7, requires_grad=True)
    row = next(r for r in az.explain("flash_decode", q, k, v, causal=True, score_mod=az.mods.relative_bias(table))
               if r.backend == "triton")
    assert not row.runs and any("gradients (split-K decode is forward only)" in r for r in row.reasons)
    sinks = torch.randn(4, requires_grad=True)
    grads = [torch.autograd.grad(az.attention(q, k, v, method="flash_decode", causal=True, sinks=sinks,
                                              backend=b).sum(), sinks)[0] for b in ("triton", "torch")]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
