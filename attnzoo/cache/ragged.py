"""One store for KV heads that hold different numbers of tokens: a plan's per-head SnapKV budgets and full heads.

A calibrated plan gives every KV head of a layer its own budget (MoA). Run as one store and one SnapKV
policy per head group (:class:`~attnzoo.cache.layer.SplitLayer`), a layer costs one read and one vote
per group; :class:`RaggedSnapKV` does one of each for the whole layer.

Layout: keys, values, positions (and a ``valid`` mask once padding exists) are packed along one slot
axis, ``(B, S, ...)``; KV head ``h`` owns slots ``[start_h, start_h + cap_h)`` of which the first ``n_h``
are held, in position order. So a head holding 128 tokens costs 128 slots next to a full head's
4096 (``nbytes`` falls with the plan); ``cap_h - n_h`` is growth slack (full heads: 1/128 of what
they hold, at least 16 slots, as :class:`~attnzoo.cache.store.Store`; SnapKV heads: ``interval``).

* **Reads.** A prompt (every head holds the same tokens in equal regions) is one
  :func:`~attnzoo.cache.read.flash_read` over the ``(B, H, n)`` view. A decode step is one product of
  every query head with every slot, masked to its own KV head's held slots: each K/V byte is read once
  (a decode read is bound by those bytes), the arithmetic is ``heads_kv`` times the own-head part. A
  multi-token read after eviction reads each head's region in turn.
* **Votes.** SnapKV's rule (:class:`~attnzoo.cache.evict.SnapKV`) for every head over its budget at once:
  :func:`~attnzoo.cache.read.key_mass` of the remembered queries over those heads' slots (padded to a
  rectangle), max-pooled, the same top-k per budget; then one compaction of the packed buffers.

With the same tokens and parameters the layer equals one SnapKV (or full) store per head group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.partial import Partial
from .evict import SnapKV, _top_older
from .read import flash_read, key_mass
from .store import GROWTH, POS_DTYPE

#: position given to padding slots of a vote's rectangle (after every real position: rows stay sorted)
_PAD_POS = torch.iinfo(POS_DTYPE).max


class RaggedSnapKV:
    """The layer object of a ``heads`` policy whose groups are all ``full`` or ``snapkv`` (one observe/pool/interval).

    ``budgets[h]`` is KV head ``h``'s SnapKV budget, None for a head that keeps everything. With
    ``top_p`` (ZipVL's adaptive ratio, the ``zipvl`` policy) the budgets are decided by the first read
    instead: per head (``per="head"``) or for the whole layer (``per="layer"``, the heads' mass summed),
    the fewest prompt tokens that hold a ``top_p`` share of the remembered queries' attention mass
    (at least ``observe + interval`` and ``min_tokens``); :attr:`ratios` records each head's share of the prompt. The
    interface is :class:`~attnzoo.cache.layer.Layer`'s (append, attend, nbytes, held, positions, crop,
    reorder).
    """

    def __init__(self, budgets: list[int | None], *, observe: int, pool: int, interval: int,
                 top_p: float | None = None, per: str = "head", min_tokens: int = 0) -> None:
        for b in budgets:  # SnapKV's own parameter checks (observe < budget, interval fits)
            if b is not None:
                SnapKV(budget=b, observe=observe, pool=pool, interval=interval)
        self.budgets, self.observe, self.pool, self.interval = list(budgets), observe, pool, interval
        self.top_p, self.per, self.min_tokens = top_p, per, min_tokens
        self.ratios: list[float] | None = None  # top_p: the share of the prompt each head keeps
        self.buf: dict[str, torch.Tensor] = {}
        H = len(budgets)
        self.start, self.cap, self.n = [0] * H, [0] * H, [0] * H
        self.obs_q: torch.Tensor | None = None
        self.obs_pos: torch.Tensor | None = None

    # ------------------------------------------------------------ layout
    @property
    def heads(self) -> int:
        return len(self.budgets)

    def _set_layout(self, start: list[int], cap: list[int], device) -> None:
        """Regions ``[start_h, start_h + cap_h)``; caches ``(S,)`` each slot's owning head and index within it."""
        self.start, self.cap = list(start), list(cap)
        self._start_t = torch.tensor(start, device=device)
        self._owner = torch.repeat_interleave(torch.arange(self.heads, device=device), torch.tensor(cap, device=device))
        self._local = torch.arange(sum(cap), device=device) - self._start_t[self._owner]
        self._own: torch.Tensor | None = None  # built by the first decode read

    def _held(self, device, padding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot owners and ``(B, S)`` bool: slots holding a token (not padding, unless ``padding``)."""
        owner = self._owner
        held = (self._local < torch.tensor(self.n, device=device)[owner])[None]
        if "valid" in self.buf and not padding:
            return owner, held & self.buf["valid"]
        return owner, held.expand(self.buf["k"].shape[0], -1)

    def _region(self, h: int, name: str) -> torch.Tensor:
        return self.buf[name][:, self.start[h]: self.start[h] + self.n[h]]

    def _relayout(self, caps: list[int]) -> None:
        """Move every head's held slots into regions of ``caps`` slots (one gather and one scatter per buffer)."""
        device = self.buf["k"].device
        starts = [sum(caps[:h]) for h in range(self.heads)]
        src = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(self.start, self.n)])
        dst = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, self.n)])
        for name, t in self.buf.items():
            new = t.new_zeros(t.shape[0], sum(caps), *t.shape[2:])  # zeros: slack slots stay finite
            new[:, dst] = t[:, src]
            self.buf[name] = new
        self._set_layout(starts, caps, device)

    def _grown(self, h: int, need: int) -> int:
        """Capacity for head ``h`` needing ``need`` slots: growth slack for full heads, up to budget + 1 for SnapKV."""
        cap = need + max(need // GROWTH, 16)
        b = self.budgets[h]
        return cap if b is None else min(cap, max(need, b + 1))

    # ------------------------------------------------------------ the Layer interface
    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> None:
        B, H, m = k.shape[:3]
        if not self.buf:  # a prompt: exactly its tokens, equal regions (the uniform read's view)
            self.buf = {"k": k.new_zeros(B, H * m, k.shape[-1]), "v": v.new_zeros(B, H * m, v.shape[-1]),
                        "pos": torch.zeros(B, H * m, dtype=POS_DTYPE, device=k.device)}
            self._set_layout([h * m for h in range(H)], [m] * H, k.device)
        elif any(n + m > c for n, c in zip(self.n, self.cap)):
            self._relayout([c if n + m <= c else self._grown(h, n + m)
                            for h, (n, c) in enumerate(zip(self.n, self.cap))])
        idx = ((self._start_t + torch.tensor(self.n, device=k.device))[:, None]
               + torch.arange(m, device=k.device)).flatten()
        self.buf["k"][:, idx] = k.reshape(B, H * m, -1)
        self.buf["v"][:, idx] = v.reshape(B, H * m, -1)
        self.buf["pos"][:, idx] = positions.to(POS_DTYPE).view(1, 1, m).expand(B, H, m).reshape(B, H * m)
        if key_mask is not None or "valid" in self.buf:
            if "valid" not in self.buf:
                self.buf["valid"] = torch.ones_like(self.buf["pos"], dtype=torch.bool)
            mask = torch.ones(B, m, dtype=torch.bool, device=k.device) if key_mask is None else key_mask
            self.buf["valid"][:, idx] = mask.view(B, 1, m).expand(B, H, m).reshape(B, H * m)
        self.n = [n + m for n in self.n]

    def attend(self, q: torch.Tensor, step) -> Partial:
        part = self._read(q, step)
        seen = q if self.obs_q is None else torch.cat([self.obs_q, q], dim=2)
        pos = step.q_pos if self.obs_pos is None else torch.cat([self.obs_pos, step.q_pos])
        self.obs_q, self.obs_pos = seen[:, :, -self.observe:].contiguous(), pos[-self.observe:]
        self._vote(step)
        return part

    @property
    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for t in self.buf.values())
        return held + (0 if self.obs_q is None else self.obs_q.numel() * self.obs_q.element_size())

    def held(self, heads_kv: int) -> list[int]:
        return list(self.n)

    def positions(self, head: int) -> torch.Tensor:
        return self._region(head, "pos")

    def crop(self, length: int) -> None:
        owner, held = self._held(self.buf["pos"].device, padding=True)
        self._compact(held & (self.buf["pos"] < length), owner)
        if self.obs_pos is not None:
            keep = self.obs_pos < length
            self.obs_q, self.obs_pos = self.obs_q[:, :, keep], self.obs_pos[keep]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.buf = {name: t.index_select(0, beam_idx) for name, t in self.buf.items()}
        if self.obs_q is not None:
            self.obs_q = self.obs_q.index_select(0, beam_idx)

    # ------------------------------------------------------------ reads
    def _read(self, q: torch.Tensor, step) -> Partial:
        B, Hq, nq, D = q.shape
        H = self.heads
        if len(set(self.n)) == 1 and len(set(self.cap)) == 1:  # equal regions: the (B, H, n) view
            cap, n = self.cap[0], self.n[0]
            view = {name: t.view(B, H, cap, *t.shape[2:])[:, :, :n] for name, t in self.buf.items()}
            return flash_read(q, view["k"], view["v"], scale=step.scale, causal=step.causal,
                              valid=view.get("valid"), **step.split)
        if nq == 1:
            return self._decode_read(q, step.scale)
        G = Hq // H
        parts = [flash_read(q[:, h * G:(h + 1) * G], self._region(h, "k")[:, None], self._region(h, "v")[:, None],
                            scale=step.scale, causal=step.causal,
                            valid=self._region(h, "valid")[:, None] if "valid" in self.buf else None, **step.split)
                 for h in range(H)]
        return Partial(torch.cat([p.out for p in parts], 1), torch.cat([p.lse for p in parts], 1))

    def _decode_read(self, q: torch.Tensor, scale: float) -> Partial:
        """One query per head against every slot, masked to its KV head's held slots (one GEMM each way)."""
        B, Hq = q.shape[:2]
        owner, held = self._held(q.device)
        if self._own is None or self._own.shape[0] != Hq:  # (Hq, S): the slots of each query head's KV head
            self._own = owner[None, :] == torch.arange(Hq, device=q.device)[:, None] // (Hq // self.heads)
        dtype = torch.promote_types(q.dtype, torch.float32)  # half inputs computed in fp32, as flash_read does
        k, v = self.buf["k"].to(dtype), self.buf["v"].to(dtype)
        s = torch.matmul(q.to(dtype).reshape(B, Hq, -1), k.transpose(1, 2)).mul_(scale)  # (B, Hq, S)
        s.masked_fill_(~(self._own[None] & held[:, None]), -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        p = s.sub_(torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None]).exp_()
        return Partial(torch.matmul(p, v).unsqueeze(2), lse.float().unsqueeze(2))

    # ------------------------------------------------------------ votes and compaction
    def _vote(self, step) -> None:
        """SnapKV's compression for every head holding more than its budget, in one key-mass pass."""
        if self.top_p is not None and self.ratios is None:
            self._decide(step)
        over = [h for h, b in enumerate(self.budgets) if b is not None and self.n[h] > b]
        if not over:
            return
        device = self.buf["k"].device
        B = self.obs_q.shape[0]
        width = max(self.n[h] for h in over)
        mass = self._mass(over, step)
        pooled = F.max_pool1d(mass.view(-1, 1, width), self.pool, stride=1, padding=self.pool // 2)[..., :width]
        pooled = pooled.view(B, len(over), width)
        src, dst = [], []
        for size in sorted({(self.n[h], self.budgets[h]) for h in over}):  # one top-k per (held, budget)
            rows = [i for i, h in enumerate(over) if (self.n[h], self.budgets[h]) == size]
            kept = size[1] - self.interval + 1
            starts = self._start_t[[over[i] for i in rows]][:, None]
            src.append((_top_older(pooled[:, rows, :size[0]], self.observe, kept) + starts).flatten(1))
            dst.append((starts + torch.arange(kept, device=device)).flatten())
            for i in rows:
                self.n[over[i]] = kept
        B, S = self.buf["pos"].shape
        rows = torch.arange(B, device=device)[:, None] * S
        self._move((torch.cat(src, 1) + rows).flatten(), (torch.cat(dst)[None] + rows).flatten())
        if any(self.cap[h] > self.n[h] + self.interval for h in over):  # after the prompt: give the memory back
            self._relayout([self.n[h] + self.interval if h in over else c for h, c in enumerate(self.cap)])

    def _mass(self, over: list[int], step) -> torch.Tensor:
        """``(B, len(over), width)``: the remembered queries' attention mass on the slots of heads ``over``
        (:func:`~attnzoo.cache.read.key_mass` over their slots padded to the widest; 0 on padding)."""
        device = self.buf["k"].device
        B, Hq = self.obs_q.shape[:2]
        G = Hq // self.heads
        width = max(self.n[h] for h in over)
        r = torch.arange(width, device=device)
        n = torch.tensor([self.n[h] for h in over], device=device)
        idx = (torch.tensor([self.start[h] for h in over], device=device)[:, None]
               + torch.minimum(r[None], n[:, None] - 1)).flatten()                        # (Hv·width,)
        keys = self.buf["k"].index_select(1, idx).view(B, len(over), width, -1)
        pos = self.buf["pos"].index_select(1, idx).view(B, len(over), width)
        valid = self.buf["valid"].index_select(1, idx).view(B, len(over), width) if "valid" in self.buf else None
        if any(self.n[h] < width for h in over):  # heads shorter than the widest: padding slots, after every position
            pad = (r[None] < n[:, None])[None]                                               # (1, Hv, width)
            pos = pos.masked_fill(~pad, _PAD_POS)
            valid = pad.expand(B, -1, -1) if valid is None else valid & pad
        obs_q = self.obs_q if len(over) == self.heads else self.obs_q[:, [h * G + g for h in over for g in range(G)]]
        return key_mass(obs_q, keys, None, scale=step.scale, q_pos=self.obs_pos, k_pos=pos, causal=step.causal,
                        valid=valid)

    def _decide(self, step) -> None:
        """ZipVL's adaptive budgets: the fewest tokens holding ``top_p`` of the remembered queries' mass."""
        mass = self._mass(list(range(self.heads)), step)                   # (B, H, width), rows sum to G·observe
        if self.per == "layer":
            mass = mass.sum(1, keepdim=True)
        share = mass.sort(-1, descending=True).values.cumsum(-1)
        need = (share < self.top_p * share[..., -1:]).sum(-1) + 1           # (B, H or 1): tokens to reach top_p
        need = need.amax(0).expand(self.heads).tolist()                    # every batch row keeps its set
        low = max(self.observe + self.interval, self.min_tokens)
        self.budgets = [max(low, int(c)) for c in need]
        self.ratios = [min(1.0, b / max(1, n)) for b, n in zip(self.budgets, self.n)]

    def _compact(self, keep: torch.Tensor, owner: torch.Tensor) -> None:
        """Keep the slots where ``keep (B, S)``, in order, at the front of each head's region.

        Heads left with fewer tokens in some batch rows than others get padding slots there.
        """
        B, S = keep.shape
        device = keep.device
        starts = self._start_t
        ends = starts + torch.tensor(self.cap, device=device)
        cum = F.pad(keep.long().cumsum(1), (1, 0))                       # (B, S + 1): kept slots before each
        before = cum[:, starts]                                          # (B, H)
        counts = cum[:, ends] - before
        dst = starts[owner][None] + cum[:, 1:] - 1 - before[:, owner]    # new slot of each kept slot
        rows = torch.arange(B, device=device)[:, None] * S
        self._move((rows + torch.arange(S, device=device))[keep], (rows + dst)[keep])
        self.n = counts.max(0).values.tolist() if B else [0] * self.heads
        if bool((counts != counts.max(0).values).any()):
            if "valid" not in self.buf:
                self.buf["valid"] = torch.ones_like(self.buf["pos"], dtype=torch.bool)
            self.buf["valid"] &= self._local[None] < counts[:, owner]

    def _move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots to slots in every buffer; ``src``/``dst`` index the ``(B·S, ...)`` view (batch row · S + slot)."""
        for t in self.buf.values():
            flat = t.view(-1, *t.shape[2:])
            flat[dst] = flat.index_select(0, src)
