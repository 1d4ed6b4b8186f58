"""Per-token-group integer quantisation of cached K and V (KIVI/ZipVL-style storage).

Each token's ``D`` channels are cut into groups of ``group`` channels; a group
stores ``round((x - min) / step)`` in ``bits`` bits with ``step = (max - min) /
(2**bits - 1)``, plus its ``min`` and ``step`` in fp32. Decoding gives back
``min + code * step``, so every element is off by at most ``step / 2``: this is
the written bound the tests check, and what :func:`error_bound` returns.
int4 codes are packed two per byte.
"""

from __future__ import annotations

import torch

from ..errors import AttnZooError


def check_group(dim: int, group: int, bits: int, what: str) -> None:
    """Refuse head dims the grouping cannot cut evenly (and odd dims for int4 packing)."""
    if dim % group:
        raise AttnZooError(f"quantized: parameter 'group' expected a divisor of the {what} head dim {dim}, got {group}")
    if bits == 4 and dim % 2:
        raise AttnZooError(f"quantized: bits=4 packs two codes per byte and expects an even {what} head dim, got {dim}")


def encode(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (..., D)`` -> ``(codes uint8 (..., D·bits/8), low (..., D/group), step (..., D/group))``."""
    g = x.float().unflatten(-1, (-1, group))
    low = g.amin(dim=-1)
    step = (g.amax(dim=-1) - low) / (2**bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((g - low.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, 2**bits - 1)
    codes = codes.flatten(-2).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, low, step


def decode(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, bits: int, group: int,
           dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`encode` (up to the rounding): ``(..., D)`` in ``dtype``."""
    if bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2)
    g = codes.float().unflatten(-1, (-1, group))
    return torch.addcmul(low.unsqueeze(-1), g, step.unsqueeze(-1)).flatten(-2).to(dtype)


def error_bound(step: torch.Tensor, group: int) -> torch.Tensor:
    """Largest possible ``|decode(encode(x)) - x|`` per element: half a step, ``(..., D)``."""
    return (step / 2).repeat_interleave(group, dim=-1)
