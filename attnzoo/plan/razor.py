"""``razor``: RazorAttention's retrieval-head score on a repeated random-token probe.

The probe is ``R R`` for ``probe`` random tokens ``R``. On the second copy, a head that can retrieve
from far back puts attention on the earlier copy of the current token (echo, position ``i - L``)
or on the token that followed it (induction, ``i - L + 1``). A head's score is the mean of that
attention over the second copy; a KV head takes its query heads' maximum. Streaming heads keep one
compensation token (the mean of what they evicted), as RazorAttention does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import param
from .base import SplitCalibrator, bos, capture, heads_kv_of, per_kv_head, register_calibrator, token_range


@register_calibrator
@dataclass
class Razor(SplitCalibrator):
    """Retrieval heads by echo + induction attention on a repeated random-token probe (RazorAttention)."""

    name: ClassVar[str] = "razor"
    compensation: ClassVar[bool] = True

    probe: int = param(512, min=4, max=1 << 15, help="random tokens in the probe (it is read twice)")

    def scores(self, model, tokenizer=None) -> torch.Tensor:
        lo, hi = token_range(model)
        gen = torch.Generator().manual_seed(self.seed)
        r = torch.randint(lo, hi, (self.probe,), generator=gen).tolist()
        prefix = bos(model, tokenizer)
        start, L = len(prefix) + self.probe, self.probe
        out = []
        for q, k, _ in capture(model, prefix + r + r):
            q2 = q[0, :, start:]                                        # (H, L, D) queries on the second copy
            logits = q2 @ k[0].transpose(-1, -2) * q.shape[-1] ** -0.5  # (H, L, S)
            pos_q = torch.arange(start, start + L)
            logits = logits.masked_fill(torch.arange(k.shape[2]) > pos_q[:, None], float("-inf"))
            p = logits.softmax(-1)
            echo = p.gather(-1, (pos_q - L).expand(p.shape[0], L)[..., None])[..., 0]
            induction = p.gather(-1, (pos_q - L + 1).expand(p.shape[0], L)[..., None])[..., 0]
            out.append((echo + induction).mean(-1))
        return per_kv_head(torch.stack(out), heads_kv_of(model))
