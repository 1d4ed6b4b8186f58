"""SSE, sparse state expansion (Pan et al., 2025): a linear-attention state split into partitions.

A router ``e_t = softmax(x_t W_e)`` picks the top-``top_k`` of ``partitions``
states per token (ties to the lower index). Only the picked partitions decay
and take the token's write; every other partition is left unchanged::

    S^(i)_t = exp(g_t)·S^(i)_{t-1} + e_{t,i}·k_tᵀ v_t      (i picked at t)
    o_t     = Σ_{i picked} e_{t,i} · q_t S^(i)_t

Per partition that is the chunked linear recurrence (:func:`attnzoo.core.linear.linear_attention`)
with the key scaled by ``e_{t,i}``, the log-gate zeroed where i is not picked, and
the query scaled by ``e_{t,i}`` (zero where not picked): state capacity grows with
``partitions`` at fixed parameters. The host is a GLA-style scalar data-dependent
forget gate per head; feature map ReLU-free (raw q, k, like GLA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.linear import linear_attention
from ..errors import AttnZooError
from .heads import stable_topk_mask
from .linear import _check_width, _merge_heads, _split_heads


class SSELayer(nn.Module):
    """Causal sparse-state-expansion linear attention; ``forward(x, form=...)`` (``"chunked"`` or
    ``"recurrent"``, which agree) returns ``y``. ``partitions = top_k = 1`` is the host gated
    linear attention exactly."""

    def __init__(self, d_model: int, n_heads: int = 2, partitions: int = 4, top_k: int = 1, tau: float = 16.0,
                 chunk: int = 64):
        super().__init__()
        _check_width("SSELayer", d_model, n_heads)
        if not 1 <= top_k <= partitions:
            raise AttnZooError(f"SSELayer: expected 1 <= top_k <= partitions, got top_k={top_k}, partitions={partitions}")
        self.n_heads, self.partitions, self.top_k, self.tau, self.chunk = n_heads, partitions, top_k, tau, chunk
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.router = nn.Linear(d_model, partitions, bias=False)
        self.gate = nn.Linear(d_model, n_heads)
        self.norm = nn.GroupNorm(n_heads, d_model)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights ``(B, N, partitions)``: softmax probabilities on the picked partitions, 0 elsewhere."""
        e = self.router(x).softmax(-1)
        return e * stable_topk_mask(e, self.top_k)

    def forward(self, x: torch.Tensor, form: str = "chunked") -> torch.Tensor:
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        q = q * q.shape[-1] ** -0.5
        g = (F.logsigmoid(self.gate(x)) / self.tau).transpose(1, 2).unsqueeze(-1)  # (B, H, N, 1)
        e = self.routing(x).transpose(1, 2).unsqueeze(1).unsqueeze(-1)  # (B, 1, P, N, 1)
        out = 0
        for i in range(self.partitions):
            w = e[:, :, i]  # (B, 1, N, 1)
            picked = w > 0
            o, _ = linear_attention(q * w, k * w, v, causal=True, gate=g * picked, form=form, chunk=self.chunk)
            out = out + o
        out = _merge_heads(out)
        return self.o_proj(self.norm(out.reshape(-1, out.shape[-1])).view_as(out))

    def state_size(self, seq_len: int) -> int:
        d = self.o_proj.in_features
        return self.partitions * d * d // self.n_heads  # one (d/H)² matrix per head per partition
