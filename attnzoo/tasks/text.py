"""Real-model text tasks: prompts of a given length in tokens, built from shipped text; exact-match scoring.

A :class:`TextTask` builds each prompt from an instruction, a haystack (the shipped King James text,
``data/kjv.txt``, or RULER's repeated "noise" sentences), a few inserted sentences (needles) at chosen
depths, and a question that ends where the answer starts (kept in ``Sample.meta["question"]``). The
haystack is cut so the whole prompt is at most ``length`` tokens of the given tokenizer. Generation is
greedy; a prediction scores the share of the expected strings it contains as whole words.

Every text task takes ``question="inline"`` (the default: the prompt is read in one pass, question
included) or ``"after"``: the evaluation reads the context first, so a KV-cache policy compresses it
before the question exists, and appends the question afterwards (question-agnostic compression: one
compressed context reused for questions not known when it was compressed).
"""

from __future__ import annotations

import functools
import itertools
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import AttnZooError
from ..registry import param
from .base import Sample, Task

#: Genesis, Exodus and Leviticus 1-14 (KJV, public domain; source in the file's header), ~104K SmolLM2 tokens
BOOK = Path(__file__).with_name("data") / "kjv.txt"
#: RULER's and the passkey paper's filler: repeated, content-free sentences
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@functools.cache
def book_text() -> str:
    """The shipped text without its ``#`` header lines."""
    return "".join(line for line in BOOK.read_text().splitlines(keepends=True) if not line.startswith("#")).strip()


@functools.cache
def book_sentences() -> tuple[str, ...]:
    """The shipped text cut into sentences (on ``.``, ``?``, ``!`` followed by a space), whitespace squeezed."""
    flat = re.sub(r"\s+", " ", book_text())
    return tuple(s for s in re.split(r"(?<=[.?!])\s", flat) if s)


@functools.cache
def words() -> tuple[str, ...]:
    """Plain lower-case words of the shipped text (4-10 letters), most frequent first: keys, values, lists."""
    counts = Counter(w for w in re.findall(r"\b[a-z]{4,10}\b", book_text()))
    return tuple(w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


_COUNTS: dict[tuple[int, str], list[int]] = {}


def _sentence_tokens(tokenizer, source: str) -> tuple[tuple[str, ...], list[int]]:
    """The haystack's sentences and each one's token count (with its leading space), cached per tokenizer."""
    sentences = book_sentences() if source == "book" else tuple(re.split(r"(?<=[.])\s", NOISE))
    key = (id(tokenizer), source)
    if key not in _COUNTS:
        ids = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
        _COUNTS[key] = [len(x) for x in ids]
    return sentences, _COUNTS[key]


def assemble(tokenizer, length: int, *, prefix: str, suffix: str, inserts: list[tuple[float, str]],
             haystack: str, gen: torch.Generator) -> str:
    """A prompt of at most ``length`` tokens: prefix, haystack with ``(depth, sentence)`` inserts, suffix.

    Inserts go between haystack sentences at ``depth`` (0 = first, 1 = last) of the haystack; the
    book haystack starts at a seeded sentence and wraps around.
    """
    sentences, counts = _sentence_tokens(tokenizer, haystack)
    fixed = n_tokens(tokenizer, prefix + suffix) + sum(n_tokens(tokenizer, " " + s) + 1 for _, s in inserts)
    budget = length - fixed - 2
    if budget < 0:
        raise AttnZooError(f"length: expected at least {fixed + 2} tokens for this task's prompt, got {length}")
    start = int(torch.randint(len(sentences), (1,), generator=gen)) if haystack == "book" else 0
    chosen, used = [], 0
    # the book: one pass from `start`, wrapping around, skipping a sentence too long for what is left;
    # the noise: its sentences repeated until the budget is full
    for i in range(start, start + len(sentences)) if haystack == "book" else itertools.count():
        if used + counts[i % len(sentences)] <= budget:
            chosen.append(sentences[i % len(sentences)])
            used += counts[i % len(sentences)]
        if budget - used < min(counts):
            break
    while True:
        body = list(chosen)
        for depth, sentence in sorted(inserts, key=lambda x: -x[0]):  # deepest first keeps indices valid
            body.insert(round(depth * len(chosen)), sentence)
        prompt = prefix + " ".join(body) + suffix
        if n_tokens(tokenizer, prompt) <= length or not chosen:
            return prompt
        chosen.pop()  # token counts of joined sentences can differ from the sum by a token or two


def spread(n: int, lo: float = 0.1, hi: float = 0.9) -> list[float]:
    """``n`` depths evenly spread over ``[lo, hi]`` (one sample: the middle)."""
    return [(lo + hi) / 2] if n == 1 else [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def found(answer: str, prediction: str) -> bool:
    """``answer`` occurs in ``prediction`` as a whole word (case-insensitive)."""
    return re.search(rf"(?<![\w-]){re.escape(answer)}(?![\w-])", prediction, flags=re.IGNORECASE) is not None


@dataclass
class TextTask(Task):
    """A real-model task: prompts of ``length`` tokens, greedy generation, exact-match scoring.

    Subclasses implement :meth:`make` (one sample's prompt and answers from a seeded generator).
    """

    kind: ClassVar[str] = "generate"
    #: generation stops after this many new tokens (or the end-of-sequence token)
    max_new_tokens: ClassVar[int] = 12
    question: str = param("inline", choices=("inline", "after"),
                          help="after: the context is read (and a cache policy compresses it) before the question "
                               "is appended")

    def generate(self, n: int, *, seed: int = 0, tokenizer=None, length: int | None = None, **context) -> list[Sample]:
        if tokenizer is None or length is None:
            raise AttnZooError(f"{self.name}: generate needs tokenizer= and length= (tokens per prompt)")
        out = []
        for i in range(n):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.name}/{seed}/{i}/{length}".encode()))
            sample = self.make(tokenizer, length, gen, index=i, of=n)
            out.append(Sample(sample.prompt, sample.answers, {**sample.meta, "tokens": n_tokens(tokenizer, sample.prompt)}))
        return out

    def make(self, tokenizer, length: int, gen: torch.Generator, *, index: int, of: int) -> Sample:
        raise NotImplementedError

    def score(self, sample: Sample, prediction: Any) -> float:
        """The share of the expected strings found in the prediction as whole words."""
        if not sample.answers:
            raise AttnZooError(f"{self.name}: a sample without expected answers cannot be scored")
        return sum(found(a, str(prediction)) for a in sample.answers) / len(sample.answers)


def pick(gen: torch.Generator, pool, k: int = 1) -> list:
    """``k`` distinct items of ``pool``, seeded."""
    if k > len(pool):
        raise AttnZooError(f"tasks: asked for {k} distinct items from a pool of {len(pool)}")
    return [pool[int(i)] for i in torch.randperm(len(pool), generator=gen)[:k]]


def number(gen: torch.Generator, digits: int) -> str:
    return str(int(torch.randint(10 ** (digits - 1), 10 ** digits, (1,), generator=gen)))
