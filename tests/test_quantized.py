"""SageAttention-style quantised attention: exact without quantisation, bounded error with it.

Bounds measured on seed 0 (B=1, H=4, N=512, D=64, causal, block=128), written with margin:
gaussian inputs: INT8 relative Frobenius error 0.0106 (cosine 0.9999) -> bound 0.02;
INT4 0.20 (cosine 0.980) -> bound 0.3.
Outliers (G6: per-channel key offset 10, two query channels x20): INT8 0.157 without
smoothing K, 0.073 with; INT4 1.03 without, 0.58 with.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.bench import workloads
from attnzoo.catalog.quantized import block_means, quantize_blocks


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def reference(x, causal=True, mask=None):
    return az.attention(x.q.double(), x.k.double(), x.v.double(), method="naive", causal=causal,
                        key_padding_mask=mask, return_lse=True)


@pytest.mark.parametrize("causal", [False, True])
def test_smoothing_alone_is_exact_including_lse(causal):
    x = workloads.make("outliers", heads=4, heads_kv=2, length=300, len_q=200, dim=32, seed=0)
    mask = torch.rand(1, 300) > 0.1
    ref, ref_lse = reference(x, causal, mask)
    out, lse = az.attention(x.q, x.k, x.v, method="sage", bits=None, causal=causal, key_padding_mask=mask,
                            return_lse=True)
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits, bound", [(8, 0.02), (4, 0.3)])
def test_quantised_error_is_bounded_on_gaussian_inputs(bits, bound):
    x = workloads.make("gaussian", heads=4, length=512, dim=64, seed=0)
    ref, _ = reference(x)
    out = az.attention(x.q, x.k, x.v, method="sage", bits=bits, causal=True)
    err = rel_err(out, ref)
    assert 0 < err < bound, err
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0)
    assert cos > (0.999 if bits == 8 else 0.97)


@pytest.mark.parametrize("bits", [8, 4])
def test_smoothing_k_cuts_the_error_on_outlier_keys(bits):
    x = workloads.make("outliers", heads=4, length=512, dim=64, seed=0)
    ref, _ = reference(x)
    raw = rel_err(az.attention(x.q, x.k, x.v, method="sage", bits=bits, smooth_k=False, causal=True), ref)
    smooth = rel_err(az.attention(x.q, x.k, x.v, method="sage", bits=bits, smooth_k=True, causal=True), ref)
    both = rel_err(az.attention(x.q, x.k, x.v, method="sage", bits=bits, smooth_k=True, smooth_q=True,
                                causal=True), ref)
    assert smooth < 0.65 * raw, (raw, smooth)
    assert both < 1.1 * smooth, (smooth, both)


def test_quantize_blocks_is_symmetric_per_block_and_exact_on_the_grid():
    x = torch.randn(1, 2, 10, 4)
    deq = quantize_blocks(x, 8, 4)
    assert deq.shape == x.shape
    # each block's largest value is on the grid exactly; error ≤ half a step
    for b0 in range(0, 10, 4):
        blk, dq = x[:, :, b0:b0 + 4], deq[:, :, b0:b0 + 4]
        step = blk.abs().amax(dim=(-1, -2), keepdim=True) / 127
        assert torch.all((blk - dq).abs() <= step / 2 + 1e-7)
    assert torch.equal(quantize_blocks(torch.zeros(1, 1, 3, 2), 4, 2), torch.zeros(1, 1, 3, 2))


def test_block_means_handles_a_short_last_block():
    x = torch.arange(5.0).view(1, 1, 5, 1)
    assert block_means(x, 2).flatten().tolist() == [0.5, 0.5, 2.5, 2.5, 4.0]


def test_bad_parameters():
    with pytest.raises(az.AttnZooError, match=r"sage: parameter 'bits' expected one of \[8, 4, None\], got 3"):
        az.get("sage", bits=3)
    with pytest.raises(az.AttnZooError, match="'block' expected a value in"):
        az.get("sage", block=0)
    with pytest.raises(az.AttnZooError, match="smooth_q"):
        az.get("sage", bits=None, smooth_q=True)
    with pytest.raises(az.UnsupportedError, match="gradients"):
        q = torch.randn(1, 1, 4, 8, requires_grad=True)
        az.attention(q, q, q, method="sage")


def test_non_contiguous_inputs_as_hugging_face_passes_them():
    x = torch.randn(1, 40, 2, 16)  # (B, N, H, D) then transposed, as transformers does
    q = k = v = x.transpose(1, 2)
    assert not q.is_contiguous()
    out = az.attention(q, k, v, method="sage", causal=True)
    ref = az.attention(q.contiguous(), k.contiguous(), v.contiguous(), method="sage", causal=True)
    torch.testing.assert_close(out, ref)
