"""``duo``: DuoAttention's training-free variant: how much each KV head's output changes when it streams.

On passkey prompts (:mod:`attnzoo.tasks`; with no tokenizer, a synthetic one: random filler with a
random key span at a quarter depth, repeated at the end) each layer's attention output on the last
``queries`` positions is computed twice per head: over every earlier key, and over the ``sinks`` +
``window`` keys a streaming head keeps. A head's score is the relative error
``|o_stream - o_full| / |o_full|``, averaged over queries and prompts; a KV head takes its query
heads' maximum. Streaming heads keep no compensation token (DuoAttention's streaming heads).
The gradient-descent gates of DuoAttention are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import param
from .base import Calibrator, bos, capture, per_kv_head, register_calibrator, token_range


@register_calibrator
@dataclass
class Duo(Calibrator):
    """Streaming heads where streaming changes the output least (DuoAttention, training-free)."""

    name: ClassVar[str] = "duo"

    samples: int = param(2, min=1, max=64, help="calibration prompts")
    prompt_length: int = param(1024, min=32, help="tokens per calibration prompt")
    queries: int = param(64, min=1, help="last positions of each prompt whose outputs are compared")

    def prompts(self, model, tokenizer) -> list[list[int]]:
        if tokenizer is not None:
            from ..tasks import make_task

            samples = make_task("passkey").generate(self.samples, seed=self.seed, tokenizer=tokenizer,
                                                    length=self.prompt_length)
            return [tokenizer(s.prompt)["input_ids"] for s in samples]
        lo, hi = token_range(model)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for _ in range(self.samples):
            key = torch.randint(lo, hi, (16,), generator=gen).tolist()
            filler = torch.randint(lo, hi, (self.prompt_length - 32 - 1,), generator=gen).tolist()
            at = len(filler) // 4
            out.append(bos(model, None) + filler[:at] + key + filler[at:] + key)
        return out

    def scores(self, model, tokenizer=None) -> torch.Tensor:
        total = None
        prompts = self.prompts(model, tokenizer)
        keep = self.sinks + self.streaming_window()
        for ids in prompts:
            errs = []
            for q, k, v in capture(model, ids):
                S = k.shape[2]
                n = min(self.queries, S)
                pos_q = torch.arange(S - n, S)[:, None]
                pos_k = torch.arange(S)[None, :]
                causal = pos_k <= pos_q
                streaming = causal & ((pos_k < self.sinks) | (pos_k > pos_q - self.streaming_window()))
                qn = q[:, :, -n:]
                full = F.scaled_dot_product_attention(qn, k, v, attn_mask=causal)
                part = F.scaled_dot_product_attention(qn, k, v, attn_mask=streaming)
                err = (part - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)  # (1, H, n)
                errs.append(err[0].mean(-1) if S > keep else torch.zeros_like(err[0, :, 0]))
            layer = torch.stack(errs)
            total = layer if total is None else total + layer
        heads_kv = model.config.get_text_config().num_key_value_heads or total.shape[1]
        return per_kv_head(total / len(prompts), heads_kv)
