"""Accuracy budgets (``attnzoo plan --max-drop 0.02``): the cheapest plan whose accuracy on the calibration
tasks stays within ``max_drop`` of exact attention's.

:func:`cheapest_within` calibrates one plan per KV budget in :data:`BUDGETS`, cheapest first (``moa`` and
``zipvl`` profile once and allocate per budget), scores each by greedy generation on the calibration tasks
(``samples`` prompts per task at the calibrator's ``length``, seed ``seed + 1``: other prompts than the
calibration's own, and not eval's default seed 0) and returns the first whose accuracy drop is at most
``max_drop``. The plan records what was tried under ``calibrator["max_drop"]``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from ..errors import AttnZooError
from . import file
from .base import TASKS, Calibrator

#: the mean KV shares tried, cheapest first
BUDGETS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def task_accuracy(model, tokenizer, plan: file.Plan | None, tasks: tuple[str, ...], samples: int, length: int,
                  seed: int) -> float:
    """Mean greedy-generation score over ``samples`` prompts of each task at ``length`` tokens, with ``plan``
    (its prefill methods applied, its cache policies held) or, when None, exact attention and the full cache."""
    from transformers import DynamicCache

    from .. import hf as azhf
    from ..eval.runner import generate  # the eval's own greedy loop (eval sits beside plan: imported on use)
    from ..tasks import make_task

    azhf.apply(model, "exact" if plan is None else plan)
    try:
        if plan is not None and plan.needs_cache:
            def make():
                return azhf.make_cache(model, plan)
        else:
            def make():
                return DynamicCache(config=model.config)
        scores = [generate(model, tokenizer, sample, task, make).score
                  for task in map(make_task, tasks)
                  for sample in task.generate(samples, seed=seed, tokenizer=tokenizer, length=length)]
    finally:
        azhf.remove(model)
    return sum(scores) / len(scores)


def cheapest_within(cal: Calibrator, model, tokenizer, max_drop: float, *, budgets: tuple[float, ...] = BUDGETS,
                    samples: int = 2, model_name: str = "model",
                    accuracy: Callable[..., float] = task_accuracy) -> file.Plan:
    """The plan of the smallest budget in ``budgets`` whose calibration-task accuracy is within ``max_drop``
    of exact's (``cal``'s own ``budget`` is replaced); AttnZooError when none is."""
    if not 0 <= max_drop <= 1:
        raise AttnZooError(f"plan: max_drop expected an accuracy drop in [0, 1], got {max_drop!r}")
    tasks = getattr(cal, "tasks", TASKS)
    seed = cal.seed + 1

    def score(plan):
        return accuracy(model, tokenizer, plan, tasks, samples, cal.length, seed)

    start = time.perf_counter()
    exact = score(None)
    profile = cal.profile(model, tokenizer) if hasattr(cal, "allocate") and hasattr(cal, "profile") else None
    tried = []
    for budget in sorted(budgets):
        try:
            c = dataclasses.replace(cal, budget=budget)
        except AttnZooError:  # too small for this calibrator's cheapest head (e.g. a span under observe + 1)
            continue
        choices, scores = c.allocate(profile) if profile is not None else c.choose(model, tokenizer)
        plan = c.plan(model, choices, scores, time.perf_counter() - start, model_name=model_name)
        acc = score(plan)
        tried.append({"budget": budget, "kv_share": round(plan.kv_fraction(cal.length), 4), "accuracy": acc})
        if exact - acc <= max_drop + 1e-9:
            plan.calibrator["seconds"] = round(time.perf_counter() - start, 2)
            plan.calibrator["max_drop"] = {"max_drop": max_drop, "exact": exact, "tasks": list(tasks),
                                           "samples": samples, "seed": seed, "tried": tried}
            return plan
    raise AttnZooError(f"plan: no budget in {[round(b, 4) for b in sorted(budgets)]} keeps the accuracy on "
                       f"{', '.join(tasks)} within {max_drop} of exact's {exact:.3f} (tried: {tried})")
