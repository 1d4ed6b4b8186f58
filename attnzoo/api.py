"""The one calling convention: ``attnzoo.attention(q, k, v, method=..., **params)``."""

from __future__ import annotations

from typing import Any

import torch

from .errors import AttnZooError
from .registry import _lookup, get, param_names


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, method: str = "exact", causal: bool = False,
              scale: float | None = None, key_padding_mask: torch.Tensor | None = None, return_lse: bool = False,
              **params: Any):
    """Attend ``q (B, Hq, Nq, D)`` to ``k (B, Hkv, Nk, D)`` / ``v (B, Hkv, Nk, Dv)`` with ``method``.

    ``params`` are the method's parameters (see ``attnzoo.info(method)``) and
    any extra per-call inputs it declares (e.g. ``g`` for ``gla``); q, k, v are
    positional-only, so a parameter may be called ``k`` (``linformer``). Returns
    ``out`` in q's dtype, or ``(out, lse)`` with ``return_lse=True``.
    """
    cls = _lookup(method)
    fields = set(param_names(cls))
    config = {n: p for n, p in params.items() if n in fields}
    inputs = {n: p for n, p in params.items() if n not in fields}
    unknown = sorted(set(inputs) - set(cls.inputs))
    if unknown:
        valid = sorted(fields | set(cls.inputs))
        raise AttnZooError(
            f"{method}: unknown parameter(s) {unknown}; valid parameters: {', '.join(valid) or 'none'}"
        )
    return get(method, **config)(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                                 return_lse=return_lse, **inputs)
