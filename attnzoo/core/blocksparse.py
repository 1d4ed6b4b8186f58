"""Block-sparse and token-gather attention: one layout format, one executor (docs/methods.md, Engines).

A :class:`BlockLayout` says, per (batch, head, query block), which key blocks
the block reads: a padded row list ``kv_blocks (Bl, Hl, nq, S)`` (``-1`` =
empty slot; the ELL form of a CSR matrix, so every row has ``S`` slots) and a
``partial`` flag for blocks whose elements need the layout's ``mask_mod``.
Blocks without the flag are attended whole (only causality, the key tail and
padding are masked, and only where a block touches them). A
:class:`TokenLayout` lists explicit key tokens per group of query rows
(vertical columns, sampled or top-k tokens).

:func:`attend` runs either layout: for each slot it gathers the selected key
blocks of *every* query block with one index, does one batched matmul over
all query blocks and folds the result into an online softmax, so the cost is
O(N · S · block · D) with Python looping only over the ``S`` slots. GQA reads
the shared KV head without repeating K/V: a layout shared by a KV head's
query group folds the group into the query rows. The backward pass recomputes
the probabilities slot by slot from the saved log-sum-exp (as
:func:`attnzoo.core.exact.tiled_backward` does), so training memory stays
O(N · D). Results over disjoint key sets merge exactly by lse
(:func:`attend_all`).

``mask_mod(b, h, q_idx, kv_idx) -> bool`` follows FlexAttention: ``q_idx`` is
the query index ``0..Nq-1``, ``kv_idx`` the key index, ``h`` the layout's head
(query head when the layout has ``Hq`` heads, KV head when it has ``Hkv``, 0
when shared). It must be elementwise: it is called on broadcastable index
tensors, never on Python ints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import AttnZooError, UnsupportedError
from .fused import attend_band, attend_token_union, band_plan, fix_empty_rows, fused_applies, fused_kernel
from .masks import MaskMod, call_mask_mod, check_mask_mod
from .override import Override
from .partial import OnlineSoftmax, Partial, grad_inputs, grad_step, merge
from .scoremod import ModHook, ScoreMod

#: :func:`attend`'s replacement inside ``LAYOUT_ENGINE.use(impl)`` (a kernel backend; no custom query positions)
LAYOUT_ENGINE = Override("attnzoo_layout_engine")
#: elements of one mask evaluation chunk when building layouts (bounds peak memory)
_BUILD_CHUNK = 1 << 24
#: keys a query block reads per executor pass (key blocks are grouped up to this width)
_PASS_KEYS = 1024
#: gathered key/value/mask elements per chunk of query blocks on the fused path (bounds its memory)
_FUSED_CHUNK = 1 << 24


# ------------------------------------------------------------------ checks
def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttnZooError(f"{name}: expected a positive int, got {value!r}")
    return value


def _compact(keep: torch.Tensor, values: torch.Tensor, *extra: torch.Tensor):
    """Move the kept entries of ``values (..., C)`` to the front, ``-1`` after, trimmed to the longest row.

    ``extra`` tensors of the same shape are reordered alongside (False where not kept).
    """
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    order = order[..., :width]
    kept = torch.gather(keep, -1, order)
    vals = torch.where(kept, torch.gather(values, -1, order), torch.full_like(order, -1))
    if not extra:
        return vals
    return (vals, *(torch.gather(e, -1, order) & kept for e in extra))


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
        blocks = _compact(blocks >= 0, blocks)
        partial = None if mask_mod is None else blocks >= 0
        return cls(blocks, block_q, block_k, len_q, len_k, partial, mask_mod, causal)

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, *, block_q: int, block_k: int, len_q: int, len_k: int,
                        causal: bool | None = None) -> "BlockLayout":
        """A layout from a dense block-level bool mask ``(Bl, Hl, nq, nk_blocks)`` (True = read)."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 4 or block_mask.dtype != torch.bool:
            raise AttnZooError("block_mask: expected a bool tensor (Bl, Hl, nq, nk_blocks)")
        cols = torch.arange(block_mask.shape[-1], device=block_mask.device).expand_as(block_mask)
        return cls(_compact(block_mask, cols), block_q, block_k, len_q, len_k, None, None, causal)

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
        cand = _compact(cand >= 0, cand)
        Bl, Hl, nq, C = cand.shape
        dev = cand.device
        keep = torch.zeros(cand.shape, dtype=torch.bool, device=dev)
        partial = torch.zeros_like(keep)
        qa = torch.arange(block_q, device=dev)
        ka = torch.arange(block_k, device=dev)
        b = torch.arange(Bl, device=dev).view(Bl, 1, 1, 1, 1, 1)
        h = torch.arange(Hl, device=dev).view(1, Hl, 1, 1, 1, 1)
        step = max(1, _BUILD_CHUNK // max(1, Bl * Hl * C * block_q * block_k))
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
        blocks, flags = _compact(keep, cand, partial)
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
    ``ng = ceil(len_q / group)``; the indices of a row must be distinct (a repeat
    is counted twice). An optional ``mask_mod`` filters elements.
    The executor reads ``slot`` tokens per batched matmul.
    """

    kv_tokens: torch.Tensor
    group: int
    len_q: int
    len_k: int
    mask_mod: MaskMod | None = None
    slot: int = 128

    def __post_init__(self) -> None:
        _check_positive("token_layout.group", self.group)
        _check_positive("token_layout.slot", self.slot)
        t = self.kv_tokens
        ng = -(-self.len_q // self.group)
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype != torch.int64 or t.shape[2] != ng:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttnZooError(f"token_layout.kv_tokens: expected an int64 tensor (Bl, Hl, {ng}, T) "
                               f"(ng = ceil(len_q / group)), got {got}")
        if t.numel() and (int(t.max()) >= self.len_k or int(t.min()) < -1):
            raise AttnZooError(f"token_layout.kv_tokens: expected indices in [-1, {self.len_k - 1}], got "
                               f"[{int(t.min())}, {int(t.max())}]")
        if self.mask_mod is not None:
            check_mask_mod(self.mask_mod, "token_layout.mask_mod")

    def excluding(self, layout: BlockLayout) -> "TokenLayout":
        """Drop the tokens whose key block ``layout`` already reads for the same query group.

        Makes the two key sets disjoint so their results merge exactly
        (requires ``group == layout.block_q``).
        """
        if layout.block_q != self.group or layout.len_q != self.len_q or layout.len_k != self.len_k:
            raise AttnZooError(f"layout: expected block_q={self.group}, len_q={self.len_q}, len_k={self.len_k} "
                               f"to match the token layout, got {layout.block_q}, {layout.len_q}, {layout.len_k}")
        member = layout.block_mask()
        tok = self.kv_tokens
        shape = torch.broadcast_shapes(member.shape[:2], tok.shape[:2])
        member = member.expand(*shape, *member.shape[2:])
        tok = tok.expand(*shape, *tok.shape[2:])
        blk = torch.where(tok >= 0, tok // layout.block_k, torch.zeros_like(tok))
        read = torch.gather(member, -1, blk) & (tok >= 0)
        keep = (tok >= 0) & ~read
        return TokenLayout(_compact(keep, tok), self.group, self.len_q, self.len_k, self.mask_mod, self.slot)

    def union(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layout head, the sorted keys any query group reads and which of them each group reads.

        Returns ``keys (Bl, Hl, T)`` (``-1`` padded) and ``member (Bl, Hl, ng, T)``
        bool. When the groups share most of their keys (vertical columns), ``T``
        stays near the longest row and one dense attention over ``keys`` per head
        replaces the per-group gather.
        """
        tok = self.kv_tokens.flatten(2)  # (Bl, Hl, ng·S)
        srt = torch.sort(tok, dim=-1).values
        first = srt >= 0
        first[..., 1:] &= srt[..., 1:] != srt[..., :-1]
        keys = _compact(first, srt)
        sentinel = torch.where(keys >= 0, keys, torch.full_like(keys, self.len_k))  # sorted for the search
        pos = torch.searchsorted(sentinel, tok.clamp(min=0))
        pos = torch.where(tok >= 0, pos, torch.full_like(pos, keys.shape[-1]))  # unused slots: a spare column
        member = torch.zeros(*self.kv_tokens.shape[:3], keys.shape[-1] + 1, dtype=torch.bool, device=tok.device)
        member.scatter_(-1, pos.view(self.kv_tokens.shape), True)
        return keys, member[..., :-1]


Layout = BlockLayout | TokenLayout


# ----------------------------------------------------------------- executor
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


class _Plan:
    """Everything one executor call needs besides q/k/v: the layout as slots of key units."""

    def __init__(self, layout: Layout, *, batch: int, heads_q: int, heads_kv: int, len_q: int, len_k: int,
                 scale: float, causal: bool, q_positions: torch.Tensor | None, device,
                 mod: ModHook | None = None) -> None:
        self.mod = mod
        lb, lh = check_layout(layout, batch=batch, heads_q=heads_q, heads_kv=heads_kv, len_q=len_q, len_k=len_k,
                              causal=causal)
        self.scale, self.causal, self.len_q, self.len_k = scale, causal, len_q, len_k
        self.heads_q, self.heads_kv = heads_q, heads_kv
        groups = heads_q // heads_kv
        self.gl = groups if (lh == heads_q and groups > 1) else 1  # query heads with their own layout rows
        h1 = 1 if lh == 1 else heads_kv
        self.mask_mod = layout.mask_mod
        if isinstance(layout, BlockLayout):
            self.rows, self.unit = layout.block_q, layout.block_k
            # several key blocks per pass (up to _PASS_KEYS keys): fewer, larger matmuls and rescales
            n_slots = layout.kv_blocks.shape[-1]
            n_pass = max(1, -(-n_slots * layout.block_k // _PASS_KEYS))
            per_pass = -(-n_slots // n_pass) if n_slots else 1
            extra = n_pass * per_pass - n_slots
            shape = (lb, h1, self.gl, layout.n_q_blocks, n_pass, per_pass)
            units = F.pad(layout.kv_blocks, (0, extra), value=-1).reshape(shape)
            self.partial = None if layout.partial is None else F.pad(layout.partial, (0, extra)).reshape(shape)
            self.always_mask = False
            self.mask_cache = layout.mask_cache
        else:
            self.mask_cache = None
            self.rows, self.unit = layout.group, 1
            tok = layout.kv_tokens
            per_slot = max(1, min(layout.slot, tok.shape[-1]))
            width = -(-tok.shape[-1] // per_slot) * per_slot
            tok = F.pad(tok, (0, width - tok.shape[-1]), value=-1)
            units = tok.reshape(lb, h1, self.gl, tok.shape[2], -1, per_slot)
            self.partial = None
            self.always_mask = True
        self.units = units  # (Bl, H1, Gl, nq, S, U)
        self.n_q = units.shape[3]
        self.n_units = -(-len_k // self.unit)
        self.head_of_layout = lh
        self.custom_positions = q_positions is not None
        if q_positions is None:
            pos = torch.arange(self.n_q * self.rows, device=device) + (len_k - len_q)
            pos = pos.view(1, 1, 1, self.n_q, self.rows).repeat(1, 1, 1, 1, groups // self.gl)
        else:
            qp = q_positions.to(device=device, dtype=torch.long)
            qp = qp.expand(qp.shape[0], heads_q, qp.shape[2]).unsqueeze(-1)
            pos = self.to_rows(qp).squeeze(-1)
        self.q_pos = pos  # (Bp, Hkv|1, Gl, nq, R)
        self.q_block_first = pos.amin(-1)

    # ------------------------------------------------------------ layout of rows
    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, N, X)`` -> ``(B, Hkv, Gl, nq, R, X)``: query rows grouped by query block."""
        B, Hq, N, X = t.shape
        pad = self.n_q * self.rows - N
        if pad:
            t = F.pad(t, (0, 0, 0, pad))
        gr = Hq // self.heads_kv // self.gl
        t = t.reshape(B, self.heads_kv, self.gl, gr, self.n_q, self.rows, X).transpose(3, 4)
        return t.reshape(B, self.heads_kv, self.gl, self.n_q, gr * self.rows, X)

    def from_rows(self, t: torch.Tensor) -> torch.Tensor:
        B, _, _, nq, R, X = t.shape
        gr = R // self.rows
        t = t.reshape(B, self.heads_kv, self.gl, nq, gr, self.rows, X).transpose(3, 4)
        return t.reshape(B, self.heads_q, nq * self.rows, X)[:, :, :self.len_q]

    # ------------------------------------------------------------ one slot
    def mod_index(self, u: torch.Tensor, batch: int):
        """``(b, h, q_idx, kv_idx)`` of the score_mod, broadcastable to a slot's scores ``(B, Hkv, Gl, nq, R, W)``:
        query heads ``h`` (rows are ``gr`` query heads of ``rows`` positions), key positions of the units ``u``."""
        dev = u.device
        gr, R = self.heads_q // self.heads_kv // self.gl, self.q_pos.shape[-1]
        head = (torch.arange(self.heads_kv, device=dev).view(-1, 1) * self.gl + torch.arange(self.gl, device=dev))
        h = head.view(1, self.heads_kv, self.gl, 1, 1, 1) * gr + (torch.arange(R, device=dev) // self.rows).view(
            1, 1, 1, 1, R, 1)
        kpos = (u.unsqueeze(-1) * self.unit + torch.arange(self.unit, device=dev)).flatten(-2)
        return (torch.arange(batch, device=dev).view(batch, 1, 1, 1, 1, 1), h,
                self.q_pos.clamp(max=self.len_k - 1).unsqueeze(-1), kpos.clamp(0, self.len_k - 1).unsqueeze(-2))

    def flat_index(self, u: torch.Tensor, batch: int) -> torch.Tensor:
        """Row indices into the ``(B·Hkv·n_units, unit·X)`` view of K or V: ``(B, Hkv, Gl, n, U)``."""
        b = torch.arange(batch, device=u.device).view(batch, 1, 1, 1, 1) * self.heads_kv
        h = torch.arange(self.heads_kv, device=u.device).view(1, -1, 1, 1, 1)
        return ((b + h) * self.n_units + u.clamp(min=0)).expand(batch, self.heads_kv, self.gl, u.shape[3], -1)

    def slot_mask(self, s: int, u: torch.Tensor, pad_flat: torch.Tensor | None, batch: int):
        """Element mask of slot ``s`` (True = visible), the query blocks it covers, and empty slots.

        Returns ``(mask, rows, empty)``: ``mask (.., n, R, W)`` or None when no
        element mask is needed; ``rows`` the query blocks the mask covers (None
        = all, the others are all visible); ``empty (.., nq)`` or None, the
        blocks whose slot is unused.
        """
        rows = None
        if not self.always_mask and pad_flat is None and not self.custom_positions:
            first_key = u * self.unit  # (.., nq, U)
            empty_unit = u < 0
            need = (first_key + self.unit > self.len_k) & ~empty_unit
            if self.causal:
                need = need | (first_key + self.unit - 1 > self.q_block_first.unsqueeze(-1)) & ~empty_unit
            if self.partial is not None:
                need = need | self.partial[..., s, :]
            empty = empty_unit.all(-1)
            need = need.any(-1) | (empty_unit.any(-1) & ~empty)  # a pass partly padded needs element masks
            need = need.flatten(0, -2).any(0)  # (nq,)
            n_need = int(need.sum())
            empty = empty if bool(empty.any()) else None
            if n_need == 0:
                return None, None, empty
            if n_need < 0.75 * need.numel():
                rows = need.nonzero().squeeze(-1)
            key = (s, self.causal, self.heads_q, self.heads_kv)
            if self.mask_cache is not None and key in self.mask_cache:
                return self.mask_cache[key], rows, empty
            mask = self.element_mask(u if rows is None else u[:, :, :, rows], rows, pad_flat, batch)
            if self.mask_cache is not None:
                self.mask_cache[key] = mask
            return mask, rows, empty
        return self.element_mask(u, None, pad_flat, batch), None, None

    def element_mask(self, u: torch.Tensor, rows: torch.Tensor | None, pad_flat: torch.Tensor | None,
                     batch: int) -> torch.Tensor:
        """Visibility ``(.., n, R, W)`` of the units ``u (.., n, U)`` for query blocks ``rows`` (None = all)."""
        q_pos = self.q_pos if rows is None else self.q_pos[:, :, :, rows]
        kpos = (u.unsqueeze(-1) * self.unit + torch.arange(self.unit, device=u.device)).flatten(-2)
        ok = (kpos >= 0) & (kpos < self.len_k)
        kclamp = kpos.clamp(0, self.len_k - 1)
        if pad_flat is not None:
            boff = torch.arange(batch, device=u.device).view(batch, 1, 1, 1, 1) * self.len_k
            ok = ok & pad_flat[boff + kclamp]
        ok = ok.unsqueeze(-2)  # (.., n, 1, W)
        if self.causal:
            ok = ok & (kpos.unsqueeze(-2) <= q_pos.unsqueeze(-1))
        if self.mask_mod is not None:
            dev = u.device
            lb = u.shape[0]
            b = torch.arange(lb, device=dev).view(lb, 1, 1, 1, 1, 1)
            if self.head_of_layout == 1:
                h = torch.zeros(1, 1, 1, 1, 1, 1, dtype=torch.long, device=dev)
            elif self.gl > 1 or self.head_of_layout == self.heads_q:
                h = (torch.arange(self.heads_kv, device=dev).view(-1, 1) * self.gl
                     + torch.arange(self.gl, device=dev)).view(1, self.heads_kv, self.gl, 1, 1, 1)
            else:
                h = torch.arange(self.heads_kv, device=dev).view(1, -1, 1, 1, 1, 1)
            q_idx = (q_pos - (self.len_k - self.len_q)).clamp(0, self.len_q - 1).unsqueeze(-1)
            ok = ok & call_mask_mod(self.mask_mod, b, h, q_idx, kclamp.unsqueeze(-2))
        return ok


def _apply_mask(sc: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None,
                empty: torch.Tensor | None) -> None:
    """Set invisible scores of ``sc (.., nq, R, W)`` to -inf in place.

    ``mask`` covers the query blocks ``rows`` (None = all); ``empty (.., nq)``
    marks whole empty slots (padding of shorter layout rows).
    """
    if empty is not None:
        sc.masked_fill_(empty[..., None, None], -math.inf)
    if mask is None:
        return
    if rows is None:
        sc.masked_fill_(~mask, -math.inf)
    else:
        sc[:, :, :, rows] = sc[:, :, :, rows].masked_fill_(~mask, -math.inf)


def _gather(units_view: torch.Tensor, flat: torch.Tensor, width: int) -> torch.Tensor:
    """Gather key units ``flat (B, Hkv, Gl, nq, U)`` from ``units_view`` as ``(B, Hkv, Gl, nq, U·unit, X)``."""
    g = units_view.index_select(0, flat.reshape(-1))
    return g.view(*flat.shape[:-1], width, -1)


def _unit_view(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``(B, Hkv, Nk, X)`` padded to whole units, as ``(B·Hkv·n_units, unit·X)``."""
    pad = plan.n_units * plan.unit - t.shape[2]
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(-1, plan.unit * t.shape[3])


def _slots(plan: _Plan):
    for s in range(plan.units.shape[4]):
        u = plan.units[:, :, :, :, s]
        if bool((u >= 0).any()):
            yield s, u


def _slot_scores(q_rows, k_units, v_units, plan: _Plan, s: int, u: torch.Tensor, pad_flat, batch: int,
                 mod_grads: list | None = None):
    """Scores of the (scaled) query rows against slot ``s``'s keys, modified by the call's score_mod,
    invisible ones at -inf.

    Returns ``(scores, keys, values, flat, to_raw)``: the gathered keys and values of
    the slot, their row indices (where the backward pass scatters dK, dV) and, in the backward
    (``mod_grads`` given) with a score_mod, its ``to_raw`` (see :class:`~attnzoo.core.scoremod.ModHook`).
    """
    flat = plan.flat_index(u, batch)
    width = u.shape[-1] * plan.unit
    kb, vb = _gather(k_units, flat, width), _gather(v_units, flat, width)
    sc = torch.matmul(q_rows, kb.transpose(-1, -2))
    to_raw = None
    if plan.mod is not None:
        idx = plan.mod_index(u, batch)
        sc, to_raw = (plan.mod.scores(sc, *idx), None) if mod_grads is None else plan.mod.recompute(sc, *idx,
                                                                                                   mod_grads)
    _apply_mask(sc, *plan.slot_mask(s, u, pad_flat, batch))
    return sc, kb, vb, flat, to_raw


def _forward(q, k, v, pad, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    B, dim_v = q.shape[0], v.shape[3]
    qb = plan.to_rows(q) * plan.scale
    k_units, v_units = _unit_view(k, plan), _unit_view(v, plan)
    pad_flat = None if pad is None else pad.reshape(-1)
    soft = OnlineSoftmax(qb.shape[:-1], dim_v, like=qb)
    for s, u in _slots(plan):
        sc, _, vb, _, _ = _slot_scores(qb, k_units, v_units, plan, s, u, pad_flat, B)
        soft.add(sc, vb)
    out, lse = soft.result()
    return plan.from_rows(out), plan.from_rows(lse.unsqueeze(-1)).squeeze(-1)


def _backward(q, k, v, pad, out, lse, d_out, d_lse, plan: _Plan, mod_grads: list):
    B = q.shape[0]
    qb = plan.to_rows(q)
    qs = qb * plan.scale
    dob = plan.to_rows(d_out)
    lse_safe, delta = grad_inputs(out, lse, d_out, d_lse)
    delta_r = plan.to_rows(delta.unsqueeze(-1))
    lse_r = plan.to_rows(lse_safe.unsqueeze(-1))
    k_units, v_units = _unit_view(k, plan), _unit_view(v, plan)
    dk_units, dv_units = torch.zeros_like(k_units), torch.zeros_like(v_units)
    dqb = torch.zeros_like(qb)
    pad_flat = None if pad is None else pad.reshape(-1)
    for s, u in _slots(plan):
        sc, kb, vb, flat, to_raw = _slot_scores(qs, k_units, v_units, plan, s, u, pad_flat, B, mod_grads)
        dq_blk, dk_blk, dv_blk = grad_step(sc, lse_r, delta_r, qb, dob, kb, vb, to_raw)
        dqb += dq_blk
        idx = flat.reshape(-1)
        dk_units.index_add_(0, idx, dk_blk.reshape(idx.numel(), -1))
        dv_units.index_add_(0, idx, dv_blk.reshape(idx.numel(), -1))

    def back(t_units, like):
        Bk, H, N, X = like.shape
        return t_units.view(Bk, H, -1, X)[:, :, :N]

    return plan.from_rows(dqb) * plan.scale, back(dk_units, k) * plan.scale, back(dv_units, v)


def _forward_fused(q, k, v, pad, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass of any layout on the fused CPU kernel.

    Per chunk of query blocks: gather every key unit the blocks read (all
    slots at once), build their element mask, and let the kernel attend each
    block to its gathered keys; about twice as fast as the slot loop of
    :func:`_forward`, whose softmax is separate eager passes. Memory is bounded
    by the chunk (``_FUSED_CHUNK`` gathered elements).
    """
    B, D = q.shape[0], q.shape[3]
    qb = plan.to_rows(q)  # (B, Hkv, Gl, nq, R, D)
    lead, (nq, R) = qb.shape[:3], qb.shape[3:5]
    units = plan.units.flatten(-2)  # (Bl, H1, Gl, nq, U): every slot of a query block
    width = units.shape[-1] * plan.unit
    out = qb.new_zeros(qb.shape)
    lse = torch.full(qb.shape[:-1], -math.inf, dtype=torch.promote_types(torch.float32, q.dtype), device=q.device)
    if width == 0:
        return plan.from_rows(out), plan.from_rows(lse.unsqueeze(-1)).squeeze(-1)
    k_units, v_units = _unit_view(k, plan), _unit_view(v, plan)
    pad_flat = None if pad is None else pad.reshape(-1)
    step = max(1, _FUSED_CHUNK // (math.prod(lead) * width * (R + 2 * D)))
    for n0 in range(0, nq, step):
        n1 = min(nq, n0 + step)
        u = units[:, :, :, n0:n1]
        flat = plan.flat_index(u, B)
        kb, vb = _gather(k_units, flat, width), _gather(v_units, flat, width)
        mask = plan.element_mask(u, torch.arange(n0, n1, device=q.device), pad_flat, B)
        heads = lead if math.prod(mask.shape[:3]) > 1 else (1, 1, 1)  # a mask shared by all heads broadcasts
        mask = mask.expand(*heads, n1 - n0, R, width).reshape(-1, n1 - n0, R, width)
        o, l = fused_kernel(qb[:, :, :, n0:n1].reshape(-1, n1 - n0, R, D), kb.reshape(-1, n1 - n0, width, D),
                            vb.reshape(-1, n1 - n0, width, D), mask, plan.scale)
        o, l = fix_empty_rows(o, l, mask)
        out[:, :, :, n0:n1] = o.view(*lead, n1 - n0, R, D)
        lse[:, :, :, n0:n1] = l.view(*lead, n1 - n0, R)
    return plan.from_rows(out), plan.from_rows(lse.unsqueeze(-1)).squeeze(-1)


def _forward_any(q, k, v, pad, plan: _Plan, layout: Layout, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass on the fastest path that can run it (see :mod:`attnzoo.core.fused`)."""
    if not fused:
        return _forward(q, k, v, pad, plan)
    if isinstance(layout, BlockLayout):
        band = _cached_band_plan(layout, plan.causal)
        if band is not None:
            return attend_band(q, k, v, band, scale=plan.scale, key_padding_mask=pad)
    else:
        keys, member = layout.union()
        if 0 < keys.shape[-1] <= 2 * layout.kv_tokens.shape[-1]:  # dense over the union beats per-group gathers
            return attend_token_union(q, k, v, layout, keys, member, scale=plan.scale, causal=plan.causal,
                                      key_padding_mask=pad)
    return _forward_fused(q, k, v, pad, plan)


class _LayoutAttention(torch.autograd.Function):
    """Forward on the fused kernel where it applies; the backward recomputes slot by slot from (out, lse).

    ``*captured``: the tensors the score_mod closes over that require grad (inputs, so they get gradients).
    """

    @staticmethod
    def forward(ctx, q, k, v, pad, plan, layout, fused, *captured):  # noqa: D401  (autograd signature)
        out, lse = _forward_any(q, k, v, pad, plan, layout, fused)
        ctx.save_for_backward(q, k, v, pad, out, lse)
        ctx.plan = plan
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, pad, out, lse = ctx.saved_tensors
        mod = ctx.plan.mod
        grads = [None] * (len(mod.captured) if mod is not None else 0)
        dq, dk, dv = _backward(q, k, v, pad, out, lse, d_out.contiguous(), d_lse, ctx.plan, grads)
        return dq, dk, dv, None, None, None, None, *(mod.input_grads(grads) if mod is not None else ())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, scale: float, causal: bool,
           key_padding_mask: torch.Tensor | None = None, q_positions: torch.Tensor | None = None,
           score_mod: ScoreMod | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention restricted to ``layout``; differentiable. Returns ``(out, lse)``.

    ``q_positions`` (``(B|1, Hq|1, Nq)`` absolute positions) overrides the
    default ``i + Nk - Nq`` for the causal test, for callers that pass a
    gathered subset of query rows. ``score_mod`` (:mod:`attnzoo.mods`; it sees
    those positions as ``q_idx``) modifies each slot's scores in the forward and
    in the recomputing backward; a call with one always runs the generic slot
    loop, since the fused CPU paths (:mod:`attnzoo.core.fused`, PyTorch's flash
    kernel) take no score modification.
    """
    if not isinstance(layout, (BlockLayout, TokenLayout)):
        raise AttnZooError(f"layout: expected a BlockLayout or TokenLayout, got {type(layout).__name__}")
    impl = LAYOUT_ENGINE.get()
    if impl is not None:
        if q_positions is not None:
            raise UnsupportedError("layout engine override: custom query positions (q_positions) are not supported")
        if score_mod is not None:
            raise UnsupportedError("layout engine override: score_mod is not supported")
        return impl(q, k, v, layout, scale=scale, causal=causal, key_padding_mask=key_padding_mask)
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    hook = None if score_mod is None else ModHook(score_mod, like=q, grad=torch.is_grad_enabled(),
                                                  q_idx=max(0, Nk - 1), kv_idx=0)
    plan = _Plan(layout, batch=B, heads_q=Hq, heads_kv=Hkv, len_q=Nq, len_k=Nk, scale=scale, causal=causal,
                 q_positions=q_positions, device=q.device, mod=hook)
    fused = hook is None and fused_applies(q, v, q_positions)
    return _LayoutAttention.apply(q, k, v, key_padding_mask, plan, layout, fused, *(hook.captured if hook else ()))


def _cached_band_plan(layout: BlockLayout, causal: bool):
    """The layout's :class:`~attnzoo.core.fused.BandPlan` (None when not banded), kept on reused layouts."""
    if layout.mask_cache is None:
        return band_plan(layout, causal)
    key = ("band", causal)
    if key not in layout.mask_cache:
        layout.mask_cache[key] = band_plan(layout, causal)
    return layout.mask_cache[key]


def attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: Sequence[Layout], *, scale: float,
               causal: bool, key_padding_mask: torch.Tensor | None = None,
               score_mod: ScoreMod | None = None) -> Partial:
    """Attend each layout (with the same ``score_mod``) and merge by lse; the layouts' key sets must be disjoint."""
    parts = [Partial(*attend(q, k, v, lay, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                             score_mod=score_mod)) for lay in layouts]
    return merge(*parts)
