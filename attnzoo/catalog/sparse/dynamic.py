"""Content-dependent sparse prefill (docs/methods.md): the layout is estimated from q and k.

Each method estimates which key blocks (and tokens) matter, builds a layout,
and lets the engine attend exactly over it; ``layouts(q, k, causal=...)``
returns what it chose, so ``block_sparse(layout=...)`` can replay it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...checks import Problem, check_qkv
from ...core import blockkernel
from ...core.layout import BlockLayout, Layout, TokenLayout
from ...core.gqa import fold_groups, merge_groups, split_groups, unfold_groups
from ...core.scoremod import apply_score_mod, call_score_mod
from ...registry import Family, Supports, param, register
from ._base import LAYOUT_SUPPORTS, LayoutMethod, block_positions

log = logging.getLogger(__name__)
#: the dense-path thresholds of a share budget (:class:`DynamicLayoutMethod`): below 2K
#: keys block_topk lost to SDPA on SmolLM2 Q/K/V (benchmarks/prefill.py), and reading half the pairs cannot pay;
#: vertical_slash with its columns on the block kernel: 1.37x SDPA at 2K, 2.10x at 4K, 2.94x at 8K (1 thread)
DENSE_BELOW, DENSE_FROM = 2048, 0.5
#: block size of the full layout that stands for the dense path in :meth:`DynamicLayoutMethod.layouts`
_DENSE_BLOCK = 64

_CAUSAL_ONLY = dataclasses.replace(LAYOUT_SUPPORTS, noncausal=False)
#: scores per step of HiP's search (one slab of query blocks at a time: its scores and gathered keys stay
#: cache-sized, where the whole search at 32K held 1.2 GB of scores per step)
_HIP_SLAB_SCORES = 1 << 20


# ---------------------------------------------------------------- shared estimators
def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q kᵀ`` for ``q (B, Hq, n, D)`` against ``k (B, Hkv, m, D)`` without repeating k: ``(B, Hq, n, m)``."""
    return unfold_groups(torch.matmul(fold_groups(q, k.shape[1]), k.transpose(-1, -2)) * scale, q.shape[1])


def block_pool(t: torch.Tensor, block: int, valid: torch.Tensor | None = None, how: str = "mean") -> torch.Tensor:
    """Pool ``(B, H, N, D)`` over blocks of ``block`` rows -> ``(B, H, nb, D)``; ``valid (B|1, N)`` weights rows."""
    B, H, N, D = t.shape
    if valid is not None and bool(valid.all()):
        valid = None
    if valid is None and N > 0:  # every row counts: reduce views of t (no padded or weighted copy of it)
        reduce = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}[how]
        whole = N // block * block
        parts = [reduce(t[:, :, :whole].reshape(B, H, N // block, block, D), dim=3)] if whole else []
        if whole < N:
            parts.append(reduce(t[:, :, whole:], dim=2, keepdim=True))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    nb = -(-N // block)
    w = torch.ones(1, N, dtype=t.dtype, device=t.device) if valid is None else valid.to(t.dtype)
    w = torch.nn.functional.pad(w, (0, nb * block - N)).view(w.shape[0], 1, nb, block, 1)
    x = torch.nn.functional.pad(t, (0, 0, 0, nb * block - N)).view(B, H, nb, block, D)
    if how == "mean":
        return (x * w).sum(3) / w.sum(3).clamp(min=1)
    fill = -math.inf if how == "max" else math.inf
    x = torch.where(w > 0, x, torch.full_like(x, fill))
    out = x.amax(3) if how == "max" else x.amin(3)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def causal_block_ok(prob: Problem, block_q: int, block_k: int, device) -> torch.Tensor:
    """``(nq, nk_blocks)`` bool: key blocks holding at least one key the query block may see causally."""
    _, last = block_positions(prob, block_q, device)
    nkb = -(-prob.len_k // block_k)
    return torch.arange(nkb, device=device) * block_k <= last.view(-1, 1)


def diagonal_span(prob: Problem, block_q: int, block_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last key block at each query block's own positions (the causal diagonal): two ``(nq,)``
    tensors, ``hi < lo`` where the block has no position with a key."""
    first, last = block_positions(prob, block_q, device)
    lo = first.clamp(0, prob.len_k - 1) // block_k
    hi = torch.where(last >= 0, last.clamp(0, prob.len_k - 1) // block_k, -1)
    return lo, hi


def diagonal_blocks(prob: Problem, block_q: int, block_k: int, device) -> torch.Tensor:
    """``(nq, nk_blocks)`` bool: key blocks at the query block's own positions (the causal diagonal)."""
    lo, hi = diagonal_span(prob, block_q, block_k, device)
    blk = torch.arange(-(-prob.len_k // block_k), device=device)
    return (blk >= lo.view(-1, 1)) & (blk <= hi.view(-1, 1))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest finite entries of each row of ``scores``."""
    k = min(k, scores.shape[-1])
    top = scores.topk(k, dim=-1)
    out = torch.zeros_like(scores, dtype=torch.bool)
    return out.scatter_(-1, top.indices, torch.isfinite(top.values))


def top_p_mask(scores: torch.Tensor, p: float) -> torch.Tensor:
    """The smallest set of each row whose softmax mass reaches ``p`` (ZipVL / AdaSpa budget)."""
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    srt, order = probs.sort(dim=-1, descending=True)
    before = srt.cumsum(-1) - srt  # mass of the entries ranked above
    keep_sorted = (before < p) & (srt > 0)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _key_valid(prob: Problem, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor:
    return torch.ones(1, prob.len_k, dtype=torch.bool, device=device) if key_padding_mask is None \
        else key_padding_mask


# ---------------------------------------------------------------- the dense path
def visible_pairs(prob: Problem, causal: bool) -> int:
    """(query, key) pairs one head may see: ``Nq·Nk``, or the causal (bottom-right aligned) triangle."""
    if not causal:
        return prob.len_q * prob.len_k
    off = prob.len_k - prob.len_q  # query i sees keys [0, i + off]
    lo = max(0, -off)  # first query that sees a key
    n = prob.len_q - lo
    return n * (lo + off + 1) + n * (n - 1) // 2


def layout_share(layouts: list[Layout], prob: Problem, causal: bool) -> float:
    """The share of the visible pairs the layouts read per batch row and head, counting whole blocks (an upper
    bound: the diagonal blocks' hidden half counts): the dense-path test of :class:`DynamicLayoutMethod`."""
    total = max(1, visible_pairs(prob, causal))
    share = 0.0
    for lay in layouts:  # pairs read per (batch row, head) of the layout
        if isinstance(lay, BlockLayout):
            read, pairs = (lay.kv_blocks >= 0).sum(-1), lay.block_q * lay.block_k
        else:  # tokens: those a group's last row may see
            read, pairs = lay.tokens_read(causal), lay.group
        share += read.sum().item() * pairs / (read.shape[0] * read.shape[1]) / total
    return share


def rows_share(prob: Problem, causal: bool, block_q: int, block_k: int, per_row: int) -> float:
    """The share of the visible key blocks that reading ``per_row`` of them per query block (all when fewer
    are visible) covers: a lower bound of what a top-k layout reads, from the sizes alone."""
    first, last = block_positions(prob, block_q, "cpu")
    nkb = -(-prob.len_k // block_k)
    vis = (last.clamp(-1, prob.len_k - 1) // block_k + 1).clamp(min=0) if causal else torch.full_like(last, nkb)
    return float(vis.clamp(max=per_row).sum()) / max(1, float(vis.sum()))


@dataclass(frozen=True)
class DynamicLayoutMethod(LayoutMethod):
    """A layout estimated from q and k, or the dense path where sparsity cannot pay: with fewer than
    ``dense_below`` keys, or when the estimated layout reads at least ``dense_from`` of the visible pairs
    (the N-scaled budget plus the forced sink and diagonal blocks cover most of them), the call is exact
    attention on the fused kernel and :meth:`layouts` returns the full layout. :meth:`path` says which
    path a call takes (and the ``attnzoo.catalog.sparse.dynamic`` logger at DEBUG level)."""

    #: share parameters that are not the budget: they scale with N but leave the dense path to the budget's form
    side_shares: ClassVar[tuple[str, ...]] = ()

    dense_below: int | None = param(None, min=0, help="calls with fewer keys take the dense path (exact attention "
                                                      "on the fused kernel); default with a share budget: the "
                                                      "measured crossover (2048), 0 with a count")
    dense_from: float | None = param(None, min=0.0, max=1.0, help="take the dense path when the layout reads at "
                                                                  "least this share of the visible pairs (1: "
                                                                  "never); default: 0.5 with a share budget, 1 "
                                                                  "with a count")

    def fit(self, prob: Problem) -> "DynamicLayoutMethod":
        """Shares resolved (see :meth:`Method.fit`), and the dense-path thresholds: a share budget (the default)
        scales with N and falls back to dense attention where it cannot pay; a count is a layout asked for,
        kept on the sparse path unless ``dense_below``/``dense_from`` are given."""
        share = any(f.metadata.get("share") and f.name not in self.side_shares
                    and isinstance(getattr(self, f.name), float) and getattr(self, f.name) < 1
                    for f in dataclasses.fields(self))
        me = dataclasses.replace(
            self, dense_below=(DENSE_BELOW if share else 0) if self.dense_below is None else self.dense_below,
            dense_from=(DENSE_FROM if share else 1.0) if self.dense_from is None else self.dense_from)
        return LayoutMethod.fit(me, prob)

    def estimate(self, q, k, prob: Problem, *, causal: bool, key_padding_mask, score_mod=None) -> list[Layout]:
        """The layouts the method estimates from q and k (the sparse path)."""
        raise NotImplementedError

    def min_share(self, prob: Problem, causal: bool) -> float:
        """A lower bound of :func:`layout_share` from the sizes alone (skips the estimation when it already
        decides the dense path)."""
        return 0.0

    def choose(self, q, k, prob: Problem, *, causal: bool, key_padding_mask, score_mod=None) -> list[Layout] | None:
        """The sparse path's layouts, or None for the dense path."""
        if self.dense_below is None or self.dense_from is None:  # not fitted to this call yet
            return self.fit(prob).choose(q, k, prob, causal=causal, key_padding_mask=key_padding_mask,
                                         score_mod=score_mod)
        dense = prob.len_k < self.dense_below or (self.dense_from < 1
                                                   and self.min_share(prob, causal) >= self.dense_from)
        lays = None if dense else self.estimate(q, k, prob, causal=causal, key_padding_mask=key_padding_mask,
                                                score_mod=score_mod)
        if lays is not None and self.dense_from < 1 and layout_share(lays, prob, causal) >= self.dense_from:
            lays = None
        log.debug("%s: %s path at Nq=%d, Nk=%d", self.name, "dense" if lays is None else "sparse", prob.len_q,
                  prob.len_k)
        return lays

    def path(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
             key_padding_mask: torch.Tensor | None = None, score_mod=None) -> str:
        """``"dense"`` or ``"sparse"``: the path a call on ``q``/``k`` takes."""
        prob = check_qkv(q, k, k, key_padding_mask)
        lays = self.fit(prob).choose(q, k, prob, causal=causal, key_padding_mask=key_padding_mask,
                                     score_mod=score_mod)
        return "dense" if lays is None else "sparse"

    def build_layouts(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        lays = self.choose(q, k, prob, causal=causal, key_padding_mask=key_padding_mask, score_mod=score_mod)
        if lays is not None:
            return lays
        nqb, nkb = -(-prob.len_q // _DENSE_BLOCK), -(-prob.len_k // _DENSE_BLOCK)
        return [BlockLayout.from_block_mask(torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=q.device),
                                            block_q=_DENSE_BLOCK, block_k=_DENSE_BLOCK, len_q=prob.len_q,
                                            len_k=prob.len_k, causal=causal)]


# ---------------------------------------------------------------- MInference vertical-slash
@register
@dataclass(frozen=True)
class VerticalSlash(DynamicLayoutMethod):
    """MInference's vertical-slash pattern: the last ``last_q`` queries probe all keys (exact softmax);
    column sums pick the top ``n_vertical`` key columns and diagonal sums the top ``n_slash`` offsets
    ``p - j``; the first ``sinks`` columns and offset 0 are always kept. Slashes are read as the key
    blocks they cross (block granularity, as MInference's kernel), columns as a token gather outside those
    blocks; the two are merged by lse. ``n_vertical >= Nk`` equals causal exact."""

    name: ClassVar[str] = "vertical_slash"
    exact_for: ClassVar[str] = "n_slash >= N (every diagonal kept), or n_vertical >= Nk"
    family: ClassVar[Family] = Family.DYNAMIC_SPARSE
    complexity: ClassVar[str] = "O(last_q·N·D + N·(n_vertical + n_slash·block)·D)"
    supports: ClassVar[Supports] = _CAUSAL_ONLY
    papers: ClassVar[tuple[str, ...]] = ("MInference 1.0",)

    last_q: int = param(64, min=1, help="probe queries (the last ones)")
    n_vertical: int | float = param(0.125, min=1, share="keys", help="key columns kept per head: a count or a share "
                                                                    "of the keys (default 1/8)")
    n_slash: int | float = param(1 / 64, min=1, share="keys", help="diagonals (offsets p - j) kept per head: a "
                                                                  "count or a share of the keys (default 1/64: "
                                                                  "each is read as the key blocks it crosses, so "
                                                                  "1/8 read 0.44-0.62 of the pairs at 2K-4K)")
    sinks: int = param(4, min=0, help="initial key columns always kept")
    block: int = param(64, min=1, clamp=True, help="query/key block size of the slash part")

    def min_share(self, prob, causal):
        return rows_share(prob, causal, self.block, 1, self.n_vertical)

    def estimate(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        dev, bs, n_k = q.device, self.block, prob.len_k
        lq = min(self.last_q, prob.len_q)
        probe = grouped_scores(q[:, :, -lq:], k, prob.scale)  # (B, Hq, lq, Nk)
        if score_mod is not None:  # probe rows are the last lq queries, at positions n_k - lq + i
            with torch.no_grad():
                probe = apply_score_mod(score_mod, probe, n_k - lq, 0)
        pos = torch.arange(prob.len_q - lq, prob.len_q, device=dev).view(-1, 1) + (n_k - prob.len_q)
        offsets = pos - torch.arange(n_k, device=dev)  # δ = p - j, (lq, Nk)
        visible = (offsets >= 0) & _key_valid(prob, key_padding_mask, dev)[:, None, None, :]
        attn = torch.softmax(probe.masked_fill(~visible, -math.inf), dim=-1).nan_to_num(0.0)
        vertical = attn.sum(-2)
        slash = torch.zeros_like(vertical).scatter_add_(
            -1, offsets.clamp(min=0).expand_as(attn).reshape(*attn.shape[:2], -1), attn.reshape(*attn.shape[:2], -1))
        vertical[..., :self.sinks] = math.inf
        slash[..., 0] = math.inf
        chosen_offset = topk_mask(slash, self.n_slash)  # (B, Hq, Nk) over δ
        # key block m is hit by query block n iff a chosen δ lies in [first_n - (m+1)·bs + 1, last_n - m·bs]
        first, last = block_positions(prob, bs, dev)
        nkb = -(-n_k // bs)
        m0 = torch.arange(nkb, device=dev) * bs
        lo = (first.view(-1, 1) - m0 - bs + 1).clamp(0, n_k)
        hi = (last.view(-1, 1) - m0).clamp(-1, n_k - 1)
        cum = torch.nn.functional.pad(chosen_offset.long().cumsum(-1), (1, 0))  # cum[x] = #chosen δ < x
        hits = (cum[..., (hi + 1).flatten()] - cum[..., lo.flatten()]).view(*cum.shape[:2], -1, nkb) > 0
        hits = hits & (hi >= lo)
        blocks = BlockLayout.from_block_mask(hits, block_q=bs, block_k=bs, len_q=prob.len_q, len_k=n_k,
                                             causal=True)
        cols = torch.sort(vertical.topk(min(self.n_vertical, n_k), dim=-1).indices, dim=-1).values
        # one column list shared by every query block (the causal cut and the columns the slash blocks read are
        # left to the executor: no per-block copy)
        tokens = TokenLayout(cols.unsqueeze(2), bs, prob.len_q, n_k).excluding(blocks)
        return [blocks, tokens]


# ---------------------------------------------------------------- pooled-block top-k
@register
@dataclass(frozen=True)
class BlockTopK(DynamicLayoutMethod):
    """Per query block, the ``topk`` key blocks with the highest pooled score (+ the diagonal blocks when
    causal, + block 0 with ``sink``). ``score="mean"``: ``scale · mean(Q_blk)·mean(K_blk)`` (MInference
    block-sparse, SeerAttention's gate without learned projections), an estimate of the block's attention
    mass; ``"bound"``: Quest's upper bound ``Σ_d max(q̄_d·kmin_d, q̄_d·kmax_d)``, which catches a single
    outlying key (a needle) that the block mean dilutes, but ranks the ordinary blocks worse (the default:
    the passkey needs it); ``"mean+bound"``: the ``topk`` best by the mean plus the ``guard`` best by the bound
    (on natural text they are mostly among the mean's anyway); ``"lse"``: the query block's mean row scored
    against every key it may see, ``log Σ_j exp(scale · q̄·k_j)`` over each key block's keys (one bf16 GEMM and
    one pass, :func:`~attnzoo.core.blockkernel.block_lse`; ~1 % of SDPA's time at 32K): the block's exact
    attention mass for that row, so a lone needle key counts in full, and ordinary blocks rank as by their true
    mass (32K synthetic: recall 0.95 at 0.186 of the pairs; the oracle per KV group needs 0.182, the mean
    0.193, the bound 0.235); but the mean row dilutes a question's few rows (SmolLM2 passkey at topk 1/10: 0/3
    at 2K and 4K, the bound 1/3 and 2/3), so it is not the default. ``heads="kv"`` ranks a group's blocks by the bound's best score among its query
    heads, the others' by the group's mean pooled softmax (its average attention mass). ``top_p`` replaces the count by the smallest set of
    blocks holding that share of the pooled softmax. ``topk >= Nk / block`` equals exact."""

    name: ClassVar[str] = "block_topk"
    exact_for: ClassVar[str] = "topk >= the number of key blocks"
    family: ClassVar[Family] = Family.DYNAMIC_SPARSE
    complexity: ClassVar[str] = "O((N/block)²·D + N·topk·block·D)"
    papers: ClassVar[tuple[str, ...]] = ("MInference 1.0", "SeerAttention", "Quest")
    side_shares: ClassVar[tuple[str, ...]] = ("guard",)

    block: int = param(64, min=1, clamp=True, help="query/key block size")
    topk: int | float = param(0.125, min=1, clamp=True, share="block", help="key blocks kept per query block: a "
                                                                             "count or a share of the key blocks "
                                                                             "(default 1/8)")
    score: str = param("bound", choices=("mean", "bound", "mean+bound", "lse"),
                       help="pooled block score: mean (the better estimate of a block's attention mass), bound "
                            "(catches a lone needle key: SmolLM2 passkey at 4K, mean 0/3, bound 2/3) or the topk "
                            "best by the mean plus the guard best by the bound (32K synthetic at topk 1/10: "
                            "recall 0.954 at 0.205 of the pairs, bound 1/8 0.950 at 0.235; but SmolLM2 passkey at "
                            "8K 1/3, bound 3/3), or lse: each key block's log-sum-exp of the block's mean query "
                            "row against its keys (the row's exact mass there, ranks like the true mass: 32K "
                            "synthetic topk 1/10 recall 0.952 at 4.8-4.9x SDPA (idle); but SmolLM2 passkey 0/3 "
                            "at 2K and 4K)")
    guard: int | float = param(0.0625, min=0, clamp=True, share="block",
                               help="with score=mean+bound: key blocks kept by the bound score besides the topk by "
                                    "the mean: a count or a share of the key blocks (default 1/16)")
    sink: bool = param(True, help="always keep key block 0 (the attention sinks), like HiP")
    top_p: float | None = param(None, min=1e-6, max=1.0, help="keep blocks up to this pooled-softmax mass "
                                                             "instead of topk (by the score: mean+bound ranks by "
                                                             "the mean)")
    heads: str = param("kv", choices=("query", "kv"),
                       help="select per query head, or once per KV head for its query group (by the group's mean "
                            "pooled softmax): the group then reads its blocks together, one gather and one "
                            "kernel row set for G heads (SmolLM2 8K: recall 0.965 vs 0.968 per query head, "
                            "1.3x faster)")

    def min_share(self, prob, causal):
        return 0.0 if self.top_p is not None else rows_share(prob, causal, self.block, self.block, self.topk)

    def block_scores(self, q, k, prob: Problem, causal: bool, key_padding_mask, score_mod=None,
                     score: str | None = None) -> torch.Tensor:
        """Pooled scores ``(B, Hq, nq, nk_blocks)`` (``score``: "mean" or "bound", default the method's; the
        mean for "mean+bound"); -inf for blocks a query block cannot see. A ``score_mod`` modifies each pooled
        score as the score of the blocks' middle query and key positions."""
        bs, dev = self.block, q.device
        score = score or ("mean" if self.score == "mean+bound" else self.score)
        valid = _key_valid(prob, key_padding_mask, dev)
        q_bar = block_pool(q, bs)
        if score == "lse":  # the mean row against every key it may see, log-sum-exp per key block
            s = blockkernel.block_lse(q_bar, k, bs, scale=prob.scale,
                                      limit=block_positions(prob, bs, dev)[1] if causal else None,
                                      key_padding_mask=key_padding_mask)
        elif score == "mean":
            s = grouped_scores(q_bar, block_pool(k, bs, valid), prob.scale)
        else:
            # Σ_d max(q̄_d·kmax_d, q̄_d·kmin_d) = q̄⁺·kmax + q̄⁻·kmin: two GEMMs, no (nq, nk_blocks, D) product
            kmax, kmin = block_pool(k, bs, valid, "max"), block_pool(k, bs, valid, "min")
            s = grouped_scores(q_bar.clamp(min=0), kmax, prob.scale) + grouped_scores(q_bar.clamp(max=0), kmin,
                                                                                        prob.scale)
        if score_mod is not None:
            first, last = block_positions(prob, bs, dev)
            k_mid = (torch.arange(s.shape[-1], device=dev) * bs + (bs - 1) // 2).clamp(max=prob.len_k - 1)
            with torch.no_grad():
                s = call_score_mod(score_mod, s, torch.arange(s.shape[0], device=dev).view(-1, 1, 1, 1),
                                   torch.arange(s.shape[1], device=dev).view(1, -1, 1, 1),
                                   ((first + last) // 2).view(1, 1, -1, 1), k_mid.view(1, 1, 1, -1))
        has_key = block_pool(valid.unsqueeze(1).unsqueeze(-1).float(), bs).view(valid.shape[0], 1, 1, -1) > 0
        ok = has_key
        if causal:
            ok = ok & causal_block_ok(prob, bs, bs, dev)
        return s.masked_fill(~ok, -math.inf)

    def block_mass(self, scores: torch.Tensor, heads_kv: int, bound: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled softmax of ``scores`` over each row's visible blocks, and which blocks are visible; with
        ``heads="kv"`` per KV head's query group (``(B, Hkv, nq, nk_blocks)``, visible to any of its heads): the
        softmax of its heads' best ``bound`` score, else its heads' mean softmax: what ``top_p`` and the ``guard``
        of :meth:`estimate` keep."""
        seen = torch.isfinite(scores)
        if self.heads == "kv" and bound:
            scores = split_groups(scores, heads_kv).amax(2)
        mass = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        if self.heads == "kv":
            seen = split_groups(seen, heads_kv).any(2)
            if not bound:
                mass = split_groups(mass, heads_kv).mean(2)
        return mass, seen

    def block_rank(self, scores: torch.Tensor, heads: int) -> torch.Tensor:
        """What the top-k selection of :meth:`estimate` ranks, per selecting head (``heads`` of them, each for its
        group of query heads): the group's best score (``bound``; one head: its own score), else the mean over
        the group of each head's pooled softmax; -inf where no head of the group sees the block."""
        if self.score == "bound" or scores.shape[1] == heads:
            return split_groups(scores, heads).amax(2)
        seen = split_groups(torch.isfinite(scores), heads).any(2)
        mass = split_groups(torch.softmax(scores, dim=-1).nan_to_num(0.0), heads).mean(2)
        return mass.masked_fill(~seen, -math.inf)

    def estimate(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        scores = self.block_scores(q, k, prob, causal, key_padding_mask, score_mod)
        heads = k.shape[1] if self.heads == "kv" else q.shape[1]
        span = diagonal_span(prob, self.block, self.block, q.device) if causal else None
        if self.top_p is None and self.score != "mean+bound":  # the top-k rule: one C++ pass where it applies
            kv = blockkernel.block_select(scores, heads, self.topk, by_max=self.score == "bound", sink=self.sink,
                                          span=span)
            if kv is not None:
                return [BlockLayout(kv, self.block, self.block, prob.len_q, prob.len_k, causal=causal)]
        if self.top_p is None:
            keep = topk_mask(self.block_rank(scores, heads), self.topk)
            seen = split_groups(torch.isfinite(scores), heads).any(2)
        else:
            mass, seen = self.block_mass(scores, k.shape[1], self.score == "bound")
            keep = top_p_mask(mass.log(), self.top_p)
        if self.score == "mean+bound" and self.guard > 0:
            bound, _ = self.block_mass(self.block_scores(q, k, prob, causal, key_padding_mask, score_mod, "bound"),
                                       k.shape[1], True)
            keep |= topk_mask(bound.masked_fill(~seen, -math.inf), self.guard)
        if self.sink:
            keep[..., 0] |= seen[..., 0]
        if causal:
            keep = keep | diagonal_blocks(prob, self.block, self.block, q.device)
        return [BlockLayout.from_block_mask(keep, block_q=self.block, block_k=self.block, len_q=prob.len_q,
                                            len_k=prob.len_k, causal=causal)]


# ---------------------------------------------------------------- HiP hierarchical pruning
@register
@dataclass(frozen=True)
class HiP(DynamicLayoutMethod):
    """HiP's hierarchical top-k block search: the visible key blocks (``block_k`` keys each) of each query
    block (``block`` queries) are cut into ``2·topk`` chunks, each scored by ``max_i q_i·k_rep`` (its middle
    key); the best ``topk`` chunks are halved and rescored until chunks are single key blocks. The ``topk``
    key blocks found, the sink block 0 and the query block's own blocks are attended. Key blocks must be
    small (HiP uses 2), and query blocks too: with 64-key blocks SmolLM2 found 0/3 passkeys at 2K (the needle's
    attention mass at the last prompt row fell to 5 % of exact's on its retrieval heads); with 8-key blocks
    and 64-query blocks to about half; with 8-key and 16-query blocks it stays at 0.87-1.08 of exact's
    (two prompts; the share can exceed exact's because fewer keys share the softmax).
    ``topk >=`` the number of key blocks equals exact."""

    name: ClassVar[str] = "hip"
    exact_for: ClassVar[str] = "topk >= the number of key blocks"
    family: ClassVar[Family] = Family.DYNAMIC_SPARSE
    complexity: ClassVar[str] = "O(N·topk·log(N/topk)·D)"
    papers: ClassVar[tuple[str, ...]] = ("HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical "
                                         "Attention Pruning",)

    block: int = param(16, min=1, clamp=True, help="query block size (its rows' best score ranks a chunk: 64 rows "
                                                   "drowned SmolLM2's needle row)")
    block_k: int = param(8, min=1, clamp=True, help="key block size: the search's finest unit, one representative "
                                                    "key each")
    topk: int | float = param(0.125, min=1, clamp=True, share="block_k",
                              help="key blocks kept per query block: a count or a share of the key blocks "
                                   "(default 1/8)")
    heads: str = param("kv", choices=("query", "kv"),
                       help="search per query head, or once per KV head with its query group's rows (a chunk "
                            "scores the best of them): the group then reads its blocks together, and each search "
                            "step gathers G times fewer representative keys (SmolLM2 8K: recall 0.971 vs 0.972 "
                            "per query head, 1.7x faster)")

    def min_share(self, prob, causal):
        return rows_share(prob, causal, self.block, self.block_k, self.topk)

    def estimate(self, q, k, prob, *, causal, key_padding_mask, score_mod=None):
        bs, bk, dev, kk = self.block, self.block_k, q.device, self.topk
        B, Hq, n_q, D = q.shape
        Hkv, n_k = k.shape[1], k.shape[2]
        Hs = Hkv if self.heads == "kv" else Hq  # heads that select; each scores with its G query heads' rows
        G = Hq // Hs
        first, last = block_positions(prob, bs, dev)
        nq, nkb = first.numel(), -(-n_k // bk)
        n_vis = (last.clamp(-1, n_k - 1) // bk + 1).clamp(min=0) if causal else torch.full_like(last, nkb)
        # (B, Hs, nq, G·bs, D): a query block's rows of the selecting head's G query heads, scaled
        qb = (torch.nn.functional.pad(q, (0, 0, 0, nq * bs - n_q)).view(B, Hs, G, nq, bs, D).transpose(2, 3)
              .reshape(B, Hs, nq, G * bs, D) * prob.scale)
        in_block = torch.arange(G * bs, device=dev) % bs  # each row's place in its query block
        pad_rows = (nq - 1) * bs + in_block >= n_q  # the last query block's rows past Nq (zero rows of qb)
        k_flat = k.reshape(-1, D)
        kv_head = torch.arange(Hs, device=dev) // (Hs // Hkv)
        head_base = ((torch.arange(B, device=dev).view(-1, 1) * Hkv + kv_head) * n_k).view(B, Hs, 1, 1)
        q_head = (torch.arange(Hs, device=dev).view(-1, 1) * G + torch.arange(G * bs, device=dev) // bs
                  ).view(1, Hs, 1, G * bs, 1)
        # query blocks in slabs: each step's (slab, G·bs, 2·topk) scores and gathered keys stay cache-sized
        slab = max(1, _HIP_SLAB_SCORES // max(1, B * Hs * G * bs * 2 * kk))
        starts, ends = [], []
        for s0 in range(0, nq, slab):
            s1 = min(nq, s0 + slab)
            key_limit = last[s0:s1].clamp(max=n_k - 1).view(1, 1, -1, 1) if causal else n_k - 1
            q_pos = ((torch.arange(s0, s1, device=dev).view(-1, 1) * bs + in_block).clamp(max=n_q - 1)
                     + n_k - n_q).view(1, 1, s1 - s0, G * bs, 1)
            start, end = self._search(qb[:, :, s0:s1], n_vis[s0:s1], key_limit, k_flat, head_base, q_head, q_pos,
                                      pad_rows if s1 == nq and bool(pad_rows.any()) else None, score_mod)
            starts.append(start)
            ends.append(end)
        start, end = torch.cat(starts, 2), torch.cat(ends, 2)
        keep = torch.zeros(B, Hs, nq, nkb + 1, dtype=torch.bool, device=dev)
        keep.scatter_(-1, torch.where(end > start, start, torch.full_like(start, nkb)), True)
        keep = keep[..., :nkb]
        keep[..., 0] = True
        keep = keep | diagonal_blocks(prob, bs, bk, dev)
        if causal:
            keep = keep & causal_block_ok(prob, bs, bk, dev)
        return [BlockLayout.from_block_mask(keep, block_q=bs, block_k=bk, len_q=prob.len_q, len_k=n_k,
                                            causal=causal)]

    def _search(self, qb, n_vis, key_limit, k_flat, head_base, q_head, q_pos, pad_rows, score_mod):
        """The halving search of :meth:`estimate` for one slab of query blocks: ``(start, end) (B, Hs, slab,
        topk)`` in key-block units, ``end == start`` where fewer chunks were visible."""
        B, Hs, nq, _, D = qb.shape
        bk, kk, dev = self.block_k, self.topk, qb.device
        c = torch.arange(2 * kk, device=dev)
        start = (c * n_vis.view(-1, 1)) // (2 * kk)  # (nq, 2k) in key-block units
        end = ((c + 1) * n_vis.view(-1, 1)) // (2 * kk)
        start, end = start.expand(B, Hs, nq, -1), end.expand(B, Hs, nq, -1)
        while True:
            rep = ((start + end) * bk) // 2
            rep = torch.minimum(rep, torch.as_tensor(key_limit, device=dev)).clamp(min=0)
            k_rep = k_flat.index_select(0, (head_base + rep).reshape(-1)).view(B, Hs, nq, -1, D)
            score = torch.matmul(qb, k_rep.transpose(-1, -2))  # (B, Hs, nq, G·bs, chunks)
            if score_mod is not None:  # the scores of the block's queries with the chunks' middle keys
                with torch.no_grad():
                    score = call_score_mod(score_mod, score, torch.arange(B, device=dev).view(-1, 1, 1, 1, 1),
                                           q_head, q_pos, rep.unsqueeze(-2))
            if pad_rows is not None:  # the zero rows past Nq (the slab's last block) rank nothing
                hide = torch.zeros(nq, pad_rows.numel(), 1, dtype=torch.bool, device=dev)
                hide[-1, :, 0] = pad_rows
                score = score.masked_fill(hide, -math.inf)
            score = score.amax(-2)
            score = score.masked_fill(end <= start, -math.inf)
            top = score.topk(min(kk, score.shape[-1]), dim=-1)
            start, end = start.gather(-1, top.indices), end.gather(-1, top.indices)
            empty = ~torch.isfinite(top.values)
            end = torch.where(empty, start, end)
            if bool((end - start <= 1).all()):
                return start, end
            mid = (start + end) // 2
            start, end = torch.cat([start, mid], -1), torch.cat([mid, end], -1)
