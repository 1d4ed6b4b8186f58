"""No NaN from accepted input when scaled logits are huge (issue 12, defect 2): inputs whose logits
could overflow are refused naming `scale`, and everything accepted gives finite results and gradients."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.checks import LOGIT_HEADROOM
from test_registry import REQUIRED_PARAMS, _inputs_for, _public_methods


@pytest.mark.parametrize("make", [
    lambda q: ((q, q, q), {"scale": 1e38}),
    lambda q: ((q * 1e20, q * 1e20, q), {}),
    lambda q: ((q.double(), q.double(), q.double()), {"scale": 1e306}),
])
def test_overflowing_logits_are_refused_naming_scale(make):
    args, kw = make(torch.randn(1, 2, 16, 8))
    for method in ("exact", "exact_tiled", "sliding_window", "block_topk"):
        with pytest.raises(az.AttnZooError, match=r"^scale: scaled logits may overflow float(32|64).*= .*expected at most"):
            az.attention(*args, method=method, **kw)


def test_gradients_need_logits_the_backward_can_recompute():
    q = torch.randn(1, 2, 16, 8)
    # fine without gradients (the forward pass subtracts the exact running max) ...
    out = az.attention(q, q, q, scale=1e12, method="exact_tiled")
    assert torch.isfinite(out).all()
    # ... refused with them: exp(s - lse) would be recomputed with an error of |s| * eps >> 1
    with pytest.raises(az.AttnZooError, match="^scale: scaled logits are too large for gradients"):
        az.attention(q.requires_grad_(), q, q, scale=1e12, method="exact_tiled")


def _edge_inputs(bound: float, shape=(1, 2, 64, 16)):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    return q, k, v, bound / (shape[-1] * float(q.abs().max()) * float(k.abs().max()))  # check_logit_range's bound


@pytest.mark.parametrize("name", _public_methods())
def test_every_method_is_finite_or_refuses_at_the_edge_of_the_accepted_range(name):
    cls = az.methods()[name]
    m = az.get(name, **REQUIRED_PARAMS.get(name, {}))
    q, k, v, scale = _edge_inputs(0.5 * torch.finfo(torch.float32).max * LOGIT_HEADROOM)
    extra = _inputs_for(cls, q)
    for causal in [c for c, ok in ((True, cls.supports.causal), (False, cls.supports.noncausal)) if ok]:
        for args, kw in (((q, k, v), {"scale": scale}), ((q * scale ** 0.5, k * scale ** 0.5, v), {"scale": 1.0})):
            try:
                with torch.no_grad():
                    out = m(*args, causal=causal, **kw, **extra)
            except az.AttnZooError as e:  # methods without a normaliser overflow in their output: said so
                assert "overflows" in str(e)
                continue
            assert torch.isfinite(out).all(), f"{name} causal={causal}"
    if not cls.supports.grad:
        return
    q, k, v, scale = _edge_inputs(0.99 / torch.finfo(torch.float32).eps)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    try:
        out = m(*leaves, causal=cls.supports.causal, scale=scale, **extra)
    except az.AttnZooError as e:
        assert "overflows" in str(e)
        return
    (out * torch.randn_like(out)).sum().backward()
    for n, t in zip("qkv", leaves):
        assert torch.isfinite(t.grad).all(), f"{name} d{n}"
