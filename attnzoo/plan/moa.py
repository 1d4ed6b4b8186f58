"""``moa``: MoA's idea, each head its own span (or budget) under one total budget, chosen from profiled errors.

Every KV head gets one option among ``spans`` (shares of the context, so a head's tokens grow with the
context: MoA's elastic rule ``span = α + β·N`` with ``α`` = the sinks and ``β`` the share) or the full
cache. Profiling: on passkey prompts with their answer appended, each layer's attention output at the
positions that produce the answer is compared, per head and option, with exact attention over every
earlier key (relative error, mean over positions, prompts and the KV head's query heads). Then
:func:`~attnzoo.plan.base.allocate_options` picks per head the option that minimises the summed error
with the mean held share within ``budget`` at ``length`` tokens.

``score="gradient"`` profiles as the MoA paper does: each option's cost is its first-order change of the
answer's loss, ``Σ ∂L/∂O · ΔO`` over every position that reads the reduced cache (the question's too, under
``question="after"``), with ``∂L/∂O`` from one backward pass per prompt through the frozen model
(:func:`~attnzoo.plan.base.capture_grads`); the absolute value per prompt, averaged. The plain relative error
(``score="error"``) weighs every layer alike; the gradient counts an early layer's error for what it does
downstream.

``policy`` says what a reduced head does:

* ``streaming`` (MoA's heads): sinks + the last ``share·N`` tokens, during the prompt too;
* ``snapkv``: the prompt runs exact; afterwards the head keeps the ``share·N`` tokens its last
  ``observe`` queries attend to most (max-pooled over ``pool`` neighbours), SnapKV's rule, so heads
  that retrieve get larger budgets than heads that only look nearby;
* ``novelty``: the prompt runs exact; afterwards the head keeps ``share·N`` tokens chosen from the keys
  alone (:mod:`attnzoo.cache.novelty`: the sinks, the newest, and the keys least like any other), so no
  query's vote is needed.

``compensate`` (novelty heads): what a reduced head evicts stays as one mean K/V token, counted once
(``mean``) or once per evicted token (``mass``, :class:`~attnzoo.cache.novelty.Novelty`); the profile
reads it too, so heads whose output only needs the evicted text's share of the softmax (a repeated
haystack) get small spans.

``question="after"`` profiles the compression of ``attnzoo eval``'s ``question=after`` tasks: the voting
queries are the last ``observe`` ones before the question (the context is compressed before the question
exists), so a head whose kept tokens miss what the answer needs shows the error and gets a larger span
or the full cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..cache.novelty import novelty
from ..errors import AttnZooError
from ..registry import param
from .base import (TASKS, FULL, Calibrator, allocate_options, calibration_prompts, capture, capture_grads, heads_kv_of,
                   listed, per_kv_head, register_calibrator)
from .duo import streaming_mask
from .zipvl import observed_mass

SPANS = (1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@register_calibrator
@dataclass
class MoA(Calibrator):
    """Per-head spans or budgets under the total budget, from each head's profiled output error (MoA)."""

    name: ClassVar[str] = "moa"

    policy: str = param("snapkv", choices=("snapkv", "streaming", "novelty"), help="what reduced heads do")
    spans: tuple = param(SPANS, help="candidate shares of the context a reduced head holds")
    samples: int = param(2, min=1, max=64, help="calibration prompts")
    prompt_length: int = param(1024, min=64, help="tokens per calibration prompt")
    tasks: tuple = param(TASKS, help="tasks the calibration prompts alternate between (text tasks)")
    observe: int = param(8, min=1, help="snapkv: queries that vote for the tokens kept")
    pool: int = param(7, min=1, max=1025, help="snapkv: max-pooling width over neighbouring tokens")
    question: str = param("inline", choices=("inline", "after"),
                          help="snapkv/novelty: the compression comes at the end of the prompt (inline) or of the "
                               "context before the question (after: question-agnostic compression)")
    compensate: str = param("none", choices=("none", "mean", "mass"),
                            help="novelty: reduced heads keep the evicted tokens as one mean K/V token, counted once "
                                 "(mean) or once per evicted token (mass)")

    score: str = param("error", choices=("error", "gradient"),
                       help="what a head's option costs: its relative output error at the positions producing the "
                            "answer (error), or MoA's first-order change of the answer's loss, gradient · output "
                            "change summed over every position reading the compressed cache (gradient: errors in "
                            "early layers count for what they do downstream; one backward pass per prompt)")

    def validate(self) -> None:
        if self.compensate != "none" and self.policy != "novelty":
            raise AttnZooError(f"moa: parameter 'compensate' {self.compensate!r} expected policy='novelty', "
                               f"got policy={self.policy!r}")
        self.spans = listed(self.spans, float)
        if not isinstance(self.spans, (tuple, list)) or not self.spans or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 1 for s in self.spans):
            raise AttnZooError(f"moa: parameter 'spans' expected shares in (0, 1), got {self.spans!r}")
        self.spans = tuple(sorted(float(s) for s in self.spans))
        held = self.held(self.spans[0], self.length)
        if held > self.budget * self.length:
            raise AttnZooError(f"calibrator moa: parameter 'budget' {self.budget} holds {self.budget * self.length:g} "
                               f"tokens per head at length {self.length}, fewer than the smallest span's {held}; "
                               "raise the budget or add a smaller span")

    def held(self, share: float, length: int) -> int:
        """Tokens a reduced head holds at ``length`` for one share (a snapkv head at least observe + 1)."""
        if self.policy == "snapkv":
            return min(length, max(self.observe + 1, round(share * length)))
        if self.policy == "novelty":
            return min(length, max(self.sinks + 2, round(share * length)))
        return min(length, self.sinks + max(1, round(share * length)))

    def novelty_params(self, tokens: int) -> dict:
        """A novelty head's parameters for ``tokens`` held: a quarter of them (at most 64) the newest."""
        recent = max(1, min(64, tokens // 4))
        params = {"budget": tokens, "sinks": self.sinks, "recent": recent, "pool": self.pool,
                  "interval": max(1, min(8, tokens - self.sinks - recent))}
        return params | ({"compensate": self.compensate} if self.compensate != "none" else {})

    def choice(self, share: float) -> tuple:
        tokens = self.held(share, self.length)
        if self.policy == "snapkv":
            return ("policy", "snapkv", {"budget": tokens, "observe": self.observe, "pool": self.pool})
        if self.policy == "novelty":
            return ("policy", "novelty", self.novelty_params(tokens))
        return ("policy", "streaming", {"sinks": self.sinks, "window": tokens - self.sinks, "compensation": False})

    def read_masks(self, q, k, pos: torch.Tensor, start: int, tokens: int, group: int) -> torch.Tensor:
        """``(H, len(pos), N)`` bool: what each query head reads at the scored positions for one option
        (``group`` query heads share a KV head, so a snapkv head keeps one token set for all of them;
        its vote is cast by the ``observe`` queries before ``start``, every later token is kept)."""
        H, N = q.shape[1], k.shape[2]
        if self.policy == "streaming":
            return streaming_mask(pos, N, self.sinks, tokens - self.sinks).expand(H, -1, -1)
        keep = torch.zeros(H // group, N, dtype=torch.bool)
        if self.policy == "novelty":
            p = self.novelty_params(tokens)
            score = self._novelty(k, start, group)                                             # (Hkv, start)
            recent, sinks = min(start, p["recent"]), min(start, self.sinks)
            older = start - recent
            keep[:, :sinks] = True
            keep[:, older:] = True                                   # the newest, the question and the answer
            if older > sinks:
                pooled = F.max_pool1d(score[:, None], self.pool, stride=1, padding=self.pool // 2)[:, 0, :start]
                top = pooled[:, sinks:older].topk(min(older - sinks, max(0, tokens - p["interval"] + 1 - sinks - recent)),
                                                  dim=-1).indices
                keep.scatter_(1, top + sinks, True)
            keep = keep.repeat_interleave(group, 0)
            return keep[:, None, :] & (torch.arange(N)[None, None, :] <= pos[None, :, None])
        obs = torch.arange(max(0, start - self.observe), start)          # the prompt's last queries vote
        mass = observed_mass(q, k, start, self.observe, group)                               # (Hkv, start)
        pooled = F.max_pool1d(mass[:, None], self.pool, stride=1, padding=self.pool // 2)[:, 0, :start]
        older = start - len(obs)
        keep[:, older:] = True                                       # the observation window and the answer
        if tokens > len(obs) and older > 0:
            top = pooled[:, :older].topk(min(older, tokens - len(obs)), dim=-1).indices
            keep.scatter_(1, top, True)
        keep = keep.repeat_interleave(group, 0)
        return keep[:, None, :] & (torch.arange(N)[None, None, :] <= pos[None, :, None])

    def read(self, qn: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, vote: int) -> torch.Tensor:
        """Attention output of queries ``qn (1, H, P, D)`` reading ``mask (H, P, N)``, plus (``compensate``) the
        context tokens the mask leaves out (before ``vote``) as one mean K/V token, counted once per token for
        ``mass`` (what :class:`~attnzoo.cache.novelty.Novelty` reads after compressing the context)."""
        if self.compensate == "none":
            return F.scaled_dot_product_attention(qn, k, v, attn_mask=mask[None])
        gone = ~mask[:, 0, :vote]                                          # (H, vote): every query reads the rest
        count = gone.sum(-1).float()                                                            # (H,)
        w = (gone.float() / count.clamp_min(1)[:, None])[None, :, :, None]
        k_mean, v_mean = (w * k[:, :, :vote]).sum(2, keepdim=True), (w * v[:, :, :vote]).sum(2, keepdim=True)
        bias = torch.zeros(mask.shape[:2] + (mask.shape[2] + 1,))
        bias[..., :-1].masked_fill_(~mask, float("-inf"))
        weight = count.clamp_min(1).log() if self.compensate == "mass" else torch.zeros_like(count)
        bias[..., -1] = weight.masked_fill(count == 0, float("-inf"))[:, None]
        return F.scaled_dot_product_attention(qn, torch.cat([k, k_mean], 2), torch.cat([v, v_mean], 2),
                                              attn_mask=bias[None])

    def _novelty(self, k: torch.Tensor, start: int, group: int) -> torch.Tensor:
        """The novelty of each KV head's context keys, computed once per layer (every span reuses it)."""
        memo = getattr(self, "_memo", None)
        if memo is None or memo[0] is not k or memo[1] != start:
            score = novelty(k[:, ::group, :start], torch.arange(start).expand(1, k.shape[1] // group, start))[0]
            self._memo = memo = (k, start, score)
        return memo[2]

    def choose(self, model, tokenizer=None):
        return self.allocate(self.profile(model, tokenizer))

    def profile(self, model, tokenizer=None) -> torch.Tensor:
        """``(layers, heads_kv, spans)``: each KV head's mean relative output error at each span (``score="error"``),
        or the mean absolute first-order change of the answer's loss (``score="gradient"``)."""
        prompts = calibration_prompts(model, tokenizer, self.samples, self.prompt_length, self.seed, self.tasks,
                                      context=True)
        heads_kv = heads_kv_of(model)
        total = None
        for ids, start, context in prompts:
            vote = context if self.question == "after" else start
            if self.score == "gradient":  # every row after the compression reads the reduced cache
                pos = torch.arange(min(vote, start - 1), len(ids) - 1)
                layers = capture_grads(model, ids, start)
            else:
                pos = torch.arange(start - 1, len(ids) - 1)
                layers = [qkv + (None,) for qkv in capture(model, ids)]
            per_layer = []
            for q, k, v, g in layers:
                group = q.shape[1] // heads_kv
                qn = q[:, :, pos]
                causal = torch.arange(k.shape[2])[None, :] <= pos[:, None]
                full = F.scaled_dot_product_attention(qn, k, v, attn_mask=causal)
                costs = []
                for share in self.spans:
                    part = self.read(qn, k, v, self.read_masks(q, k, pos, vote, self.held(share, vote), group), vote)
                    if g is None:
                        costs.append(((part - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12))[0].mean(-1))
                    else:
                        costs.append((g[0, :, pos] * (part - full)[0]).sum((-2, -1)))
                per_layer.append(torch.stack(costs))                                          # (spans, H)
            e = torch.stack(per_layer)                                                        # (L, spans, H)
            e = per_kv_head(e, heads_kv, "sum").abs() if self.score == "gradient" else per_kv_head(e, heads_kv, "mean")
            total = e if total is None else total + e
        self._memo = None
        return (total / len(prompts)).transpose(1, 2)
    def allocate(self, errors: torch.Tensor):
        """Choices and scores from a :meth:`profile` (one profile serves every budget and length)."""
        L, heads_kv = errors.shape[:2]
        errors = torch.cat([errors, torch.zeros(L, heads_kv, 1)], -1).flatten(0, 1)        # + full: no error
        extra = int(self.compensate != "none")                                   # the mean token
        costs = torch.tensor([self.held(s, self.length) + extra for s in self.spans] + [self.length],
                             dtype=torch.float64)
        pick = allocate_options(errors, costs.expand(errors.shape[0], -1), self.budget * self.length * errors.shape[0])
        options = [self.choice(s) for s in self.spans] + [FULL]
        choices = [[options[int(pick[i * heads_kv + h])] for h in range(heads_kv)] for i in range(L)]
        # score: the error a head would have at the smallest span (higher = needs more)
        return choices, errors[:, 0].view(L, heads_kv)
