"""Learned linear / low-rank attention layers on the chunked recurrence engine
(docs/methods.md).

Every layer maps ``x (B, N, d_model)`` to ``(B, N, d_model)``. The recurrent
ones (GLA, Aaren) take and return a state so a prompt can be prefilled and
then decoded token by token with the same outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.features import relu_features
from ..core.linear import LinearState, linear_attention, softmax_prefix_scan
from ..core.partial import Partial
from ..errors import AttnZooError


def _check_width(name: str, d_model: int, n_heads: int) -> None:
    if n_heads < 1 or d_model % n_heads:
        raise AttnZooError(f"{name}: expected n_heads >= 1 dividing d_model={d_model}, got n_heads={n_heads}")


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(B, N, H·d)`` -> ``(B, H, N, d)``."""
    B, n, width = x.shape
    return x.view(B, n, n_heads, width // n_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d)`` -> ``(B, N, H·d)``."""
    B, H, n, d = x.shape
    return x.transpose(1, 2).reshape(B, n, H * d)


class GLALayer(nn.Module):
    """Gated linear attention (Yang et al.): low-rank data-dependent forget gates
    ``α_t = σ(x W₁ W₂ + b)^{1/τ}`` (log-gate ``logsigmoid(·)/τ``), causal
    chunked recurrence, per-head group norm and a Swish output gate:
    ``y = (Swish(x W_r) ⊙ GroupNorm(o)) W_o``. ``forward(x, state)`` returns ``(y, state)``.
    """

    def __init__(self, d_model: int, n_heads: int = 4, expand_k: float = 0.5, gate_rank: int = 16,
                 tau: float = 16.0, chunk: int = 64):
        super().__init__()
        _check_width("GLALayer", d_model, n_heads)
        d_k = int(d_model * expand_k)
        _check_width("GLALayer (key width d_model·expand_k)", d_k, n_heads)
        self.n_heads, self.tau, self.chunk = n_heads, tau, chunk
        self.q_proj = nn.Linear(d_model, d_k, bias=False)
        self.k_proj = nn.Linear(d_model, d_k, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False), nn.Linear(gate_rank, d_k))
        self.out_gate = nn.Linear(d_model, d_model)
        self.norm = nn.GroupNorm(n_heads, d_model)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, state: LinearState | None = None) -> tuple[torch.Tensor, LinearState]:
        h = self.n_heads
        q, k, v = (_split_heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        g = _split_heads(F.logsigmoid(self.gate(x)) / self.tau, h)
        o, state = linear_attention(q * q.shape[-1] ** -0.5, k, v, causal=True, gate=g, chunk=self.chunk,
                                    form="recurrent" if x.shape[1] == 1 else "chunked", state=state)
        o = _merge_heads(o)
        o = self.norm(o.reshape(-1, o.shape[-1])).view_as(o)
        return self.o_proj(F.silu(self.out_gate(x)) * o), state


class LinformerLayer(nn.Module):
    """Linformer: learned ``E, F ∈ R^{k × max_len}`` compress keys and values along
    the sequence, then softmax attention over the ``k`` compressed keys
    (non-causal; sequences up to ``max_len``). ``share_kv`` ties F to E.
    """

    def __init__(self, d_model: int, n_heads: int, max_len: int, k: int = 64, share_kv: bool = False):
        super().__init__()
        _check_width("LinformerLayer", d_model, n_heads)
        self.n_heads, self.max_len = n_heads, max_len
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.e_proj = nn.Parameter(torch.randn(k, max_len) / k**0.5)
        self.f_proj = self.e_proj if share_kv else nn.Parameter(torch.randn(k, max_len) / k**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.max_len:
            raise AttnZooError(f"LinformerLayer: expected a sequence of at most max_len={self.max_len}, got {n}")
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        k = torch.matmul(self.e_proj[:, :n], k)
        v = torch.matmul(self.f_proj[:, :n], v)
        return self.o_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class SLABLayer(nn.Module):
    """SLAB / LiT simplified linear attention: ReLU kernel, normalised
    ``φ(Q)(φ(K)ᵀV) / (φ(Q)(φ(K)ᵀ1) + eps)``, plus a depthwise convolution on V
    added to the output (causal, kernel 4, for language; centred, odd kernel, otherwise).
    """

    def __init__(self, d_model: int, n_heads: int = 4, causal: bool = True, kernel: int = 4, eps: float = 1e-6,
                 chunk: int = 64):
        super().__init__()
        _check_width("SLABLayer", d_model, n_heads)
        if not causal and kernel % 2 == 0:
            raise AttnZooError(f"SLABLayer: a non-causal depthwise convolution needs an odd kernel, got {kernel}")
        self.n_heads, self.causal, self.kernel, self.eps, self.chunk = n_heads, causal, kernel, eps, chunk
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.dwc = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        o, _ = linear_attention(relu_features(_split_heads(q, self.n_heads)), relu_features(_split_heads(k, self.n_heads)),
                                _split_heads(v, self.n_heads), causal=self.causal, normalize=True, eps=self.eps,
                                chunk=self.chunk)
        pad = (self.kernel - 1, 0) if self.causal else ((self.kernel - 1) // 2, (self.kernel - 1) // 2)
        local = self.dwc(F.pad(v.transpose(1, 2), pad)).transpose(1, 2)
        return self.o_proj(_merge_heads(o) + local)


class AarenLayer(nn.Module):
    """Aaren (Feng et al.): a learned query per head attends causally over the
    prefix; every prefix output comes from one parallel scan of the softmax
    monoid, and decoding keeps O(1) state (a :class:`Partial` per head).
    ``forward(x, state)`` returns ``(y, state)``.
    """

    def __init__(self, d_model: int, n_heads: int = 4):
        super().__init__()
        _check_width("AarenLayer", d_model, n_heads)
        self.n_heads = n_heads
        self.query = nn.Parameter(torch.randn(n_heads, d_model // n_heads) / (d_model // n_heads) ** 0.5)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, state: Partial | None = None) -> tuple[torch.Tensor, Partial]:
        k, v = (_split_heads(t, self.n_heads) for t in self.kv(x).chunk(2, dim=-1))
        scores = torch.einsum("hd,bhnd->bhn", self.query, k) * k.shape[-1] ** -0.5
        out, state = softmax_prefix_scan(scores, v, state)
        return self.o_proj(_merge_heads(out)), state
