"""Hybrids of exact attention on a few keys and a linear (kernelised) part on the rest
(docs/methods.md).

Both parts are kept unnormalised and summed in numerator and denominator (not
lse-merged: the linear part has no log-sum-exp), on a common per-row log scale so
that neither overflows: exact keys contribute ``e^{lse}·out`` and ``e^{lse}``,
linear keys ``φ(q)·Σφ(k)vᵀ`` and ``φ(q)·Σφ(k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import Problem
from ..core.features import taylor2
from ..core.linear import LinearState, linear_attention
from ..core.partial import masked_softmax
from ..errors import AttnZooError
from ..registry import MAX_SIZE, Family, Method, Supports, param, register
from .linear import Performer, RecurrentMethod, engine_form


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """``v`` with a column of ones appended: the linear engine then returns ``[numerator, denominator]``."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def combine(num: torch.Tensor, den: torch.Tensor, log_shift: torch.Tensor | float, out_exact: torch.Tensor,
            lse_exact: torch.Tensor) -> torch.Tensor:
    """``(e^s·num + e^lse·out) / (e^s·den + e^lse)`` on a per-row common scale; zero denominators give 0.

    ``num (..., Dv)``, ``den (..., 1)``, ``log_shift`` the log scale of the linear
    part (per row or a number), ``(out_exact, lse_exact (...))`` the exact part.
    """
    lse = lse_exact.unsqueeze(-1)
    shift = torch.as_tensor(log_shift, dtype=num.dtype, device=num.device).expand_as(lse)
    ref = torch.maximum(shift, lse)
    w_lin, w_exact = torch.exp(shift - ref), torch.exp(lse - ref)
    total_num = w_lin * num + w_exact * out_exact
    total_den = w_lin * den + w_exact
    nonzero = total_den > 0
    return torch.where(nonzero, total_num / torch.where(nonzero, total_den, torch.ones_like(total_den)),
                       torch.zeros_like(total_num))


def masked_softmax_partial(scores: torch.Tensor, visible: torch.Tensor, v: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of softmax attention restricted to ``visible``; empty rows give ``(0, -inf)``."""
    p, lse = masked_softmax(scores, visible)
    return torch.matmul(p, v), lse


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int,
                     key_padding_mask: torch.Tensor | None = None, block: int = 128
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window softmax ``(out, lse)``: query i sees ``p(i) - window < j <= p(i)``.

    Banded: each block of queries reads only its ``block + window`` keys, so the
    cost is O(N·(block + window)·D). ``k``/``v`` must have q's heads.
    """
    len_q, len_k = q.shape[2], k.shape[2]
    offset = len_k - len_q
    outs, lses = [], []
    for i0 in range(0, len_q, block):
        i1 = min(len_q, i0 + block)
        j0, j1 = max(0, i0 + offset - window + 1), max(0, min(len_k, i1 + offset))
        pos_q = torch.arange(i0, i1, device=q.device).unsqueeze(1) + offset
        pos_k = torch.arange(j0, j1, device=q.device).unsqueeze(0)
        visible = (pos_k <= pos_q) & (pos_k > pos_q - window)
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, None, j0:j1]
        scores = torch.matmul(q[:, :, i0:i1], k[:, :, j0:j1].transpose(-1, -2)) * scale
        out, lse = masked_softmax_partial(scores, visible.expand_as(scores), v[:, :, j0:j1])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@dataclass
class BasedState:
    """BASED decode state: the linear state over keys older than the window, and the window's keys.

    ``keys``/``values (B, Hq, ≤ window, D)``, ``mask (B, ≤ window)`` of the last keys.
    """

    linear: LinearState | None
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor


@register
@dataclass(frozen=True)
class Based(RecurrentMethod):
    """BASED: exact sliding-window softmax on the last ``window`` keys plus
    Taylor-2 linear attention on every older key, summed in numerator and
    denominator. ``φ(q)·φ(k) = 1 + x + x²/2`` with ``x = scale·q'·k'``, where
    q', k' are q, k projected to ``feature_dim`` by a seeded Gaussian map (the
    identity when ``feature_dim >= D``: then it is the exact Taylor expansion).
    With ``window >= N`` it equals causal exact attention. Causal only.
    State: :class:`BasedState` (linear state + last ``window`` keys and values).
    """

    name: ClassVar[str] = "based"
    exact_for: ClassVar[str] = "window >= N (the exact sliding-window part covers every key)"
    family: ClassVar[Family] = Family.HYBRID
    complexity: ClassVar[str] = "O(N·(d'²·D + w·D))"
    supports: ClassVar[Supports] = Supports(causal=True, noncausal=False,
                                            decode=True, grad=True, lse=False, varlen=True)
    papers: ClassVar[tuple[str, ...]] = ("Simple linear attention language models balance the recall-throughput "
                                         "tradeoff (BASED)",)

    window: int = param(64, min=1, help="exact sliding-window length w")
    feature_dim: int = param(16, min=1, help="projected dimension d' of the Taylor features (size 1 + d' + d'²)")
    seed: int = param(0, help="seed of the projection to feature_dim")
    chunk: int = param(64, min=1, clamp=True, help="chunk length of the linear part")

    def features(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        dim = x.shape[-1]
        if self.feature_dim < dim:
            gen = torch.Generator().manual_seed(self.seed)
            proj = torch.randn(dim, self.feature_dim, generator=gen, dtype=torch.float64) / math.sqrt(self.feature_dim)
            x = torch.matmul(x, proj.to(dtype=x.dtype, device=x.device))
        return taylor2(x * math.sqrt(scale))

    def attend(self, q, k, v, prob: Problem, *, causal, key_padding_mask, state):
        groups = prob.groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        keep = torch.ones(prob.batch, prob.len_k, dtype=torch.bool, device=q.device) \
            if key_padding_mask is None else key_padding_mask
        if state is not None:
            if not isinstance(state, BasedState):
                raise AttnZooError(f"based: state expected a BasedState or None, got {type(state).__name__}")
            k, v = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
            keep = torch.cat([state.mask, keep], dim=1)
        n_all = k.shape[2]
        n_old = max(0, n_all - self.window)  # keys that have left the window: linear part
        linear_state = None if state is None else state.linear
        phi_q = self.features(q, prob.scale)
        if n_old > 0:
            packed, linear_state = linear_attention(
                phi_q, self.features(k[:, :, :n_old], prob.scale), with_ones(v[:, :, :n_old]), causal=True,
                chunk=self.chunk, form=engine_form(n_old), state=linear_state, key_padding_mask=keep[:, :n_old])
            num, den = packed[..., :-1], packed[..., -1:]
        elif linear_state is not None:  # nothing new left the window: read the carried state
            packed = torch.matmul(phi_q, linear_state.kv)
            num, den = packed[..., :-1], packed[..., -1:]
        else:
            num, den = q.new_zeros(*q.shape[:3], prob.dim_v), q.new_zeros(*q.shape[:3], 1)
        out_w, lse_w = window_attention(q, k, v, scale=prob.scale, window=self.window, key_padding_mask=keep)
        out = combine(num, den, 0.0, out_w, lse_w)
        keep_from = max(0, n_all - self.window)
        return out, BasedState(linear_state, k[:, :, keep_from:], v[:, :, keep_from:], keep[:, keep_from:])


def angular_lsh(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Reformer's angular LSH bucket ``argmax([xR; -xR])`` (one bucket when R has no column)."""
    if rotations.shape[1] == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    proj = torch.matmul(x, rotations.to(x.dtype))
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)


def _cut(x: torch.Tensor, n_chunks: int, size: int) -> torch.Tensor:
    """``(B, H, N)`` -> ``(B, H, n_chunks, size)``, the tail padded with zeros (callers mask it)."""
    return torch.nn.functional.pad(x, (0, n_chunks * size - x.shape[-1])).view(*x.shape[:2], n_chunks, size)


def _chunks(t: torch.Tensor, order: torch.Tensor, n_chunks: int, size: int) -> torch.Tensor:
    """Rows of ``t (B, H, N, X)`` gathered in ``order (B, H, N)`` and cut into ``(B, H, n_chunks, size, X)``
    (the tail padded with copies of row 0; callers mask them)."""
    B, H, n, X = t.shape
    idx = torch.nn.functional.pad(order, (0, n_chunks * size - n))
    return torch.gather(t, 2, idx.unsqueeze(-1).expand(B, H, n_chunks * size, X)).view(B, H, n_chunks, size, X)


@register
@dataclass(frozen=True)
class Scatterbrain(Method):
    """Scatterbrain: Performer (FAVOR+) low-rank part + an exact sparse part on
    LSH-bucketed pairs Ω with the low-rank estimate subtracted there, so Ω is
    exact and the rest low-rank: ``out = (φQ(φKᵀV) + S̃V) / (φQ(φKᵀ1) + S̃1)``,
    ``S̃ = exp(scale·qk) − φ(q)·φ(k)`` on Ω.

    Ω: queries and keys are hashed with the same angular LSH, sorted by bucket
    and cut into equal chunks; a query's pairs are the keys in its chunk with its
    bucket (∩ causal ∩ padding). With ``buckets=1`` and ``chunk >= N`` Ω is every
    visible pair and the result is exact. (A compact self-contained sort-and-chunk
    LSH; it can move onto the shared block-sparse engine.) No state is kept;
    decoding recomputes (``Nq < Nk``).
    """

    name: ClassVar[str] = "scatterbrain"
    exact_for: ClassVar[str] = "buckets = 1 and chunk >= N (the exact sparse part covers every pair)"
    family: ClassVar[Family] = Family.HYBRID
    complexity: ClassVar[str] = "O(N·m·D + N·chunk·D)"
    supports: ClassVar[Supports] = Supports(causal=True, noncausal=True, decode=True, grad=True, lse=False, varlen=True)
    papers: ClassVar[tuple[str, ...]] = ("Scatterbrain: Unifying Sparse and Low-rank Attention",)

    features: int = param(128, min=1, max=MAX_SIZE, help="random features m of the low-rank (Performer) part")
    buckets: int = param(32, min=1, max=MAX_SIZE, help="LSH buckets (1, or an even number)")
    seed: int = param(0, help="seed of the random features and the LSH rotations")
    chunk: int = param(64, min=1, clamp=True, help="sorted chunk length of the sparse part")

    def validate(self) -> None:
        if self.buckets > 1 and self.buckets % 2:
            raise AttnZooError(f"scatterbrain: parameter 'buckets' expected 1 or an even number, got {self.buckets}")

    def forward(self, q, k, v, prob: Problem, *, causal, key_padding_mask, return_lse):
        performer = Performer(features=self.features, seed=self.seed, chunk=64)
        phi_q, shift, phi_k = performer.feature_maps(q, k, prob.scale)
        packed, _ = linear_attention(phi_q, phi_k, with_ones(v), causal=causal, chunk=64,
                                     form=engine_form(prob.len_k), key_padding_mask=key_padding_mask)
        k, v, phi_k = (t.repeat_interleave(prob.groups, dim=1) for t in (k, v, phi_k))
        sp_out, sp_lse, lr_num, lr_den = self.sparse_part(q, k, v, phi_q, phi_k, prob, causal, key_padding_mask)
        num = packed[..., :-1] - lr_num
        den = (packed[..., -1:] - lr_den).clamp(min=0)  # Σ over keys outside Ω of φ(q)·φ(k) >= 0
        return combine(num, den, shift, sp_out, sp_lse), None

    def sparse_part(self, q, k, v, phi_q, phi_k, prob: Problem, causal: bool, key_padding_mask):
        """On Ω, in the original query order: exact ``(out, lse)`` and the low-rank ``(num, den)`` to remove."""
        B, H, len_q, len_k = prob.batch, prob.heads_q, prob.len_q, prob.len_k
        gen = torch.Generator().manual_seed(self.seed + 1)
        rotations = torch.randn(prob.dim, self.buckets // 2 if self.buckets > 1 else 0, generator=gen,
                                dtype=torch.float64)
        n_chunks = max(1, math.ceil(max(len_q, len_k) / self.chunk))
        size_q, size_k = math.ceil(len_q / n_chunks), math.ceil(len_k / n_chunks)
        bq, order_q = torch.sort(angular_lsh(q, rotations), dim=-1, stable=True)
        bk, order_k = torch.sort(angular_lsh(k, rotations), dim=-1, stable=True)
        bq, bk = _cut(bq, n_chunks, size_q), _cut(bk, n_chunks, size_k)
        pos_q, pos_k = _cut(order_q + len_k - len_q, n_chunks, size_q), _cut(order_k, n_chunks, size_k)
        real_q = torch.arange(n_chunks * size_q, device=q.device).view(n_chunks, size_q) < len_q
        real_k = torch.arange(n_chunks * size_k, device=q.device).view(n_chunks, size_k) < len_k
        omega = (bq.unsqueeze(-1) == bk.unsqueeze(-2)) & real_q.unsqueeze(-1) & real_k.unsqueeze(-2)
        if causal:
            omega = omega & (pos_k.unsqueeze(-2) <= pos_q.unsqueeze(-1))
        if key_padding_mask is not None:
            kept = torch.gather(key_padding_mask[:, None, :].expand(B, H, len_k), 2, order_k)
            omega = omega & _cut(kept, n_chunks, size_k).unsqueeze(-2)
        qs, ks, vs = (_chunks(t, o, n_chunks, s) for t, o, s in ((q, order_q, size_q), (k, order_k, size_k),
                                                                 (v, order_k, size_k)))
        out, lse = masked_softmax_partial(torch.matmul(qs, ks.transpose(-1, -2)) * prob.scale, omega, vs)
        lowrank = torch.matmul(_chunks(phi_q, order_q, n_chunks, size_q),
                               _chunks(phi_k, order_k, n_chunks, size_k).transpose(-1, -2)) * omega
        parts = torch.cat([out, lse.unsqueeze(-1), torch.matmul(lowrank, vs), lowrank.sum(-1, keepdim=True)], dim=-1)
        parts = parts.view(B, H, n_chunks * size_q, -1)[:, :, :len_q]
        inverse = torch.argsort(order_q, dim=-1)
        parts = torch.gather(parts, 2, inverse.unsqueeze(-1).expand(B, H, len_q, parts.shape[-1]))
        dv = prob.dim_v
        return parts[..., :dv], parts[..., dv], parts[..., dv + 1:2 * dv + 1], parts[..., -1:]
