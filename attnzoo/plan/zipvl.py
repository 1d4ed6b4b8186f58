"""``zipvl``: ZipVL's adaptive ratio, recorded offline: each head keeps the fewest tokens holding a top-p mass share.

On calibration prompts (task prompts, answer appended) the last ``observe`` prompt queries before the
answer vote as in SnapKV: each key's attention mass, summed over the queries and the KV head's query
heads. A KV head's ratio at share ``top_p`` is the fewest keys holding ``top_p`` of that mass, over the
prompt's length (mean over prompts); ``per="layer"`` sums the layer's heads first (one ratio per layer,
ZipVL's choice). The plan gives each head a SnapKV budget of ``ratio · length`` tokens (a ratio of 1:
the full cache). Without ``top_p`` the calibrator picks the largest share whose plan holds at most
``budget`` of the KV on average, and records it.

At run time the ``zipvl`` cache policy (:class:`attnzoo.cache.heads.ZipVL`) decides the same ratios per
prompt instead; this calibrator fixes them from calibration prompts, so a plan file can be inspected,
shared and compared with the other calibrators at one budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AttnZooError
from ..registry import param
from .base import FULL, TASKS, Calibrator, calibration_prompts, capture, heads_kv_of, register_calibrator


def observed_mass(q: torch.Tensor, k: torch.Tensor, start: int, observe: int, group: int) -> torch.Tensor:
    """``(heads_kv, start)``: the attention mass the last ``observe`` queries before ``start`` give each
    earlier key, summed over those queries and each KV head's ``group`` query heads (``q``, ``k``:
    ``(1, heads, N, D)`` with KV heads repeated)."""
    obs = torch.arange(max(0, start - observe), start)
    logits = q[0, :, obs] @ k[0, :, :start].transpose(-1, -2) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(torch.arange(start)[None, :] > obs[:, None], float("-inf"))
    return logits.softmax(-1).sum(1).unflatten(0, (-1, group)).sum(1)


def top_p_ratio(mass: torch.Tensor, top_p: float) -> torch.Tensor:
    """``mass (..., n)`` -> ``(...)``: the fewest keys holding ``top_p`` of the row's mass, over ``n``."""
    share = mass.sort(-1, descending=True).values.cumsum(-1)
    return ((share < top_p * share[..., -1:]).sum(-1) + 1).double() / mass.shape[-1]


@register_calibrator
@dataclass
class ZipVL(Calibrator):
    """Per-head (or per-layer) SnapKV budgets from the top-p mass share of observed queries (ZipVL)."""

    name: ClassVar[str] = "zipvl"

    top_p: float | None = param(None, min=1e-6, max=1.0, help="mass share the kept tokens hold (default: the "
                                                               "largest whose plan fits the budget)")
    per: str = param("head", choices=("head", "layer"), help="a ratio per KV head, or one per layer")
    observe: int = param(8, min=1, help="queries that vote (and the snapkv heads' observation window)")
    pool: int = param(7, min=1, max=1025, help="the snapkv heads' max-pooling width")
    samples: int = param(2, min=1, max=64, help="calibration prompts")
    prompt_length: int = param(1024, min=64, help="tokens per calibration prompt")
    tasks: tuple = param(TASKS, help="tasks the calibration prompts alternate between (text tasks)")

    def validate(self) -> None:
        if self.observe + 1 > self.budget * self.length:
            raise AttnZooError(f"calibrator zipvl: parameter 'budget' {self.budget} holds {self.budget * self.length:g} "
                               f"tokens per head at length {self.length}, fewer than observe + 1 ({self.observe + 1})")

    def profile(self, model, tokenizer=None) -> list[torch.Tensor]:
        """Per prompt, ``(layers, heads_kv, start)`` observed masses."""
        out = []
        for ids, start in calibration_prompts(model, tokenizer, self.samples, self.prompt_length, self.seed,
                                              self.tasks):
            layers = []
            for q, k, _ in capture(model, ids):
                mass = observed_mass(q, k, start, self.observe, q.shape[1] // heads_kv_of(model))
                layers.append(mass)
            out.append(torch.stack(layers))
        return out

    def ratios(self, masses: list[torch.Tensor], top_p: float) -> torch.Tensor:
        """``(layers, heads_kv)``: mean over prompts of each head's top-p ratio (``per="layer"``: the layer's)."""
        return torch.stack([top_p_ratio(m.sum(1, keepdim=True) if self.per == "layer" else m, top_p)
                            .expand(-1, m.shape[1]) for m in masses]).mean(0)

    def held(self, ratio: float) -> int:
        return min(self.length, max(self.observe + 1, round(ratio * self.length)))

    def choose(self, model, tokenizer=None):
        return self.allocate(self.profile(model, tokenizer))

    def allocate(self, masses: list[torch.Tensor]):
        """Choices and ratios from a :meth:`profile` (one profile serves every budget)."""
        if self.top_p is None:  # the largest share whose plan's mean held share fits the budget (bisection)
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                fits = sum(self.held(float(r)) for r in self.ratios(masses, mid).flatten()) / \
                    (self.length * self.ratios(masses, mid).numel()) <= self.budget
                lo, hi = (mid, hi) if fits else (lo, mid)
            self.top_p = max(lo, 1e-6)  # recorded in the plan's calibrator params
        ratios = self.ratios(masses, self.top_p).float()

        def choice(ratio: float):
            if self.held(ratio) >= self.length:
                return FULL
            return "policy", "snapkv", {"budget": self.held(ratio), "observe": self.observe, "pool": self.pool}

        return [[choice(float(r)) for r in row] for row in ratios], ratios
