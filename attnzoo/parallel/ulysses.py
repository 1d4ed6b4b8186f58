"""DeepSpeed-Ulysses sequence parallelism (docs/methods.md, Sequence parallel).

One all-to-all turns "every rank holds N/P positions of all heads" into
"every rank holds all N positions of H/P heads"; any registered attention
method then runs locally on its heads, and a second all-to-all turns the
output back. The all-to-all is its own transpose, so the backward pass is the
same two exchanges in reverse, and the local method's own backward runs in
between. Per-rank traffic is about ``(P-1)/P · n · (Hq·D + Hkv·(D+Dv) + Hq·Dv)``
elements for ``n = N/P`` local positions: constant when N and P grow together.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch

from ..api import attention
from ..errors import AttnZooError
from ..registry import _lookup
from .comm import Team, all_to_all_rows, resolve_team
from .layout import check_shards
from .packed import Documents


def _seq_to_heads(team: Team, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``(B, H, n_r, D)`` on every rank -> ``(B, H/P, N, D)``: rank s gets head group s of all positions."""
    B, H, n, D = x.shape
    P = team.size
    rows = x.reshape(B, P, H // P, n, D).permute(1, 3, 0, 2, 4).reshape(P * n, B, H // P, D)
    out = all_to_all_rows(team, "ulysses all-to-all", rows, [n] * P, lengths)  # source-rank order = position order
    return out.permute(1, 2, 0, 3)


def _heads_to_seq(team: Team, y: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`: ``(B, H/P, N, D)`` -> ``(B, H, n_r, D)``."""
    B, Hp, _, D = y.shape
    P, n = team.size, lengths[team.rank]
    out = all_to_all_rows(team, "ulysses all-to-all", y.permute(2, 0, 1, 3), lengths, [n] * P)
    return out.reshape(P, n, B, Hp, D).permute(2, 0, 3, 1, 4).reshape(B, P * Hp, n, D)


class _AllToAll(torch.autograd.Function):
    """Sequence shards <-> head shards; the backward is the opposite move."""

    @staticmethod
    def forward(ctx, x, team, lengths, to_heads):  # noqa: D401  (autograd signature)
        ctx.team, ctx.lengths, ctx.to_heads = team, lengths, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(team, x, lengths)

    @staticmethod
    def backward(ctx, grad):
        move = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return move(ctx.team, grad.contiguous(), ctx.lengths), None, None, None


def heads_parallel(team: Team, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                   local: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """All-to-all to head shards inside ``team`` (its ranks hold ``lengths`` positions, in rank order),
    ``local(q, k, v)`` on this rank's heads of those positions, all-to-all back; differentiable.

    Needs ``Hq % P == 0``; KV heads are replicated (``P / gcd(Hkv, P)`` times) when ``Hkv % P != 0``.
    """
    replicas = team.size // math.gcd(k.shape[1], team.size)  # divides Hq/Hkv because P divides Hq
    if replicas > 1:
        k, v = k.repeat_interleave(replicas, dim=1), v.repeat_interleave(replicas, dim=1)
    qh, kh, vh = (_AllToAll.apply(t, team, lengths, True) for t in (q, k, v))
    return _AllToAll.apply(local(qh, kh, vh), team, lengths, False)


def check_params(fn: str, method: str, params: dict[str, Any]) -> None:
    """An unknown method or a per-call tensor input (which would need resharding) fails before data moves."""
    _lookup(method)
    tensors = sorted(name for name, value in params.items() if isinstance(value, torch.Tensor))
    if tensors:
        raise AttnZooError(
            f"{fn}: per-call tensor inputs {tensors} are not supported (they would need resharding); "
            f"pass only scalar method parameters"
        )


def check_heads(fn: str, heads_q: int, degree: int, what: str) -> None:
    if heads_q % degree:
        raise AttnZooError(
            f"{fn}: expected the number of query heads Hq={heads_q} to be divisible by {what}={degree} "
            f"(Ulysses splits heads across ranks); use ring_attention or token_ring_attention, which split "
            f"positions instead"
        )


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str = "exact",
                      causal: bool = False, group=None, scale: float | None = None, cu_seqlens_q=None,
                      cu_seqlens_k=None, **params: Any) -> torch.Tensor:
    """Attention over a sequence sharded across ``group`` by head/sequence all-to-all (DeepSpeed-Ulysses).

    Same shard contract as :func:`ring_attention`. ``method`` and ``params``
    choose the local attention (any registered method, e.g.
    ``method="sliding_window", window=256``); it sees all N positions of
    ``Hq/P`` query heads. Requires ``Hq % P == 0``. With GQA, KV heads are
    split too when ``Hkv % P == 0``, otherwise each is replicated just enough
    (``P / gcd(Hkv, P)`` times) to be split. Differentiable when the local
    method is. Per-call tensor inputs (``key_padding_mask``, ``g``, ...) are not
    resharded and are refused. Packed sequences (``cu_seqlens_q`` /
    ``cu_seqlens_k``, global offsets as in :func:`ring_attention`) go to the
    local method, which runs each document separately (methods with varlen
    support).
    """
    fn = "ulysses_attention"
    team = resolve_team(fn, group)
    prob, layout = check_shards(team, q, k, v, causal=causal, scale=scale,
                                validate=lambda: check_params(fn, method, params),
                                agree={"method": method, "params": sorted(params.items()),
                                       "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k})
    check_heads(fn, prob.heads_q, team.size, "the number of ranks P")
    lengths = [layout.length(r) for r in range(team.size)]
    packed = packed_args(fn, cu_seqlens_q, cu_seqlens_k, sum(lengths), q)
    return heads_parallel(team, q, k, v, lengths, functools.partial(
        attention, method=method, causal=causal, scale=prob.scale, **packed, **params))


def packed_args(fn: str, cu_seqlens_q, cu_seqlens_k, total: int, q: torch.Tensor) -> dict[str, Any]:
    """The offsets, checked, for a local method that sees the whole sequence (it runs each document
    separately); none without offsets."""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return {}
    Documents.from_args(fn, cu_seqlens_q, cu_seqlens_k, total, q)
    return {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
