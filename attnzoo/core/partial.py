"""Partial attention results and their exact log-sum-exp merge (docs/methods.md, Engines).

Attention of a query over a key set S can be kept as ``(out, lse)`` with
``out = softmax-weighted mean of v over S`` and ``lse = log Σ_S exp(score)``.
Two results over *disjoint* key sets combine exactly:

    lse = logaddexp(lse1, lse2)
    out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2

The operator is associative and commutative; an empty key set is
``(0, -inf)`` and is its identity. Tiled exact attention, split-K decoding,
ring attention and every "always-kept part ⊕ selected part" hybrid reduce to it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import AttnZooError


class Partial(NamedTuple):
    """Attention over a subset of keys: ``out (B, H, N, Dv)`` and ``lse (B, H, N)`` in fp32."""

    out: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def empty(cls, out_shape: tuple[int, ...], *, device=None) -> "Partial":
        """Attention over no key at all: zero output, ``lse = -inf``."""
        out = torch.zeros(out_shape, dtype=torch.float32, device=device)
        lse = torch.full(out_shape[:-1], -math.inf, dtype=torch.float32, device=device)
        return cls(out, lse)

    def weighted(self, log_weight: float | torch.Tensor) -> "Partial":
        """The same keys counted with importance weight ``exp(log_weight)`` (sampling estimators)."""
        return Partial(self.out, self.lse + log_weight)


def merge(*partials: Partial) -> Partial:
    """Combine partial results over disjoint key sets into the result over their union.

    Rows where every partial is empty stay ``(0, -inf)``; no NaN is produced.
    Differentiable with respect to every ``out`` and ``lse``.
    """
    if not partials:
        raise AttnZooError("merge: expected at least one Partial, got none")
    for i, p in enumerate(partials):
        if not isinstance(p, Partial) and not (isinstance(p, tuple) and len(p) == 2):
            raise AttnZooError(f"merge: argument {i} expected a Partial(out, lse), got {type(p).__name__}")
        if p[0].shape[:-1] != partials[0][0].shape[:-1] or p[1].shape != p[0].shape[:-1]:
            raise AttnZooError(
                f"merge: argument {i} expected out {tuple(partials[0][0].shape)} and lse "
                f"{tuple(partials[0][0].shape[:-1])}, got out {tuple(p[0].shape)} and lse {tuple(p[1].shape)}"
            )
    if len(partials) == 1:
        return Partial(*partials[0])
    dtype = torch.promote_types(torch.float32, partials[0][0].dtype)  # fp32, or fp64 for fp64 oracles
    lses = torch.stack([p[1].to(dtype) for p in partials])  # (P, ...)
    empty = ~torch.isfinite(lses).any(0)  # rows no partial saw
    # finite on every row (rows no partial saw reduce zeros), so exp(lses - safe) is never exp(-inf - (-inf)) = NaN
    # and the gradient of those rows stays finite; their lses are all -inf, so their weights are 0.
    safe = torch.logsumexp(lses.masked_fill(empty, 0.0), dim=0)
    lse = safe.masked_fill(empty, -math.inf)
    weights = torch.exp(lses - safe).unsqueeze(-1)  # exp(-inf) = 0 for empty partials
    out = partials[0][0].to(dtype) * weights[0]
    for w, p in zip(weights[1:], partials[1:]):
        out = out.addcmul_(p[0].to(dtype), w)  # one pass per partial over the (large) outputs
    return Partial(out, lse)
