"""What a policy drives: one store for all KV heads (:class:`Layer`), or one per head group (:class:`SplitLayer`)."""

from __future__ import annotations

import functools

import torch

from ..core.partial import Partial


class Layer:
    """One policy over one :class:`Store` holding every KV head of the layer."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.store = policy.make_store()

    def append(self, k, v, positions, key_mask) -> None:
        self.store.append(k, v, positions, key_mask)

    def attend(self, q: torch.Tensor, step) -> Partial:
        part = self.policy.read(self.store, q, step)
        self.policy.update(self.store, q, step)
        return part

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + self.policy.state_nbytes()

    @property
    def allocated_nbytes(self) -> int:
        return self.store.allocated_nbytes + self.policy.state_nbytes()

    def held(self, heads_kv: int) -> list[int]:
        return [self.store.n] * heads_kv

    def positions(self, head: int) -> torch.Tensor:
        return self.store.positions[:, head]

    def crop(self, length: int) -> None:
        self.store.crop(length)
        self.policy.crop(self.store, length)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.store.reorder(beam_idx)
        self.policy.reorder(beam_idx)


class SplitLayer:
    """Per-head capacities: disjoint groups of KV heads, each with its own policy and store.

    ``groups`` is a list of ``(kv_head_indices, Layer)``; query heads follow their KV head.
    """

    def __init__(self, groups: list[tuple[list[int], Layer]], heads_kv: int) -> None:
        self.groups = [(torch.tensor(h, dtype=torch.long), layer) for h, layer in groups if h]
        self.owner = {h: (i, j) for i, (heads, _) in enumerate(self.groups) for j, h in enumerate(heads.tolist())}
        self.heads_kv = heads_kv

    def append(self, k, v, positions, key_mask) -> None:
        for heads, layer in self.groups:
            layer.append(k[:, heads], v[:, heads], positions, key_mask)

    def attend(self, q: torch.Tensor, step) -> Partial:
        B, Hq, nq, _ = q.shape
        groups = Hq // self.heads_kv
        parts = []
        for heads, layer in self.groups:
            qh = (heads.to(q.device)[:, None] * groups + torch.arange(groups, device=q.device)).flatten()
            parts.append((qh, layer.attend(q[:, qh], step)))
        dtype = functools.reduce(torch.promote_types, (p.out.dtype for _, p in parts))
        out = q.new_empty(B, Hq, nq, parts[0][1].out.shape[-1], dtype=dtype)
        lse = q.new_empty(B, Hq, nq, dtype=torch.float32)
        for qh, part in parts:
            out[:, qh], lse[:, qh] = part.out.to(dtype), part.lse.float()
        return Partial(out, lse)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for _, layer in self.groups)

    @property
    def allocated_nbytes(self) -> int:
        return sum(layer.allocated_nbytes for _, layer in self.groups)

    def held(self, heads_kv: int) -> list[int]:
        counts = [0] * heads_kv
        for heads, layer in self.groups:
            for h in heads.tolist():
                counts[h] = layer.store.n
        return counts

    def positions(self, head: int) -> torch.Tensor:
        i, j = self.owner[head]
        return self.groups[i][1].store.positions[:, j]

    def crop(self, length: int) -> None:
        for _, layer in self.groups:
            layer.crop(length)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for _, layer in self.groups:
            layer.reorder(beam_idx)
