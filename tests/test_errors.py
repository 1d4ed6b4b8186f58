"""Every bad input raises a clear error naming the argument, before any heavy work (issue 2, item 5)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch

import attnzoo as az
from attnzoo import AttnZooError, UnsupportedError


def qkv(B=2, Hq=4, Hkv=2, Nq=5, Nk=7, D=8, Dv=6, dtype=torch.float32):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, dtype=dtype))


def raises(match, **kwargs):
    q, k, v = kwargs.pop("q", None), kwargs.pop("k", None), kwargs.pop("v", None)
    dq, dk, dv = qkv()
    with pytest.raises(AttnZooError, match=match):
        az.attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, **kwargs)


@pytest.mark.parametrize("method", ["exact", "exact_tiled", "flash_decode", "naive"])
def test_rank_errors_name_the_argument(method):
    q, k, v = qkv()
    raises(r"^q: expected a 4-D tensor", q=q[0], method=method)
    raises(r"^k: expected a 4-D tensor", k=k[..., None], method=method)
    raises(r"^v: expected a 4-D tensor", v=v[0], method=method)
    raises(r"^q: expected a torch.Tensor", q=[[1.0]], method=method)


def test_size_mismatches():
    q, k, v = qkv()
    raises(r"batch size 2", k=k[:1], v=v[:1])
    raises(r"^k: expected head dim 8", k=torch.randn(2, 2, 7, 5))
    raises(r"^v: expected 2 heads and 7 keys", v=torch.randn(2, 2, 6, 6))
    raises(r"^k: expected a number of KV heads that divides the 4 query heads.*got 3",
           k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 6))


def test_dtype_and_device_errors():
    q, k, v = qkv()
    raises(r"^k: expected dtype torch.float32 .* got torch.float64", k=k.double())
    raises(r"^q: expected a floating dtype .* got torch.int64", q=torch.ones(2, 4, 5, 8, dtype=torch.long))
    meta = torch.randn(2, 2, 7, 6, device="meta")
    raises(r"^v: expected device cpu .* got meta", v=meta)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs(name, bad):
    tensors = dict(zip("qkv", qkv()))
    tensors[name][0, 0, 0, 0] = bad
    raises(rf"^{name}: contains NaN or inf", **tensors)


def test_padding_mask_errors():
    raises(r"^key_padding_mask: expected shape \(2, 7\)", key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    raises(r"^key_padding_mask: expected dtype torch.bool", key_padding_mask=torch.ones(2, 7))
    raises(r"^key_padding_mask: expected a bool tensor", key_padding_mask=[True] * 7)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, "big"])
def test_bad_scale(scale):
    raises(r"^scale: expected a positive finite float", scale=scale)


def test_unknown_method_suggests_close_names():
    with pytest.raises(AttnZooError, match=r"unknown method 'exact_tile'.*did you mean 'exact_tiled'"):
        az.get("exact_tile")
    raises(r"unknown method 'flashdecode'.*'flash_decode'", method="flashdecode")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(AttnZooError, match=r"exact_tiled: unknown parameter\(s\) \['window'\]; valid parameters: q_tile, k_tile"):
        az.get("exact_tiled", window=3)
    raises(r"flash_decode: unknown parameter\(s\) \['split'\]; valid parameters: splits", method="flash_decode",
           split=2)


@pytest.mark.parametrize("params, match", [
    ({"q_tile": 0}, r"exact_tiled: parameter 'q_tile' expected a value in \[1, inf\], got 0"),
    ({"k_tile": -3}, r"parameter 'k_tile' expected a value in \[1, inf\], got -3"),
    ({"k_tile": 2.5}, r"parameter 'k_tile' expected int, got 2.5"),
    ({"q_tile": True}, r"parameter 'q_tile' expected int, got True"),
])
def test_out_of_range_parameters(params, match):
    with pytest.raises(AttnZooError, match=match):
        az.get("exact_tiled", **params)


def test_errors_come_before_heavy_work():
    """A bad parameter is reported without touching the (huge) inputs."""
    big = torch.empty(1, 1, 1, 1).expand(1, 1, 10**6, 1)
    with pytest.raises(AttnZooError, match="splits"):
        az.attention(big, big, big, method="flash_decode", splits=0)


# --------------------------------------------------------------- capabilities
@az.register
@dataclasses.dataclass(frozen=True)
class _CausalOnlyForTests(az.Method):
    """A test double declaring causal-only support (registered under a private name)."""

    name: ClassVar[str] = "_test_causal_only"
    supports: ClassVar[az.Supports] = az.Supports(causal=True, noncausal=False, decode=False, grad=False)

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
        return az.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask), None


@pytest.mark.parametrize("kwargs, missing", [
    ({"causal": False}, r"causal=False \(this method is causal only\)"),
    ({"causal": True, "return_lse": True}, r"return_lse=True"),
    ({"causal": True, "q": torch.randn(2, 4, 3, 8)}, r"decode / chunked prefill \(causal with Nq=3 < Nk=7\)"),
])
def test_undeclared_capability_raises_unsupported(kwargs, missing):
    q, k, v = qkv(Nq=7)
    q = kwargs.pop("q", q)
    with pytest.raises(UnsupportedError, match=rf"method '_test_causal_only' does not support {missing}"):
        az.attention(q, k, v, method="_test_causal_only", **kwargs)


def test_undeclared_gradients_raise_unsupported():
    q, k, v = qkv(Nq=7)
    with pytest.raises(UnsupportedError, match="gradients"):
        az.attention(q.requires_grad_(), k, v, method="_test_causal_only", causal=True)
    with torch.no_grad():
        az.attention(q, k, v, method="_test_causal_only", causal=True)


def test_unknown_extra_input():
    raises(r"exact: unknown parameter\(s\) \['g'\]", g=torch.zeros(1))


def test_a_parameter_may_share_the_name_of_an_input():
    """q, k, v are positional-only, so linformer's parameter `k` passes through attention()."""
    q, k, v = qkv(Hkv=4, Nq=7)
    out = az.attention(q, k, v, method="linformer", k=64)
    torch.testing.assert_close(out, az.attention(q, k, v), rtol=1e-4, atol=1e-5)


# a decode step's one-query call: the whole of k and v is scanned before attending, wherever the bad value stands
@pytest.mark.parametrize("method,params", [("exact", {}), ("exact_tiled", {}), ("flash_decode", {}),
                                           ("sliding_window", {"window": 64}), ("streaming", {"window": 64}),
                                           ("block_topk", {"block": 16, "topk": 2})])
@pytest.mark.parametrize("name", ["k", "v"])
def test_one_query_calls_refuse_non_finite_keys_and_values_anywhere(method, params, name):
    """NaN/inf in k or v of a one-query call is refused naming the argument at the last key (read by every
    method), at a key outside the window and at a padded key alike: the C++ kernels drop a NaN score without
    a trace (fast_exp), so attending first and checking the (small) result would return a finite, wrong
    output for a NaN key that the call reads."""
    from attnzoo import checks

    n = 2048  # k and v large enough for the C++ scan (checks.CPP_PEAK_MIN elements)
    assert 2 * n * 8 >= checks.CPP_PEAK_MIN
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, rows, 8, generator=gen) for h, rows in ((4, 1), (2, n), (2, n)))
    for where, padded in ((n - 1, False), (10, False), (10, True)):
        for bad in (math.nan, math.inf):
            tensors = dict(q=q, k=k.clone(), v=v.clone())
            tensors[name][0, 1, where, 3] = bad
            mask = torch.ones(1, n, dtype=torch.bool)
            mask[0, where] = not padded
            with pytest.raises(AttnZooError, match=rf"^{name}: contains NaN or inf"):
                az.attention(tensors["q"], tensors["k"], tensors["v"], method=method, causal=True,
                             key_padding_mask=mask if padded else None, **params)


def test_large_cpu_inputs_are_scanned_by_the_cpp_peak(monkeypatch):
    """q, k and v of CPU float32/64 calls from checks.CPP_PEAK_MIN elements on are scanned by the extension's
    one-pass peak (half of aminmax's time: the scan of a decode step's whole K/V), not by aminmax."""
    from attnzoo import checks
    from attnzoo.core import capped

    if not capped.available():
        pytest.skip("capped kernel not built")
    sizes = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t, *a, **kw: (sizes.append(t.numel()), aminmax(t, *a, **kw))[1])
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 2048, 16), torch.randn(1, 2, 2048, 16)
    out = az.attention(q, k, v, method="sliding_window", window=64, causal=True)
    assert torch.isfinite(out).all()
    assert sizes and max(sizes) < checks.CPP_PEAK_MIN  # q and the result only
