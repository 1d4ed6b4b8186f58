"""Which keys a query may see: causal alignment and key padding (docs/methods.md, Conventions).

Query ``i`` of ``Nq`` sits at absolute position ``q_offset + i`` and key ``j``
at ``k_offset + j``; by default ``q_offset = Nk - Nq`` and ``k_offset = 0``
(bottom-right alignment), so chunked prefill and decoding are the same call.
Engines that work on a slice of the keys (tiles, splits, ring shards) pass
the slice's own offsets.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..errors import AttnZooError

#: FlexAttention's mask_mod(b, h, q_idx, kv_idx) -> bool, called on broadcastable index tensors
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_mask(len_q: int, len_k: int, *, q_offset: int | None = None, k_offset: int = 0,
                device=None) -> torch.Tensor:
    """``(Nq, Nk)`` bool, True where key ``k_offset + j <= q_offset + i``."""
    if q_offset is None:
        q_offset = len_k - len_q
    qi = torch.arange(len_q, device=device).unsqueeze(1) + q_offset
    kj = torch.arange(len_k, device=device).unsqueeze(0) + k_offset
    return kj <= qi


def visible_mask(len_q: int, len_k: int, *, causal: bool, key_padding_mask: torch.Tensor | None = None,
                 q_offset: int | None = None, k_offset: int = 0, device=None) -> torch.Tensor | None:
    """The dense visibility mask, broadcastable to ``(B, H, Nq, Nk)``; None when everything is visible."""
    mask = None
    if causal:
        mask = causal_mask(len_q, len_k, q_offset=q_offset, k_offset=k_offset, device=device)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        mask = pad if mask is None else (mask & pad)
    return mask


def empty_rows(len_q: int, len_k: int, *, causal: bool, key_padding_mask: torch.Tensor | None,
               batch: int, device=None) -> torch.Tensor | None:
    """``(B, 1, Nq)`` bool, True for query rows with no visible key; None when there are none.

    Costs O(B·(Nq + Nk)), never an ``Nq × Nk`` mask.
    """
    if key_padding_mask is None and (not causal or len_q <= len_k):
        return None
    last_pos = torch.arange(len_q, device=device) + (len_k - len_q)  # last visible key when causal
    if key_padding_mask is None:
        return (last_pos < 0).expand(batch, len_q).unsqueeze(1)
    any_kept = key_padding_mask.any(dim=1, keepdim=True)  # (B, 1)
    if not causal:
        empty = (~any_kept).expand(batch, len_q)
    else:
        first_kept = torch.where(any_kept, key_padding_mask.int().argmax(dim=1, keepdim=True),
                                 torch.full_like(any_kept, len_k, dtype=torch.long))
        empty = last_pos.unsqueeze(0) < first_kept
    if not bool(empty.any()):
        return None
    return empty.unsqueeze(1)


def check_callable(fn: object, name: str, form: str, n_args: int) -> None:
    """Refuse anything but a callable ``form`` that takes ``n_args`` positional arguments."""
    if not callable(fn):
        raise AttnZooError(f"{name}: expected a callable {form}, got {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(*[0] * n_args)
    except TypeError:
        raise AttnZooError(f"{name}: expected a callable {form} taking {n_args} positional arguments, got "
                           f"signature {inspect.signature(fn)}") from None
    except ValueError:  # builtins without a signature: checked when called
        pass


def check_mask_mod(mask_mod: object, name: str = "mask_mod") -> None:
    """Refuse anything but a callable taking ``(b, h, q_idx, kv_idx)``."""
    check_callable(mask_mod, name, "mask_mod(b, h, q_idx, kv_idx) -> bool tensor", 4)


def call_mask_mod(mask_mod: MaskMod, b, h, q_idx, kv_idx) -> torch.Tensor:
    """Evaluate ``mask_mod`` on index tensors, refusing an output that is not a bool tensor."""
    out = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise AttnZooError(f"mask_mod: expected a bool tensor output (elementwise torch ops on its index "
                           f"tensors), got {got}")
    return out
