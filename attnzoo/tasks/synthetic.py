"""RULER's synthetic aggregation and tracing tasks: variable tracking and common-words extraction."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import AttnZooError
from ..registry import param
from .base import Sample, register_task
from .text import TextTask, assemble, n_tokens, number, pick, spread, words


@register_task
@dataclass
class VariableTracking(TextTask):
    """RULER variable tracking: follow a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... through noise text.

    ``chains`` chains of ``hops`` re-assignments each are hidden in repeated noise sentences; the
    question names one chain's value and the answer is every variable of that chain (multi-hop tracing:
    each hop's key is only found by reading the previous one). SmolLM2-135M does not solve it with exact
    attention at any setting tried, one hop included (docs/eval.md): it names one variable of the chain, not both.
    """

    name: ClassVar[str] = "variable_tracking"
    max_new_tokens: ClassVar[int] = 30
    hops: int = param(4, min=1, max=16, help="re-assignments after the first one")
    chains: int = param(1, min=1, max=8, help="chains (the others are distractors)")

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        n = self.chains * (self.hops + 1)
        names = []
        while len(names) < n:  # distinct 5-letter upper-case names
            name = "".join(pick(gen, string.ascii_uppercase, 5))
            names += [name] if name not in names else []
        values = [number(gen, 5) for _ in range(self.chains)]
        inserts, start = [], spread(of)[index] * 0.5  # chains begin in the first half so every hop fits after
        for c in range(self.chains):
            chain = names[c * (self.hops + 1):(c + 1) * (self.hops + 1)]
            lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            inserts += [(min(start + 0.4 * (j / len(lines)) + 0.01 * c, 0.9), line) for j, line in enumerate(lines)]
        count = self.hops + 1
        question = (f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
                    f"Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
                    f"are assigned the value {values[0]}, they are:")
        prompt = assemble(
            tokenizer, length, haystack="noise", gen=gen, inserts=inserts,
            prefix="Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
            suffix=question)
        return Sample(prompt, tuple(names[:count]), {"depth": start, "question": question})


@register_task
@dataclass
class CommonWords(TextTask):
    """RULER common-words extraction: the ``common`` words repeated most often in a long numbered list.

    Each common word appears ``repeats`` times, every other word ``rare`` times; the list grows with
    more rare words until the prompt has ``length`` tokens. Measures aggregation over the whole context
    (no single needle to retrieve); the answer is every common word.
    """

    name: ClassVar[str] = "common_words"
    max_new_tokens: ClassVar[int] = 60
    common: int = param(10, min=1, max=50, help="words to find")
    repeats: int = param(30, min=2, max=1000, help="times each common word appears")
    rare: int = param(3, min=1, max=100, help="times each other word appears")

    def validate(self) -> None:
        if self.rare >= self.repeats:
            raise AttnZooError(f"{self.name}: parameter 'rare' expected < repeats ({self.repeats}), got {self.rare}")

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        pool = pick(gen, words()[:6000], min(6000, len(words())))
        common, others = pool[:self.common], pool[self.common:]
        prefix = ("Below is a numbered list of words. In these words, some appear more often than others. "
                  "Memorize the ones that appear most often.\n")
        suffix = (f"\nQuestion: What are the {self.common} most common words in the above list? Answer: The top "
                  f"{self.common} words that appear most often in the list are:")
        budget = length - n_tokens(tokenizer, prefix + suffix) - 2
        per_entry = n_tokens(tokenizer, "\n".join(f"{i + 100}. {w}" for i, w in enumerate(pool[:200]))) / 200
        n_rare = max(0, int((budget / per_entry - self.common * self.repeats) / self.rare))
        while True:
            entries = common * self.repeats + others[:n_rare] * self.rare
            if n_rare > len(others):
                raise AttnZooError(f"{self.name}: length {length} needs more distinct words than the text has")
            order = torch.randperm(len(entries), generator=gen).tolist()
            prompt = prefix + "\n".join(f"{i + 1}. {entries[j]}" for i, j in enumerate(order)) + suffix
            if n_tokens(tokenizer, prompt) <= length:
                return Sample(prompt, tuple(common), {"rare_words": n_rare, "question": suffix})
            if n_rare == 0:
                raise AttnZooError(f"length: {self.name} with common={self.common}, repeats={self.repeats} needs "
                                   f"more than {length} tokens (lower repeats or common)")
            n_rare = max(0, n_rare - max(1, n_rare // 20))
