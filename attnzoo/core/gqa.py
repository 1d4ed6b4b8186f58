"""Grouped-query attention without repeating K/V: the query group folded into rows.

With ``Hq = G · Hkv`` query heads, query head ``h`` reads KV head ``h // G``.
Folding ``(B, Hq, N, X)`` into ``(B, Hkv, G·N, X)`` puts every query row of
a KV head's group against that one KV head, so a single batched matmul (or
kernel call) serves the group. Rows are ordered group-major: row ``g·N + i``
is query ``i`` of head ``kv·G + g``. :func:`split_groups` keeps the group as
its own dim (``(B, Hkv, G, ...)``) for sums or maxima over a group's heads.
Every function is a view when the input's layout allows (a copy otherwise,
as ``reshape`` does), except :func:`repeat_kv`, which copies.
"""

from __future__ import annotations

import torch


def split_groups(t: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """``(B, Hq, ...)`` -> ``(B, Hkv, G, ...)``: query head ``kv·G + g`` at ``[:, kv, g]``."""
    return t.unflatten(1, (heads_kv, t.shape[1] // heads_kv))


def merge_groups(t: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, G, ...)`` -> ``(B, Hq, ...)``, the inverse of :func:`split_groups`."""
    return t.flatten(1, 2)


def fold_groups(t: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """``(B, Hq, N, X)`` -> ``(B, Hkv, G·N, X)``."""
    return split_groups(t, heads_kv).flatten(2, 3)


def unfold_groups(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """``(B, Hkv, G·N, X)`` -> ``(B, Hq, N, X)``, the inverse of :func:`fold_groups`."""
    groups = heads_q // t.shape[1]
    return merge_groups(t.unflatten(2, (groups, t.shape[2] // groups)))


def repeat_kv(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """``(B, Hkv, ...)`` -> ``(B, Hq, ...)``: each KV head repeated for its group (a copy; the input when G = 1).

    For reference paths and methods whose per-head state cannot be shared; the
    engines fold the group into rows instead.
    """
    groups = heads_q // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)
