"""Tasks a small model is *trained* on: seeded generators with exact answers.

Each task is a registered :class:`~attnzoo.tasks.Task` (kind ``"trained"``) whose fields are its
parameters. ``tensors(n, seed)`` returns ``(inputs (n, seq_len) int64, targets)`` deterministically;
``answer(inputs)`` recomputes the targets from the inputs alone (a scorer
independent of the generator, so tests can check one against the other);
``model_config()`` gives what a model needs (vocabulary, outputs, pooling).
Targets are token ids at scored positions and :data:`IGNORE` elsewhere
(``per-token`` tasks), or one class per sequence (``classify`` tasks). ``attnzoo.train`` trains models on them.

- ``mqar``: Zoology's multi-query associative recall.
- ``listops``: LRA ListOps (nested MAX/MIN/MED/SM over digits, 10 classes).
- ``retrieval``: LRA-style long-range matching: do the two halves carry the same planted code?
- ``passkey_train``: a digit string hidden in repeated filler, recalled after a query marker.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import AttnZooError
from ..registry import param
from .base import Sample, Task, register_task

IGNORE = -100


@dataclass
class TrainedTask(Task):
    """Base class of trained tasks (see the module docstring): ``tensors`` is the generator,
    ``answer`` the scorer; ``generate``/``score`` give the registry's per-sample view of the same."""

    kind: ClassVar[str] = "trained"
    #: "per-token" (targets (n, seq_len), IGNORE where unscored) or "classify" (one class per sequence)
    output: ClassVar[str] = "per-token"
    papers: ClassVar[tuple[str, ...]] = ()
    vocab: ClassVar[int]
    n_out: ClassVar[int]

    def tensors(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples as ``(inputs (n, seq_len) int64, targets)``, the same for the same seed."""
        raise NotImplementedError

    def answer(self, inputs: torch.Tensor) -> torch.Tensor:
        """The targets of ``inputs``, recomputed from the inputs alone."""
        raise NotImplementedError

    def generate(self, n: int, *, seed: int = 0, **context: Any) -> list[Sample]:
        inputs, targets = self.tensors(n, seed)
        return [Sample(prompt=x, meta={"targets": y}) for x, y in zip(inputs, targets)]

    def score(self, sample: Sample, prediction: torch.Tensor) -> float:
        """Share of the sample's scored positions (or its one class) that ``prediction`` gets right."""
        target = sample.meta["targets"]
        keep = target != IGNORE
        return float((torch.as_tensor(prediction)[keep] == target[keep]).float().mean())

    def model_config(self) -> dict[str, Any]:
        """Keyword arguments for :class:`attnzoo.train.TinyModel` (vocab, n_out, pool, max_len)."""
        return {"vocab": self.vocab, "n_out": self.n_out, "max_len": self.seq_len,
                "pool": "last" if self.output == "classify" else None}

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless stream of training batches; batch i is generated from the seed ``(seed, 0, i)``."""
        for i in itertools.count():
            yield self.tensors(batch_size, _mix(seed, 0, i))

    def held_out(self, n: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` examples in batches, from a seed stream disjoint from :meth:`batches`."""
        out, left, i = [], n, 0
        while left > 0:
            out.append(self.tensors(min(batch_size, left), _mix(seed, 1, i)))
            left, i = left - batch_size, i + 1
        return out


def _mix(seed: int, stream: int, i: int) -> int:
    """A 63-bit generator seed from (seed, stream, index), the same in every process (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), stream, i]).generate_state(1, np.uint64)[0]) >> 1


def _check_n(task: str, n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise AttnZooError(f"{task}: n expected an integer >= 1, got {n!r}")


# --------------------------------------------------------------------------- MQAR
@register_task
@dataclass
class MQAR(TrainedTask):
    """Multi-query associative recall (Zoology): ``k1 v1 … kκ vκ`` then, in a region of noise
    (token 0), query keys each followed by its value; the target at a query key is its value.

    Keys come from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``; the gap from the
    pairs to each query slot is drawn with weights ``slot^(power_a - 1)`` (Zoology's
    power-law spacing: most queries come soon after the pairs, some far).
    """

    name: ClassVar[str] = "mqar"
    papers: ClassVar[tuple[str, ...]] = ("Zoology: Measuring and Improving Recall in Efficient Language Models "
                                         "(Arora et al., 2023)",)
    seq_len: int = param(64, min=4, help="tokens per sequence (pairs, then the query region)")
    vocab_size: int = param(256, min=8, help="vocabulary: keys from the lower half (minus 0), values from the upper")
    pairs: int = param(8, min=1, help="key-value pairs κ per sequence")
    queries: int | None = param(None, min=1, help="queries per sequence (default: one per pair)")
    power_a: float = param(0.01, min=1e-6, max=1.0, help="power-law exponent of the query gap distribution")

    @property
    def vocab(self) -> int:
        return self.vocab_size

    @property
    def n_out(self) -> int:
        return self.vocab_size

    @property
    def n_queries(self) -> int:
        return self.pairs if self.queries is None else self.queries

    def validate(self) -> None:
        if self.n_queries > self.pairs:
            raise AttnZooError(f"mqar: queries expected <= pairs={self.pairs} (each query asks a distinct key), "
                               f"got {self.n_queries}")
        if self.vocab_size // 2 - 1 < self.pairs or self.vocab_size - self.vocab_size // 2 < self.pairs:
            raise AttnZooError(f"mqar: vocab_size expected >= {2 * self.pairs + 2} for {self.pairs} distinct keys and "
                               f"values, got {self.vocab_size}")
        if self.seq_len < 2 * self.pairs + 2 * self.n_queries:
            raise AttnZooError(f"mqar: seq_len expected >= 2·pairs + 2·queries = {2 * (self.pairs + self.n_queries)}, "
                               f"got {self.seq_len}")

    def tensors(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_n(self.name, n)
        g = torch.Generator().manual_seed(seed)
        half, kv, q = self.vocab_size // 2, self.pairs, self.n_queries
        keys = torch.rand(n, half - 1, generator=g).argsort(-1)[:, :kv] + 1
        values = torch.rand(n, self.vocab_size - half, generator=g).argsort(-1)[:, :kv] + half
        inputs = torch.zeros(n, self.seq_len, dtype=torch.long)
        targets = torch.full((n, self.seq_len), IGNORE, dtype=torch.long)
        inputs[:, 0:2 * kv:2], inputs[:, 1:2 * kv:2] = keys, values
        slots = (self.seq_len - 2 * kv) // 2  # query slots: pairs of (key, value) positions
        weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (self.power_a - 1)
        chosen = torch.multinomial(weights.expand(n, slots), q, replacement=False, generator=g)
        pos = 2 * kv + 2 * chosen  # (n, q) positions of the query keys
        which = torch.rand(n, kv, generator=g).argsort(-1)[:, :q]  # which pairs are asked
        rows = torch.arange(n)[:, None]
        inputs[rows, pos], inputs[rows, pos + 1] = keys.gather(1, which), values.gather(1, which)
        targets[rows, pos] = values.gather(1, which)
        return inputs, targets

    def answer(self, inputs: torch.Tensor) -> torch.Tensor:
        targets = torch.full_like(inputs, IGNORE)
        for b, row in enumerate(inputs.tolist()):
            bound = dict(zip(row[0:2 * self.pairs:2], row[1:2 * self.pairs:2]))
            for t in range(2 * self.pairs, len(row)):
                if row[t] in bound:
                    targets[b, t] = bound[row[t]]
        return targets


# --------------------------------------------------------------------------- ListOps
_OPS = ("MAX", "MIN", "MED", "SM")


@register_task
@dataclass
class ListOps(TrainedTask):
    """LRA ListOps: a nested prefix expression such as ``[MAX 4 3 [MIN 2 3 ] 1 0 ]`` over digits
    (MAX, MIN, MED = lower median, SM = sum mod 10); the class is its value (10 classes).

    Token ids: 0 padding (on the left, so the last token is the expression's end),
    1–10 the digits 0–9, 11–14 the operators, 15 the closing bracket.
    """

    name: ClassVar[str] = "listops"
    output: ClassVar[str] = "classify"
    papers: ClassVar[tuple[str, ...]] = ("ListOps (Nangia & Bowman, 2018); Long Range Arena (Tay et al., 2021)",)
    vocab: ClassVar[int] = 16
    n_out: ClassVar[int] = 10
    seq_len: int = param(256, min=8, help="tokens per sequence (expressions are left-padded to it)")
    max_depth: int = param(6, min=1, max=20, help="deepest operator nesting")
    max_args: int = param(5, min=2, max=10, help="most arguments per operator")
    min_len: int = param(16, min=1, help="shortest expression in tokens (shorter ones are redrawn)")
    leaf_p: float = param(0.6, min=0.0, max=1.0, help="chance that an argument below the root is a digit")

    def validate(self) -> None:
        if self.min_len > self.seq_len:
            raise AttnZooError(f"listops: min_len expected <= seq_len={self.seq_len}, got {self.min_len}")

    def _tree(self, rng: random.Random, depth: int) -> list[int]:
        if depth >= self.max_depth or (depth > 0 and rng.random() < self.leaf_p):
            return [1 + rng.randrange(10)]
        out = [11 + rng.randrange(4)]
        for _ in range(rng.randint(2, self.max_args)):
            out += self._tree(rng, depth + 1)
        return out + [15]

    def tensors(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_n(self.name, n)
        rng = random.Random(seed)
        inputs = torch.zeros(n, self.seq_len, dtype=torch.long)
        for b in range(n):
            for _ in range(10_000):
                expr = self._tree(rng, 0)
                if self.min_len <= len(expr) <= self.seq_len:
                    break
            else:
                raise AttnZooError(f"listops: no expression of {self.min_len}..{self.seq_len} tokens in 10000 draws "
                                   f"(max_depth={self.max_depth}, max_args={self.max_args}); widen the range")
            inputs[b, self.seq_len - len(expr):] = torch.tensor(expr)
        return inputs, self.answer(inputs)

    def answer(self, inputs: torch.Tensor) -> torch.Tensor:
        out = []
        for row in inputs.tolist():
            stack: list[list[int]] = [[]]
            for t in row:
                if t == 0:
                    continue
                if 1 <= t <= 10:
                    stack[-1].append(t - 1)
                elif 11 <= t <= 14:
                    stack.append([t])
                elif t == 15:
                    op, *args = stack.pop()
                    stack[-1].append(_apply(op, args))
                else:
                    raise AttnZooError(f"listops: token {t} is not in the ListOps vocabulary (0..15)")
            if len(stack) != 1 or len(stack[0]) != 1:
                raise AttnZooError("listops: an input row is not one complete expression")
            out.append(stack[0][0])
        return torch.tensor(out, dtype=torch.long)


def _apply(op: int, args: list[int]) -> int:
    name = _OPS[op - 11]
    if name == "MAX":
        return max(args)
    if name == "MIN":
        return min(args)
    if name == "MED":
        return sorted(args)[(len(args) - 1) // 2]
    return sum(args) % 10


# --------------------------------------------------------------------------- retrieval
@register_task
@dataclass
class Retrieval(TrainedTask):
    """Long-range matching (LRA Retrieval, synthetic): two documents of random filler separated
    by a SEP token, each with one planted code (``code_len`` tokens from a small code
    alphabet, preceded by a marker) at a random depth; class 1 when the two codes are equal.

    Token ids: 0 SEP, 1 marker, 2.. code tokens, then filler. Negatives' codes differ in
    exactly one position, so deciding needs every code token compared across the halves.
    With ``close`` a second SEP ends the second document: the token the class is read at is then
    the same at every length (a curriculum over ``seq_len`` keeps what the model learned to ask there).
    """

    name: ClassVar[str] = "retrieval"
    output: ClassVar[str] = "classify"
    papers: ClassVar[tuple[str, ...]] = ("Long Range Arena (Tay et al., 2021)",)
    seq_len: int = param(1024, min=16, help="tokens per pair of documents")
    code_len: int = param(2, min=1, max=8, help="tokens per planted code")
    code_vocab: int = param(8, min=2, max=64, help="distinct code tokens")
    filler_vocab: int = param(32, min=1, help="distinct filler tokens")
    close: bool = param(False, help="end the second document with a SEP too (the last token, where the class is read)")

    @property
    def vocab(self) -> int:
        return 2 + self.code_vocab + self.filler_vocab

    n_out: ClassVar[int] = 2

    def validate(self) -> None:
        least = 2 * (self.code_len + 1) + 1 + self.close
        if self.seq_len < least:
            raise AttnZooError(f"retrieval: seq_len expected >= {least}, got {self.seq_len}")

    def tensors(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_n(self.name, n)
        g = torch.Generator().manual_seed(seed)
        half, c = (self.seq_len - 1) // 2, self.code_len
        first = 2 + self.code_vocab
        inputs = first + torch.randint(self.filler_vocab, (n, self.seq_len), generator=g)
        inputs[:, half] = 0
        labels = torch.randint(2, (n,), generator=g)
        code = 2 + torch.randint(self.code_vocab, (n, c), generator=g)
        other = code.clone()
        col = torch.randint(c, (n,), generator=g)
        shift = 1 + torch.randint(self.code_vocab - 1, (n,), generator=g)
        rows = torch.arange(n)
        other[rows, col] = 2 + (code[rows, col] - 2 + shift) % self.code_vocab
        second = torch.where(labels[:, None].bool(), code, other)
        span = c + 1
        at1 = torch.randint(half - span + 1, (n,), generator=g)
        end = self.seq_len - self.close  # the second document is [half + 1, end)
        if self.close:
            inputs[:, end] = 0
        at2 = half + 1 + torch.randint(end - half - 1 - span + 1, (n,), generator=g)
        offs = torch.arange(span)
        inputs[rows[:, None], at1[:, None] + offs] = torch.cat([torch.ones(n, 1, dtype=torch.long), code], 1)
        inputs[rows[:, None], at2[:, None] + offs] = torch.cat([torch.ones(n, 1, dtype=torch.long), second], 1)
        return inputs, labels

    def answer(self, inputs: torch.Tensor) -> torch.Tensor:
        out = []
        for row in inputs.tolist():
            sep = row.index(0)
            codes = []
            for part in (row[:sep], row[sep + 1:]):
                m = part.index(1)
                codes.append(part[m + 1:m + 1 + self.code_len])
            out.append(int(codes[0] == codes[1]))
        return torch.tensor(out, dtype=torch.long)


# --------------------------------------------------------------------------- passkey
@register_task
@dataclass
class Passkey(TrainedTask):
    """Passkey retrieval for training: a repeated filler pattern (LongLoRA's repeated sentence,
    as tokens), a marker followed by ``digits`` random digits at a random depth, and at the
    end a query marker followed by the digits again; the targets are the digits, predicted
    one position early (the query marker predicts the first digit, and so on).

    Token ids: 0 marker, 1 query marker, 2–11 digits, 12.. the filler pattern.
    """

    name: ClassVar[str] = "passkey_train"
    papers: ClassVar[tuple[str, ...]] = ("Landmark Attention (Mohtashami & Jaggi, 2023); LongLoRA (Chen et al., 2023)",)
    seq_len: int = param(256, min=16, help="tokens per sequence")
    digits: int = param(5, min=1, max=16, help="digits in the passkey")
    pattern: int = param(7, min=1, max=64, help="length of the repeated filler pattern")

    @property
    def vocab(self) -> int:
        return 12 + self.pattern

    n_out: ClassVar[int] = 12

    def validate(self) -> None:
        if self.seq_len < 2 * (self.digits + 1) + 1:
            raise AttnZooError(f"passkey_train: seq_len expected >= {2 * (self.digits + 1) + 1}, got {self.seq_len}")

    def tensors(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_n(self.name, n)
        g = torch.Generator().manual_seed(seed)
        d, span = self.digits, self.digits + 1
        body = self.seq_len - span  # filler + needle, then the query span
        inputs = (12 + torch.arange(self.seq_len) % self.pattern).repeat(n, 1)
        key = 2 + torch.randint(10, (n, d), generator=g)
        at = torch.randint(body - span + 1, (n,), generator=g)
        rows, offs = torch.arange(n)[:, None], torch.arange(span)
        needle = torch.cat([torch.zeros(n, 1, dtype=torch.long), key], 1)
        inputs[rows, at[:, None] + offs] = needle
        inputs[:, body] = 1
        inputs[:, body + 1:] = key
        return inputs, self.answer(inputs)

    def answer(self, inputs: torch.Tensor) -> torch.Tensor:
        targets = torch.full_like(inputs, IGNORE)
        body = self.seq_len - self.digits - 1
        for b, row in enumerate(inputs.tolist()):
            m = row.index(0)
            targets[b, body:body + self.digits] = torch.tensor(row[m + 1:m + 1 + self.digits])
        return targets
