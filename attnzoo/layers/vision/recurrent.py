"""Linear-state and memory mixers: ScatterFormer (V9), ESSA (V10) and LightNet (V11) on the chunked linear
engine (``core/linear.py``), Titans' linear neural memory with momentum (V19; its own chunk form, the state
being two matrices) and the Reactive Transformer's short-term memory (V20). Each maps ``x (B, N, C)`` (a row-major ``grid`` or a sequence) to ``(B, N, C)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import grid as G
from ...core.features import elu_plus_one
from ...core.linear import linear_attention
from ..linear import _check_width, _merge_heads, _split_heads
from .attention import GlobalAttention, _QKV


def _window_slots(window_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows as padded rows: ``slots (n_win, m)`` token indices (m = the largest window), ``valid (n_win, m)``
    and ``position (N,)``, each token's index in the flattened ``(n_win·m)`` rows."""
    order = torch.argsort(window_id, stable=True)
    counts = torch.bincount(window_id)
    n_win, m = counts.numel(), int(counts.max())
    wid = window_id[order]
    rank = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[wid]
    slots = torch.zeros(n_win, m, dtype=torch.long, device=order.device)
    valid = torch.zeros(n_win, m, dtype=torch.bool, device=order.device)
    slots[wid, rank], valid[wid, rank] = order, True
    position = torch.empty_like(order)
    position[order] = wid * m + rank
    return slots, valid, position


def windowed_linear_attention(q, k, v, window_id: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ScatterFormer's scattered linear attention: per window ``w`` the state ``S_w = Σ_{j∈w} φ(k_j)ᵀv_j``,
    ``z_w = Σ_{j∈w} φ(k_j)`` (φ = elu+1), ``o_i = φ(q_i)S_{w(i)} / (φ(q_i)·z_{w(i)} + eps)``, for all windows at
    once (``window_id (N,)``; windows need not be contiguous or equal): the windows are gathered as padded
    rows (padding keys weigh 0), so states and outputs are two batched matmuls over the windows."""
    slots, valid, position = _window_slots(window_id)
    fk = elu_plus_one(k)[:, :, slots] * valid[..., None].to(k.dtype)  # (B, H, n_win, m, D)
    kv = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)[:, :, slots]
    states = fk.transpose(-1, -2) @ kv  # (B, H, n_win, D, Dv + 1)
    out = (elu_plus_one(q)[:, :, slots] @ states).flatten(2, 3)[:, :, position]
    return out[..., :-1] / (out[..., -1:] + eps)


class ScatterFormerAttention(_QKV):
    """ScatterFormer: linear attention inside each ``window × window`` window of the grid (one segmented
    pass, no padding), plus a cross-window depthwise 3×3 convolution on the map instead of shifting."""

    def __init__(self, dim: int, heads: int = 4, window: int = 4):
        super().__init__(dim, heads, "ScatterFormerAttention")
        self.window = window
        self.cross = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, grid):
        grid = G.check_grid(grid, x.shape[1], dims=(2,))
        q, k, v = self.split(x)
        out = _merge_heads(windowed_linear_attention(q, k, v, G.window_ids(grid, self.window, device=x.device)))
        return self.proj(out + G.from_channels_first(self.cross(G.to_channels_first(x, grid))))


def essa_attention(q, k, v, eps: float = 1e-6) -> torch.Tensor:
    """ESSA's spectral-correlation kernel attention with the first-order surrogate ``1 + q̂·k̂`` (q̂, k̂
    centred over channels and L2-normalised): ``O_i = (Σ_j v_j + q̂_i·K̂ᵀV) / (N + q̂_i·Σ_j k̂_j)``, as a
    non-causal normalised linear attention with features ``[1, q̂]`` and ``[1, k̂]``."""
    def feat(t):
        t = F.normalize(t - t.mean(-1, keepdim=True), dim=-1)
        return torch.cat([torch.ones_like(t[..., :1]), t], dim=-1)
    out, _ = linear_attention(feat(q), feat(k), v, causal=False, normalize=True, eps=eps)
    return out


class ESSAAttention(_QKV):
    """ESSA (V10): multi-head spectral-correlation linear attention (:func:`essa_attention`)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__(dim, heads, "ESSAAttention")

    def forward(self, x, grid=None):
        return self.proj(_merge_heads(essa_attention(*self.split(x))))


def lightnet_attention(q, f, v, *, causal: bool, form: str = "chunked", chunk: int = 64) -> torch.Tensor:
    """LightNet's additive recurrence on ``SiLU(q)``: per channel ``z_t = logaddexp(z_{t-1}, f_t)``,
    ``k_t = exp(f_t - z_t)``, decay ``λ_t = exp(z_{t-1} - z_t)``, so ``S_t`` is the softmax-weighted prefix sum
    ``Σ_{j≤t} exp(f_j) v_jᵀ / Σ_{j≤t} exp(f_j)``; non-causal uses one global ``S = Σ_j softmax_j(f) v_jᵀ``."""
    q = F.silu(q)
    if not causal:
        out, _ = linear_attention(q, f.softmax(dim=2), v, causal=False)
        return out
    z = torch.logcumsumexp(f if f.dtype == torch.float64 else f.float(), dim=2)
    prev = F.pad(z, (0, 0, 1, 0), value=float("-inf"))[:, :, :-1]
    gate = (prev - z).clamp(max=0).to(q.dtype)
    out, _ = linear_attention(q, (f - z).exp().to(q.dtype), v, causal=True, gate=gate, form=form, chunk=chunk)
    return out


class LightNetAttention(nn.Module):
    """LightNet (V11): :func:`lightnet_attention` per head, then a group norm and a low-rank sigmoid output
    gate. Non-causal on grids (one scan for any token order); ``causal=True`` for sequences."""

    def __init__(self, dim: int, heads: int = 4, gate_rank: int = 16, causal: bool = False):
        super().__init__()
        _check_width("LightNetAttention", dim, heads)
        self.heads, self.causal = heads, causal
        self.qfv = nn.Linear(dim, 3 * dim)
        self.norm = nn.GroupNorm(heads, dim)
        self.gate = nn.Sequential(nn.Linear(dim, gate_rank, bias=False), nn.Linear(gate_rank, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid=None):
        q, f, v = (_split_heads(t, self.heads) for t in self.qfv(x).chunk(3, dim=-1))
        o = _merge_heads(lightnet_attention(q, f, v, causal=self.causal))
        o = self.norm(o.transpose(1, 2)).transpose(1, 2)
        return self.proj(o * torch.sigmoid(self.gate(x)))


def _decay_matrix(log_cum: torch.Tensor) -> torch.Tensor:
    """``(.., b)`` cumulative log-decays -> ``(.., b, b)`` with ``[j, t] = exp(l_t - l_j)`` for ``j <= t``, else 0:
    the product of the decays of tokens ``j+1 .. t``."""
    b = log_cum.shape[-1]
    later = torch.ones(b, b, dtype=torch.bool, device=log_cum.device).triu()
    return (log_cum.unsqueeze(-2) - log_cum.unsqueeze(-1)).masked_fill(~later, float("-inf")).exp()


def titans_memory(q, k, v, theta, alpha, memory: torch.Tensor, chunk: int = 16, eta=None,
                  surprise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Titans' linear neural memory, read after each update: the memory ``M (B, H, Dk, Dv)`` learns at test
    time from the associative loss ``ℓ_t = ‖k_t M - v_t‖²`` with data-dependent gates ``(B, H, N, 1)``:
    step ``θ_t``, forgetting ``α_t`` and momentum ``η_t`` (None = 0, no momentum)::

        S_t = η_t S_{t-1} - θ_t ∇ℓ_t(M_c),   M_t = (1 - α_t) M_{t-1} + S_t,   y_t = q_t M_t

    with the gradient taken at the chunk-start memory ``M_c`` (Titans' mini-batch form), so that
    ``-θ_t∇ℓ_t = k_tᵀ w_t``, ``w_t = 2θ_t(v_t - k_t M_c)``, is rank one and known for the whole chunk. The
    two recurrences then unroll into ``M_t = A_t M_c + g_t S_c + Σ_{s≤t} C[s, t] k_sᵀ w_s``, where
    ``C = Y·X`` multiplies the momentum decays ``Y[s, j]`` (η of tokens s+1..j) by the forgetting decays
    ``X[j, t]`` (1 - α of tokens j+1..t): per chunk, attention-like products with a ``b × b`` weight,
    O(N·b·D + N·D²). Everything but the chunk-to-chunk state passing runs for all chunks at once (the
    sequence padded to whole chunks; padding comes after the last token, so it changes nothing).
    ``surprise`` is the incoming ``S`` (None = 0). Returns ``(y, final M, final S)``."""
    B, H, N, _ = q.shape
    b = max(1, min(chunk, N))
    nc = -(-N // b)
    pad = nc * b - N

    def chunks(t):  # (B, H, N, X) -> (B, H, nc, b, X), zero-padded after the end
        return (F.pad(t, (0, 0, 0, pad)) if pad else t).reshape(B, H, nc, b, t.shape[-1])

    qc, kc, vc, thc = chunks(q), chunks(k), chunks(v), chunks(theta)
    la = chunks(torch.log1p(-alpha.clamp(max=1.0 - 1e-6)))[..., 0].cumsum(-1)  # (B, H, nc, b)
    X = _decay_matrix(la)
    end = (N - 1) - (nc - 1) * b  # the last real token of the last chunk
    ends = torch.full((nc,), b - 1, device=q.device)
    ends[-1] = end
    if eta is None:  # S_t = the token's own update: Y = I, S_c does not reach M_t
        Y, C, g = None, X, torch.zeros_like(la)
    else:
        le = chunks(torch.log(eta.clamp(min=1e-30)))[..., 0].cumsum(-1)
        Y = _decay_matrix(le)
        C = Y @ X
        g = (le.exp().unsqueeze(-2) @ X).squeeze(-2)  # Σ_j η_1..η_j · X[j, t]: S_c's weight in M_t
    idx = torch.arange(nc, device=q.device)
    # the weights that carry a chunk into the next chunk's start state, at each chunk's last (real) token
    m_keep = la[..., idx, ends].exp()[..., None, None]  # (B, H, nc, 1, 1)
    m_from_s = g[..., idx, ends][..., None, None]
    c_end = C.transpose(-1, -2)[:, :, idx, ends].unsqueeze(-1)  # (B, H, nc, b, 1): C[s, end]
    if Y is None:  # S after a chunk is its last token's own update
        s_keep = torch.zeros((), dtype=q.dtype, device=q.device).expand(1, 1, nc, 1, 1)
        y_end = F.one_hot(ends, b).to(q.dtype)[None, None, :, :, None]
    else:
        s_keep = le[..., idx, ends].exp()[..., None, None]
        y_end = Y.transpose(-1, -2)[:, :, idx, ends].unsqueeze(-1)
    M = memory
    S = torch.zeros_like(memory) if surprise is None else surprise
    Ms, Ss, ws = [], [], []
    # only the states pass from chunk to chunk; the per-chunk slices come from one unbind each (indexing
    # chunk by chunk would make every slice's backward write a full-size gradient)
    for k_c, v_c, th_c, mk, ms, ce, sk, ye in zip(*(t.unbind(2) for t in (
            kc, vc, 2 * thc, m_keep, m_from_s, c_end, s_keep, y_end))):
        w = th_c * (v_c - k_c @ M)
        Ms.append(M)
        Ss.append(S)
        ws.append(w)
        kt = k_c.transpose(-1, -2)
        M, S = mk * M + ms * S + kt @ (ce * w), sk * S + kt @ (ye * w)
    Mc, Sc, W = torch.stack(Ms, 2), torch.stack(Ss, 2), torch.stack(ws, 2)
    y = (qc @ kc.transpose(-1, -2) * C.transpose(-1, -2)) @ W + la.exp().unsqueeze(-1) * (qc @ Mc)
    if Y is not None:
        y = y + g.unsqueeze(-1) * (qc @ Sc)
    return y.reshape(B, H, nc * b, -1)[:, :, :N], M, S


class TitansMemory(nn.Module):
    """Titans (V19), linear memory variant as a mixer over the tokens in order: per head a ``Dk × Dv``
    memory (learned initial value) updated at test time by :func:`titans_memory`; the step
    ``θ_t = θ_max·σ(·)``, forgetting ``α_t = σ(·)`` and momentum ``η_t = σ(·)`` (``momentum=False``: η = 0)
    come from the token."""

    def __init__(self, dim: int, heads: int = 4, chunk: int = 64, theta_max: float = 0.5, momentum: bool = True):
        super().__init__()
        _check_width("TitansMemory", dim, heads)
        self.heads, self.chunk, self.theta_max, self.momentum = heads, chunk, theta_max, momentum
        d = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.gates = nn.Linear(dim, (3 if momentum else 2) * heads)
        self.memory0 = nn.Parameter(torch.zeros(heads, d, d))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid=None):
        B, n, _ = x.shape  # one contiguous (3, B, H, N, d) copy: the memory's many small ops run on dense rows
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).contiguous()
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        th, al, *eta = torch.sigmoid(self.gates(x)).view(B, n, -1, self.heads).permute(2, 0, 3, 1).unsqueeze(-1)
        mem = self.memory0.expand(x.shape[0], -1, -1, -1)
        y, _, _ = titans_memory(q, k, v, self.theta_max * th, al, mem, self.chunk, eta=eta[0] if eta else None)
        return self.proj(_merge_heads(y))


class RxTLayer(nn.Module):
    """Reactive Transformer (V20) decoder mixer: causal self-attention over the current interaction plus
    memory cross-attention to the short-term memory ``stm (B, S, C)`` of the previous turns (none = a stateless
    decoder). :meth:`update` writes a finished interaction into the memory: ``ED = Encoder(interaction)``,
    ``U = Attn(Q=STM, K=V=ED)``, ``G = σ(Linear(STM + U))``, ``STM' = (1-G)⊙STM + G⊙U``."""

    def __init__(self, dim: int, heads: int = 4, slots: int = 8):
        super().__init__()
        _check_width("RxTLayer", dim, heads)
        self.heads = heads
        self.self_attn = _QKV(dim, heads, "RxTLayer")
        self.cross = _QKV(dim, heads, "RxTLayer")
        self.encoder = GlobalAttention(dim, heads)
        self.mem_attn = _QKV(dim, heads, "RxTLayer")
        self.gate = nn.Linear(dim, dim)
        self.stm0 = nn.Parameter(torch.randn(slots, dim) * 0.02)

    def initial_memory(self, batch: int) -> torch.Tensor:
        return self.stm0.expand(batch, -1, -1)

    def forward(self, x, grid=None, stm: torch.Tensor | None = None):
        y = self.self_attn.attend(x, x, causal=True)
        if stm is not None and stm.shape[1]:
            y = y + self.cross.attend(x, stm)
        return y

    def update(self, stm: torch.Tensor, interaction: torch.Tensor) -> torch.Tensor:
        ed = interaction + self.encoder(interaction)
        u = self.mem_attn.attend(stm, ed)
        g = torch.sigmoid(self.gate(stm + u))
        return (1 - g) * stm + g * u
