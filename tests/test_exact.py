"""The exact engines against the float64 materialised reference (issue 2's spec).

Property tests draw random batch sizes, grouped-query ratios, Nq != Nk,
head dims that are not powers of two, causal and not, padding masks that can
hide every key of a sequence, and random tile / split sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo.core.exact import naive_attention

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_len: int = 48):
    """Random attention inputs (fp32) with optional padding; seeds drawn by hypothesis."""
    batch = draw(st.integers(1, 2))
    heads_kv = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    len_q = draw(st.integers(1, max_len))
    len_k = draw(st.integers(1, max_len))
    dim = draw(st.integers(1, 20))
    dim_v = draw(st.integers(1, 12))
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_kv * groups, len_q, dim, generator=gen)
    k = torch.randn(batch, heads_kv, len_k, dim, generator=gen)
    v = torch.randn(batch, heads_kv, len_k, dim_v, generator=gen)
    mask = None
    if draw(st.booleans()):
        keep = draw(st.floats(0.0, 1.0))
        mask = torch.rand(batch, len_k, generator=gen) < keep  # may hide every key of a row
    return q, k, v, causal, mask


def reference(q, k, v, causal, mask, scale=None):
    out, lse = az.attention(q.double(), k.double(), v.double(), method="naive", causal=causal, scale=scale,
                            key_padding_mask=mask, return_lse=True)
    return out, lse


def assert_close_to_reference(out, ref, rel=1e-5):
    """fp32 max error ≤ ``rel`` relative to the output scale (issue 2)."""
    assert not torch.isnan(out).any()
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = float((out.double() - ref).abs().max()) if ref.numel() else 0.0
    assert err <= rel * scale, f"max error {err:.3g} > {rel} × {scale:.3g}"


def assert_lse_close(lse, ref_lse):
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no visible key must have lse = -inf"
    assert torch.all(lse[~finite] == -math.inf)
    if finite.any():
        assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) <= 1e-5 * max(
            1.0, float(ref_lse[finite].abs().max()))


@SETTINGS
@given(problems(), st.integers(1, 33), st.integers(1, 65))
def test_exact_tiled_matches_reference(prob, q_tile, k_tile):
    q, k, v, causal, mask = prob
    out, lse = az.attention(q, k, v, method="exact_tiled", causal=causal, key_padding_mask=mask,
                            return_lse=True, q_tile=q_tile, k_tile=k_tile)
    ref, ref_lse = reference(q, k, v, causal, mask)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)


@SETTINGS
@given(problems(), st.booleans())
def test_exact_matches_reference(prob, with_lse):
    q, k, v, causal, mask = prob
    res = az.attention(q, k, v, method="exact", causal=causal, key_padding_mask=mask, return_lse=with_lse)
    ref, ref_lse = reference(q, k, v, causal, mask)
    if with_lse:
        res, lse = res
        assert_lse_close(lse, ref_lse)
    assert_close_to_reference(res, ref)


def test_exact_lse_uses_the_cpu_flash_kernel_only_where_it_is_correct():
    """exact(return_lse=True) takes PyTorch's CPU flash kernel for self-attention / non-causal GQA without
    padding or gradients, and the tiled engine otherwise; both agree with naive."""
    from attnzoo.core.exact import sdpa_with_lse
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=gen) for _ in range(3))
    kv2 = [t[:, :2, :31] for t in (k, v)]
    pad = torch.rand(2, 40, generator=gen) > 0.3
    taken = {"causal self": (q, k, v, True, None), "gqa noncausal": (q, *kv2, False, None)}
    refused = {"causal Nq != Nk": (q[:, :, :9], k, v, True, None), "gqa causal": (q[:, :, :31], *kv2, True, None),
               "padding": (q, k, v, False, pad), "grad": (q.clone().requires_grad_(), k, v, False, None)}
    for name, (qq, kk, vv, causal, mask) in {**taken, **refused}.items():
        fast = sdpa_with_lse(qq, kk, vv, scale=0.25, causal=causal, key_padding_mask=mask)
        assert (fast is not None) == (name in taken), name
        out, lse = az.attention(qq, kk, vv, scale=0.25, causal=causal, key_padding_mask=mask, return_lse=True)
        ref, ref_lse = reference(qq.detach(), kk, vv, causal, mask, scale=0.25)
        assert_close_to_reference(out.detach(), ref)
        assert_lse_close(lse.detach(), ref_lse)


@SETTINGS
@given(problems(), st.integers(1, 9))
def test_flash_decode_matches_reference(prob, splits):
    q, k, v, causal, mask = prob
    out, lse = az.attention(q, k, v, method="flash_decode", causal=causal, key_padding_mask=mask,
                            return_lse=True, splits=splits)
    ref, ref_lse = reference(q, k, v, causal, mask)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("method", ["exact", "exact_tiled", "flash_decode"])
def test_decode_steps_equal_one_shot(method):
    """Prefill then one-token steps against a growing cache equals one causal call."""
    q = torch.randn(1, 4, 40, 16)
    k = torch.randn(1, 2, 40, 16)
    v = torch.randn(1, 2, 40, 16)
    full = az.attention(q, k, v, method="naive", causal=True)
    pieces = [az.attention(q[:, :, :25], k[:, :, :25], v[:, :, :25], method=method, causal=True)]
    for t in range(25, 40):
        pieces.append(az.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], method=method, causal=True))
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_exact_decode_step_with_gqa_and_padding(causal, padded):
    """One query per head (a decode step: causal or not, it sees every key) with grouped-query heads, where exact
    runs the query group folded into rows; equals the float64 reference, half inputs included."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 6, 1, 16, generator=gen), torch.randn(2, 2, 30, 16, generator=gen), \
        torch.randn(2, 2, 30, 8, generator=gen)
    mask = None
    if padded:
        mask = torch.ones(2, 30, dtype=torch.bool)
        mask[1, :7] = False
    ref, _ = reference(q, k, v, causal, mask)
    assert_close_to_reference(az.attention(q, k, v, method="exact", causal=causal, key_padding_mask=mask), ref)
    half = az.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), method="exact", causal=causal,
                        key_padding_mask=mask)
    assert half.dtype == torch.bfloat16 and half.shape == ref.shape
    assert float((half.double() - ref).abs().max()) < 0.05


@pytest.mark.parametrize("method", ["exact", "exact_tiled", "flash_decode", "naive"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype(method, dtype):
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    out = az.attention(q.to(dtype), k.to(dtype), v.to(dtype), method=method, causal=True)
    assert out.dtype == dtype
    ref = az.attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), method="naive", causal=True)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert float((out.double() - ref).abs().max()) < tol


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    mask = torch.tensor([[False] * 4, [False, False, True, True]])
    for method in ("exact", "exact_tiled", "flash_decode", "naive"):
        out, lse = az.attention(q, k, v, method=method, causal=True, key_padding_mask=mask, return_lse=True)
        assert not torch.isnan(out).any()
        assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
        # causal with Nq=6 > Nk=4: queries 0, 1 sit before every key; in batch 1 queries 0..3 see nothing
        assert torch.all(out[1, :, :4] == 0) and torch.all(lse[1, :, :4] == -math.inf)
        assert torch.all(lse[1, :, 4:] > -math.inf)


@pytest.mark.parametrize("method", ["exact", "exact_tiled", "flash_decode", "naive"])
def test_empty_inputs(method):
    q, k, v = torch.randn(2, 4, 0, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 3)
    out, lse = az.attention(q, k, v, method=method, return_lse=True)
    assert out.shape == (2, 4, 0, 3) and lse.shape == (2, 4, 0)
    q = torch.randn(2, 4, 3, 8)
    out, lse = az.attention(q, k[:, :, :0], v[:, :, :0], method=method, causal=True, return_lse=True)
    assert torch.all(out == 0) and out.shape == (2, 4, 3, 3) and torch.all(lse == -math.inf)


def test_explicit_scale_is_used():
    q, k, v = (torch.randn(1, 1, 7, 8) for _ in range(3))
    ref, _ = naive_attention(q.double(), k.double(), v.double(), scale=0.7, causal=False)
    for method in ("exact", "exact_tiled", "flash_decode"):
        torch.testing.assert_close(az.attention(q, k, v, method=method, scale=0.7).double(), ref,
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_exact_tiled_gradcheck(causal, with_mask):
    """float64 gradcheck of the recomputing backward (out and lse both differentiated)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 7, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, True, False, True]]) if with_mask else None

    def fn(q, k, v):
        out, lse = az.attention(q, k, v, method="exact_tiled", causal=causal, key_padding_mask=mask,
                                return_lse=True, q_tile=2, k_tile=3)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("method", ["exact", "exact_tiled", "flash_decode"])
def test_gradients_match_naive(method):
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(2, 6, 37, 12, generator=gen), torch.randn(2, 3, 45, 12, generator=gen),
              torch.randn(2, 3, 45, 10, generator=gen)]
    mask = torch.rand(2, 45, generator=gen) > 0.2
    grads = {}
    for name in (method, "naive"):
        leaves = [t.clone().double().requires_grad_() for t in inputs]
        out = az.attention(*leaves, method=name, causal=True, key_padding_mask=mask)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads[method], grads["naive"]):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_tiled_memory_has_no_quadratic_buffer():
    """The tiled forward never allocates a tensor of Nq × Nk elements (checked with a dispatch hook)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    n, heads, dim = 2048, 2, 16
    q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
    with Largest():
        az.attention(q, k, v, method="exact_tiled", causal=True, return_lse=True, q_tile=64, k_tile=128)
    assert Largest.biggest <= heads * n * dim  # the inputs/outputs themselves; an N×N buffer would be 64× larger
