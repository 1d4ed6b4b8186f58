"""``duo_gates``: DuoAttention's trained gates: one α ∈ [0, 1] per KV head mixing full and streaming attention.

With the model frozen, every attention layer computes ``α·full + (1 − α)·streaming`` per KV head
(streaming = the ``sinks`` + ``window`` keys). The gates start at 1 and are optimised by Adam on
passkey prompts with their answer appended: the loss is the distillation error of the final hidden
states at the positions that produce the answer (and the ``queries`` prompt positions before them)
against the model with full attention, normalised by the same error with every head streaming (so
the distillation term runs from 0 at α = 1 to 1 at α = 0 whatever the model's scale), plus ``l1`` · the
mean gate. The plan keeps the full cache for the heads with the largest gates (thresholded at the
budget, as :class:`~attnzoo.plan.base.SplitCalibrator` does).

CPU-sized: the default 40 steps at 512 tokens take minutes on one core (the paper: ~2000 steps at
long contexts on GPUs), so the gates are a short-run estimate.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import param
from .base import TASKS, SplitCalibrator, calibration_prompts, heads_kv_of, register_calibrator, swapped_attention
from .duo import streaming_mask

_NAME = "attnzoo_duo_gates"
_GATE = "_attnzoo_duo_gate"


def _gated_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``α·full + (1 − α)·streaming`` per KV head (registered with transformers' AttentionInterface)."""
    gate, sinks, window = getattr(module, _GATE)
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    n = query.shape[2]
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    mask = streaming_mask(torch.arange(key.shape[2] - n, key.shape[2]), key.shape[2], sinks, window)
    part = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.device), scale=scaling)
    a = gate.clamp(0, 1).repeat_interleave(rep)[None, :, None, None].to(query.dtype)
    return (a * full + (1 - a) * part).transpose(1, 2).contiguous(), None


@register_calibrator
@dataclass
class DuoGates(SplitCalibrator):
    """Full-cache heads by trained gates (DuoAttention: distillation of final hidden states + L1 on the gates)."""

    name: ClassVar[str] = "duo_gates"

    steps: int = param(40, min=1, help="optimiser steps")
    lr: float = param(0.02, min=1e-6, help="Adam learning rate of the gates")
    l1: float = param(0.05, min=0.0, help="weight of the mean gate in the loss")
    samples: int = param(2, min=1, max=64, help="calibration prompts (cycled through the steps)")
    prompt_length: int = param(512, min=64, help="tokens per calibration prompt")
    tasks: tuple = param(TASKS, help="tasks the calibration prompts alternate between (text tasks)")
    queries: int = param(32, min=0, help="prompt positions before the answer's that are distilled too")

    def scores(self, model, tokenizer=None) -> torch.Tensor:
        from ..hf.integration import attention_layers

        prompts = calibration_prompts(model, tokenizer, self.samples, self.prompt_length, self.seed, self.tasks)
        device = next(model.parameters()).device
        gates = torch.ones(len(attention_layers(model)), heads_kv_of(model), device=device, requires_grad=True)
        opt = torch.optim.Adam([gates], lr=self.lr)
        window = self.streaming_window()
        with swapped_attention(model, _NAME, _gated_attention, _GATE, lambda i: (gates[i], self.sinks, window)):
            batches = []
            with torch.no_grad():  # targets: final hidden states with every gate 1; the scale: with every gate 0
                for ids, start in prompts:
                    x = torch.tensor([ids], device=device)
                    pos = torch.arange(max(0, start - 1 - self.queries), len(ids) - 1, device=device)
                    target = model.get_decoder()(input_ids=x).last_hidden_state[0, pos].float()
                    gates.zero_()
                    streamed = model.get_decoder()(input_ids=x).last_hidden_state[0, pos].float()
                    gates.fill_(1.0)
                    batches.append((x, pos, target, (streamed - target).pow(2).mean().clamp_min(1e-12)))
            for _, (x, pos, target, scale) in zip(range(self.steps), itertools.cycle(batches)):
                hidden = model.get_decoder()(input_ids=x).last_hidden_state[0, pos].float()
                loss = (hidden - target).pow(2).mean() / scale + self.l1 * gates.clamp(0, 1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0, 1)
        return gates.detach().cpu()
