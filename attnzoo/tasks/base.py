"""The task contract and registry: a task is a seeded generator of samples plus a scorer.

A task is a small dataclass whose fields (declared with :func:`attnzoo.param`) are validated like
method parameters. ``generate(n, seed=..., **context)`` returns ``n`` :class:`Sample` objects,
the same ones for the same seed and context; ``score(sample, prediction)`` says how well one
prediction did, in [0, 1] for ``metric="accuracy"`` tasks. What the context holds and what a
prediction is depends on the kind of task: real-model text tasks (:class:`TextTask`) take a
``tokenizer`` and a ``length`` in tokens and score generated text; other kinds (trained tasks)
define their own.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..registry import Method, Registry


@dataclass(frozen=True)
class Sample:
    """One example: what the model reads, the expected answer strings, and how it was made."""

    prompt: Any
    answers: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    """Base class of every registered task (a seeded generator + a scorer)."""

    name: ClassVar[str] = ""
    #: what ``generate``'s samples are for: "generate" (greedy text answers), "perplexity", or a kind of
    #: task other modules define (e.g. trained tasks)
    kind: ClassVar[str] = "generic"
    #: what ``score`` returns: "accuracy" (higher is better, in [0, 1]) or "perplexity" (lower is better)
    metric: ClassVar[str] = "accuracy"

    def __post_init__(self) -> None:
        Method.__post_init__(self)  # the registry's field checks (types, ranges, choices) + validate()

    def validate(self) -> None:
        """Cross-parameter checks; raise AttnZooError naming the parameter."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def generate(self, n: int, *, seed: int = 0, **context: Any) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, prediction: Any) -> float:
        raise NotImplementedError

    def aggregate(self, scores: list[float]) -> float:
        """The task's figure over samples' scores (the mean; perplexity overrides it)."""
        return sum(scores) / len(scores)


_LOADED = False


def _load_builtin_tasks() -> None:
    """Import every module of ``attnzoo.tasks`` once (each registers its tasks)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__package__}.{info.name}")


TASKS: Registry[type[Task]] = Registry("task", load=_load_builtin_tasks)


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to the registry under ``cls.name``."""
    return TASKS.add(cls.name, cls)


def tasks() -> dict[str, type[Task]]:
    """Every registered task class, by name."""
    return dict(TASKS)


def make_task(name: str, **params: Any) -> Task:
    """A configured task; unknown names and parameters raise AttnZooError with suggestions."""
    return TASKS.build(name, **params)
