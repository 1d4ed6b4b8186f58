"""Which positions of the sequence each rank holds, and moving rows between layouts.

The public convention (docs/methods.md, Sequence parallel): rank ``r`` of ``P`` holds the
contiguous shard ``torch.tensor_split(x, P, dim=2)[r]`` of the ``N`` positions.
When ``N`` is not divisible by ``P`` the first ``N % P`` ranks hold one extra
position (that is what ``tensor_split`` does); any other split is refused.

Causal ring attention balances its work with the zig-zag layout: the sequence
is cut into ``2P`` chunks and rank ``r`` holds chunks ``r`` and ``2P-1-r``, so
every rank has one early and one late chunk. A :class:`Layout` lists, per
rank, the ``(start, length)`` segments of global positions it holds, in local
order; :func:`relayout` moves rows between two layouts with one all-to-all and
is differentiable (its backward is the reverse move).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..checks import Problem, check_qkv
from ..errors import AttnZooError
from .comm import ParallelError, Team, all_gather_ints, all_to_all_rows, resolve_team

Segment = tuple[int, int]  # (first global position, length)


def shard_sizes(total: int, parts: int) -> list[int]:
    """Lengths of ``torch.tensor_split`` of ``total`` positions into ``parts`` shards."""
    return [total // parts + (r < total % parts) for r in range(parts)]


def _starts(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s contiguous shard of ``x`` along ``dim``: what each rank passes to the parallel functions."""
    return torch.tensor_split(x, world_size, dim=dim)[rank]


def gather_sequence(x: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
    """The full sequence on every rank from each rank's contiguous shard (the inverse of :func:`shard_sequence`).

    Not differentiable; for checking results and for demos, since it moves
    the whole sequence to every rank.
    """
    team = resolve_team("gather_sequence", group)
    lengths = [row[0] for row in all_gather_ints(team, "gather", [x.shape[dim]], x.device)]
    rows = x.movedim(dim, 0)
    padded = rows.new_zeros((max(lengths),) + tuple(rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    pieces = [torch.empty_like(padded) for _ in range(team.size)]
    with team.talking("gather"):
        torch.distributed.all_gather(pieces, padded.contiguous(), group=team.group)
    return torch.cat([p[:n] for p, n in zip(pieces, lengths)]).movedim(0, dim)


@dataclass(frozen=True)
class Layout:
    """Per rank, the segments of global positions it holds, in local order."""

    segments: tuple[tuple[Segment, ...], ...]

    @classmethod
    def contiguous(cls, total: int, parts: int) -> "Layout":
        sizes = shard_sizes(total, parts)
        return cls(tuple(((s, n),) for s, n in zip(_starts(sizes), sizes)))

    @classmethod
    def zigzag(cls, total: int, parts: int) -> "Layout":
        sizes = shard_sizes(total, 2 * parts)
        chunks = list(zip(_starts(sizes), sizes))
        return cls(tuple((chunks[r], chunks[2 * parts - 1 - r]) for r in range(parts)))

    def grouped(self, members: list[list[int]]) -> "Layout":
        """One rank per group of ``members``: group i holds its members' segments in member order
        (what a rank of a 2-D mesh holds after the all-to-all inside its group)."""
        return Layout(tuple(_joined([s for m in group for s in self.segments[m]]) for group in members))

    def spread(self, members: list[list[int]]) -> "Layout":
        """The inverse of :meth:`grouped`: rank ``members[i][u]`` holds the u-th of ``len(members[i])``
        consecutive pieces (``shard_sizes``) of this layout's rank i."""
        size = sum(len(group) for group in members)
        held: list[tuple[Segment, ...]] = [()] * size
        for segs, group in zip(self.segments, members):
            flat = [(s + i, 1) for s, n in segs for i in range(n)]
            at = 0
            for member, n in zip(group, shard_sizes(len(flat), len(group))):
                held[member] = _joined(flat[at:at + n])
                at += n
        return Layout(tuple(held))

    def length(self, rank: int) -> int:
        return sum(n for _, n in self.segments[rank])

    def local_rows(self, rank: int, start: int, length: int) -> torch.Tensor:
        """Local row indices of global positions ``[start, start+length)``, which ``rank`` must hold."""
        local = 0
        for s, n in self.segments[rank]:
            if s <= start and start + length <= s + n:
                return torch.arange(local + start - s, local + start - s + length)
            local += n
        raise AssertionError(f"positions [{start}, {start + length}) are not held by rank {rank}")


def _joined(segments: list[Segment]) -> tuple[Segment, ...]:
    """``segments`` with each one that starts where the previous ends merged into it (empty ones dropped)."""
    out: list[Segment] = []
    for s, n in segments:
        if n and out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        elif n:
            out.append((s, n))
    return tuple(out)


def _overlap(a: tuple[Segment, ...], b: tuple[Segment, ...]) -> list[Segment]:
    """The intersections of two segment lists, sorted by position."""
    out = []
    for s1, n1 in a:
        for s2, n2 in b:
            lo, hi = max(s1, s2), min(s1 + n1, s2 + n2)
            if hi > lo:
                out.append((lo, hi - lo))
    return sorted(out)


@dataclass(frozen=True)
class _Plan:
    """One rank's part of a move between layouts."""

    send_rows: torch.Tensor  # local source rows, grouped by destination rank
    send_splits: list[int]
    recv_rows: torch.Tensor  # local destination row of each received row, in arrival order
    recv_splits: list[int]
    out_len: int


def _plan(src: Layout, dst: Layout, rank: int) -> _Plan:
    size = len(src.segments)
    send, send_splits, recv, recv_splits = [], [], [], []
    for peer in range(size):
        outgoing = _overlap(src.segments[rank], dst.segments[peer])
        send += [src.local_rows(rank, s, n) for s, n in outgoing]
        send_splits.append(sum(n for _, n in outgoing))
        incoming = _overlap(src.segments[peer], dst.segments[rank])
        recv += [dst.local_rows(rank, s, n) for s, n in incoming]
        recv_splits.append(sum(n for _, n in incoming))
    empty = torch.zeros(0, dtype=torch.long)
    return _Plan(torch.cat(send) if send else empty, send_splits, torch.cat(recv) if recv else empty, recv_splits,
                 dst.length(rank))


def _move(team: Team, x: torch.Tensor, plan: _Plan, what: str) -> torch.Tensor:
    rows = x.movedim(2, 0)
    received = all_to_all_rows(team, what, rows[plan.send_rows.to(x.device)], plan.send_splits, plan.recv_splits)
    out = rows.new_empty((plan.out_len,) + tuple(rows.shape[1:]))
    out[plan.recv_rows.to(x.device)] = received
    return out.movedim(0, 2)


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, team, there, back):  # noqa: D401  (autograd signature)
        ctx.team, ctx.back = team, back
        return _move(team, x, there, "relayout")

    @staticmethod
    def backward(ctx, grad):
        return _move(ctx.team, grad.contiguous(), ctx.back, "relayout"), None, None, None


def relayout(team: Team, x: torch.Tensor, src: Layout, dst: Layout) -> torch.Tensor:
    """Move the rows (dim 2) of ``x`` from layout ``src`` to ``dst``; differentiable."""
    if src == dst:
        return x
    return _Relayout.apply(x, team, _plan(src, dst, team.rank), _plan(dst, src, team.rank))


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SIZES = ("batch B", "query heads Hq", "KV heads Hkv", "head dim D", "value dim Dv")
_REJECTED = -1  # a rank whose own inputs failed validation sends this in place of its sizes


def _check_local(team: Team, q, k, v, causal: bool, scale: float | None) -> Problem:
    if not isinstance(causal, bool):
        raise AttnZooError(f"{team.fn}: causal: expected a bool, got {type(causal).__name__}")
    prob = check_qkv(q, k, v, scale=scale)
    if prob.len_q != prob.len_k:
        raise ParallelError(
            f"{team.fn}: expected q and k/v shards of the same length (self-attention over one sharded sequence), "
            f"got q with {prob.len_q} positions and k/v with {prob.len_k} on rank {team.rank}"
        )
    if q.dtype not in _DTYPES:
        raise ParallelError(f"{team.fn}: q: expected one of {list(_DTYPES)}, got {q.dtype}")
    return prob


def _fingerprint(value: Any) -> int:
    """A 31-bit digest of an argument's value, equal on every rank exactly when the values are."""
    if isinstance(value, torch.Tensor):  # by value: a tensor of offsets agrees with the same list
        value = value.tolist()
    return zlib.crc32(repr(value).encode()) & 0x7FFFFFFF


def check_shards(team: Team, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 scale: float | None, validate: Callable[[], None] | None = None,
                 agree: dict[str, Any] | None = None) -> tuple[Problem, Layout]:
    """Validate this rank's shards (and run the caller's ``validate``), then check that every rank
    agrees (one small all_gather): on shapes, dtype, ``causal``, ``scale`` and each argument named in
    ``agree`` (compared by a digest of its value; small tensors such as offsets are fine).

    Returns this rank's :class:`Problem` and the contiguous :class:`Layout` of
    the whole sequence. A rank whose own arguments are invalid raises its
    error while the others raise :class:`ParallelError` at once (no timeout);
    every rank raises :class:`ParallelError` when the ranks disagree on sizes,
    dtype or ``causal``, or hold a split other than ``torch.tensor_split``'s.
    """
    agree = {"scale": scale, **(agree or {})}
    try:
        if validate is not None:
            validate()
        prob = _check_local(team, q, k, v, causal, scale)
        mine = [prob.batch, prob.heads_q, prob.heads_kv, prob.dim, prob.dim_v, prob.len_q, _DTYPES.index(q.dtype),
                int(causal)] + [_fingerprint(value) for value in agree.values()]
    except AttnZooError as error:  # still join the gather, so the other ranks fail fast instead of timing out
        all_gather_ints(team, "shape check", [_REJECTED] * (8 + len(agree)),
                        q.device if isinstance(q, torch.Tensor) else "cpu")
        raise error
    every = all_gather_ints(team, "shape check", mine, q.device)
    rejected = [r for r, row in enumerate(every) if row[0] == _REJECTED]
    if rejected:
        raise ParallelError(f"{team.fn}: rank(s) {rejected} rejected their inputs (see the error raised there)")
    for i, name in enumerate(_SIZES):
        values = [row[i] for row in every]
        if len(set(values)) > 1:
            raise ParallelError(
                f"{team.fn}: shard shapes differ across ranks: {name} is {values} on ranks 0..{team.size - 1} "
                f"(this is rank {team.rank}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
            )
    dtypes = [_DTYPES[row[6]] for row in every]
    if len(set(dtypes)) > 1:
        raise ParallelError(f"{team.fn}: shard dtypes differ across ranks: {dtypes} on ranks 0..{team.size - 1}")
    flags = [bool(row[7]) for row in every]
    if len(set(flags)) > 1:
        raise ParallelError(f"{team.fn}: causal differs across ranks: {flags} on ranks 0..{team.size - 1}")
    for i, name in enumerate(agree):
        if len({row[8 + i] for row in every}) > 1:
            raise ParallelError(f"{team.fn}: {name} differs across ranks (this is rank {team.rank}, where it is "
                                f"{agree[name]!r}); every rank must pass the same value")
    lengths = [row[5] for row in every]
    expected = shard_sizes(sum(lengths), team.size)
    if lengths != expected:
        raise ParallelError(
            f"{team.fn}: shard lengths {lengths} on ranks 0..{team.size - 1} are not a contiguous split of the "
            f"N={sum(lengths)} positions; expected {expected} (rank r holds torch.tensor_split(x, P, dim=2)[r])"
        )
    return prob, Layout.contiguous(sum(lengths), team.size)
