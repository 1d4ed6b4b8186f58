"""score_mod and sinks as the engines see them: checks, the index tensors a mod is called with, the sink merge.

A score_mod is ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's convention; helpers and
the position convention in :mod:`attnzoo.mods`). A sink is a partial ``(out = 0, lse = sinks[h])``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..errors import AttnZooError
from .partial import Partial, merge

#: FlexAttention's score_mod(score, b, h, q_idx, kv_idx) -> score
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_score_mod(score_mod: object, name: str = "score_mod") -> None:
    """Refuse anything but a callable taking ``(score, b, h, q_idx, kv_idx)``."""
    if not callable(score_mod):
        raise AttnZooError(f"{name}: expected a callable score_mod(score, b, h, q_idx, kv_idx) -> score, "
                           f"got {type(score_mod).__name__}")
    try:
        inspect.signature(score_mod).bind(0, 0, 0, 0, 0)
    except TypeError:
        raise AttnZooError(f"{name}: expected a callable score_mod(score, b, h, q_idx, kv_idx) taking 5 positional "
                           f"arguments, got signature {inspect.signature(score_mod)}") from None
    except ValueError:  # builtins without a signature: checked when called
        pass


def call_score_mod(score_mod: ScoreMod, score: torch.Tensor, b, h, q_idx, kv_idx) -> torch.Tensor:
    """Apply ``score_mod``, refusing an output of another shape (a mod must be elementwise)."""
    out = score_mod(score, b, h, q_idx, kv_idx)
    if not isinstance(out, torch.Tensor) or out.shape != score.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AttnZooError(f"score_mod: expected a tensor of the scores' shape {tuple(score.shape)} (elementwise "
                           f"ops on the scores and broadcasting index tensors), got {got}")
    return out.to(score.dtype)


def check_sinks(sinks: object, heads_q: int, device) -> torch.Tensor:
    """``sinks`` must be a finite floating ``(Hq,)`` tensor on the inputs' device."""
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise AttnZooError(f"sinks: expected a floating tensor of shape ({heads_q},) (one logit per query head), got "
                           f"{sinks.dtype if isinstance(sinks, torch.Tensor) else type(sinks).__name__}")
    if tuple(sinks.shape) != (heads_q,):
        raise AttnZooError(f"sinks: expected shape ({heads_q},) (one logit per query head), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise AttnZooError(f"sinks: expected a tensor on {device}, got {sinks.device}")
    if not bool(torch.isfinite(sinks).all()):
        raise AttnZooError("sinks: expected finite values, got NaN or inf")
    return sinks


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> Partial:
    """Merge attention ``(out (B, Hq, N, Dv), lse (B, Hq, N))`` with one sink logit per head: the partial
    ``(0, sinks[h])`` over a key set of its own. Differentiable with respect to ``sinks``."""
    sink_lse = sinks.to(lse.dtype if lse.dtype == torch.float64 else torch.float32)[None, :, None].expand_as(lse)
    return merge(Partial(out, lse), Partial(torch.zeros_like(out), sink_lse))


def apply_score_mod(score_mod: ScoreMod, scores: torch.Tensor, q_offset: int, k_offset: int,
                    head_offset: int = 0) -> torch.Tensor:
    """``score_mod`` on ``(B, H, Nq, Nk)`` scores with broadcastable batch, head and position indices."""
    B, H, len_q, len_k = scores.shape
    dev = scores.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(head_offset, head_offset + H, device=dev).view(1, H, 1, 1)
    qi = torch.arange(q_offset, q_offset + len_q, device=dev).view(1, 1, len_q, 1)
    kj = torch.arange(k_offset, k_offset + len_k, device=dev).view(1, 1, 1, len_k)
    return call_score_mod(score_mod, scores, b, h, qi, kj)
