"""LightSeq's rematerialization-aware checkpointing (Li et al., "DistFlashAttn /
LightSeq: sequence level parallelism for distributed training of long context
transformers", 2023) for layers that call the sequence-parallel attention.

Ordinary activation checkpointing (``torch.utils.checkpoint``) keeps only a
layer's inputs and reruns the whole layer in the backward pass, attention
included: for ring attention that is the full forward again, compute and
P-1 K/V transfers, although the attention backward only needs the output and
its log-sum-exp. Inside :func:`lightseq_checkpoint` each ring call keeps
``(out, lse)`` from the first forward; when the layer is rerun for the
backward, the call hands the kept pair back instead of recomputing, and its
own backward (which never reruns the forward) proceeds from it. Cost: one
output and one lse per attention call held until the backward (what
FlashAttention-style backward needs anyway); everything else of the layer is
recomputed as usual.

The ring functions' ``lightseq`` option (default True) says whether a call
takes part; outside :func:`lightseq_checkpoint` it has no effect.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import AttnZooError


class _Kept:
    """The ``(out, lse)`` pairs of one checkpointed region, in call order."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replayed = 0

    @contextmanager
    def mode(self, replaying: bool):
        token = _ACTIVE.set((self, replaying))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


_ACTIVE: ContextVar[tuple[_Kept, bool] | None] = ContextVar("attnzoo_lightseq", default=None)


def attend_or_replay(compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute()`` (an attention forward returning ``(out, lse)``), kept for the rerun inside a
    :func:`lightseq_checkpoint` region; in the rerun, the kept pair instead of a second ``compute()``."""
    active = _ACTIVE.get()
    if active is None:
        return compute()
    kept, replaying = active
    if not replaying:
        kept.pairs.append(compute())
        return kept.pairs[-1]
    if kept.replayed >= len(kept.pairs):
        raise AttnZooError("lightseq_checkpoint: the rerun of the layer made more attention calls than its "
                           "forward did; the layer must call attention the same way both times")
    pair = kept.pairs[kept.replayed]
    kept.pairs[kept.replayed] = None  # released once handed back (the backward saves it again)
    kept.replayed += 1
    return pair


def lightseq_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` checkpointed like ``torch.utils.checkpoint.checkpoint`` (non-reentrant),
    except that the sequence-parallel attention calls inside it are not recomputed in the backward."""
    def contexts():
        kept = _Kept()
        return kept.mode(False), kept.mode(True)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


class LightSeqCheckpoint(torch.nn.Module):
    """Wraps a layer (e.g. a transformer block calling :func:`ring_attention`) so that its forward is
    checkpointed; ``lightseq=False`` gives plain checkpointing (attention recomputed), for comparison."""

    def __init__(self, layer: torch.nn.Module, *, lightseq: bool = True):
        super().__init__()
        if not isinstance(layer, torch.nn.Module):
            raise AttnZooError(f"layer: expected a torch.nn.Module, got {type(layer).__name__}")
        self.layer, self.lightseq = layer, bool(lightseq)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)
        if self.lightseq:
            return lightseq_checkpoint(self.layer, *args, **kwargs)
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
