"""Needle tasks: find values hidden in a long text (the passkey test and RULER's needle-in-a-haystack family).

Every needle sits between two haystack sentences at a depth in 10-90 % of the text; samples of one
call spread their depths evenly over that range. Keys are ``word-word`` pairs and word values come
from the shipped text's vocabulary; number values have 7 digits (the passkey: 5). The haystack is
the shipped King James text (``haystack="book"``) or RULER's repeated noise sentences (``"noise"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
    """Shared by the RULER needle tasks: key-value needles in a haystack, a question ending where the answer starts.

    ``needle="repeat"`` (the default) states each needle twice, in the passkey's style: "The special magic
    number for {key} is {value}. Remember it. {value} is the special magic number for {key}." (multi-value:
    "One of the special magic numbers ..."); ``"ruler"`` is RULER's one-statement needle "One of the special
    magic numbers for {key} is: {value}.". The question ends with the start of the answer ("... The special
    magic number for {key} is"), so the answer is a direct continuation, as in the passkey. Measured on
    SmolLM2-135M with exact attention (docs/eval.md): word values are found with repeated needles in the
    noise haystack and mostly missed in the book text (whose own words are the values) or with RULER's
    needle, hence the defaults ``needle="repeat"`` and ``haystack="noise"``.
    """

    value: str = param("number", choices=("number", "word"), help="what the needles hide")
    haystack: str = param("noise", choices=("book", "noise"), help="the shipped text or repeated noise sentences")
    needle: str = param("repeat", choices=("repeat", "ruler"),
                        help="repeat: each needle states its value twice (passkey style); ruler: RULER's one statement")

    #: "One of the ... for {key}" needles (several values under one key)
    shared_key: ClassVar[bool] = False

    def values(self, gen, k: int) -> list[str]:
        if self.value == "number":
            return [number(gen, 7) for _ in range(k)]
        return pick(gen, words()[:2000], k)

    def keys(self, gen, k: int) -> list[str]:
        pool = words()[:1000]
        return ["-".join(pick(gen, pool, 2)) for _ in range(k)]

    @property
    def noun(self) -> str:
        return "number" if self.value == "number" else "word"

    def needle_text(self, key: str, value: str) -> str:
        """One needle's sentence(s)."""
        if self.needle == "ruler":
            return f"One of the special magic {self.noun}s for {key} is: {value}."
        what = f"one of the special magic {self.noun}s" if self.shared_key else f"the special magic {self.noun}"
        return f"{what[0].upper()}{what[1:]} for {key} is {value}. Remember it. {value} is {what} for {key}."

    def build(self, tokenizer, length, gen, depth: float, needles: list[tuple[str, str]], question: str,
              answers: list[str]) -> Sample:
        # the first needle at `depth`, the others spread after it, wrapping around inside 10-90 %
        depths = [depth] + [0.1 + (depth - 0.1 + 0.8 * i / len(needles)) % 0.8 for i in range(1, len(needles))]
        inserts = [(d, self.needle_text(k, v)) for d, (k, v) in zip(depths, needles)]
        prompt = assemble(tokenizer, length, haystack=self.haystack, gen=gen, inserts=inserts,
                          prefix=_INTRO.format(kind=self.noun + "s"), suffix="\n" + question)
        return Sample(prompt, tuple(answers), {"depth": depth, "needles": [text for _, text in inserts],
                                               "question": "\n" + question})


@register_task
@dataclass
class NiahSingle(_Needles):
    """RULER single needle: one key-value needle; answer its value (a 7-digit number or a word)."""

    name: ClassVar[str] = "niah_single"

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        (key,), (value,) = self.keys(gen, 1), self.values(gen, 1)
        question = f"What is the special magic {self.noun} for {key}? The special magic {self.noun} for {key} is"
        return self.build(tokenizer, length, gen, spread(of)[index], [(key, value)], question, [value])


@register_task
@dataclass
class NiahMultikey(_Needles):
    """RULER multi-key: the queried needle among ``distractors`` needles with other keys; answer its value.

    Measures whether the model retrieves the right needle rather than any needle-like sentence. The
    queried needle sits at the sample's depth, the distractors spread after it. SmolLM2-135M with exact
    attention picks the right one of two needles (``distractors=1``, the default) but often a wrong
    one of four (docs/eval.md).
    """

    name: ClassVar[str] = "niah_multikey"
    distractors: int = param(1, min=1, max=32, help="needles with other keys")

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        keys, values = self.keys(gen, 1 + self.distractors), self.values(gen, 1 + self.distractors)
        question = (f"What is the special magic {self.noun} for {keys[0]}? "
                    f"The special magic {self.noun} for {keys[0]} is")
        return self.build(tokenizer, length, gen, spread(of)[index], list(zip(keys, values)), question, values[:1])


@register_task
@dataclass
class NiahMultivalue(_Needles):
    """RULER multi-value: one key with ``count`` different values in separate needles; answer all of them."""

    name: ClassVar[str] = "niah_multivalue"
    shared_key: ClassVar[bool] = True
    count: int = param(2, min=2, max=16, help="values hidden under the one key")

    @property
    def max_new_tokens(self) -> int:
        return 6 + 10 * self.count  # ", 1234567" is 9 tokens of SmolLM2's tokenizer

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        (key,), values = self.keys(gen, 1), self.values(gen, self.count)
        question = (f"What are all the special magic {self.noun}s for {key}? "
                    f"The special magic {self.noun}s for {key} are")
        return self.build(tokenizer, length, gen, spread(of)[index], [(key, v) for v in values], question, values)


@register_task
@dataclass
class NiahMultiquery(_Needles):
    """RULER multi-query: ``queries`` needles with different keys, all asked for at once; answer every value.

    The question asks for all keys and ends with the first one's answer sentence ("The special magic
    number for {first} is"): the model completes it and goes on with the others' sentences.
    """

    name: ClassVar[str] = "niah_multiquery"
    queries: int = param(2, min=2, max=16, help="keys asked for together")

    @property
    def max_new_tokens(self) -> int:
        return 12 + 24 * (self.queries - 1)  # each further value comes in its own sentence naming its key

    def make(self, tokenizer, length, gen, *, index, of) -> Sample:
        keys, values = self.keys(gen, self.queries), self.values(gen, self.queries)
        question = (f"What are the special magic {self.noun}s for {', '.join(keys[:-1])} and {keys[-1]}? "
                    f"The special magic {self.noun} for {keys[0]} is")
        return self.build(tokenizer, length, gen, spread(of)[index], list(zip(keys, values)), question, values)
