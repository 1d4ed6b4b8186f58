"""Packed sequences across ranks: document boundaries (``cu_seqlens``) and which
(query, key) position ranges of two held segments may attend to each other.

The convention is FlashAttention's varlen one with *global* offsets:
``cu_seqlens_q = [0, n_1, n_1 + n_2, ..., N]`` (one more entry than there are
documents), likewise ``cu_seqlens_k``; document ``i``'s queries are positions
``[cu_seqlens_q[i], cu_seqlens_q[i+1])`` and see only document ``i``'s keys;
``causal`` aligns each document bottom-right (query ``a`` of a document with
``Lq`` queries and ``Lk`` keys sees keys ``b <= a + Lk - Lq``): the semantics of
``attnzoo.attention(..., cu_seqlens_q=, cu_seqlens_k=)`` (:mod:`attnzoo.varlen`),
whose checks these offsets pass. Documents may cross shard boundaries freely:
every rank passes the same offsets and the engines cut each (query segment,
key segment) pair at the boundaries. Without offsets the whole sequence is one
document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import AttnZooError
from ..varlen import check_cu_seqlens
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
    def from_args(cls, fn: str, cu_seqlens_q, cu_seqlens_k, total: int, q: torch.Tensor) -> "Documents":
        """Validated offsets, as the single-process API takes them (:func:`attnzoo.varlen.check_cu_seqlens`:
        both or neither, integer tensors on q's device, a packed batch of 1)."""
        if cu_seqlens_q is None and cu_seqlens_k is None:
            return cls.single(total)
        if cu_seqlens_q is None or cu_seqlens_k is None:
            missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
            raise AttnZooError(f"{fn}: {missing}: expected an integer tensor of offsets next to the other one, "
                               f"got None")
        if q.shape[0] != 1:
            raise AttnZooError(f"{fn}: q: expected a packed batch of 1 with cu_seqlens (the documents lie along "
                               f"the sequence), got batch {q.shape[0]}")
        try:
            cq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total, q.device)
            ck = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total, q.device)
        except AttnZooError as e:
            raise AttnZooError(f"{fn}: {e} (global offsets: the last is the total length N over all ranks)") from None
        if len(cq) != len(ck):
            raise AttnZooError(f"{fn}: cu_seqlens_k: expected {len(cq)} offsets (as many sequences as "
                               f"cu_seqlens_q), got {len(ck)}")
        return cls(tuple(cq), tuple(ck))

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
