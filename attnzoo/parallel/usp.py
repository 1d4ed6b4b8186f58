"""Unified sequence parallelism (USP; Fang and Zhao, "USP: a unified sequence parallelism approach for
long context generative AI", 2024): Ulysses inside the rows of a 2-D mesh, a ring across them.

The P ranks of the default group form a ``ring × ulysses`` device mesh
(``torch.distributed.device_mesh``; rank ``r`` sits in row ``r // U``, column
``r % U``). Each row's U ranks exchange heads for positions with the Ulysses
all-to-all, so rank (i, u) then holds row i's positions of head group u; the
R = P / U ranks of column u, holding the same heads at different positions,
run ring attention among themselves. Ulysses alone stops at P = Hq and the
ring alone sends P-1 K/V blocks; the mesh trades one for the other:

    per-rank forward bytes (non-causal, n = N/P positions per rank, element size e,
    Hkv' = KV heads after replication to a multiple of U):
      Ulysses part  (U-1)/U · n · (2·Hq·D + 2·Hkv'·D) · e   (q, k, v in, out back; D = Dv)
      ring part     (R-1) · n · Hkv' · 2·D · e     (a column block: U·n positions of Hkv'/U heads)

Causal attention balances the ring with the zig-zag layout at the row level
(row i holds chunks i and 2R-1-i of 2R), re-laid out inside the call by one
all-to-all over all P ranks (and back).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from ..api import attention
from ..errors import AttnZooError
from .comm import Team, resolve_team
from .layout import Layout, check_shards, relayout
from .packed import Documents
from .ring import Rule, ring_engine
from .ulysses import check_heads, check_params, heads_parallel, packed_args

_MESHES: dict[tuple[int, int], tuple[Any, Any]] = {}


def usp_mesh(ulysses: int, device_type: str = "cpu"):
    """The ``(ring, ulysses)`` :class:`~torch.distributed.device_mesh.DeviceMesh` over the default group,
    created once per process and degree (creating it is collective: every rank must call)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.group.WORLD
    key = (id(world), ulysses)
    if key not in _MESHES or _MESHES[key][0] is not world:
        size = dist.get_world_size()
        mesh = init_device_mesh(device_type, (size // ulysses, ulysses), mesh_dim_names=("ring", "ulysses"))
        _MESHES[key] = (world, mesh)
    return _MESHES[key][1]


def _teams(fn: str, world: Team, ulysses: int, device_type: str) -> tuple[Team, Team, list[list[int]]]:
    """This rank's Ulysses (row) and ring (column) teams, and the ranks of every row."""
    with world.talking("device mesh setup"):
        mesh = usp_mesh(ulysses, device_type)
        row, col = mesh.get_group("ulysses"), mesh.get_group("ring")
        teams = (Team(fn, row, dist.get_rank(row), dist.get_world_size(row)),
                 Team(fn, col, dist.get_rank(col), dist.get_world_size(col)))
    return teams + (mesh.mesh.tolist(),)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ulysses: int, causal: bool = False,
                  method: str = "exact", scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                  lightseq: bool = True, **params: Any) -> torch.Tensor:
    """Attention over a sequence sharded across the default group on a ``(P/ulysses) × ulysses`` mesh.

    Same shard contract as :func:`ring_attention` (rank r holds
    ``torch.tensor_split(x, P, dim=2)[r]``; uneven N, GQA, causal,
    differentiable). ``ulysses`` = U divides P and Hq; the ring degree is
    R = P / U. ``ulysses=P`` is Ulysses alone, ``ulysses=1`` the ring alone.
    ``method``: the local attention. With R > 1 it must be ``"exact"`` (the
    ring's tiled engine, merged in fp32); with R = 1 any registered method and
    its ``params``. KV heads fewer than U are replicated as in
    :func:`ulysses_attention`. Packed sequences (``cu_seqlens_q`` /
    ``cu_seqlens_k``) and ``lightseq`` as in :func:`ring_attention` (with a
    non-exact local method, the method attends each document separately and
    ``lightseq`` has no effect).
    """
    fn = "usp_attention"
    world = resolve_team(fn, None)

    def validate() -> None:
        check_params(fn, method, params)
        if isinstance(ulysses, bool) or not isinstance(ulysses, int) or ulysses < 1 or world.size % ulysses:
            raise AttnZooError(f"{fn}: ulysses: expected a positive divisor of the number of ranks P={world.size}, "
                               f"got {ulysses!r}")
        if method != "exact" and world.size // ulysses > 1:
            raise AttnZooError(f"{fn}: method: expected 'exact' when the ring degree P/ulysses = "
                               f"{world.size // ulysses} > 1 (the ring merges exact partial results), got {method!r}")
        if not isinstance(lightseq, bool):
            raise AttnZooError(f"{fn}: lightseq: expected a bool, got {type(lightseq).__name__}")

    prob, contiguous = check_shards(world, q, k, v, causal=causal, scale=scale, validate=validate,
                                    agree={"ulysses": ulysses, "method": method, "params": sorted(params.items()),
                                           "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                                           "lightseq": lightseq})
    check_heads(fn, prob.heads_q, ulysses, "ulysses")
    total = sum(contiguous.length(r) for r in range(world.size))
    docs = Documents.from_args(fn, cu_seqlens_q, cu_seqlens_k, total, q)
    row, col, rows = _teams(fn, world, ulysses, q.device.type)

    if causal and col.size > 1:  # zig-zag across the rows, then each row's positions spread over its ranks
        ring_layout = Layout.zigzag(total, col.size)
        layout = ring_layout.spread(rows)
    else:
        layout, ring_layout = contiguous, contiguous.grouped(rows)
    q, k, v = (relayout(world, t, contiguous, layout) for t in (q, k, v))
    lengths = [layout.length(r) for r in rows[col.rank]]
    if method == "exact":
        local = functools.partial(ring_engine, "ring", team=col, layout=ring_layout,
                                  rule=Rule(causal, prob.scale, docs), lightseq=lightseq)
    else:
        local = functools.partial(attention, method=method, causal=causal, scale=prob.scale,
                                  **packed_args(fn, cu_seqlens_q, cu_seqlens_k, total, q), **params)
    out = heads_parallel(row, q, k, v, lengths, local)
    return relayout(world, out, layout, contiguous)
