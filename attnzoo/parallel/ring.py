"""Ring attention and TokenRing attention (docs/methods.md, Sequence parallel), forward and backward.

Both compute exact attention of every query shard against every key shard
with the tiled engine of :mod:`attnzoo.core.exact`, each (query segment, key
segment) pair placed at its absolute positions with ``q_offset``/``k_offset``,
and combine the partial results by log-sum-exp (:func:`attnzoo.merge`) in fp32.

* **Ring**: K/V blocks travel around the ring (rank p sends to p+1, receives
  from p-1) with asynchronous point-to-point transfers that overlap the local
  block's attention. The backward pass runs its own ring: K/V travel again,
  and each block's dK/dV accumulator (fp32) travels with it, collecting one
  contribution per rank, until it arrives back at its owner.
* **TokenRing**: queries travel instead of K/V, and results travel back, so
  both directions of every link carry traffic. At step t rank p sends its
  queries to p+t and receives the queries of p-t, attends them to its own
  K/V, and returns ``(out, lse)`` to p-t. The backward pass sends
  ``(q, out, dout, lse)`` the same way and gets dQ back; dK/dV never move.

Causal attention uses the zig-zag layout (:class:`Layout.zigzag`) inside the
call: every rank then has the same amount of work; the re-shuffle and its
inverse are one all-to-all each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.exact import TileSpec, tiled_backward, tiled_forward
from ..core.partial import Partial, merge
from ..errors import AttnZooError
from .comm import Team, exchange, resolve_team
from .layout import Layout, check_shards, relayout
from .packed import Documents
from .remat import attend_or_replay

Q_TILE, K_TILE = 128, 256


# ------------------------------------------------------------ block compute
@dataclass(frozen=True)
class Rule:
    """Which keys a query sees: ``causal`` and the documents of a packed sequence; and the score scale."""

    causal: bool
    scale: float
    docs: Documents


def _pairs(q_segs, k_segs, rule: Rule):
    """``(query rows, key rows, TileSpec)`` of every (segment, segment, document) piece in which some key
    is visible; a document is cut where it leaves either segment."""
    q_at = 0
    for q_seg in q_segs:
        k_at = 0
        for k_seg in k_segs:
            for q0, q1, k0, k1, q_offset, k_offset in rule.docs.pieces(q_seg, k_seg, rule.causal):
                yield (slice(q_at + q0, q_at + q1), slice(k_at + k0, k_at + k1),
                       TileSpec(rule.scale, rule.causal, q_offset, k_offset, Q_TILE, K_TILE))
            k_at += k_seg[1]
        q_at += q_seg[1]


def _attend_block(acc: Partial, q, q_segs, k, v, k_segs, rule: Rule) -> Partial:
    """Merge into ``acc`` (in place, fp32) the attention of the queries (segments ``q_segs``)
    to one K/V block (segments ``k_segs``); returns ``acc``."""
    for qs, ks, spec in _pairs(q_segs, k_segs, rule):
        part = Partial(*tiled_forward(q[:, :, qs].float(), k[:, :, ks].float(), v[:, :, ks].float(), spec))
        acc.out[:, :, qs], acc.lse[:, :, qs] = merge(Partial(acc.out[:, :, qs], acc.lse[:, :, qs]), part)
    return acc


def _grad_block(q, q_segs, k, v, k_segs, out, lse, d_out, rule: Rule,
                dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Add one K/V block's gradient contributions to ``dq``, ``dk``, ``dv`` (fp32), given the global out/lse."""
    for qs, ks, spec in _pairs(q_segs, k_segs, rule):
        dq_, dk_, dv_ = tiled_backward(q[:, :, qs].float(), k[:, :, ks].float(), v[:, :, ks].float(),
                                       out[:, :, qs], lse[:, :, qs], d_out[:, :, qs].float(), None, spec)
        dq[:, :, qs] += dq_
        dk[:, :, ks] += dk_
        dv[:, :, ks] += dv_


def _pack(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One flat buffer holding ``tensors`` (one message instead of several)."""
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])


def _unpack(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Views of ``flat`` with the given shapes, in order (the inverse of :func:`_pack`)."""
    out, at = [], 0
    for shape in shapes:
        out.append(flat[at:at + math.prod(shape)].view(shape))
        at += math.prod(shape)
    return out


def _numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


class _Shapes:
    """Per-rank block shapes of one call: a rank's q, k, v, out rows follow its layout length."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout):
        self.B, self.Hq, self.D = q.shape[0], q.shape[1], q.shape[3]
        self.Hkv, self.Dv = k.shape[1], v.shape[3]
        self.layout = layout

    def kv(self, rank: int) -> list[tuple[int, ...]]:
        n = self.layout.length(rank)
        return [(self.B, self.Hkv, n, self.D), (self.B, self.Hkv, n, self.Dv)]

    def q(self, rank: int) -> tuple[int, ...]:
        return (self.B, self.Hq, self.layout.length(rank), self.D)

    def out(self, rank: int) -> tuple[int, ...]:
        return (self.B, self.Hq, self.layout.length(rank), self.Dv)

    def rows(self, rank: int) -> tuple[int, ...]:
        return (self.B, self.Hq, self.layout.length(rank))


# --------------------------------------------------------------------- ring
def _pass_on(team: Team, what: str, block: torch.Tensor, incoming_numel: int, tag: int = 0):
    """Start sending ``block`` to the next rank and receiving the previous rank's (``incoming_numel`` elements)."""
    incoming = block.new_empty(incoming_numel)
    pending = exchange(team, what, [(block, (team.rank + 1) % team.size)], [(incoming, (team.rank - 1) % team.size)],
                       tag)
    return incoming, pending


def _ring_forward(team: Team, q, k, v, layout: Layout, rule: Rule) -> Partial:
    P, p = team.size, team.rank
    shapes = _Shapes(q, k, v, layout)
    acc = Partial.empty(shapes.out(p), device=q.device)
    block = _pack(k, v)
    for t in range(P):
        src = (p - t) % P
        if t < P - 1:  # start moving the next block before computing on this one
            incoming, pending = _pass_on(team, "ring K/V", block, _numel(shapes.kv((src - 1) % P)))
        kb, vb = _unpack(block, shapes.kv(src))
        acc = _attend_block(acc, q, layout.segments[p], kb, vb, layout.segments[src], rule)
        if t < P - 1:
            pending.wait()
            block = incoming
    return acc


def _ring_backward(team: Team, q, k, v, out, lse, d_out, layout: Layout, rule: Rule):
    P, p = team.size, team.rank
    shapes = _Shapes(q, k, v, layout)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    block = _pack(k, v)
    grads = torch.zeros(_numel(shapes.kv(p)), dtype=torch.float32, device=q.device)  # dK/dV of the block in hand
    grads_pending = None
    for t in range(P):
        src = (p - t) % P
        if t < P - 1:
            incoming, pending = _pass_on(team, "ring K/V", block, _numel(shapes.kv((src - 1) % P)))
        if grads_pending is not None:
            grads_pending.wait()
            grads = grads_in
        kb, vb = _unpack(block, shapes.kv(src))
        dkb, dvb = _unpack(grads, shapes.kv(src))
        _grad_block(q, layout.segments[p], kb, vb, layout.segments[src], out, lse, d_out, rule, dq, dkb, dvb)
        if P > 1:  # pass the accumulator on; after the last step it arrives back at its owner
            grads_in, grads_pending = _pass_on(team, "ring dK/dV", grads, _numel(shapes.kv((src - 1) % P)), tag=1)
        if t < P - 1:
            pending.wait()
            block = incoming
    if grads_pending is not None:
        grads_pending.wait()
        grads = grads_in
    dk, dv = _unpack(grads, shapes.kv(p))
    return dq, dk, dv


# ---------------------------------------------------------------- TokenRing
def _token_ring_pass(team: Team, what: str, payload: torch.Tensor, payload_numel: Callable[[int], int],
                     serve: Callable[[torch.Tensor, int], torch.Tensor], reply_numel: int) -> list[torch.Tensor]:
    """Send ``payload`` to every rank, ``serve(payload of rank s, s)`` every rank's payload, and return
    the replies to this rank's payload (this rank's own first).

    At step t this rank sends its payload to p+t and serves the payload of
    p-t, sending the reply back to p-t: the two directions carry traffic at
    once, and the next payload is in flight while this one is served.
    """
    P, p = team.size, team.rank
    replies = [serve(payload, p)]

    def post(t: int):
        buf = payload.new_empty(payload_numel((p - t) % P))
        return buf, exchange(team, f"{what} send", [(payload, (p + t) % P)], [(buf, (p - t) % P)])

    in_flight = []
    ahead = post(1) if P > 1 else None
    for t in range(1, P):
        buf, pending = ahead
        pending.wait()
        if t + 1 < P:
            ahead = post(t + 1)
        reply = serve(buf, (p - t) % P)
        back = reply.new_empty(reply_numel)
        in_flight.append((back, exchange(team, f"{what} reply", [(reply, (p - t) % P)], [(back, (p + t) % P)],
                                         tag=1)))
    for back, pending in in_flight:
        pending.wait()
        replies.append(back)
    return replies


def _token_ring_forward(team: Team, q, k, v, layout: Layout, rule: Rule) -> Partial:
    p = team.rank
    shapes = _Shapes(q, k, v, layout)

    def serve(q_flat: torch.Tensor, src: int) -> torch.Tensor:
        (qs,) = _unpack(q_flat, [shapes.q(src)])
        part = _attend_block(Partial.empty(shapes.out(src), device=q.device), qs, layout.segments[src],
                             k, v, layout.segments[p], rule)
        return _pack(*part)

    replies = _token_ring_pass(team, "token ring Q", q.contiguous().view(-1), lambda r: math.prod(shapes.q(r)), serve,
                               _numel([shapes.out(p), shapes.rows(p)]))
    return merge(*[Partial(*_unpack(r, [shapes.out(p), shapes.rows(p)])) for r in replies])


def _token_ring_backward(team: Team, q, k, v, out, lse, d_out, layout: Layout, rule: Rule):
    p = team.rank
    shapes = _Shapes(q, k, v, layout)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)

    def parts(r: int) -> list[tuple[int, ...]]:
        return [shapes.q(r), shapes.out(r), shapes.out(r), shapes.rows(r)]

    def serve(flat: torch.Tensor, src: int) -> torch.Tensor:
        qs, out_s, d_out_s, lse_s = _unpack(flat, parts(src))
        dq = torch.zeros_like(qs)
        _grad_block(qs, layout.segments[src], k, v, layout.segments[p], out_s, lse_s, d_out_s, rule,
                    dq, dk, dv)
        return dq.view(-1)

    payload = _pack(q, out, d_out, lse, dtype=torch.float32)
    replies = _token_ring_pass(team, "token ring dQ", payload, lambda r: _numel(parts(r)), serve,
                               math.prod(shapes.q(p)))
    return sum(r.view(shapes.q(p)) for r in replies), dk, dv


# ----------------------------------------------------------------- autograd
class _RingFunction(torch.autograd.Function):
    """Autograd wrapper of one ring engine: ``forward``/``backward`` hold the explicit communication.

    The forward goes through :func:`attend_or_replay`, so inside a LightSeq
    checkpoint (``lightseq``) the rerun for the backward reuses the first
    forward's ``(out, lse)``; the backward never reruns the forward anyway.
    """

    engines: dict[str, tuple[Callable, Callable]] = {
        "ring": (_ring_forward, _ring_backward),
        "token_ring": (_token_ring_forward, _token_ring_backward),
    }

    @staticmethod
    def forward(ctx, q, k, v, engine, team, layout, rule, lightseq):  # noqa: D401  (autograd signature)
        fwd, _ = _RingFunction.engines[engine]
        compute = functools.partial(fwd, team, q, k, v, layout, rule)
        out, lse = attend_or_replay(compute) if lightseq else compute()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (engine, team, layout, rule)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        engine, team, layout, rule = ctx.args
        _, bwd = _RingFunction.engines[engine]
        dq, dk, dv = bwd(team, q, k, v, out, lse, d_out.contiguous(), layout, rule)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_engine(engine: str, q, k, v, team: Team, layout: Layout, rule: Rule, lightseq: bool) -> torch.Tensor:
    """Attention of shards already in ``layout`` (positions per rank of ``team``), differentiable;
    the building block of :func:`ring_attention`, :func:`token_ring_attention` and USP."""
    return _RingFunction.apply(q, k, v, engine, team, layout, rule, lightseq)


def _sequence_parallel(fn: str, engine: str, q, k, v, causal: bool, group, scale, cu_seqlens_q, cu_seqlens_k,
                       lightseq: bool) -> torch.Tensor:
    team = resolve_team(fn, group)

    def validate() -> None:  # the offsets need N, known after the shape check (they agree across ranks)
        if not isinstance(lightseq, bool):
            raise AttnZooError(f"{fn}: lightseq: expected a bool, got {type(lightseq).__name__}")

    prob, contiguous = check_shards(team, q, k, v, causal=causal, scale=scale, validate=validate,
                                    agree={"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                                           "lightseq": lightseq})
    total = sum(contiguous.length(r) for r in range(team.size))
    rule = Rule(causal, prob.scale, Documents.from_args(fn, cu_seqlens_q, cu_seqlens_k, total, q))
    layout = Layout.zigzag(total, team.size) if causal and team.size > 1 else contiguous
    q, k, v = (relayout(team, t, contiguous, layout) for t in (q, k, v))
    out = ring_engine(engine, q, k, v, team, layout, rule, lightseq)
    return relayout(team, out, layout, contiguous)


_COMMON = """
    Packed sequences (batch 1): ``cu_seqlens_q`` / ``cu_seqlens_k`` (1-D int
    tensors, the same on every rank) are the FlashAttention varlen offsets of
    the documents in *global* positions (``[0, ..., N]``), as in
    ``attnzoo.attention``; documents may cross shard boundaries; each
    document's queries see only its keys, causal aligned bottom-right within
    each document. ``lightseq``: inside
    :func:`attnzoo.parallel.lightseq_checkpoint`, keep this call's output and
    lse for the backward instead of recomputing it (no effect elsewhere).
"""


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   group=None, scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                   lightseq: bool = True) -> torch.Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group``, by ring attention.

    Rank r passes its contiguous shard ``q (B, Hq, n_r, D)``, ``k (B, Hkv, n_r, D)``,
    ``v (B, Hkv, n_r, Dv)`` (``torch.tensor_split`` of the N positions: N need
    not be divisible by P) and gets the output for the same positions. GQA,
    causal (bottom-right = top-left here, since Nq = Nk) and non-causal;
    differentiable. Communication per rank: (P-1) K/V blocks of n positions
    sent in the forward pass; causal calls add the zig-zag re-layout (one
    all-to-all of q, k, v and one of the output).
    """
    return _sequence_parallel("ring_attention", "ring", q, k, v, causal, group, scale, cu_seqlens_q, cu_seqlens_k,
                              lightseq)


def token_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                         group=None, scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                         lightseq: bool = True) -> torch.Tensor:
    """Exact attention over a sharded sequence by TokenRing: queries go out, ``(out, lse)`` come back.

    Same contract as :func:`ring_attention` (shards, GQA, causal, uneven N,
    packed sequences, differentiable); the backward sends ``(q, out, dout, lse)``
    out and gets dQ back, so dK/dV are accumulated where K/V live.
    """
    return _sequence_parallel("token_ring_attention", "token_ring", q, k, v, causal, group, scale, cu_seqlens_q,
                              cu_seqlens_k, lightseq)


ring_attention.__doc__ += _COMMON
token_ring_attention.__doc__ += _COMMON
