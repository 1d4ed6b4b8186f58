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


# ------------------------------------------------------------------ the online softmax and its gradient
def masked_softmax(scores: torch.Tensor, visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-free softmax over the last dim: ``(probs, lse)``.

    Entries that are -inf or where ``visible`` is False get probability 0; a
    row with nothing visible gives all-zero probabilities and ``lse = -inf``
    (never ``exp(-inf - (-inf)) = NaN``).
    """
    s = scores if visible is None else scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return probs, lse


class OnlineSoftmax:
    """Softmax attention of fixed query rows accumulated over key chunks (FlashAttention's forward).

    Holds the running max ``m``, denominator and unnormalised output of rows
    ``(..., R)``; :meth:`add` folds in one chunk of scores ``(..., R, K)``
    (-inf where invisible) and values ``(..., K, Dv)``; :meth:`result` is the
    :class:`Partial` over every chunk added, ``(0, -inf)`` for rows that saw
    no key. The tiled engine and the block-sparse executor both run on it.
    """

    def __init__(self, rows: tuple[int, ...], dim_v: int, *, like: torch.Tensor) -> None:
        self.m = like.new_full((*rows, 1), -math.inf)
        self.denom = like.new_zeros(*rows, 1)
        self.acc = like.new_zeros(*rows, dim_v)

    def add(self, scores: torch.Tensor, values: torch.Tensor, shift: float | None = None) -> None:
        """Fold in one chunk; ``scores`` is overwritten (it becomes the chunk's unnormalised probabilities).

        ``shift``: the scores were given minus this number, an upper bound of every score of the chunk
        (soft-capped scores: the cap), which then stands in for the row maximum and saves its pass over
        the chunk. The caller makes sure ``exp(score - shift)`` of a visible key cannot underflow.
        """
        if shift is None:
            m_new = torch.maximum(self.m, scores.amax(dim=-1, keepdim=True))
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = scores.sub_(m_safe).exp_()
        else:
            m_new = m_safe = self.m.clamp_min(shift)
            p = scores.exp_() if bool((m_new == shift).all()) else scores.add_(shift - m_new).exp_()
        alpha = torch.exp(self.m - m_safe)
        self.denom = self.denom.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
        acc = self.acc.mul_(alpha).view(-1, *self.acc.shape[-2:])
        acc.baddbmm_(p.reshape(-1, *p.shape[-2:]),
                     values.expand(*p.shape[:-2], *values.shape[-2:]).reshape(-1, *values.shape[-2:]))
        self.m = m_new

    def result(self) -> Partial:
        """``(out (..., R, Dv), lse (..., R))``; rows that saw nothing are ``(0, -inf)``."""
        seen = self.denom > 0
        denom = torch.where(seen, self.denom, torch.ones_like(self.denom))
        out = torch.where(seen, self.acc / denom, torch.zeros_like(self.acc))
        lse = torch.where(seen, self.m + torch.log(denom), torch.full_like(self.m, -math.inf))
        return Partial(out, lse.squeeze(-1))


def grad_inputs(out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """What a recomputing backward needs per query row: ``(lse_safe, delta)``, both ``(..., N)``.

    ``delta = Σ d_out · out - d_lse``; ``lse_safe`` is +inf on rows that saw
    nothing, so their recomputed probabilities ``exp(s - lse_safe)`` are 0.
    """
    delta = (d_out * out).sum(dim=-1)
    if d_lse is not None:
        delta = delta - d_lse
    return torch.where(torch.isfinite(lse), lse, torch.full_like(lse, math.inf)), delta


#: grad_step's probability floor and the logit clamp below it (exp(-80) = 1.8e-35: a normal float32)
_P_LOGIT_FLOOR, _P_FLOOR = -80.0, 1e-34


def grad_step(scores: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, q: torch.Tensor, d_out: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, to_raw=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of FlashAttention-2's backward: ``(dq, dk, dv)`` contributions, before the ``scale`` factor.

    ``scores (..., R, K)`` are the chunk's scaled scores (-inf where invisible;
    overwritten), ``lse``/``delta (..., R, 1)`` from :func:`grad_inputs`,
    ``q``/``d_out (..., R, D)`` the unscaled query rows and their output
    gradient, ``k``/``v (..., K, D)`` the chunk's keys and values. Multiply
    the accumulated ``dq`` and ``dk`` by ``scale``. With a score_mod the
    scores are the modified ones and ``to_raw`` (:meth:`attnzoo.core.scoremod.ModHook.recompute`)
    maps their gradient back to the raw ``q·kᵀ``.
    Probabilities below ``_P_FLOOR`` are set to 0 (they are below the precision of every sum they join):
    the logits are clamped at -80 before ``exp`` and the results below the floor zeroed, because CPU ``exp``
    is many times slower on -inf (hidden keys: a causal diagonal tile) and on results in the subnormal
    range (far keys of a mod such as ALiBi) -- 0.5 ms instead of 2-40 ms on a (2048, 512) tile.
    """
    p = scores.sub_(lse).clamp_min_(_P_LOGIT_FLOOR).exp_()
    p = torch.nn.functional.threshold_(p, _P_FLOOR, 0.0)
    dv = torch.matmul(p.transpose(-1, -2), d_out)
    ds = p.mul_(torch.matmul(d_out, v.transpose(-1, -2)).sub_(delta))
    if to_raw is not None:
        ds = to_raw(ds)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


class Recomputed(torch.autograd.Function):
    """Attention whose backward pass recomputes from the saved ``(out, lse)``: the one autograd Function of the
    tiled engine and the block-sparse executor.

    ``forward(q, k, v, pad) -> (out, lse)`` and ``backward(q, k, v, pad, out, lse, d_out, d_lse, grads) ->
    (dq, dk, dv)`` are the engine's passes; ``hook`` is the call's score_mod hook
    (:class:`~attnzoo.core.scoremod.ModHook`) or None. ``*captured``, the tensors the score_mod closes over
    that require grad, are inputs so they get gradients: the backward pass fills ``grads`` (one per captured
    tensor) and ``hook.input_grads`` returns them.
    """

    @staticmethod
    def forward(ctx, q, k, v, pad, forward, backward, hook, *captured):  # noqa: D401  (autograd signature)
        out, lse = forward(q, k, v, pad)
        ctx.save_for_backward(q, k, v, pad, out, lse)
        ctx.backward_pass, ctx.hook = backward, hook
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, pad, out, lse = ctx.saved_tensors
        hook = ctx.hook
        grads = [None] * (len(hook.captured) if hook is not None else 0)
        dq, dk, dv = ctx.backward_pass(q, k, v, pad, out, lse, d_out.contiguous(), d_lse, grads)
        return dq, dk, dv, None, None, None, None, *(hook.input_grads(grads) if hook is not None else ())
