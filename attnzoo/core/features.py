"""Feature maps φ for kernelised attention (docs/methods.md, Engines).

A kernelised method replaces ``exp(q·k)`` by ``φ(q)·φ(k)`` so that attention
becomes a product with a running state (:mod:`attnzoo.core.linear`). Every map
here acts on the last dimension and is differentiable.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..errors import AttnZooError


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1`` (Katharopoulos et al.): positive, so the normaliser never vanishes."""
    return F.elu(x) + 1


def relu_features(x: torch.Tensor) -> torch.Tensor:
    """ReLU kernel (SLAB / LiT); non-negative, needs an ``eps`` in the normaliser."""
    return F.relu(x)


def taylor2(x: torch.Tensor) -> torch.Tensor:
    """Second-order Taylor features (BASED): ``[1, x, vec(x⊗x)/√2]``.

    ``taylor2(a)·taylor2(b) = 1 + a·b + (a·b)²/2``, the Taylor expansion of
    ``exp(a·b)`` to second order; always ≥ 1/2, so the normaliser is positive.
    Pre-scale ``a`` and ``b`` (e.g. by ``scale ** 0.5``) to expand ``exp(scale·q·k)``.
    Output size ``1 + d + d²``.
    """
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


def orthogonal_gaussian(features: int, dim: int, *, seed: int | None = 0, dtype=torch.float32,
                        device=None) -> torch.Tensor:
    """``(features, dim)`` random directions for FAVOR+: orthogonal in blocks of ``dim``,
    rows rescaled to chi-distributed norms so each row is marginally ``N(0, I)``.

    ``seed=None`` draws from torch's global generator (used to redraw features);
    seeded draws are cached (decoding calls this at every step).
    """
    if features < 1:
        raise AttnZooError(f"features: expected a positive number of random features, got {features}")
    directions = _draw(features, dim, None) if seed is None else _seeded_draw(features, dim, seed)
    return directions.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _seeded_draw(features: int, dim: int, seed: int) -> torch.Tensor:
    return _draw(features, dim, torch.Generator().manual_seed(seed))


def _draw(features: int, dim: int, gen: torch.Generator | None) -> torch.Tensor:
    blocks = []
    for _ in range(math.ceil(features / dim)):
        gauss = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        ortho, upper = torch.linalg.qr(gauss)
        # fix LAPACK's sign convention so the directions are uniform (Haar), else the estimate is biased
        blocks.append((ortho * torch.sign(torch.diagonal(upper))).T)
    directions = torch.cat(blocks, dim=0)[:features]
    norms = torch.randn(features, dim, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return directions * norms


def favor_positive(x: torch.Tensor, omega: torch.Tensor, *, stabilise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FAVOR+ positive random features ``exp(ωᵀx − ‖x‖²/2) / √m`` (Performer).

    With ``x`` pre-scaled by ``scale ** 0.5``, ``E[φ(q)·φ(k)] = exp(scale·q·k)``.
    Returns ``(features, log_shift)``: with ``stabilise=True`` each row's largest
    exponent ``log_shift (..., 1)`` is subtracted, so ``features · exp(log_shift)``
    are the true features. The shift is a per-row constant that cancels in a
    normalised output: use it for queries only (a per-key shift would not cancel).
    """
    exponent = torch.matmul(x, omega.T.to(x.dtype)) - 0.5 * (x * x).sum(dim=-1, keepdim=True)
    shift = exponent.amax(dim=-1, keepdim=True).detach() if stabilise else torch.zeros_like(exponent[..., :1])
    return torch.exp(exponent - shift) / math.sqrt(omega.shape[0]), shift
