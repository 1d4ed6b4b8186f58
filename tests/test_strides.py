"""Every method gives the same result on permuted, sliced and expanded (stride-0) views as on
contiguous copies of the same values, forward and gradients (issue 12, defect 1: the fused CPU
kernel reads rows as packed, so a last-dim stride other than 1 gave garbage before)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnzoo as az
from test_registry import REQUIRED_PARAMS, _inputs_for, _public_methods


def _views(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` whose memory layout is ``kind`` (values random)."""
    B, H, N, D = shape
    if kind == "permuted":  # last-dim stride N·H: what the issue's reproducer passes
        return torch.randn(B, D, H, N, generator=gen).permute(0, 2, 3, 1)
    if kind == "sliced":  # every other element of a wider last dim, every other row
        return torch.randn(B, H, 2 * N, 2 * D, generator=gen)[:, :, ::2, ::2]
    if kind == "expanded":  # one head broadcast to all: stride 0 in the head dim
        base = torch.randn(B, 1, N, D, generator=gen)
        return base.expand(B, H, N, D)
    raise AssertionError(kind)


NTOK = 256  # 16 x 16: a square grid for the vision methods, long enough that sparse methods go sparse
KINDS = ("permuted", "sliced", "expanded")


def _run(m, q, k, v, causal, extra, lse):
    torch.manual_seed(1)  # methods that sample draw the same numbers for both layouts
    return m(q, k, v, causal=causal, return_lse=lse, **extra) if lse else (m(q, k, v, causal=causal, **extra), None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", _public_methods())
def test_strided_inputs_match_contiguous_copies(name, kind):
    cls = az.methods()[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_views(kind, (1, 2, NTOK, 16), gen) for _ in range(3))
    assert q.stride(-1) != 1 or kind == "expanded"
    extra = _inputs_for(cls, q.contiguous())
    params = dict(REQUIRED_PARAMS.get(name, {}))
    if "dense_below" in {f.name for f in dataclasses.fields(cls)}:
        # 256 keys would take the dense path: test the sparse one (its clean and diagonal units)
        params.update(dense_below=0, dense_from=1.0)
    m = az.get(name, **params)
    # sliding_window non-causal with a window covering the sequence reached the kernel with strided q
    if name == "sliding_window":
        m = az.get(name, window=256)
    lse = cls.supports.lse
    for causal in [c for c, ok in ((True, cls.supports.causal), (False, cls.supports.noncausal)) if ok]:
        with torch.no_grad():
            got, got_lse = _run(m, q, k, v, causal, extra, lse)
            want, want_lse = _run(m, q.contiguous(), k.contiguous(), v.contiguous(), causal, extra, lse)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"{name} causal={causal} out")
        if lse:
            torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-4, msg=f"{name} causal={causal} lse")
    if not cls.supports.grad:
        return
    causal = cls.supports.causal
    grads = []
    for contiguous in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)] if contiguous else \
            [t.detach().requires_grad_() for t in (q, k, v)]
        if kind == "expanded" and not contiguous:  # gradients flow through the expand into the base
            leaves = [t.detach()[:, :1].clone().requires_grad_() for t in (q, k, v)]
            ins = [t.expand(1, 2, NTOK, 16) for t in leaves]
        else:
            ins = leaves
        torch.manual_seed(1)
        out = m(*ins, causal=causal, **extra)
        out.pow(2).sum().backward()
        g = [t.grad for t in leaves]
        if kind == "expanded" and contiguous:
            g = [t.sum(1, keepdim=True) for t in g]
        grads.append(g)
    for n, a, b in zip("qkv", *grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{name} d{n}")


def test_issue_reproducer_exact_with_lse_on_a_permuted_query():
    q = torch.randn(1, 16, 2, 64).permute(0, 2, 3, 1)  # (1, 2, 64, 16), stride(-1) = 128
    k = v = torch.randn(1, 2, 64, 16)
    out, lse = az.attention(q, k, v, method="exact", return_lse=True)
    ref, ref_lse = az.attention(q.double(), k.double(), v.double(), method="naive", return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
