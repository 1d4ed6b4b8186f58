"""The one calling convention: ``attnzoo.attention(q, k, v, method=..., **params)``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import AttnZooError
from .registry import _lookup, get, param_names


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, method: str = "exact", causal: bool = False,
              scale: float | None = None, key_padding_mask: torch.Tensor | None = None, return_lse: bool = False,
              score_mod: Callable | None = None, sinks: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, backend: str = "auto",
              **params: Any):
    """Attend ``q (B, Hq, Nq, D)`` to ``k (B, Hkv, Nk, D)`` / ``v (B, Hkv, Nk, Dv)`` with ``method``.

    ``params`` are the method's parameters (see ``attnzoo.info(method)``) and
    any extra per-call inputs it declares (e.g. ``g`` for ``gla``); q, k, v are
    positional-only, so a parameter may be called ``k`` (``linformer``). Returns
    ``out`` in q's dtype, or ``(out, lse)`` with ``return_lse=True``.

    ``score_mod(score, b, h, q_idx, kv_idx)`` and ``sinks (Hq,)``: see :mod:`attnzoo.mods`;
    ``cu_seqlens_q`` / ``cu_seqlens_k`` (packed sequences, ``max_seqlen_*`` optional): see
    :mod:`attnzoo.varlen`. A method that does not support one raises UnsupportedError naming it.
    For methods with a ``sinks`` parameter (a number of sink *tokens*, e.g. ``streaming``), an int
    ``sinks`` is that parameter and a tensor the learnable sink logits.
    ``backend``: ``"auto"`` (Triton kernels on CUDA where they apply, else torch), ``"torch"``,
    ``"triton"`` or ``"flex"`` (see ``attnzoo.explain``).
    """
    m, inputs, sinks = configure(method, params, sinks)
    return m(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse,
             score_mod=score_mod, sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, backend=backend, **inputs)


def configure(method: str, params: dict[str, Any], sinks: Any = None):
    """Split ``params`` into the method's parameters and its extra inputs: ``(method, inputs, sinks tensor)``."""
    cls = _lookup(method)
    fields = set(param_names(cls))
    if "sinks" in fields and sinks is not None and not isinstance(sinks, torch.Tensor):
        params, sinks = {**params, "sinks": sinks}, None  # the method's own count of sink tokens (streaming)
    config = {n: p for n, p in params.items() if n in fields}
    inputs = {n: p for n, p in params.items() if n not in fields}
    unknown = sorted(set(inputs) - set(cls.inputs))
    if unknown:
        valid = sorted(fields | set(cls.inputs))
        raise AttnZooError(
            f"{method}: unknown parameter(s) {unknown}; valid parameters: {', '.join(valid) or 'none'}"
        )
    return get(method, **config), inputs, sinks
