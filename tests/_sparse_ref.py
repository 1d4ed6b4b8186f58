"""Shared helpers of the sparse tests: dense masked reference and attention-mass recall.

The reference is materialised float64 softmax attention under an explicit
``(B|1, Hq|1, Nq, Nk)`` visibility mask, so every method is checked against
an independent statement of its A.2 definition, not against its own layout code.
"""

import math

import torch


def masked_reference(q, k, v, visible, scale=None):
    """``(out, lse)`` of softmax attention restricted to ``visible`` (True = key visible); empty rows -> (0, -inf)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - safe.unsqueeze(-1)) @ v, lse


def modded_reference(q, k, v, visible, score_mod):
    """Output of dense float64 softmax attention of ``score_mod(scores)`` restricted to ``visible`` (bottom-right
    aligned positions: query ``i`` at ``i + Nk - Nq``; batch index 0, query head index)."""
    if score_mod is None:
        return masked_reference(q, k, v, visible)[0]
    groups, Nq, Nk = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = score_mod(s, torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(q.shape[1]).view(1, -1, 1, 1),
                  torch.arange(Nq).view(1, 1, -1, 1) + Nk - Nq, torch.arange(Nk).view(1, 1, 1, -1))
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)) @ v


def positions(len_q, len_k):
    """``p (Nq, 1)`` absolute query positions and ``j (1, Nk)`` key indices (docs/methods.md, Conventions)."""
    p = torch.arange(len_q).view(-1, 1) + (len_k - len_q)
    j = torch.arange(len_k).view(1, -1)
    return p, j


def combine(visible, *, causal, len_q, len_k, key_padding_mask=None):
    """``visible`` ∩ causal ∩ padding, as a ``(B|1, H|1, Nq, Nk)`` mask."""
    p, j = positions(len_q, len_k)
    vis = visible
    if causal:
        vis = vis & (j <= p)
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    return vis


def mass_recall(q, k, lse_method, *, causal, scale=None):
    """Mean over rows of Σ over the method's keys of the exact softmax probability = mean exp(lse_S - lse_all).

    Valid for methods that are exact softmax over a key subset (their lse is
    the log-sum over the kept keys). Rows with no visible key are skipped.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(groups, dim=1).to(torch.float64)
    s = (q.to(torch.float64) @ kk.transpose(-1, -2)) * scale
    if causal:
        p, j = positions(q.shape[2], k.shape[2])
        s = s.masked_fill(j > p, -math.inf)
    full = torch.logsumexp(s, -1)
    ok = torch.isfinite(full)
    return float(torch.exp(lse_method.to(torch.float64)[ok] - full[ok]).mean())


def rel_error(out, ref):
    return float((out.to(torch.float64) - ref).norm() / ref.norm())


def band(len_q, len_k, width, causal):
    """Sliding window (A.2): causal ``p - window < j <= p``, else ``|p - j| < window``."""
    p, j = positions(len_q, len_k)
    return (p - j < width) if causal else ((p - j).abs() < width)


def dilated(len_q, len_k, window, dilation, causal):
    """Dilated window (A.2): distance a multiple of ``dilation`` and below ``window · dilation``."""
    p, j = positions(len_q, len_k)
    d = (p - j) if causal else (p - j).abs()
    return (d % dilation == 0) & (d < window * dilation) & (d >= 0)


def assert_matches(out, lse, ref_out, ref_lse, tol=1e-9):
    """``(out, lse)`` equals the reference: same empty rows (-inf lse), outputs and finite lse within ``tol``."""
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].to(ref_lse.dtype), ref_lse[fin], atol=tol, rtol=tol)
