"""Grouped-query attention without repeating K/V: the query group folded into rows.

With ``Hq = G · Hkv`` query heads, query head ``h`` reads KV head ``h // G``.
Folding ``(B, Hq, N, X)`` into ``(B, Hkv, G·N, X)`` puts every query row of
a KV head's group against that one KV head, so a single batched matmul (or
kernel call) serves the group. Rows are ordered group-major: row ``g·N + i``
is query ``i`` of head ``kv·G + g``. Both directions are views when the
input's layout allows (a copy otherwise, as ``reshape`` does).
"""

from __future__ import annotations

import torch


def fold_groups(t: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """``(B, Hq, N, X)`` -> ``(B, Hkv, G·N, X)``."""
    B, Hq, N, X = t.shape
    return t.reshape(B, heads_kv, (Hq // heads_kv) * N, X)


def unfold_groups(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """``(B, Hkv, G·N, X)`` -> ``(B, Hq, N, X)``, the inverse of :func:`fold_groups`."""
    B, Hkv, rows, X = t.shape
    return t.reshape(B, heads_q, rows * Hkv // heads_q, X)
