"""The chunked linear-recurrence engine (docs/methods.md, Engines).

One recurrence, three forms that agree::

    S_t = Λ_t ⊙ S_{t-1} + φ(k_t)ᵀ v_t          (S: Dk × Dv per head)
    o_t = φ(q_t) S_t                            (optionally / φ(q_t) z_t, z_t = Λ_t ⊙ z_{t-1} + φ(k_t))

``Λ_t = exp(g_t)`` is given by log-gates ``g ≤ 0``: none (Λ = 1), one value per
token (a scalar per head such as Lightning/RetNet decay, broadcast over
positions: shape ``(B, H, N, 1)``) or one value per token and key channel (GLA:
``(B, H, N, Dk)``). Callers pass already feature-mapped, already scaled q and k.

* ``parallel``: the quadratic masked form ``O = ((Q Kᵀ) ⊙ D) V``; the reference.
* ``chunked``: Lightning-2 / GLA chunkwise form, intra-chunk masked matmul plus a
  state carried across chunks; O(N·C·D + N·D²).
* ``recurrent``: :func:`linear_step` token by token; the decode path.

Decay is handled in log space without ever subtracting two cumulative sums
(``-inf - -inf`` and cancellation); gates below ``-1e4`` are clamped there,
which changes nothing since ``exp(-1e4) = 0`` in float32 and float64.
Non-causal attention uses one global state. Initial and final states
(:class:`LinearState`) let prefill hand over to decode and let a sequence be
processed in pieces. The normaliser ``z`` is carried as one extra value column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AttnZooError
from .gqa import repeat_kv
from .override import Override
from .partial import Partial, merge

FORMS = ("parallel", "chunked", "recurrent")
#: log-gates are clamped here: exp(-1e4) is exactly 0 in float32 and float64
_GATE_FLOOR = -1e4
#: chunks whose cumulative per-channel log-decay stays above -_SAFE_LOG use the
#: factorised matmul form exp(G_t)·exp(-G_s); others fall back to the exact segment sums
_SAFE_LOG = 60.0


#: the chunked form's replacement inside ``CHUNKED.use(impl)`` (a kernel backend); same contract as :func:`_chunked`
CHUNKED = Override("attnzoo_chunked_form")


@dataclass
class LinearState:
    """The recurrent state of one linear-attention layer after some tokens.

    ``kv (B, H, Dk, Dv)``: the decayed sum of ``φ(k)ᵀ v``; ``z (B, H, Dk)``: the
    decayed sum of ``φ(k)`` (normalised attention only, else None). ``H`` is the
    number of *query* heads (KV heads are shared by grouped-query heads).
    ``tokens`` counts the key positions consumed so far.
    """

    kv: torch.Tensor
    z: torch.Tensor | None = None
    tokens: int = 0

    def packed(self) -> torch.Tensor:
        """``kv`` with ``z`` appended as a last value column (the engine's internal layout)."""
        return self.kv if self.z is None else torch.cat([self.kv, self.z.unsqueeze(-1)], dim=-1)

    @classmethod
    def unpack(cls, packed: torch.Tensor, normalize: bool, tokens: int) -> "LinearState":
        if normalize:
            return cls(packed[..., :-1], packed[..., -1], tokens)
        return cls(packed, None, tokens)


# ------------------------------------------------------------------ checks
def check_log_gate(g: object, shape: tuple[int, ...], name: str = "g") -> torch.Tensor:
    """A log-gate tensor of exactly ``shape`` with entries in ``[-inf, 0]``."""
    if not isinstance(g, torch.Tensor):
        raise AttnZooError(f"{name}: expected a tensor of log-gates {shape} (entries <= 0), got {type(g).__name__}")
    if tuple(g.shape) != tuple(shape):
        raise AttnZooError(f"{name}: expected shape {tuple(shape)}, got {tuple(g.shape)}")
    if not g.is_floating_point():
        raise AttnZooError(f"{name}: expected a floating dtype, got {g.dtype}")
    if bool(torch.isnan(g).any()):
        raise AttnZooError(f"{name}: contains NaN; log-gates must be in [-inf, 0]")
    if bool((g > 0).any()):
        raise AttnZooError(f"{name}: expected log-gates <= 0 (decay exp(g) in [0, 1]), got max {float(g.max()):.4g}")
    return g


def check_state(state: object, batch: int, heads: int, dim_k: int, dim_v: int, normalize: bool) -> LinearState:
    if not isinstance(state, LinearState):
        raise AttnZooError(f"state: expected a LinearState or None, got {type(state).__name__}")
    if tuple(state.kv.shape) != (batch, heads, dim_k, dim_v):
        raise AttnZooError(f"state: expected kv of shape {(batch, heads, dim_k, dim_v)}, got {tuple(state.kv.shape)}")
    if normalize != (state.z is not None):
        raise AttnZooError(f"state: expected z {'(B, H, Dk)' if normalize else 'None'} for this method, "
                           f"got {'None' if state.z is None else tuple(state.z.shape)}")
    return state


# ------------------------------------------------------------ log-space sums
def _inclusive(g: torch.Tensor) -> torch.Tensor:
    """``Σ_{r<=t} g_r`` along the sequence (dim -2)."""
    return g.cumsum(dim=-2)


def _exclusive_suffix(g: torch.Tensor) -> torch.Tensor:
    """``Σ_{r>t} g_r`` along the sequence (dim -2), computed without subtraction."""
    suffix = g.flip(-2).cumsum(dim=-2).flip(-2)
    return torch.cat([suffix[..., 1:, :], torch.zeros_like(suffix[..., :1, :])], dim=-2)


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """``(..., N, N, c)``: ``Σ_{s<r<=t} g_r`` at ``[t, s]`` for ``t >= s``, ``-inf`` above the diagonal."""
    n = g.shape[-2]
    ones = torch.ones(n, n, dtype=torch.bool, device=g.device)
    x = g.unsqueeze(-3).expand(*g.shape[:-2], n, n, g.shape[-1]).transpose(-3, -2)  # x[t, s] = g_t
    sums = x.masked_fill(~ones.tril(-1).unsqueeze(-1), 0).cumsum(dim=-3)  # keep g_t where t > s; sum over t
    return sums.masked_fill(~ones.tril().unsqueeze(-1), -torch.inf)


def _decayed_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """Causal ``A[t, s] = Σ_d q_td k_sd exp(Σ_{s<r<=t} g_rd)`` (0 for s > t), exact in log space."""
    if g is None:
        return torch.matmul(q, k.transpose(-1, -2)).tril()
    decay = torch.exp(_segment_sums(g))
    if g.shape[-1] == 1:
        return torch.matmul(q, k.transpose(-1, -2)) * decay[..., 0]
    return torch.einsum("...td,...sd,...tsd->...ts", q, k, decay)


# ------------------------------------------------------------------- forms
def _parallel(q, k, v, g, s0):
    """Quadratic masked form over the whole sequence; the reference."""
    out = torch.matmul(_decayed_scores(q, k, g), v)
    if g is None:
        return out + torch.matmul(q, s0), s0 + torch.matmul(k.transpose(-1, -2), v)
    out = out + torch.matmul(q * torch.exp(_inclusive(g)), s0)
    total = g.sum(dim=-2).unsqueeze(-1)
    state = torch.exp(total) * s0 + torch.matmul((k * torch.exp(_exclusive_suffix(g))).transpose(-1, -2), v)
    return out, state


def _intra_chunk(qc, kc, gc, g_incl):
    """Intra-chunk scores ``(B, H, n, C, C)``.

    Per-channel gates use the matmul form ``(q ⊙ e^{G_t})(k ⊙ e^{-G_s})ᵀ`` where
    it cannot overflow (|G| <= _SAFE_LOG inside the chunk) and exact segment sums
    in the chunks where it could.
    """
    if gc is None or gc.shape[-1] == 1:
        return _decayed_scores(qc, kc, gc)
    q_t = qc * torch.exp(g_incl)
    k_t = kc * torch.exp(torch.clamp(-g_incl, max=_SAFE_LOG))
    scores = torch.matmul(q_t, k_t.transpose(-1, -2)).tril()
    unsafe = g_incl[..., -1, :].amin(dim=-1) < -_SAFE_LOG  # (B, H, n): G is non-increasing in a chunk
    if bool(unsafe.any()):
        unsafe = unsafe.expand(qc.shape[:3])
        idx = unsafe.nonzero(as_tuple=True)
        exact = _decayed_scores(qc[idx], kc[idx], gc.expand(*qc.shape[:3], *gc.shape[3:])[idx])
        scores = scores.index_put(idx, exact)
    return scores


def _chunked(q, k, v, g, s0, chunk):
    """Chunkwise form: the whole chunks, then the remainder as one shorter chunk (no padding,
    so a time-invariant decay stays exact for the final state)."""
    n_tok = q.shape[2]
    main = n_tok - n_tok % chunk
    if main == n_tok or main == 0:
        return _chunk_pass(q, k, v, g, s0, min(chunk, n_tok))
    tail_g = None if g is None else (g if g.shape[2] == 1 else g[:, :, main:])
    out_main, s = _chunk_pass(q[:, :, :main], k[:, :, :main], v[:, :, :main],
                              None if g is None else (g if g.shape[2] == 1 else g[:, :, :main]), s0, chunk)
    out_tail, final = _chunk_pass(q[:, :, main:], k[:, :, main:], v[:, :, main:], tail_g, s, n_tok - main)
    return torch.cat([out_main, out_tail], dim=2), final


def _chunk_pass(q, k, v, g, s0, chunk):
    """Chunkwise form over a length divisible by ``chunk``.

    ``g`` is ``(B, H, N, c)`` or, for a time-invariant decay, ``(B, H, 1, c)``: then
    every chunk shares one decay pattern, computed once and broadcast.
    """
    B, H, n_tok, _ = q.shape
    n = n_tok // chunk
    qc, kc, vc = (t.reshape(B, H, n, chunk, t.shape[-1]) for t in (q, k, v))
    if g is None:
        gc = None
    elif g.shape[2] == 1:
        gc = g.unsqueeze(2).expand(B, H, 1, chunk, g.shape[-1])
    else:
        gc = g.reshape(B, H, n, chunk, g.shape[-1])
    g_incl = None if gc is None else _inclusive(gc)
    out = torch.matmul(_intra_chunk(qc, kc, gc, g_incl), vc)
    if gc is None:
        contrib = torch.matmul(kc.transpose(-1, -2), vc)  # (B, H, n, Dk, Dv)
        prefix = torch.cumsum(contrib, dim=2)
        entering = torch.cat([s0.unsqueeze(2), s0.unsqueeze(2) + prefix[:, :, :-1]], dim=2)
        final = s0 + prefix[:, :, -1]
        out = out + torch.matmul(qc, entering)
    else:
        contrib = torch.matmul((kc * torch.exp(_exclusive_suffix(gc))).transpose(-1, -2), vc)
        chunk_decay = torch.exp(gc.sum(dim=-2)).unsqueeze(-1).expand(B, H, n, gc.shape[-1], 1)
        states, s = [], s0
        for c in range(n):
            states.append(s)
            s = chunk_decay[:, :, c] * s + contrib[:, :, c]
        final = s
        out = out + torch.matmul(qc * torch.exp(g_incl), torch.stack(states, dim=2))
    return out.reshape(B, H, n_tok, -1), final


def linear_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, s: torch.Tensor,
                g_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step on ``(B, H, D)`` rows: ``S ← e^{g_t} ⊙ S + k_tᵀ v_t``; ``o_t = q_t S``."""
    if g_t is not None:
        s = torch.exp(g_t).unsqueeze(-1) * s
    s = s + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return torch.matmul(q_t.unsqueeze(-2), s).squeeze(-2), s


def _recurrent(q, k, v, g, s0):
    outs, s = [], s0
    for t in range(q.shape[2]):
        o, s = linear_step(q[:, :, t], k[:, :, t], v[:, :, t], s, None if g is None else g[:, :, t])
        outs.append(o)
    return torch.stack(outs, dim=2), s


# -------------------------------------------------------------------- API
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     gate: torch.Tensor | None = None, normalize: bool = False, eps: float = 0.0,
                     form: str = "chunked", chunk: int = 64, state: LinearState | None = None,
                     key_padding_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, LinearState]:
    """Linear attention of feature-mapped ``q (B, Hq, Nq, Dk)`` over ``k (B, Hkv, Nk, Dk)``, ``v (B, Hkv, Nk, Dv)``.

    ``gate``: log-decays ``(B or 1, Hq, Nk or 1, 1 or Dk)`` applied at each key
    position (causal only; one position = the same decay everywhere). ``normalize`` divides by ``φ(q)·z + eps`` (rows with a
    zero denominator give 0). Causal queries sit at the last Nq key positions
    (bottom-right alignment); keys masked by ``key_padding_mask`` add nothing
    (their position still decays the state). ``state`` continues a previous
    call. Returns ``(out (B, Hq, Nq, Dv), final LinearState)``; the state holds
    one ``Dk × Dv`` matrix per query head.
    """
    if form not in FORMS:
        raise AttnZooError(f"form: expected one of {list(FORMS)}, got {form!r}")
    if chunk < 1:
        raise AttnZooError(f"chunk: expected a positive chunk size, got {chunk}")
    B, Hq, len_q, dim_k = q.shape
    len_k, dim_v = k.shape[2], v.shape[3]
    k, v = repeat_kv(k, Hq), repeat_kv(v, Hq)
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    if key_padding_mask is not None:
        k = k * key_padding_mask[:, None, :, None].to(k.dtype)
    s0 = q.new_zeros(B, Hq, dim_k, v.shape[-1]) if state is None else \
        check_state(state, B, Hq, dim_k, dim_v, normalize).packed().to(q.dtype)
    tokens = (0 if state is None else state.tokens) + len_k
    if gate is not None:
        if not causal:
            raise AttnZooError("gate: decay needs causal=True (non-causal linear attention has one global state)")
        # a gate with one position is time-invariant (a decay per head); the chunked form keeps it so
        gate = torch.clamp(gate, min=_GATE_FLOOR).to(q.dtype).expand(B, Hq, gate.shape[2], gate.shape[-1])
        if form != "chunked" or gate.shape[2] != 1:
            gate = gate.expand(B, Hq, len_k, gate.shape[-1])
    if not causal:
        final = s0 + torch.matmul(k.transpose(-1, -2), v)
        return _finish(torch.matmul(q, final), normalize, eps, dim_v), LinearState.unpack(final, normalize, tokens)
    # causal, bottom-right aligned: queries are the last Nq of the Nk key positions
    unseen = max(0, len_q - len_k)  # queries before the first key see nothing
    rows = q[:, :, unseen:]
    if rows.shape[2] < len_k:
        rows = torch.nn.functional.pad(rows, (0, 0, len_k - rows.shape[2], 0))
    if form == "parallel":
        out, final = _parallel(rows, k, v, gate, s0)
    elif form == "chunked":
        out, final = (CHUNKED.get() or _chunked)(rows, k, v, gate, s0, chunk)
    else:
        out, final = _recurrent(rows, k, v, gate, s0)
    out = out[:, :, len_k - (len_q - unseen):]
    if unseen:
        out = torch.cat([out.new_zeros(B, Hq, unseen, out.shape[-1]), out], dim=2)
    return _finish(out, normalize, eps, dim_v), LinearState.unpack(final, normalize, tokens)


def _finish(out: torch.Tensor, normalize: bool, eps: float, dim_v: int) -> torch.Tensor:
    """Split off and apply the normaliser column; zero denominators give zero rows."""
    if not normalize:
        return out
    num, den = out[..., :dim_v], out[..., dim_v:] + eps
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


# ------------------------------------------------------- softmax monoid scan
def softmax_prefix_scan(scores: torch.Tensor, v: torch.Tensor, state: Partial | None = None
                        ) -> tuple[torch.Tensor, Partial]:
    """Aaren: every prefix's softmax average ``o_t = Σ_{j<=t} softmax(s)_j v_j`` by a parallel
    (Hillis–Steele) prefix scan of the B1 monoid on ``(out, lse)`` partials.

    ``scores (..., N)`` (``-inf`` = masked key), ``v (..., N, Dv)``; ``state`` is the
    partial over earlier keys. O(N log N) work, log N steps, exact (no
    approximation, no overflow). Returns ``(out (..., N, Dv), final Partial)``.
    """
    out, lse = v.to(scores.dtype), scores
    n, shift = scores.shape[-1], 1
    while shift < n:
        merged = merge(Partial(out[..., :-shift, :], lse[..., :-shift]), Partial(out[..., shift:, :], lse[..., shift:]))
        out = torch.cat([out[..., :shift, :], merged.out.to(out.dtype)], dim=-2)
        lse = torch.cat([lse[..., :shift], merged.lse.to(lse.dtype)], dim=-1)
        shift *= 2
    if state is not None:
        merged = merge(Partial(state.out.unsqueeze(-2).expand_as(out), state.lse.unsqueeze(-1).expand_as(lse)),
                       Partial(out, lse))
        out, lse = merged.out.to(v.dtype), merged.lse.to(scores.dtype)
    return out, Partial(out[..., -1, :], lse[..., -1])
