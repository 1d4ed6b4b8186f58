"""``restore``: which KV heads' full cache the answer needs, found by restoring them one at a time.

The other calibrators score a head by what it does locally (its attention pattern, its output error,
a first-order gradient). A head can look harmless locally and still carry what a later layer needs to
bind a question to the right needle, and compressing every head at once moves the answer in ways no
single head's error shows. ``restore`` measures the effect on the answer directly (activation patching):

1. Every KV head is *reduced* (``policy`` at the ``low`` share, the tokens chosen by attnzoo's own cache
   policy from the calibration prompt's context, as ``attnzoo eval`` does under ``question=after``).
2. For each KV head, the answer's loss (the summed negative log-likelihood of its tokens, teacher-forced
   after the question, mean over the calibration prompts) is measured with that head *restored* to the
   full cache and all others reduced; the head that lowers it most is kept full.
3. Step 2 repeats with the kept heads restored (greedy forward selection, so heads that only help
   together are found), re-scoring the ``candidates`` best heads of the previous round, until the
   budget is spent: ``budget`` is the mean held share, so ``k`` full heads leave the rest at ``low``.

Each scored configuration is one forward pass of the question and answer tokens only (tens of tokens)
over the prompt's context K/V, captured once; ``batch`` configurations share a forward pass. Like the
other calibrators' references, the patched attention is causal over every earlier key (no sliding window
or logit softcap). The plan's ``scores`` are the first round's loss reductions (higher = the head needs
its whole past more); ``calibrator["restore"]`` records the loss with every head reduced, with none
(exact), and after each kept head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import KVCache
from ..errors import AttnZooError
from ..registry import param
from . import file
from .base import FULL, Calibrator, calibration_prompts, capture, full_head_count, heads_kv_of, \
    register_calibrator, swapped_attention
from .moa import MoA

_STATE = "_attnzoo_restore"
#: the default calibration tasks: the passkey and the three tasks with several needles (niah_single reads like
#: the passkey), so the heads are chosen for each kind of retrieval the eval scores (docs/plans.md, session 15:
#: the plan these defaults give on SmolLM2 met the 4K target)
MIX = ("passkey", "niah_multikey", "niah_multivalue", "niah_multiquery")


@register_calibrator
@dataclass
class Restore(Calibrator):
    """Full cache for the KV heads whose restoration most lowers the answer's loss (greedy), the rest reduced."""

    name: ClassVar[str] = "restore"

    policy: str = param("novelty", choices=("novelty", "streaming"),
                        help="what reduced heads do (question-agnostic: chosen before the question exists)")
    compensate: str = param("mass", choices=("none", "mean", "mass"),
                            help="reduced heads keep the evicted tokens as one mean K/V token, counted once (mean) "
                                 "or once per evicted token (mass)")
    low: float | None = param(None, min=1e-6, max=1.0,
                              help="share of the context a reduced head holds (default: half the budget)")
    pool: int = param(7, min=1, max=1025, help="novelty: max-pooling width over neighbouring tokens")
    samples: int = param(8, min=1, max=64, help="calibration prompts (each holds its context K/V of every layer "
                                                "in memory: ~190 MB at 4096 tokens on SmolLM2)")
    prompt_length: int = param(4096, min=64, help="tokens per calibration prompt")
    tasks: tuple = param(MIX, help="tasks the calibration prompts alternate between (text tasks; each prompt's "
                                   "loss is its first answer's)")
    candidates: int = param(16, min=1, help="heads re-scored in each round after the first (the previous "
                                            "round's best)")
    batch: int = param(16, min=1, max=256, help="configurations scored per forward pass (memory vs speed)")

    def validate(self) -> None:
        if self.compensate != "none" and self.policy != "novelty":
            raise AttnZooError(f"restore: parameter 'compensate' {self.compensate!r} expected policy='novelty', "
                               f"got policy={self.policy!r}")
        if self.low is not None and self.low >= self.budget:
            raise AttnZooError(f"restore: parameter 'low' expected a share below the budget {self.budget}, "
                               f"got {self.low}")
        self.full_heads(1)  # a budget too small for the reduced heads is refused now

    @property
    def share(self) -> float:
        return self.low if self.low is not None else self.budget / 2

    def shares(self, length: int | None = None) -> MoA:
        """The reduced heads' choice and held tokens at ``length`` (default: the plan's), by MoA's single-span
        rule, so both calibrators reduce a head alike."""
        return MoA(budget=self.budget, length=length or self.length, sinks=self.sinks, policy=self.policy,
                   spans=(self.share,), pool=self.pool, compensate=self.compensate)

    def full_heads(self, heads: int) -> int:
        """How many of ``heads`` KV heads keep the full cache with the rest at ``low`` and the mean within budget."""
        try:
            held = self.shares().held(self.share, self.length) + int(self.compensate != "none")
        except AttnZooError as e:
            raise AttnZooError(f"calibrator restore: parameter 'low' {self.share:g} does not fit the budget ({e})") \
                from None
        return full_head_count(heads, self.budget * self.length, held, self.length)

    def choose(self, model, tokenizer=None):
        heads_kv = heads_kv_of(model)
        cases = calibration_prompts(model, tokenizer, self.samples, self.prompt_length, self.seed, self.tasks,
                                    context=True)
        prompts = [self._prepare(model, heads_kv, ids, start, context)
                   for ids, start, context in tqdm(cases, desc="restore: context K/V", leave=False)]
        L = len(prompts[0]["layers"])
        units = L * heads_kv
        k = self.full_heads(units)
        kept: list[int] = []
        order = list(range(units))
        first = torch.zeros(units)
        holders: dict[int, list] = {}
        with swapped_attention(model, "attnzoo_restore", _restored_attention, _STATE,
                               lambda i: holders.setdefault(i, [None])):
            base, exact = self._losses(model, holders, prompts, [kept, list(range(units))]).tolist()
            self.trace = {"exact": round(exact, 4), "reduced": round(base, 4), "kept": [], "loss": []}
            for r in tqdm(range(k), desc="restore: full heads", disable=k == 0):
                trial = [u for u in order if u not in kept][:units if r == 0 else self.candidates]
                losses = self._losses(model, holders, prompts, [kept + [u] for u in trial])
                gain = base - losses
                if r == 0:
                    first[trial] = gain
                ranked = torch.argsort(gain, descending=True, stable=True).tolist()
                kept.append(trial[ranked[0]])
                order = [trial[i] for i in ranked[1:]] + [u for u in order if u not in trial]
                base = float(losses[ranked[0]])
                self.trace["kept"].append(list(divmod(kept[-1], heads_kv)))
                self.trace["loss"].append(round(base, 4))
        reduced = self.shares().choice(self.share)
        full = set(kept)
        choices = [[FULL if i * heads_kv + h in full else reduced for h in range(heads_kv)] for i in range(L)]
        return choices, first.view(L, heads_kv)

    def plan(self, model, choices, scores, seconds, *, model_name: str = "model"):
        """The plan, recording the answer's loss with every head reduced, exact, and after each kept head."""
        out = super().plan(model, choices, scores, seconds, model_name=model_name)
        out.calibrator["restore"] = self.trace
        return out

    def _prepare(self, model, heads_kv: int, ids: list[int], start: int, context: int) -> dict:
        """One prompt's context K/V per layer, the reduced heads' kept positions and mean tokens, the tokens to run."""
        context = min(context, start - 1)  # the token before the answer runs with it (synthetic prompts: no question)
        reduced = self.shares(context).choice(self.share)  # the share of this prompt's context
        # the cache layer attnzoo.hf.make_cache builds for a layer of reduced heads
        shapes = file.model_shapes(model) | {"layers": 1}
        policy, params = file.head_plan("restore", shapes, [[reduced] * heads_kv]).cache_layers()[0]
        layers = []
        for q, k, v in capture(model, ids[:context]):
            group = q.shape[1] // heads_kv  # capture repeats KV heads to the query heads
            k, v = k[:, ::group], v[:, ::group]
            cache = KVCache(policy, **params)
            cache.append(k, v)
            cache.attend(q[:, :, -1:])  # the policy compresses after the context's last read, as in a prefill
            keep = torch.zeros(k.shape[1], context, dtype=torch.bool)
            for h in range(k.shape[1]):
                keep[h, cache.positions(h)[0]] = True
            gone = (~keep).float()
            count = gone.sum(-1)
            mean_k = (gone[:, :, None] * k[0]).sum(1) / count.clamp_min(1)[:, None]
            mean_v = (gone[:, :, None] * v[0]).sum(1) / count.clamp_min(1)[:, None]
            weight = {"none": torch.full_like(count, -math.inf), "mean": torch.zeros_like(count),
                      "mass": count.clamp_min(1).log()}[self.compensate].masked_fill(count == 0, -math.inf)
            layers.append({"k": torch.cat([k[0], mean_k[:, None]], 1), "v": torch.cat([v[0], mean_v[:, None]], 1),
                           "keep": keep, "weight": weight})
        return {"layers": layers, "input": ids[context:-1], "target": ids[start:], "offset": context,
                "first": start - 1 - context}

    def _losses(self, model, holders: dict[int, list], prompts: list[dict], configs: list[list[int]]) -> torch.Tensor:
        """Mean over ``prompts`` of the answer's summed NLL, per configuration (the KV heads it restores)."""
        total = torch.zeros(len(configs))
        device = next(model.parameters()).device
        layers, heads_kv = len(prompts[0]["layers"]), prompts[0]["layers"][0]["keep"].shape[0]
        for b0 in range(0, len(configs), self.batch):
            chunk = configs[b0:b0 + self.batch]
            restored = torch.zeros(len(chunk), layers * heads_kv, dtype=torch.bool)
            for j, c in enumerate(chunk):
                restored[j, c] = True
            restored = restored.view(len(chunk), layers, heads_kv)
            for p in prompts:
                for i, layer in enumerate(p["layers"]):
                    keep = layer["keep"] | restored[:, i, :, None]                            # (B, Hkv, N)
                    weight = layer["weight"].masked_fill(restored[:, i], -math.inf)           # (B, Hkv)
                    bias = torch.cat([torch.zeros(keep.shape).masked_fill(~keep, -math.inf), weight[..., None]], -1)
                    holders[i][0] = (layer["k"], layer["v"], bias.to(device))
                x = torch.tensor([p["input"]] * len(chunk), device=device)
                pos = torch.arange(p["offset"], p["offset"] + x.shape[1], device=device).expand_as(x)
                with torch.no_grad():
                    logits = model(input_ids=x, position_ids=pos, use_cache=False).logits[:, p["first"]:].float()
                target = torch.tensor(p["target"], device=device).expand(len(chunk), -1)
                nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(-1)
                total[b0:b0 + len(chunk)] += nll.cpu()
        return total / len(prompts)


def _restored_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The new tokens' attention over the layer's context K/V as each configuration holds it (the bias: 0 for a
    kept token, -inf for an evicted one, the mean token's weight last), then causally over themselves."""
    ctx_k, ctx_v, bias = getattr(module, _STATE)[0]          # (Hkv, N + 1, D) twice, (B, Hkv, N + 1)
    B, Hq, n, _ = query.shape
    group = Hq // key.shape[1]
    k = torch.cat([ctx_k.to(key.dtype).expand(B, -1, -1, -1), key], 2).repeat_interleave(group, 1)
    v = torch.cat([ctx_v.to(value.dtype).expand(B, -1, -1, -1), value], 2).repeat_interleave(group, 1)
    causal = torch.zeros(n, n, device=query.device).masked_fill(
        torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1), -math.inf)
    mask = torch.cat([bias[:, :, None, :].expand(-1, -1, n, -1), causal.expand(B, bias.shape[1], n, n)], -1)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask.repeat_interleave(group, 1).to(query.dtype),
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None
