"""Tasks: seeded generators of samples and their scorers, in one registry (like methods and cache policies).

>>> import attnzoo.tasks as T
>>> sorted(T.tasks())                                  # passkey, niah_single, ..., perplexity, ...
>>> task = T.make_task("passkey")
>>> samples = task.generate(4, seed=0, tokenizer=tok, length=2048)
>>> task.score(samples[0], "The pass key is 12345.")

Real-model tasks (:mod:`.needle`, :mod:`.synthetic`, :mod:`.perplexity`) build prompts of a given
length in tokens from text shipped in ``data/`` and score greedy answers by exact match;
``attnzoo eval`` runs them with every method and cache policy.
"""

from .base import TASKS, Registry, Sample, Task, make_task, register_task, tasks
from .text import TextTask

__all__ = ["TASKS", "Registry", "Sample", "Task", "TextTask", "make_task", "register_task", "tasks"]
