"""Hashing and clustering attention (docs/methods.md): sort by bucket, attend blocks of the sort.

Queries and keys are reordered by (bucket, position); the method's key set is
then a block layout in the sorted order whose ``mask_mod`` restores the
original positions (causality, padding, the method's own rule). Buckets come
from the KV head's hash, shared by its query heads, so K/V are permuted once
per KV head and never repeated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ...checks import Problem
from ...core.blocksparse import BlockLayout, TokenLayout, attend
from ...core.gqa import fold_groups
from ...core.layout import range_blocks
from ...core.partial import Partial, merge
from ...core.scoremod import reordered
from ...errors import AttnZooError, UnsupportedError
from ...registry import MAX_SIZE, Family, Method, Supports, param, register
from ._base import SPARSE_SUPPORTS

_NO_DECODE = Supports(causal=True, noncausal=True, decode=False, grad=True, lse=True, sinks=True, varlen=True)
#: lsh and routing take a score_mod: exact attention over their key sets, the mod at the original positions
_MOD = dict(score_mod=True)


def _gather_rows(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``t (B, H, N, X)`` reordered along N by ``order (B, H, N)``."""
    return torch.gather(t, 2, order.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))


def _rank(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: where each original index sits in the sorted order."""
    return torch.argsort(order, dim=-1)


def _sort_by_bucket(bucket: torch.Tensor) -> torch.Tensor:
    """Order of ``(bucket, position)`` per row of ``bucket (B, H, N)``."""
    n = bucket.shape[-1]
    return torch.argsort(bucket * n + torch.arange(n, device=bucket.device), dim=-1)


def _kv_heads(h: torch.Tensor, prob: Problem) -> torch.Tensor:
    return h // prob.groups


def sorted_attention(q, k, v, prob: Problem, q_order: torch.Tensor, k_order: torch.Tensor,
                     blocks: torch.Tensor, block: int, *, causal: bool, key_padding_mask: torch.Tensor | None,
                     rule: Callable | None = None, score_mod=None) -> Partial:
    """Attend query block ``n`` of the ``q_order`` sort to key blocks ``blocks[..., n, :]`` of the ``k_order`` sort.

    ``q_order (B, Hq, Nq)``, ``k_order (B, Hkv, Nk)``, ``blocks (B, Hq, nq, C)``.
    ``rule(b, h, q_orig, k_orig) -> bool`` further restricts pairs on original
    indices. ``score_mod`` sees original positions (:func:`~attnzoo.core.scoremod.reordered`). Returns the
    partial result in the original query order.
    """
    off = prob.len_k - prob.len_q

    def mask_mod(b, h, qi, kj):
        qo = q_order[b, h, qi]
        ko = k_order[b, _kv_heads(h, prob), kj]
        ok = torch.ones_like(ko, dtype=torch.bool) if not causal else ko <= qo + off
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[b, ko]
        if rule is not None:
            ok = ok & rule(b, h, qo, ko)
        return ok

    layout = BlockLayout.from_indices(blocks, block_q=block, block_k=block, len_q=prob.len_q, len_k=prob.len_k,
                                      mask_mod=mask_mod)
    if score_mod is not None:
        score_mod = reordered(score_mod, q_order, k_order, q_offset=off, groups=prob.groups)
    out, lse = attend(_gather_rows(q, q_order), _gather_rows(k, k_order), _gather_rows(v, k_order), layout,
                      scale=prob.scale, causal=False, score_mod=score_mod)
    back = _rank(q_order)
    return Partial(_gather_rows(out, back), torch.gather(lse, 2, back))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _project(x: torch.Tensor, proj: torch.Tensor, prob: Problem, queries: bool) -> torch.Tensor:
    """``x @ proj[kv head]`` for queries ``(B, Hq, N, D)`` or keys ``(B, Hkv, N, D)``."""
    if not queries:
        return torch.matmul(x, proj)
    B, Hq, N, _ = x.shape
    return torch.matmul(fold_groups(x, prob.heads_kv), proj).view(B, Hq, N, -1)


# ------------------------------------------------------------------------ Reformer
@register
@dataclass(frozen=True)
class LSH(Method):
    """Reformer LSH attention: angular LSH ``argmax([x̂R; -x̂R])`` with the same rotations for queries and keys
    (``rounds`` independent draws), queries and keys sorted by (bucket, position) and cut into chunks of
    ``chunk``; sorted query chunk c attends sorted key chunks c and c-1. Rounds are merged by lse over disjoint
    sets (a key already seen by a query in an earlier round is not counted again), so the result is exact
    attention over the union of the rounds' keys. Self-attention (Nq == Nk). ``chunk >= N`` equals exact."""

    name: ClassVar[str] = "lsh"
    exact_for: ClassVar[str] = "chunk >= N (one chunk holds every key)"
    family: ClassVar[Family] = Family.HASHING
    complexity: ClassVar[str] = "O(rounds·N·chunk·D + N log N)"
    supports: ClassVar[Supports] = dataclasses.replace(_NO_DECODE, **_MOD)
    papers: ClassVar[tuple[str, ...]] = ("Reformer: The Efficient Transformer",)

    buckets: int = param(32, min=2, max=MAX_SIZE, help="hash buckets per round (even)")
    rounds: int = param(2, min=1, max=64, help="independent hash rounds")
    chunk: int = param(64, min=1, clamp=True, help="sorted tokens per chunk")
    seed: int = param(0, help="seed of the random rotations")

    def validate(self) -> None:
        if self.buckets % 2:
            raise AttnZooError(f"lsh: parameter 'buckets' expected an even number, got {self.buckets}")

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None):
        if prob.len_q != prob.len_k:
            raise UnsupportedError(f"method 'lsh' does not support Nq != Nk (self-attention only), got "
                                   f"Nq={prob.len_q}, Nk={prob.len_k}")
        gen = torch.Generator().manual_seed(self.seed)
        nq = -(-prob.len_q // self.chunk)
        c = torch.arange(nq, device=q.device).view(-1, 1)
        blocks = torch.cat([c - 1, c], -1).expand(prob.batch, prob.heads_q, nq, 2)
        q_hat, k_hat = _unit(q), _unit(k)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (query chunk, key chunk) per earlier round
        parts = []
        for _ in range(self.rounds):
            rot = torch.randn(prob.heads_kv, prob.dim, self.buckets // 2, generator=gen).to(q)
            hq = _project(q_hat, rot, prob, True)
            hk = _project(k_hat, rot, prob, False)
            q_order = _sort_by_bucket(torch.cat([hq, -hq], -1).argmax(-1))
            k_order = _sort_by_bucket(torch.cat([hk, -hk], -1).argmax(-1))
            rule = _not_seen_rule(list(seen), prob) if seen else None
            parts.append(sorted_attention(q, k, v, prob, q_order, k_order, blocks.clamp(min=-1), self.chunk,
                                          causal=causal, key_padding_mask=key_padding_mask, rule=rule,
                                          score_mod=score_mod))
            seen.append((_rank(q_order) // self.chunk, _rank(k_order) // self.chunk))
        return merge(*parts)


def _not_seen_rule(seen, prob: Problem):
    def rule(b, h, qo, ko):
        hit = torch.zeros((), dtype=torch.bool, device=qo.device)
        for q_chunk, k_chunk in seen:
            qc = q_chunk[b, h, qo]
            kc = k_chunk[b, _kv_heads(h, prob), ko]
            hit = hit | (kc == qc) | (kc == qc - 1)
        return ~hit
    return rule


# ------------------------------------------------------------------------ Routing Transformer
@register
@dataclass(frozen=True)
class Routing(Method):
    """Routing Transformer: spherical k-means (``iters`` Lloyd steps from ``seed``-chosen keys) on the unit
    queries and keys of each KV head; a query attends the keys of its own cluster (∩ causal). Queries and keys
    are sorted by cluster and attended as a block layout. ``clusters = 1`` equals exact."""

    name: ClassVar[str] = "routing"
    exact_for: ClassVar[str] = "clusters = 1"
    family: ClassVar[Family] = Family.HASHING
    complexity: ClassVar[str] = "O(N·C·D + N²/C·D) balanced"
    supports: ClassVar[Supports] = dataclasses.replace(SPARSE_SUPPORTS, **_MOD)
    papers: ClassVar[tuple[str, ...]] = ("Efficient Content-Based Sparse Attention with Routing Transformers",)

    clusters: int = param(16, min=1, max=MAX_SIZE, help="k-means centroids per head")
    iters: int = param(2, min=0, max=1000, help="k-means iterations")
    seed: int = param(0, help="seed of the initial centroids")
    block: int = param(64, min=1, clamp=True, help="query/key block size of the sorted layout")

    def centroids(self, q: torch.Tensor, k: torch.Tensor, prob: Problem) -> torch.Tensor:
        """``(B, Hkv, C, D)`` unit centroids fitted on the unit queries and keys of each KV head."""
        gen = torch.Generator().manual_seed(self.seed)
        pts = torch.cat([fold_groups(_unit(q), prob.heads_kv), _unit(k)], 2)  # (B, Hkv, G·Nq + Nk, D)
        init = torch.randperm(prob.len_k, generator=gen)[:self.clusters].to(q.device)
        cent = _unit(k)[:, :, init]
        if cent.shape[2] < self.clusters:  # fewer keys than clusters: extra centroids stay empty
            cent = torch.cat([cent, cent.new_zeros(*cent.shape[:2], self.clusters - cent.shape[2], prob.dim)], 2)
        for _ in range(self.iters):
            assign = torch.matmul(pts, cent.transpose(-1, -2)).argmax(-1)
            sums = torch.zeros_like(cent).scatter_add_(2, assign.unsqueeze(-1).expand_as(pts), pts)
            cent = torch.where(sums.norm(dim=-1, keepdim=True) > 0, _unit(sums), cent)
        return cent

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse, score_mod=None):
        with torch.no_grad():
            cent = self.centroids(q, k, prob)
            cq = _project(_unit(q), cent.transpose(-1, -2), prob, True).argmax(-1)  # (B, Hq, Nq)
            ck = torch.matmul(_unit(k), cent.transpose(-1, -2)).argmax(-1)  # (B, Hkv, Nk)
            q_order, k_order = _sort_by_bucket(cq), _sort_by_bucket(ck)
            counts = torch.zeros(*ck.shape[:2], self.clusters + 1, dtype=torch.long, device=q.device)
            counts[..., 1:].scatter_add_(-1, ck, torch.ones_like(ck))
            start = counts.cumsum(-1)  # start[c] = first sorted key of cluster c; start[c+1] its end
            bs = self.block
            cq_sorted = torch.gather(cq, -1, q_order)
            nq = -(-prob.len_q // bs)
            first_c = cq_sorted[..., ::bs]
            last_c = cq_sorted[..., torch.clamp(torch.arange(nq, device=q.device) * bs + bs - 1,
                                                max=prob.len_q - 1)]
            start_h = start.repeat_interleave(prob.groups, dim=1)
            lo = torch.gather(start_h, -1, first_c)
            hi = torch.gather(start_h, -1, last_c + 1) - 1
            blocks = range_blocks(lo, hi, bs, prob.len_k)

        def same_cluster(b, h, qo, ko):
            return cq[b, h, qo] == ck[b, _kv_heads(h, prob), ko]

        return sorted_attention(q, k, v, prob, q_order, k_order, blocks, bs, causal=causal,
                                key_padding_mask=key_padding_mask, rule=same_cluster, score_mod=score_mod)


# ------------------------------------------------------------------------ HyperAttention
def _gray_rank(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Position of ``code`` in the reflected Gray-code sequence (adjacent buckets differ in one bit)."""
    rank = code.clone()
    shift = 1
    while shift < bits:
        rank = rank ^ (rank >> shift)
        shift *= 2
    return rank


@register
@dataclass(frozen=True)
class Hyper(Method):
    """HyperAttention: sortLSH (``bits`` random hyperplanes, buckets in Gray-code order) sorts queries and
    keys; the heavy part is the block diagonal of ``block × block`` in the sorted orders (sorted query block c
    reads sorted key block c), attended exactly. The light part is ``samples`` key columns drawn uniformly
    without replacement (``seed``), excluding heavy pairs, counted with weight ``Nk / samples``; the two are
    merged by lse. Causal rows use the same estimator with the causal mask applied to both parts.
    ``block >= N`` or ``samples >= Nk`` equals exact."""

    name: ClassVar[str] = "hyper"
    exact_for: ClassVar[str] = "block >= N (the heavy part is every pair)"
    family: ClassVar[Family] = Family.HASHING
    complexity: ClassVar[str] = "O(N·(block + samples)·D)"
    supports: ClassVar[Supports] = _NO_DECODE
    no_score_mod: ClassVar[str] = ("its light part is a sampled estimate of the remaining mass, not a key set; "
                                   "not built with a mod")
    papers: ClassVar[tuple[str, ...]] = ("HyperAttention: Long-context Attention in Near-Linear Time",)

    block: int = param(256, min=1, clamp=True, help="sorted block size of the heavy part")
    samples: int = param(256, min=1, help="uniformly sampled key columns")
    bits: int = param(7, min=1, max=30, help="hyperplanes of the sortLSH hash")
    seed: int = param(0, help="seed of the hash and of the samples")

    def forward(self, q, k, v, prob, *, causal, key_padding_mask, return_lse):
        gen = torch.Generator().manual_seed(self.seed)
        bs, dev = self.block, q.device
        with torch.no_grad():
            planes = torch.randn(prob.heads_kv, prob.dim, self.bits, generator=gen).to(q)
            weights = 2 ** torch.arange(self.bits, device=dev)
            code_q = ((_project(q, planes, prob, True) > 0).long() * weights).sum(-1)
            code_k = ((_project(k, planes, prob, False) > 0).long() * weights).sum(-1)
            q_order = _sort_by_bucket(_gray_rank(code_q, self.bits))
            k_order = _sort_by_bucket(_gray_rank(code_k, self.bits))
            nq, nkb = -(-prob.len_q // bs), -(-prob.len_k // bs)
            diag = torch.arange(nq, device=dev).clamp(max=nkb - 1)
            blocks = diag.view(1, 1, nq, 1).expand(prob.batch, prob.heads_q, nq, 1)
            q_blk = _rank(q_order) // bs  # sorted block of each original query / key
            k_blk = (_rank(k_order) // bs).clamp(max=nkb - 1)
            m = min(self.samples, prob.len_k)
            cols = torch.rand(prob.batch, prob.heads_kv, prob.len_k, generator=gen).argsort(-1)[..., :m].to(dev)
            cols = cols.repeat_interleave(prob.groups, dim=1).unsqueeze(2)  # (B, Hq, 1 group, m)
        heavy = sorted_attention(q, k, v, prob, q_order, k_order, blocks, bs, causal=causal,
                                 key_padding_mask=key_padding_mask)

        def light_pairs(b, h, qi, kj):
            return q_blk[b, h, qi].clamp(max=nkb - 1) != k_blk[b, _kv_heads(h, prob), kj]

        tokens = TokenLayout(cols.contiguous(), prob.len_q, prob.len_q, prob.len_k, mask_mod=light_pairs)
        light = Partial(*attend(q, k, v, tokens, scale=prob.scale, causal=causal,
                                key_padding_mask=key_padding_mask))
        return merge(heavy, light.weighted(math.log(prob.len_k / m)))
