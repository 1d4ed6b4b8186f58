"""Sequence-parallel exact attention across processes on ``torch.distributed`` (docs/methods.md, Sequence parallel).

Every rank passes its contiguous shard of the sequence (rank r holds
``torch.tensor_split(x, P, dim=2)[r]``) and gets back the output for the same
positions:

>>> from attnzoo import parallel as azp
>>> azp.init_process_group(timeout=30.0)          # under torchrun; gloo on CPU, NCCL on GPU
>>> out = azp.ring_attention(q, k, v, causal=True)
>>> out = azp.token_ring_attention(q, k, v, causal=True)
>>> out = azp.ulysses_attention(q, k, v, method="exact", causal=True)
>>> out = azp.usp_attention(q, k, v, ulysses=2, causal=True)   # Ulysses in rows of 2, a ring across rows
>>> out = azp.ring_attention(q, k, v, causal=True, cu_seqlens_q=offsets)   # packed documents (global offsets)
>>> y = azp.lightseq_checkpoint(layer, x)   # checkpointed layer; its attention is not recomputed

A rank that dies or never reaches a call makes the others raise
:class:`ParallelError` within the process group's timeout; shards that
disagree across ranks are reported by name. :func:`comm_stats` counts the bytes
each process sent and received.
"""

from .comm import CommStats, ParallelError, comm_stats
from .launch import default_backend, init_process_group, run_local
from .layout import gather_sequence, shard_sequence, shard_sizes
from .remat import LightSeqCheckpoint, lightseq_checkpoint
from .ring import ring_attention, token_ring_attention
from .ulysses import ulysses_attention
from .usp import usp_attention, usp_mesh

__all__ = [
    "CommStats", "LightSeqCheckpoint", "ParallelError", "comm_stats", "default_backend", "gather_sequence",
    "init_process_group", "lightseq_checkpoint", "ring_attention", "run_local", "shard_sequence", "shard_sizes",
    "token_ring_attention", "ulysses_attention", "usp_attention", "usp_mesh",
]
