"""Per-token-group integer quantisation of cached K and V (KIVI/ZipVL-style storage).

Each token's ``D`` channels are cut into groups of ``group`` channels; a group
stores ``round((x - min) / step)`` in ``bits`` bits with ``step = (max - min) /
(2**bits - 1)``, plus its ``min`` and ``step`` in fp32. Decoding gives back
``min + code * step``, so every element is off by at most ``step / 2``: this is
the written bound the tests check, and what :func:`error_bound` returns.
int4 codes are packed two per byte.

:func:`encode_rows` / :func:`row_products` are the symmetric int8 codec of a compact scoring copy of K
(tokenselect's ``score_dtype="int8"``): one fp32 scale per row, products as int8 GEMMs.
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


def encode_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., D)`` -> ``(codes int8 (..., D), scale fp32 (...))``, symmetric per row: ``x ≈ codes · scale``
    with ``scale = max|x| / 127``, so every element is off by at most ``scale / 2``."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8), scale


def row_products(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q · kᵀ`` for queries ``q (X, G, D)`` (float) against rows ``k ≈ codes · scale`` (``codes (X, m, D)`` int8,
    ``scale (X, m)``): ``(X, G, m)`` fp32, the queries quantised by :func:`encode_rows` too and each product
    one int8 GEMM (int32 sums: exact) per ``X`` (a quarter of fp32 K's bytes read). Each product is off from
    ``q · k`` by at most :func:`product_error_bound`."""
    q8, qs = encode_rows(q)
    if codes.device.type == "cpu":
        prods = torch.stack([torch._int_mm(c, t.T.contiguous()) for c, t in zip(codes.unbind(0), q8.unbind(0))])
    else:  # elsewhere int8 GEMMs have shape rules (e.g. CUDA's): the same integer sums in fp32
        prods = torch.matmul(codes.float(), q8.float().transpose(-1, -2))
    # scaled into a contiguous (X, G, m): the softmax over keys that follows reads rows, not strided columns
    out = torch.empty(q.shape[0], q.shape[1], codes.shape[1], device=q.device)
    return torch.mul(prods.transpose(-1, -2), scale.unsqueeze(-2) * qs.unsqueeze(-1), out=out)


def product_error_bound(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Largest ``|row_products(q, *encode_rows(k)) - q · kᵀ|`` for ``q (X, G, D)``, ``k (X, m, D)``: ``(X, G, m)``.

    With ``q = q̂ + e_q``, ``k = k̂ + e_k`` (``|e_q| <= s_q/2``, ``|e_k| <= s_k/2`` per element, the sums exact),
    ``|q·k - q̂·k̂| <= |q|₁ s_k/2 + |k|₁ s_q/2 + D s_q s_k/4``."""
    sq, sk = q.abs().amax(-1) / 127, k.abs().amax(-1) / 127
    return (q.abs().sum(-1, keepdim=True) * sk.unsqueeze(-2) + sq.unsqueeze(-1) * k.abs().sum(-1).unsqueeze(-2)
            + q.shape[-1] * sq.unsqueeze(-1) * sk.unsqueeze(-2) / 2) / 2
