"""Tasks: seeded generators of samples and their scorers, in one registry (like methods and cache policies).

>>> import attnzoo.tasks as T
>>> sorted(T.tasks())                                  # passkey, niah_single, ..., perplexity, ...
>>> task = T.make_task("passkey")
>>> samples = task.generate(4, seed=0, tokenizer=tok, length=2048)
>>> task.score(samples[0], "The pass key is 12345.")

Real-model tasks (:mod:`.needle`, :mod:`.synthetic`, :mod:`.perplexity`) build prompts of a given
length in tokens from text shipped in ``data/`` and score greedy answers by exact match;
``attnzoo eval`` runs them with every method and cache policy.

The names below load on first use (PEP 562), so a CLI module in this package starts without torch.
"""

from .._lazy import lazy_exports

#: public name -> the submodule defining it
_EXPORTS = {**dict.fromkeys(("TASKS", "Sample", "Task", "make_task", "register_task", "tasks"), ".base"),
            "TextTask": ".text"}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
