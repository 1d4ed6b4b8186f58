"""``minference``: MInference's offline search of each head's sparse prefill pattern.

For every KV head, candidate patterns, each at every share in ``spans`` of the keys a query may read:
``streaming`` (A-shape: sinks + a local window), ``vertical_slash`` (half the keys on vertical lines,
half on diagonals) and ``block_topk`` (the top key blocks of each query block). On calibration prompts
each candidate runs on the layer's real Q/K/V and its attention recall (the share of the exact
attention mass the queries still read, ``exp(lse − lse_exact)``, over the KV head's query heads) is
measured. The plan minimises the summed recall loss with the mean attention-FLOP share of the prefill
within ``budget`` (:func:`~attnzoo.plan.base.allocate_options`); a head may also stay exact. The
plan's groups are prefill methods (``attnzoo.hf.apply(model, plan)``; the KV cache stays full).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import registry
from ..bench.metrics import lse_recall
from ..core.exact import tiled_attention
from ..errors import AttnZooError
from ..registry import param
from .base import (TASKS, FULL, Calibrator, allocate_options, calibration_prompts, heads_kv_of, listed,
                   register_calibrator)

#: recall losses below this are float rounding (fp32 lse of the same keys summed in another order, or with the
#: block kernel's polynomial exp: up to a few 1e-6)
_ROUNDING = 1e-5
PATTERNS = ("streaming", "vertical_slash", "block_topk")


def flop_share(keys: int, length: int) -> float:
    """Share of causal attention's (query, key) pairs a pattern reading ``keys`` keys per query computes."""
    n = torch.arange(1, length + 1, dtype=torch.float64)
    return float(n.clamp(max=keys).sum() / n.sum())


@register_calibrator
@dataclass
class MInference(Calibrator):
    """Per-head prefill patterns (A-shape, vertical-slash, block top-k) by recall under a FLOP budget (MInference)."""

    name: ClassVar[str] = "minference"

    budget: float = param(0.25, min=1e-6, max=1.0, help="mean share of causal attention's FLOPs the prefill spends")
    patterns: tuple = param(PATTERNS, help="candidate patterns (streaming, vertical_slash, block_topk)")
    spans: tuple = param((1 / 32, 1 / 16, 1 / 8, 1 / 4), help="candidate shares of the context a query reads")
    block: int = param(64, min=1, help="block size of block_topk and vertical_slash")
    samples: int = param(1, min=1, max=64, help="calibration prompts")
    prompt_length: int = param(1024, min=64, help="tokens per calibration prompt")
    tasks: tuple = param(TASKS, help="tasks the calibration prompts alternate between (text tasks)")

    def validate(self) -> None:
        self.patterns, self.spans = listed(self.patterns), listed(self.spans, float)
        bad = [p for p in self.patterns if p not in PATTERNS] if isinstance(self.patterns, (tuple, list)) else [0]
        if bad or not self.patterns:
            raise AttnZooError(f"minference: parameter 'patterns' expected a non-empty subset of {PATTERNS}, "
                               f"got {self.patterns!r}")
        if not isinstance(self.spans, (tuple, list)) or not self.spans or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 1 for s in self.spans):
            raise AttnZooError(f"minference: parameter 'spans' expected shares in (0, 1), got {self.spans!r}")
        self.patterns, self.spans = tuple(self.patterns), tuple(sorted(float(s) for s in self.spans))

    def keys(self, share: float, length: int) -> int:
        return max(self.sinks + 1, round(share * length))

    def config(self, pattern: str, share: float, length: int) -> tuple[str, dict]:
        """The registered method and params reading about ``share·length`` keys per query."""
        keys = self.keys(share, length)
        if pattern == "streaming":
            return "streaming", {"sinks": self.sinks, "window": keys - self.sinks}
        if pattern == "vertical_slash":
            return "vertical_slash", {"n_vertical": max(1, keys // 2), "n_slash": max(1, keys - keys // 2),
                                      "sinks": self.sinks, "block": self.block}
        return "block_topk", {"block": self.block, "topk": max(1, round(keys / self.block))}

    def choose(self, model, tokenizer=None):
        from ..hf import capture_qkv

        heads_kv = heads_kv_of(model)
        options = [(p, s) for p in self.patterns for s in self.spans]
        loss = None
        for ids, _ in calibration_prompts(model, tokenizer, self.samples, self.prompt_length, self.seed, self.tasks):
            x = torch.tensor([ids], device=next(model.parameters()).device)  # the answer too: it retrieves
            with torch.no_grad():
                qkv = capture_qkv(model, {"input_ids": x})
            rows = []
            for q, k, v in qkv:
                q, k, v = q.float(), k.float(), v.float()
                group = q.shape[1] // k.shape[1]
                scale = q.shape[-1] ** -0.5
                per_head = []
                for h in range(heads_kv):
                    qh, kh, vh = q[:, h * group:(h + 1) * group], k[:, h:h + 1], v[:, h:h + 1]
                    _, ref = tiled_attention(qh, kh, vh, scale=scale, causal=True)
                    per_head.append([1 - lse_recall(self._lse(p, s, qh, kh, vh, scale), ref) for p, s in options])
                rows.append(per_head)
            e = torch.tensor(rows, dtype=torch.float64)                                  # (L, Hkv, options)
            loss = e if loss is None else loss + e
        # a pattern that reads every key the head uses misses only float rounding (±1e-7 in either direction):
        # count that as no loss, so the tie with full attention goes to the cheaper pattern
        loss = (loss / self.samples).masked_fill((loss / self.samples).abs() < _ROUNDING, 0.0)
        L = loss.shape[0]
        errors = torch.cat([loss, torch.zeros(L, heads_kv, 1, dtype=torch.float64)], -1).flatten(0, 1)
        costs = torch.tensor([flop_share(self.keys(s, self.length), self.length) for _, s in options] + [1.0],
                             dtype=torch.float64)
        pick = allocate_options(errors, costs.expand(errors.shape[0], -1), self.budget * errors.shape[0])
        made = [("method", *self.config(p, s, self.length)) for p, s in options] + [FULL]
        choices = [[made[int(pick[i * heads_kv + h])] for h in range(heads_kv)] for i in range(L)]
        # score: the first pattern's recall loss at the smallest span (how much the cheapest pattern misses)
        return choices, errors[:, 0].view(L, heads_kv)

    def _lse(self, pattern: str, share: float, q, k, v, scale: float) -> torch.Tensor:
        name, params = self.config(pattern, share, q.shape[2])
        with torch.no_grad():
            _, lse = registry.get(name, **params)(q, k, v, causal=True, scale=scale, return_lse=True)
        return lse
