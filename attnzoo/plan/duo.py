"""``duo``: DuoAttention's training-free variant: how much each KV head's output changes when it streams.

On passkey prompts with their answer appended (:func:`~attnzoo.plan.base.calibration_prompts`) each
layer's attention output at the positions that produce the answer (and the ``queries`` prompt
positions before them) is computed twice per head: over every earlier key, and over the ``sinks`` +
``window`` keys a streaming head keeps. A head's score is the relative error
``|o_stream - o_full| / |o_full|``, averaged over those positions and the prompts; a KV head takes its
query heads' maximum. Streaming heads keep no compensation token (DuoAttention's streaming heads).
The gradient-trained gates are the ``duo_gates`` calibrator (:mod:`attnzoo.plan.gates`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import param
from .base import TASKS, SplitCalibrator, calibration_prompts, capture, heads_kv_of, per_kv_head, register_calibrator


def streaming_mask(q_pos: torch.Tensor, n_keys: int, sinks: int, window: int) -> torch.Tensor:
    """``(len(q_pos), n_keys)`` bool: the keys a streaming head reads (causal sinks + the last ``window``)."""
    k = torch.arange(n_keys)[None, :]
    q = q_pos[:, None]
    return (k <= q) & ((k < sinks) | (k > q - window))


@register_calibrator
@dataclass
class Duo(SplitCalibrator):
    """Streaming heads where streaming changes the output least (DuoAttention, training-free)."""

    name: ClassVar[str] = "duo"

    samples: int = param(2, min=1, max=64, help="calibration prompts")
    prompt_length: int = param(1024, min=64, help="tokens per calibration prompt")
    tasks: tuple = param(TASKS, help="tasks the calibration prompts alternate between (text tasks)")
    queries: int = param(0, min=0, help="prompt positions before the answer's that are scored too")

    def scores(self, model, tokenizer=None) -> torch.Tensor:
        total = None
        prompts = calibration_prompts(model, tokenizer, self.samples, self.prompt_length, self.seed, self.tasks)
        window = self.streaming_window()
        for ids, start in prompts:
            pos = torch.arange(max(0, start - 1 - self.queries), len(ids) - 1)
            errs = []
            for q, k, v in capture(model, ids):
                causal = torch.arange(k.shape[2])[None, :] <= pos[:, None]
                qn = q[:, :, pos]
                full = F.scaled_dot_product_attention(qn, k, v, attn_mask=causal)
                part = F.scaled_dot_product_attention(qn, k, v, attn_mask=streaming_mask(pos, k.shape[2],
                                                                                         self.sinks, window))
                err = (part - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)  # (1, H, n)
                errs.append(err[0].mean(-1))
            layer = torch.stack(errs)
            total = layer if total is None else total + layer
        return per_kv_head(total / len(prompts), heads_kv_of(model))
