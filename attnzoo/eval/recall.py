"""Prefill attention-mass recall and density of a method on a real model's own Q/K/V (see attnzoo.bench.metrics)."""

from __future__ import annotations

import torch

from .. import registry
from ..bench.metrics import method_density, method_recall
from ..tasks import Sample


def prompt_ids(tokenizer, sample: Sample) -> torch.Tensor:
    """``(1, N)`` token ids of a sample (text prompts are tokenised; perplexity windows are ids already)."""
    if isinstance(sample.prompt, str):
        return tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return torch.as_tensor(sample.prompt).reshape(1, -1)


def layer_qkv(model, ids: torch.Tensor, layers: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """``(q, k, v)`` of ``layers`` evenly spaced layers (first ... last) of the exact model on ``ids``."""
    import attnzoo.hf as azhf

    if azhf.is_applied(model):
        azhf.remove(model)
    with torch.inference_mode():
        qkv = azhf.capture_qkv(model, {"input_ids": ids, "logits_to_keep": 1})
    picked = sorted({round(i * (len(qkv) - 1) / max(1, layers - 1)) for i in range(layers)})
    return [qkv[i] for i in picked]


def prefill_recall(qkv: list[tuple[torch.Tensor, ...]], method: registry.Method) -> float | None:
    """Mean recall of ``method`` over captured layers' causal attention; None when recall does not apply
    (the method changes the scores rather than choosing keys)."""
    with torch.inference_mode():
        values = [method_recall(method, q, k, v, scale=q.shape[-1] ** -0.5, causal=True) for q, k, v in qkv]
    return None if None in values else sum(values) / len(values)


def prefill_density(qkv: list[tuple[torch.Tensor, ...]], method: registry.Method) -> float | None:
    """Mean share of the causal (query, key) pairs ``method`` reads on the captured layers; None when the
    method does not expose what it reads."""
    with torch.inference_mode():
        values = [method_density(method, q, k, causal=True) for q, k, _ in qkv]
    return None if None in values else sum(values) / len(values)
