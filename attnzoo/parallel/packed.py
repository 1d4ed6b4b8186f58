"""Packed sequences across ranks: document boundaries (``cu_seqlens``) and which
(query, key) position ranges of two held segments may attend to each other.

The convention is FlashAttention's varlen one with *global* offsets:
``cu_seqlens_q = [0, n_1, n_1 + n_2, ..., N]`` (one more entry than there are
documents), likewise ``cu_seqlens_k``; document ``i``'s queries are positions
``[cu_seqlens_q[i], cu_seqlens_q[i+1])`` and see only document ``i``'s keys;
``causal`` aligns each document bottom-right (query ``a`` of a document with
``Lq`` queries and ``Lk`` keys sees keys ``b <= a + Lk - Lq``). Documents may
cross shard boundaries freely: every rank passes the same offsets and the
engines cut each (query segment, key segment) pair at the boundaries.
Without offsets the whole sequence is one document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import AttnZooError
from .layout import Segment


@dataclass(frozen=True)
class Documents:
    """Document offsets of the packed query and key sequences (the same on every rank)."""

    q: tuple[int, ...]
    k: tuple[int, ...]

    @classmethod
    def single(cls, total: int) -> "Documents":
        return cls((0, total), (0, total))

    @classmethod
    def from_args(cls, fn: str, cu_seqlens_q, cu_seqlens_k, total: int) -> "Documents":
        """Validated offsets; ``cu_seqlens_k`` defaults to ``cu_seqlens_q`` (self-attention over one packing)."""
        if cu_seqlens_q is None and cu_seqlens_k is None:
            return cls.single(total)
        if cu_seqlens_q is None:
            raise AttnZooError(f"{fn}: cu_seqlens_q: expected the query document offsets when cu_seqlens_k is "
                               f"given, got None")
        q = _offsets(fn, "cu_seqlens_q", cu_seqlens_q, total)
        k = q if cu_seqlens_k is None else _offsets(fn, "cu_seqlens_k", cu_seqlens_k, total)
        if len(q) != len(k):
            raise AttnZooError(f"{fn}: cu_seqlens_k: expected {len(q)} offsets ({len(q) - 1} documents, as in "
                               f"cu_seqlens_q), got {len(k)}")
        return cls(q, k)

    def __len__(self) -> int:
        return len(self.q) - 1

    def pieces(self, q_seg: Segment, k_seg: Segment, causal: bool
               ) -> Iterator[tuple[int, int, int, int, int, int]]:
        """``(q_from, q_to, k_from, k_to, q_offset, k_offset)`` for every document that has queries in
        ``q_seg`` and visible keys in ``k_seg``: positions relative to each segment's start, and the
        positions of the first query / key inside the document, bottom-right aligned (the offsets
        :class:`attnzoo.core.exact.TileSpec` takes)."""
        (qs, ql), (ks, kl) = q_seg, k_seg
        for i in range(len(self)):
            qa, qb = max(qs, self.q[i]), min(qs + ql, self.q[i + 1])
            ka, kb = max(ks, self.k[i]), min(ks + kl, self.k[i + 1])
            if qb <= qa or kb <= ka:
                continue
            shift = (self.k[i + 1] - self.k[i]) - (self.q[i + 1] - self.q[i])  # bottom-right alignment
            q_offset, k_offset = qa - self.q[i] + shift, ka - self.k[i]
            if causal and k_offset > q_offset + (qb - qa) - 1:  # the first key is after the last query
                continue
            yield qa - qs, qb - qs, ka - ks, kb - ks, q_offset, k_offset


def _offsets(fn: str, name: str, value, total: int) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise AttnZooError(f"{fn}: {name}: expected a 1-D integer tensor of offsets, got {value.dim()}-D "
                               f"{value.dtype}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                       for x in value):
        raise AttnZooError(f"{fn}: {name}: expected a 1-D integer tensor or a list of ints, got {value!r}")
    value = tuple(value)
    if len(value) < 2 or value[0] != 0 or value[-1] != total or any(b < a for a, b in zip(value, value[1:])):
        raise AttnZooError(f"{fn}: {name}: expected non-decreasing global offsets from 0 to the total length "
                           f"N={total} (at least [0, N]), got {list(value)}")
    return value
