"""The tiny model the trainer trains: embeddings, a few (mixer + MLP) blocks, a head.

:class:`Block` is the reusable unit (pre-norm residual ``x + mixer(norm(x))``,
``x + mlp(norm(x))``); :class:`TinyModel` stacks blocks over token and learned
position embeddings and ends in per-token logits (``pool=None``, sequence
labelling and recall tasks) or one pooled vector per sequence (``pool="mean"`` /
``"last"``, classification). Models built with the same ``seed`` have identical
weights; building one does not touch the global random state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnZooError
from .mixers import build_mixer


class ShortConv(nn.Module):
    """Causal depthwise convolution over the last ``kernel`` tokens (Zoology's/BASED's short convolution):
    lets a mixer see each token's predecessor without spending an attention layer on it."""

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x.transpose(1, 2), (self.kernel - 1, 0))).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(LN(x))`` then ``x + MLP(LN(x))`` (GELU, ``mlp_ratio``× wide);
    with ``conv > 0`` a :class:`ShortConv` of that kernel runs on the normalised input before the mixer."""

    def __init__(self, d_model: int, mixer: nn.Module, mlp_ratio: int = 4, conv: int = 0):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(d_model), mixer
        self.conv = ShortConv(d_model, conv) if conv else nn.Identity()
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model)) if mlp_ratio else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.conv(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


def _check(name: str, value: int, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise AttnZooError(f"TinyModel: {name} expected an integer >= {lo}, got {value!r}")


class TinyModel(nn.Module):
    """Token model: ``ids (B, N)`` -> logits ``(B, N, n_out)`` (``pool=None``) or ``(B, n_out)``.

    ``mixer`` is a name for :func:`attnzoo.train.build_mixer` (a registered method
    or a learned layer) with ``mixer_params``, or a list with one entry per layer,
    each a name or ``(name, params)`` (a layer plan, e.g. :func:`attnzoo.layers.masformer_plan`);
    ``n_out`` defaults to ``vocab``; ``conv`` adds a short causal convolution before each mixer
    (0: none; only with ``causal=True``).
    """

    def __init__(self, vocab: int, *, d_model: int = 64, n_layers: int = 2,
                 mixer: str | list[str | tuple[str, dict]] = "exact",
                 n_heads: int = 2, max_len: int = 512, n_out: int | None = None, pool: str | None = None,
                 causal: bool = True, mlp_ratio: int = 4, conv: int = 0, seed: int = 0, mixer_params: dict[str, Any] | None = None):
        super().__init__()
        _check("vocab", vocab, 2)
        _check("d_model", d_model, 1)
        _check("n_layers", n_layers, 1)
        _check("max_len", max_len, 1)
        _check("conv", conv, 0)
        if pool not in (None, "mean", "last"):
            raise AttnZooError(f"TinyModel: pool expected None, 'mean' or 'last', got {pool!r}")
        if conv and not causal:
            raise AttnZooError(f"TinyModel: conv expected 0 with causal=False (the short convolution is causal), got {conv}")
        plan = [mixer] * n_layers if isinstance(mixer, str) else list(mixer)
        plan = [(p, {**(mixer_params or {})}) if isinstance(p, str) else (p[0], {**(mixer_params or {}), **p[1]})
                for p in plan]
        if len(plan) != n_layers:
            raise AttnZooError(f"TinyModel: a mixer list needs one name per layer ({n_layers}), got {len(plan)}")
        self.max_len, self.pool, self.plan = max_len, pool, plan
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, d_model)
            self.pos = nn.Embedding(max_len, d_model)
            self.blocks = nn.ModuleList(
                Block(d_model, build_mixer(name, d_model, n_heads, causal=causal, max_len=max_len, **params),
                      mlp_ratio, conv)
                for name, params in plan)
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, n_out or vocab)
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.pos.weight, std=0.02)

    def state_size(self, seq_len: int) -> int | None:
        """Floats of decoding state per sequence after ``seq_len`` tokens, summed over the layers
        (None when some mixer does not report it)."""
        sizes = [getattr(b.mixer, "state_size", lambda n: None)(seq_len) for b in self.blocks]
        return None if any(s is None for s in sizes) else sum(sizes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise AttnZooError(f"TinyModel: ids expected an integer tensor (B, N), got {ids.dtype} {tuple(ids.shape)}")
        n = ids.shape[1]
        if n > self.max_len:
            raise AttnZooError(f"TinyModel: sequence length expected <= max_len={self.max_len}, got {n}")
        x = self.embed(ids) + self.pos.weight[:n]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.pool == "mean":
            x = x.mean(dim=1)
        elif self.pool == "last":
            x = x[:, -1]
        return self.head(x)
