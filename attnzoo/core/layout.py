"""Layouts: which keys each query block reads (docs/methods.md, Engines).

A :class:`BlockLayout` says, per (batch, head, query block), which key blocks
the block reads: a padded row list ``kv_blocks (Bl, Hl, nq, S)`` (``-1`` =
empty slot; the ELL form of a CSR matrix, so every row has ``S`` slots) and a
``partial`` flag for blocks whose elements need the layout's ``mask_mod``.
Blocks without the flag are attended whole (only causality, the key tail and
padding are masked, and only where a block touches them). A
:class:`TokenLayout` lists explicit key tokens per group of query rows
(vertical columns, sampled or top-k tokens). A :class:`BandPlan` describes a
banded block layout as one window per query block with shared element masks
(what the fused band path of :mod:`attnzoo.core.fused` runs).

``mask_mod(b, h, q_idx, kv_idx) -> bool`` follows FlexAttention: ``q_idx`` is
the query index ``0..Nq-1``, ``kv_idx`` the key index, ``h`` the layout's head
(query head when the layout has ``Hq`` heads, KV head when it has ``Hkv``, 0
when shared). It must be elementwise: it is called on broadcastable index
tensors, never on Python ints.

This module only describes and plans layouts; the executors
(:mod:`attnzoo.core.blocksparse`, :mod:`attnzoo.core.fused`, the kernel
backends) import it, never the other way round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import AttnZooError
from .masks import MaskMod, call_mask_mod, check_mask_mod

#: elements of one mask evaluation chunk when building layouts or band plans (bounds peak memory)
MASK_CHUNK = 1 << 24


# ------------------------------------------------------------------ checks
def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttnZooError(f"{name}: expected a positive int, got {value!r}")
    return value


def compact(keep: torch.Tensor, values: torch.Tensor, *extra: torch.Tensor):
    """Move the kept entries of ``values (..., C)`` to the front, ``-1`` after, trimmed to the longest row.

    ``extra`` tensors of the same shape are reordered alongside (False where not kept).
    """
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    shape = torch.broadcast_shapes(keep.shape, values.shape, *(e.shape for e in extra))
    # each kept entry's rank among its row's kept entries is its slot; the others land in a spare column
    slot = torch.where(keep, keep.long().cumsum(-1) - 1, width).expand(shape)
    lead = shape[:-1] + (width + 1,)
    vals = torch.full(lead, -1, dtype=values.dtype, device=values.device).scatter_(
        -1, slot, values.expand(shape))[..., :width]
    if not extra:
        return vals
    return (vals, *(torch.zeros(lead, dtype=torch.bool, device=e.device).scatter_(-1, slot, e.expand(shape) & keep)
                    [..., :width] for e in extra))


def _dedupe(blocks: torch.Tensor) -> torch.Tensor:
    """Sort each row of block indices and turn repeats into ``-1`` (a block must be read once)."""
    srt = torch.sort(blocks, dim=-1).values
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = srt[..., 1:] == srt[..., :-1]
    return torch.where(dup, torch.full_like(srt, -1), srt)


def query_block_positions(len_q: int, len_k: int, block_q: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last absolute position ``p(i) = i + Nk - Nq`` of each query block: two ``(nq,)`` tensors."""
    nq = -(-len_q // block_q)
    first = torch.arange(nq, device=device) * block_q
    last = torch.clamp(first + block_q - 1, max=len_q - 1)
    off = len_k - len_q
    return first + off, last + off


def range_blocks(lo: torch.Tensor, hi: torch.Tensor, block: int, len_k: int) -> torch.Tensor:
    """Inclusive key ranges ``[lo, hi]`` per row ``(n,)`` -> the key blocks they touch ``(n, C)``, ``-1`` padded."""
    empty = (hi < lo) | (hi < 0) | (lo >= len_k)
    lo_b = lo.clamp(0, len_k - 1) // block
    hi_b = hi.clamp(0, len_k - 1) // block
    width = int((hi_b - lo_b + 1).clamp(min=0).max()) if lo.numel() else 0
    idx = lo_b.unsqueeze(-1) + torch.arange(max(width, 1), device=lo.device)
    ok = (idx <= hi_b.unsqueeze(-1)) & ~empty.unsqueeze(-1)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def band_blocks(len_q: int, len_k: int, block: int, before: int, after: int, causal: bool,
                device=None) -> torch.Tensor:
    """Key blocks within ``before`` keys before / ``after`` keys after each query block's positions: ``(nq, C)``."""
    first, last = query_block_positions(len_q, len_k, block, device)
    hi = last if causal else last + after
    return range_blocks(first - before, hi, block, len_k)


# ------------------------------------------------------------------ layouts
@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per (batch, head, query block): the key blocks it reads, and which need an element mask.

    ``kv_blocks``: ``(Bl, Hl, nq, S)`` int64 key-block indices, ``-1`` = empty
    slot; ``Bl`` is 1 or B and ``Hl`` is 1, Hkv or Hq (broadcast over the rest).
    ``partial``: ``(Bl, Hl, nq, S)`` bool, True where ``mask_mod`` must be
    applied elementwise (None = no block needs it). ``causal``: the causal mode
    the layout was pruned for (None = valid for both).
    """

    kv_blocks: torch.Tensor
    block_q: int
    block_k: int
    len_q: int
    len_k: int
    partial: torch.Tensor | None = None
    mask_mod: MaskMod | None = None
    causal: bool | None = None
    #: reused across calls (static methods): the executor caches its element masks on it
    reuse: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask_cache", {} if self.reuse else None)
        _check_positive("layout.block_q", self.block_q)
        _check_positive("layout.block_k", self.block_k)
        kb = self.kv_blocks
        if not isinstance(kb, torch.Tensor) or kb.dim() != 4 or kb.dtype != torch.int64:
            got = f"{tuple(kb.shape)} {kb.dtype}" if isinstance(kb, torch.Tensor) else type(kb).__name__
            raise AttnZooError(f"layout.kv_blocks: expected an int64 tensor (Bl, Hl, nq, S), got {got}")
        if kb.shape[2] != self.n_q_blocks:
            raise AttnZooError(f"layout.kv_blocks: expected {self.n_q_blocks} query blocks (ceil(len_q={self.len_q}"
                               f" / block_q={self.block_q})) in dim 2, got shape {tuple(kb.shape)}")
        if kb.numel() and (int(kb.max()) >= self.n_k_blocks or int(kb.min()) < -1):
            raise AttnZooError(f"layout.kv_blocks: expected indices in [-1, {self.n_k_blocks - 1}] "
                               f"(ceil(len_k={self.len_k} / block_k={self.block_k}) key blocks), got "
                               f"[{int(kb.min())}, {int(kb.max())}]")
        if self.partial is not None and (self.partial.shape != kb.shape or self.partial.dtype != torch.bool):
            raise AttnZooError(f"layout.partial: expected a bool tensor of shape {tuple(kb.shape)}, got "
                               f"{tuple(self.partial.shape)} {self.partial.dtype}")
        if self.partial is not None and self.mask_mod is None:
            raise AttnZooError("layout.partial: partial blocks need a mask_mod, got mask_mod=None")
        if self.mask_mod is not None:
            check_mask_mod(self.mask_mod, "layout.mask_mod")

    @property
    def n_q_blocks(self) -> int:
        return -(-self.len_q // self.block_q)

    @property
    def n_k_blocks(self) -> int:
        return -(-self.len_k // self.block_k)

    @property
    def nnz(self) -> int:
        """Number of (query block, key block) pairs read, over all batch·head rows of the layout."""
        return int((self.kv_blocks >= 0).sum())

    # ---------------------------------------------------------- builders
    @classmethod
    def from_indices(cls, kv_blocks: torch.Tensor, *, block_q: int, block_k: int, len_q: int, len_k: int,
                     mask_mod: MaskMod | None = None, causal: bool | None = None) -> "BlockLayout":
        """A layout from explicit key-block indices (dynamic methods); repeats are dropped.

        With a ``mask_mod`` every listed block is masked elementwise.
        """
        if not isinstance(kv_blocks, torch.Tensor) or kv_blocks.dim() != 4:
            got = tuple(kv_blocks.shape) if isinstance(kv_blocks, torch.Tensor) else type(kv_blocks).__name__
            raise AttnZooError(f"kv_blocks: expected an int64 tensor (Bl, Hl, nq, S), got {got}")
        blocks = _dedupe(kv_blocks.long())
        blocks = compact(blocks >= 0, blocks)
        partial = None if mask_mod is None else blocks >= 0
        return cls(blocks, block_q, block_k, len_q, len_k, partial, mask_mod, causal)

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, *, block_q: int, block_k: int, len_q: int, len_k: int,
                        causal: bool | None = None) -> "BlockLayout":
        """A layout from a dense block-level bool mask ``(Bl, Hl, nq, nk_blocks)`` (True = read)."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 4 or block_mask.dtype != torch.bool:
            raise AttnZooError("block_mask: expected a bool tensor (Bl, Hl, nq, nk_blocks)")
        cols = torch.arange(block_mask.shape[-1], device=block_mask.device).expand_as(block_mask)
        return cls(compact(block_mask, cols), block_q, block_k, len_q, len_k, None, None, causal)

    @classmethod
    def from_candidates(cls, candidates: torch.Tensor, mask_mod: MaskMod, *, block_q: int, block_k: int,
                        len_q: int, len_k: int, causal: bool) -> "BlockLayout":
        """Evaluate ``mask_mod`` on candidate key blocks ``(Bl, Hl, nq, C)`` (``-1`` = none).

        Keeps the blocks with at least one visible element (``mask_mod`` ∩
        causal ∩ in range) and flags those where ``mask_mod`` is not true
        everywhere. Cost O(nq · C · block_q · block_k): methods pass a superset
        of the blocks they can reach, never all of them.
        """
        check_mask_mod(mask_mod)
        cand = _dedupe(candidates.long())
        cand = compact(cand >= 0, cand)
        Bl, Hl, nq, C = cand.shape
        dev = cand.device
        keep = torch.zeros(cand.shape, dtype=torch.bool, device=dev)
        partial = torch.zeros_like(keep)
        qa = torch.arange(block_q, device=dev)
        ka = torch.arange(block_k, device=dev)
        b = torch.arange(Bl, device=dev).view(Bl, 1, 1, 1, 1, 1)
        h = torch.arange(Hl, device=dev).view(1, Hl, 1, 1, 1, 1)
        step = max(1, MASK_CHUNK // max(1, Bl * Hl * C * block_q * block_k))
        off = len_k - len_q
        for n0 in range(0, nq, step):
            n1 = min(nq, n0 + step)
            q_idx = (torch.arange(n0, n1, device=dev).view(-1, 1) * block_q + qa).view(n1 - n0, 1, block_q, 1)
            blk = cand[:, :, n0:n1]  # (Bl, Hl, n, C)
            kv_idx = (blk.unsqueeze(-1) * block_k + ka).unsqueeze(-2)  # (Bl, Hl, n, C, 1, bk)
            in_range = (q_idx < len_q) & (kv_idx < len_k) & (kv_idx >= 0)
            mm = call_mask_mod(mask_mod, b, h, q_idx.clamp(max=len_q - 1), kv_idx.clamp(0, len_k - 1))
            mm = mm.expand(torch.broadcast_shapes(mm.shape, in_range.shape))
            visible = mm & in_range
            if causal:
                visible = visible & (kv_idx <= q_idx + off)
            keep[:, :, n0:n1] = visible.flatten(-2).any(-1)
            partial[:, :, n0:n1] = (in_range & ~mm).flatten(-2).any(-1)
        blocks, flags = compact(keep, cand, partial)
        any_partial = bool(flags.any())
        return cls(blocks, block_q, block_k, len_q, len_k, flags if any_partial else None,
                   mask_mod if any_partial else None, causal)

    @classmethod
    def from_mask_mod(cls, mask_mod: MaskMod, *, batch: int = 1, heads: int = 1, len_q: int, len_k: int,
                      block: int = 128, causal: bool = False, device=None) -> "BlockLayout":
        """FlexAttention's ``create_block_mask``: evaluate ``mask_mod`` block by block.

        ``batch``/``heads`` = 1 share the layout (then ``mask_mod`` must not
        depend on b/h). Evaluates every (query, key) pair in chunks, O(Nq·Nk)
        time and O(chunk) memory, never an Nq×Nk mask.
        """
        check_mask_mod(mask_mod)
        for name, val in (("batch", batch), ("heads", heads), ("len_q", len_q), ("len_k", len_k), ("block", block)):
            _check_positive(name, val)
        nq, nkb = -(-len_q // block), -(-len_k // block)
        cand = torch.arange(nkb, device=device).expand(batch, heads, nq, nkb)
        if causal:
            _, last = query_block_positions(len_q, len_k, block, device)
            cand = torch.where(cand * block <= last.view(-1, 1), cand, torch.full_like(cand, -1))
        return cls.from_candidates(cand, mask_mod, block_q=block, block_k=block, len_q=len_q, len_k=len_k,
                                   causal=causal)

    # ------------------------------------------------------------ views
    def block_mask(self) -> torch.Tensor:
        """Dense block-level mask ``(Bl, Hl, nq, nk_blocks)`` bool (True = block read)."""
        Bl, Hl, nq, S = self.kv_blocks.shape
        dense = torch.zeros(Bl, Hl, nq, self.n_k_blocks + 1, dtype=torch.bool, device=self.kv_blocks.device)
        idx = torch.where(self.kv_blocks >= 0, self.kv_blocks, torch.full_like(self.kv_blocks, self.n_k_blocks))
        dense.scatter_(-1, idx, True)
        return dense[..., :-1]

    def density(self, causal: bool | None = None) -> float:
        """Fraction of (query, key) pairs inside the blocks read (of the causal triangle when causal)."""
        causal = bool(self.causal) if causal is None else causal
        first, last = query_block_positions(self.len_q, self.len_k, self.block_q, self.kv_blocks.device)
        rows = (last - first + 1).view(1, 1, -1, 1)
        read = torch.where(self.kv_blocks >= 0, rows * self.block_k, torch.zeros_like(self.kv_blocks))
        total = (torch.arange(self.len_q) + self.len_k - self.len_q + 1).clamp(0, self.len_k).sum() if causal \
            else self.len_q * self.len_k
        Bl, Hl = self.kv_blocks.shape[:2]
        return min(1.0, float(read.sum()) / (float(total) * Bl * Hl))


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Explicit key tokens per group of ``group`` consecutive query rows (B2g).

    ``kv_tokens``: ``(Bl, Hl, ng, T)`` int64 key indices, ``-1`` = none, with
    ``ng = ceil(len_q / group)``, or ``(Bl, Hl, 1, T)``: the same tokens for every
    group (shared columns, stored once); the indices of a row must be distinct (a
    repeat is counted twice). An optional ``mask_mod`` filters elements. ``skip``:
    a block layout (``block_q == group``) whose key blocks a group does not read
    its tokens in (what :meth:`excluding` keeps for shared tokens instead of a
    per-group copy). The executor reads ``slot`` tokens per batched matmul.
    """

    kv_tokens: torch.Tensor
    group: int
    len_q: int
    len_k: int
    mask_mod: MaskMod | None = None
    slot: int = 128
    skip: BlockLayout | None = None

    def __post_init__(self) -> None:
        _check_positive("token_layout.group", self.group)
        _check_positive("token_layout.slot", self.slot)
        t = self.kv_tokens
        ng = -(-self.len_q // self.group)
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != torch.int64 or t.shape[2] not in (ng, 1):
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttnZooError(f"token_layout.kv_tokens: expected an int64 tensor (Bl, Hl, {ng} or 1, T) "
                               f"(ng = ceil(len_q / group); 1: shared by every group), got {got}")
        if t.numel() and (int(t.max()) >= self.len_k or int(t.min()) < -1):
            raise AttnZooError(f"token_layout.kv_tokens: expected indices in [-1, {self.len_k - 1}], got "
                               f"[{int(t.min())}, {int(t.max())}]")
        if self.mask_mod is not None:
            check_mask_mod(self.mask_mod, "token_layout.mask_mod")
        if self.skip is not None:
            self._check_blocks(self.skip)

    def _check_blocks(self, layout: BlockLayout) -> None:
        if layout.block_q != self.group or layout.len_q != self.len_q or layout.len_k != self.len_k:
            raise AttnZooError(f"layout: expected block_q={self.group}, len_q={self.len_q}, len_k={self.len_k} "
                               f"to match the token layout, got {layout.block_q}, {layout.len_q}, {layout.len_k}")

    @property
    def shared(self) -> bool:
        """Whether every query group reads one stored token row (``kv_tokens`` of shape ``(Bl, Hl, 1, T)``)."""
        return self.kv_tokens.shape[2] == 1 and self.len_q > self.group

    def excluding(self, layout: BlockLayout) -> "TokenLayout":
        """Drop the tokens whose key block ``layout`` already reads for the same query group.

        Makes the two key sets disjoint so their results merge exactly
        (requires ``group == layout.block_q``). Shared tokens stay shared: ``layout``
        becomes their ``skip``.
        """
        self._check_blocks(layout)
        if self.shared and self.skip is None:
            return dataclasses.replace(self, skip=layout)
        member = layout.block_mask()
        tok = self.per_group().kv_tokens
        shape = torch.broadcast_shapes(member.shape[:2], tok.shape[:2])
        member = member.expand(*shape, *member.shape[2:])
        tok = tok.expand(*shape, *tok.shape[2:])
        read = torch.gather(member, -1, tok.clamp(min=0) // layout.block_k)  # padding (-1) looks up block 0
        keep = (tok >= 0) & ~read
        return TokenLayout(compact(keep, tok), self.group, self.len_q, self.len_k, self.mask_mod, self.slot)

    def per_group(self) -> "TokenLayout":
        """The same layout as one token row per query group, without ``skip`` (for the executors that read
        ``kv_tokens`` row by row)."""
        if not self.shared and self.skip is None:
            return self
        ng = -(-self.len_q // self.group)
        tok = self.kv_tokens.expand(-1, -1, ng, -1)
        plain = TokenLayout(tok.contiguous(), self.group, self.len_q, self.len_k, self.mask_mod, self.slot)
        return plain if self.skip is None else plain.excluding(self.skip)

    def tokens_read(self, causal: bool) -> torch.Tensor:
        """``(Bl, Hl, ng)``: the tokens each query group reads (causal: those its last row may see)."""
        ng = -(-self.len_q // self.group)
        last = torch.arange(1, ng + 1, device=self.kv_tokens.device) * self.group - 1
        last = last.clamp(max=self.len_q - 1) + (self.len_k - self.len_q)  # each group's last position
        limit = last + 1 if causal else torch.full_like(last, self.len_k)
        if not self.shared:
            tok = self.per_group().kv_tokens
            return ((tok >= 0) & (tok < limit.view(-1, 1))).sum(-1)
        # shared: #tokens below a bound by a search in the sorted row, less those in the skipped blocks
        srt = torch.sort(torch.where(self.kv_tokens[:, :, 0] >= 0, self.kv_tokens[:, :, 0], self.len_k), -1).values

        def below(x: torch.Tensor) -> torch.Tensor:  # (Bl', Hl', ...) -> #tokens < x per row
            lead = torch.broadcast_shapes(srt.shape[:2], x.shape[:2])
            flat = x.expand(*lead, *x.shape[2:]).reshape(*lead, -1)
            return torch.searchsorted(srt.expand(*lead, -1).contiguous(), flat.contiguous()).view(*lead, *x.shape[2:])

        read = below(limit.view(1, 1, -1).clamp(min=0))
        if self.skip is not None:
            blk = self.skip.kv_blocks
            lo = (blk * self.skip.block_k).clamp(min=0)
            hi = torch.minimum(lo + self.skip.block_k, limit.view(1, 1, -1, 1))
            inside = torch.where((blk >= 0) & (hi > lo), below(hi) - below(lo), 0).sum(-1)
            read = read - inside
        return read

    def union(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layout head, the sorted keys any query group reads and which of them each group reads.

        Returns ``keys (Bl, Hl, T)`` (``-1`` padded) and ``member (Bl, Hl, ng, T)``
        bool. When the groups share most of their keys (vertical columns), ``T``
        stays near the longest row and one dense attention over ``keys`` per head
        replaces the per-group gather.
        """
        if self.shared or self.skip is not None:
            return self.per_group().union()
        tok = self.kv_tokens.flatten(2)  # (Bl, Hl, ng·S)
        srt = torch.sort(tok, dim=-1).values
        first = srt >= 0
        first[..., 1:] &= srt[..., 1:] != srt[..., :-1]
        keys = compact(first, srt)
        sentinel = torch.where(keys >= 0, keys, torch.full_like(keys, self.len_k))  # sorted for the search
        pos = torch.searchsorted(sentinel, tok.clamp(min=0))
        pos = torch.where(tok >= 0, pos, torch.full_like(pos, keys.shape[-1]))  # unused slots: a spare column
        member = torch.zeros(*self.kv_tokens.shape[:3], keys.shape[-1] + 1, dtype=torch.bool, device=tok.device)
        member.scatter_(-1, pos.view(self.kv_tokens.shape), True)
        return keys, member[..., :-1]


Layout = BlockLayout | TokenLayout


def reusable(layouts: list[Layout]) -> list[Layout]:
    """``layouts`` for reuse across calls: block layouts then cache their element masks and band plans."""
    return [dataclasses.replace(lay, reuse=True) if isinstance(lay, BlockLayout) else lay for lay in layouts]


def sink_window_layouts(len_q: int, len_k: int, *, sinks: int, window: int, block: int, causal: bool,
                        device=None) -> list[Layout]:
    """StreamingLLM's pattern: query ``i`` sees keys ``j`` with ``|i + Nk - Nq - j| < window`` and the first
    ``sinks`` keys (∩ causal in the executor).

    Two disjoint layouts merged by lse: the band alone is banded (it runs on the
    fused band path) and the few sink keys outside it are a token layout. The
    ``streaming`` method and the KV cache's streaming read (sinks + window over
    the held slots) both attend with them.
    """
    off = len_k - len_q
    band = band_blocks(len_q, len_k, block, window - 1, window - 1, causal, device)

    def in_band(b, h, qi, kj):
        return (qi + off - kj).abs() < window

    layouts: list[Layout] = [BlockLayout.from_candidates(band.view(1, 1, *band.shape), in_band, block_q=block,
                                                         block_k=block, len_q=len_q, len_k=len_k, causal=causal)]
    n_sink = min(sinks, len_k)
    if n_sink:  # the few sink keys every query block reads, as tokens (those inside the band are masked)
        tokens = torch.arange(n_sink, device=device).expand(1, 1, band.shape[0], n_sink)
        layouts.append(TokenLayout(tokens, block, len_q, len_k, lambda b, h, qi, kj: ~in_band(b, h, qi, kj)))
    return layouts


def check_layout(layout: Layout, *, batch: int, heads_q: int, heads_kv: int, len_q: int, len_k: int,
                 causal: bool) -> tuple[int, int]:
    """Refuse a layout that does not fit these inputs; returns its (batch, head) dims."""
    lb, lh = (layout.kv_blocks if isinstance(layout, BlockLayout) else layout.kv_tokens).shape[:2]
    if lb not in (1, batch):
        raise AttnZooError(f"layout: expected batch dim 1 or {batch}, got {lb}")
    if lh not in (1, heads_kv, heads_q):
        raise AttnZooError(f"layout: expected head dim 1, {heads_kv} (KV heads) or {heads_q} (query heads), "
                           f"got {lh}")
    if (layout.len_q, layout.len_k) != (len_q, len_k):
        raise AttnZooError(f"layout: expected len_q={len_q}, len_k={len_k} (the shapes of q and k), got "
                           f"len_q={layout.len_q}, len_k={layout.len_k}")
    if isinstance(layout, BlockLayout) and layout.causal and not causal:
        raise AttnZooError("layout: was built for causal=True (blocks above the diagonal pruned), "
                           "got causal=False")
    return lb, lh


# ------------------------------------------------------------------ banded block layouts
@dataclass(frozen=True, eq=False)
class SubBlock:
    """Rows ``[row, row + rows)`` of every interior query block read window columns ``[col, col + cols)``."""

    row: int
    rows: int
    col: int
    mask: torch.Tensor  # (rows, cols) bool

    @property
    def cols(self) -> int:
        return self.mask.shape[-1]


@dataclass(frozen=True, eq=False)
class BandPlan:
    """Where each query block's key window starts, and the element masks over the windows.

    Query block ``i`` reads keys ``[(i + start) · block, (i + start + width) · block)``
    (positions outside ``[0, Nk)`` are masked). The ``interior`` query blocks
    (a slice or an index tensor) are whole, have their window inside the keys
    and share the mask ``shared (block, L)``; the ``special`` ones carry
    ``special_mask (ns, block, L)``. ``empty_rows (nq, block)`` marks query
    rows that see no key (their result is ``(0, -inf)``). ``parts`` cut the
    interior blocks' rows into the sub-blocks the kernel runs, each over the
    narrower run of window columns its rows see.
    """

    block: int
    start: int
    width: int
    n_q: int
    interior: slice | torch.Tensor
    shared: torch.Tensor
    special: torch.Tensor
    special_mask: torch.Tensor
    empty_rows: torch.Tensor
    parts: tuple[SubBlock, ...] = ()

    @property
    def window(self) -> int:
        return self.width * self.block

    @property
    def any_empty(self) -> bool:
        return bool(self.empty_rows.any())


def band_plan(layout: BlockLayout, causal: bool) -> BandPlan | None:
    """The :class:`BandPlan` of ``layout`` when it is banded and shared by all batches and heads, else None.

    Costs one evaluation of the layout's element mask over the windows,
    O(Nq · window); the executor caches the plan of static layouts.
    """
    kv = layout.kv_blocks
    if layout.block_q != layout.block_k or kv.shape[:2] != (1, 1) or kv.shape[-1] == 0:
        return None
    kv = kv[0, 0]
    valid = kv >= 0
    count = valid.sum(-1)
    rows = count > 0
    if not bool(rows.any()):
        return None
    lo = torch.where(valid, kv, torch.full_like(kv, layout.n_k_blocks)).amin(-1)
    hi = torch.where(valid, kv, torch.full_like(kv, -1)).amax(-1)
    if not bool(((hi - lo + 1 == count) | ~rows).all()):
        return None  # a row with a gap
    index = torch.arange(kv.shape[0], device=kv.device)
    start = int((lo - index)[rows].min())
    width = int((hi - index)[rows].max()) - start + 1
    if width > int(count.max()) + 1:
        return None  # rows drift: one window for all of them would read far more keys than the layout
    return _element_masks(layout, causal, kv, lo, hi, start, width)


def _element_masks(layout: BlockLayout, causal: bool, kv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   start: int, width: int) -> BandPlan:
    """Evaluate the visibility of every window element, keeping one shared mask and the blocks that differ."""
    b, nq, dev = layout.block_q, kv.shape[0], kv.device
    partial = _partial_in_window(layout, kv, start, width)
    window = torch.arange(width * b, device=dev)
    rows = torch.arange(b, device=dev)

    def visible(blocks: torch.Tensor) -> torch.Tensor:  # (n,) query blocks -> (n, b, L) bool
        q_idx = (blocks.view(-1, 1) * b + rows).unsqueeze(-1)  # (n, b, 1)
        k_idx = ((blocks + start) * b).view(-1, 1, 1) + window  # (n, 1, L)
        ok = ((q_idx < layout.len_q) & (k_idx >= lo[blocks].view(-1, 1, 1) * b)
              & (k_idx < (hi[blocks] + 1).view(-1, 1, 1) * b) & (k_idx < layout.len_k))
        if causal:
            ok = ok & (k_idx <= q_idx + layout.len_k - layout.len_q)
        if layout.mask_mod is not None:
            zero = torch.zeros(1, 1, 1, dtype=torch.long, device=dev)
            mm = call_mask_mod(layout.mask_mod, zero, zero, q_idx.clamp(max=layout.len_q - 1),
                               k_idx.clamp(0, layout.len_k - 1))
            whole = ~partial[blocks].repeat_interleave(b, dim=-1).unsqueeze(1)  # (n, 1, L)
            ok = ok & (mm | whole)
        return ok

    # blocks the strided view may serve: whole query blocks whose window lies inside the keys
    first = max(0, -start)
    last = min(nq - 1 if layout.len_q % b == 0 else nq - 2, layout.len_k // b - start - width)
    shared = visible(torch.tensor([(first + last) // 2 if first <= last else 0], device=dev))[0]
    special, special_mask = [], []
    step = max(1, MASK_CHUNK // (b * width * b))
    for n0 in range(0, nq, step):
        blocks = torch.arange(n0, min(nq, n0 + step), device=dev)
        mask = visible(blocks)
        differ = (mask != shared).flatten(1).any(1) | (blocks < first) | (blocks > last)
        if bool(differ.any()):
            special.append(blocks[differ])
            special_mask.append(mask[differ])
    special_t = torch.cat(special) if special else torch.zeros(0, dtype=torch.long, device=dev)
    special_m = torch.cat(special_mask) if special_mask else shared.new_zeros(0, *shared.shape)
    empty = (~shared.any(-1)).expand(nq, b).clone()
    empty[special_t] = ~special_m.any(-1)
    is_interior = torch.ones(nq, dtype=torch.bool, device=dev)
    is_interior[special_t] = False
    return BandPlan(b, start, width, nq, _as_slice(is_interior.nonzero().squeeze(-1)), shared, special_t,
                    special_m, empty, _sub_blocks(shared))


def _sub_blocks(shared: torch.Tensor) -> tuple[SubBlock, ...]:
    """Cut the rows of ``shared (block, L)`` into the sub-blocks that compute the fewest scores.

    A causal window's rows each see a run of columns that moves with the row,
    so halving the rows of a kernel call narrows its key window: with block
    128 and window 512 the kernel computes 639 keys per row at 128 rows, 575
    at 64 and 543 at 32. Sub-blocks stop at 32 rows, where per-call overhead
    starts to outweigh the saving. Rows that see nothing are left out.
    """
    b = shared.shape[0]
    best, best_cost = (), None
    size = b
    while True:
        parts = []
        for row in range(0, b, size):
            seen = shared[row:row + size].any(0).nonzero().squeeze(-1)
            if seen.numel():
                col, end = int(seen[0]), int(seen[-1]) + 1
                parts.append(SubBlock(row, size, col, shared[row:row + size, col:end]))
        cost = sum(p.rows * p.cols for p in parts)
        if best_cost is None or cost < best_cost:
            best, best_cost = tuple(parts), cost
        if size % 2 or size // 2 < 32:
            return best
        size //= 2


def _partial_in_window(layout: BlockLayout, kv: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """``(nq, width)`` bool: window block ``c`` of query block ``i`` is a partial block of the layout."""
    nq = kv.shape[0]
    table = torch.zeros(nq, width + 1, dtype=torch.bool, device=kv.device)
    if layout.partial is None:
        return table[:, :width]
    pos = kv - (torch.arange(nq, device=kv.device).view(-1, 1) + start)
    pos = torch.where(kv >= 0, pos, torch.full_like(pos, width))  # unused slots land in the spare column
    table.scatter_(-1, pos, layout.partial[0, 0])
    return table[:, :width]


def _as_slice(idx: torch.Tensor) -> slice | torch.Tensor:
    """Sorted indices as a slice when they are contiguous (indexing then gives a view, no copy)."""
    if idx.numel() == 0:
        return slice(0, 0)
    if int(idx[-1] - idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx

