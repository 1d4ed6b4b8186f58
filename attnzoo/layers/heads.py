"""Head-level learned layers: MoH (heads as routed experts), Sigma's DiffQKV (K and V shaped apart)
and MASFormer's layer plan (full attention in a few layers, windows in the rest).

Both layers compute their attention with a registered method (``method``, default ``exact``), so
their heads run on the same engines as everything else.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..api import attention
from ..core.blocksparse import TokenLayout, attend
from ..errors import AttnZooError
from .linear import _check_width, _merge_heads, _split_heads


def stable_topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of the last dim; ties go to the lower index (deterministic)."""
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, True)


class MoHLayer(nn.Module):
    """Mixture-of-Head attention (Jin et al., 2024): ``y = Σ_i w_i(x) · H_i(x) W_O^i``.

    ``shared`` heads are always active with weights ``β_s·softmax(W_s x)``; of the
    routed heads each token activates the ``active`` best by ``W_r x``, weighted
    ``β_r·softmax`` over those; ``[β_s, β_r] = softmax(W_h x)``. ``route=False``
    sets every weight to 1 (standard multi-head attention). After a routed
    forward, ``balance_loss`` holds the routed heads' load-balancing loss
    (Switch-style ``n_r · Σ_i f_i P_i``: 1 when balanced).
    """

    def __init__(self, d_model: int, n_heads: int = 4, shared: int = 1, active: int | None = None,
                 route: bool = True, causal: bool = True, method: str = "exact"):
        super().__init__()
        _check_width("MoHLayer", d_model, n_heads)
        routed = n_heads - shared
        active = max(1, routed // 2) if active is None else active
        if not (0 <= shared <= n_heads and (routed == 0 or 1 <= active <= routed)):
            raise AttnZooError(f"MoHLayer: expected 0 <= shared <= n_heads={n_heads} and 1 <= active <= routed heads "
                               f"({routed}), got shared={shared}, active={active}")
        self.n_heads, self.shared, self.active, self.route, self.causal, self.method = \
            n_heads, shared, active, route, causal, method
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.w_shared = nn.Linear(d_model, max(shared, 1), bias=False)
        self.w_routed = nn.Linear(d_model, max(routed, 1), bias=False)
        self.w_balance = nn.Linear(d_model, 2, bias=False)
        self.balance_loss = torch.zeros(())

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token head weights ``(B, N, H)`` (zero for routed heads a token does not activate)."""
        hs, hr = self.shared, self.n_heads - self.shared
        beta = self.w_balance(x).softmax(-1) if hs and hr else x.new_ones(*x.shape[:-1], 2)
        parts = []
        if hs:
            parts.append(beta[..., :1] * self.w_shared(x).softmax(-1))
        if hr:
            logits = self.w_routed(x)
            keep = stable_topk_mask(logits, self.active)
            parts.append(beta[..., 1:] * logits.masked_fill(~keep, float("-inf")).softmax(-1))
            f = keep.float().flatten(0, -2).mean(0) / self.active  # share of routing slots per head
            p = logits.softmax(-1).flatten(0, -2).mean(0)
            self.balance_loss = hr * (f * p).sum()
        return torch.cat(parts, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        heads = attention(q, k, v, method=self.method, causal=self.causal)  # (B, H, N, dh)
        if self.route:
            heads = heads * self.head_weights(x).transpose(1, 2).unsqueeze(-1)
        return self.o_proj(_merge_heads(heads))

    def state_size(self, seq_len: int) -> int:
        return 2 * seq_len * self.o_proj.in_features  # every key and value (routing saves compute, not cache)


class DiffQKVLayer(nn.Module):
    """Sigma's DiffQKV (Lin et al., 2025): ``n_heads`` query heads, ``k_heads`` key heads of width ``d_k``
    and ``v_heads`` value heads of width ``d_v``, grouped separately (query head h reads key head
    ``h // (n_heads / k_heads)`` and value head ``h // (n_heads / v_heads)``).

    ``aug_q > 0`` augments the query path with a hidden layer of that width
    (``q = W_q x + W_b silu(W_a x)``; the KV cache is unchanged). ``v_topk`` (a
    constructor default or per call) is selective V fetching: scores use every key,
    then only the ``v_topk`` best keys per query (and their values) are attended.
    """

    def __init__(self, d_model: int, n_heads: int = 4, k_heads: int = 1, v_heads: int = 2, d_k: int | None = None,
                 d_v: int | None = None, aug_q: int = 0, v_topk: int | None = None, causal: bool = True):
        super().__init__()
        _check_width("DiffQKVLayer", d_model, n_heads)
        d_k = d_k or d_model // n_heads
        d_v = d_v or d_model // n_heads
        groups = math.lcm(k_heads, v_heads) if k_heads > 0 and v_heads > 0 else 0
        if groups == 0 or n_heads % groups:
            raise AttnZooError(f"DiffQKVLayer: expected k_heads and v_heads >= 1 with lcm(k_heads, v_heads) dividing "
                               f"n_heads={n_heads}, got k_heads={k_heads}, v_heads={v_heads}")
        self.n_heads, self.k_heads, self.v_heads, self.groups = n_heads, k_heads, v_heads, groups
        self.d_k, self.d_v, self.v_topk, self.causal = d_k, d_v, v_topk, causal
        self.q_proj = nn.Linear(d_model, n_heads * d_k, bias=False)
        self.q_aug = nn.Sequential(nn.Linear(d_model, aug_q, bias=False), nn.SiLU(),
                                   nn.Linear(aug_q, n_heads * d_k, bias=False)) if aug_q else None
        self.k_proj = nn.Linear(d_model, k_heads * d_k, bias=False)
        self.v_proj = nn.Linear(d_model, v_heads * d_v, bias=False)
        self.o_proj = nn.Linear(n_heads * d_v, d_model, bias=False)

    def forward(self, x: torch.Tensor, v_topk: int | None = None) -> torch.Tensor:
        qx = self.q_proj(x) + (self.q_aug(x) if self.q_aug is not None else 0)
        q = _split_heads(qx, self.n_heads)
        # one engine call: K and V repeated to lcm(k_heads, v_heads) groups (GQA over those groups)
        k = _split_heads(self.k_proj(x), self.k_heads).repeat_interleave(self.groups // self.k_heads, dim=1)
        v = _split_heads(self.v_proj(x), self.v_heads).repeat_interleave(self.groups // self.v_heads, dim=1)
        topk = self.v_topk if v_topk is None else v_topk
        if topk is None or topk >= x.shape[1]:
            out = attention(q, k, v, method="exact", causal=self.causal)
        else:
            out = attend(q, k, v, self.selected(q, k, topk), scale=self.d_k**-0.5, causal=self.causal)[0]
        return self.o_proj(_merge_heads(out))

    def state_size(self, seq_len: int) -> int:
        return seq_len * (self.k_heads * self.d_k + self.v_heads * self.d_v)  # the K and V caches, sized apart

    def selected(self, q: torch.Tensor, k: torch.Tensor, topk: int) -> TokenLayout:
        """Per query head and row, the ``topk`` visible keys with the highest scores (the V rows to fetch)."""
        N = q.shape[2]
        kk = k.repeat_interleave(self.n_heads // self.groups, dim=1)
        s = q @ kk.transpose(-1, -2)
        if self.causal:
            s = s.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        vals, idx = s.topk(topk, dim=-1)
        return TokenLayout(torch.where(torch.isfinite(vals), idx, -1), group=1, len_q=N, len_k=N)


def masformer_plan(n_layers: int, full_layers: int | list[int] = 1, window: int = 64) -> list[tuple[str, dict]]:
    """MASFormer (Zhang et al., 2023): full attention in ``full_layers`` (a count placed evenly, or the
    indices), sliding-window attention of ``window`` keys elsewhere -- a per-layer mixer plan for
    :class:`attnzoo.train.TinyModel`."""
    if isinstance(full_layers, int):
        if not 0 <= full_layers <= n_layers:
            raise AttnZooError(f"masformer_plan: full_layers expected 0..n_layers={n_layers}, got {full_layers}")
        full = {int((i + 0.5) * n_layers / full_layers) for i in range(full_layers)}  # the middle of each share
    else:
        full = set(full_layers)
        if not full <= set(range(n_layers)):
            raise AttnZooError(f"masformer_plan: full_layers expected indices in 0..{n_layers - 1}, got {sorted(full)}")
    return [("exact", {}) if i in full else ("sliding_window", {"window": window}) for i in range(n_layers)]
