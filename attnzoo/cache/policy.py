"""Cache policies: small dataclasses that decide what a query reads and what the cache keeps.

A policy is one of four kinds:

* ``keep``: holds every token and reads it all (``full``, ``quantized``);
* ``evict``: permanently drops tokens after each ``attend`` (``streaming``,
  ``h2o``, ``snapkv``): the store is compacted and ``nbytes`` drops;
* ``select``: holds everything but reads a subset at decode steps
  (``tokenselect``, ``quest``, ``infllm``, ``recycled``, ``retrieval``);
* ``split``: different KV heads get different policies (``razor``, ``duo``).

The contract: ``read(store, q, step)`` returns the :class:`Partial` of the
newest queries over what they may read, and ``update(store, q, step)`` (run
right after) evicts or refreshes state. Parameters are dataclass fields declared
with :func:`attnzoo.param` and validated exactly like method parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.partial import Partial
from ..errors import AttnZooError
from ..registry import Registry, check_fields
from .read import flash_read
from .store import Store


@dataclass(frozen=True)
class Step:
    """What one ``attend`` call knows: scale, causality, the queries (the newest ``nq`` tokens), the logical length."""

    scale: float
    causal: bool
    nq: int  # queries: the newest nq tokens
    seq_length: int
    splits: int  # at most this many split-K ranges per read
    split_size: int  # of at least this many keys each
    device: torch.device | None = None  # of the queries' positions

    @functools.cached_property
    def q_pos(self) -> torch.Tensor:
        """``(nq,)`` absolute positions of the queries (built on first use: a decode step's fused reads need none)."""
        return torch.arange(self.seq_length - self.nq, self.seq_length, device=self.device)

    @property
    def split(self) -> dict[str, int]:
        """The split-K options of :func:`attnzoo.cache.read.flash_read`."""
        return {"splits": self.splits, "split_size": self.split_size}

    @property
    def decode(self) -> bool:
        """A single new token: every held key is older or equal, no causal mask is needed."""
        return self.nq == 1


@dataclass
class Policy:
    """Base class: holds everything and reads everything through split-K (``full``)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "keep"
    #: the store metadata the policy reads (documentation; shown by ``policies()``)
    reads: ClassVar[str] = "nothing"
    papers: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_fields(self)  # the registry's one parameter checker (types, ranges, choices)
        self.validate()
        self.reset()

    def validate(self) -> None:
        """Cross-parameter checks; raise AttnZooError naming the parameter."""

    def reset(self) -> None:
        """Forget runtime state (selection caches, counters)."""

    def make_store(self) -> Store:
        return Store()

    def build(self, heads_kv: int):
        """The layer object this policy drives (one uniform store unless the policy splits heads)."""
        from .layer import Layer

        return Layer(self)

    def read(self, store: Store, q: torch.Tensor, step: Step) -> Partial:
        return flash_read(q, store.keys(), store.values(), scale=step.scale, causal=step.causal,
                          valid=store.valid, **step.split)

    def update(self, store: Store, q: torch.Tensor, step: Step) -> None:
        """Runs after each read: eviction and state refresh."""

    def state_nbytes(self) -> int:
        """Bytes of runtime state held outside the store (counted in ``KVCache.nbytes``)."""
        return 0

    def crop(self, store: Store, length: int) -> None:
        """The store was cropped to positions ``< length``; drop state that refers to later tokens."""
        self.reset()

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Batch rows were reordered; reorder or drop batch-indexed state."""
        self.reset()


#: every cache policy class by name
POLICIES: Registry[type[Policy]] = Registry("policy")


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator adding a policy to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"register_policy: {cls.__name__} needs a unique `name`, got {cls.name!r}")
    return POLICIES.add(cls.name, cls)


def policies() -> dict[str, type[Policy]]:
    """Every registered cache policy class, by name."""
    return dict(POLICIES)


def make_policy(name: Any, **params: Any) -> Policy:
    """A configured policy; unknown names and parameters raise AttnZooError with suggestions."""
    if isinstance(name, Policy):
        if params:
            raise AttnZooError(f"policy: got a configured {name.name!r} policy and extra parameters {sorted(params)}")
        return name
    return POLICIES.build(name, **params)
