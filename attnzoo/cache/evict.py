"""Policies that hold everything (``full``, ``quantized``) or permanently evict (``streaming``, ``h2o``, ``snapkv``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core.gqa import fold_groups, unfold_groups
from ..core.partial import Partial, merge
from ..errors import AttnZooError
from ..registry import param
from .policy import Policy, Step, register_policy
from .read import band_read, dense_read, key_mass, mass_read, read_ranges
from .store import Store


@register_policy
@dataclass
class Full(Policy):
    """Every token is held and read (split-K); equals one-shot causal ``exact`` over the same tokens."""

    name: ClassVar[str] = "full"


@register_policy
@dataclass
class Quantized(Policy):
    """Full attention over K and V stored as ``bits``-bit integers per token and channel group.

    Each element is decoded within half a quantisation step of its value
    (:func:`attnzoo.cache.quant.error_bound`); int8 holds about 3.2× and int4
    about 5.3× fewer bytes than fp32 (codes plus an fp32 low/step per group).
    """

    name: ClassVar[str] = "quantized"
    reads: ClassVar[str] = "decoded K/V codes"
    papers: ClassVar[tuple[str, ...]] = ("KIVI", "ZipVL", "ALISA")

    bits: int = param(8, choices=(4, 8), help="bits per stored K/V element")
    group: int = param(32, min=1, help="channels sharing one low/step pair")

    def make_store(self) -> Store:
        return Store(bits=self.bits, group=self.group)


def _slot_of(store: Store, pos: int) -> int:
    """First slot whose position is ``>= pos`` (positions are the same in every row of the store)."""
    return int(torch.searchsorted(store.positions[0, 0].contiguous(), pos))


def _keep_slots(store: Store, slots: torch.Tensor) -> None:
    """Keep the same slots (sorted, ``(m,)``) in every batch row and head."""
    B, H = store.positions.shape[:2]
    store.keep(slots.view(1, 1, -1).expand(B, H, -1).contiguous())


class Compensated:
    """Mixin: a policy that keeps what it evicts as one mean K/V token (RazorAttention's compensation token).
    ``self.comp`` holds the evicted tokens' summed keys, values ``(B, Hkv, D)`` and count ``(B, Hkv)``."""

    def reset(self) -> None:
        self.comp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # sum k, sum v, count
        self.dropped_upto = 0  # every evicted position is < this

    def _absorb(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, positions: torch.Tensor) -> None:
        """Add tokens ``k, v (B, H, n, D)`` weighted by ``w (B, H, n)`` (1 = evicted; 0 = kept or padding)."""
        add = (torch.einsum("bhn,bhnd->bhd", w, k.float()), torch.einsum("bhn,bhnd->bhd", w, v.float()), w.sum(-1))
        self.comp = add if self.comp is None else tuple(x + y for x, y in zip(self.comp, add))
        if bool((w > 0).any()):
            self.dropped_upto = max(self.dropped_upto, int(positions[w > 0].max()) + 1)

    def _compensation(self, q: torch.Tensor, scale: float, *, mass: bool = False) -> Partial:
        """The mean token: score ``scale·q·k̄``, value ``v̄`` (empty rows when nothing was evicted). ``mass=True``
        counts it once per evicted token (score ``+ log count``): their share of the softmax is kept when
        their keys are alike (a repeated text), instead of one token's."""
        sum_k, sum_v, count = self.comp
        denom = count.clamp(min=1).unsqueeze(-1)
        k_mean, v_mean = sum_k / denom, sum_v / denom
        rows = fold_groups(q.float(), sum_k.shape[1])  # (B, Hkv, G·nq, D)
        score = torch.matmul(rows, k_mean.unsqueeze(-1)) * scale  # (B, Hkv, G·nq, 1)
        if mass:
            score = score + count.clamp(min=1).log()[:, :, None, None]
        score = score.masked_fill((count == 0)[:, :, None, None], float("-inf"))
        out = v_mean.unsqueeze(2).expand(*rows.shape[:3], -1)
        return Partial(unfold_groups(out, q.shape[1]), unfold_groups(score, q.shape[1]).squeeze(-1))

    def state_nbytes(self) -> int:
        return 0 if self.comp is None else sum(t.numel() * t.element_size() for t in self.comp)

    def crop(self, store: Store, length: int) -> None:
        if self.comp is not None and length < self.dropped_upto:
            raise AttnZooError(f"crop: length expected >= {self.dropped_upto} (tokens before it were merged into "
                               f"the compensation token and cannot be separated again), got {length}")

    def reorder(self, beam_idx: torch.Tensor) -> None:
        if self.comp is not None:
            self.comp = tuple(t.index_select(0, beam_idx) for t in self.comp)


@register_policy
@dataclass
class Streaming(Compensated, Policy):
    """StreamingLLM: the first ``sinks`` tokens and the last ``window`` (equals the ``streaming`` method).

    Query at position ``p`` reads ``j < sinks`` or ``p - window < j <= p``;
    after each ``attend`` everything else is evicted, so at most
    ``sinks + window`` tokens stay held. ``compensate`` (RazorAttention) keeps the
    mean key and mean value of everything evicted as one extra token.
    """

    name: ClassVar[str] = "streaming"
    kind: ClassVar[str] = "evict"
    reads: ClassVar[str] = "positions"
    papers: ClassVar[tuple[str, ...]] = ("StreamingLLM", "LM-Infinite")

    sinks: int = param(4, min=0, help="initial tokens always kept")
    window: int = param(512, min=1, help="most recent tokens kept (the query's own included)")
    compensate: bool = param(False, help="summarise evicted tokens into one mean K/V token (RazorAttention)")

    def read(self, store: Store, q: torch.Tensor, step: Step) -> Partial:
        if step.decode:
            n, p = store.n, int(step.q_pos[0])
            first_sink_free = _slot_of(store, self.sinks)
            start = max(first_sink_free, _slot_of(store, p - self.window + 1))
            parts = read_ranges(q, store, [(0, first_sink_free), (start, n)], step)
        else:  # the band path; the dense reference only where the held slots leave no band
            part = band_read(q, store, step, sinks=self.sinks, window=self.window)
            if part is None:
                part, _ = dense_read(q, store.keys(), store.values(), scale=step.scale, q_pos=step.q_pos,
                                     k_pos=store.positions, causal=step.causal, valid=store.valid,
                                     window=self.window, sinks=self.sinks)
            parts = [part]
        if self.comp is not None:
            parts.append(self._compensation(q, step.scale))
        return merge(*parts)

    def update(self, store: Store, q: torch.Tensor, step: Step) -> None:
        if store.n <= self.sinks + self.window:
            return
        first_sink_free = _slot_of(store, self.sinks)
        start = max(first_sink_free, _slot_of(store, step.seq_length - self.window))
        if start == first_sink_free:
            return
        if self.compensate:
            a, b = first_sink_free, start
            pos = store.positions[:, :, a:b]
            w = torch.ones(pos.shape, device=q.device) if store.valid is None else store.valid[:, :, a:b].float()
            self._absorb(store.keys(a, b), store.values(a, b), w, pos)
        slots = torch.cat([torch.arange(first_sink_free), torch.arange(start, store.n)]).to(q.device)
        _keep_slots(store, slots)


def _top_older(scores: torch.Tensor, keep_recent: int, keep_total: int) -> torch.Tensor:
    """Sorted slots ``(B, H, keep_total)``: the ``keep_recent`` newest plus the best-scored older ones."""
    n = scores.shape[-1]
    older = torch.topk(scores[:, :, : n - keep_recent], keep_total - keep_recent, dim=-1).indices
    recent = torch.arange(n - keep_recent, n, device=scores.device).expand(*scores.shape[:2], keep_recent)
    return torch.cat([older, recent], dim=-1).sort(dim=-1).values


@register_policy
@dataclass
class H2O(Policy):
    """Heavy hitters (H2O; ALISA's sparse window attention): keep ``recent`` newest + top accumulated mass.

    Every read is exact over the held tokens and adds each token's received
    probability (summed over queries and the query heads of its group) to its
    score; then each (batch, KV head) keeps its ``budget`` best, independently.
    """

    name: ClassVar[str] = "h2o"
    kind: ClassVar[str] = "evict"
    reads: ClassVar[str] = "accumulated attention scores"
    papers: ClassVar[tuple[str, ...]] = ("H2O", "ALISA")

    budget: int = param(2048, min=1, help="tokens held per KV head after each attend")
    recent: int | None = param(None, min=0, help="newest tokens always kept (None = budget // 2)")

    def validate(self) -> None:
        if self.recent is not None and self.recent > self.budget:
            raise AttnZooError(f"h2o: parameter 'recent' expected <= budget={self.budget}, got {self.recent}")

    def make_store(self) -> Store:
        return Store(track_scores=True)

    def read(self, store: Store, q: torch.Tensor, step: Step) -> Partial:
        part, mass = mass_read(q, store, step)
        store.scores.add_(mass)
        return part

    def update(self, store: Store, q: torch.Tensor, step: Step) -> None:
        if store.n > self.budget:
            recent = self.budget // 2 if self.recent is None else self.recent
            store.keep(_top_older(store.scores, recent, self.budget))


@register_policy
@dataclass
class SnapKV(Policy):
    """SnapKV: the last ``observe`` queries vote (pooled attention mass) for the tokens to keep.

    Reads are exact over the held tokens. After a read leaves more than
    ``budget`` tokens, the mass the remembered queries give each older token is
    max-pooled over ``pool`` neighbours and the best are kept along with the
    ``observe`` newest tokens: ``budget - interval + 1`` tokens in all, so the
    next compression comes ``interval`` decode steps later (kvpress's
    ``compression_interval``); the cache never holds more than ``budget``.
    """

    name: ClassVar[str] = "snapkv"
    kind: ClassVar[str] = "evict"
    reads: ClassVar[str] = "the last `observe` queries"
    papers: ClassVar[tuple[str, ...]] = ("SnapKV",)

    budget: int = param(2048, min=1, help="tokens held per KV head after each attend")
    observe: int = param(32, min=1, help="queries remembered for voting (the observation window)")
    pool: int = param(7, min=1, max=1025, help="max-pooling width over neighbouring tokens")
    interval: int = param(1, min=1, help="decode steps between compressions")

    def validate(self) -> None:
        if self.observe >= self.budget:
            raise AttnZooError(f"snapkv: parameter 'observe' expected < budget={self.budget}, got {self.observe} "
                               f"(so budget expected >= {self.observe + 1} with observe={self.observe}: lower observe, "
                               "or give attnzoo eval a fractional budget, which scales it)")
        if self.observe + self.interval - 1 > self.budget:
            raise AttnZooError(f"snapkv: parameter 'interval' expected <= budget - observe + 1 = "
                               f"{self.budget - self.observe + 1}, got {self.interval}")

    def reset(self) -> None:
        self.obs_q: torch.Tensor | None = None
        self.obs_pos: torch.Tensor | None = None

    def read(self, store: Store, q: torch.Tensor, step: Step) -> Partial:
        part = super().read(store, q, step)
        seen = q if self.obs_q is None else torch.cat([self.obs_q, q], dim=2)
        pos = step.q_pos if self.obs_pos is None else torch.cat([self.obs_pos, step.q_pos])
        self.obs_q, self.obs_pos = seen[:, :, -self.observe:].contiguous(), pos[-self.observe:]
        return part

    def update(self, store: Store, q: torch.Tensor, step: Step) -> None:
        if store.n <= self.budget:
            return
        mass = key_mass(self.obs_q, store.keys(), None, scale=step.scale, q_pos=self.obs_pos,
                        k_pos=store.positions, causal=step.causal, valid=store.valid)
        B, H, n = mass.shape
        pooled = F.max_pool1d(mass.view(B * H, 1, n), self.pool, stride=1, padding=self.pool // 2)[..., :n]
        store.keep(_top_older(pooled.view(B, H, n), self.observe, self.budget - self.interval + 1))

    def state_nbytes(self) -> int:
        return 0 if self.obs_q is None else self.obs_q.numel() * self.obs_q.element_size()

    def crop(self, store: Store, length: int) -> None:
        if self.obs_pos is not None:
            keep = self.obs_pos < length
            self.obs_q, self.obs_pos = self.obs_q[:, :, keep], self.obs_pos[keep]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        if self.obs_q is not None:
            self.obs_q = self.obs_q.index_select(0, beam_idx)
