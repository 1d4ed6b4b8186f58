"""Triton kernels for the chunked linear recurrence (the engine's ``chunked`` form, :mod:`attnzoo.core.linear`).

``S_t = exp(g_t) ⊙ S_{t-1} + k_tᵀ v_t``, ``o_t = q_t S_t`` with log-gates ``g``
of one value per token (``GK = 1``: no decay, a decay per head, a per-token
gate) or one per token and key channel (``GK = Dk``: GLA). Chunks of ``C``
tokens, as in Lightning-2 / GLA / fla:

1. ``_states``: one program per (batch, head) walks the chunks and stores the
   state entering each chunk (fp32);
2. ``_outputs``: one program per (chunk, batch, head): ``(q ⊙ e^b) S_in`` plus
   the causal intra-chunk product (``b`` = the chunk-local inclusive cumsum of g);
3. ``_dstates``: the reverse walk for the state gradients;
4. ``_grads``: dq, dk, dv per chunk; the gate gradient follows on the host from
   ``dB_t = q_t·dq_t - k_t·dk_t`` reversed-cumsummed (g enters only through its
   cumulative sum).

Scalar gates use the exact decay matrix ``exp(b_i - b_j)``; per-channel gates
the factorised ``(q ⊙ e^b)(k ⊙ e^{-b})ᵀ``, which needs each chunk's total decay
above ``-SAFE_LOG`` (``chunk_decay_ok``; the dispatch checks it and otherwise
keeps the torch engine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import UnsupportedError
from ._attn import dot_precision

#: per-channel gates: the factorised intra-chunk form stays finite while a chunk decays less than this (fp32)
SAFE_LOG = 60.0
#: tokens per chunk: small chunks keep more per-channel gates inside SAFE_LOG, and the fp32 tiles of the
#: gradient kernel within shared memory at Dk = Dv = 128 (about 150-180 KiB for sm_90 at 16, 224 KiB at 32)
CHUNK = 16


@triton.jit
def _chunk(Q, K, V, G, c, bh, N, DK, DV, GK, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_V: tl.constexpr):
    """Chunk ``c`` of one (batch, head): q, k ``(C, Dk)``, v ``(C, Dv)``, cumulative gates ``b (C, Dk)``, their sum."""
    rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = rows < N
    ck = tl.arange(0, BLOCK_K)
    cv = tl.arange(0, BLOCK_V)
    km = ok[:, None] & (ck < DK)[None, :]
    q = tl.load(Q + (bh * N + rows[:, None]) * DK + ck[None, :], mask=km, other=0.0)
    k = tl.load(K + (bh * N + rows[:, None]) * DK + ck[None, :], mask=km, other=0.0)
    v = tl.load(V + (bh * N + rows[:, None]) * DV + cv[None, :], mask=ok[:, None] & (cv < DV)[None, :], other=0.0)
    # a scalar gate (GK = 1) is read into every channel: b has the same (C, BLOCK_K) shape for every gate kind
    g = tl.load(G + (bh * N + rows[:, None]) * GK + (ck % GK)[None, :], mask=ok[:, None], other=0.0)
    b = tl.cumsum(g, 0)
    b_last = tl.sum(g, 0)  # (Dk,)
    return q, k, v, b, b_last


@triton.jit
def _state_ptrs(bh, c, n_chunks, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    ck = tl.arange(0, BLOCK_K)
    cv = tl.arange(0, BLOCK_V)
    return ((bh * n_chunks + c) * BLOCK_K + ck[:, None]) * BLOCK_V + cv[None, :]


@triton.jit
def _states(Q, K, V, G, S0, HS, FINAL, N, DK, DV, GK, n_chunks, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_V: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.load(S0 + _state_ptrs(bh, 0, 1, BLOCK_K, BLOCK_V))
    for c in range(n_chunks):
        tl.store(HS + _state_ptrs(bh, c, n_chunks, BLOCK_K, BLOCK_V), s)
        q, k, v, b, b_last = _chunk(Q, K, V, G, c, bh, N, DK, DV, GK, BLOCK_C, BLOCK_K, BLOCK_V)
        kd = k * tl.exp(b_last[None, :] - b)
        s = s * tl.exp(b_last)[:, None] + tl.dot(tl.trans(kd), v, input_precision=PREC)
    tl.store(FINAL + _state_ptrs(bh, 0, 1, BLOCK_K, BLOCK_V), s)


@triton.jit
def _decay(b, BLOCK_C: tl.constexpr):
    """``(C, C)`` exp(b_i - b_j) for j <= i, else 0 (scalar gates; b is ``(C, 1)``)."""
    i = tl.arange(0, BLOCK_C)
    causal = i[:, None] >= i[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, b - tl.trans(b), 0.0)), 0.0), causal


@triton.jit
def _outputs(Q, K, V, G, HS, O, N, DK, DV, GK, n_chunks, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_V: tl.constexpr, PER_CHANNEL: tl.constexpr, PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    q, k, v, b, b_last = _chunk(Q, K, V, G, c, bh, N, DK, DV, GK, BLOCK_C, BLOCK_K, BLOCK_V)
    s = tl.load(HS + _state_ptrs(bh, c, n_chunks, BLOCK_K, BLOCK_V))
    qt = q * tl.exp(b)
    o = tl.dot(qt, s, input_precision=PREC)
    if PER_CHANNEL:
        i = tl.arange(0, BLOCK_C)
        a = tl.where(i[:, None] >= i[None, :], tl.dot(qt, tl.trans(k * tl.exp(-b)), input_precision=PREC), 0.0)
    else:
        dec, _ = _decay(tl.max(b, 1)[:, None], BLOCK_C)  # scalar gates: equal channels
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * dec
    o += tl.dot(a, v, input_precision=PREC)
    rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
    cv = tl.arange(0, BLOCK_V)
    tl.store(O + (bh * N + rows[:, None]) * DV + cv[None, :], o, mask=(rows < N)[:, None] & (cv < DV)[None, :])


@triton.jit
def _dstates(Q, DO, G, DFINAL, HD, DS0, N, DK, DV, GK, n_chunks, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_V: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    ds = tl.load(DFINAL + _state_ptrs(bh, 0, 1, BLOCK_K, BLOCK_V))
    for r in range(n_chunks):
        c = n_chunks - 1 - r
        tl.store(HD + _state_ptrs(bh, c, n_chunks, BLOCK_K, BLOCK_V), ds)
        q, _, do, b, b_last = _chunk(Q, Q, DO, G, c, bh, N, DK, DV, GK, BLOCK_C, BLOCK_K, BLOCK_V)
        ds = ds * tl.exp(b_last)[:, None] + tl.dot(tl.trans(q * tl.exp(b)), do, input_precision=PREC)
    tl.store(DS0 + _state_ptrs(bh, 0, 1, BLOCK_K, BLOCK_V), ds)


@triton.jit
def _rows(X, c, bh, N, W, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = c * BLOCK_C + tl.arange(0, BLOCK_C)
    cw = tl.arange(0, BLOCK_W)
    return tl.load(X + (bh * N + rows[:, None]) * W + cw[None, :], mask=(rows < N)[:, None] & (cw < W)[None, :],
                   other=0.0)


@triton.jit
def _grads(Q, K, V, G, DO, HS, HD, DQ, DK_, DV_, N, DK, DV, GK, n_chunks, BLOCK_C: tl.constexpr,
           BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PER_CHANNEL: tl.constexpr,
           PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    q, k, v, b, b_last = _chunk(Q, K, V, G, c, bh, N, DK, DV, GK, BLOCK_C, BLOCK_K, BLOCK_V)
    do = _rows(DO, c, bh, N, DV, BLOCK_C, BLOCK_V)
    s = tl.load(HS + _state_ptrs(bh, c, n_chunks, BLOCK_K, BLOCK_V))
    ds = tl.load(HD + _state_ptrs(bh, c, n_chunks, BLOCK_K, BLOCK_V))
    eb = tl.exp(b)
    kdec = tl.exp(b_last[None, :] - b)
    dq = tl.dot(do, tl.trans(s), input_precision=PREC) * eb
    dk = tl.dot(v, tl.trans(ds), input_precision=PREC) * kdec
    dv = tl.dot(k * kdec, ds, input_precision=PREC)
    i = tl.arange(0, BLOCK_C)
    causal = i[:, None] >= i[None, :]
    da = tl.where(causal, tl.dot(do, tl.trans(v), input_precision=PREC), 0.0)
    if PER_CHANNEL:
        qt = q * eb
        kt = k * tl.exp(-b)
        a = tl.where(causal, tl.dot(qt, tl.trans(kt), input_precision=PREC), 0.0)
        dq += tl.dot(da, kt, input_precision=PREC) * eb
        dk += tl.dot(tl.trans(da), qt, input_precision=PREC) * tl.exp(-b)
    else:
        dec, _ = _decay(tl.max(b, 1)[:, None], BLOCK_C)  # scalar gates: equal channels
        a = tl.dot(q, tl.trans(k), input_precision=PREC) * dec
        p = da * dec
        dq += tl.dot(p, k, input_precision=PREC)
        dk += tl.dot(tl.trans(p), q, input_precision=PREC)
    dv += tl.dot(tl.trans(a), do, input_precision=PREC)
    rows = c * BLOCK_C + i
    ck = tl.arange(0, BLOCK_K)
    cv = tl.arange(0, BLOCK_V)
    km = (rows < N)[:, None] & (ck < DK)[None, :]
    tl.store(DQ + (bh * N + rows[:, None]) * DK + ck[None, :], dq, mask=km)
    tl.store(DK_ + (bh * N + rows[:, None]) * DK + ck[None, :], dk, mask=km)
    tl.store(DV_ + (bh * N + rows[:, None]) * DV + cv[None, :], dv, mask=(rows < N)[:, None] & (cv < DV)[None, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _state(s: torch.Tensor, bk: int, bv: int) -> torch.Tensor:
    """``(B, H, Dk, Dv)`` zero-padded to the kernels' ``(B·H, BLOCK_K, BLOCK_V)`` fp32 state tiles."""
    B, H, dk, dv = s.shape
    out = s.new_zeros(B * H, bk, bv, dtype=torch.float32)
    out[:, :dk, :dv] = s.reshape(B * H, dk, dv)
    return out


class _Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, chunk):  # noqa: D401  (autograd signature)
        B, H, N, dk = q.shape
        dv, gk = v.shape[-1], g.shape[-1]
        bk, bv = _pow2(dk), _pow2(dv)
        nc = triton.cdiv(N, chunk)
        args = (N, dk, dv, gk, nc)
        meta = dict(BLOCK_C=chunk, BLOCK_K=bk, BLOCK_V=bv, PREC=dot_precision())
        hs = q.new_empty(B * H, nc, bk, bv, dtype=torch.float32)
        final = torch.empty(B * H, bk, bv, dtype=torch.float32, device=q.device)
        _states[(B * H,)](q, k, v, g, _state(s0, bk, bv), hs, final, *args, num_stages=1, **meta)  # sequential
        out = torch.empty(B, H, N, dv, dtype=torch.float32, device=q.device)
        _outputs[(nc, B * H)](q, k, v, g, hs, out, *args, PER_CHANNEL=gk > 1, **meta)
        ctx.save_for_backward(q, k, v, g, hs, final)
        ctx.meta, ctx.args = meta, args
        return out, final[:, :dk, :dv].reshape(B, H, dk, dv)

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, g, hs, final = ctx.saved_tensors
        B, H, N, dk = q.shape
        dv = v.shape[-1]
        meta, args = ctx.meta, ctx.args
        bk, bv = meta["BLOCK_K"], meta["BLOCK_V"]
        d_out = d_out.float().contiguous()
        df = torch.zeros(B, H, dk, dv, device=q.device) if d_final is None else d_final.float()
        hd = torch.empty_like(hs)
        ds0 = torch.empty(B * H, bk, bv, dtype=torch.float32, device=q.device)
        _dstates[(B * H,)](q, d_out, g, _state(df, bk, bv), hd, ds0, *args, num_stages=1, **meta)
        dq, dk_, dv_ = (torch.empty(t.shape, dtype=torch.float32, device=q.device) for t in (q, k, v))
        _grads[(args[-1], B * H)](q, k, v, g, d_out, hs, hd, dq, dk_, dv_, *args, PER_CHANNEL=g.shape[-1] > 1, **meta)
        dg = None
        if ctx.needs_input_grad[3]:
            db = q * dq - k * dk_  # (B, H, N, Dk): g enters through its cumulative sum only
            db[:, :, -1] += (final[:, :dk, :dv].reshape(B, H, dk, dv) * df).sum(-1)  # the final state's decay
            db = db if g.shape[-1] > 1 else db.sum(-1, keepdim=True)
            dg = db.flip(2).cumsum(2).flip(2)
        return dq, dk_, dv_, dg, ds0[:, :dk, :dv].reshape(B, H, dk, dv), None


def chunk_decay_ok(g: torch.Tensor | None, chunk: int = CHUNK) -> bool:
    """Per-channel gates ``(B, H, N, Dk)``: every chunk's total log-decay stays above ``-SAFE_LOG``."""
    if g is None or g.shape[-1] == 1:
        return True
    N = g.shape[2]
    pad = (-N) % chunk
    tot = torch.nn.functional.pad(g.float(), (0, 0, 0, pad)).unflatten(2, (-1, chunk)).sum(3)
    return bool(tot.min() >= -SAFE_LOG)


def chunked(q, k, v, g, s0, chunk):
    """The engine's chunked form on the kernels: ``(out (B, H, N, Dv), final state (B, H, Dk, Dv))``, fp32.

    Same contract as ``attnzoo.core.linear._chunked``: ``q``/``k``/``v`` per query
    head, ``g`` None or ``(B, H, N|1, 1|Dk)`` clamped log-gates, ``s0`` the
    entering state. ``chunk`` (the method's) is unused: the kernels take
    :data:`CHUNK`-token chunks (the results agree to fp32 rounding).
    """
    B, H, N, dk = q.shape
    gk = 1 if g is None else g.shape[-1]
    if g is None:
        g = q.new_zeros(B, H, N, 1, dtype=torch.float32)
    g = g.float().expand(B, H, N, gk).contiguous()
    c = CHUNK
    if gk > 1 and not chunk_decay_ok(g, c):
        raise UnsupportedError(f"gates: a chunk of {c} tokens decays below -{SAFE_LOG:g} in log space (the factorised "
                               "per-channel kernel would overflow; use backend='torch')")
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    return _Chunked.apply(q, k, v, g, s0.float().contiguous(), c)
