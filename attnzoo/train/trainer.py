"""``fit``: train any model on batches of (inputs, targets) with AdamW, early stopping and a progress bar.

Generic over the model and the task: ``train`` yields ``(inputs, targets)``
pairs (inputs a tensor, a tuple of tensors or a dict of keyword tensors),
``loss(outputs, targets)`` is a scalar, ``metric(outputs, targets)`` returns
``(correct, counted)`` summed over the held-out batches into an accuracy.
The defaults are token classification: cross-entropy and accuracy over
targets ``!= IGNORE`` (-100), which covers per-token logits ``(B, N, C)``
with ``(B, N)`` targets and pooled logits ``(B, C)`` with ``(B,)`` targets.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnZooError

IGNORE = -100


def token_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the positions whose target is not :data:`IGNORE`."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)


def token_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct argmax predictions, counted positions) over targets that are not :data:`IGNORE`."""
    keep = targets != IGNORE
    return int((outputs.argmax(-1)[keep] == targets[keep]).sum()), int(keep.sum())


#: auxiliary losses layers leave on themselves after a training forward, and their weights
AUX_LOSSES = {"distill_loss": 1.0, "balance_loss": 0.01}


def aux_loss(model: nn.Module) -> torch.Tensor | float:
    """Weighted sum of the auxiliary losses the model's layers hold (:data:`AUX_LOSSES`): learned sparse
    predictors' distillation, mixture-of-head load balancing. 0 when no layer has one."""
    total: torch.Tensor | float = 0.0
    for m in model.modules():
        for name, weight in AUX_LOSSES.items():
            value = m.__dict__.get(name)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                total = total + weight * value
    return total


@dataclass
class FitResult:
    """What :func:`fit` did: steps taken, best held-out metric (the weights left in the model), why it stopped."""

    steps: int
    best_metric: float
    best_step: int
    stopped: str  # "target" | "plateau" | "steps" | "data"
    seconds: float
    final_loss: float
    history: list[dict] = field(default_factory=list)  # one entry per evaluation: step, loss, metric


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def evaluate(model: nn.Module, batches: Iterable, metric: Callable = token_accuracy) -> float:
    """The metric summed over ``batches`` of (inputs, targets): correct / counted (in eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct = counted = 0
    with torch.no_grad():
        for inputs, targets in batches:
            c, n = metric(_call(model, inputs), targets)
            correct, counted = correct + c, counted + n
    model.train(was_training)
    if counted == 0:
        raise AttnZooError("evaluate: the held-out batches counted no positions (every target is ignored?)")
    return correct / counted


def _bar(enabled: bool, total: int, desc: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[status]}"), disable=not enabled, transient=False)
    return progress, progress.add_task(desc, total=total, status="")


def timed_step(model: nn.Module, loss: Callable[[], torch.Tensor], lr: float = 1e-3) -> Callable[[], None]:
    """A closure running one training step of ``model`` per call (``loss()``, backward, AdamW), already run
    once (layouts, masks, allocator warmed up): what the step benchmarks time."""
    opt = torch.optim.AdamW(model.parameters(), lr)

    def step() -> None:
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    step()
    return step


def fit(model: nn.Module, train: Iterable, held_out: Sequence, *, steps: int = 1000, lr: float = 1e-3,
        weight_decay: float = 0.1, warmup: int = 50, grad_clip: float = 1.0, eval_every: int = 50,
        patience: int = 8, target: float | None = None, loss: Callable = token_loss,
        metric: Callable = token_accuracy, seed: int = 0, progress: bool = True, desc: str = "training",
        extra_loss: Callable[[nn.Module], torch.Tensor | float] | None = aux_loss,
        on_eval: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``model`` in place with AdamW (linear warm-up, cosine decay), evaluating every ``eval_every`` steps.

    Stops at ``steps``, when the held-out metric reaches ``target``, when it has
    not improved for ``patience`` evaluations, or when ``train`` runs out (a
    Sequence is cycled). The best evaluated weights are loaded back. ``extra_loss(model)``
    adds an auxiliary term after each forward (default :func:`aux_loss`: the layers' own
    distillation and load-balancing losses; None for none). ``on_eval`` receives each
    evaluation's history entry as it happens (for logs of long runs).
    """
    for name, value, lo in (("steps", steps, 1), ("eval_every", eval_every, 1), ("patience", patience, 1),
                            ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < lo:
            raise AttnZooError(f"fit: {name} expected an integer >= {lo}, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise AttnZooError(f"fit: lr expected a positive finite number, got {lr!r}")
    if not held_out:
        raise AttnZooError("fit: held_out expected at least one (inputs, targets) batch, got none")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AttnZooError("fit: the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (warmup + 1)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    data = itertools.cycle(train) if isinstance(train, Sequence) else iter(train)
    best, best_step, best_state, stale = -math.inf, 0, None, 0
    history: list[dict] = []
    stopped, step, running = "steps", 0, float("nan")
    start = time.perf_counter()
    progress, task = _bar(progress, steps, desc)
    model.train()
    with progress, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while step < steps:
            try:
                inputs, targets = next(data)
            except StopIteration:
                stopped = "data"
                break
            value = loss(_call(model, inputs), targets)
            if extra_loss is not None:
                value = value + extra_loss(model)
            if not torch.isfinite(value):
                raise AttnZooError(f"fit: the loss became {value.item()} at step {step} (lower lr?)")
            opt.zero_grad(set_to_none=True)
            value.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            step += 1
            running = value.item() if math.isnan(running) else 0.9 * running + 0.1 * value.item()
            if step % eval_every == 0 or step == steps:
                score = evaluate(model, held_out, metric)
                history.append({"step": step, "loss": running, "metric": score})
                if on_eval is not None:
                    on_eval(history[-1])
                if score > best:
                    best, best_step, stale = score, step, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
                progress.update(task, status=f"loss {running:.3f}  held-out {score:.3f}  best {best:.3f}")
                if target is not None and score >= target:
                    stopped = "target"
                    break
                if stale >= patience:
                    stopped = "plateau"
                    break
            progress.update(task, advance=1)
    if best_state is None:  # stopped before the first evaluation
        best, best_step = evaluate(model, held_out, metric), step
        history.append({"step": step, "loss": running, "metric": best})
    else:
        model.load_state_dict(best_state)
    return FitResult(steps=step, best_metric=best, best_step=best_step, stopped=stopped,
                     seconds=time.perf_counter() - start, final_loss=running, history=history)
