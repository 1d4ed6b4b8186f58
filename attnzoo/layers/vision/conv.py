"""Convolution, pooling and frequency token mixers (no pairwise scores): ECA (V7), CAS-ViT's additive
mixer (V8), HorNet gⁿConv (V15), AFF (V16), PoolFormer (V17). Each maps ``x (B, N, C)`` on a row-major
``grid=(H, W)`` to ``(B, N, C)``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import grid as G
from ...errors import AttnZooError


def eca_kernel(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel size ``|log2(C)/γ + b/γ|`` rounded to the nearest odd int above."""
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return k if k % 2 else k + 1


class ECA(nn.Module):
    """Efficient channel attention: ``y = x ⊙ σ(Conv1D_k(GAP(x)))`` over the channels, no reduction."""

    def __init__(self, dim: int, kernel: int | None = None):
        super().__init__()
        self.kernel = kernel or eca_kernel(dim)
        if self.kernel % 2 == 0:
            raise AttnZooError(f"ECA: expected an odd kernel, got {self.kernel}")
        self.conv = nn.Conv1d(1, 1, self.kernel, padding=self.kernel // 2, bias=False)

    def forward(self, x, grid=None):
        pooled = x.mean(dim=1, keepdim=True)  # (B, 1, C)
        return x * torch.sigmoid(self.conv(pooled))


class _Phi(nn.Module):
    """CAS-ViT's Φ = channel gate ∘ spatial gate (depthwise 3×3 + 1×1 sigmoid map, then SE-style gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.spatial = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU(), nn.Conv2d(dim, 1, 1))
        hidden = max(4, dim // 4)
        self.channel = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, grid):
        s = x * torch.sigmoid(G.from_channels_first(self.spatial(G.to_channels_first(x, grid))))
        return s * torch.sigmoid(self.channel(s.mean(1, keepdim=True)))


class AdditiveMixer(nn.Module):
    """CAS-ViT convolutional additive token mixer: ``O = Γ(Φ(Q) + Φ(K)) ⊙ V`` with Γ a depthwise 3×3
    convolution then a linear map; no N×N matrix, cost linear in N."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.phi_q, self.phi_k = _Phi(dim), _Phi(dim)
        self.context = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.context_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        s = self.phi_q(q, grid) + self.phi_k(k, grid)
        ctx = self.context_proj(G.from_channels_first(self.context(G.to_channels_first(s, grid))))
        return self.proj(ctx * v)


class GnConv(nn.Module):
    """HorNet recursive gated convolution of ``order`` n: widths ``C_k = C / 2^{n-1-k}``,
    ``p_{k+1} = f_k(q_k) ⊙ g_k(p_k)`` with f a depthwise ``kernel×kernel`` convolution and g a linear
    map; output ``proj(p_n)``."""

    def __init__(self, dim: int, order: int = 3, kernel: int = 7):
        super().__init__()
        if order < 1 or dim % (2 ** (order - 1)):
            raise AttnZooError(f"GnConv: expected order >= 1 with 2^(order-1) dividing dim={dim}, got order={order}")
        self.dims = [dim // 2 ** i for i in range(order)][::-1]
        self.proj_in = nn.Linear(dim, 2 * dim)
        self.dw = nn.Conv2d(sum(self.dims), sum(self.dims), kernel, padding=kernel // 2, groups=sum(self.dims))
        self.pws = nn.ModuleList(nn.Linear(self.dims[i], self.dims[i + 1]) for i in range(order - 1))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        p, rest = self.proj_in(x).split([self.dims[0], sum(self.dims)], dim=-1)
        qs = G.from_channels_first(self.dw(G.to_channels_first(rest, grid))).split(self.dims, dim=-1)
        p = p * qs[0]
        for pw, qk in zip(self.pws, qs[1:]):
            p = pw(p) * qk
        return self.proj_out(p)


class AFF(nn.Module):
    """Adaptive frequency filtering: ``Y = Re(iFFT2(FFT2(X) ⊙ M(FFT2(X))))`` with M an input-dependent real
    mask from grouped 1×1 convolutions on the spectrum's real and imaginary parts: a global dynamic
    circular convolution as large as the map."""

    def __init__(self, dim: int, groups: int = 8):
        super().__init__()
        groups = math.gcd(groups, dim)
        self.mask_net = nn.Sequential(nn.Conv2d(2 * dim, 2 * dim, 1, groups=groups), nn.GELU(),
                                      nn.Conv2d(2 * dim, dim, 1, groups=groups))
        self.proj = nn.Linear(dim, dim)

    def mask(self, spec: torch.Tensor) -> torch.Tensor:
        """The real filter ``(B, C, H, W)`` for a spectrum ``(B, C, H, W)``."""
        return torch.sigmoid(self.mask_net(torch.cat([spec.real, spec.imag], dim=1)))

    def filter(self, x, grid):
        xc = G.to_channels_first(x, grid)
        spec = torch.fft.fft2(xc if xc.dtype == torch.float64 else xc.float(), norm="ortho")
        y = torch.fft.ifft2(spec * self.mask(spec), norm="ortho").real
        return G.from_channels_first(y).to(x.dtype)

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        return self.proj(self.filter(x, grid))


class PoolMixer(nn.Module):
    """PoolFormer's token mixer: ``AvgPool_{k×k, stride 1}(X) − X`` (padding not counted)."""

    def __init__(self, dim: int | None = None, pool: int = 3):
        super().__init__()
        self.pool = pool

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        xc = G.to_channels_first(x, grid)
        y = F.avg_pool2d(xc, self.pool, 1, self.pool // 2, count_include_pad=False)
        return G.from_channels_first(y - xc)
