"""Perplexity on the shipped long text (KJV Genesis-Leviticus 14: ~104K SmolLM2 tokens, so 8K windows never repeat)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AttnZooError
from .base import Sample, Task, register_task
from .text import book_text


@functools.lru_cache(maxsize=4)
def _book_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer(book_text(), add_special_tokens=False)["input_ids"])


@register_task
@dataclass
class Perplexity(Task):
    """Language-modelling perplexity over non-overlapping windows of ``length`` tokens of real prose.

    Samples are token windows at seeded distinct offsets; a prediction is the per-token negative
    log-likelihood of a window (``score`` averages it) and the task's figure is ``exp`` of the mean over
    windows. Lower is better; what a method changes in attention shows up here even when a retrieval
    task still passes.
    """

    name: ClassVar[str] = "perplexity"
    kind: ClassVar[str] = "perplexity"
    metric: ClassVar[str] = "perplexity"

    def generate(self, n: int, *, seed: int = 0, tokenizer=None, length: int | None = None, **context) -> list[Sample]:
        if tokenizer is None or length is None:
            raise AttnZooError(f"{self.name}: generate needs tokenizer= and length= (tokens per window)")
        ids = _book_ids(tokenizer)
        slots = len(ids) // length
        if n > slots:
            raise AttnZooError(f"perplexity: the shipped text has {len(ids)} tokens, so at most {slots} windows of "
                               f"{length}; got samples={n}")
        chosen = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return [Sample(ids[s * length:(s + 1) * length], (), {"offset": s * length, "tokens": length}) for s in chosen]

    def score(self, sample: Sample, prediction) -> float:
        """The mean negative log-likelihood (nats per token) of one window."""
        nll = torch.as_tensor(prediction, dtype=torch.float64)
        if nll.numel() == 0 or not torch.isfinite(nll).all():
            raise AttnZooError(f"perplexity: expected finite per-token losses, got {nll.numel()} values")
        return float(nll.mean())

    def aggregate(self, scores: list[float]) -> float:
        return math.exp(sum(scores) / len(scores))
