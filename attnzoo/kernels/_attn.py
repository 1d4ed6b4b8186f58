"""One Triton forward and one backward kernel for every softmax engine (FlashAttention-2 tiles).

A program owns a tile of query rows of one (batch, row head) and walks a list
of key *slots*; what a slot is depends on ``MODE``:

- ``DENSE``: slot ``s`` is keys ``k_base + [s·BLOCK_N, (s+1)·BLOCK_N)``; causal calls
  stop at the tile's last visible key (tiles above the diagonal are never read);
- ``BLOCKS``: slot ``s`` is key block ``tab[s]`` (``-1`` = skip) of a
  :class:`~attnzoo.core.layout.BlockLayout` row, offset by ``k_base``;
- ``TOKENS``: slot ``s`` is tokens ``tab[s·BLOCK_N : (s+1)·BLOCK_N]`` of a
  :class:`~attnzoo.core.layout.TokenLayout` row (``-1`` = none), offset by ``k_base``.

The visibility rule is the engine's: key index ``j`` is visible to row ``r``
iff it is in range, not padded (``pad[b, h // PAD_HDIV, j]``), and, when
causal, ``j <= r % ROWS_MOD + q_off`` (bottom-right; ``ROWS_MOD`` lets a
decode call fold a query group into the rows). ``MASK`` adds the layout's
element mask: ``1`` = per partial block (``pidx`` into packed
``(P, TAB_ROWS, KEY_UNIT)`` masks), ``2`` = a dense per-token mask.

Scores are accumulated in fp32 (``QUANT``: an int8 x int8 dot with per-row and
per-key scales, SageAttention's recipe), P·V in the value dtype with an fp32
accumulator. Rows with no visible key give ``(0, -inf)``. Programs of a third
grid axis split the slots (split-K); their partials are merged by lse.

Built-in score modifications are specialisations (constexpr flags): ``ALIBI``
adds ``slopes[qh]·dist``, ``REL`` adds ``table[qh, clamp(dist, ±R) + R]`` (both
with ``dist = kidx − (r % ROWS_MOD + q_off)``, the key's position minus the
query's, and ``qh = h·HFOLD + r // ROWS_MOD`` the query head), then ``SOFTCAP``
maps the score to ``cap·tanh(score / cap)``; the backward adds the gradients
of the slopes and the table atomically. ``SINK``: a per-query-head logit joins
the softmax denominator with no value (gpt-oss); its gradient is a host-side
sum over rows. ``VARLEN``: the batch index is a packed sequence whose query rows
and keys are read from per-sequence ``[start, end)`` pairs (any mode: a layout's
table is then indexed by the sequence; positions are the sequence's own). ``POS``:
the mods read the query and key positions from tensors instead of the row and key
indices (engines running on reordered tokens: hash buckets, clusters, regions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: True when the kernels were defined under Triton's interpreter (they then run on CPU tensors)
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
DENSE, BLOCKS, TOKENS = 0, 1, 2
LOG2E = 1.4426950408889634  # host side (scales); kernels read the constexpr copies (no plain globals in @jit)
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def dot_precision(dtype: torch.dtype = torch.float32) -> str:
    """Dots on fp32 operands follow PyTorch's switch: TF32 only when ``torch.backends.cuda.matmul.allow_tf32``;
    half operands keep Triton's default (tensor cores)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


@triton.jit
def _tile(H, groups, n_rows, TAB_ROWS, TPR, TAB_HDIV, stb, sth, stm, pmb, pmh, pmm, BLOCK_M: tl.constexpr,
          ROW_TILE: tl.constexpr):
    """This program's (batch, row head, KV head), its rows, and the offsets of its layout table row.

    Program ``i`` takes the ``i % TPR``-th tile of ``ROW_TILE`` rows of table row ``i // TPR``
    (``TAB_ROWS`` rows each), so a tile never straddles two table rows.
    """
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    trow = tl.program_id(0) // TPR
    row0 = trow * TAB_ROWS + (tl.program_id(0) % TPR) * ROW_TILE
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m
    row_ok = (offs_m < ROW_TILE) & (rows < n_rows) & (rows < (trow + 1) * TAB_ROWS)
    tab_row = b * stb + (h // TAB_HDIV) * sth + trow * stm
    pm_row = b * pmb + (h // TAB_HDIV) * pmh + trow * pmm
    return b, h, h // groups, row0, rows, row_ok, rows - trow * TAB_ROWS, tab_row, pm_row


@triton.jit
def _slot_keys(TAB, tab_row, s, offs_n, k_base, k_end, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
               KEY_UNIT: tl.constexpr, TAB_LEN):
    """Key indices ``(BLOCK_N,)`` of slot ``s`` and whether each exists (in range, not an empty slot)."""
    if MODE == 0:
        kidx = k_base + s * BLOCK_N + offs_n
        ok = kidx < k_end
    elif MODE == 1:
        blk = tl.load(TAB + tab_row + s)
        kidx = k_base + blk * KEY_UNIT + offs_n
        ok = (offs_n < KEY_UNIT) & (kidx >= k_base) & (kidx < k_end)  # blk = -1 lands below k_base
    else:
        t = s * BLOCK_N + offs_n
        tok = tl.load(TAB + tab_row + t, mask=t < TAB_LEN, other=-1)
        kidx = k_base + tok
        ok = tok >= 0
    return kidx, ok


@triton.jit
def _visible(kidx, ok, rows, row_ok, b, h, s, PAD, spb, sph, PIDX, pidx_row, PM, pm_row, rloc,
             q_off, ROWS_MOD, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, PAD_HDIV: tl.constexpr,
             MASK: tl.constexpr, TAB_ROWS, KEY_UNIT: tl.constexpr, BLOCK_N: tl.constexpr,
             TAB_LEN):
    """``(BLOCK_M, BLOCK_N)`` visibility of slot ``s``'s keys to the tile's rows."""
    vis = ok[None, :] & row_ok[:, None]
    kc = tl.where(ok, kidx, 0)
    if HAS_PAD:
        keep = tl.load(PAD + b * spb + (h // PAD_HDIV) * sph + kc, mask=ok, other=0)
        vis = vis & (keep != 0)[None, :]
    if CAUSAL:
        vis = vis & (kidx[None, :] <= (rows % ROWS_MOD + q_off)[:, None])
    if MASK == 1:
        pi = tl.load(PIDX + pidx_row + s)
        if pi >= 0:
            cols = tl.arange(0, BLOCK_N)
            mm = tl.load(PM + pi * (TAB_ROWS * KEY_UNIT) + rloc[:, None] * KEY_UNIT + cols[None, :],
                         mask=(rloc < TAB_ROWS)[:, None] & (cols < KEY_UNIT)[None, :], other=0)
            vis = vis & (mm != 0)
    if MASK == 2:
        t = s * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = tl.load(PM + pm_row + rloc[:, None] * TAB_LEN + t[None, :],
                     mask=(rloc < TAB_ROWS)[:, None] & (t < TAB_LEN)[None, :], other=0)
        vis = vis & (mm != 0)
    return vis


@triton.jit
def _tanh(x):
    """tanh from exp (``libdevice.tanh`` does not run under the interpreter): a series for |x| < 0.25
    (no cancellation), else ``sign·(1 − e)/(1 + e)`` with ``e = exp(−2|x|)`` (no overflow)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(a < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def _mod_rows(rows, row_ok, b, h, q_off, ROWS_MOD, HFOLD, SLOPES, stab, QPOS, sqpb, sqph, ALIBI: tl.constexpr,
              POS: tl.constexpr):
    """What the mods need of the tile's rows, loaded once per program: their positions (the causal rule's
    ``r % ROWS_MOD + q_off``, or ``POS``: read from ``QPOS[b, h, r]``), their ALiBi slopes and their table
    rows' offsets (query head ``qh``)."""
    qh = h * HFOLD + rows // ROWS_MOD
    slope = tl.zeros(rows.shape, tl.float32)
    if ALIBI:
        slope = tl.load(SLOPES + qh, mask=row_ok, other=0)
    qpos = rows % ROWS_MOD + q_off
    if POS:
        qpos = tl.load(QPOS + b * sqpb + h * sqph + rows, mask=row_ok, other=0)
    return qpos, slope, tl.where(row_ok, qh * stab, 0)


@triton.jit
def _key_pos(kidx, kc, ok, b, hk, KPOS, skpb, skph, POS: tl.constexpr):
    """The keys' positions for the mods: their indices, or ``POS``: ``KPOS[b, hk, j]`` (reordered tokens)."""
    if POS:
        return tl.load(KPOS + b * skpb + hk * skph + kc, mask=ok, other=0)
    return kidx


@triton.jit
def _mod(sc, kpos, qpos, slope, trow, TABLE, radius, cap, ALIBI: tl.constexpr, REL: tl.constexpr,
         SOFTCAP: tl.constexpr):
    """Natural-unit scores ``sc (BLOCK_M, BLOCK_N)`` with the built-in mods: ``(scores, dist, tanh)``
    (``tanh`` of the capped argument, for the backward; the scores themselves without ``SOFTCAP``)."""
    dist = kpos[None, :] - qpos[:, None]
    if ALIBI:
        sc = sc + slope[:, None] * dist.to(tl.float32)
    if REL:
        sc = sc + tl.load(TABLE + trow[:, None] + tl.minimum(tl.maximum(dist, -radius), radius) + radius)
    t = sc
    if SOFTCAP:
        t = _tanh(sc / cap)
        sc = cap * t
    return sc, dist, t


@triton.jit
def _sequence(CUQ, CUK, b, row0, rows, row_ok):
    """VARLEN: batch index ``b`` is packed sequence ``b``, its queries ``[CUQ[2b], CUQ[2b+1])`` and keys
    ``[CUK[2b], CUK[2b+1])``. The tile's first row and its rows (the sequence's own ``row0``, ``rows`` offset
    into the packed queries), their validity, their end, the keys ``[k0, k1)`` and the causal offset
    (bottom-right within the sequence: key ``j`` is visible to packed row ``r`` iff ``j <= r + k1 - q1``)."""
    q0 = tl.load(CUQ + 2 * b)
    q1 = tl.load(CUQ + 2 * b + 1)
    k0 = tl.load(CUK + 2 * b)
    k1 = tl.load(CUK + 2 * b + 1)
    return q0 + row0, q0 + rows, row_ok & (q0 + rows < q1), q1, k0, k1, k1 - q1


@triton.jit
def _slot_end(s_hi, row0, row_end, k_base, k_end, q_off, ROWS_MOD, MODE: tl.constexpr, CAUSAL: tl.constexpr,
              VARLEN: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILE: tl.constexpr):
    """The end of a program's slot loop: dense causal tiles stop at the last key any row of the tile sees
    (folded rows: up to ``ROWS_MOD - 1``); a VARLEN program past its sequence's rows reads nothing."""
    if MODE == 0:
        if CAUSAL:
            last = tl.minimum(tl.minimum(row0 + ROW_TILE, row_end) - 1, ROWS_MOD - 1) + q_off
            s_hi = tl.minimum(s_hi, tl.cdiv(tl.minimum(last + 1, k_end) - k_base, BLOCK_N))
    if VARLEN:
        s_hi = tl.where(row0 < row_end, s_hi, 0)
    return s_hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, QS, KS, TAB, PIDX, PM, PAD, SLOPES, TABLE, CUQ, CUK, QPOS, KPOS, SINKS,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                sos, sob, soh, som, sls, slb, slh, sqsb, sqsh, sksb, sksh,
                stb, sth, stm, spb, sph, pmb, pmh, pmm,
                n_rows, k_end, k_base, q_off, ROWS_MOD, groups, n_slots, slots_per_split, qk_scale,
                TAB_LEN, TAB_ROWS, TPR, TAB_HDIV, H, HFOLD, stab, radius, cap, sqpb, sqph, skpb, skph,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILE: tl.constexpr,
                KEY_UNIT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                PAD_HDIV: tl.constexpr, MASK: tl.constexpr, QUANT: tl.constexpr, Q_BLOCK: tl.constexpr,
                K_BLOCK: tl.constexpr, PREC: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr,
                SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, POS: tl.constexpr, SINK: tl.constexpr):
    split = tl.program_id(2)
    b, h, hk, row0, rows, row_ok, rloc, tab_row, pm_row = _tile(H, groups, n_rows, TAB_ROWS, TPR, TAB_HDIV, stb, sth,
                                                                stm, pmb, pmh, pmm, BLOCK_M, ROW_TILE)
    row_end = n_rows
    if VARLEN:
        row0, rows, row_ok, row_end, k_base, k_end, q_off = _sequence(CUQ, CUK, b, row0, rows, row_ok)
        if MODE == 0:
            n_slots = tl.cdiv(k_end - k_base, BLOCK_N)
        b = 0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0)
    if QUANT:
        q_scale = tl.load(QS + b * sqsb + h * sqsh + rows // Q_BLOCK, mask=row_ok, other=0) * qk_scale
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    qpos, slope, trow = _mod_rows(rows, row_ok, b, h, q_off, ROWS_MOD, HFOLD, SLOPES, stab, QPOS, sqpb, sqph,
                                  ALIBI, POS)
    s_lo = split * slots_per_split
    s_hi = _slot_end(tl.minimum(s_lo + slots_per_split, n_slots), row0, row_end, k_base, k_end, q_off, ROWS_MOD,
                     MODE, CAUSAL, VARLEN, BLOCK_N, ROW_TILE)
    for s in range(s_lo, s_hi):
        kidx, ok = _slot_keys(TAB, tab_row, s, offs_n, k_base, k_end, MODE, BLOCK_N, KEY_UNIT, TAB_LEN)
        kc = tl.where(ok, kidx, 0)
        k = tl.load(K + b * skb + hk * skh + kc[:, None] * skn + offs_d[None, :],
                    mask=ok[:, None] & (offs_d < D)[None, :], other=0)
        if QUANT:
            k_scale = tl.load(KS + b * sksb + hk * sksh + kc // K_BLOCK, mask=ok, other=0)
            sc = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
        else:
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if ALIBI or REL or SOFTCAP:  # the mods take natural-unit scores; the softmax runs in base 2
            kpos = _key_pos(kidx, kc, ok, b, hk, KPOS, skpb, skph, POS)
            sc = _mod(sc * _LN2, kpos, qpos, slope, trow, TABLE, radius, cap, ALIBI, REL, SOFTCAP)[0] * _LOG2E
        vis = _visible(kidx, ok, rows, row_ok, b, h, s, PAD, spb, sph, PIDX, tab_row, PM, pm_row, rloc,
                       q_off, ROWS_MOD, CAUSAL, HAS_PAD, PAD_HDIV, MASK, TAB_ROWS, KEY_UNIT, BLOCK_N, TAB_LEN)
        sc = tl.where(vis, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + kc[:, None] * svn + offs_dv[None, :],
                    mask=ok[:, None] & (offs_dv < DV)[None, :], other=0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new

    if SINK:  # the sink logit joins the denominator once (split 0), with no value
        sink = tl.load(SINKS + h * HFOLD + rows // ROWS_MOD, mask=row_ok, other=0) * _LOG2E
        sink = tl.where(split == 0, sink, float("-inf"))
        m_new = tl.maximum(m, sink)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        den = den * alpha + tl.exp2(sink - m_safe)
        acc = acc * alpha[:, None]
        m = m_new
    seen = den > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, den, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, den, 1.0))) * _LN2, float("-inf"))
    tl.store(O + split * sos + b * sob + h * soh + rows[:, None] * som + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + split * sls + b * slb + h * slh + rows, lse, mask=row_ok)


@triton.jit
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV_, TAB, PIDX, PM, PAD, SLOPES, TABLE, CUQ, CUK, QPOS, KPOS,
                DSLOPES, DTABLE,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, slb, slh, stb, sth, stm, spb, sph, pmb, pmh, pmm,
                n_rows, k_end, k_base, q_off, ROWS_MOD, groups, n_slots, qk_scale, scale,
                TAB_LEN, TAB_ROWS, TPR, TAB_HDIV, H, HFOLD, stab, radius, cap, sqpb, sqph, skpb, skph,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILE: tl.constexpr,
                KEY_UNIT: tl.constexpr, MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                PAD_HDIV: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, ALIBI: tl.constexpr,
                REL: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, POS: tl.constexpr,
                BIAS_GRAD: tl.constexpr):
    """Gradients of one row tile: dQ in registers, dK/dV added atomically into fp32 buffers.

    ``q``/``dq`` share strides; ``lse``/``delta`` share strides ``(slb, slh, 1)``;
    probabilities are recomputed from the saved lse, as in FlashAttention-2.
    ``BIAS_GRAD``: the gradients of the modified scores before the cap, summed
    into ``DSLOPES`` (times the distance) and ``DTABLE`` (by table entry).
    """
    b, h, hk, row0, rows, row_ok, rloc, tab_row, pm_row = _tile(H, groups, n_rows, TAB_ROWS, TPR, TAB_HDIV, stb, sth,
                                                                stm, pmb, pmh, pmm, BLOCK_M, ROW_TILE)
    row_end = n_rows
    if VARLEN:
        row0, rows, row_ok, row_end, k_base, k_end, q_off = _sequence(CUQ, CUK, b, row0, rows, row_ok)
        if MODE == 0:
            n_slots = tl.cdiv(k_end - k_base, BLOCK_N)
        b = 0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qmask = row_ok[:, None] & (offs_d < D)[None, :]
    q_ptr = b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :]
    q = tl.load(Q + q_ptr, mask=qmask, other=0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv < DV)[None, :], other=0)
    r_ptr = b * slb + h * slh + rows
    lse = tl.load(LSE + r_ptr, mask=row_ok, other=float("inf")) * _LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that saw nothing: p = 0
    delta = tl.load(DELTA + r_ptr, mask=row_ok, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    qpos, slope, trow = _mod_rows(rows, row_ok, b, h, q_off, ROWS_MOD, HFOLD, SLOPES, stab, QPOS, sqpb, sqph,
                                  ALIBI, POS)
    s_hi = _slot_end(n_slots, row0, row_end, k_base, k_end, q_off, ROWS_MOD, MODE, CAUSAL, VARLEN, BLOCK_N,
                     ROW_TILE)
    for s in range(0, s_hi):
        kidx, ok = _slot_keys(TAB, tab_row, s, offs_n, k_base, k_end, MODE, BLOCK_N, KEY_UNIT, TAB_LEN)
        kc = tl.where(ok, kidx, 0)
        kmask = ok[:, None] & (offs_d < D)[None, :]
        vmask = ok[:, None] & (offs_dv < DV)[None, :]
        k = tl.load(K + b * skb + hk * skh + kc[:, None] * skn + offs_d[None, :], mask=kmask, other=0)
        v = tl.load(V + b * svb + hk * svh + kc[:, None] * svn + offs_dv[None, :], mask=vmask, other=0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if ALIBI or REL or SOFTCAP:
            kpos = _key_pos(kidx, kc, ok, b, hk, KPOS, skpb, skph, POS)
            sc, dist, t = _mod(sc * _LN2, kpos, qpos, slope, trow, TABLE, radius, cap, ALIBI, REL, SOFTCAP)
            sc = sc * _LOG2E
        vis = _visible(kidx, ok, rows, row_ok, b, h, s, PAD, spb, sph, PIDX, tab_row, PM, pm_row, rloc,
                       q_off, ROWS_MOD, CAUSAL, HAS_PAD, PAD_HDIV, MASK, TAB_ROWS, KEY_UNIT, BLOCK_N, TAB_LEN)
        p = tl.where(vis, tl.exp2(sc - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        if BIAS_GRAD:  # rows of one program share the query head (no folded rows in a backward)
            if ALIBI:
                tl.atomic_add(DSLOPES + h, tl.sum(tl.sum(ds * dist.to(tl.float32), 1), 0))
            if REL:  # a tile whose visible keys all lie at or beyond one edge adds to that entry once
                far = tl.max(tl.max(tl.where(vis, dist, -radius), 1), 0) <= -radius
                late = tl.min(tl.min(tl.where(vis, dist, radius), 1), 0) >= radius
                if far or late:
                    tl.atomic_add(DTABLE + h * stab + tl.where(far, 0, 2 * radius), tl.sum(tl.sum(ds, 1), 0))
                else:
                    ti = tl.minimum(tl.maximum(dist, -radius), radius) + radius
                    tl.atomic_add(DTABLE + h * stab + ti, ds, mask=vis)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC) * scale
        tl.atomic_add(DK + b * sdkb + hk * sdkh + kc[:, None] * sdkn + offs_d[None, :], dk, mask=kmask)
        tl.atomic_add(DV_ + b * sdvb + hk * sdvh + kc[:, None] * sdvn + offs_dv[None, :], dv, mask=vmask)
    tl.store(DQ + q_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)
