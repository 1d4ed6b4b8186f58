"""Sequence-parallel attention across processes: ring, TokenRing and Ulysses.

Run with torchrun (gloo on CPU; NCCL with one GPU per rank when CUDA is present):

    torchrun --nproc_per_node=4 examples/sequence_parallel.py --length 4096 --causal

or without torchrun (starts the processes itself, gloo):

    python examples/sequence_parallel.py --nproc 2

Every rank builds the same long sequence from a seed, keeps its contiguous
shard (rank r: positions [r·N/P, (r+1)·N/P)), runs each algorithm forward
and backward on its shard, and rank 0 checks the gathered output and input
gradients against single-process exact attention on the whole sequence.
A rank that dies or hangs makes the others fail after --timeout seconds.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import attnzoo
from attnzoo import parallel as azp

ALGORITHMS = {
    "ring": azp.ring_attention,
    "token_ring": azp.token_ring_attention,
    "ulysses": azp.ulysses_attention,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048, help="total sequence length N (need not divide by P)")
    p.add_argument("--heads", type=int, default=8, help="query heads Hq (Ulysses needs Hq %% P == 0)")
    p.add_argument("--kv-heads", type=int, default=2, help="KV heads (GQA when < --heads)")
    p.add_argument("--dim", type=int, default=64, help="head dim")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0, help="process-group timeout in seconds")
    p.add_argument("--nproc", type=int, default=2, help="processes to start when not launched by torchrun")
    return p.parse_args(argv)


def run(rank: int, world_size: int, args: argparse.Namespace) -> None:
    """One rank's work; returns nothing, rank 0 prints the comparison."""
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if on_gpu else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(args.batch, h, args.length, args.dim, generator=g)
            for h in (args.heads, args.kv_heads, args.kv_heads)]
    d_out = torch.randn(args.batch, args.heads, args.length, args.dim, generator=g)
    if rank == 0:
        leaves = [t.double().requires_grad_() for t in full]
        reference = attnzoo.attention(*leaves, method="exact", causal=args.causal)
        reference.backward(d_out.double())
        print(f"N={args.length} P={world_size} Hq={args.heads} Hkv={args.kv_heads} D={args.dim} "
              f"causal={args.causal} backend={dist.get_backend()}")
        print(f"{'algorithm':<12}{'fwd+bwd s':>10}{'MB sent/rank':>14}{'out err':>10}{'dq err':>10}"
              f"{'dk err':>10}{'dv err':>10}")
    for name, fn in ALGORITHMS.items():
        shards = [azp.shard_sequence(t, rank, world_size).to(device).requires_grad_() for t in full]
        azp.comm_stats().reset()
        dist.barrier()
        start = time.perf_counter()
        out = fn(*shards, causal=args.causal)
        out.backward(azp.shard_sequence(d_out, rank, world_size).to(device))
        elapsed = time.perf_counter() - start
        sent = azp.comm_stats().bytes_sent / 1e6
        gathered = [azp.gather_sequence(t.detach()).cpu() for t in [out] + [s.grad for s in shards]]
        if rank == 0:
            errors = [float((a.double() - b).abs().max() / b.abs().max())
                      for a, b in zip(gathered, [reference.detach()] + [t.grad for t in leaves])]
            print(f"{name:<12}{elapsed:>10.3f}{sent:>14.2f}" + "".join(f"{e:>10.1e}" for e in errors))
            assert max(errors) < 1e-4, f"{name} disagrees with single-process attention: {errors}"
    if rank == 0:
        print("all algorithms match single-process exact attention (relative max error < 1e-4)")


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        backend = azp.default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        azp.init_process_group(backend, timeout=args.timeout)
        try:
            run(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
    else:
        azp.run_local(run, args.nproc, args, timeout=args.timeout, wall_timeout=3600.0)


if __name__ == "__main__":
    main()
