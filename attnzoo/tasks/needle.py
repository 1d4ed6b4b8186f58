"""Needle tasks: find values hidden in a long text (the passkey test and RULER's needle-in-a-haystack family).

Every needle sits between two haystack sentences at a depth in 10-90 % of the text; samples of one
call spread their depths evenly over that range. Keys are ``word-word`` pairs and word values come
from the shipped text's vocabulary; number values have 7 digits (the passkey: 5). The haystack is
the shipped King James text (``haystack="book"``) or RULER's repeated noise sentences (``"noise"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import param
from .base import Sample, register_task
from .text import TextTask, assemble, number, pick, spread, words

_INTRO = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the {kind} afterwards.\n")


@register_task
@dataclass
class Passkey(TextTask):
    """Passkey retrieval: a 5-digit pass key hidden at a depth of 10-90 % in repeated filler text.

    Measures whether attention can still reach one specific early token span (the first long-context
    test of Landmark Attention / the passkey paper). The prompt ends with "The pass key is", so a
    model that found it only has to copy it.
    """

    name: ClassVar[str] = "passkey"
    max_new_tokens: ClassVar[int] = 8
    depth: float | None = param(None, min=0.0, max=1.0, help="needle depth (default: spread over 0.1-0.9)")

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        key = number(gen, 5)
        depth = self.depth if self.depth is not None else spread(of)[index]
        question = "\nWhat is the pass key? The pass key is"
        prompt = assemble(
            tokenizer, length, haystack="noise", gen=gen, inserts=[(depth, f"The pass key is {key}. Remember it. "
                                                                             f"{key} is the pass key.")],
            prefix="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                   "I will quiz you about the important information there.\n",
            suffix=question)
        return Sample(prompt, (key,), {"depth": depth, "question": question})


@dataclass
class _Needles(TextTask):
    """Shared by the RULER needle tasks: needles "One of the special magic {kind} for {key} is: {value}."."""

    value: str = param("number", choices=("number", "word"), help="what the needles hide")
    haystack: str = param("book", choices=("book", "noise"), help="the shipped text or repeated noise sentences")

    def values(self, gen, k: int) -> list[str]:
        if self.value == "number":
            return [number(gen, 7) for _ in range(k)]
        return pick(gen, words()[:2000], k)

    def keys(self, gen, k: int) -> list[str]:
        pool = words()[:1000]
        return ["-".join(pick(gen, pool, 2)) for _ in range(k)]

    def build(self, tokenizer, length, gen, depth: float, needles: list[tuple[str, str]], queried: list[str],
              answers: list[str]) -> Sample:
        kind = "numbers" if self.value == "number" else "words"
        # the first needle at `depth`, the others spread after it, wrapping around inside 10-90 %
        depths = [depth] + [0.1 + (depth - 0.1 + 0.8 * i / len(needles)) % 0.8 for i in range(1, len(needles))]
        inserts = [(d, f"One of the special magic {kind} for {k} is: {v}.") for d, (k, v) in zip(depths, needles)]
        what = " and ".join(queried)
        if len(answers) == 1:
            q = (f"What is the special magic {kind[:-1]} for {what} mentioned in the provided text? "
                 f"The special magic {kind[:-1]} for {what} mentioned in the provided text is")
        else:
            q = (f"What are all the special magic {kind} for {what} mentioned in the provided text? "
                 f"The special magic {kind} for {what} mentioned in the provided text are")
        prompt = assemble(tokenizer, length, haystack=self.haystack, gen=gen, inserts=inserts,
                          prefix=_INTRO.format(kind=kind), suffix="\n" + q)
        return Sample(prompt, tuple(answers), {"depth": depth, "needles": len(needles), "question": "\n" + q})


@register_task
@dataclass
class NiahSingle(_Needles):
    """RULER single needle: one key-value needle; answer its value (a 7-digit number or a word)."""

    name: ClassVar[str] = "niah_single"

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        (key,), (value,) = self.keys(gen, 1), self.values(gen, 1)
        return self.build(tokenizer, length, gen, spread(of)[index], [(key, value)], [key], [value])


@register_task
@dataclass
class NiahMultikey(_Needles):
    """RULER multi-key: the queried needle among ``distractors`` needles with other keys; answer its value.

    Measures whether the model retrieves the right needle rather than any needle-like sentence.
    """

    name: ClassVar[str] = "niah_multikey"
    distractors: int = param(3, min=1, max=32, help="needles with other keys")

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        keys, values = self.keys(gen, 1 + self.distractors), self.values(gen, 1 + self.distractors)
        needles = list(zip(keys, values))
        order = torch.randperm(len(needles), generator=gen).tolist()
        return self.build(tokenizer, length, gen, spread(of)[index], [needles[i] for i in order], [keys[0]],
                          [values[0]])


@register_task
@dataclass
class NiahMultivalue(_Needles):
    """RULER multi-value: one key with ``values`` different values in separate needles; answer all of them."""

    name: ClassVar[str] = "niah_multivalue"
    max_new_tokens: ClassVar[int] = 40
    count: int = param(4, min=2, max=16, help="values hidden under the one key")

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        (key,), values = self.keys(gen, 1), self.values(gen, self.count)
        return self.build(tokenizer, length, gen, spread(of)[index], [(key, v) for v in values], [key],
                          values)


@register_task
@dataclass
class NiahMultiquery(_Needles):
    """RULER multi-query: ``queries`` needles with different keys, all asked for at once; answer every value."""

    name: ClassVar[str] = "niah_multiquery"
    max_new_tokens: ClassVar[int] = 40
    queries: int = param(2, min=2, max=16, help="keys asked for together")

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        keys, values = self.keys(gen, self.queries), self.values(gen, self.queries)
        return self.build(tokenizer, length, gen, spread(of)[index], list(zip(keys, values)), keys, values)
