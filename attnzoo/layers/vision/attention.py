"""Attention-based vision mixers: each maps ``x (B, N, C)`` on a row-major ``grid`` to ``(B, N, C)``.

Global MHSA (the reference), Swin (V1), BiFormer (V2), HiLo (V3), DaViT channel attention (V4),
EfficientViT cascaded group attention (V5), FlatFormer (V6), DiNA (V12), SHViT (V13), FIT (V14) and
EchoAtt (V18). The attention itself runs on attnzoo's registered methods and engines.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import grid as G
from ...api import attention
from ...core.blocksparse import BlockLayout, attend
from ...errors import AttnZooError
from ..linear import _check_width, _merge_heads, _split_heads


class _QKV(nn.Module):
    """A multi-head mixer's q/k/v and output projections."""

    def __init__(self, dim: int, heads: int, name: str):
        super().__init__()
        _check_width(name, dim, heads)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))

    def attend(self, xq: torch.Tensor, xkv: torch.Tensor, **kw) -> torch.Tensor:
        """Exact attention of ``xq``'s queries over ``xkv``'s keys and values (cross-attention; ``xq is xkv``:
        self-attention), projected; each side computes only its part of the q/k/v projection."""
        C = xq.shape[-1]
        w, b = self.qkv.weight, self.qkv.bias
        q = _split_heads(F.linear(xq, w[:C], b[:C]), self.heads)
        k, v = (_split_heads(t, self.heads) for t in F.linear(xkv, w[C:], b[C:]).chunk(2, dim=-1))
        return self.proj(_merge_heads(attention(q, k, v, method="exact", **kw)))


class GlobalAttention(_QKV):
    """Plain multi-head self-attention over all tokens (the reference row)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__(dim, heads, "GlobalAttention")

    def forward(self, x, grid=None):
        q, k, v = self.split(x)
        return self.proj(_merge_heads(attention(q, k, v, method="exact")))


class SwinAttention(_QKV):
    """Swin (shifted) window attention with a learned relative position bias per head
    (``(2M-1)^d`` table indexed by the offset inside the window). ``shift > 0`` is Swin's shifted block:
    the groups of ``window2d`` with the same ``shift`` (windows whose origin moves to ``shift - window``),
    run as full windows with padded keys masked."""

    def __init__(self, dim: int, heads: int = 4, window: int = 7, shift: int = 0):
        super().__init__(dim, heads, "SwinAttention")
        if window < 1 or not 0 <= shift < window:
            raise AttnZooError(f"SwinAttention: expected window >= 1 and 0 <= shift < window, got window={window}, "
                               f"shift={shift}")
        self.window, self.shift = window, shift
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        c = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def bias(self) -> torch.Tensor:
        """``(heads, M², M²)`` the relative position bias of one window."""
        return self.bias_table[self.rel_index].permute(2, 0, 1)

    def forward(self, x, grid):
        B, n, C = x.shape
        grid = G.check_grid(grid, n, dims=(2,))
        xw, valid = G.shifted_window_partition(G.unflatten(x, grid), self.window, self.shift)
        nw, m = xw.shape[1], xw.shape[2]
        q, k, v = self.split(xw.reshape(B * nw, m, C))
        mask = self.bias().unsqueeze(0) + torch.where(valid, 0.0, -math.inf).repeat(B, 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        out = _merge_heads(out).reshape(B, nw, m, C)
        return self.proj(G.flatten(G.shifted_window_merge(out, grid, self.window, self.shift), grid))


class DiNAAttention(_QKV):
    """Dilated neighbourhood attention (NATTEN semantics) through the ``neighborhood2d`` method; alternate
    ``dilation=1`` and a large dilation in consecutive blocks as DiNA does (``dilation=None`` is DiNA's
    sparse-global ``⌊min side / kernel⌋``)."""

    def __init__(self, dim: int, heads: int = 4, kernel: int = 7, dilation: int | None = 1):
        super().__init__(dim, heads, "DiNAAttention")
        self.kernel, self.dilation = kernel, dilation

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        q, k, v = self.split(x)
        dil = max(1, min(grid) // self.kernel) if self.dilation is None else self.dilation
        out = attention(q, k, v, method="neighborhood2d", grid=grid, kernel=self.kernel, dilation=dil)
        return self.proj(_merge_heads(out))


class BiFormerAttention(_QKV):
    """BiFormer bi-level routing attention (the ``bilevel_routing`` method on the grid's ``regions²``
    regions, ``topk`` routed regions per region) plus the local context enhancement LCE(V), a 5×5
    depthwise convolution of V added to the output. Sides that ``regions`` does not divide are padded at the
    bottom/right with zero tokens, which take part in routing but are masked as keys."""

    def __init__(self, dim: int, heads: int = 4, regions: int = 4, topk: int = 4, lce_kernel: int = 5):
        super().__init__(dim, heads, "BiFormerAttention")
        self.regions, self.topk = regions, topk
        self.lce = nn.Conv2d(dim, dim, lce_kernel, padding=lce_kernel // 2, groups=dim)

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        S = self.regions
        padded = tuple(-(-g // S) * S for g in grid)
        keep = pad = None
        if padded != grid:  # pad bottom/right with zero tokens (masked as keys) to whole regions, as BiFormer does
            x = G.flatten(F.pad(G.unflatten(x, grid), (0, 0, 0, padded[1] - grid[1], 0, padded[0] - grid[0])), padded)
            real = F.pad(torch.ones(grid, dtype=torch.bool, device=x.device),
                         (0, padded[1] - grid[1], 0, padded[0] - grid[0])).flatten()
            keep, pad = real.nonzero().squeeze(-1), real.expand(x.shape[0], -1)
        q, k, v = self.split(x)
        out = attention(q, k, v, method="bilevel_routing", regions=S, topk=self.topk, grid=padded,
                        key_padding_mask=pad)
        if keep is not None:
            out, v = out[:, :, keep], v[:, :, keep]
        lce = G.from_channels_first(self.lce(G.to_channels_first(_merge_heads(v), grid)))
        return self.proj(_merge_heads(out) + lce)


class HiLoAttention(nn.Module):
    """HiLo (LITv2): ``round(alpha·heads)`` Lo-Fi heads attend every query to keys/values of the
    ``s×s`` average-pooled map; the other (Hi-Fi) heads attend inside ``s×s`` windows (``window2d``)."""

    def __init__(self, dim: int, heads: int = 4, alpha: float = 0.5, window: int = 2):
        super().__init__()
        _check_width("HiLoAttention", dim, heads)
        self.head_dim, self.window = dim // heads, window
        self.lo_heads = int(round(alpha * heads))
        self.hi_heads = heads - self.lo_heads
        hi, lo = self.hi_heads * self.head_dim, self.lo_heads * self.head_dim
        self.hi_qkv = nn.Linear(dim, 3 * hi) if hi else None
        self.lo_q = nn.Linear(dim, lo) if lo else None
        self.lo_kv = nn.Linear(dim, 2 * lo) if lo else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        outs = []
        if self.hi_heads:
            q, k, v = (_split_heads(t, self.hi_heads) for t in self.hi_qkv(x).chunk(3, -1))
            outs.append(attention(q, k, v, method="window2d", grid=grid, window=self.window))
        if self.lo_heads:
            s = self.window
            pooled = F.avg_pool2d(G.to_channels_first(x, grid), s, s, ceil_mode=True) if s > 1 else \
                G.to_channels_first(x, grid)
            k, v = (_split_heads(t, self.lo_heads) for t in self.lo_kv(G.from_channels_first(pooled)).chunk(2, -1))
            outs.append(attention(_split_heads(self.lo_q(x), self.lo_heads), k, v, method="exact"))
        return self.proj(_merge_heads(torch.cat(outs, dim=1)))


class ChannelAttention(_QKV):
    """DaViT channel group attention: per head group, channels are the tokens,
    ``A = softmax(C_g^{-1/2} Qᵀ K)`` (``C_g × C_g``) and ``Y = V Aᵀ``; global over the image at
    O(N·C²/G). Runs as exact attention on the transposed per-head matrices."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__(dim, heads, "ChannelAttention")

    def forward(self, x, grid=None):
        q, k, v = (t.transpose(-1, -2) for t in self.split(x))  # (B, G, C_g, N)
        out = attention(q, k, v, method="exact", scale=q.shape[-2] ** -0.5)
        return self.proj(_merge_heads(out.transpose(-1, -2)))


class CascadedGroupAttention(nn.Module):
    """EfficientViT cascaded group attention: head ``j`` sees its channel chunk plus the previous head's
    output (``X̃_j = X_j + O_{j-1}``), ``Q_j = DWConv(X̃_j W^Q_j)``, small ``qk_dim`` for Q/K, V of width
    C/h, ``O_j = softmax(Q_jK_jᵀ/√d + B_j)V_j`` with ``B_j`` a learned bias per head indexed by the
    absolute row and column offsets of the two tokens (grid sides up to ``bias_side``); outputs concatenated
    and projected."""

    def __init__(self, dim: int, heads: int = 4, qk_dim: int = 16, kernel: int = 3, bias_side: int = 16):
        super().__init__()
        _check_width("CascadedGroupAttention", dim, heads)
        self.heads, self.chunk, self.qk_dim, self.bias_side = heads, dim // heads, qk_dim, bias_side
        self.qkv = nn.ModuleList(nn.Linear(self.chunk, 2 * qk_dim + self.chunk) for _ in range(heads))
        self.dw = nn.ModuleList(nn.Conv2d(qk_dim, qk_dim, kernel, padding=kernel // 2, groups=qk_dim)
                                for _ in range(heads))
        self.attention_bias = nn.Parameter(torch.zeros(heads, bias_side * bias_side))
        self.proj = nn.Linear(dim, dim)

    def bias(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(heads, N, N)`` every head's bias ``B_j[|Δrow|·bias_side + |Δcol|]`` on the grid."""
        return self.attention_bias[:, _abs_offsets(grid, self.bias_side, self.attention_bias.device)]

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        if max(grid) > self.bias_side:
            raise AttnZooError(f"CascadedGroupAttention: grid sides expected <= bias_side={self.bias_side}, "
                               f"got {grid}")
        bias = self.bias(grid).to(x.dtype)
        outs, prev = [], 0
        for j, xj in enumerate(x.chunk(self.heads, dim=-1)):
            q, k, v = self.qkv[j](xj + prev).split([self.qk_dim, self.qk_dim, self.chunk], dim=-1)
            q = G.from_channels_first(self.dw[j](G.to_channels_first(q, grid)))
            # the bias as SDPA's additive mask (one fused call; its gradient reaches the table), as Swin's
            prev = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[j])
            outs.append(prev)
        return self.proj(torch.cat(outs, dim=-1))


@functools.lru_cache(maxsize=8)
def _abs_offsets(grid: tuple[int, int], side: int, device) -> torch.Tensor:
    """``(N, N)`` index ``|Δrow|·side + |Δcol|`` of every token pair of a row-major grid."""
    r, c = (t.flatten() for t in torch.meshgrid(torch.arange(grid[0], device=device),
                                                torch.arange(grid[1], device=device), indexing="ij"))
    return (r[:, None] - r[None]).abs() * side + (c[:, None] - c[None]).abs()


class FlatFormerAttention(_QKV):
    """FlatFormer flattened window attention: tokens (grid cells, or points with int ``coords``) sorted by
    window then along ``axis`` inside it, cut into equal groups of ``group`` tokens, dense attention inside
    each group, outputs put back in the input order. Alternate ``axis`` and ``shift`` between blocks."""

    def __init__(self, dim: int, heads: int = 4, group: int = 16, window: int = 4, axis: int = 0, shift: int = 0):
        super().__init__(dim, heads, "FlatFormerAttention")
        self.group, self.window, self.axis, self.shift = group, window, axis, shift

    def order(self, grid, n: int, device) -> torch.Tensor:
        """The sort: ``grid`` is a grid shape or an int ``(N, d)`` tensor of point coordinates."""
        if isinstance(grid, torch.Tensor):
            coords = grid
        else:
            grid = G.check_grid(grid, n)
            coords = torch.stack(torch.meshgrid(*[torch.arange(g, device=device) for g in grid], indexing="ij"),
                                 -1).reshape(n, -1)
        if coords.shape[0] != n:
            raise AttnZooError(f"grid: expected {n} point coordinates, got {tuple(coords.shape)}")
        return G.flat_window_order(coords, self.window, self.axis, self.shift)

    def forward(self, x, grid):
        n = x.shape[1]
        order = self.order(grid, n, x.device)
        q, k, v = (t[:, :, order] for t in self.split(x))
        g = min(self.group, n)
        nq = -(-n // g)
        layout = BlockLayout.from_indices(torch.arange(nq, device=x.device).view(1, 1, nq, 1), block_q=g, block_k=g,
                                          len_q=n, len_k=n)
        out, _ = attend(q, k, v, layout, scale=q.shape[-1] ** -0.5, causal=False)
        return self.proj(_merge_heads(out[:, :, torch.argsort(order)]))


class SHViTAttention(nn.Module):
    """SHViT single-head attention on the first ``partial`` channels (default C/4.67, at least 8); the other
    channels pass through; concatenation then projection."""

    def __init__(self, dim: int, partial: int | None = None, qk_dim: int = 16):
        super().__init__()
        self.partial = partial or max(8, int(dim / 4.67))
        if not 1 <= self.partial <= dim:
            raise AttnZooError(f"SHViTAttention: expected 1 <= partial <= dim={dim}, got {self.partial}")
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(self.partial, 2 * qk_dim + self.partial)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid=None):
        xa, rest = x[..., :self.partial], x[..., self.partial:]
        q, k, v = self.qkv(xa).split([self.qk_dim, self.qk_dim, self.partial], dim=-1)
        out = attention(q[:, None], k[:, None], v[:, None], method="exact")[:, 0]
        return self.proj(torch.cat([out, rest], dim=-1))


class FITAttention(nn.Module):
    """FIT (far-reaching interleaved transformer): local self-attention within groups of ``group`` tokens,
    then a global step: each group's ``latents`` learned tokens read their group (cross-attention), all
    latents attend each other, and the data tokens read their group's latents back (residual).
    ``latents=0`` removes the latent path (only the local layer)."""

    def __init__(self, dim: int, heads: int = 4, group: int = 64, latents: int = 4):
        super().__init__()
        _check_width("FITAttention", dim, heads)
        self.heads, self.group, self.n_latents = heads, group, latents
        self.local = _QKV(dim, heads, "FITAttention")
        if latents:
            self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
            self.read, self.mix, self.write = (_QKV(dim, heads, "FITAttention") for _ in range(3))

    def forward(self, x, grid=None):
        B, n, C = x.shape
        g = min(self.group, n)
        pad = (-n) % g
        xg = F.pad(x, (0, 0, 0, pad)).reshape(B * ((n + pad) // g), g, C)
        kpm = (torch.arange(n + pad, device=x.device) < n).view(-1, g).repeat(B, 1)
        q, k, v = self.local.split(xg)
        y = xg + self.local.proj(_merge_heads(attention(q, k, v, method="exact", key_padding_mask=kpm)))
        if self.n_latents:
            lat = self.latents.expand(y.shape[0], -1, -1)
            lat = lat + self.read.attend(lat, y, key_padding_mask=kpm)
            flat = lat.reshape(B, -1, C)
            flat = flat + self.mix.attend(flat, flat)
            y = y + self.write.attend(y, flat.reshape_as(lat))
        return y.reshape(B, n + pad, C)[:, :n] - x  # the mixer's update (the block adds the residual)


class EchoAttention(nn.Module):
    """EchoAtt: a stack of ``depth`` attention layers (pre-norm, residual) where each layer in ``shared``
    skips its Q/K projections and scores and reuses the previous layer's attention map:
    ``A^{(ℓ-1)} V^{(ℓ)}``. ``shared=()`` is the plain stack."""

    def __init__(self, dim: int, heads: int = 4, depth: int = 3, shared: tuple[int, ...] = (1,)):
        super().__init__()
        _check_width("EchoAttention", dim, heads)
        if any(not 1 <= s < depth for s in shared):
            raise AttnZooError(f"EchoAttention: shared layers must be in [1, depth={depth}), got {shared}")
        self.heads, self.shared = heads, set(shared)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.qk = nn.ModuleList(None if i in self.shared else nn.Linear(dim, 2 * dim) for i in range(depth))
        self.v = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x, grid=None):
        y, amap = x, None
        for i, (norm, qk, vp, proj) in enumerate(zip(self.norms, self.qk, self.v, self.proj)):
            h = norm(y)
            v = _split_heads(vp(h), self.heads)
            if qk is not None:
                q, k = (_split_heads(t, self.heads) for t in qk(h).chunk(2, -1))
                amap = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
            y = y + proj(_merge_heads(amap @ v))
        return y - x
