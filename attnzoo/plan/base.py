"""Calibrators: measure each KV head of a real model, then keep the full cache only where it matters.

A calibrator is a small dataclass in :data:`CALIBRATORS` (parameters declared with
:func:`attnzoo.param`, checked like method parameters). :meth:`Calibrator.scores` returns one number
per (layer, KV head), higher = the head needs its whole past more; :meth:`Calibrator.run` turns the
scores into a :class:`~attnzoo.plan.file.Plan` that meets the mean KV budget: every streaming head
holds ``sinks + window`` tokens (+1 compensation token where the calibrator uses one) and the
highest-scoring heads keep everything, as many as ``budget`` leaves room for at ``length`` tokens.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import AttnZooError
from ..registry import Method, Registry, param
from . import file


@dataclass
class Calibrator:
    """Base class: a budget, the context length it refers to, and the streaming heads' shape."""

    name: ClassVar[str] = ""
    #: whether streaming heads keep one compensation token (the mean K/V of what they evicted)
    compensation: ClassVar[bool] = False

    budget: float = param(0.125, min=1e-6, max=1.0, help="mean share of the context the KV heads hold")
    length: int = param(4096, min=16, help="context length (tokens) the budget refers to")
    sinks: int = param(4, min=0, help="initial tokens every streaming head keeps")
    window: int | None = param(None, min=1, help="recent tokens a streaming head keeps (default: half the "
                                                "budget's tokens, less the sinks)")
    seed: int = param(0, help="seed of the calibration prompts")

    def __post_init__(self) -> None:
        Method.__post_init__(self)  # the registry's field checks + validate()

    def validate(self) -> None:
        self.allocate(1)  # a budget too small for the streaming heads is refused now

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def streaming_window(self) -> int:
        if self.window is not None:
            return self.window
        return max(1, round(self.budget * self.length / 2) - self.sinks - int(self.compensation))

    def allocate(self, heads: int) -> int:
        """How many of ``heads`` KV heads keep the full cache so the mean held share stays within ``budget``."""
        held = self.sinks + self.streaming_window() + int(self.compensation)
        tokens = self.budget * self.length
        if held > tokens:
            raise AttnZooError(f"calibrator {self.name}: parameter 'budget' {self.budget} holds {tokens:g} tokens "
                               f"per head at length {self.length}, fewer than a streaming head's sinks + window"
                               f"{' + 1' if self.compensation else ''} ({held}); raise the budget or lower window")
        if held >= self.length:
            return heads
        return max(0, min(heads, math.floor(heads * (tokens - held) / (self.length - held) + 1e-9)))

    def scores(self, model, tokenizer=None) -> torch.Tensor:
        """``(layers, heads_kv)`` scores: higher = the head needs its whole past more."""
        raise NotImplementedError

    def run(self, model, tokenizer=None, *, model_name: str = "model") -> file.Plan:
        """Calibrate ``model`` and return the plan (the calibrator's settings, scores and time recorded in it)."""
        start = time.perf_counter()
        with torch.no_grad():
            scores = self.scores(model, tokenizer).float()
        shapes = file.model_shapes(model)
        k = self.allocate(scores.numel())
        top = set(torch.argsort(scores.flatten(), descending=True, stable=True)[:k].tolist())
        full = [[h for h in range(shapes["heads_kv"]) if i * shapes["heads_kv"] + h in top]
                for i in range(shapes["layers"])]
        info = {"name": self.name, "params": self.params(), "seconds": round(time.perf_counter() - start, 2),
                "scores": [[round(float(s), 5) for s in row] for row in scores]}
        return file.split_plan(model_name, shapes, full, calibrator=info, sinks=self.sinks,
                               window=self.streaming_window(), compensation=self.compensation)


def _load_builtin() -> None:
    for module in ("razor", "duo"):
        importlib.import_module(f"{__package__}.{module}")


CALIBRATORS: Registry[type[Calibrator]] = Registry("calibrator", load=_load_builtin)


def register_calibrator(cls: type[Calibrator]) -> type[Calibrator]:
    return CALIBRATORS.add(cls.name, cls)


def make_calibrator(name: str, **params: Any) -> Calibrator:
    """A configured calibrator; unknown names and parameters raise AttnZooError with suggestions."""
    return CALIBRATORS.build(name, **params)


def token_range(model) -> tuple[int, int]:
    """Ordinary token ids for random probes: the top nine tenths of the vocabulary (special tokens sit low)."""
    vocab = model.config.get_text_config().vocab_size
    return vocab // 10, vocab


def bos(model, tokenizer) -> list[int]:
    """The beginning-of-sequence id prefix (empty when the model has none)."""
    tid = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    tid = tid if tid is not None else getattr(model.config.get_text_config(), "bos_token_id", None)
    return [] if tid is None else [int(tid)]


def capture(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer ``(q, k, v)`` with KV heads repeated to the query heads, for one token sequence."""
    from ..hf import capture_qkv

    device = next(model.parameters()).device
    qkv = capture_qkv(model, {"input_ids": torch.tensor([ids], device=device)})
    out = []
    for q, k, v in qkv:
        rep = q.shape[1] // k.shape[1]
        out.append((q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)))
    return out


def per_kv_head(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """``(..., heads)`` query-head figures -> ``(..., heads_kv)``, the max over each KV head's query heads."""
    return x.unflatten(-1, (heads_kv, x.shape[-1] // heads_kv)).amax(-1)
