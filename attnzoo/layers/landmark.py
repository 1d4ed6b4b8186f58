"""Landmark Attention (Mohtashami & Jaggi, 2023): blocks of tokens gated by a landmark key.

Keys are split into blocks of ``block`` tokens, each with a landmark key. A
query attends to its own block's earlier tokens with plain softmax and to each
*past* block through the landmark (the *grouped softmax*): the landmark's
score competes with the current block's scores in one softmax, and the weight
it wins, ``g_b``, is shared among the block's tokens in proportion to their
softmax within the block::

    a_ij = g_b · exp(s_ij) / Σ_{j'∈b} exp(s_ij')      (j in a past block b)

That is a merge (log-sum-exp combination, as in :func:`attnzoo.core.partial.merge`)
of one partial per past block -- its in-block softmax output with the landmark
score as its log-weight -- and the current block's exact partial, computed here
as a single softmax over per-key scores shifted by their block's log-weight (see
:func:`grouped_attention`). At inference a query keeps only its ``top_k`` past
blocks by landmark score (retrieval); with every block kept it equals the
training-time output.

Here the landmark key of a block is a learned projection of the block's mean
input (the paper inserts a landmark *token* after each block, whose key the
earlier layers compute; a per-block projection keeps the layer a drop-in
``(B, N, d) -> (B, N, d)`` mixer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnZooError
from .linear import _check_width, _merge_heads, _split_heads


def _dense_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_landmark: torch.Tensor, block: int,
                   top_k: int | None, scale: float) -> torch.Tensor:
    """The grouped softmax with the ``N × N`` scores at once, through autograd (the reference form).

    The merge of the per-block partials is one softmax over every key: a key ``j`` in a past block ``b``
    scores ``s_ij - lse_b(i) + s_lm_ib`` (its in-block log-softmax plus the landmark's log-weight), a key
    of the query's own block scores ``s_ij``, any other key ``-inf``. Its row normaliser is the merged
    ``lse`` and each past block's keys share ``exp(s_lm_ib)`` of it, so the result is the merge exactly.
    """
    N = q.shape[2]
    full = N // block
    pos = torch.arange(N, device=q.device)
    own = pos // block
    s = q @ k.transpose(-1, -2) * scale  # (B, H, N, N)
    in_own = (own[:, None] == own[None, :]) & (pos[None, :] <= pos[:, None])  # causal, the query's own block
    if full == 0:
        return s.masked_fill(~in_own, float("-inf")).softmax(-1) @ v
    s_lm = q @ k_landmark.transpose(-1, -2) * scale  # (B, H, N, full)
    keep = torch.arange(full, device=q.device) < own[:, None]  # (N, full): past complete blocks
    if top_k is not None and top_k < full:
        # the top_k past blocks by landmark score; a query with fewer past blocks keeps them all
        chosen = torch.zeros_like(s_lm, dtype=torch.bool).scatter_(
            -1, s_lm.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices, True)
        keep = keep & chosen
    past = s[..., :full * block].unflatten(-1, (full, block))  # (B, H, N, full, block)
    log_w = (s_lm - past.logsumexp(-1)).masked_fill(~keep, float("-inf"))  # per block: landmark - in-block lse
    grouped = torch.nn.functional.pad((past + log_w[..., None]).flatten(-2), (0, N - full * block),
                                      value=float("-inf"))  # the incomplete last block is never a past block
    return torch.where(in_own, s, grouped).softmax(-1) @ v


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_landmark: torch.Tensor, block: int,
                      top_k: int | None = None, scale: float | None = None, rows: int | None = 32) -> torch.Tensor:
    """Causal grouped-softmax attention; ``k_landmark (B, H, N // block, D)`` scores the complete blocks.

    ``top_k``: past blocks each query reads (by landmark score); None = all.

    ``rows``: query rows per chunk of the tiled form (:class:`_TiledGrouped`, rounded up to whole blocks:
    memory ``O(rows · N)``, the backward recomputes the scores from per-row statistics). ``rows=None`` runs
    the dense form (:func:`_dense_grouped`, the ``N × N`` scores at once through autograd): the reference
    the tiled form is tested against.
    """
    B, H, N, D = q.shape
    if k_landmark.shape != (B, H, N // block, D):
        raise AttnZooError(f"k_landmark: expected shape {(B, H, N // block, D)} (one key per complete block of "
                           f"{block}), got {tuple(k_landmark.shape)}")
    if rows is not None and (not isinstance(rows, int) or rows < 1):
        raise AttnZooError(f"rows: expected a positive integer or None, got {rows!r}")
    scale = D**-0.5 if scale is None else scale
    if rows is None:
        return _dense_grouped(q, k, v, k_landmark, block, top_k, scale)
    return _TiledGrouped.apply(q, k, v, k_landmark, block, top_k, scale, rows)


class _TiledGrouped(torch.autograd.Function):
    """The grouped softmax by query chunks of whole blocks, keeping only per-row statistics for the backward.

    A chunk of rows ``[r0, r1)`` reads keys ``[0, r1)`` (padded to whole blocks) in one ``(R, Nk)`` score
    tile. Per row and key block it computes the block's log-sum-exp ``lse_b`` (the in-block softmax of a
    past block, the causal one of the own block); the row's normaliser is their merge (``attnzoo.core.partial``'s
    identity: a past block enters with the landmark score ``s_lm_ib`` as its log-weight, the own block with
    its ``lse``), so the probabilities are ``exp(s_ij - shift_ib) · weight_ib`` with, per block, ``shift =
    lse_b`` and ``weight = exp(s_lm_ib - lse)`` for a (kept) past block, ``shift = lse`` and ``weight = 1``
    for the own block, weight 0 otherwise. Only ``shift``/``weight`` ``(B, H, N, blocks)`` are saved; the
    backward recomputes each tile's scores and needs, besides FlashAttention's ``dt = p·(dp - delta)``, the
    in-block softmax's term: ``ds = dt - softmax_b · g_ib`` with ``g_ib = Σ_{j∈b} dt_ij``, which is also the
    gradient of the landmark score.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_landmark, block: int, top_k: int | None, scale: float, rows: int):
        B, H, N, D = q.shape
        blocks = -(-N // block)
        kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, blocks * block - N)) for t in (k, v))  # zero keys
        out = torch.empty(B, H, N, v.shape[-1], dtype=q.dtype, device=q.device)
        shift = q.new_zeros(B, H, N, blocks)
        weight = q.new_zeros(B, H, N, blocks)
        for r0, r1, nb, past in _chunks(N, block, rows):
            qs = q[:, :, r0:r1] * scale
            s = _tile_scores(qs, kp, r0, nb * block)
            sb = s.unflatten(-1, (nb, block))
            m = sb.amax(-1)  # (B, H, R, nb); -inf on blocks wholly in the rows' future
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            lse_b = m + sb.sub_(m[..., None]).exp_().sum(-1).log()  # s now holds exp(s - m) per block
            own = torch.arange(r0, r1, device=q.device)[:, None] // block == torch.arange(nb, device=q.device)
            kept = _kept_logits(qs, k_landmark[:, :, :past], r0, r1, block, top_k, nb)
            logits = torch.where(own, lse_b, kept)  # the merge: own block's lse, kept past blocks' s_lm
            lse = logits.logsumexp(-1, keepdim=True)
            w = (logits - lse).exp()  # each block's share of the row (0 off the own and kept past blocks)
            lse_b = torch.where(torch.isfinite(lse_b), lse_b, torch.zeros_like(lse_b))  # future blocks: no key
            sb.mul_((w * torch.exp(m - lse_b))[..., None])  # exp(s - m) · exp(m - lse_b) · share = probabilities
            out[:, :, r0:r1] = s @ vp[:, :, :nb * block]
            shift[:, :, r0:r1, :nb] = torch.where(own, lse.expand_as(lse_b), lse_b)
            weight[:, :, r0:r1, :nb] = torch.where(own, torch.ones_like(w), w)
        ctx.save_for_backward(q, k, v, k_landmark, out, shift, weight)
        ctx.settings = block, scale, rows
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, k_landmark, out, shift, weight = ctx.saved_tensors
        block, scale, rows = ctx.settings
        B, H, N, D = q.shape
        blocks = shift.shape[-1]
        kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, blocks * block - N)) for t in (k, v))
        d_out = d_out.contiguous()
        delta = (d_out * out).sum(-1, keepdim=True)  # FlashAttention's row term Σ dO·O
        dq, dk, dv, dk_lm = (torch.zeros_like(t) for t in (q, kp, vp, k_landmark))
        for r0, r1, nb, past in _chunks(N, block, rows):
            qs, do = q[:, :, r0:r1] * scale, d_out[:, :, r0:r1]
            e = _tile_scores(qs, kp, r0, nb * block)
            eb = e.unflatten(-1, (nb, block)).sub_(shift[:, :, r0:r1, :nb, None]).exp_()  # in-block softmax
            p = eb * weight[:, :, r0:r1, :nb, None]
            dv[:, :, :nb * block] += p.flatten(-2).transpose(-1, -2) @ do
            dt = (do @ vp[:, :, :nb * block].transpose(-1, -2)).unflatten(-1, (nb, block))
            dt.sub_(delta[:, :, r0:r1, None]).mul_(p)  # FlashAttention's dp -> p·(dp - delta)
            own = torch.arange(r0, r1, device=q.device)[:, None] // block == torch.arange(nb, device=q.device)
            g = dt.sum(-1).masked_fill_(own, 0.0)  # (B, H, R, nb): the landmark scores' gradient (0 off kept blocks)
            ds = dt.sub_(eb.mul_(g[..., None])).flatten(-2)
            dq[:, :, r0:r1] = (ds @ kp[:, :, :nb * block] + g[..., :past] @ k_landmark[:, :, :past]) * scale
            dk[:, :, :nb * block] += ds.transpose(-1, -2) @ qs
            dk_lm[:, :, :past] += g[..., :past].transpose(-1, -2) @ qs
        return dq, dk[:, :, :N], dv[:, :, :N], dk_lm, None, None, None, None


def _chunks(N: int, block: int, rows: int):
    """``(r0, r1, key blocks, possible past blocks)`` per query chunk of whole blocks."""
    step = -(-rows // block) * block
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        yield r0, r1, -(-r1 // block), (r1 - 1) // block


def _tile_scores(qs: torch.Tensor, kp: torch.Tensor, r0: int, width: int) -> torch.Tensor:
    """Scores of rows ``r0 ..`` over keys ``[0, width)``, ``-inf`` on keys after the row (causal)."""
    s = qs @ kp[:, :, :width].transpose(-1, -2)
    R = qs.shape[2]
    future = torch.arange(r0, width, device=qs.device)[None, :] > torch.arange(r0, r0 + R, device=qs.device)[:, None]
    s[..., r0:].masked_fill_(future, float("-inf"))
    return s


def _kept_logits(qs, k_lm, r0: int, r1: int, block: int, top_k: int | None, nb: int) -> torch.Tensor:
    """``(B, H, R, nb)``: the landmark scores of the rows' kept past blocks (all, or the ``top_k`` best by
    landmark score; a row with fewer past blocks keeps them all), -inf on every other block."""
    s_lm = qs @ k_lm.transpose(-1, -2)  # (B, H, R, past)
    past = s_lm.shape[-1]
    keep = torch.arange(past, device=qs.device) < (torch.arange(r0, r1, device=qs.device) // block)[:, None]
    if top_k is not None and top_k < past:
        chosen = torch.zeros_like(s_lm, dtype=torch.bool).scatter_(
            -1, s_lm.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices, True)
        keep = keep & chosen
    logits = s_lm.masked_fill(~keep, float("-inf"))
    return torch.nn.functional.pad(logits, (0, nb - past), value=float("-inf"))


class LandmarkLayer(nn.Module):
    """Causal multi-head Landmark Attention: ``forward(x)`` trains with the grouped softmax over every
    past block; ``top_k`` (a constructor default, or per call) retrieves only the best past blocks."""

    def __init__(self, d_model: int, n_heads: int = 2, block: int = 16, top_k: int | None = None):
        super().__init__()
        _check_width("LandmarkLayer", d_model, n_heads)
        if block < 1 or (top_k is not None and top_k < 1):
            raise AttnZooError(f"LandmarkLayer: expected block >= 1 and top_k >= 1 or None, got block={block}, "
                               f"top_k={top_k}")
        self.n_heads, self.block, self.top_k = n_heads, block, top_k
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.landmark = nn.Linear(d_model, d_model)  # block mean -> landmark key
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        B, N, d = x.shape
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        full = N // self.block
        pooled = x[:, :full * self.block].reshape(B, full, self.block, d).mean(2)
        k_lm = _split_heads(self.landmark(pooled), self.n_heads)
        out = grouped_attention(q, k, v, k_lm, self.block, self.top_k if top_k is None else top_k)
        return self.o_proj(_merge_heads(out))

    def state_size(self, seq_len: int) -> int:
        d = self.o_proj.in_features
        return 2 * seq_len * d + (seq_len // self.block) * d  # every key and value + one landmark per block
