"""Select policies: everything stays held; a decode step reads the always-kept part plus a selected subset.

The always-kept part is the first ``sinks`` and the last ``local`` slots
(rounded out to the policy's selection unit: a page or a block). The selected
slots of the middle and the sinks are gathered per (batch, KV head), whole units
at a time (the store's capacity is aligned to the unit), and read by split-K; the
local window is a slice of the store, read in place; the two partials merge by
lse (docs/methods.md, KV-cache policies). A
read whose budget covers every held token, and every multi-token read
(prefill / chunked prefill), is exact over everything held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.gqa import split_groups
from ..core.partial import Partial, merge
from ..errors import AttnZooError
from ..registry import param
from . import quant
from .policy import Policy, Step, register_policy
from .read import mass_read, quest_read, read_ranges, read_selected, read_units, tokenselect_read
from .store import Store


def _group_queries(q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """The last query of each head as ``(B, Hkv, G, D)`` fp32."""
    return split_groups(q[:, :, -1].float(), heads_kv)


def _key_scores(qg: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype = torch.float32,
                key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``q·k`` of the grouped queries ``(B, Hkv, G, D)`` with every key ``(B, Hkv, m, D)``: ``(B, Hkv, G, m)`` fp32.

    The product runs in ``dtype`` (keys already in it are read as they are; in
    bfloat16 the CPU's bf16 GEMM reads half the bytes of fp32, its scores
    rounded to bf16: relative error <= 2^-8). int8 keys are codes with their
    per-token ``key_scale (B, Hkv, m)`` (:func:`quant.row_products`: the queries
    quantised too, one int8 GEMM per (batch, KV head), a quarter of fp32's bytes).

    Computed as ``K @ qᵀ``, whose GEMM streams the long key matrix row by row:
    on CPU it runs twice as fast as ``q @ Kᵀ`` (74 vs 151 ms at 128K keys,
    8 KV heads, D=128, one thread), and scoring is most of a selector's step.
    The result is a transposed view (softmax/top-k along its last dim copy once).
    """
    if keys.dtype == torch.int8:
        return quant.row_products(qg.flatten(0, 1), keys.flatten(0, 1), key_scale.flatten(0, 1)).view(
            *qg.shape[:3], -1)
    keys, qt = keys.to(dtype), qg.to(dtype).transpose(-1, -2)
    if dtype == torch.float32:
        return torch.matmul(keys, qt).transpose(-1, -2)
    # reduced precision: one GEMM per (batch, KV head), since the batched bf16 GEMM copies a strided K first
    # (a slice of the store's buffer), which costs as much as the product (3 vs 6 ms at 8K keys, 8 heads)
    rows = [k @ t for k, t in zip(keys.flatten(0, 1).unbind(0), qt.flatten(0, 1).unbind(0))]
    return torch.stack(rows).view(*keys.shape[:3], -1).float().transpose(-1, -2)


def _units_to_slots(top: torch.Tensor, unit: int, offset: int) -> torch.Tensor:
    """Sorted unit indices ``(B, H, u)`` -> their slots ``(B, H, u·unit)`` starting at ``offset``."""
    top = top.sort(dim=-1).values
    slots = (top * unit + offset).unsqueeze(-1) + torch.arange(unit, device=top.device)
    return slots.flatten(-2)


@dataclass
class _Select(Policy):
    """Shared decode read: always-kept ranges ⊕ ``select``-ed slots; subclasses implement ``select``."""

    kind: ClassVar[str] = "select"
    budget: int = 2048
    sinks: int = 0
    local: int = 0

    def validate(self) -> None:
        least = self.always_max + self.unit
        if self.budget < least:
            raise AttnZooError(f"{self.name}: parameter 'budget' expected >= {least}, forced by sinks={self.sinks} and "
                               f"local={self.local} rounded out to units of {self.unit}, plus one unit to select; "
                               f"got {self.budget} (lower sinks/local, or give attnzoo eval a fractional budget, "
                               "which scales them)")

    @property
    def always_max(self) -> int:
        """Most slots the always-kept ranges can hold (sinks rounded up, local rounded out to a unit)."""
        u = self.unit
        return math.ceil(self.sinks / u) * u + self.local + u - 1

    @property
    def unit(self) -> int:
        """Selection granularity in tokens (1 = single tokens)."""
        return 1

    def always(self, n: int) -> tuple[int, int]:
        """``(lo, hi)``: slots ``[0, lo)`` and ``[hi, n)`` are always read; ``[lo, hi)`` is selected from."""
        u = self.unit
        lo = min(n, math.ceil(self.sinks / u) * u)
        return lo, max(lo, (n - self.local) // u * u)

    def read(self, store: Store, q: torch.Tensor, step: Step) -> Partial:
        n = store.n
        lo, hi = self.always(n)
        take = (self.budget - self.always_max) // self.unit * self.unit  # the same at every step
        if not step.decode or n <= self.budget or hi - lo <= take:
            return self.read_all(store, q, step)
        part = self.read_fused(store, q, step, lo, hi, take)
        if part is not None:
            return part
        idx = self.select(store, q, step, lo, hi, take)
        if lo:  # the sink slots join the selected ones: one gathered read instead of two
            idx = torch.cat([torch.arange(lo, device=idx.device).expand(*idx.shape[:2], lo), idx], dim=-1)
        u = self.unit
        local_in_place = type(self).read_local is _Select.read_local
        if u > 1:  # whole units, read in place by the block kernel where it applies (the local window with them)
            units = idx[..., ::u] // u
            if local_in_place:
                units = torch.cat([units, torch.arange(hi // u, -(-n // u), device=idx.device).expand(
                    *units.shape[:2], -1)], dim=-1)
            part = read_units(q, store, units, u, step)
            if part is not None:
                return part if local_in_place else merge(part, *self.read_local(store, q, step, hi))
        if local_in_place:  # the local window with the selection: one read where it is read in place
            return read_selected(q, store, idx, step, u, local_from=hi)
        return merge(read_selected(q, store, idx, step, u), *self.read_local(store, q, step, hi))

    def make_store(self) -> Store:
        return Store(align=self.unit)

    def read_all(self, store: Store, q: torch.Tensor, step: Step) -> Partial:
        return super().read(store, q, step)

    def read_fused(self, store: Store, q: torch.Tensor, step: Step, lo: int, hi: int, take: int) -> Partial | None:
        """A decode step's selection and read in one kernel call, or None: :meth:`select` and the generic read."""
        return None

    def read_local(self, store: Store, q: torch.Tensor, step: Step, hi: int) -> list[Partial]:
        """The local window ``[hi, n)`` (none when empty): a slice of the store, read in place."""
        return read_ranges(q, store, [(hi, store.n)], step)

    def select(self, store: Store, q: torch.Tensor, step: Step, lo: int, hi: int, take: int) -> torch.Tensor:
        """Sorted slots ``(B, Hkv, take)`` in ``[lo, hi)`` the newest query reads."""
        raise NotImplementedError


def _masked(scores: torch.Tensor, store: Store, lo: int, hi: int) -> torch.Tensor:
    """``scores (..., hi - lo)`` with padding slots at -inf."""
    valid = store.valid
    if valid is None:
        return scores
    mask = valid[:, :, lo:hi]
    return scores.masked_fill(~mask.view(*mask.shape[:2], *([1] * (scores.dim() - 3)), mask.shape[-1]), -math.inf)


@register_policy
@dataclass
class TokenSelect(_Select):
    """TokenSelect: per-head scores, soft vote ``Σ_h softmax(q_h·Kᵀ)``, one top-k token set for the layer.

    The vote is over the middle slots (sinks and local window are always read).
    The selection is reused while the mean per-head cosine between the new query
    and the query that made it stays ``>= threshold`` (every batch row).
    By default (``pages=1.0``, ``page=64``, since session 9) scoring is
    page-first, so a step does not touch every key: the store keeps quest's
    bf16 key bounds per ``page`` tokens (+1/128 of fp32 K+V at page 64, so the
    cache stays within 1.02x of K+V at D=64), the pages get the soft vote
    of their bounds (an upper bound of every key's score), and only the tokens
    of the best pages, ``pages`` times the selected tokens' worth (+2 pages),
    are scored and voted on exactly. With every middle page a candidate it is
    the exact vote (tested). SmolLM2-135M at 1/8 gave the same scores as the
    exact vote (niah_single 3/3, multi-key 3/3, multi-value 0.5, multi-query
    0.5 at 4K; passkey 2/3 at 8K; n = 3 each, as exact's own) with ~4x fewer
    bytes read per step. (``attnzoo eval`` rows of ``tokenselect`` from before
    session 9 ran the exact vote, the default then.)
    ``pages=0`` is the exact vote over every middle key at every step, in
    ``score_dtype``: float32 over the stored keys, with no copy;
    bfloat16 (opt-in: faster, not smaller) keeps a bf16 copy of K when K is
    wider (+1/4 of an fp32 store's K+V bytes, counted in ``nbytes``) and scores
    it with the CPU's bf16 GEMM (measured 6x faster than fp32 at 8K keys, AMX
    CPU; the vote within its proven bound of the exact one). int8 (opt-in)
    keeps int8 codes of K with one fp32 scale per token (+1/8 of fp32 K+V and
    4 bytes a token and head) and scores them with int8 GEMMs against the
    query quantised the same way: a quarter of fp32 K's bytes per step, each
    score within ``|q|₁ s_k/2 + |k|₁ s_q/2 + D s_q s_k/4`` of the exact one
    (``s = max|x|/127`` per row; :func:`attnzoo.cache.quant.product_error_bound`).
    On CPU (float32 scores) a selecting step is one C++ call, the vote and the
    read of the selection in place (:func:`attnzoo.core.capped.tokenselect_attention`).
    """

    name: ClassVar[str] = "tokenselect"
    reads: ClassVar[str] = "page key min/max, the best pages' keys (scoring), selection cache"
    papers: ClassVar[tuple[str, ...]] = ("TokenSelect",)

    budget: int = param(2048, min=1, help="tokens read per decode step (sinks + local + selected)")
    sinks: int = param(128, min=0, help="initial tokens always read")
    local: int = param(512, min=0, help="most recent tokens always read")
    threshold: float = param(0.9, help="reuse the selection while cos(q, q_ref) >= threshold (> 1: never)")
    score_dtype: str = param("float32", choices=("float32", "bfloat16", "int8"),
                             help="dtype the per-step scores of every key are computed in: bfloat16 keeps a bf16 "
                                  "copy of K (+1/4 of fp32 K+V bytes; none if K is bf16) and reads half the bytes "
                                  "of fp32 per step; int8 keeps int8 codes of K with a per-token scale (+1/8 of "
                                  "fp32 K+V bytes) and reads a quarter")

    pages: float = param(1.0, min=0.0, help="> 0 (default 1): page-first: keep bf16 key bounds per page (+1/128 "
                                            "of fp32 K+V bytes at page 64), vote on the pages by their bounds and score "
                                            "only the tokens of the best pages, this many times the selected tokens' "
                                            "worth (+2 pages); float32 scores only. 0: score every middle key each "
                                            "step (the exact vote; any score_dtype)")
    page: int = param(64, min=1, help="tokens per page of the page-first bounds (pages > 0); 64 keeps the bounds at "
                                      "1/128 of fp32 K+V bytes (32: 1/64, over the 1.02x memory target at D=64)")

    def validate(self) -> None:
        super().validate()
        if self.pages and self.score_dtype != "float32":
            raise AttnZooError(f"tokenselect: parameter 'score_dtype' expected 'float32' with pages={self.pages} "
                               f"(page-first scoring reads the stored keys), got {self.score_dtype!r}; "
                               "give pages=0 with it (the exact vote over every key, scored in that dtype)")

    def make_store(self) -> Store:
        return Store(compact=getattr(torch, self.score_dtype), align=self.unit, page=self.page if self.pages else None,
                     page_dtype=torch.bfloat16)

    def reset(self) -> None:
        #: the selection state, updated in place (by the one-call step without any Python work): the queries that
        #: made the selection (B, Hkv, G, D) in q's dtype, the selected slots (B, take) int64 and the steps that
        #: selected / reused (2,) int64; None before the first decode step
        self.state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _state(self, q: torch.Tensor, heads_kv: int, take: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.state is None:
            B, Hq, _, D = q.shape
            self.state = (q.new_zeros(B, heads_kv, Hq // heads_kv, D),
                          torch.zeros(B, take, dtype=torch.long, device=q.device),
                          torch.zeros(2, dtype=torch.long, device=q.device))
        return self.state

    @property
    def selected(self) -> int:
        """Decode steps that made a new selection."""
        return 0 if self.state is None else int(self.state[2][0])

    @property
    def reused(self) -> int:
        """Decode steps that read the last selection again (``threshold``)."""
        return 0 if self.state is None else int(self.state[2][1])

    @property
    def ref(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(queries (B, Hq, D), slots (B, Hkv, take))`` of the current selection (views of :attr:`state`, which
        later steps overwrite), or None before the first."""
        if self.state is None or not int(self.state[2].sum()):
            return None
        ref, slots, _ = self.state
        return ref.flatten(1, 2), slots.unsqueeze(1).expand(-1, ref.shape[1], -1)

    def _candidates(self, take: int) -> int:
        """Pages whose tokens page-first scoring scores: ``pages`` times the selected tokens' worth, plus the two
        end pages the middle may cut."""
        return math.ceil(self.pages * take / self.page) + 2

    def read_fused(self, store, q, step, lo, hi, take):
        if self.score_dtype != "float32":  # compact copies score through the generic path
            return None
        state = self._state(q, store.buf["k"].shape[1], take)
        fused = tokenselect_read(q, store, step, lo=lo, hi=hi, candidates=self._candidates(take) if self.pages else 0,
                                 take=take, reuse=(*state, self.threshold))
        return None if fused is None else fused[0]

    def select(self, store, q, step, lo, hi, take):
        B, Hkv = store.positions.shape[:2]
        ref, slots, counts = self._state(q, Hkv, take)
        if int(counts.sum()):  # reuse while every batch row's mean cosine over its heads is >= threshold
            cos = torch.nn.functional.cosine_similarity(q[:, :, -1].float(), ref.flatten(1, 2).float(), dim=-1)
            if bool((cos.mean(dim=1) >= self.threshold).all()):
                counts[1] += 1
                return slots.unsqueeze(1).expand(B, Hkv, take)
        qg = _group_queries(q, Hkv) * step.scale
        if self.pages:  # the tokens of the pages of highest soft vote by their bounds: (B, M), hidden ones at -1
            cand, keys = self._page_candidates(store, qg, lo, hi, take)
            scores = _key_scores(qg, keys).masked_fill((cand < 0)[:, None, None], -math.inf)
            if store.valid is not None:
                hidden = ~torch.gather(store.valid, 2, cand.clamp(min=lo).unsqueeze(1).expand(-1, Hkv, -1))
                scores = scores.masked_fill(hidden.unsqueeze(2), -math.inf)
            vote = torch.softmax(scores, dim=-1).nan_to_num_(0.0).sum(dim=(1, 2)).masked_fill_(cand < 0, -1.0)
            top = cand.gather(-1, torch.topk(vote, take, dim=-1).indices).sort(dim=-1).values
        else:
            keys, key_scale = store.score_keys(lo, hi)
            scores = _key_scores(qg, keys, getattr(torch, self.score_dtype), key_scale)
            vote = torch.softmax(_masked(scores, store, lo, hi), dim=-1).nan_to_num_(0.0).sum(dim=(1, 2))  # (B, m)
            top = torch.topk(vote, take, dim=-1).indices.sort(dim=-1).values + lo
        ref.flatten(1, 2).copy_(q[:, :, -1])
        slots.copy_(top)
        counts[0] += 1
        return slots.unsqueeze(1).expand(B, Hkv, take)

    def _page_candidates(self, store, qg, lo, hi, take) -> tuple[torch.Tensor, torch.Tensor]:
        """Page-first: ``(slots (B, M), keys (B, Hkv, M, D))`` of the tokens in ``[lo, hi)`` of the pages with the
        highest soft vote ``Σ_heads softmax_pages(scale · bound)`` (slots outside ``[lo, hi)``: -1, keys there a
        stand-in). The bounds (bf16, rounded outward) are widened exactly to fp32 for the GEMMs."""
        kmin, kmax = store.page_bounds()
        p0, p1 = lo // self.page, -(-hi // self.page)
        bound = (qg.clamp(min=0) @ kmax[:, :, p0:p1].float().transpose(-1, -2)
                 + qg.clamp(max=0) @ kmin[:, :, p0:p1].float().transpose(-1, -2))
        vote = torch.softmax(bound, dim=-1).sum(dim=(1, 2))  # (B, pages)
        pages = torch.topk(vote, min(self._candidates(take), p1 - p0), dim=-1).indices.sort(dim=-1).values + p0
        cand = (pages.unsqueeze(-1) * self.page + torch.arange(self.page, device=pages.device)).flatten(-2)
        inside = (cand >= lo) & (cand < hi)
        keys, _ = store.gather(cand.clamp(lo, hi - 1).unsqueeze(1).expand(-1, qg.shape[1], -1))
        return cand.masked_fill(~inside, -1), keys

    def state_nbytes(self) -> int:
        return 0 if self.state is None else sum(t.numel() * t.element_size() for t in self.state)


@register_policy
@dataclass
class Quest(_Select):
    """Quest page selection: page score ``Σ_d max(q_d·kmin_d, q_d·kmax_d)`` ≥ ``q·k`` of every key inside.

    Per KV head, a page's score is the max over the query heads of its group.
    The bounds are stored in ``bound_dtype``: bfloat16 (default) rounds kmin down
    and kmax up, so the score stays an upper bound (each channel at most 2^-7
    relative looser) in half the bytes (the bounds are 2/page of fp32 K:
    1.016x full's bytes held at page 32, 1.031x at page 16; fp32 at 16: 1.063x).
    ``phys_page`` (LServe): physical pages of that many tokens score the max of
    their logical pages and are selected whole; ``reuse``: keep a selection for
    that many decode steps (LServe's r).
    """

    name: ClassVar[str] = "quest"
    reads: ClassVar[str] = "page key min/max"
    papers: ClassVar[tuple[str, ...]] = ("Quest", "LServe")

    budget: int = param(2048, min=1, help="tokens read per decode step (always-kept + selected pages)")
    page: int = param(32, min=1, help="logical page size: tokens sharing one key min/max (Quest's 16 reads twice "
                                      "the bound bytes a step; 32 kept exact's 3/3 passkey answers at 4K, 1/8)")
    sinks: int = param(16, min=0, help="initial tokens always read (rounded up to a page); 0 loses the attention "
                                       "sinks (SmolLM2 passkey at budget 256: 2/6 found with 0, 6/6 with 16)")
    local: int = param(16, min=0, help="most recent tokens always read (rounded out to a page)")
    phys_page: int | None = param(None, min=1, help="LServe physical page (a multiple of page); None = Quest")
    reuse: int = param(1, min=1, help="decode steps a selection is used for")
    bound_dtype: str = param("bfloat16", choices=("bfloat16", "float32"),
                             help="dtype of the page key min/max, rounded outward (bfloat16: half the bytes)")

    def validate(self) -> None:
        super().validate()
        if self.phys_page is not None and self.phys_page % self.page:
            raise AttnZooError(f"quest: parameter 'phys_page' expected a multiple of page={self.page}, got {self.phys_page}")

    @property
    def unit(self) -> int:
        return self.phys_page or self.page

    def reset(self) -> None:
        self.last: torch.Tensor | None = None  # (B, Hkv, units) the units selected last, sorted
        self.age = 0

    def make_store(self) -> Store:
        return Store(page=self.page, align=self.unit, page_dtype=getattr(torch, self.bound_dtype))

    def _reusing(self) -> bool:
        """Whether this step reads the last selection again (``reuse``); counts the step if so."""
        if self.last is None or self.age >= self.reuse:
            return False
        self.age += 1
        return True

    def read_fused(self, store, q, step, lo, hi, take):
        fixed = self.last if self._reusing() else None
        fused = quest_read(q, store, step, unit=self.unit, lo=lo, hi=hi, take=take // self.unit, fixed=fixed)
        if fused is None:
            if fixed is not None:  # the generic path counts the step again
                self.age -= 1
            return None
        if fixed is None:
            self.last, self.age = fused[1], 1
        return fused[0]

    def select(self, store, q, step, lo, hi, take):
        if self._reusing():
            return _units_to_slots(self.last, self.unit, 0)
        kmin, kmax = store.page_bounds()
        p0, p1 = lo // self.page, hi // self.page
        qg = _group_queries(q, kmin.shape[1])
        # fp32 products of the (exactly widened) stored bounds: a bf16 GEMM would round the bound down
        bound = (qg.clamp(min=0) @ kmax[:, :, p0:p1].float().transpose(-1, -2)
                 + qg.clamp(max=0) @ kmin[:, :, p0:p1].float().transpose(-1, -2)).amax(dim=2)
        per_unit = self.unit // self.page
        bound = bound.unflatten(-1, (-1, per_unit)).amax(dim=-1)
        top = torch.topk(bound, take // self.unit, dim=-1).indices
        self.last, self.age = top.sort(dim=-1).values + lo // self.unit, 1  # the units read
        return _units_to_slots(self.last, self.unit, 0)

    @property
    def slots(self) -> torch.Tensor | None:
        """``(B, Hkv, m)``: the middle slots of the last selection (None before the first), sorted."""
        return None if self.last is None else _units_to_slots(self.last, self.unit, 0)

    def state_nbytes(self) -> int:
        return 0 if self.last is None else self.last.numel() * self.last.element_size()


@register_policy
@dataclass
class InfLLM(_Select):
    """InfLLM block memory: sinks + local window + the top blocks by representative keys.

    Each block of ``block`` tokens, when it leaves the local window, records the
    slots of its ``reps`` keys that received the most attention so far (every
    read of the local window and every prefill read accumulate it; slots, not
    copies, so the cache holds ~1.01x of K+V, not 1.02x+); a decode step scores a
    block by ``Σ_r q̄·k_rep`` (q̄: mean query of the KV head's group) and reads
    the best blocks that fit the budget. Keys are cached after RoPE here, so the
    paper's position remapping of retrieved blocks does not apply.
    """

    name: ClassVar[str] = "infllm"
    reads: ClassVar[str] = "representative keys per block, accumulated scores"
    papers: ClassVar[tuple[str, ...]] = ("InfLLM",)

    budget: int = param(2048, min=1, help="tokens read per decode step")
    block: int = param(128, min=1, help="tokens per memory unit")
    reps: int = param(4, min=1, help="representative keys per unit")
    sinks: int = param(4, min=0, help="initial tokens always read (rounded up to a block)")
    local: int = param(512, min=0, help="most recent tokens always read (rounded out to a block)")

    def validate(self) -> None:
        super().validate()
        if self.reps > self.block:
            raise AttnZooError(f"infllm: parameter 'reps' expected <= block={self.block}, got {self.reps}")

    @property
    def unit(self) -> int:
        return self.block

    def reset(self) -> None:
        # (B, Hkv, finalised blocks, reps) int32: the slots of each block's representative keys (read from the
        # store at selection: a copy of the keys would hold reps/block of K on top of the cache)
        self.rep_slots: torch.Tensor | None = None

    def make_store(self) -> Store:
        return Store(track_scores=True, align=self.unit)

    def read_all(self, store, q, step):
        part, mass = mass_read(q, store, step)
        store.scores.add_(mass)
        return part

    def read_local(self, store, q, step, hi):
        if hi == store.n:
            return []
        local, mass = mass_read(q, store, step, hi)
        store.scores[:, :, hi:].add_(mass)
        return [local]

    def _finalise(self, store: Store, upto: int) -> None:
        """Pick representative keys for blocks ``[done, upto)`` (they just left the local window)."""
        done = 0 if self.rep_slots is None else self.rep_slots.shape[2]
        if upto <= done:
            return
        a, b = done * self.block, upto * self.block
        scores = store.scores[:, :, a:b].unflatten(-1, (upto - done, self.block))
        if store.valid is not None:
            scores = scores.masked_fill(~store.valid[:, :, a:b].unflatten(-1, (upto - done, self.block)), -math.inf)
        top = torch.topk(scores, self.reps, dim=-1).indices + a + torch.arange(0, b - a, self.block,
                                                                                  device=scores.device)[:, None]
        new = top.to(torch.int32)
        self.rep_slots = new if self.rep_slots is None else torch.cat([self.rep_slots, new], dim=2)

    def select(self, store, q, step, lo, hi, take):
        self._finalise(store, hi // self.block)
        B, Hkv = store.positions.shape[:2]
        q_mean = _group_queries(q, Hkv).mean(dim=2)
        slots = self.rep_slots[:, :, lo // self.block: hi // self.block]
        reps = store.gather_keys(slots.flatten(-2).long()).unflatten(2, slots.shape[2:]).float()
        relevance = torch.einsum("bhd,bhnrd->bhn", q_mean, reps)
        top = torch.topk(relevance, take // self.block, dim=-1).indices
        return _units_to_slots(top, self.block, lo)

    def state_nbytes(self) -> int:
        return 0 if self.rep_slots is None else self.rep_slots.numel() * self.rep_slots.element_size()

    def crop(self, store, length):
        if self.rep_slots is not None:
            self.rep_slots = self.rep_slots[:, :, : length // self.block]

    def reorder(self, beam_idx):
        if self.rep_slots is not None:
            self.rep_slots = self.rep_slots.index_select(0, beam_idx)


@register_policy
@dataclass
class Recycled(Policy):
    """Recycled Attention: a full step every ``every`` decode steps records the top-``budget`` tokens.

    Full steps are exact and record each KV head's received mass (summed over
    its query heads); the steps in between read those ``budget`` tokens plus
    every token appended since the last full step. ``every=1`` is exact.
    """

    name: ClassVar[str] = "recycled"
    kind: ClassVar[str] = "select"
    reads: ClassVar[str] = "attention weights of the last full step"
    papers: ClassVar[tuple[str, ...]] = ("Recycled Attention",)

    budget: int = param(2048, min=1, help="tokens recycled from the last full step")
    every: int = param(8, min=1, help="decode steps between full steps (the stride S)")

    def reset(self) -> None:
        self.recycled: torch.Tensor | None = None
        self.full_at = 0  # slots held at the last full step
        self.age = 0

    def read(self, store, q, step):
        if not step.decode or store.n <= self.budget:
            self.recycled = None
            return super().read(store, q, step)
        if self.recycled is None or self.age >= self.every:
            part, mass = mass_read(q, store, step)
            self.recycled = torch.topk(mass, self.budget, dim=-1).indices.sort(dim=-1).values
            self.full_at, self.age = store.n, 1
            return part
        self.age += 1
        parts = read_ranges(q, store, [(self.full_at, store.n)], step)
        parts.append(read_selected(q, store, self.recycled, step))
        return merge(*parts)

    def state_nbytes(self) -> int:
        return 0 if self.recycled is None else self.recycled.numel() * self.recycled.element_size()


@register_policy
@dataclass
class Retrieval(_Select):
    """RetrievalAttention: static sinks + local window ⊕ the top keys found by a search over the rest.

    Per (batch, KV head) the middle keys are ranked by their best inner product
    with any query head of the group. ``index="exact"`` scans them all (the
    exhaustive search); ``"faiss"`` keeps one HNSW inner-product graph per
    (batch, KV head), extended with the keys that leave the local window, asks
    it for each group head's ``take`` nearest keys and keeps the best ``take`` of
    their union (needs the optional ``faiss-cpu``: ``pip install attnzoo[retrieval]``);
    ``"auto"`` is faiss when installed, else exact.
    """

    name: ClassVar[str] = "retrieval"
    reads: ClassVar[str] = "key index"
    papers: ClassVar[tuple[str, ...]] = ("RetrievalAttention",)

    budget: int = param(2048, min=1, help="tokens read per decode step (static + retrieved)")
    sinks: int = param(128, min=0, help="initial tokens always read")
    local: int = param(512, min=0, help="most recent tokens always read")
    index: str = param("auto", choices=("auto", "exact", "faiss"), help="search over the middle keys")
    graph_degree: int = param(32, min=2, help="HNSW neighbours per node (faiss)")

    def validate(self) -> None:
        super().validate()
        if self.index == "faiss" and _faiss() is None:
            raise AttnZooError("retrieval: parameter 'index' is 'faiss' but faiss is not installed "
                               "(pip install attnzoo[retrieval]); use index='exact' or 'auto'")

    @property
    def uses_faiss(self) -> bool:
        return self.index == "faiss" or (self.index == "auto" and _faiss() is not None)

    def reset(self) -> None:
        self.graphs: list | None = None  # one HNSW index per (batch, KV head)
        self.indexed = 0  # middle slots [lo, indexed) are in the graphs

    def select(self, store, q, step, lo, hi, take):
        qg = _group_queries(q, store.positions.shape[1])
        if not self.uses_faiss:
            scores = _key_scores(qg, store.keys(lo, hi)).amax(dim=2)
            return torch.topk(_masked(scores, store, lo, hi), take, dim=-1).indices.sort(dim=-1).values + lo
        candidates = self._search(store, qg, lo, hi, take)  # (B, Hkv, G·take) slots, possibly repeated
        keys, _ = store.gather(candidates)
        scores = torch.einsum("bhgd,bhcd->bhgc", qg, keys.float()).amax(dim=2)
        order = candidates.sort(dim=-1)
        repeated = torch.zeros_like(order.values, dtype=torch.bool)
        repeated[..., 1:] = order.values[..., 1:] == order.values[..., :-1]
        scores = torch.gather(scores, -1, order.indices).masked_fill(repeated, -math.inf)
        if store.valid is not None:
            scores = scores.masked_fill(~torch.gather(store.valid, 2, order.values), -math.inf)
        best = torch.topk(scores, take, dim=-1).indices
        return torch.gather(order.values, -1, best).sort(dim=-1).values

    def _search(self, store, qg, lo, hi, take) -> torch.Tensor:
        """Add the middle keys not yet indexed, then each group head's ``take`` nearest slots."""
        faiss = _faiss()
        B, Hkv, G, D = qg.shape
        if self.graphs is None:
            self.graphs = [faiss.IndexHNSWFlat(D, self.graph_degree, faiss.METRIC_INNER_PRODUCT)
                           for _ in range(B * Hkv)]
            self.indexed = lo
        if hi > self.indexed:
            new = store.keys(self.indexed, hi).float().reshape(B * Hkv, hi - self.indexed, D).cpu().numpy()
            for graph, rows in zip(self.graphs, new):
                graph.add(rows)
            self.indexed = hi
        queries = qg.reshape(B * Hkv, G, D).cpu().numpy()
        found = []
        for graph, qs in zip(self.graphs, queries):
            graph.hnsw.efSearch = max(64, take)
            found.append(torch.from_numpy(graph.search(qs, take)[1]))
        ids = torch.stack(found).to(qg.device).view(B, Hkv, G * take)
        return ids.clamp(min=0) + lo  # -1 (not found) can only repeat slot lo, which dedup removes

    def state_nbytes(self) -> int:
        # HNSW stores each vector plus its neighbour lists (graph_degree·2 int32 links on level 0)
        return 0 if self.graphs is None else sum(g.ntotal * (4 * g.d + 8 * self.graph_degree) for g in self.graphs)


def _faiss():
    """The faiss module, or None when the optional dependency is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss
