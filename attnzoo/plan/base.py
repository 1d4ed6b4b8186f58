"""Calibrators: measure each KV head of a real model, then give each head what it needs under a budget.

A calibrator is a small dataclass in :data:`CALIBRATORS` (parameters declared with
:func:`attnzoo.param`, checked like method parameters). :meth:`Calibrator.choose` returns one
choice per (layer, KV head) (a cache policy or a prefill method and its params) and the scores it
was based on; :meth:`Calibrator.run` writes them into a :class:`~attnzoo.plan.file.Plan`.

Two ways of choosing live here and are shared by the calibrators:

* :class:`SplitCalibrator` (``razor``, ``duo``, ``duo_gates``): one score per KV head, the
  highest-scoring heads keep everything, every other head streams ``sinks + window`` tokens, as many
  full heads as ``budget`` leaves room for at ``length`` tokens.
* :func:`allocate_options` (``moa``, ``minference``): every head has a list of options, each with a
  profiled error and a cost; the plan minimises the summed error with the mean cost within the budget
  (a knapsack over the budget, solved exactly by dynamic programming).

Calibration prompts (:func:`calibration_prompts`) are task prompts with their answer appended, so
calibrators can score the positions that produce the answer; by default they alternate between the
passkey and RULER's multi-key needles (:data:`TASKS`), so a plan keeps what both need (a plan calibrated
on passkeys alone cut 7-digit needle values to their first digits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..cache import make_policy
from ..errors import AttnZooError
from ..registry import Method, Registry, param
from . import file

#: the default calibration tasks (prompts alternate between them)
TASKS = ("passkey", "niah_multikey")
#: one head's choice: ("policy" | "method", name, params)
Choice = tuple[str, str, dict]
FULL: Choice = ("policy", "full", {})


@dataclass
class Calibrator:
    """Base class: a budget, the context length it refers to, the sinks every reduced head keeps, a seed."""

    name: ClassVar[str] = ""

    budget: float = param(0.125, min=1e-6, max=1.0, help="mean share of the context the KV heads hold")
    length: int = param(4096, min=16, help="context length (tokens) the budget refers to")
    sinks: int = param(4, min=0, help="initial tokens every streaming head keeps")
    seed: int = param(1234, help="seed of the calibration prompts (eval's default seed 0 stays held out)")

    def __post_init__(self) -> None:
        Method.__post_init__(self)  # the registry's field checks + validate()
        if hasattr(self, "tasks"):  # calibrators that read task prompts declare a `tasks` parameter
            self.tasks = check_tasks(self.name, self.tasks)

    def validate(self) -> None:
        """Cross-parameter checks; raise AttnZooError naming the parameter."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def choose(self, model, tokenizer=None) -> tuple[list[list[Choice]], torch.Tensor]:
        """Per (layer, KV head) a :data:`Choice`, and the ``(layers, heads_kv)`` scores behind them."""
        raise NotImplementedError

    def run(self, model, tokenizer=None, *, model_name: str = "model") -> file.Plan:
        """Calibrate ``model`` and return the plan (the calibrator's settings, scores and time recorded in it)."""
        start = time.perf_counter()
        choices, scores = self.choose(model, tokenizer)
        return self.plan(model, choices, scores, time.perf_counter() - start, model_name=model_name)

    def plan(self, model, choices: list[list[Choice]], scores: torch.Tensor, seconds: float, *,
             model_name: str = "model") -> file.Plan:
        """The plan of ``choices``, recording the calibrator's settings, ``scores`` and ``seconds``."""
        info = {"name": self.name, "params": self.params(), "seconds": round(seconds, 2),
                "scores": [[round(float(s), 5) for s in row] for row in scores.float()]}
        return file.head_plan(model_name, file.model_shapes(model), choices, calibrator=info)


@dataclass
class SplitCalibrator(Calibrator):
    """Full cache for the top-scoring KV heads, sinks + window for the others (scores from :meth:`scores`)."""

    #: whether streaming heads keep one compensation token (the mean K/V of what they evicted)
    compensation: ClassVar[bool] = False

    window: int | None = param(None, min=1, help="recent tokens a streaming head keeps (default: half the "
                                                "budget's tokens, less the sinks)")
    rest: str = param("streaming", choices=("streaming", "novelty"),
                      help="what the other heads keep: sinks + window, or as many tokens chosen by the novelty "
                           "policy (the least duplicated keys: question-agnostic)")

    def validate(self) -> None:
        self.allocate(1)  # a budget too small for the streaming heads is refused now
        self.reduced()

    @property
    def compensated(self) -> bool:
        """Whether reduced heads keep a compensation token (streaming heads of a calibrator that keeps one)."""
        return self.compensation and self.rest == "streaming"

    def streaming_window(self) -> int:
        if self.window is not None:
            return self.window
        return max(1, round(self.budget * self.length / 2) - self.sinks - int(self.compensated))

    def reduced(self) -> Choice:
        """What a head that is not full keeps: sinks + window (streaming), or that many tokens by novelty."""
        window = self.streaming_window()
        if self.rest == "streaming":
            return "policy", "streaming", {"sinks": self.sinks, "window": window, "compensation": self.compensated}
        params = {"budget": self.sinks + window, "sinks": self.sinks, "recent": max(1, min(64, window // 4))}
        try:
            make_policy("novelty", **params)
        except AttnZooError as e:
            raise AttnZooError(f"calibrator {self.name}: parameter 'window' {window} is too small for rest='novelty' "
                               f"({e})") from None
        return "policy", "novelty", params

    def allocate(self, heads: int) -> int:
        """How many of ``heads`` KV heads keep the full cache so the mean held share stays within ``budget``."""
        held = self.sinks + self.streaming_window() + int(self.compensated)
        tokens = self.budget * self.length
        if held > tokens:
            raise AttnZooError(f"calibrator {self.name}: parameter 'budget' {self.budget} holds {tokens:g} tokens "
                               f"per head at length {self.length}, fewer than a streaming head's sinks + window"
                               f"{' + 1' if self.compensated else ''} ({held}); raise the budget or lower window")
        return full_head_count(heads, tokens, held, self.length)

    def scores(self, model, tokenizer=None) -> torch.Tensor:
        """``(layers, heads_kv)`` scores: higher = the head needs its whole past more."""
        raise NotImplementedError

    def choose(self, model, tokenizer=None) -> tuple[list[list[Choice]], torch.Tensor]:
        scores = self.scores(model, tokenizer).float()
        layers, heads_kv = scores.shape
        top = set(torch.argsort(scores.flatten(), descending=True, stable=True)[:self.allocate(scores.numel())]
                  .tolist())
        stream = self.reduced()
        return [[FULL if i * heads_kv + h in top else stream for h in range(heads_kv)] for i in range(layers)], scores


def full_head_count(heads: int, tokens: float, held: int, length: int) -> int:
    """How many of ``heads`` KV heads can keep all ``length`` tokens while the others hold ``held`` each and the
    mean stays within ``tokens`` per head."""
    if held >= length:
        return heads
    return max(0, min(heads, math.floor(heads * (tokens - held) / (length - held) + 1e-9)))


def allocate_options(errors: torch.Tensor, costs: torch.Tensor, total: float, *, units: int = 1 << 15) -> torch.Tensor:
    """Per head the option index minimising the summed ``errors (heads, options)`` with ``Σ costs ≤ total``.

    ``costs (heads, options)``, every head's option 0 the cheapest, ``Σ costs[:, 0] ≤ total``. A knapsack
    dynamic programme over the budget: exact when the costs are whole numbers and ``total ≤ units``
    (token counts); otherwise costs are rounded up to ``total / units`` steps (the plan still fits).
    Among the plans with the least error it returns the cheapest.
    """
    if float(costs[:, 0].sum()) > total + 1e-9:
        raise AttnZooError(f"allocate: the cheapest option of every head costs {float(costs[:, 0].sum()):g} in all, "
                           f"more than the budget {total:g}")
    costs = costs.double()
    whole = bool((costs == costs.round()).all()) and total <= units
    step = 1.0 if whole else total / units
    c = torch.ceil(costs / step - 1e-9).long()
    cap = int(math.floor(total / step + 1e-9))
    best = torch.full((cap + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for h in range(errors.shape[0]):
        cand = torch.full((errors.shape[1], cap + 1), math.inf, dtype=torch.float64)
        for o in range(errors.shape[1]):
            if int(c[h, o]) <= cap:
                cand[o, int(c[h, o]):] = best[:cap + 1 - int(c[h, o])] + float(errors[h, o])
        best, arg = cand.min(0)
        picks.append(arg)
    spent = int((best <= best.min() + 1e-12).nonzero()[0])
    choice = torch.zeros(errors.shape[0], dtype=torch.long)
    for h in reversed(range(errors.shape[0])):
        choice[h] = picks[h][spent]
        spent -= int(c[h, choice[h]])
    return choice


def _load_builtin() -> None:
    for module in ("razor", "duo", "moa", "minference", "gates", "zipvl", "restore"):
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


def listed(value, cast=str):
    """A list parameter given as text, ``"a,b"`` or ``"a+b"`` (``+`` survives ``eval``-style specs that split on
    commas, e.g. ``moa:tasks=passkey+niah_single``), as a tuple of ``cast`` items; other values unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return tuple(cast(t) for t in value.replace("+", ",").split(",") if t)
    except ValueError:
        return value


def check_tasks(name: str, tasks) -> tuple[str, ...]:
    """The ``tasks`` parameter as a tuple of registered text-task names (AttnZooError otherwise)."""
    from ..tasks import TASKS as registered
    from ..tasks.text import TextTask

    tasks = listed(tasks)
    if not isinstance(tasks, (tuple, list)) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise AttnZooError(f"calibrator {name}: parameter 'tasks' expected a non-empty list of task names, "
                           f"got {tasks!r}")
    for t in tasks:
        if t not in registered or not issubclass(registered[t], TextTask):
            raise AttnZooError(f"calibrator {name}: parameter 'tasks' expected text tasks with prompts and "
                               f"answers (e.g. {', '.join(TASKS)}), got {t!r}")
    return tuple(tasks)


def calibration_prompts(model, tokenizer, samples: int, length: int, seed: int,
                        tasks: tuple[str, ...] = TASKS, *, context: bool = False) -> list[tuple[int | list[int], ...]]:
    """``(ids, start)`` per prompt: a task prompt with its (first) answer appended from ``ids[start]`` on.

    With a tokenizer: prompt ``i`` comes from ``tasks[i % len(tasks)]`` (:mod:`attnzoo.tasks`, generated
    at ``seed``; evaluate on other seeds). Without one, a synthetic prompt: random filler with a random
    16-token key at a quarter depth, the key again as the answer. ``context=True`` adds a third item:
    how many tokens come before the task's question (``start`` for the synthetic prompts, which have none).
    """
    if tokenizer is not None:
        from ..tasks import make_task

        per_task = [make_task(t).generate(len(range(i, samples, len(tasks))), seed=seed, tokenizer=tokenizer,
                                          length=length) if i < samples else [] for i, t in enumerate(tasks)]
        out = []
        for i in range(samples):
            s = per_task[i % len(tasks)][i // len(tasks)]
            ids = tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
            item = (ids + tokenizer(" " + s.answers[0], add_special_tokens=False)["input_ids"], len(ids))
            if context:
                alone = tokenizer(s.prompt[:-len(s.meta["question"])], add_special_tokens=False)["input_ids"]
                item += (next((i for i, (a, b) in enumerate(zip(alone, ids)) if a != b), min(len(alone), len(ids))),)
            out.append(item)
        return out
    lo, hi = token_range(model)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        key = torch.randint(lo, hi, (16,), generator=gen).tolist()
        filler = torch.randint(lo, hi, (length - 32 - 1,), generator=gen).tolist()
        at = len(filler) // 4
        ids = bos(model, None) + filler[:at] + key + filler[at:]
        out.append((ids + key, len(ids)) + ((len(ids),) if context else ()))
    return out


def capture(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer ``(q, k, v)`` with KV heads repeated to the query heads, for one token sequence."""
    from ..hf import capture_qkv

    device = next(model.parameters()).device
    with torch.no_grad():
        qkv = capture_qkv(model, {"input_ids": torch.tensor([ids], device=device)})
    out = []
    for q, k, v in qkv:
        rep = q.shape[1] // k.shape[1]
        out.append((q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)))
    return out


@contextlib.contextmanager
def swapped_attention(model, name: str, function: Callable, attr: str, value: Callable[[int], Any]):
    """Run ``model`` with ``function`` as its attention (registered with transformers' AttentionInterface as
    ``name``), each layer's attention modules carrying ``value(layer)`` as ``attr``, every parameter frozen;
    the model's own attention, attributes and ``requires_grad`` flags come back afterwards."""
    from transformers import AttentionInterface

    from ..hf.integration import attention_layers

    layers = attention_layers(model)
    AttentionInterface.register(name, function)
    original = model.config._attn_implementation
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for i, ms in layers.items():
            for m in ms:
                setattr(m, attr, value(i))
        model.set_attn_implementation(name)
        yield
    finally:
        model.set_attn_implementation(original)
        for ms in layers.values():
            for m in ms:
                if hasattr(m, attr):
                    delattr(m, attr)
        for p, flag in frozen:
            p.requires_grad_(flag)


_TRACE = "_attnzoo_trace"


def _traced_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal attention over every earlier key that records its q, k, v (KV heads repeated to the query heads)
    and, during backward, the gradient reaching its output (:func:`capture_grads`)."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    slot = [query.detach().float(), key.detach().float(), value.detach().float(), None]
    getattr(module, _TRACE).append(slot)
    if out.requires_grad:
        out.register_hook(lambda g: slot.__setitem__(3, g.detach().float()))
    return out.transpose(1, 2).contiguous(), None


def capture_grads(model, ids: list[int], start: int) -> list[tuple[torch.Tensor, ...]]:
    """Per layer ``(q, k, v, g)``: :func:`capture`'s tensors and ``g (1, H, N, D)``, the gradient of the mean
    negative log-likelihood of the answer ``ids[start:]`` with respect to the layer's attention output, the
    model frozen. ``g · Δoutput`` is the first-order change of the answer's loss when a head's output changes
    by ``Δoutput`` (MoA's profile: ``Σ ∂L/∂A · ΔA`` over the attention matrix is the same sum, as ``O = A·V``).
    Every layer attends causally to every earlier key (no sliding window), as the calibrators' reference does."""
    device = next(model.parameters()).device
    records: dict[int, list] = {}
    with swapped_attention(model, "attnzoo_trace", _traced_attention, _TRACE, lambda i: records.setdefault(i, [])):
        with torch.enable_grad():
            x = torch.tensor([ids], device=device)
            embeds = model.get_input_embeddings()(x).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=len(ids) - start + 1).logits
            F.cross_entropy(logits[0, :-1].float(), x[0, start:]).backward()
    missing = [i for i, r in sorted(records.items()) if len(r) != 1 or r[0][3] is None]
    if missing:
        raise AttnZooError(f"capture_grads: layers {missing} did not call attention exactly once on the answer's path")
    return [tuple(records[i][0]) for i in sorted(records)]


def per_kv_head(x: torch.Tensor, heads_kv: int, reduce: str = "amax") -> torch.Tensor:
    """``(..., heads)`` query-head figures -> ``(..., heads_kv)``, the max (or mean) over each KV head's query heads."""
    return getattr(x.unflatten(-1, (heads_kv, x.shape[-1] // heads_kv)), reduce)(-1)


def heads_kv_of(model) -> int:
    config = model.config.get_text_config()
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
